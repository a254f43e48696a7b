//! Accept loops, one per port per shard: each accepted connection gets its task and mailbox and
//! is posted to the loop, which admits it (connection limit, accept rate, shutdown) or refuses
//! it.

use super::{ConnCtl, Event, Events};
use crate::lifecycle::Port;
use glommio::net::TcpListener;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

/// Accepts on `listener` until `stop` resolves.
pub async fn run(
    port: Port,
    listener: TcpListener,
    events: Rc<Events>,
    stop: impl std::future::Future<Output = ()>,
) {
    let stop = std::pin::pin!(stop);
    let mut stop = stop;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            (&mut stop).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let ctl = ConnCtl::new();
                let fd = stream.as_raw_fd();
                // Spawned directly (no wrapping async block): a wrapper would keep its own copy of
                // the stream in every connection's task for the connection's whole life.
                glommio::spawn_local(super::conn::serve(stream, ctl.clone(), events.clone(), port)).detach();
                events.post(Event::Opened { port, fd, ctl }).await;
            }
            Some(Err(e)) => {
                // EMFILE and friends: the connection waits in the backlog; back off briefly so a
                // full fd table does not spin this loop.
                tracing::warn!(?port, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::info!(?port, "stopped accepting");
}
