//! One executor's state, owned by its loop (`event_loop`) and lent `&mut` to the flows: the
//! connection table, the logic shard, the app-server delivery, the out queues and the mesh
//! outbox, with the primitives the flows use (send a frame, close a connection, send to a logic
//! shard). Nothing here is shared or behind a `RefCell`; nothing here calls a flow.

use crate::config::Config;
use crate::delivery::Delivery;
use crate::io::{Command, ConnCtl};
use crate::lifecycle::{CloseReason, Lifecycle, Port, Timeouts};
use crate::mesh::{Batch, Mesh, Msg, MAX_BATCH};
use crate::metrics::ShardMetrics;
use crate::net::{self, Io};
use logic::ConnRef;
use schema::wire::{self, GoAwayReason};
use schema::{Cmd, Encoder, FrameType};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Size of the shard's drain buffer: bursts from one connection are read into it and decoded in
/// place, so a connection owns no read buffer while idle.
pub const SCRATCH_BYTES: usize = 256 * 1024;
/// An app-server connection's out queue holds at most this many of its largest frames.
const SIDECAR_OUT_FRAMES: usize = 8;
/// Bound on the `/debug/gps` ring.
pub const GPS_RECENT_MAX: usize = 4096;
/// Low bits of a gate-assigned log-id that count.
const LOG_ID_COUNTER_MASK: u64 = (1 << 48) - 1;

/// Milliseconds on the gate's monotonic clock (since the process started): every deadline of
/// the gate's own is on it; wall time is used only where tokens and session epochs need it.
pub fn mono_ms() -> u64 {
    mono_start().elapsed().as_millis() as u64
}

/// Microseconds on the same clock, for the push-path histograms (never 0: 0 means "no time").
pub fn mono_us() -> u64 {
    (mono_start().elapsed().as_micros() as u64).max(1)
}

fn mono_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// A busy connection, read by the loop on its read tick instead of through its task.
#[derive(Clone, Copy, Debug)]
pub struct Busy {
    /// Empty reads left before it goes back to readiness reads.
    pub left: u8,
    /// Ticks between reads: about the connection's gap between frames.
    pub ticks_per_read: u32,
    /// Ticks waited since the last read.
    pub waited: u32,
}

/// One connection, as the shard sees it.
#[derive(Debug)]
pub struct Conn {
    /// Generation of this slot, part of `ConnRef`.
    pub gen: u32,
    /// The port it came in on.
    pub port: Port,
    /// The socket, for non-blocking reads and writes (the task owns it and outlives this entry).
    pub fd: RawFd,
    /// Who moves its bytes: its task (through a mailbox) or the shard's app ring.
    pub io: ConnIo,
    /// Phase, close reason and timeouts.
    pub life: Lifecycle,
    /// Frames waiting to be written, coalesced into one write.
    pub out: Vec<u8>,
    /// Bytes handed to the task's blocked write (counted toward the slow-consumer bound); the
    /// loop writes nothing else until the task says they are out.
    pub out_inflight: usize,
    /// Bytes of an incomplete frame kept between reads (empty and unallocated when idle).
    pub partial: Vec<u8>,
    /// Already listed in the dirty list.
    pub dirty: bool,
    /// When the login frame arrived, for the login latency histogram.
    pub login_started: Option<Instant>,
    /// The name an app-server gave in its hello, for logs (kept in its own box: apps, the great
    /// majority, pay one pointer).
    pub peer_name: Option<Box<Box<str>>>,
    /// When its last read came (monotonic ms), for busy mode.
    pub last_read_ms: u64,
    /// Read by the loop's tick while busy.
    pub busy: Option<Busy>,
    /// The close was handed to the task.
    pub close_sent: bool,
    /// The secure channel of an app connection (none on the sidecar port or in plaintext mode).
    pub secure: Option<Box<crate::app::secure::Secure>>,
    /// The sweep tick its one live entry in `Shard::sweep_wheel` is filed under (`u32::MAX`:
    /// none; 32 bits of 250 ms ticks last 34 years).
    pub sweep_tick: u32,
    /// Where measured frames (push deliveries, receipts) end in the written stream (none until
    /// the connection carries one).
    pub marks: Option<Box<crate::marks::WriteMarks>>,
}

/// Who moves a connection's bytes.
#[derive(Debug)]
pub enum ConnIo {
    /// A glommio task, reached through its mailbox.
    Task(Rc<ConnCtl>),
    /// The shard's app ring (`crate::uring`): no task at all.
    Ring(RingConn),
}

/// A ring-driven connection's I/O state.
#[derive(Debug, Default)]
pub struct RingConn {
    /// A send is in flight (its bytes are in `out_inflight`).
    pub sending: bool,
    /// When the ring's submission of that send returned (monotonic µs; set only for a
    /// connection carrying measured frames): a push's bytes count as handed to the kernel then,
    /// not when a busy shard reaps the completion up to a window later.
    pub sent_us: u64,
    /// The write side was shut after the last bytes of a close (monotonic ms).
    pub shut_at: Option<u64>,
    /// The receive was cancelled: the connection ends when it reports so.
    pub cancelled: bool,
    /// When the loop first saw it closing (monotonic ms), to bound the last writes.
    pub close_started: Option<u64>,
}

impl Conn {
    /// The whole out queue was handed to a write: nothing in it is sealed any more.
    fn out_taken(&mut self) {
        if let Some(sec) = self.secure.as_deref_mut() {
            sec.sealed = 0;
        }
    }

    /// `n` bytes at the front of the out queue went out (they were sealed).
    fn out_sent(&mut self, n: usize) {
        if let Some(sec) = self.secure.as_deref_mut() {
            sec.sealed = sec.sealed.saturating_sub(n);
        }
    }

    /// The mailbox of a task-driven connection.
    pub fn ctl(&self) -> Option<&Rc<ConnCtl>> {
        match &self.io {
            ConnIo::Task(ctl) => Some(ctl),
            ConnIo::Ring(_) => None,
        }
    }
}

/// A connection's token on the app ring: its slot and generation.
pub fn ring_token(c: ConnRef) -> u64 {
    ((c.slot as u64) << 32) | c.gen as u64
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
    pub sidecars: Arc<crate::delivery::Registry>,
    /// Shards that finished draining their logic at shutdown.
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// Shards that sent their apps' go-aways at shutdown.
    pub began: Arc<std::sync::atomic::AtomicUsize>,
    /// host:port apps should reconnect to.
    pub node: String,
    /// The secure channel's keys: the current pair and the previous one, if any.
    pub keys: Arc<channel::KeyRing>,
    /// This process's incarnation, sent in every AppServerWelcome (PROTOCOL.md §9.8).
    pub incarnation: u64,
    /// Cluster mode: the shared directory and the other nodes.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Room for pushes in flight on every logic shard.
    pub push_room: Arc<crate::sidecar::room::PushRoom>,
}

/// A broadcast waiting for every logic shard's count of its targets.
#[derive(Debug)]
pub struct PendingBroadcast {
    /// The app-server connection that sent it.
    pub conn: ConnRef,
    /// The push's sequence-id and log-id, for PushAccepted.
    pub seq: u32,
    /// The push's log-id.
    pub log_id: u64,
    /// The push's id.
    pub message_id: u64,
    /// Logic shards yet to count.
    pub waiting: usize,
    /// Targets counted so far.
    pub targets: u32,
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

/// Per-executor state.
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
    /// The secure channel's keys.
    pub keys: Arc<channel::KeyRing>,
    /// This process's incarnation.
    pub incarnation: u64,
    /// Cluster mode: the shared directory and the other nodes.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Room for pushes in flight on every logic shard.
    pub push_room: Arc<crate::sidecar::room::PushRoom>,
    /// This logic shard's pairs in flight as last published in `push_room`.
    published_in_flight: usize,
    /// Cluster mode: this shard's commands for Redis and the pushes it forwarded.
    pub cluster_shard: Option<crate::cluster::ClusterShard>,
    /// Cluster mode: what this shard relays to and for other nodes.
    pub relay: crate::cluster::relay::RelayShard,
    /// EndSession asks waiting for their answer.
    pub ends: crate::sidecar::end::Ends,
    /// GeoQuery and GeoPush requests waiting for every logic shard's answer.
    pub geos: crate::sidecar::geo::Geos,
    /// Connections on this shard.
    pub conns: Slab<Conn>,
    next_gen: u32,
    app_conn_count: usize,
    /// The logic shard of this executor.
    pub logic: logic::Shard,
    /// Reused frame encoder.
    pub enc: Encoder,
    /// Drain buffer for reads (see `SCRATCH_BYTES`); taken while frames borrow it.
    pub scratch: Vec<u8>,
    /// Frame bytes opened from a secure connection's records, before they are decoded (kept
    /// between reads up to `SCRATCH_BYTES`).
    pub plain: Vec<u8>,
    /// Messages waiting to be sent to each executor (this one's included: handled in place).
    outbox: Vec<Vec<Msg>>,
    /// A full inbox kept a batch here: retry at this time (monotonic ms).
    pub outbox_retry_ms: Option<u64>,
    /// Connections with bytes in `out` to write.
    dirty: Vec<usize>,
    /// Delivery toward the app-server.
    pub delivery: Delivery,
    /// Broadcasts accepted here, waiting for every logic shard's count of their targets.
    pub broadcasts: HashMap<u64, PendingBroadcast>,
    /// Id of the last broadcast tally.
    pub next_tally: u64,
    /// The most recent forwarded GPS points of every shard, for `/debug/gps`.
    pub gps_recent: Arc<Mutex<VecDeque<wire::UidGpsPoint>>>,
    /// Which shards hold app-server connections.
    pub sidecars: Arc<crate::delivery::Registry>,
    /// Shards that finished draining their logic at shutdown.
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// Shards that sent their apps' go-aways at shutdown: a drain hands sessions over only once
    /// every shard has, so no connection hears of its session moving before its own go-away.
    pub began: Arc<std::sync::atomic::AtomicUsize>,
    /// Set once shutdown began.
    pub shutting_down: bool,
    /// Cluster mode, shutting down: the live nodes this node's sessions move to (name, app
    /// address), sorted by name; empty when there is none and sessions end.
    pub drain_to: Vec<(String, String)>,
    /// Accept-rate token bucket: tokens available (may go negative down to -accept_queue).
    pub accept_tokens: f64,
    /// When the bucket was last refilled.
    pub accept_refill: Instant,
    next_log_id: u64,
    /// Busy connections' slots (read on the loop's tick).
    pub busy: Vec<usize>,
    /// Pushes whose targets here are still being delivered, a slice per turn.
    pub fanouts: crate::sidecar::fanout::Fanouts,
    /// The app port's own io_uring, when `app.io = "uring"`.
    pub ring: Option<crate::uring::AppRing>,
    /// Ring connections that are closing (looked at every 50 ms until their receive is
    /// cancelled): a list, so no turn scans the whole table.
    pub ring_closing: Vec<ConnRef>,
    /// The app port's listener, kept open while the ring accepts on it.
    pub app_listener: Option<std::net::TcpListener>,
    /// Ring connections admitted by the accept-rate queue whose receive starts later:
    /// (monotonic ms, connection).
    pub ring_arms: Vec<(u64, ConnRef)>,
    /// The timeout sweep's wheel: connections (slot, generation) by the sweep tick
    /// (`SWEEP_MS` long) at which to look at them next, no later than their earliest deadline.
    /// A connection is looked at about once per idle timeout, not on every sweep: 18,500 idle
    /// connections cost a couple of hundred looks a second instead of a walk of all of them four
    /// times a second. An entry whose tick is not its connection's `sweep_tick` is stale (the
    /// connection was filed earlier since, or is gone) and is dropped when its tick comes.
    pub sweep_wheel: std::collections::BTreeMap<u32, Vec<(u32, u32)>>,
    /// When the read whose frames are being handled took its bytes (monotonic µs): a Push's
    /// and a PushAck's start time for the push-path histograms.
    pub read_us: u64,
}

/// The timeout sweep's tick: deadlines fire on the first sweep after them, within this much
/// (docs/PROTOCOL.md §11.1 promises 300 ms).
pub const SWEEP_MS: u64 = 250;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// A shard with no connections.
    pub fn new(id: u16, shared: Shared) -> Shard {
        let Shared {
            cfg,
            mesh,
            metrics: all_metrics,
            gps_recent,
            sidecars,
            drained,
            began,
            node,
            keys,
            incarnation,
            cluster,
            push_room,
        } = shared;
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
            clustered: cluster.is_some(),
            geo_index: true,
        });
        Shard {
            id,
            token_secret: cfg.token_secret().to_vec(),
            accept_tokens: cfg.app.accept_rate_per_shard as f64,
            accept_refill: Instant::now(),
            cfg,
            mesh,
            all_metrics,
            node,
            keys,
            incarnation,
            cluster_shard: cluster.as_ref().map(|_| crate::cluster::ClusterShard::default()),
            push_room,
            published_in_flight: 0,
            relay: Default::default(),
            ends: Default::default(),
            geos: Default::default(),
            cluster,
            conns: Slab::new(),
            next_gen: 1,
            app_conn_count: 0,
            logic,
            enc: Encoder::new(),
            scratch: Vec::with_capacity(SCRATCH_BYTES),
            plain: Vec::new(),
            outbox: (0..shards).map(|_| Vec::new()).collect(),
            outbox_retry_ms: None,
            dirty: Vec::new(),
            delivery: Delivery::new(id),
            broadcasts: HashMap::new(),
            next_tally: 0,
            gps_recent,
            sidecars,
            drained,
            began,
            shutting_down: false,
            drain_to: Vec::new(),
            // A random start, so two runs of a gate do not hand out the same ids.
            next_log_id: rand::random::<u64>() & LOG_ID_COUNTER_MASK,
            busy: Vec::new(),
            fanouts: Default::default(),
            sweep_wheel: Default::default(),
            ring: None,
            app_listener: None,
            ring_closing: Vec::new(),
            ring_arms: Vec::new(),
            read_us: 0,
        }
    }

    /// This shard's metrics.
    #[inline]
    pub fn metrics(&self) -> &ShardMetrics {
        &self.all_metrics[self.id as usize]
    }

    /// A fresh gate-assigned log-id (PROTOCOL §7): for flows an app or app-server started with
    /// log-id 0 and for flows the gate starts itself. The top bit marks it gate-assigned, the
    /// next 15 bits name the shard, and the low 48 bits count.
    pub fn new_log_id(&mut self) -> u64 {
        let n = self.next_log_id.wrapping_add(1) & LOG_ID_COUNTER_MASK;
        self.next_log_id = n;
        (1 << 63) | ((self.id as u64 & 0x7FFF) << 48) | n.max(1)
    }

    /// `log_id`, or a fresh gate-assigned one when it is 0 (none given).
    #[inline]
    pub fn log_id_or_new(&mut self, log_id: u64) -> u64 {
        if log_id == 0 {
            self.new_log_id()
        } else {
            log_id
        }
    }

    /// The timeouts of a port's connections.
    pub fn timeouts(&self, port: Port) -> Timeouts {
        timeouts(&self.cfg, port)
    }

    // ------------------------------------------------------------------------------------------
    // Connections
    // ------------------------------------------------------------------------------------------

    /// Registers a new connection; returns its reference.
    pub fn add_conn(&mut self, fd: RawFd, port: Port, io: ConnIo, now: u64) -> ConnRef {
        let gen = self.next_gen;
        self.next_gen = gen.wrapping_add(1).max(1);
        let secure = crate::app::secure::new_conn(self, port);
        let slot = self.conns.insert(Conn {
            gen,
            port,
            fd,
            io,
            life: Lifecycle::new(now),
            out: Vec::new(),
            out_inflight: 0,
            partial: Vec::new(),
            dirty: false,
            login_started: None,
            peer_name: None,
            last_read_ms: now,
            busy: None,
            close_sent: false,
            sweep_tick: u32::MAX,
            secure,
            marks: None,
        });
        if port == Port::App {
            self.app_conn_count += 1;
            self.metrics().conns_open.fetch_add(1, Relaxed);
        }
        let me = ConnRef { shard: self.id, slot: slot as u32, gen };
        self.watch(me);
        me
    }

    /// Files `c` on the sweep's wheel under its earliest deadline, unless it is filed under an
    /// earlier tick already. Called when a connection starts and wherever a deadline can move
    /// earlier (see `Lifecycle::next_deadline`).
    pub fn watch(&mut self, c: ConnRef) {
        if let Some(conn) = conn_mut(&mut self.conns, c) {
            file(&mut self.sweep_wheel, conn, c.slot, &timeouts(&self.cfg, conn.port));
        }
    }

    /// The connections whose sweep tick has come by `now`, taken off the wheel (bounded by the
    /// connections and their re-filings).
    pub fn sweep_due(&mut self, now: u64) -> Vec<ConnRef> {
        let mut due = Vec::new();
        while let Some(e) = self.sweep_wheel.first_entry() {
            if *e.key() as u64 * SWEEP_MS > now {
                break;
            }
            let (tick, list) = e.remove_entry();
            for (slot, gen) in list {
                let c = ConnRef { shard: self.id, slot, gen };
                if let Some(conn) = conn_mut(&mut self.conns, c).filter(|x| x.sweep_tick == tick) {
                    conn.sweep_tick = u32::MAX;
                    due.push(c);
                }
            }
        }
        due
    }

    /// When the sweep must next look (monotonic ms).
    pub fn next_sweep(&self) -> Option<u64> {
        self.sweep_wheel.first_key_value().map(|(tick, _)| *tick as u64 * SWEEP_MS)
    }

    /// Takes a connection whose task ended out of the table.
    pub fn take_conn(&mut self, c: ConnRef) -> Option<Conn> {
        match self.conns.get(c.slot as usize) {
            Some(conn) if conn.gen == c.gen => {}
            _ => return None,
        }
        let conn = self.conns.remove(c.slot as usize);
        let m = &self.all_metrics[self.id as usize];
        m.out_queue_bytes.fetch_sub(conn.out.len() as i64, Relaxed);
        if conn.port == Port::App {
            self.app_conn_count -= 1;
            m.conns_open.fetch_sub(1, Relaxed);
            m.closed.add(conn.life.closing.unwrap_or(CloseReason::PeerGone).slot(), 1);
            if matches!(conn.life.phase, crate::lifecycle::Phase::Live { .. }) {
                m.sessions_on_conns.fetch_sub(1, Relaxed);
            }
        }
        self.busy.retain(|&s| s != c.slot as usize);
        Some(conn)
    }

    /// App connections open on this shard.
    pub fn app_conns(&self) -> usize {
        self.app_conn_count
    }

    /// The connection `c` names, if it is still there.
    pub fn conn(&mut self, c: ConnRef) -> Option<&mut Conn> {
        conn_mut(&mut self.conns, c)
    }

    /// The connection's phase and close state, if it is still there.
    pub fn life(&mut self, c: ConnRef) -> Option<&mut Lifecycle> {
        self.conn(c).map(|conn| &mut conn.life)
    }

    /// Appends a frame built by `build` to the connection's out queue.
    pub fn send_frame<T>(
        &mut self,
        c: ConnRef,
        ty: FrameType,
        cmd: Cmd,
        seq: u32,
        log_id: u64,
        build: impl FnOnce(
            &mut schema::flatbuffers::FlatBufferBuilder<'static>,
        ) -> schema::flatbuffers::WIPOffset<T>,
    ) {
        let mut enc = std::mem::take(&mut self.enc);
        let body = enc.body(build);
        self.queue_raw(c, cmd, |out| schema::write_frame(out, ty, cmd, seq, log_id, body));
        self.enc = enc;
    }

    /// Appends an error frame answering a frame with `seq` and `log_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn send_error(
        &mut self,
        c: ConnRef,
        seq: u32,
        log_id: u64,
        code: wire::ErrorCode,
        origin: wire::Hop,
        failed_cmd: u16,
        message: &str,
        retry_after_ms: u32,
    ) {
        tracing::info!(log_id, shard = self.id, slot = c.slot, code = ?code, origin = ?origin, failed_cmd, message, "error sent");
        self.metrics().errors.add(code.0 as usize, 1);
        let mut frame = Vec::new();
        self.enc.error(&mut frame, seq, log_id, code, origin, failed_cmd, message, retry_after_ms);
        self.queue_raw(c, Cmd::Error, |out| out.extend_from_slice(&frame));
    }

    /// Sends a go-away and closes the connection once it is written.
    pub fn go_away(
        &mut self,
        c: ConnRef,
        log_id: u64,
        reason: GoAwayReason,
        message: &str,
        retry_after_ms: u32,
    ) {
        self.go_away_to(c, log_id, reason, message, "", retry_after_ms)
    }

    /// A go-away naming the node to reconnect to (empty: this one).
    pub fn go_away_to(
        &mut self,
        c: ConnRef,
        log_id: u64,
        reason: GoAwayReason,
        message: &str,
        reconnect: &str,
        retry_after_ms: u32,
    ) {
        let log_id = self.log_id_or_new(log_id);
        tracing::info!(log_id, shard = self.id, slot = c.slot, reason = ?reason, message, reconnect, "go-away");
        let mut frame = Vec::new();
        self.enc.go_away(&mut frame, log_id, reason, message, reconnect, retry_after_ms);
        self.queue_raw(c, Cmd::GoAway, |out| out.extend_from_slice(&frame));
        self.close(c, CloseReason::GoAway(reason));
    }

    /// Appends bytes written by `write` (whole frames of `cmd`) to the connection's out queue;
    /// false when the connection is gone or closing. A queue past its bound closes the
    /// connection as a slow consumer.
    pub fn queue_raw(&mut self, c: ConnRef, cmd: Cmd, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let appended = self.append(c, cmd, write);
        match appended {
            Appended::Refused => false,
            Appended::Yes | Appended::OverLimit => {
                self.metrics().frames_out.add(cmd.slot(), 1);
                if appended == Appended::OverLimit {
                    self.close(c, CloseReason::GoAway(GoAwayReason::SlowConsumer));
                }
                true
            }
        }
    }

    fn append(&mut self, c: ConnRef, cmd: Cmd, write: impl FnOnce(&mut Vec<u8>)) -> Appended {
        let limit_app = self.cfg.app.out_queue_bytes as usize;
        // An app-server takes every shard's GPS flushes and receipts: one flush can pass an
        // app's bound, so its connections are bounded by what a few of its largest frames take.
        let limit_sidecar = SIDECAR_OUT_FRAMES * self.cfg.sidecar.max_body as usize;
        let m = &self.all_metrics[self.id as usize];
        let Some(conn) = conn_mut(&mut self.conns, c) else {
            return Appended::Refused;
        };
        let limit = if conn.port == Port::App { limit_app } else { limit_sidecar };
        if conn.life.closing.is_some() && cmd != Cmd::GoAway && cmd != Cmd::Error {
            return Appended::Refused;
        }
        let before = conn.out.len();
        write(&mut conn.out);
        m.out_queue_bytes.fetch_add((conn.out.len() - before) as i64, Relaxed);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(c.slot as usize);
        }
        if conn.out.len() + conn.out_inflight > limit {
            Appended::OverLimit
        } else {
            Appended::Yes
        }
    }

    /// Lists the connection for the next flush (its queue changed outside `send_frame`).
    pub fn mark_dirty(&mut self, c: ConnRef) {
        if let Some(conn) = conn_mut(&mut self.conns, c) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(c.slot as usize);
            }
        }
    }

    /// Marks the frame just queued on `c` (its last byte is the queue's last) to be measured
    /// when that byte is handed to the kernel (`crate::marks`).
    pub fn mark_written(&mut self, c: ConnRef, started: crate::marks::Started) {
        if let Some(conn) = conn_mut(&mut self.conns, c) {
            let queued = conn.out_inflight + conn.out.len();
            conn.marks.get_or_insert_with(Default::default).mark(queued, started);
        }
    }

    /// Marks the connection closing for `reason` (the first reason stands); the loop hands its
    /// last bytes and the close to its task on the next flush.
    pub fn close(&mut self, c: ConnRef, reason: CloseReason) {
        if let Some(conn) = self.conn(c) {
            if conn.life.close(reason) && !conn.dirty {
                conn.dirty = true;
                self.dirty.push(c.slot as usize);
            }
        }
    }

    /// Writes every dirty connection's out queue with one non-blocking send each; hands a full
    /// socket's rest to its task, and a closing connection's last bytes with the close.
    pub fn flush_writes(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        let now = mono_ms();
        // Ring connections with measured frames in this flush's sends: their bytes count as
        // handed to the kernel when the submission returns, the sends done (a loopback send
        // runs the receiver's whole TCP path, so the fifth of five sends ends tens of µs after
        // the first is queued). The ring's sends are submitted after the direct sends to
        // app-servers: an answer to the app-server (a GeoPush's chosen drivers) then waits for
        // none of its twenty deliveries, each of which waits for that one answer at most.
        let mut measured = Vec::new();
        let mut queued = false;
        for slot in dirty.drain(..) {
            let m = &self.all_metrics[self.id as usize];
            let Some(conn) = self.conns.get_mut(slot) else { continue };
            conn.dirty = false;
            if conn.close_sent {
                continue;
            }
            // On the secure channel the frames queued since the last flush become Data records
            // here: everything one flush writes, in as few records as fit.
            let unsealed_from = conn.out_inflight + conn.secure.as_deref().map_or(0, |s| s.sealed);
            let grew = crate::app::secure::seal_out(conn);
            if grew != 0 {
                m.out_queue_bytes.fetch_add(grew as i64, Relaxed);
                if let Some(marks) = conn.marks.as_deref_mut() {
                    marks.sealed(unsealed_from, conn.out_inflight + conn.out.len());
                }
            }
            if let ConnIo::Ring(r) = &mut conn.io {
                // The ring writes: one send in flight at a time, every turn's sends submitted
                // together; a closing connection shuts its write side once its bytes are out.
                if !r.sending && !conn.out.is_empty() {
                    let bytes = std::mem::take(&mut conn.out);
                    if let Some(sec) = conn.secure.as_deref_mut() {
                        sec.sealed = 0;
                    }
                    conn.out_inflight = bytes.len();
                    r.sending = true;
                    queued = true;
                    if conn.port == Port::App {
                        m.app_sends.fetch_add(1, Relaxed);
                    }
                    if conn.marks.is_some() {
                        measured.push(slot);
                    }
                    if let Some(ring) = self.ring.as_mut() {
                        ring.send(
                            conn.fd,
                            ring_token(ConnRef { shard: self.id, slot: slot as u32, gen: conn.gen }),
                            bytes,
                        );
                    }
                }
                if conn.life.closing.is_some() && r.close_started.is_none() {
                    r.close_started = Some(now);
                    self.ring_closing.push(ConnRef { shard: self.id, slot: slot as u32, gen: conn.gen });
                }
                if conn.life.closing.is_some() && !r.sending && conn.out.is_empty() && r.shut_at.is_none() {
                    // SAFETY: shutdown(2) on a socket this connection owns; no memory involved.
                    unsafe { libc::shutdown(conn.fd, libc::SHUT_WR) };
                    r.shut_at = Some(now);
                    conn.close_sent = true;
                }
                continue;
            }
            if conn.out_inflight == 0 && !conn.out.is_empty() {
                if conn.port == Port::App {
                    m.app_sends.fetch_add(1, Relaxed);
                }
                match net::send(conn.fd, &conn.out) {
                    Ok(Io::Done(n)) => {
                        m.bytes_out.fetch_add(n as u64, Relaxed);
                        m.out_queue_bytes.fetch_sub(n as i64, Relaxed);
                        wrote(conn, n, m);
                        if n == conn.out.len() {
                            // Idle connections, the great majority, keep no write buffer.
                            conn.out = Vec::new();
                        } else {
                            conn.out.drain(..n);
                        }
                        conn.out_sent(n);
                    }
                    Ok(Io::WouldBlock) | Ok(Io::Eof) => {}
                    Err(_) => {
                        // The peer is gone: nothing more can be written.
                        conn.life.close(CloseReason::PeerGone);
                        m.out_queue_bytes.fetch_sub(conn.out.len() as i64, Relaxed);
                        conn.out = Vec::new();
                    }
                }
                if !conn.out.is_empty() && conn.life.closing.is_none() {
                    // The socket is full: the task waits for it to take the rest.
                    let rest = std::mem::take(&mut conn.out);
                    conn.out_taken();
                    conn.out_inflight = rest.len();
                    conn.life.set_write_stalled(Some(now));
                    file(&mut self.sweep_wheel, conn, slot as u32, &timeouts(&self.cfg, conn.port));
                    if let Some(ctl) = conn.ctl() {
                        ctl.send(Command::Write(rest));
                    }
                }
            }
            if conn.life.closing.is_some() && !conn.close_sent {
                let last = std::mem::take(&mut conn.out);
                conn.out_taken();
                m.out_queue_bytes.fetch_sub(last.len() as i64, Relaxed);
                conn.close_sent = true;
                if let Some(ctl) = conn.ctl() {
                    ctl.send(Command::Close(last));
                }
            }
        }
        if queued {
            self.submit_ring_sends(&measured);
        }
        if self.dirty.is_empty() {
            // Keep the allocation for the next round.
            self.dirty = dirty;
        }
    }

    /// Submits the app ring's queued sends now, and stamps the connections in `measured` with
    /// the time the submission returned (`RingConn::sent_us`, where their write marks stop).
    fn submit_ring_sends(&mut self, measured: &[usize]) {
        let Some(ring) = self.ring.as_mut() else { return };
        if let Err(e) = ring.submit() {
            tracing::error!(shard = self.id, error = %e, "app ring: submit failed");
        }
        if measured.is_empty() {
            return;
        }
        let t = mono_us();
        for &slot in measured {
            if let Some(ConnIo::Ring(r)) = self.conns.get_mut(slot).map(|c| &mut c.io) {
                r.sent_us = t;
            }
        }
    }

    /// The ring finished a send of `buf` on a ring connection: `res` bytes went out (or the
    /// socket failed). A partial send puts the rest back in front of what queued meanwhile.
    pub fn ring_sent(&mut self, c: ConnRef, res: i32, mut buf: Vec<u8>) {
        let now = mono_ms();
        let m = &self.all_metrics[self.id as usize];
        let Some(conn) = conn_mut(&mut self.conns, c) else {
            return;
        };
        let ConnIo::Ring(r) = &mut conn.io else { return };
        r.sending = false;
        let sent_us = r.sent_us;
        conn.out_inflight = 0;
        if res < 0 {
            m.out_queue_bytes.fetch_sub(buf.len() as i64, Relaxed);
            conn.life.close(CloseReason::PeerGone);
        } else {
            let n = (res as usize).min(buf.len());
            m.bytes_out.fetch_add(n as u64, Relaxed);
            m.out_queue_bytes.fetch_sub(n as i64, Relaxed);
            wrote_at(conn, n, m, || sent_us);
            if n < buf.len() {
                // The socket took part: the rest goes first on the next turn, and the stall
                // clock runs (a peer that reads nothing becomes a slow consumer).
                buf.drain(..n);
                // The unsent rest is records already (sealed before the send).
                if let Some(sec) = conn.secure.as_deref_mut() {
                    sec.sealed += buf.len();
                }
                buf.append(&mut conn.out);
                conn.out = buf;
                if conn.life.closing.is_none() {
                    conn.life.set_write_stalled(Some(now));
                    file(&mut self.sweep_wheel, conn, c.slot, &timeouts(&self.cfg, conn.port));
                }
            } else {
                conn.life.set_write_stalled(None);
            }
        }
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(c.slot as usize);
        }
    }

    /// The task wrote what it was handed (or failed).
    pub fn written(&mut self, c: ConnRef, ok: bool) {
        let m = &self.all_metrics[self.id as usize];
        let Some(conn) = conn_mut(&mut self.conns, c) else {
            return;
        };
        let n = std::mem::take(&mut conn.out_inflight);
        m.out_queue_bytes.fetch_sub(n as i64, Relaxed);
        if ok {
            m.bytes_out.fetch_add(n as u64, Relaxed);
            wrote(conn, n, m);
            conn.life.set_write_stalled(None);
        } else {
            conn.life.close(CloseReason::PeerGone);
        }
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(c.slot as usize);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Mesh: to logic shards and back
    // ------------------------------------------------------------------------------------------

    /// Sends an input to the logic shard owning `uid`.
    #[inline]
    pub fn to_logic(&mut self, uid: u64, input: logic::Input) {
        let dest = logic::shard_of(uid, self.mesh.len());
        self.to_shard(dest, Msg::Logic(input));
    }

    /// Queues a message for `dest` (this shard included); it leaves at the end of the turn.
    pub fn to_shard(&mut self, dest: usize, msg: Msg) {
        self.outbox[dest].push(msg);
        if dest != self.id as usize && self.outbox[dest].len() >= MAX_BATCH {
            self.send_outbox_to(dest);
        }
    }

    /// Takes what this shard sent itself, to handle in place (no channel, no wake-up).
    pub fn take_own(&mut self) -> Vec<Msg> {
        std::mem::take(&mut self.outbox[self.id as usize])
    }

    /// Sends every waiting batch to the other shards. A full inbox keeps its batch here and the
    /// loop retries shortly.
    pub fn send_outbox(&mut self) {
        self.outbox_retry_ms = None;
        for dest in 0..self.mesh.len() {
            if dest != self.id as usize && !self.outbox[dest].is_empty() {
                self.send_outbox_to(dest);
            }
        }
    }

    fn send_outbox_to(&mut self, dest: usize) {
        let msgs = std::mem::take(&mut self.outbox[dest]);
        self.metrics().mesh_batches.fetch_add(1, Relaxed);
        if let Err(b) = self.mesh.try_send(dest, Batch { sent: Instant::now(), msgs }) {
            self.metrics().mesh_full.fetch_add(1, Relaxed);
            let mut back = b.msgs;
            back.append(&mut self.outbox[dest]);
            self.outbox[dest] = back;
            self.outbox_retry_ms = Some(mono_ms() + 1);
        }
    }

    /// Pairs in flight on this logic shard: waiting for their ack in a session, or (cluster
    /// mode) for the directory's answer or another node's receipt.
    pub fn pushes_in_flight(&self) -> usize {
        let cluster = self.cluster_shard.as_ref().map_or(0, |cs| cs.pairs_waiting());
        self.logic.pushes_in_flight() + cluster
    }

    /// Publishes this logic shard's pairs in flight in the shared room, giving back `reserved`,
    /// the room sidecars reserved for the push just taken (0 at the end of a turn).
    pub fn publish_in_flight(&mut self, reserved: u32) {
        let now = self.pushes_in_flight();
        let delta = now as i64 - self.published_in_flight as i64 - reserved as i64;
        self.push_room.settle(self.id as usize, delta);
        self.published_in_flight = now;
    }

    /// Publishes the logic shard's gauges.
    pub fn refresh_logic_gauges(&self) {
        let m = self.metrics();
        m.directory_sessions.store(self.logic.directory.len() as i64, Relaxed);
        m.held_sessions.store(self.logic.directory.held_count() as i64, Relaxed);
        m.pushes_in_flight.store(self.logic.pushes_in_flight() as i64, Relaxed);
        m.push_targets_waiting.store(self.fanouts.targets() as i64, Relaxed);
        m.requests_pending.store(self.logic.requests_pending() as i64, Relaxed);
        let s = self.logic.gps_stats();
        m.gps_forwarded.store(s.points_out, Relaxed);
        m.gps_coalesced.store(s.coalesced, Relaxed);
        m.gps_dropped.store(s.dropped, Relaxed);
    }
}

/// `n` bytes of `conn`'s queue were handed to the kernel: the measured frames they complete go
/// into the port's push histogram.
#[inline]
fn wrote(conn: &mut Conn, n: usize, m: &ShardMetrics) {
    wrote_at(conn, n, m, mono_us)
}

/// [`wrote`], the bytes having left at the time `at` gives (a ring send: its submission).
#[inline]
fn wrote_at(conn: &mut Conn, n: usize, m: &ShardMetrics, at: impl FnOnce() -> u64) {
    let Some(marks) = conn.marks.as_deref_mut() else { return };
    let h = if conn.port == Port::App { &m.push_delivery_us } else { &m.push_receipt_us };
    marks.wrote(n, at, h);
}

/// The timeouts of a port's connections.
fn timeouts(cfg: &Config, port: Port) -> Timeouts {
    Timeouts {
        login_ms: cfg.app.login_timeout_ms as u64,
        read_ms: cfg.app.read_timeout_ms as u64,
        idle_ms: (port == Port::App).then_some(cfg.app.idle_timeout_ms as u64),
    }
}

/// Files `conn` (at `slot`) on the sweep's wheel under its earliest deadline, unless it is filed
/// under an earlier tick already.
fn file(
    wheel: &mut std::collections::BTreeMap<u32, Vec<(u32, u32)>>,
    conn: &mut Conn,
    slot: u32,
    t: &Timeouts,
) {
    let Some(deadline) = conn.life.next_deadline(t) else { return };
    // The first tick strictly after the deadline: `expired` is true there.
    let tick = (deadline / SWEEP_MS + 1).min(u32::MAX as u64 - 1) as u32;
    if tick < conn.sweep_tick {
        conn.sweep_tick = tick;
        wheel.entry(tick).or_default().push((slot, conn.gen));
    }
}

/// The connection `c` names in `conns`, if it is still there (its slot may hold a newer one).
/// A free function, so a method can hold it beside other fields of the shard.
fn conn_mut(conns: &mut Slab<Conn>, c: ConnRef) -> Option<&mut Conn> {
    conns.get_mut(c.slot as usize).filter(|conn| conn.gen == c.gen)
}

/// `base` plus up to `base` of random jitter, so refused clients do not return in lockstep.
pub fn jitter(base: u32) -> u32 {
    base.saturating_add(rand::random_range(0..=base.max(1)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        eprintln!(
            "Conn {} Lifecycle {} ConnCtl {} Event {}",
            std::mem::size_of::<super::Conn>(),
            std::mem::size_of::<crate::lifecycle::Lifecycle>(),
            std::mem::size_of::<crate::io::ConnCtl>(),
            std::mem::size_of::<crate::io::Event>()
        );
    }
}
