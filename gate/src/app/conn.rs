//! One app connection's task: the read loop and the slow path of writing.
//!
//! Reads are readiness-based: the task waits in glommio's `read` with a small inline buffer
//! (that and the task are all an idle connection owns). When data comes, the rest of the burst
//! is drained with non-blocking `recv`s into the shard's scratch buffer, every whole frame is
//! decoded and verified in place, and only an incomplete tail is kept, in a per-connection
//! `Vec` that exists only while a frame is half-read.
//!
//! Writes normally happen on the shard's flush (one `send` per connection per executor turn);
//! only when the socket is full does this task wait for it to drain.

use super::session;
use crate::net::{self, Io};
use crate::shard::{ConnEvent, Shard};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use logic::ConnRef;
use schema::{Decoded, Frames, Limits};
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Inline read buffer: one GPS frame (64 bytes) fits, so the common segment is one syscall.
const INLINE: usize = 128;
/// At most this many extra `recv`s drain one readable burst, so one busy connection cannot
/// starve the others on its shard.
const MAX_DRAIN_READS: usize = 8;
/// How long a closing connection may take to write its last frames.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a closing connection's unread input is drained so closing sends FIN, not RST (an
/// RST could destroy the go-away or error frame before the app reads it).
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_millis(200);

enum Step {
    Read(std::io::Result<usize>),
    Event(ConnEvent),
}

/// Serves one connection until it closes.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, me: ConnRef) {
    let _ = stream.set_nodelay(true);
    let mut inline = [0u8; INLINE];
    loop {
        let step = futures_lite::future::or(async { Step::Read(stream.read(&mut inline).await) }, async {
            Step::Event(futures_lite::future::poll_fn(|cx| shard.poll_conn_event(me, cx.waker())).await)
        })
        .await;
        match step {
            Step::Read(Ok(0)) | Step::Read(Err(_)) => break,
            Step::Read(Ok(n)) => {
                if on_bytes(&shard, me, &inline[..n], n == INLINE) {
                    break;
                }
            }
            Step::Event(ConnEvent::Close(_)) => {
                close_gracefully(&shard, &mut stream, me).await;
                break;
            }
            Step::Event(ConnEvent::WriteBlocked) => {
                if !write_blocked(&shard, &mut stream, me).await {
                    break;
                }
            }
        }
    }
    shard.remove_conn(me);
    drop(stream);
}

/// Handles bytes that arrived; returns true when the peer closed.
fn on_bytes(shard: &Shard, me: ConnRef, first: &[u8], maybe_more: bool) -> bool {
    let now = net::now_ms();
    let mut scratch = shard.scratch.borrow_mut();
    scratch.clear();
    let Some(fd) = shard.with_conn(me, |c| {
        scratch.extend_from_slice(&c.partial);
        c.last_rx_ms = now;
        c.fd
    }) else {
        return true;
    };
    scratch.extend_from_slice(first);
    let mut eof = false;
    if maybe_more {
        for _ in 0..MAX_DRAIN_READS {
            if scratch.capacity() - scratch.len() < 4096 {
                break;
            }
            match net::recv_into(fd, &mut scratch) {
                Ok(Io::Done(_)) => {}
                Ok(Io::WouldBlock) => break,
                Ok(Io::Eof) | Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
    }
    shard.metrics().bytes_in.fetch_add(scratch.len() as u64, Relaxed);

    let limits = Limits { max_body: shard.cfg.app.max_body };
    let mut frames = Frames::new(&scratch, limits);
    for item in frames.by_ref() {
        match item {
            Ok(Decoded::Frame(f)) => session::on_frame(shard, me, &f),
            Ok(Decoded::Rejected { header, error }) => session::on_rejected(shard, me, &header, &error),
            Err(e) => {
                session::on_stream_error(shard, me, &e);
                return eof;
            }
        }
        if shard.with_conn(me, |c| c.close.is_some()).unwrap_or(true) {
            break;
        }
    }
    let rest = frames.rest();
    shard.with_conn(me, |c| {
        c.partial.clear();
        if rest.is_empty() {
            c.partial_since_ms = 0;
            if c.partial.capacity() > 0 {
                c.partial = Vec::new();
            }
        } else {
            c.partial.extend_from_slice(rest);
            if c.partial_since_ms == 0 {
                c.partial_since_ms = now;
            }
        }
    });
    eof
}

/// Waits for a full socket to take the queued bytes; returns false if the connection must end.
async fn write_blocked(shard: &Rc<Shard>, stream: &mut TcpStream, me: ConnRef) -> bool {
    let buf = shard
        .with_conn(me, |c| {
            let b = std::mem::take(&mut c.out);
            c.out_inflight = b.len();
            b
        })
        .unwrap_or_default();
    let done = futures_lite::future::or(async { Some(stream.write_all(&buf).await) }, async {
        futures_lite::future::poll_fn(|cx| shard.poll_close(me, cx.waker())).await;
        None
    })
    .await;
    match done {
        Some(Ok(())) => {
            let m = shard.metrics();
            m.bytes_out.fetch_add(buf.len() as u64, Relaxed);
            m.out_queue_bytes.fetch_sub(buf.len() as i64, Relaxed);
            shard.with_conn(me, |c| {
                c.out_inflight = 0;
                c.write_blocked = false;
            });
            // Whatever was queued meanwhile goes out on the next flush.
            shard.flush_writes();
            true
        }
        Some(Err(_)) => false,
        None => {
            // Closing while blocked: put the unwritten bytes back for the final attempt.
            shard.with_conn(me, |c| {
                let mut rest = buf;
                rest.extend_from_slice(&c.out);
                c.out = rest;
                c.out_inflight = 0;
            });
            close_gracefully(shard, stream, me).await;
            false
        }
    }
}

/// Writes what is queued (bounded in time), half-closes, and drains unread input briefly.
async fn close_gracefully(shard: &Rc<Shard>, stream: &mut TcpStream, me: ConnRef) {
    let buf = shard.with_conn(me, |c| std::mem::take(&mut c.out)).unwrap_or_default();
    if !buf.is_empty() {
        let m = shard.metrics();
        m.out_queue_bytes.fetch_sub(buf.len() as i64, Relaxed);
        let wrote = futures_lite::future::or(async { stream.write_all(&buf).await.is_ok() }, async {
            glommio::timer::sleep(CLOSE_WRITE_TIMEOUT).await;
            false
        })
        .await;
        if wrote {
            m.bytes_out.fetch_add(buf.len() as u64, Relaxed);
        }
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
