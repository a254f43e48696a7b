//! The shard's one loop. It owns the shard's state (`&mut Shard`), and takes, in turn: what the
//! I/O tasks post (accepted connections, bytes read, writes done, connections ended), the mesh's
//! batches from other shards, and its deadlines (the logic shard's, the timeout sweep, the busy
//! read tick, the receipt window, shutdown steps). It hands each frame to its flow (`app::*`,
//! `sidecar::*`), feeds the logic shard, and carries out the logic shard's outputs — matched
//! once, in [`apply`] — then writes what the turn produced.
//!
//! ```text
//!   io tasks ──Events──▶ ┌───────────── loop (one per shard) ─────────────┐
//!   other shards ─mesh─▶ │ on_event / on_msgs / on_time                    │──▶ sockets (send)
//!   timer ─────────────▶ │   frames → app::*, sidecar::*  → logic inputs   │──▶ mesh batches
//!                        │   logic::Shard::handle/tick    → apply(output)  │──▶ io tasks (ctl)
//!                        └─────────────────────────────────────────────────┘
//! ```

use crate::io::{Command, Event, Events, Stop};
use crate::lifecycle::{CloseReason, Expiry, Port};
use crate::mesh::Msg;
use crate::metrics::Refusal;
use crate::net::{self, Io};
use crate::state::{jitter, mono_ms, ring_token, Busy, ConnIo, RingConn, Shard, SCRATCH_BYTES};
use crate::uring::Completion;
use logic::{ConnRef, Output};
use schema::wire::{self, GoAwayReason};
use schema::{Decoded, Frames, Limits, HEADER_LEN};
use std::rc::Rc;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Mesh batches handled per turn before the loop serves its connections again.
const MAX_BATCHES_PER_TURN: usize = 64;
/// Read tick of busy app connections: GPS tolerates this much delay, and a busy connection
/// then costs one recv per tick instead of a poll completion and a recv per segment.
const READ_TICK_MS: u64 = 10;
/// Frames closer together than this put a connection in busy mode.
const BUSY_GAP_MS: u64 = 100;
/// Most ticks a busy connection waits between reads (bounds the extra delay of its frames).
const MAX_TICKS_PER_READ: u32 = 10;
/// Empty reads before a busy connection goes back to waiting for readiness.
const BUSY_TICKS: u8 = 4;
/// At most this many extra `recv`s drain one readable burst, so one busy connection cannot
/// starve the others on its shard.
const MAX_DRAIN_READS: usize = 8;
/// App-server connections per shard.
const MAX_SIDECAR_CONNS_PER_SHARD: usize = 64;
/// Rounds of handling what this shard sent itself in one flush: logic → app-server side →
/// another logic input covers every chain the flows make.
const OWN_ROUNDS: usize = 4;
/// Each shutdown step waits at most this long.
const DRAIN_TIMEOUT_MS: u64 = 3_000;
/// App ring completions handled per turn at most (the rest wait for the next turn).
const MAX_COMPLETIONS_PER_TURN: usize = 16_384;
/// A closing ring connection's last bytes may take this long before it is cut.
const CLOSE_WRITE_TIMEOUT_MS: u64 = 1_000;
/// A closing ring connection's unread input is drained this long after its write side is shut,
/// so closing sends FIN, not RST (an RST could destroy the last frame before the app reads it).
const CLOSE_DRAIN_MS: u64 = 200;

/// Where a shard's shutdown stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shutdown {
    Running,
    /// Go-away sent to every app; waiting (bounded) for them to close.
    WaitApps {
        until: u64,
    },
    /// In-flight pushes ended; waiting for every shard to do so and for receipt acks.
    WaitAcks {
        until: u64,
    },
    /// Every connection told to close; waiting for them.
    Closing {
        until: u64,
    },
    Done,
}

/// The loop's clocks.
struct Clocks {
    next_read_tick: Option<u64>,
    /// While the app ring is busy: when to take its completions next, instead of waiting to be
    /// woken.
    ring_harvest: Option<Instant>,
    /// When a harvest last found completions.
    ring_last_data: Option<Instant>,
    /// The ring is harvested on its window (its eventfd is off meanwhile).
    ring_busy: bool,
    shutdown: Shutdown,
}

/// Runs the shard until its shutdown completes.
pub async fn run(mut shard: Shard, events: Rc<Events>, stop: Rc<Stop>) {
    let mesh = shard.mesh.clone();
    let inbox = &mesh.inboxes[shard.id as usize];
    let mut batch = Vec::new();
    let mut clocks = Clocks {
        next_read_tick: None,
        ring_harvest: None,
        ring_last_data: None,
        ring_busy: false,
        shutdown: Shutdown::Running,
    };
    let mut timer: Option<(u64, std::pin::Pin<Box<glommio::timer::Timer>>)> = None;
    // The app ring wakes the loop through its eventfd, read by a small task of its own with
    // glommio (so the loop sleeps in glommio's ring, never spins, never polls on a timer while
    // idle); the task hands each wake-up to the loop through a `Notify`. glommio's file read keeps
    // a waker per poll, so it must be polled only by a task it wakes, never by the loop's turns.
    let ring_wake = crate::io::Notify::new();
    if let Some(r) = shard.ring.as_ref() {
        // SAFETY: dup(2) of the ring's eventfd; the copy is owned by the BufferedFile.
        let fd = unsafe { libc::dup(r.eventfd()) };
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { <glommio::io::BufferedFile as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let wake = ring_wake.clone();
        // Ends with the executor, when the loop returns.
        glommio::spawn_local(async move {
            loop {
                if file.read_at(0, 8).await.is_err() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                wake.notify();
            }
        })
        .detach();
    }
    let mut harvest_timer: Option<std::pin::Pin<Box<glommio::timer::Timer>>> = None;
    loop {
        let due = next_deadline(&shard, &clocks);
        let now = mono_ms();
        if timer.as_ref().map(|t| t.0) != due {
            timer = due.map(|d| {
                (d, Box::pin(glommio::timer::Timer::new(Duration::from_millis(d.saturating_sub(now)))))
            });
        }
        match clocks.ring_harvest {
            // Busy: take completions on the harvest window, not on every wake-up.
            Some(at) if harvest_timer.is_none() => {
                let wait = at.saturating_duration_since(Instant::now());
                harvest_timer = Some(Box::pin(glommio::timer::Timer::new(wait)));
            }
            Some(_) => {}
            None => harvest_timer = None,
        }
        let mut ring_ready = false;
        // Targets of a large push still waiting: their next slice is this turn's work.
        let slices_waiting = shard.fanouts.pending();
        futures_lite::future::poll_fn(|cx| {
            let mut ready = slices_waiting || events.poll_ready(cx).is_ready();
            inbox.waker.register(cx.waker());
            ready |= !inbox.rx.is_empty() || inbox.shutdown.load(Acquire);
            if let Some((_, t)) = timer.as_mut() {
                ready |= std::future::Future::poll(t.as_mut(), cx).is_ready();
            }
            ring_ready |= ring_wake.poll_take(cx).is_ready();
            if let Some(t) = harvest_timer.as_mut() {
                ring_ready |= std::future::Future::poll(t.as_mut(), cx).is_ready();
            }
            if ready || ring_ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let now = mono_ms();
        if timer.as_ref().is_some_and(|t| t.0 <= now) {
            timer = None;
        }
        if ring_ready {
            harvest_timer = None;
        }
        if shard.ring.is_some() && (ring_ready || clocks.ring_harvest.is_none()) {
            // Harvest. The shard is busy, and takes the next completions on the window instead of
            // being woken for each, when this harvest found two or more, or found one within two
            // windows of the last harvest that found any (many connections each sending rarely:
            // one completion per wake-up, but wake-ups close together). A harvest that finds
            // nothing, or one lone completion after a quiet spell, goes back to waiting to be
            // woken: an idle shard takes no timer.
            let mut n = ring_turn(&mut shard, now);
            let window = Duration::from_micros(shard.cfg.app.ring_window_us as u64);
            let at = Instant::now();
            let recent = clocks.ring_last_data.is_some_and(|t| at.duration_since(t) < window * 2);
            if n > 0 {
                clocks.ring_last_data = Some(at);
            }
            let mut busy = !window.is_zero() && (n >= 2 || (n == 1 && recent));
            if let Some(ring) = shard.ring.as_mut() {
                if busy != clocks.ring_busy {
                    ring.set_eventfd(!busy);
                }
            }
            if !busy && clocks.ring_busy {
                // Back from the window to the eventfd: what completed while it was off would
                // signal nothing, so take it now.
                n = ring_turn(&mut shard, now);
                if n > 0 {
                    busy = true;
                    if let Some(ring) = shard.ring.as_mut() {
                        ring.set_eventfd(false);
                    }
                }
            }
            clocks.ring_busy = busy;
            clocks.ring_harvest = busy.then(|| at + window);
        }
        events.drain_into(&mut batch);
        for e in batch.drain(..) {
            on_event(&mut shard, e, now);
        }
        if batch.capacity() > crate::io::KEEP_EVENTS {
            batch.shrink_to(crate::io::KEEP_EVENTS);
        }
        if inbox.shutdown.load(Acquire) && !shard.shutting_down {
            begin_shutdown(&mut shard, &stop, &mut clocks, now);
        }
        for _ in 0..MAX_BATCHES_PER_TURN {
            let Ok(b) = inbox.rx.try_recv() else { break };
            shard.metrics().mesh_hop_us.observe_us(b.sent.elapsed().as_micros() as u64);
            on_msgs(&mut shard, b.msgs, now);
        }
        crate::sidecar::fanout::turn(&mut shard, now);
        on_time(&mut shard, &mut clocks, now);
        flush(&mut shard, now);
        if let Some(ring) = shard.ring.as_mut() {
            // Every send and re-arm of the turn in one system call.
            if let Err(e) = ring.submit() {
                tracing::error!(shard = shard.id, error = %e, "app ring: submit failed");
            }
        }
        if clocks.shutdown == Shutdown::Done {
            tracing::info!(shard = shard.id, left = shard.conns.len(), "shard drained");
            return;
        }
        // Let the connection tasks run before the next turn, however busy the loop is.
        futures_lite::future::yield_now().await;
    }
}

/// The earliest of the loop's deadlines (monotonic ms).
fn next_deadline(shard: &Shard, clocks: &Clocks) -> Option<u64> {
    let shutdown_tick = match clocks.shutdown {
        Shutdown::Running | Shutdown::Done => None,
        _ => Some(mono_ms() + 10),
    };
    // Closing ring connections are looked at every 50 ms until they end.
    let ring_close_tick = (!shard.ring_closing.is_empty()).then(|| mono_ms() + 50);
    [
        shard.logic.next_deadline_ms(),
        ring_close_tick,
        shard.ring_arms.iter().map(|(t, _)| *t).min(),
        shard.next_sweep(),
        clocks.next_read_tick,
        shard.delivery.next_deadline(),
        shard.cluster_shard.as_ref().and_then(|c| c.next_deadline()),
        shard.relay.next_deadline(),
        shard.ends.next_deadline(),
        shard.geos.next_deadline(),
        shard.outbox_retry_ms,
        shutdown_tick,
    ]
    .into_iter()
    .flatten()
    .min()
}

// ------------------------------------------------------------------------------------------------
// Events from the I/O tasks
// ------------------------------------------------------------------------------------------------

fn on_event(shard: &mut Shard, e: Event, now: u64) {
    match e {
        Event::Opened { port: Port::App, fd, ctl } => admit_app(shard, fd, Some(ctl), now),
        Event::Opened { port: Port::Sidecar, fd, ctl } => {
            if shard.conns.len() - shard.app_conns() >= MAX_SIDECAR_CONNS_PER_SHARD || shard.shutting_down {
                tracing::warn!(
                    shard = shard.id,
                    "sidecar connection refused: limit reached or shutting down"
                );
                ctl.refuse(Vec::new());
                return;
            }
            let me = shard.add_conn(fd, Port::Sidecar, ConnIo::Task(ctl.clone()), now);
            ctl.admit(me, Duration::ZERO);
        }
        Event::Data { conn, len, buf } => {
            let len = len as usize;
            let Some(c) = shard.conn(conn) else { return };
            let (port, gap) = (c.port, now.saturating_sub(c.last_read_ms));
            c.last_read_ms = now;
            // The task read these bytes and reads on: the loop must not read its socket too
            // (the bytes would arrive out of order). When the inline buffer fills, the task's
            // next read takes the rest.
            if on_read(shard, conn, &buf[..len], false, now) == Read::Closed {
                shard.close(conn, CloseReason::PeerGone);
                return;
            }
            if port == Port::App && gap < BUSY_GAP_MS {
                enter_busy(shard, conn, gap);
            }
        }
        Event::Bulk { conn, bytes } => {
            if on_read(shard, conn, &bytes, false, now) == Read::Closed {
                shard.close(conn, CloseReason::PeerGone);
            }
        }
        Event::Written { conn, ok } => shard.written(conn, ok),
        Event::Closed { conn } => closed(shard, conn, now),
    }
}

/// Admission of an app connection: shutdown, the per-shard limit, and the accept-rate token
/// bucket whose overflow waits in a bounded queue.
fn admit_app(shard: &mut Shard, fd: std::os::fd::RawFd, ctl: Option<Rc<crate::io::ConnCtl>>, now: u64) {
    shard.metrics().accepted.fetch_add(1, Relaxed);
    let refusal = if shard.shutting_down {
        Some((Refusal::Shutdown, "gate shutting down"))
    } else if shard.app_conns() >= shard.cfg.app.max_conns_per_shard as usize {
        Some((Refusal::ConnLimit, "connection limit reached on this shard"))
    } else {
        None
    };
    let wait = match refusal {
        Some(_) => None,
        None => take_accept_token(shard),
    };
    match (refusal, wait) {
        (None, Some(wait)) => match ctl {
            Some(ctl) => {
                let me = shard.add_conn(fd, Port::App, ConnIo::Task(ctl.clone()), now);
                ctl.admit(me, wait);
            }
            None => {
                let me = shard.add_conn(fd, Port::App, ConnIo::Ring(RingConn::default()), now);
                if wait.is_zero() {
                    if let Some(ring) = shard.ring.as_mut() {
                        ring.arm_recv(fd, ring_token(me));
                    }
                } else {
                    shard.ring_arms.push((now + wait.as_millis() as u64, me));
                }
            }
        },
        (refusal, _) => {
            let (why, message) = refusal.unwrap_or((Refusal::AcceptRate, "accept rate limit: queue full"));
            let m = shard.metrics();
            m.refused.add(why as usize, 1);
            let code = if matches!(why, Refusal::Shutdown) {
                wire::ErrorCode::ShuttingDown
            } else {
                wire::ErrorCode::Overloaded
            };
            m.errors.add(code.0 as usize, 1);
            let retry = jitter(shard.cfg.app.retry_after_ms);
            let log_id = shard.new_log_id();
            tracing::warn!(log_id, shard = shard.id, reason = ?why, retry_after_ms = retry, "connection refused");
            let mut frame = Vec::new();
            if shard.cfg.app.plaintext {
                shard.enc.error(&mut frame, 0, log_id, code, wire::Hop::Gate, 0, message, retry);
            } else {
                // No channel yet: the refusal is a Reject record (PROTOCOL.md §14).
                let why = format!("{message}; retry after {retry} ms");
                channel::handshake::write_reject(&mut frame, channel::RejectReason::Overloaded, &why);
            }
            match ctl {
                Some(ctl) => ctl.refuse(frame),
                None => {
                    // Best effort: a fresh socket's send buffer takes a small frame, and the peer
                    // has sent nothing to drain, so closing now sends FIN, not RST.
                    let _ = net::send(fd, &frame);
                    // SAFETY: the accepted socket is ours and nothing else refers to it.
                    unsafe { libc::close(fd) };
                }
            }
        }
    }
}

/// Token bucket: one token per accept, refilled at the configured rate, holding at most one
/// second's worth. Tokens may go negative down to `-accept_queue`: those accepts wait their turn.
fn take_accept_token(shard: &mut Shard) -> Option<Duration> {
    let rate = shard.cfg.app.accept_rate_per_shard as f64;
    let now = Instant::now();
    let elapsed = now.duration_since(shard.accept_refill).as_secs_f64();
    shard.accept_refill = now;
    let tokens = (shard.accept_tokens + elapsed * rate).min(rate);
    if tokens - 1.0 < -(shard.cfg.app.accept_queue as f64) {
        shard.accept_tokens = tokens;
        return None;
    }
    let tokens = tokens - 1.0;
    shard.accept_tokens = tokens;
    Some(if tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-tokens / rate) })
}

/// A connection's task ended: forget it, and tell its logic shard or the app-server side.
fn closed(shard: &mut Shard, c: ConnRef, now: u64) {
    let Some(conn) = shard.take_conn(c) else { return };
    match conn.port {
        Port::Sidecar => crate::sidecar::closed(shard, c, &conn, now),
        Port::App => {
            if let Some(uid) = conn.life.uid() {
                let reason = match conn.life.closing {
                    Some(CloseReason::GoAway(GoAwayReason::SlowConsumer)) => logic::CloseReason::SlowConsumer,
                    Some(CloseReason::GoAway(GoAwayReason::Shutdown)) if !shard.drain_to.is_empty() => {
                        logic::CloseReason::Moving
                    }
                    Some(CloseReason::GoAway(GoAwayReason::Shutdown)) => logic::CloseReason::Shutdown,
                    _ => logic::CloseReason::Dropped,
                };
                shard.to_logic(uid, logic::Input::Closed { uid, conn: c, reason });
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The app ring
// ------------------------------------------------------------------------------------------------

/// Takes the app ring's completions; returns how many there were.
fn ring_turn(shard: &mut Shard, now: u64) -> usize {
    let Some(mut ring) = shard.ring.take() else { return 0 };
    let mut done = Vec::new();
    let n = ring.drain(MAX_COMPLETIONS_PER_TURN, |c| match c {
        Completion::Accepted { fd } => done.push(RingDone::Accepted(fd)),
        Completion::AcceptFailed { res } => {
            tracing::warn!(shard = shard.id, error = %std::io::Error::from_raw_os_error(-res), "accept failed");
        }
        // The bytes are decoded here, inside the callback, straight from the kernel's buffer.
        Completion::Data { token, bytes } => {
            let conn = token_conn(shard.id, token);
            let _ = on_read(shard, conn, bytes, false, now);
        }
        Completion::RecvEnded { token, res } => done.push(RingDone::RecvEnded(token_conn(shard.id, token), res)),
        Completion::Sent { token, res, buf } => shard.ring_sent(token_conn(shard.id, token), res, buf),
    });
    shard.ring = Some(ring);
    for d in done {
        match d {
            RingDone::Accepted(fd) => {
                set_nodelay(fd);
                admit_app(shard, fd, None, now);
            }
            RingDone::RecvEnded(c, res) if res == -libc::ENOBUFS => {
                // The buffer ring ran dry (or the kernel ended the receive after data): the
                // buffers were handed back as they were read, so re-arm; nothing was lost.
                shard.metrics().ring_rearms.fetch_add(1, Relaxed);
                if let Some(fd) = shard.conn(c).map(|conn| conn.fd) {
                    if let Some(ring) = shard.ring.as_mut() {
                        ring.arm_recv(fd, ring_token(c));
                    }
                }
            }
            // The peer closed, reset, or the receive was cancelled for a close: the connection
            // ends here (nothing more can arrive for its token).
            RingDone::RecvEnded(c, _) => ring_closed(shard, c, now),
        }
    }
    n
}

/// What a ring completion leaves for after the drain.
enum RingDone {
    Accepted(std::os::fd::RawFd),
    RecvEnded(ConnRef, i32),
}

fn token_conn(shard: u16, token: u64) -> ConnRef {
    ConnRef { shard, slot: (token >> 32) as u32, gen: token as u32 }
}

fn set_nodelay(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on an accepted socket with a valid pointer to an int of its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// A ring connection ended: forget it, close its socket, tell its logic shard.
fn ring_closed(shard: &mut Shard, c: ConnRef, now: u64) {
    let Some(fd) = shard.conn(c).map(|conn| conn.fd) else { return };
    if let Some(conn) = shard.conn(c) {
        conn.life.close(CloseReason::PeerGone);
    }
    closed(shard, c, now);
    // SAFETY: the connection's socket; its receive has ended, and a send still in flight holds
    // its own reference to the file in the kernel.
    unsafe { libc::close(fd) };
}

/// Ring connections that are closing: cut the last writes after `CLOSE_WRITE_TIMEOUT_MS`, and
/// end the receive `CLOSE_DRAIN_MS` after the write side was shut.
fn ring_closing(shard: &mut Shard, now: u64) {
    let mut cancel = Vec::new();
    let closing = std::mem::take(&mut shard.ring_closing);
    let mut keep = Vec::with_capacity(closing.len());
    for c in closing {
        let Some(conn) = shard.conn(c) else { continue };
        let fd = conn.fd;
        let ConnIo::Ring(r) = &mut conn.io else { continue };
        if r.cancelled {
            continue;
        }
        let drained = r.shut_at.is_some_and(|t| now.saturating_sub(t) >= CLOSE_DRAIN_MS);
        let stuck = r.close_started.is_some_and(|t| now.saturating_sub(t) >= CLOSE_WRITE_TIMEOUT_MS);
        if drained || stuck {
            if stuck {
                // SAFETY: shutdown(2) on the connection's own socket: a send stuck on a peer that
                // reads nothing fails and hands its buffer back.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            r.cancelled = true;
            cancel.push(ring_token(c));
        } else {
            keep.push(c);
        }
    }
    keep.append(&mut shard.ring_closing);
    shard.ring_closing = keep;
    if let Some(ring) = shard.ring.as_mut() {
        for t in cancel {
            ring.cancel_recv(t);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Reading and decoding
// ------------------------------------------------------------------------------------------------

/// What a read found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// Bytes came and were handled.
    Data,
    /// The socket had nothing.
    Empty,
    /// The peer closed.
    Closed,
}

/// Handles bytes that arrived (`first`, then, with `maybe_more`, what else the socket holds).
fn on_read(shard: &mut Shard, me: ConnRef, first: &[u8], maybe_more: bool, now: u64) -> Read {
    let Some(c) = shard.conn(me) else { return Read::Closed };
    if c.life.closing.is_some() {
        // Closing: whatever else arrives is not decoded (its answers could not be sent anyway,
        // and after a stream error its framing is lost).
        return Read::Data;
    }
    if c.secure.is_some() {
        return on_secure_read(shard, me, first, maybe_more, now);
    }
    on_frames(shard, me, first, maybe_more, now)
}

/// Bytes from an app on the secure channel: records first (`app::secure`), then the frames they
/// carried, exactly as a plaintext connection's.
fn on_secure_read(shard: &mut Shard, me: ConnRef, first: &[u8], maybe_more: bool, now: u64) -> Read {
    let Some(fd) = shard.conn(me).map(|c| c.fd) else { return Read::Closed };
    // The ring hands one completion's bytes (`first`, used as they are); a task's read may find
    // more in the socket, gathered first.
    let mut gathered = Vec::new();
    let mut eof = false;
    let raw: &[u8] = if maybe_more {
        gathered.extend_from_slice(first);
        eof = drain_socket(fd, &mut gathered, |buf| {
            buf.reserve(16 * 1024);
            true
        });
        &gathered
    } else {
        first
    };
    if raw.is_empty() {
        return if eof { Read::Closed } else { Read::Empty };
    }
    // Frame bytes go to a buffer the shard keeps, so a record costs no allocation.
    let mut plain = std::mem::take(&mut shard.plain);
    plain.clear();
    if crate::app::secure::on_bytes(shard, me, raw, &mut plain) {
        // The frame path counts the frame bytes; the records' headers and tags are counted here.
        shard.metrics().bytes_in.fetch_add(raw.len().saturating_sub(plain.len()) as u64, Relaxed);
        if !plain.is_empty() {
            on_frames(shard, me, &plain, false, now);
        }
    }
    if plain.capacity() <= SCRATCH_BYTES {
        shard.plain = plain;
    }
    if shard.conn(me).is_none_or(|c| c.life.closing.is_some()) {
        // The channel failed (or a frame closed the connection).
        return Read::Data;
    }
    // Bytes came: the idle clock restarts, and a record (or frame) left half-read runs the read
    // timeout.
    let half_read = shard.conn(me).is_some_and(|c| {
        let half = !c.partial.is_empty() || c.secure.as_ref().is_some_and(|s| s.partial());
        c.life.on_input(now, half);
        half
    });
    if half_read {
        shard.watch(me);
    }
    if eof {
        Read::Closed
    } else {
        Read::Data
    }
}

/// Frame bytes that arrived (`first`, then, with `maybe_more`, what else the socket holds).
fn on_frames(shard: &mut Shard, me: ConnRef, first: &[u8], maybe_more: bool, now: u64) -> Read {
    let Some(c) = shard.conn(me) else { return Read::Closed };
    if c.life.closing.is_some() {
        return Read::Data;
    }
    let (fd, port, mut own) = (c.fd, c.port, std::mem::take(&mut c.partial));
    let max_body = match port {
        Port::App => shard.cfg.app.max_body,
        Port::Sidecar => shard.cfg.sidecar.max_body,
    };
    let (eof, got, rest) = if own.is_empty() {
        // The common case: decode from the shard's scratch; keep only an incomplete tail.
        let mut scratch = std::mem::take(&mut shard.scratch);
        scratch.clear();
        let (eof, used) =
            read_and_decode(shard, me, port, fd, &mut scratch, first, maybe_more, max_body, false);
        let got = !scratch.is_empty();
        let rest = scratch[used..].to_vec();
        shard.scratch = scratch;
        (eof, got, rest)
    } else {
        // A frame is half-read: it grows in its own buffer, so a large sidecar frame arriving in
        // many reads is not copied again on each one.
        let before = own.len();
        let (eof, used) = read_and_decode(shard, me, port, fd, &mut own, first, maybe_more, max_body, true);
        let got = own.len() > before;
        own.drain(..used);
        (eof, got, own)
    };
    let mut half_read = false;
    if let Some(c) = shard.conn(me) {
        if got {
            half_read = !rest.is_empty();
            c.life.on_input(now, half_read);
        }
        c.partial = rest;
    }
    if half_read {
        // The read timeout may now come before the deadline it is filed under.
        shard.watch(me);
    }
    match (eof, got) {
        (true, _) => Read::Closed,
        (false, true) => Read::Data,
        (false, false) => Read::Empty,
    }
}

/// Reads what else the socket holds into `buf`, at most `MAX_DRAIN_READS` reads; `room` makes
/// space before each one, or says to stop. Returns true when the peer closed (or the socket
/// failed).
fn drain_socket(
    fd: std::os::fd::RawFd,
    buf: &mut Vec<u8>,
    mut room: impl FnMut(&mut Vec<u8>) -> bool,
) -> bool {
    for _ in 0..MAX_DRAIN_READS {
        if !room(buf) {
            return false;
        }
        let spare = buf.capacity() - buf.len();
        match net::recv_into(fd, buf) {
            // A read that did not fill the room took everything queued: another would find the
            // socket empty, a wasted syscall.
            Ok(Io::Done(n)) if n < spare => return false,
            Ok(Io::Done(_)) => {}
            Ok(Io::WouldBlock) => return false,
            Ok(Io::Eof) | Err(_) => return true,
        }
    }
    false
}

/// Appends `first` and what else the socket holds (bounded) to `buf`, then hands every whole
/// frame in it to its flow. Returns (peer closed, bytes consumed).
#[allow(clippy::too_many_arguments)]
fn read_and_decode(
    shard: &mut Shard,
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
    let eof = maybe_more
        && drain_socket(fd, buf, |buf| {
            if buf.capacity() - buf.len() >= 4096 {
                return true;
            }
            if grow {
                // Room for the rest of the frame being read (bounded by the frame limit).
                let need = buf.first_chunk::<HEADER_LEN>().map_or(64 * 1024, |h| {
                    schema::Header::read(h).frame_len().min(HEADER_LEN + max_body as usize)
                });
                buf.reserve(need.saturating_sub(buf.len()).max(64 * 1024));
            }
            grow
        });
    shard.metrics().bytes_in.fetch_add((buf.len() - before) as u64, Relaxed);
    // The frames below were reaped by now: a Push's and a PushAck's clock starts here.
    shard.read_us = crate::state::mono_us();

    let mut frames = Frames::new(buf, Limits { max_body });
    for item in frames.by_ref() {
        match item {
            Ok(Decoded::Frame(mut f)) => {
                // A flow started with log-id 0 gets a gate-assigned one at its first hop (§7),
                // carried by every answer and log line from here on.
                f.header.log_id = shard.log_id_or_new(f.header.log_id);
                match port {
                    Port::App => crate::app::session::on_frame(shard, me, &f),
                    Port::Sidecar => crate::sidecar::on_frame(shard, me, &f),
                }
            }
            Ok(Decoded::Rejected { mut header, error }) => {
                header.log_id = shard.log_id_or_new(header.log_id);
                crate::app::session::on_rejected(shard, me, &header, &error)
            }
            Err(e) => {
                crate::app::session::on_stream_error(shard, me, &e);
                return (eof, frames.consumed());
            }
        }
        if shard.conn(me).is_none_or(|c| c.life.closing.is_some()) {
            break;
        }
    }
    (eof, frames.consumed())
}

/// A connection whose frames come closer together than `BUSY_GAP_MS` is read by the loop on
/// its tick instead of through a readiness poll per segment.
fn enter_busy(shard: &mut Shard, me: ConnRef, gap: u64) {
    let Some(c) = shard.conn(me) else { return };
    let ticks_per_read = ((gap / READ_TICK_MS) as u32).clamp(1, MAX_TICKS_PER_READ);
    match &mut c.busy {
        Some(b) => {
            b.left = BUSY_TICKS;
            b.ticks_per_read = ticks_per_read;
        }
        None => {
            // Ring connections are never read by a task: the ring's harvest window batches them.
            let Some(ctl) = c.ctl() else { return };
            ctl.send(Command::Park);
            c.busy = Some(Busy { left: BUSY_TICKS, ticks_per_read, waited: 0 });
            shard.busy.push(me.slot as usize);
        }
    }
}

/// The read tick: every busy connection whose turn it is gets one direct read; one that found
/// nothing `BUSY_TICKS` times goes back to readiness reads.
fn read_tick(shard: &mut Shard, now: u64) {
    let busy = std::mem::take(&mut shard.busy);
    let mut keep = Vec::with_capacity(busy.len());
    for slot in busy {
        let Some(c) = shard.conns.get_mut(slot) else { continue };
        let me = ConnRef { shard: shard.id, slot: slot as u32, gen: c.gen };
        let Some(b) = c.busy.as_mut() else { continue };
        if c.life.closing.is_some() {
            continue;
        }
        b.waited += 1;
        if b.waited < b.ticks_per_read {
            keep.push(slot);
            continue;
        }
        b.waited = 0;
        match on_read(shard, me, &[], true, now) {
            Read::Closed => shard.close(me, CloseReason::PeerGone),
            Read::Data => {
                if let Some(b) = shard.conn(me).and_then(|c| c.busy.as_mut()) {
                    b.left = BUSY_TICKS;
                }
                keep.push(slot);
            }
            Read::Empty => {
                let Some(c) = shard.conn(me) else { continue };
                let Some(b) = c.busy.as_mut() else { continue };
                b.left -= 1;
                if b.left == 0 {
                    c.busy = None;
                    if let Some(ctl) = c.ctl() {
                        ctl.send(Command::Unpark);
                    }
                } else {
                    keep.push(slot);
                }
            }
        }
    }
    // Connections that turned busy during the tick were pushed meanwhile.
    keep.append(&mut shard.busy);
    shard.busy = keep;
}

// ------------------------------------------------------------------------------------------------
// Messages, logic outputs, deadlines
// ------------------------------------------------------------------------------------------------

/// Handles one batch from the mesh (or from this shard itself).
fn on_msgs(shard: &mut Shard, msgs: Vec<Msg>, now: u64) {
    for msg in msgs {
        match msg {
            Msg::Logic(input) => logic_input(shard, input, now),
            // A push's targets here: delivered in bounded slices (`sidecar::fanout`), each
            // settling its share of the room reserved for them.
            Msg::Reserved(logic::Input::Push { push, uids }, reserved) => {
                crate::sidecar::fanout::push(shard, push, uids, reserved, now)
            }
            Msg::Reserved(logic::Input::Broadcast { push, role, tally }, reserved) => {
                crate::sidecar::fanout::broadcast(shard, push, role, tally, reserved, now)
            }
            Msg::Reserved(input, reserved) => {
                logic_input(shard, input, now);
                shard.publish_in_flight(reserved);
            }
            Msg::Conn(output) => apply(shard, output, now),
            Msg::AppServer(m) => crate::sidecar::on_mesh(shard, m, now),
            Msg::Cluster(note) => crate::cluster::on_note(shard, note, now),
        }
    }
}

/// Feeds one input to this executor's logic shard and carries out what it decides.
pub(crate) fn logic_input(shard: &mut Shard, input: logic::Input, now: u64) {
    let mut out = Vec::new();
    shard.logic.handle(input, now, &mut out);
    for o in out {
        apply(shard, o, now);
    }
}

/// Carries out one logic output: the one place they are matched. An output for a connection on
/// another gate shard goes there first.
pub(crate) fn apply(shard: &mut Shard, o: Output, now: u64) {
    if let Some(dest) = o.gate_shard() {
        if dest != shard.id {
            shard.to_shard(dest as usize, Msg::Conn(o));
            return;
        }
    }
    use crate::app::{push, session, upstream};
    match o {
        Output::LoginOk { conn, uid, role, epoch, log_id, seq } => {
            session::login_ok(shard, conn, uid, role, epoch, log_id, seq)
        }
        Output::ResumeOk { conn, uid, role, epoch, resumes, log_id, seq, moved } => {
            session::resume_ok(shard, conn, uid, role, epoch, resumes, log_id, seq, moved)
        }
        Output::ResumeRefused { conn, log_id, seq, why } => {
            session::resume_refused(shard, conn, log_id, seq, why)
        }
        Output::ResumeSecret { conn, secret } => crate::app::secure::on_resume_secret(shard, conn, secret),
        Output::Displaced { conn, uid, log_id } => session::displaced(shard, conn, uid, log_id),
        Output::LogoutOk { conn, log_id, seq } => session::logout_ok(shard, conn, log_id, seq),
        Output::Deliver { conn, seq, push, redelivery } => push::deliver(shard, conn, seq, &push, redelivery),
        Output::Reply { conn, cmd, seq, log_id, reply } => {
            upstream::reply(shard, conn, cmd, seq, log_id, &reply)
        }
        Output::RequestFailed { conn, cmd, seq, log_id, failure, message } => {
            upstream::failed(shard, conn, cmd, seq, log_id, failure, &message)
        }
        Output::BroadcastCounted { tally, targets } => {
            crate::sidecar::push::on_counted(shard, tally, targets)
        }
        Output::Receipt(r) => crate::cluster::receipt(shard, r, now),
        Output::AckMismatch { conn, seq, log_id, message_id } => {
            push::ack_mismatch(shard, conn, seq, log_id, message_id)
        }
        Output::Upstream { request_id, uid, role, cmd, body, log_id } => {
            let u = crate::delivery::UpstreamOut { request_id, uid, role, cmd, body, log_id };
            crate::cluster::relay::upstream(shard, u, now)
        }
        Output::GpsBatch(points) => {
            crate::app::gps::remember(shard, &points);
            crate::cluster::relay::gps(shard, &points);
        }
        Output::Unreachable { uid, outcome } => {
            tracing::info!(uid, outcome, "session ended without logout: unreachable");
            crate::cluster::relay::unreachable(shard, uid, outcome);
        }
        Output::Claim { uid, epoch } => crate::cluster::claim(shard, uid, epoch),
        Output::Release { uid, epoch } => crate::cluster::release(shard, uid, epoch),
        Output::Elsewhere { push, uids } => crate::cluster::elsewhere(shard, push, uids, now),
        Output::Missing { uid, epoch, retry } => {
            crate::cluster::handoff::missing(shard, uid, epoch, *retry, now)
        }
        Output::HandedOver { uid, to, session } => {
            crate::cluster::handoff::handed_over(shard, uid, to, *session, now)
        }
        Output::NotHere { uid, epoch, to } => crate::cluster::handoff::not_here(shard, uid, epoch, to),
        Output::Ended { conn, uid, log_id, message } => {
            crate::sidecar::end::ended(shard, conn, uid, log_id, &message)
        }
        Output::EndAnswered { tag, uid, found } => crate::sidecar::end::answered(shard, tag, uid, found, now),
        Output::GeoAnswered { tag, hits } => crate::sidecar::geo::answered(shard, tag, hits),
    }
}

/// Runs what is due: the logic shard's deadlines, the timeout sweep, the busy read tick and
/// shutdown's steps.
fn on_time(shard: &mut Shard, clocks: &mut Clocks, now: u64) {
    if shard.logic.next_deadline_ms().is_some_and(|d| d <= now) {
        let mut out = Vec::new();
        shard.logic.tick(now, &mut out);
        for o in out {
            apply(shard, o, now);
        }
    }
    if shard.next_sweep().is_some_and(|t| t <= now) {
        sweep(shard, now);
    }
    if shard.cluster_shard.as_ref().and_then(|c| c.next_deadline()).is_some_and(|t| t <= now) {
        crate::cluster::expire(shard, now);
    }
    if shard.relay.next_deadline().is_some_and(|t| t <= now) {
        crate::cluster::relay::expire(shard, now);
    }
    if shard.ends.next_deadline().is_some_and(|t| t <= now) {
        crate::sidecar::end::expire(shard, now);
    }
    if shard.geos.next_deadline().is_some_and(|t| t <= now) {
        crate::sidecar::geo::expire(shard, now);
    }
    clocks.next_read_tick = match clocks.next_read_tick {
        _ if shard.busy.is_empty() => None,
        Some(t) if t <= now => {
            read_tick(shard, now);
            Some(now + READ_TICK_MS)
        }
        Some(t) => Some(t),
        None => Some(now + READ_TICK_MS),
    };
    if !shard.ring_arms.is_empty() {
        let (due, later): (Vec<_>, Vec<_>) = shard.ring_arms.drain(..).partition(|(t, _)| *t <= now);
        shard.ring_arms = later;
        for (_, c) in due {
            let fd = shard.conns.get(c.slot as usize).filter(|x| x.gen == c.gen).map(|x| x.fd);
            if let (Some(fd), Some(ring)) = (fd, shard.ring.as_mut()) {
                ring.arm_recv(fd, ring_token(c));
            }
        }
    }
    if !shard.ring_closing.is_empty() {
        ring_closing(shard, now);
    }
    shutdown_step(shard, clocks, now);
}

/// Closes connections past their login, read, write-stall or idle timeout.
fn sweep(shard: &mut Shard, now: u64) {
    let (app_t, side_t) = (shard.timeouts(Port::App), shard.timeouts(Port::Sidecar));
    let mut expired = Vec::new();
    for r in shard.sweep_due(now) {
        let Some(c) = shard.conn(r) else { continue };
        let t = if c.port == Port::App { &app_t } else { &side_t };
        match c.life.expired(now, t) {
            Some(e) => expired.push((r, e)),
            // Its deadline moved later meanwhile (it read, or logged in): filed again there.
            None => shard.watch(r),
        }
    }
    for (r, e) in expired {
        match e {
            Expiry::Login => {
                let log_id = shard.new_log_id();
                let (code, hop) = (wire::ErrorCode::NotLoggedIn, wire::Hop::App);
                shard.send_error(r, 0, log_id, code, hop, 0, "no login within the login timeout", 0);
                shard.close(r, CloseReason::LoginTimeout);
            }
            Expiry::Read => shard.go_away(
                r,
                0,
                GoAwayReason::ReadTimeout,
                "frame not completed within the read timeout",
                0,
            ),
            // Pushes wait and the peer takes nothing: a slow consumer, whatever its queue.
            Expiry::WriteStall => shard.close(r, CloseReason::GoAway(GoAwayReason::SlowConsumer)),
            Expiry::Idle => {
                shard.go_away(r, 0, GoAwayReason::IdleTimeout, "nothing heard within the idle timeout", 0)
            }
        }
    }
}

/// Sends everything this turn produced: what the shard sent itself (handled in place), the
/// app-server side, mesh batches to other shards, and every dirty connection's bytes.
fn flush(shard: &mut Shard, now: u64) {
    for _ in 0..OWN_ROUNDS {
        let own = shard.take_own();
        if !own.is_empty() {
            on_msgs(shard, own, now);
        }
        crate::sidecar::flush(shard, now);
    }
    crate::cluster::flush(shard, now);
    shard.send_outbox();
    shard.flush_writes();
    // Pairs that ended (or came from other nodes) this turn show in the room the sidecars see.
    shard.publish_in_flight(0);
    shard.refresh_logic_gauges();
}

// ------------------------------------------------------------------------------------------------
// Shutdown
// ------------------------------------------------------------------------------------------------

/// Begins graceful shutdown on this shard: stop accepting, tell every app to go away.
fn begin_shutdown(shard: &mut Shard, stop: &Stop, clocks: &mut Clocks, now: u64) {
    shard.shutting_down = true;
    stop.fire();
    tracing::info!(shard = shard.id, "shutting down: go-away to every connection");
    let apps: Vec<ConnRef> = shard
        .conns
        .iter()
        .filter(|(_, c)| c.port == Port::App)
        .map(|(slot, c)| ConnRef { shard: shard.id, slot: slot as u32, gen: c.gen })
        .collect();
    let base = shard.cfg.app.retry_after_ms;
    shard.drain_to = crate::cluster::handoff::drain_targets(shard);
    for c in apps {
        // Draining in cluster mode: each app is told which node to resume on; its session is
        // held and handed over there once the connections are gone.
        let to = shard.conn(c).and_then(|conn| conn.life.uid()).and_then(|uid| {
            let n = shard.drain_to.len();
            (n > 0).then(|| shard.drain_to[(uid % n as u64) as usize].1.clone())
        });
        match to {
            Some(to) => shard.go_away_to(
                c,
                0,
                GoAwayReason::Shutdown,
                "node draining: resume on the node named",
                &to,
                jitter(base),
            ),
            None => shard.go_away(c, 0, GoAwayReason::Shutdown, "gate shutting down", jitter(base)),
        }
    }
    let mut out = Vec::new();
    shard.logic.flush_gps(&mut out);
    for o in out {
        apply(shard, o, now);
    }
    shard.began.fetch_add(1, AcqRel);
    clocks.shutdown = Shutdown::WaitApps { until: now + DRAIN_TIMEOUT_MS };
}

/// Shutdown, after go-away went to every app: (1) wait (bounded) for app connections to close,
/// which ends their pushes with `shutdown` receipts; (2) end whatever is still in flight on this
/// logic shard; (3) wait until every shard did so and this shard's app-server connections have
/// acked every receipt batch (bounded); (4) close the app-server connections and wait for them.
fn shutdown_step(shard: &mut Shard, clocks: &mut Clocks, now: u64) {
    match clocks.shutdown {
        Shutdown::Running | Shutdown::Done => {}
        Shutdown::WaitApps { until } => {
            // A drain waits for every shard's go-aways too: this shard's sessions may be held by
            // connections on other shards, which must hear "resume elsewhere" before the session
            // leaves (else they would hear "displaced").
            let all_began = shard.drain_to.is_empty() || shard.began.load(Acquire) >= shard.mesh.len();
            if (shard.app_conns() == 0 && all_began) || now >= until {
                // Every accepted target is taken first, so each pair moves or ends with the rest.
                crate::sidecar::fanout::finish(shard, now);
                // Draining: this shard's sessions move to the other nodes first; what is left
                // (none, or all when no other node lives) ends below.
                crate::cluster::handoff::drain(shard, now);
                logic_input(shard, logic::Input::Shutdown, now);
                // What the shutdown produced leaves before this shard counts as drained: another
                // shard that sees every shard drained must find these receipts in its inbox.
                flush(shard, now);
                shard.drained.fetch_add(1, AcqRel);
                clocks.shutdown = Shutdown::WaitAcks { until: now + DRAIN_TIMEOUT_MS };
            }
        }
        Shutdown::WaitAcks { until } => {
            let all_drained = shard.drained.load(Acquire) >= shard.mesh.len();
            let unacked =
                shard.delivery.unacked_batches() > 0 || shard.conns.iter().any(|(_, c)| !c.out.is_empty());
            let waiting = (shard.delivery.receipts_waiting() > 0 && shard.sidecars.any())
                || shard.mesh.depth(shard.id as usize) > 0
                || shard.fanouts.pending()
                || crate::cluster::forwards_waiting(shard);
            if (all_drained && !unacked && !waiting) || now >= until {
                let all: Vec<ConnRef> = shard
                    .conns
                    .iter()
                    .map(|(slot, c)| ConnRef { shard: shard.id, slot: slot as u32, gen: c.gen })
                    .collect();
                for c in all {
                    shard.close(c, CloseReason::GoAway(GoAwayReason::Shutdown));
                }
                clocks.shutdown = Shutdown::Closing { until: now + 1_000 };
            }
        }
        Shutdown::Closing { until } => {
            if shard.conns.is_empty() || now >= until {
                clocks.shutdown = Shutdown::Done;
            }
        }
    }
}
