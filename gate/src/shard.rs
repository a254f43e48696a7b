//! One executor's state: its gate shard (connections) and its logic shard, and the tasks that
//! move messages between them and the other executors.
//!
//! Everything here is single-threaded (`Rc`, `RefCell`, `Cell`): a connection lives on the shard
//! that accepted it for its whole life, and other shards reach it only through the mesh. A
//! `RefCell` is never held across an `.await`.

use crate::config::Config;
use crate::mesh::{Batch, Mesh, Msg, MAX_BATCH};
use crate::metrics::ShardMetrics;
use crate::net::{self, Io};
use logic::{CloseReason, ConnRef, Output};
use schema::wire::{self, GoAwayReason};
use schema::{Cmd, Encoder, FrameType};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Size of the shard's drain buffer: bursts from one connection are read into it and decoded in
/// place, so a connection owns no read buffer while idle.
pub const SCRATCH_BYTES: usize = 256 * 1024;
/// Mesh batches handled per wake-up before the processor yields to connections.
const MAX_BATCHES_PER_WAKE: usize = 64;
/// How often idle, login and read timeouts are checked.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Error frames a connection may earn before login before it is closed.
const MAX_PRE_LOGIN_ERRORS: u8 = 8;
/// An app-server connection's out queue holds at most this many of its largest frames.
const SIDECAR_OUT_FRAMES: usize = 8;
/// An empty out queue keeps at most this much capacity: idle connections (the great majority)
/// must own no write buffer, and a busy one reallocates a small buffer at most once per flush.
const OUT_KEEP_CAPACITY: usize = 0;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Accepted; only Login, Resume and Keepalive are allowed.
    AwaitingLogin,
    /// Token verified; waiting for the logic shard to register the session.
    LoggingIn,
    /// Session live.
    LoggedIn,
}

/// Which port a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Drivers and passengers.
    App,
    /// App-servers.
    Sidecar,
}

/// One connection, as the shard sees it (the socket itself is owned by its task).
#[derive(Debug)]
pub struct Conn {
    /// Generation of this slot, part of `ConnRef`.
    pub gen: u32,
    /// The port it came in on.
    pub port: Port,
    /// App-server state, for sidecar connections.
    pub sidecar: Option<Box<crate::sidecar::SidecarState>>,
    /// The socket, for non-blocking drains and writes; valid while the task holds the stream.
    pub fd: RawFd,
    /// Life stage.
    pub state: ConnState,
    /// The user, once the token verified (0 before).
    pub uid: u64,
    /// `wire::Role` value from the token.
    pub role: u8,
    /// Frames waiting to be written, coalesced into one write.
    pub out: Vec<u8>,
    /// Bytes handed to the task's blocking write (counted toward the slow-consumer bound).
    pub out_inflight: usize,
    /// Bytes of an incomplete frame kept between reads (empty and unallocated when idle).
    pub partial: Vec<u8>,
    /// When the current incomplete frame started (ms), for the read timeout; 0 when none.
    pub partial_since_ms: u64,
    /// When the connection was accepted (ms).
    pub accepted_ms: u64,
    /// When anything was last read (ms), for the idle timeout.
    pub last_rx_ms: u64,
    /// Set to close the connection; the task flushes `out` and exits.
    pub close: Option<GoAwayReason>,
    /// The socket could not take all of `out`; the task must wait for writability.
    pub write_blocked: bool,
    /// When writes last stalled (ms), for closing a peer that reads nothing; 0 when flowing.
    pub write_stalled_ms: u64,
    /// Already listed in the shard's dirty list.
    pub dirty: bool,
    /// Error frames sent before login.
    pub pre_login_errors: u8,
    /// When the login frame arrived, for the login latency histogram.
    pub login_started: Option<Instant>,
    /// The connection task's waker, for close and write-blocked events.
    pub waker: Option<Waker>,
}

/// What every executor shares (all `Sync`), handed to each shard at start.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Validated configuration.
    pub cfg: Arc<Config>,
    /// Inboxes of every executor.
    pub mesh: Arc<Mesh>,
    /// Every shard's metrics.
    pub metrics: Arc<Vec<ShardMetrics>>,
    /// Newest forwarded GPS points (for `/debug/gps`).
    pub gps_recent: Arc<Mutex<VecDeque<wire::UidGpsPoint>>>,
    /// Which shards hold app-server connections.
    pub sidecars: Arc<crate::sidecar::Registry>,
    /// Shards that finished draining their logic at shutdown.
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// host:port apps should reconnect to.
    pub node: String,
    /// This process's incarnation: random, non-zero, drawn once at start-up and announced in
    /// every AppServerWelcome, so an app-server can tell a restarted gate from the same one.
    pub incarnation: u64,
}

/// Per-executor state shared by its tasks.
pub struct Shard {
    /// This executor's index: gate shard and logic shard id.
    pub id: u16,
    /// Validated configuration.
    pub cfg: Arc<Config>,
    /// Inboxes of every executor.
    pub mesh: Arc<Mesh>,
    /// Every shard's metrics (this one's at `id`).
    pub all_metrics: Arc<Vec<ShardMetrics>>,
    /// Secret for login tokens.
    pub token_secret: Vec<u8>,
    /// host:port apps should reconnect to.
    pub node: String,
    /// This process's incarnation (see [`Shared::incarnation`]).
    pub incarnation: u64,
    /// Connections on this shard.
    pub conns: RefCell<Slab<Conn>>,
    /// Generation counter for slots.
    next_gen: Cell<u32>,
    /// App connections open (the slab also holds sidecar connections), kept so admission does
    /// not scan the table.
    app_conn_count: Cell<usize>,
    /// The logic shard of this executor.
    pub logic: RefCell<logic::Shard>,
    /// Reused frame encoder.
    pub enc: RefCell<Encoder>,
    /// Drain buffer for reads (see `SCRATCH_BYTES`).
    pub scratch: RefCell<Vec<u8>>,
    /// Messages waiting to be sent to each executor.
    outbox: RefCell<Vec<Vec<Msg>>>,
    /// True while a flush of the outbox is scheduled.
    outbox_scheduled: Cell<bool>,
    /// Connections with bytes in `out` to write.
    dirty: RefCell<Vec<usize>>,
    /// Reused logic output buffer.
    logic_out: RefCell<Vec<Output>>,
    /// Waker of the logic timer task, woken when a deadline earlier than the one it sleeps for
    /// appears.
    logic_timer: RefCell<Option<Waker>>,
    /// The deadline the logic timer task sleeps until (ms), or None while it waits for any.
    logic_timer_due: Cell<Option<u64>>,
    /// Set when the logic timer must recompute its deadline.
    logic_timer_kicked: Cell<bool>,
    /// Connection tasks waiting for the next read tick (see `read_tick`).
    read_tick_wakers: RefCell<Vec<Waker>>,
    /// Counts read ticks; a waiter is released when it changes.
    read_tick_epoch: Cell<u64>,
    /// A timer task will fire the next read tick.
    read_tick_armed: Cell<bool>,
    /// Counter behind gate-assigned log-ids (see `new_log_id`).
    next_log_id: Cell<u64>,
    /// The sweeper's waker while it waits for a first connection.
    sweeper: RefCell<Option<Waker>>,
    /// Set once shutdown began.
    pub shutting_down: Cell<bool>,
    /// Woken when shutdown begins (accept loop, sweeper).
    shutdown_wakers: RefCell<Vec<Waker>>,
    /// The most recent forwarded GPS points of every shard, for `/debug/gps` (bounded ring;
    /// touched once per flush, so the lock is cold).
    pub gps_recent: Arc<Mutex<VecDeque<wire::UidGpsPoint>>>,
    /// Which shards hold app-server connections.
    pub sidecars: Arc<crate::sidecar::Registry>,
    /// What waits for an app-server connection.
    pub outbound: RefCell<crate::sidecar::Outbound>,
    /// Shards that finished draining their logic at shutdown.
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// Accept-rate token bucket: tokens available (may go negative down to -accept_queue).
    pub accept_tokens: Cell<f64>,
    /// When the bucket was last refilled.
    pub accept_refill: Cell<Instant>,
}

/// Low bits of a gate-assigned log-id that count.
const LOG_ID_COUNTER_MASK: u64 = (1 << 48) - 1;

/// Close reason of a connection that never logged in within the login timeout. Gate-local: it
/// only labels `fleetgate_connections_closed_total` and is never sent (the app gets Error
/// NotLoggedIn).
pub const LOGIN_TIMEOUT: GoAwayReason = GoAwayReason(15);

/// Bound on the `/debug/gps` ring.
pub const GPS_RECENT_MAX: usize = 4096;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Shard {
    /// A shard with no connections.
    pub fn new(id: u16, shared: Shared) -> Shard {
        let Shared { cfg, mesh, metrics: all_metrics, gps_recent, sidecars, drained, node, incarnation } =
            shared;
        let shards = mesh.len();
        let logic = logic::Shard::new(logic::ShardConfig {
            id,
            gps_flush_ms: cfg.gps.flush_ms as u64,
            gps_forward: match cfg.gps.forward {
                crate::config::GpsForward::Latest => logic::gps::Forward::Latest,
                crate::config::GpsForward::All => logic::gps::Forward::All,
            },
            gps_max_buffered: 1 << 20,
            push_queue_len: cfg.limits.push_queue_len as usize,
            push_queue_bytes: cfg.limits.push_queue_bytes as usize,
            hold_ms: cfg.app.hold_ms as u64,
            max_held: cfg.limits.max_held_sessions_per_shard as usize,
            max_pending_requests: cfg.limits.max_pending_requests_per_shard as usize,
            request_timeout_ms: cfg.sidecar.request_timeout_ms as u64,
        });
        Shard {
            id,
            token_secret: cfg.token_secret().to_vec(),
            accept_tokens: Cell::new(cfg.app.accept_rate_per_shard as f64),
            accept_refill: Cell::new(Instant::now()),
            cfg,
            mesh,
            all_metrics,
            node,
            incarnation,
            conns: RefCell::new(Slab::new()),
            next_gen: Cell::new(1),
            app_conn_count: Cell::new(0),
            logic: RefCell::new(logic),
            enc: RefCell::new(Encoder::new()),
            scratch: RefCell::new(Vec::with_capacity(SCRATCH_BYTES)),
            outbox: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
            outbox_scheduled: Cell::new(false),
            dirty: RefCell::new(Vec::new()),
            logic_out: RefCell::new(Vec::new()),
            logic_timer: RefCell::new(None),
            logic_timer_due: Cell::new(None),
            logic_timer_kicked: Cell::new(false),
            read_tick_wakers: RefCell::new(Vec::new()),
            read_tick_epoch: Cell::new(0),
            read_tick_armed: Cell::new(false),
            sweeper: RefCell::new(None),
            // A random start, so two runs of a gate do not hand out the same ids.
            next_log_id: Cell::new(rand::random::<u64>() & LOG_ID_COUNTER_MASK),
            shutting_down: Cell::new(false),
            shutdown_wakers: RefCell::new(Vec::new()),
            gps_recent,
            sidecars,
            outbound: RefCell::new(Default::default()),
            drained,
        }
    }

    /// A fresh gate-assigned log-id (PROTOCOL §7): for flows an app or app-server started with
    /// log-id 0 and for flows the gate starts itself. The top bit marks it gate-assigned, the
    /// next 15 bits name the shard, and the low 48 bits count.
    pub fn new_log_id(&self) -> u64 {
        let n = self.next_log_id.get().wrapping_add(1) & LOG_ID_COUNTER_MASK;
        self.next_log_id.set(n);
        (1 << 63) | ((self.id as u64 & 0x7FFF) << 48) | n.max(1)
    }

    /// `log_id`, or a fresh gate-assigned one when it is 0 (none given).
    #[inline]
    pub fn log_id_or_new(&self, log_id: u64) -> u64 {
        if log_id == 0 {
            self.new_log_id()
        } else {
            log_id
        }
    }

    /// This shard's metrics.
    #[inline]
    pub fn metrics(&self) -> &ShardMetrics {
        &self.all_metrics[self.id as usize]
    }

    // ------------------------------------------------------------------------------------------
    // Connections
    // ------------------------------------------------------------------------------------------

    /// Registers a new connection; returns its slot and generation.
    pub fn add_conn(&self, fd: RawFd, port: Port, now_ms: u64) -> ConnRef {
        let gen = self.next_gen.get();
        self.next_gen.set(gen.wrapping_add(1).max(1));
        let slot = self.conns.borrow_mut().insert(Conn {
            gen,
            port,
            sidecar: None,
            fd,
            state: ConnState::AwaitingLogin,
            uid: 0,
            role: 0,
            out: Vec::new(),
            out_inflight: 0,
            partial: Vec::new(),
            partial_since_ms: 0,
            accepted_ms: now_ms,
            last_rx_ms: now_ms,
            close: None,
            write_blocked: false,
            write_stalled_ms: 0,
            dirty: false,
            pre_login_errors: 0,
            login_started: None,
            waker: None,
        });
        if let Some(w) = self.sweeper.borrow_mut().take() {
            w.wake();
        }
        if port == Port::App {
            self.app_conn_count.set(self.app_conn_count.get() + 1);
            self.metrics().conns_open.fetch_add(1, Relaxed);
        }
        ConnRef { shard: self.id, slot: slot as u32, gen }
    }

    /// Forgets a connection whose task ended; tells its logic shard if it had a session.
    pub fn remove_conn(&self, c: ConnRef) {
        let removed = {
            let mut conns = self.conns.borrow_mut();
            match conns.get(c.slot as usize) {
                Some(conn) if conn.gen == c.gen => Some(conns.remove(c.slot as usize)),
                _ => None,
            }
        };
        let Some(conn) = removed else { return };
        let m = self.metrics();
        m.out_queue_bytes.fetch_sub(conn.out.len() as i64, Relaxed);
        if conn.port == Port::Sidecar {
            crate::sidecar::on_closed(self, c, conn);
            return;
        }
        self.app_conn_count.set(self.app_conn_count.get() - 1);
        m.conns_open.fetch_sub(1, Relaxed);
        m.closed.add(conn.close.map_or(0, |r| r.0 as usize), 1);
        if conn.state == ConnState::LoggedIn {
            m.sessions_on_conns.fetch_sub(1, Relaxed);
        }
        if conn.state != ConnState::AwaitingLogin {
            let reason = match conn.close {
                Some(GoAwayReason::SlowConsumer) => CloseReason::SlowConsumer,
                Some(GoAwayReason::Shutdown) => CloseReason::Shutdown,
                _ => CloseReason::Dropped,
            };
            self.to_logic(conn.uid, logic::Input::Closed { uid: conn.uid, conn: c, reason });
        }
        self.flush_soon();
    }

    /// App connections open on this shard.
    pub fn app_conns(&self) -> usize {
        self.app_conn_count.get()
    }

    /// Runs `f` on the connection if `c` still names it.
    pub fn with_conn<R>(&self, c: ConnRef, f: impl FnOnce(&mut Conn) -> R) -> Option<R> {
        let mut conns = self.conns.borrow_mut();
        match conns.get_mut(c.slot as usize) {
            Some(conn) if conn.gen == c.gen => Some(f(conn)),
            _ => None,
        }
    }

    /// Appends a frame built by `build` to the connection's out queue.
    pub fn send_frame<T>(
        &self,
        c: ConnRef,
        ty: FrameType,
        cmd: Cmd,
        seq: u32,
        log_id: u64,
        build: impl FnOnce(
            &mut schema::flatbuffers::FlatBufferBuilder<'static>,
        ) -> schema::flatbuffers::WIPOffset<T>,
    ) {
        // The encoder's borrow ends before anything else runs (queue_bytes may schedule work).
        let queued = {
            let mut enc = self.enc.borrow_mut();
            let body = enc.body(build);
            self.append(c, cmd, |out| schema::write_frame(out, ty, cmd, seq, log_id, body))
        };
        self.after_append(c, cmd, queued);
    }

    /// Appends an error frame answering a frame with `seq` and `log_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn send_error(
        &self,
        c: ConnRef,
        seq: u32,
        log_id: u64,
        code: wire::ErrorCode,
        origin: wire::Hop,
        failed_cmd: u16,
        message: &str,
        retry_after_ms: u32,
    ) {
        tracing::info!(log_id, shard = self.id, slot = c.slot, code = ?code, origin = ?origin, failed_cmd, message, "error sent to app");
        self.metrics().errors.add(code.0 as usize, 1);
        let mut enc = self.enc.borrow_mut();
        let mut frame = Vec::new();
        enc.error(&mut frame, seq, log_id, code, origin, failed_cmd, message, retry_after_ms);
        drop(enc);
        self.queue_bytes(c, Cmd::Error, |out| out.extend_from_slice(&frame));
    }

    /// Sends a go-away and closes the connection once it is written.
    pub fn go_away(&self, c: ConnRef, log_id: u64, reason: GoAwayReason, message: &str, retry_after_ms: u32) {
        let log_id = self.log_id_or_new(log_id);
        tracing::info!(log_id, shard = self.id, slot = c.slot, reason = ?reason, message, "go-away");
        let mut enc = self.enc.borrow_mut();
        let mut frame = Vec::new();
        enc.go_away(&mut frame, log_id, reason, message, "", retry_after_ms);
        drop(enc);
        self.queue_bytes(c, Cmd::GoAway, |out| out.extend_from_slice(&frame));
        self.close(c, reason);
    }

    /// Appends bytes written by `write` (whole frames of `cmd`) to the connection's out queue;
    /// false when the connection is gone or closing.
    pub fn queue_raw(&self, c: ConnRef, cmd: Cmd, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        self.queue_bytes(c, cmd, write)
    }

    fn queue_bytes(&self, c: ConnRef, cmd: Cmd, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let queued = self.append(c, cmd, write);
        self.after_append(c, cmd, queued)
    }

    /// Appends to the out queue; touches nothing but the connection table.
    fn append(&self, c: ConnRef, cmd: Cmd, write: impl FnOnce(&mut Vec<u8>)) -> Appended {
        self.with_conn(c, |conn| {
            // An app-server takes every shard's GPS flushes and receipts: one flush can pass an
            // app's bound, so its connections are bounded by what a few of its largest frames take.
            let limit = match conn.port {
                Port::App => self.cfg.app.out_queue_bytes as usize,
                Port::Sidecar => SIDECAR_OUT_FRAMES * self.cfg.sidecar.max_body as usize,
            };
            if conn.close.is_some() && cmd != Cmd::GoAway && cmd != Cmd::Error {
                return Appended::Refused;
            }
            let before = conn.out.len();
            write(&mut conn.out);
            self.metrics().out_queue_bytes.fetch_add((conn.out.len() - before) as i64, Relaxed);
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.borrow_mut().push(c.slot as usize);
            }
            if conn.out.len() + conn.out_inflight > limit {
                Appended::OverLimit
            } else {
                Appended::Yes
            }
        })
        .unwrap_or(Appended::Refused)
    }

    /// Counts an appended frame, closes a connection over its limit, and schedules the flush.
    fn after_append(&self, c: ConnRef, cmd: Cmd, appended: Appended) -> bool {
        self.flush_soon();
        match appended {
            Appended::Refused => false,
            Appended::Yes | Appended::OverLimit => {
                self.metrics().frames_out.add(cmd.slot(), 1);
                if appended == Appended::OverLimit {
                    self.close(c, GoAwayReason::SlowConsumer);
                }
                true
            }
        }
    }

    /// Marks the connection for closing; its task writes what is queued and exits.
    pub fn close(&self, c: ConnRef, reason: GoAwayReason) {
        self.with_conn(c, |conn| {
            if conn.close.is_none() {
                conn.close = Some(reason);
                if let Some(w) = conn.waker.take() {
                    w.wake();
                }
            }
        });
    }

    /// Writes every dirty connection's out queue with one non-blocking send each.
    pub fn flush_writes(&self) {
        let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        let mut conns = self.conns.borrow_mut();
        for slot in dirty.iter().copied() {
            let Some(conn) = conns.get_mut(slot) else { continue };
            conn.dirty = false;
            if conn.write_blocked || conn.out.is_empty() {
                continue;
            }
            let m = self.metrics();
            match net::send(conn.fd, &conn.out) {
                Ok(Io::Done(n)) => {
                    m.bytes_out.fetch_add(n as u64, Relaxed);
                    m.out_queue_bytes.fetch_sub(n as i64, Relaxed);
                    if n == conn.out.len() {
                        conn.out.clear();
                        if conn.out.capacity() > OUT_KEEP_CAPACITY {
                            conn.out = Vec::new();
                        }
                    } else {
                        conn.out.drain(..n);
                        conn.write_blocked = true;
                    }
                }
                Ok(Io::WouldBlock) | Ok(Io::Eof) => conn.write_blocked = true,
                Err(_) => {
                    // The peer is gone; the task sees it on its next read or here.
                    if conn.close.is_none() {
                        conn.close = Some(GoAwayReason::Unknown);
                    }
                }
            }
            if conn.write_blocked || conn.close.is_some() {
                if let Some(w) = conn.waker.take() {
                    w.wake();
                }
            }
        }
        let mut d = self.dirty.borrow_mut();
        if d.is_empty() {
            // Keep the allocation for the next round.
            *d = dirty;
            d.clear();
        }
    }

    /// Like `poll_conn_event`, but only for a close (used while a blocked write is in flight).
    pub fn poll_close(&self, c: ConnRef, waker: &Waker) -> Poll<GoAwayReason> {
        self.with_conn(c, |conn| match conn.close {
            Some(r) => Poll::Ready(r),
            None => {
                conn.waker = Some(waker.clone());
                Poll::Pending
            }
        })
        .unwrap_or(Poll::Ready(GoAwayReason::Unknown))
    }

    /// Registers the connection task's waker; returns what it should do now, if anything.
    pub fn poll_conn_event(&self, c: ConnRef, waker: &Waker) -> Poll<ConnEvent> {
        self.with_conn(c, |conn| {
            if let Some(r) = conn.close {
                Poll::Ready(ConnEvent::Close(r))
            } else if conn.write_blocked {
                Poll::Ready(ConnEvent::WriteBlocked)
            } else {
                match &conn.waker {
                    Some(w) if w.will_wake(waker) => {}
                    _ => conn.waker = Some(waker.clone()),
                }
                Poll::Pending
            }
        })
        .unwrap_or(Poll::Ready(ConnEvent::Close(GoAwayReason::Unknown)))
    }

    // ------------------------------------------------------------------------------------------
    // Mesh: to logic shards and back
    // ------------------------------------------------------------------------------------------

    /// Sends an input to the logic shard owning `uid`.
    #[inline]
    pub fn to_logic(&self, uid: u64, input: logic::Input) {
        let dest = logic::shard_of(uid, self.mesh.len());
        self.to_shard(dest, Msg::Logic(input));
    }

    /// Queues a message for `dest`; it leaves when this executor next yields.
    pub fn to_shard(&self, dest: usize, msg: Msg) {
        let full = {
            let mut ob = self.outbox.borrow_mut();
            ob[dest].push(msg);
            ob[dest].len() >= MAX_BATCH
        };
        if full {
            self.flush_outbox();
        } else {
            self.flush_soon();
        }
    }

    /// Schedules one flush of the outbox and of dirty connections for when the current task
    /// yields, batching what every ready task produces in this turn of the executor.
    pub fn flush_soon(&self) {
        if !self.outbox_scheduled.replace(true) {
            // Spawning a tiny task is cheaper than a timer and runs right after the current one.
            let me = SHARD.with(|s| s.borrow().clone());
            if let Some(me) = me {
                glommio::spawn_local(async move { me.flush_all() }).detach();
            } else {
                self.outbox_scheduled.set(false);
                self.flush_outbox();
            }
        }
    }

    /// Sends everything this turn produced: app-server-bound output, mesh batches (handling our
    /// own at once, which may produce more), then every dirty connection's bytes.
    pub fn flush_all(&self) {
        // Bounded: each round handles what the previous one produced; three rounds cover
        // logic → sidecar → another shard.
        for _ in 0..3 {
            crate::sidecar::flush(self);
            self.flush_outbox();
        }
        self.flush_writes();
    }

    /// Sends every waiting batch. A full inbox keeps the batch here and retries shortly.
    pub fn flush_outbox(&self) {
        self.outbox_scheduled.set(false);
        let mut retry = false;
        let n = self.mesh.len();
        for dest in 0..n {
            let msgs = {
                let mut ob = self.outbox.borrow_mut();
                if ob[dest].is_empty() {
                    continue;
                }
                std::mem::take(&mut ob[dest])
            };
            if dest == self.id as usize {
                // Our own logic shard: handle now, no channel, no wake-up.
                self.handle_batch(msgs);
                continue;
            }
            self.metrics().mesh_batches.fetch_add(1, Relaxed);
            if let Err(b) = self.mesh.try_send(dest, Batch { sent: Instant::now(), msgs }) {
                self.metrics().mesh_full.fetch_add(1, Relaxed);
                let mut ob = self.outbox.borrow_mut();
                let mut back = b.msgs;
                back.append(&mut ob[dest]);
                ob[dest] = back;
                retry = true;
            }
        }
        if retry {
            let me = SHARD.with(|s| s.borrow().clone());
            if let Some(me) = me {
                self.outbox_scheduled.set(true);
                glommio::spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    me.flush_outbox();
                })
                .detach();
            }
        }
    }

    /// Handles one batch from the mesh (or from this shard itself).
    pub fn handle_batch(&self, msgs: Vec<Msg>) {
        for msg in msgs {
            match msg {
                Msg::Logic(input) => self.logic_input(input),
                Msg::Conn(output) => crate::app::session::apply_output(self, output),
                Msg::AppServer(m) => crate::sidecar::on_mesh(self, m),
            }
        }
        self.refresh_logic_gauges();
    }

    /// Sends logic outputs where they go: to connections (here or on other shards) or to the
    /// app-server side.
    pub fn route_outputs(&self, out: &mut Vec<Output>) {
        for o in out.drain(..) {
            let conn = match &o {
                Output::LoginOk { conn, .. }
                | Output::ResumeOk { conn, .. }
                | Output::ResumeRefused { conn, .. }
                | Output::Displaced { conn, .. }
                | Output::LogoutOk { conn, .. }
                | Output::Deliver { conn, .. }
                | Output::Reply { conn, .. }
                | Output::RequestFailed { conn, .. } => Some(*conn),
                Output::BroadcastCounted { tally, .. } => {
                    Some(ConnRef { shard: tally.shard, slot: u32::MAX, gen: 0 })
                }
                Output::Receipt(_)
                | Output::Upstream { .. }
                | Output::GpsBatch(_)
                | Output::Unreachable { .. } => None,
            };
            match conn {
                Some(c) if c.shard == self.id => crate::app::session::apply_output(self, o),
                Some(c) => self.to_shard(c.shard as usize, Msg::Conn(o)),
                None => crate::sidecar::route(self, o),
            }
        }
    }

    /// Feeds one input to this executor's logic shard and routes what it decides.
    pub fn logic_input(&self, input: logic::Input) {
        let mut out = std::mem::take(&mut *self.logic_out.borrow_mut());
        let next = {
            let mut logic = self.logic.borrow_mut();
            logic.handle(input, net::now_ms(), &mut out);
            logic.next_deadline_ms()
        };
        self.rearm_logic_timer(next);
        self.route_outputs(&mut out);
        *self.logic_out.borrow_mut() = out;
    }

    fn refresh_logic_gauges(&self) {
        let logic = self.logic.borrow();
        let m = self.metrics();
        m.directory_sessions.store(logic.directory.len() as i64, Relaxed);
        m.held_sessions.store(logic.directory.held_count() as i64, Relaxed);
        m.pushes_in_flight.store(logic.pushes_in_flight() as i64, Relaxed);
        m.requests_pending.store(logic.requests_pending() as i64, Relaxed);
        let s = logic.gps_stats();
        m.gps_forwarded.store(s.points_out, Relaxed);
        m.gps_coalesced.store(s.coalesced, Relaxed);
        m.gps_dropped.store(s.dropped, Relaxed);
    }

    /// Wakes the logic timer when `next` (the logic shard's next deadline after a change) comes
    /// before the deadline the timer sleeps for: any input may add a deadline earlier than all
    /// the others pending (a TTL-2 s push behind a TTL-20 s one, a hold, a request, a GPS flush).
    fn rearm_logic_timer(&self, next: Option<u64>) {
        let Some(next) = next else { return };
        if self.logic_timer_due.get().is_none_or(|due| next < due) {
            self.logic_timer_due.set(Some(next));
            self.logic_timer_kicked.set(true);
            if let Some(w) = self.logic_timer.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Resolves once `rearm_logic_timer` asked the timer to recompute its deadline.
    async fn logic_timer_kick(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.logic_timer_kicked.replace(false) {
                Poll::Ready(())
            } else {
                *self.logic_timer.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    // ------------------------------------------------------------------------------------------
    // Shutdown
    // ------------------------------------------------------------------------------------------

    /// Begins graceful shutdown on this shard: stop accepting, tell every app to go away.
    pub fn begin_shutdown(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        tracing::info!(shard = self.id, "shutting down: go-away to every connection");
        for w in self.shutdown_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        // App connections only: sidecar connections stay until every receipt is out.
        let conns: Vec<ConnRef> = self
            .conns
            .borrow()
            .iter()
            .filter(|(_, c)| c.port == Port::App)
            .map(|(slot, c)| ConnRef { shard: self.id, slot: slot as u32, gen: c.gen })
            .collect();
        let base = self.cfg.app.retry_after_ms;
        for c in conns {
            self.go_away(c, 0, GoAwayReason::Shutdown, "gate shutting down", jitter(base));
        }
        let mut out = Vec::new();
        self.logic.borrow_mut().flush_gps(&mut out);
        self.route_outputs(&mut out);
        self.flush_all();
    }

    /// Resolves at the shard's next read tick. Busy connections wait here between reads instead
    /// of in a readiness poll, so that what arrives meanwhile is taken with one read, and the
    /// shard takes one timer wake-up per tick instead of one poll completion per segment.
    pub async fn read_tick(self: &Rc<Self>, every: Duration) {
        let epoch = self.read_tick_epoch.get();
        futures_lite::future::poll_fn(|cx| {
            if self.read_tick_epoch.get() != epoch {
                return Poll::Ready(());
            }
            self.read_tick_wakers.borrow_mut().push(cx.waker().clone());
            if !self.read_tick_armed.replace(true) {
                let me = self.clone();
                glommio::spawn_local(async move {
                    glommio::timer::sleep(every).await;
                    me.read_tick_armed.set(false);
                    me.read_tick_epoch.set(me.read_tick_epoch.get() + 1);
                    let wakers = std::mem::take(&mut *me.read_tick_wakers.borrow_mut());
                    for w in wakers {
                        w.wake();
                    }
                })
                .detach();
            }
            Poll::Pending
        })
        .await
    }

    /// Resolves once shutdown has begun.
    pub async fn shutdown_begun(self: &Rc<Self>) {
        futures_lite::future::poll_fn(|cx| {
            if self.shutting_down.get() {
                Poll::Ready(())
            } else {
                self.shutdown_wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// What appending to an out queue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Appended {
    /// The connection is gone or closing.
    Refused,
    /// Queued.
    Yes,
    /// Queued, and the queue is now past its bound: the connection is a slow consumer.
    OverLimit,
}

/// What a connection task is asked to do.
#[derive(Debug, Clone, Copy)]
pub enum ConnEvent {
    /// Write what is queued, then exit.
    Close(GoAwayReason),
    /// The socket took only part of the queue: wait for it to drain.
    WriteBlocked,
}

/// `base` plus up to `base` of random jitter, so refused clients do not return in lockstep.
pub fn jitter(base: u32) -> u32 {
    base.saturating_add(rand::random_range(0..=base.max(1)))
}

thread_local! {
    /// The executor's shard, for tasks spawned from deep inside it.
    pub static SHARD: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// Processor task: drains the inbox whenever other shards wake it.
pub async fn run_inbox(shard: Rc<Shard>) {
    let inbox = &shard.mesh.inboxes[shard.id as usize];
    loop {
        futures_lite::future::poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if !inbox.rx.is_empty() || inbox.shutdown.load(std::sync::atomic::Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if inbox.shutdown.load(std::sync::atomic::Ordering::Acquire) {
            shard.begin_shutdown();
        }
        for _ in 0..MAX_BATCHES_PER_WAKE {
            let Ok(batch) = inbox.rx.try_recv() else { break };
            shard.metrics().mesh_hop_us.observe_us(batch.sent.elapsed().as_micros() as u64);
            shard.handle_batch(batch.msgs);
        }
        shard.flush_all();
        futures_lite::future::yield_now().await;
    }
}

/// Logic timer task: sleeps until the logic shard's next deadline (TTLs, holds, requests, the
/// GPS flush), or until an input brings an earlier one; with nothing due it sleeps until woken,
/// so an idle shard takes no timer wake-ups at all.
pub async fn run_logic_timer(shard: Rc<Shard>) {
    loop {
        let due = shard.logic.borrow().next_deadline_ms();
        shard.logic_timer_due.set(due);
        shard.logic_timer_kicked.set(false);
        match due {
            None => shard.logic_timer_kick().await,
            Some(due) => {
                let now = net::now_ms();
                if due > now {
                    let sleep = glommio::timer::sleep(Duration::from_millis(due - now));
                    let kicked = futures_lite::future::or(
                        async {
                            sleep.await;
                            false
                        },
                        async {
                            shard.logic_timer_kick().await;
                            true
                        },
                    )
                    .await;
                    if kicked {
                        continue;
                    }
                }
                let mut out = Vec::new();
                shard.logic.borrow_mut().tick(net::now_ms(), &mut out);
                shard.route_outputs(&mut out);
                shard.refresh_logic_gauges();
                shard.flush_all();
            }
        }
    }
}

/// Sweeper task: closes connections past their login, read or idle timeout. One timer per
/// shard, whatever the number of connections; it stops ticking when there are none.
pub async fn run_sweeper(shard: Rc<Shard>) {
    loop {
        // Nothing to time out: wait for a connection (no timer ticks on an idle shard).
        futures_lite::future::poll_fn(|cx| {
            if shard.conns.borrow().is_empty() {
                *shard.sweeper.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        let now = net::now_ms();
        let app = &shard.cfg.app;
        let mut to_close = Vec::new();
        for (slot, c) in shard.conns.borrow().iter() {
            if c.close.is_some() {
                continue;
            }
            let r = ConnRef { shard: shard.id, slot: slot as u32, gen: c.gen };
            if c.state == ConnState::AwaitingLogin
                && now.saturating_sub(c.accepted_ms) > app.login_timeout_ms as u64
            {
                to_close.push((r, None));
            } else if c.partial_since_ms != 0
                && now.saturating_sub(c.partial_since_ms) > app.read_timeout_ms as u64
            {
                to_close.push((r, Some(GoAwayReason::ReadTimeout)));
            } else if c.write_stalled_ms != 0
                && now.saturating_sub(c.write_stalled_ms) > app.read_timeout_ms as u64
            {
                // Pushes wait and the peer takes nothing: a slow consumer, whatever its queue.
                to_close.push((r, Some(GoAwayReason::SlowConsumer)));
            } else if c.port == Port::App && now.saturating_sub(c.last_rx_ms) > app.idle_timeout_ms as u64 {
                to_close.push((r, Some(GoAwayReason::IdleTimeout)));
            }
        }
        for (r, reason) in to_close {
            match reason {
                None => {
                    shard.send_error(
                        r,
                        0,
                        shard.new_log_id(),
                        wire::ErrorCode::NotLoggedIn,
                        wire::Hop::App,
                        0,
                        "no login within the login timeout",
                        0,
                    );
                    shard.close(r, LOGIN_TIMEOUT);
                }
                Some(GoAwayReason::SlowConsumer) => shard.close(r, GoAwayReason::SlowConsumer),
                Some(GoAwayReason::ReadTimeout) => shard.go_away(
                    r,
                    0,
                    GoAwayReason::ReadTimeout,
                    "frame not completed within the read timeout",
                    0,
                ),
                Some(reason) => shard.go_away(r, 0, reason, "nothing heard within the idle timeout", 0),
            }
        }
        shard.flush_writes();
    }
}

/// How many error frames a connection may earn before login (see `MAX_PRE_LOGIN_ERRORS`).
pub fn pre_login_error_budget_exhausted(conn: &mut Conn) -> bool {
    conn.pre_login_errors = conn.pre_login_errors.saturating_add(1);
    conn.pre_login_errors > MAX_PRE_LOGIN_ERRORS
}
