//! An app-server: connects to a gate's sidecar port, pushes one message to a driver and prints
//! what the gate answers and the push's receipt. Run it while the `app` example is logged in:
//!
//! ```sh
//! cargo run -p client --example appserver -- --uid 42 --text "order 7: pick up at the station"
//! ```
//!
//! Flags (all optional):
//! - `--sidecar HOST:PORT`  the gate's sidecar port (default 127.0.0.1:7200, what `make run` binds);
//! - `--secret S`           the sidecar secret (default: the built-in development secret, which
//!   `make run`'s gate uses);
//! - `--uid N`              the driver to push to (default 42);
//! - `--text T`             the payload (default "hello from the app-server");
//! - `--ttl-ms N`           how long the push may wait for the app (default 30000).

use client::{AppServerConn, AppServerEvent, PushSpec};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let sidecar = flag("--sidecar").unwrap_or_else(|| "127.0.0.1:7200".into());
    let secret = flag("--secret").unwrap_or_else(|| "fleetgate-dev-secret-change-me".into());
    let uid: u64 = flag("--uid").map_or(Ok(42), |u| u.parse())?;
    let text = flag("--text").unwrap_or_else(|| "hello from the app-server".into());
    let ttl_ms: u32 = flag("--ttl-ms").map_or(Ok(30_000), |t| t.parse())?;

    let (srv, events) =
        AppServerConn::connect(sidecar.as_str(), secret.as_bytes(), "example", Duration::from_secs(5))?;
    let w = srv.welcome();
    println!("connected to gate {} (incarnation {:#x})", w.node, w.incarnation);
    // A message id the app has not seen: apps show each id once (docs/PROTOCOL.md §9.9).
    let message_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    let accepted = srv.push(&PushSpec {
        message_id,
        uids: vec![uid],
        payload: text.into_bytes(),
        ttl_ms,
        broadcast: 0,
        kind: 1,
        log_id: 0,
    })?;
    println!("push {message_id} accepted: {} receipt(s) will follow", accepted.targets);
    // Exactly one receipt comes per target, at the latest TTL + 1 s after acceptance.
    let deadline = Instant::now() + Duration::from_millis(u64::from(ttl_ms) + 5_000);
    while Instant::now() < deadline {
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(AppServerEvent::Receipt { message_id: id, uid: u, outcome }) if id == message_id => {
                println!("receipt: uid {u} {outcome:?}");
                srv.close()?;
                return Ok(());
            }
            Ok(AppServerEvent::GateLost) => return Err("the gate was lost before the receipt".into()),
            _ => {}
        }
    }
    Err("no receipt within TTL + 5 s".into())
}
