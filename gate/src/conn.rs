//! One connection's task, app or sidecar port: the read loop and the slow path of writing.
//!
//! Reads are readiness-based: the task waits in glommio's `read` with a small inline buffer
//! (that and the task are all an idle connection owns). When data comes, the rest of the burst
//! is drained with non-blocking `recv`s into the shard's scratch buffer, every whole frame is
//! decoded and verified in place, and only an incomplete tail is kept, in a per-connection
//! `Vec` that exists only while a frame is half-read.
//!
//! Writes normally happen on the shard's flush (one `send` per connection per executor turn);
//! only when the socket is full does this task wait for it to drain.

use crate::app::session;
use crate::net::{self, Io};
use crate::shard::{ConnEvent, Port, Shard};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use logic::ConnRef;
use schema::{Decoded, Frames, Limits, HEADER_LEN};
use std::net::Shutdown;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Read tick of busy app connections: GPS tolerates this much delay, and a busy connection
/// then costs one recv per tick instead of a poll completion and a recv per segment.
const READ_TICK: Duration = Duration::from_millis(10);
/// Frames closer together than this put a connection in busy mode.
const BUSY_GAP: Duration = Duration::from_millis(100);
/// Most ticks a busy connection waits between reads (bounds the extra delay of its frames).
const MAX_TICKS_PER_READ: u32 = 10;
/// Empty reads before a busy connection goes back to waiting for readiness.
const BUSY_TICKS: u8 = 4;
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
/// `wait`: how long the accept-rate limit queues the connection before it is served.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, me: ConnRef, wait: Duration) {
    if !wait.is_zero() {
        // Boxed, so the timer does not stay in every connection's task for its whole life.
        Box::pin(glommio::timer::sleep(wait)).await;
    }
    let _ = stream.set_nodelay(true);
    let mut inline = [0u8; INLINE];
    // App connections send small frames (a GPS frame is 64 bytes): when the inline buffer
    // fills, the next read takes the rest, and an extra drain would mostly find the socket
    // empty (a wasted syscall per burst). App-servers send large frames in bursts: drain them.
    let drain_bursts = shard.with_conn(me, |c| c.port == Port::Sidecar).unwrap_or(false);
    // Busy mode (app port): a connection whose frames come closer together than BUSY_GAP reads
    // on the shard's tick with a direct non-blocking recv instead of waiting in a readiness poll.
    let mut busy_ticks_left = 0u8;
    let mut last_read = std::time::Instant::now();
    // Ticks between reads in busy mode: about the connection's gap between frames, so a driver
    // sending every 40 ms is read every 4th tick rather than finding the socket empty 3 times.
    let mut ticks_per_read = 1u32;
    let mut ticks_waited = 0u32;
    loop {
        let step = if busy_ticks_left > 0 {
            let event = futures_lite::future::or(
                async {
                    shard.read_tick(READ_TICK).await;
                    None
                },
                async {
                    Some(futures_lite::future::poll_fn(|cx| shard.poll_conn_event(me, cx.waker())).await)
                },
            )
            .await;
            match event {
                Some(e) => Step::Event(e),
                None if {
                    ticks_waited += 1;
                    ticks_waited < ticks_per_read
                } =>
                {
                    continue
                }
                None => match on_bytes(&shard, me, &[], true) {
                    Read::Closed => break,
                    Read::Empty => {
                        ticks_waited = 0;
                        busy_ticks_left -= 1;
                        continue;
                    }
                    Read::Data => {
                        ticks_waited = 0;
                        busy_ticks_left = BUSY_TICKS;
                        continue;
                    }
                },
            }
        } else {
            // The event first: a connection being closed (a stream error, a timeout) must not
            // read and decode more of its input, which a peer that keeps sending would otherwise
            // have answered again before the close is seen.
            futures_lite::future::or(
                async {
                    Step::Event(
                        futures_lite::future::poll_fn(|cx| shard.poll_conn_event(me, cx.waker())).await,
                    )
                },
                async { Step::Read(stream.read(&mut inline).await) },
            )
            .await
        };
        match step {
            Step::Read(Ok(0)) | Step::Read(Err(_)) => break,
            Step::Read(Ok(n)) => {
                if on_bytes(&shard, me, &inline[..n], n == INLINE && drain_bursts) == Read::Closed {
                    break;
                }
                let now = std::time::Instant::now();
                let gap = now.duration_since(last_read);
                if !drain_bursts && gap < BUSY_GAP {
                    busy_ticks_left = BUSY_TICKS;
                    ticks_waited = 0;
                    ticks_per_read =
                        (gap.as_millis() as u32 / READ_TICK.as_millis() as u32).clamp(1, MAX_TICKS_PER_READ);
                }
                last_read = now;
            }
            // The rare paths are boxed: an async fn's state is as large as its largest await
            // point, and every idle connection would otherwise carry their buffers and timers.
            Step::Event(ConnEvent::Close(_)) => {
                Box::pin(close_gracefully(&shard, &mut stream, me)).await;
                break;
            }
            Step::Event(ConnEvent::WriteBlocked) => {
                if !Box::pin(write_blocked(&shard, &mut stream, me)).await {
                    break;
                }
            }
        }
    }
    shard.remove_conn(me);
    drop(stream);
}

/// What a read found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// Bytes came and were handled.
    Data,
    /// The socket had nothing.
    Empty,
    /// The peer closed (or the connection is gone).
    Closed,
}

/// Handles bytes that arrived (`first`, then, with `maybe_more`, what else the socket holds).
fn on_bytes(shard: &Shard, me: ConnRef, first: &[u8], maybe_more: bool) -> Read {
    let now = net::now_ms();
    let Some((fd, port, mut own, closing)) =
        shard.with_conn(me, |c| (c.fd, c.port, std::mem::take(&mut c.partial), c.close.is_some()))
    else {
        return Read::Closed;
    };
    if closing {
        // Closing: whatever else arrives is not decoded (its answers could not be sent anyway,
        // and after a stream error its framing is lost).
        return Read::Data;
    }
    let max_body = match port {
        Port::App => shard.cfg.app.max_body,
        Port::Sidecar => shard.cfg.sidecar.max_body,
    };
    if own.is_empty() {
        // The common case: decode from the shard's scratch; keep only an incomplete tail.
        let mut scratch = shard.scratch.borrow_mut();
        scratch.clear();
        let (eof, used) =
            read_and_decode(shard, me, port, fd, &mut scratch, first, maybe_more, max_body, false);
        let got = !scratch.is_empty();
        keep_partial(shard, me, &scratch[used..], now);
        outcome(shard, me, eof, got, now)
    } else {
        // A frame is half-read: it grows in its own buffer, so a large sidecar frame arriving in
        // many reads is not copied again on each one.
        let before = own.len();
        let (eof, used) = read_and_decode(shard, me, port, fd, &mut own, first, maybe_more, max_body, true);
        let got = own.len() > before;
        own.drain(..used);
        if own.is_empty() {
            keep_partial(shard, me, &[], now);
        } else {
            shard.with_conn(me, |c| c.partial = own);
        }
        outcome(shard, me, eof, got, now)
    }
}

fn outcome(shard: &Shard, me: ConnRef, eof: bool, got: bool, now: u64) -> Read {
    if got {
        shard.with_conn(me, |c| c.last_rx_ms = now);
    }
    match (eof, got) {
        (true, _) => Read::Closed,
        (false, true) => Read::Data,
        (false, false) => Read::Empty,
    }
}

/// Appends `first` and what else the socket holds (bounded) to `buf`, then handles every whole
/// frame in it. Returns (peer closed, bytes consumed).
#[allow(clippy::too_many_arguments)]
fn read_and_decode(
    shard: &Shard,
    me: ConnRef,
    port: Port,
    fd: std::os::fd::RawFd,
    buf: &mut Vec<u8>,
    first: &[u8],
    maybe_more: bool,
    max_body: u32,
    grow: bool,
) -> (bool, usize) {
    let before = buf.len();
    buf.extend_from_slice(first);
    let mut eof = false;
    if maybe_more {
        for _ in 0..MAX_DRAIN_READS {
            if buf.capacity() - buf.len() < 4096 {
                if !grow {
                    break;
                }
                // Room for the rest of the frame being read (bounded by the frame limit).
                let need = buf.first_chunk::<HEADER_LEN>().map_or(64 * 1024, |h| {
                    schema::Header::read(h).frame_len().min(HEADER_LEN + max_body as usize)
                });
                buf.reserve(need.saturating_sub(buf.len()).max(64 * 1024));
            }
            let spare = buf.capacity() - buf.len();
            match net::recv_into(fd, buf) {
                // A read that did not fill the room took everything queued: another would find
                // the socket empty, a wasted syscall.
                Ok(Io::Done(n)) if n < spare => break,
                Ok(Io::Done(_)) => {}
                Ok(Io::WouldBlock) => break,
                Ok(Io::Eof) | Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
    }
    shard.metrics().bytes_in.fetch_add((buf.len() - before) as u64, Relaxed);

    let mut frames = Frames::new(buf, Limits { max_body });
    for item in frames.by_ref() {
        match item {
            Ok(Decoded::Frame(mut f)) => {
                // A flow started with log-id 0 gets a gate-assigned one at its first hop (§7),
                // carried by every answer and log line from here on.
                f.header.log_id = shard.log_id_or_new(f.header.log_id);
                match port {
                    Port::App => session::on_frame(shard, me, &f),
                    Port::Sidecar => crate::sidecar::on_frame(shard, me, &f),
                }
            }
            Ok(Decoded::Rejected { mut header, error }) => {
                header.log_id = shard.log_id_or_new(header.log_id);
                session::on_rejected(shard, me, &header, &error)
            }
            Err(e) => {
                session::on_stream_error(shard, me, &e);
                return (eof, frames.consumed());
            }
        }
        if shard.with_conn(me, |c| c.close.is_some()).unwrap_or(true) {
            break;
        }
    }
    (eof, frames.consumed())
}

/// Keeps an incomplete frame's bytes with the connection, and when it started (read timeout).
fn keep_partial(shard: &Shard, me: ConnRef, rest: &[u8], now: u64) {
    shard.with_conn(me, |c| {
        if rest.is_empty() {
            c.partial_since_ms = 0;
            c.partial = Vec::new();
        } else {
            c.partial = rest.to_vec();
            if c.partial_since_ms == 0 {
                c.partial_since_ms = now;
            }
        }
    });
}

/// Waits for a full socket to take the queued bytes; returns false if the connection must end.
async fn write_blocked(shard: &Rc<Shard>, stream: &mut TcpStream, me: ConnRef) -> bool {
    let buf = shard
        .with_conn(me, |c| {
            let b = std::mem::take(&mut c.out);
            c.out_inflight = b.len();
            c.write_stalled_ms = net::now_ms();
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
                c.write_stalled_ms = 0;
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
