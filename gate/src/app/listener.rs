//! Accepting app connections on one shard, with bounds: a connection limit per shard and an
//! accept-rate limit whose overflow waits in a bounded queue; past both, the refusal carries a
//! retry-after with jitter.

use crate::metrics::Refusal;
use crate::net;
use crate::shard::{jitter, Port, Shard};
use glommio::net::{TcpListener, TcpStream};
use schema::wire;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Accept loop of one shard; ends when shutdown begins (dropping the listener).
pub async fn run(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown_begun().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => admit(&shard, stream),
            Some(Err(e)) => {
                // EMFILE and friends: the connection waits in the backlog; back off briefly so a
                // full fd table does not spin this loop.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::info!(shard = shard.id, "stopped accepting");
}

fn admit(shard: &Rc<Shard>, stream: TcpStream) {
    let m = shard.metrics();
    m.accepted.fetch_add(1, Relaxed);
    if shard.shutting_down.get() {
        return refuse(shard, stream, Refusal::Shutdown, "gate shutting down");
    }
    if shard.app_conns() >= shard.cfg.app.max_conns_per_shard as usize {
        return refuse(shard, stream, Refusal::ConnLimit, "connection limit reached on this shard");
    }
    let wait = match take_accept_token(shard) {
        Some(w) => w,
        None => return refuse(shard, stream, Refusal::AcceptRate, "accept rate limit: queue full"),
    };
    let me = shard.add_conn(stream.as_raw_fd(), Port::App, net::now_ms());
    // Spawned directly (no wrapping async block): a wrapper would keep its own copy of the
    // stream and the shard handle in every connection's task for the connection's whole life.
    glommio::spawn_local(crate::conn::serve(shard.clone(), stream, me, wait)).detach();
}

/// Token bucket: one token per accept, refilled at the configured rate, holding at most one
/// second's worth. Tokens may go negative down to `-accept_queue`: those accepts wait their turn.
fn take_accept_token(shard: &Shard) -> Option<Duration> {
    let rate = shard.cfg.app.accept_rate_per_shard as f64;
    let now = Instant::now();
    let elapsed = now.duration_since(shard.accept_refill.get()).as_secs_f64();
    shard.accept_refill.set(now);
    let tokens = (shard.accept_tokens.get() + elapsed * rate).min(rate);
    if tokens - 1.0 < -(shard.cfg.app.accept_queue as f64) {
        shard.accept_tokens.set(tokens);
        return None;
    }
    let tokens = tokens - 1.0;
    shard.accept_tokens.set(tokens);
    Some(if tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-tokens / rate) })
}

/// Refuses a connection with an `Overloaded` error frame carrying a jittered retry-after.
fn refuse(shard: &Shard, stream: TcpStream, why: Refusal, message: &str) {
    let m = shard.metrics();
    m.refused.add(why as usize, 1);
    m.errors.add(wire::ErrorCode::Overloaded.0 as usize, 1);
    let retry = jitter(shard.cfg.app.retry_after_ms);
    let log_id = shard.new_log_id();
    tracing::warn!(log_id, shard = shard.id, reason = ?why, retry_after_ms = retry, "connection refused");
    let mut frame = Vec::new();
    let code = if matches!(why, Refusal::Shutdown) {
        wire::ErrorCode::ShuttingDown
    } else {
        wire::ErrorCode::Overloaded
    };
    shard.enc.borrow_mut().error(&mut frame, 0, log_id, code, wire::Hop::Gate, 0, message, retry);
    // Best effort: a fresh socket's send buffer takes a small frame; the peer has sent nothing
    // we must drain, so closing after it sends FIN, not RST.
    let _ = net::send(stream.as_raw_fd(), &frame);
    drop(stream);
}
