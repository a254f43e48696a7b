//! The admin HTTP port (shard 0): `/metrics` (Prometheus text), `/healthz`, and `/debug/gps`
//! (the newest forwarded GPS points, one `uid ts_ms lat_e7 lon_e7` line each).
//!
//! A deliberately tiny HTTP/1.0-style server: one request per connection, request head bounded
//! at 8 KiB and 5 s, `Connection: close`. It serves operators and tests, not traffic.

use crate::mesh::Mesh;
use crate::metrics::{self, ShardMetrics};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use schema::wire;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the backlog.
const MAX_CONCURRENT: usize = 16;

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Every shard's metrics.
    pub metrics: Arc<Vec<ShardMetrics>>,
    /// Inbox depths.
    pub mesh: Arc<Mesh>,
    /// Newest forwarded GPS points.
    pub gps_recent: Arc<Mutex<VecDeque<wire::UidGpsPoint>>>,
    /// Cluster mode: the directory's state, for `/healthz` and `/metrics`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Serves the admin port until `stop` resolves.
pub async fn run(listener: TcpListener, state: AdminState, stop: impl std::future::Future<Output = ()>) {
    let state = Rc::new(state);
    let active = Rc::new(std::cell::Cell::new(0usize));
    let serve = async {
        loop {
            let Ok(stream) = listener.accept().await else {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if active.get() >= MAX_CONCURRENT {
                continue; // dropped: the client retries; admin is not worth unbounded tasks
            }
            active.set(active.get() + 1);
            let (state, active) = (state.clone(), active.clone());
            glommio::spawn_local(async move {
                let _ = futures_lite::future::or(handle(stream, &state), async {
                    glommio::timer::sleep(HEAD_TIMEOUT).await;
                    Ok(())
                })
                .await;
                active.set(active.get() - 1);
            })
            .detach();
        }
    };
    futures_lite::future::or(serve, stop).await;
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => {
            let mut m = metrics::render(&state.metrics, |i| state.mesh.depth(i));
            if let Some(c) = &state.cluster {
                m.push_str(&crate::cluster::render_metrics(c));
            }
            ("200 OK", "text/plain; version=0.0.4", m)
        }
        // Local sessions go on while Redis is away, so the node stays up (200) and says which
        // part is degraded; a load balancer keeps sending apps here.
        ("GET", "/healthz") => match &state.cluster {
            None => ("200 OK", "text/plain", "ok\n".to_string()),
            Some(c) => ("200 OK", "text/plain", crate::cluster::health(c)),
        },
        ("GET", "/debug/gps") => {
            let mut s = String::new();
            if let Ok(recent) = state.gps_recent.lock() {
                for p in recent.iter() {
                    let q = p.point();
                    let _ = writeln!(s, "{} {} {} {}", p.uid(), q.ts_ms(), q.lat_e7(), q.lon_e7());
                }
            }
            ("200 OK", "text/plain", s)
        }
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics, /healthz or /debug/gps\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.close().await
}
