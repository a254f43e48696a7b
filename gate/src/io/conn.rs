//! One connection's task, app or sidecar port: it reads and posts what it read to the shard's
//! loop, and does what the loop asks through the connection's mailbox. It decides nothing.
//!
//! Reads are readiness-based: the task waits in glommio's `read` with a small inline buffer
//! (that and the task are all an idle connection owns here). Writes normally happen in the loop
//! (one non-blocking `send` per connection per turn); only when the socket is full does the loop
//! hand the rest to this task, which waits for the socket to take it.

use super::{Command, ConnCtl, Event, Events, BULK, INLINE};
use crate::lifecycle::Port;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::net::Shutdown;
use std::rc::Rc;
use std::time::Duration;

/// How long a closing connection may take to write its last frames.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closing connection's unread input is drained so closing sends FIN, not RST (an
/// RST could destroy the go-away or error frame before the app reads it).
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_millis(200);

enum Step {
    Read(std::io::Result<usize>),
    Command(Command),
}

/// Serves one accepted connection until it closes: waits for the loop's admission, then reads
/// and posts until the peer or the loop ends it, then posts `Closed`.
pub async fn serve(mut stream: TcpStream, ctl: Rc<ConnCtl>, events: Rc<Events>, port: Port) {
    let Some((me, wait)) = ctl.admitted().await else {
        // Refused: the loop queued the refusal's frame; write it if the socket takes it now.
        if let Command::Close(frame) = ctl.next().await {
            let _ = crate::net::send(std::os::fd::AsRawFd::as_raw_fd(&stream), &frame);
        }
        return;
    };
    if !wait.is_zero() {
        // Boxed, so the timer does not stay in every connection's task for its whole life.
        Box::pin(glommio::timer::sleep(wait)).await;
    }
    let _ = stream.set_nodelay(true);
    let mut inline = [0u8; INLINE];
    // The loop never reads a socket whose task is reading (the bytes would arrive out of
    // order), so an app-server's task reads in large pieces itself.
    let mut bulk = if port == Port::Sidecar { vec![0u8; BULK] } else { Vec::new() };
    let mut parked = false;
    loop {
        let step = if parked {
            Step::Command(ctl.next().await)
        } else {
            // The mailbox first: a connection being closed must not read more of its input.
            let buf: &mut [u8] = if bulk.is_empty() { &mut inline } else { &mut bulk };
            futures_lite::future::or(async { Step::Command(ctl.next().await) }, async {
                Step::Read(stream.read(buf).await)
            })
            .await
        };
        match step {
            Step::Read(Ok(0)) | Step::Read(Err(_)) => break,
            Step::Read(Ok(n)) if bulk.is_empty() => {
                if let Some(wait) = events.send(Event::Data { conn: me, len: n as u8, buf: inline }) {
                    wait.await
                }
            }
            Step::Read(Ok(n)) => {
                if let Some(wait) = events.send(Event::Bulk { conn: me, bytes: bulk[..n].to_vec() }) {
                    wait.await
                }
            }
            Step::Command(Command::Park) => parked = true,
            Step::Command(Command::Unpark) => parked = false,
            // The rare paths are boxed: an async fn's state is as large as its largest await
            // point, and every idle connection would otherwise carry their buffers and timers.
            Step::Command(Command::Write(bytes)) => {
                let ok = Box::pin(write_blocked(&mut stream, &ctl, bytes)).await;
                if let Some(wait) = events.send(Event::Written { conn: me, ok }) {
                    wait.await
                };
                if !ok {
                    // Failed, or the loop asked for a close meanwhile: the close comes next.
                    if let Command::Close(_) = ctl.next().await {
                        Box::pin(close_gracefully(&mut stream, Vec::new())).await;
                    }
                    break;
                }
            }
            Step::Command(Command::Close(last)) => {
                Box::pin(close_gracefully(&mut stream, last)).await;
                break;
            }
        }
    }
    if let Some(wait) = events.send(Event::Closed { conn: me }) {
        wait.await
    };
    drop(stream);
}

/// Waits for a full socket to take `bytes`; false when it failed or a close came first (the
/// rest is then given up: the peer is not reading).
async fn write_blocked(stream: &mut TcpStream, ctl: &ConnCtl, bytes: Vec<u8>) -> bool {
    futures_lite::future::or(async { stream.write_all(&bytes).await.is_ok() }, async {
        ctl.close_requested().await;
        false
    })
    .await
}

/// Writes the last bytes (bounded in time), half-closes, and drains unread input briefly.
async fn close_gracefully(stream: &mut TcpStream, last: Vec<u8>) {
    if !last.is_empty() {
        let _ = futures_lite::future::or(async { stream.write_all(&last).await.is_ok() }, async {
            glommio::timer::sleep(CLOSE_WRITE_TIMEOUT).await;
            false
        })
        .await;
    }
    let _ = stream.shutdown(Shutdown::Write).await;
    let mut sink = [0u8; 512];
    let _ = futures_lite::future::or(
        async {
            // Bounded: at most 64 KiB of leftover input is read and thrown away.
            for _ in 0..128 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        },
        glommio::timer::sleep(CLOSE_DRAIN_TIMEOUT),
    )
    .await;
}
