//! The Redis side of fleetgate's multi-node directory: which node holds each user's session,
//! and which nodes are alive. Several gate nodes share one Redis server or a Redis Cluster.
//!
//! # Why a thread of its own
//! The gate's shards are glommio executors. fred 10.1's `glommio` feature runs commands on a
//! glommio executor only while every fred timeout is zero: its timeout helper calls
//! `tokio::time::timeout`, which panics outside a tokio runtime (and `quit()` still goes through
//! it). A directory that must fail fast needs timeouts, so fred runs here on **one std thread
//! with a tokio current-thread runtime**, and the shards reach it over a bounded crossbeam
//! channel ([`Handle::send`], which never blocks). Results come back through the callback the
//! gate supplies, **one call per batch** of results: waking a parked glommio executor from
//! another thread costs tens of µs (35–65 µs median measured on the project's machines), so the
//! gate should pay it once per batch, not once per result.
//!
//! The thread drains every batch queued since its last turn and runs all their claims, moves,
//! releases and lookups as **one fred pipeline**: a login storm costs one Redis round trip per
//! drain (one per cluster primary touched, in parallel), not one per login. While a pipeline is
//! out, new batches queue and go out together in the next one. A drain is bounded (8,192 Redis
//! commands; a larger single batch goes as several pipelines, one after the other). Redis
//! commands per command: one per claim, move and release, one per uid looked up
//! ([`Handle::ops`]); lease upkeep is counted apart ([`Handle::upkeep_ops`]).
//!
//! # Keys
//! | key | type | what |
//! | --- | --- | --- |
//! | `fg:u:{<uid>}` | hash `node`, `epoch`, `shard` | the directory entry of `uid`: who holds its session. No TTL: an entry points to a node by name, and whether that node lives is its lease's business. |
//! | `fg:node:<name>` | string, `PX lease_ms` | the lease of node `<name>`: its [`NodeInfo`] as JSON, rewritten every `lease_ms / 3`. |
//! | `fg:nodes` | set | names of nodes that held a lease, so nodes find each other's lease keys (read one by one, pipelined, as they may live on different cluster slots). |
//!
//! Every script touches one key, so everything works on a Redis Cluster. An epoch is stored as
//! 20 zero-padded decimal digits; the scripts compare two of them as two 10-digit halves, each
//! exact in a Lua double, so comparisons are exact over the whole `u64` range (not only below
//! 2^53).
//!
//! # Scripts (EVALSHA, loaded on every primary at each connect, re-loaded on `NOSCRIPT`)
//! - claim (`Cmd::Claim`): writes (this node, epoch, shard) iff the entry is absent or holds a
//!   smaller epoch; a claim equal to the stored entry (same node, same epoch) is a repeat and
//!   wins without change, so re-registration after an outage and retries are harmless.
//! - move (`Cmd::Move`): compare-and-set from exactly (from.node, from.epoch) to (this node,
//!   new_epoch, shard); refuses a new epoch that is smaller. A session taken over by another
//!   node keeps its epoch (the app's resume token names it), so equal is allowed.
//! - release (`Cmd::Release`): deletes the entry iff it is exactly (this node, epoch).
//!
//! Lookups are plain `HMGET`s in the same pipeline.
//!
//! # TLS
//! `rediss://` goes through fred's rustls (ring provider). fred trusts the system's CA
//! certificates; [`Config::tls_roots`] ([`TlsRoots`], read from a PEM file) replaces them with
//! exactly the CAs given, for a Redis whose certificate a private CA signed. A certificate that
//! does not check out keeps the directory down, the status detail carrying rustls's reason.
//!
//! # Connection loss
//! fred runs without a reconnect policy of its own: this thread owns reconnection (backoff from
//! 100 ms doubling to 2 s), so "down" is one clear state in which every command is answered at
//! once with [`Event::Unavailable`] instead of waiting inside fred's router (with fred's policy
//! the client still reads as connected during its first backoff sleep, and commands queue
//! inside it). Only commands queued during a connect attempt wait for its outcome, bounded by
//! fred's connect and setup timeouts (`command_timeout_ms` each). A command in flight when
//! the connection drops, or slower than `command_timeout_ms`, also gets `Unavailable` (it may
//! have applied: the scripts make a repeat harmless). On return, scripts are loaded, releases
//! that failed meanwhile are replayed (they are compare-and-set, so a late one is harmless) and
//! the lease is rewritten before [`Event::Status`] says up with `reregister: true`. A lease
//! that could not be renewed for `lease_ms` (Redis hung, not closed) also counts as a loss.

mod layout;
mod tls;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

pub use layout::{lease_key, node_channel, uid_key, NODES_KEY};
pub use tls::TlsRoots;

/// How to reach Redis, and the directory's timings.
#[derive(Clone, Debug)]
pub struct Config {
    /// `redis://[[user]:password@]host:port` (a single server, or any node of a Redis Cluster:
    /// cluster mode is detected at connect), `rediss://` for TLS, or fred's explicit
    /// `redis-cluster://host:port[?node=host:port…]` / `rediss-cluster://`.
    pub url: String,
    /// Time-to-live of this node's lease. Renewed every `lease_ms / 3`; a node whose lease lapses
    /// leaves every node's [`Event::Nodes`] within about `lease_ms + lease_ms / 3`.
    pub lease_ms: u64,
    /// Bound on one pipeline (and on connecting): past it the commands get
    /// [`Event::Unavailable`].
    pub command_timeout_ms: u64,
    /// Bound on batches waiting for the thread ([`Handle::send`] returns [`Full`] past it).
    pub max_queue: usize,
    /// The CA certificates a `rediss://` (or `rediss-cluster://`) connection trusts, and only
    /// those. `None`: fred's default, the system's CA certificates (see [`TlsRoots`]). Refused
    /// with a URL that is not TLS, whose traffic these would never protect.
    pub tls_roots: Option<TlsRoots>,
}

impl Config {
    /// Default lease (3 s), command timeout (500 ms) and queue (1,024 batches); the system's
    /// CA certificates for TLS.
    pub fn new(url: impl Into<String>) -> Config {
        Config { url: url.into(), lease_ms: 3000, command_timeout_ms: 500, max_queue: 1024, tls_roots: None }
    }
}

/// What a node tells the others about itself, stored in its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name: directory entries point to it. Unique among live nodes.
    pub name: String,
    /// Where apps reach it (the gate's `--advertise`).
    pub app_addr: String,
    /// Where other nodes reach it (node-to-node link).
    pub link_addr: String,
    /// Whether an app-server is connected to it now.
    pub has_appserver: bool,
    /// Random per process start, so a node restarted under the same name is told apart.
    pub incarnation: u64,
}

impl NodeInfo {
    /// A fresh random incarnation number.
    pub fn new_incarnation() -> u64 {
        rand::random()
    }
}

/// The holder of a session, as stored in its directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The node's name.
    pub node: String,
    /// The session's epoch.
    pub epoch: u64,
    /// The gate shard holding it on that node.
    pub shard: u16,
}

/// A request to the directory. Commands of one [`Handle::send`] run in order, and in order with
/// those of earlier sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// A new session of `uid` on this node (a login). Wins iff `epoch` > the stored epoch (or
    /// the entry already is exactly this claim). Answered by [`Event::Claimed`].
    Claim { uid: u64, epoch: u64, shard: u16 },
    /// A session moved here from `from` (a cross-node resume): applies only if the stored entry
    /// is exactly (`from.node`, `from.epoch`) and `new_epoch > from.epoch`; stores (this node,
    /// `new_epoch`, `shard`). Answered by [`Event::Moved`].
    Move { uid: u64, from: Owner, new_epoch: u64, shard: u16, tag: u64 },
    /// The session ended here: deletes the entry only if it is (this node, `epoch`). No answer;
    /// one that fails is logged and replayed after the next reconnect.
    Release { uid: u64, epoch: u64 },
    /// Who holds these uids (one pipelined `HMGET` each). Answered by [`Event::Looked`].
    Lookup { uids: Vec<u64>, tag: u64 },
    /// This node's advertised facts changed: the lease is rewritten now. The name and the
    /// incarnation never change (those of [`Handle::start`] stay); the rest is taken. No answer.
    Advertise(NodeInfo),
    /// Bytes for node `node`, published on its channel ([`layout::node_channel`], sharded
    /// pub/sub). No answer: delivery is not guaranteed (a node that is not subscribed at that
    /// moment misses it), so what needs an answer carries its own deadline.
    Publish { node: String, bytes: Vec<u8> },
}

/// What the directory tells the gate, in batches through the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The answer to a [`Cmd::Claim`]. `previous`: when won, the entry it replaced (another
    /// node's, or an older epoch; `None` when there was none or it was this very claim); when
    /// lost, the newer current owner.
    Claimed { uid: u64, epoch: u64, won: bool, previous: Option<Owner> },
    /// The answer to a [`Cmd::Move`]: `current` is the entry as it stands after the attempt
    /// (this node's when `ok`).
    Moved { tag: u64, uid: u64, ok: bool, current: Option<Owner> },
    /// The answer to a [`Cmd::Lookup`], in the order asked.
    Looked { tag: u64, owners: Vec<(u64, Option<Owner>)> },
    /// A command could not run (Redis unreachable, slow, or the handle stopping); it may or may
    /// not have applied. `tag` is set for moves and lookups, `uid` and `epoch` for claims and
    /// moves (`epoch`: the claim's, or the move's new epoch).
    Unavailable { tag: Option<u64>, uid: Option<u64>, epoch: Option<u64>, retry_after_ms: u64, why: String },
    /// Connection state. Up after (re)connecting, once scripts are loaded and the lease is
    /// written; `reregister: true` on every Up that follows a Down (the gate re-claims its local
    /// sessions; a claim equal to the stored entry is a harmless repeat). Down when lost, or when
    /// the first attempt at start fails.
    Status { up: bool, reregister: bool, detail: String },
    /// The live nodes (lease present), this node included, sorted by name. Sent after every Up
    /// and whenever the list changes (checked every `lease_ms / 3`).
    Nodes(Vec<NodeInfo>),
    /// Bytes another node published on this node's channel.
    Message(Vec<u8>),
}

/// The receiver of events: called on the directory's thread, once per batch of events.
pub type Sink = Box<dyn Fn(Vec<Event>) + Send>;

/// Why [`Handle::start`] refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL does not parse, or names a deployment this crate does not support.
    #[error("bad Redis URL {url:?}: {why}")]
    Url { url: String, why: String },
    /// A setting is out of range.
    #[error("bad directory setting: {0}")]
    Config(String),
    /// The CA file for TLS to Redis cannot be used ([`TlsRoots::from_pem_file`]).
    #[error("Redis CA file {}: {why}", path.display())]
    Ca { path: std::path::PathBuf, why: String },
    /// The thread or its runtime could not be created.
    #[error("cannot start the directory thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// [`Handle::send`] refused: the queue holds `max_queue` batches (or the thread has ended).
/// The commands come back so the caller can fail them fast.
#[derive(Debug)]
pub struct Full(pub Vec<Cmd>);

/// State shared between the [`Handle`] and the thread; all cheap to read.
struct Shared {
    /// Wakes the thread: a batch was queued, or it must stop. A stored permit covers a wake-up
    /// sent while the thread was busy.
    wake: tokio::sync::Notify,
    /// Up as last reported in [`Event::Status`].
    up: AtomicBool,
    /// The detail of the last status, for /healthz.
    detail: Mutex<String>,
    /// Redis commands issued for [`Cmd`]s.
    ops: AtomicU64,
    /// Redis commands issued for upkeep: connecting, scripts, leases, the node list.
    upkeep_ops: AtomicU64,
    /// [`RUN`], [`STOP_RELEASE`] or [`STOP_ABANDON`].
    stop: AtomicU8,
}

const RUN: u8 = 0;
/// Stop, deleting the lease.
const STOP_RELEASE: u8 = 1;
/// Stop as a crash would: the lease is left to lapse.
const STOP_ABANDON: u8 = 2;

/// The gate's end of the directory: a bounded queue into the fred thread.
pub struct Handle {
    /// Batches to the thread.
    tx: Sender<Vec<Cmd>>,
    /// See [`Shared`].
    shared: Arc<Shared>,
    /// The thread, until joined.
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the thread ends, so a stop waits for it with a bound.
    ended: Receiver<()>,
    /// Bound on waiting for the thread at a stop.
    stop_wait: Duration,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("status", &self.status()).field("ops", &self.ops()).finish()
    }
}

impl Handle {
    /// Checks the settings, spawns the thread and returns at once: Redis need not be reachable
    /// (the thread reports [`Event::Status`] down and retries with backoff). `sink` receives
    /// every event, on the thread, in batches.
    pub fn start(cfg: Config, me: NodeInfo, sink: Sink) -> Result<Handle, Error> {
        let redis = worker::redis_config(&cfg.url, cfg.tls_roots.as_ref())?;
        if me.name.is_empty() || me.name.len() > 200 || me.name.chars().any(|c| c.is_whitespace()) {
            return Err(Error::Config(format!("node name {:?}: 1 to 200 bytes, no spaces", me.name)));
        }
        if cfg.lease_ms < 30 || cfg.command_timeout_ms == 0 || cfg.max_queue == 0 {
            return Err(Error::Config(format!(
                "lease_ms {} (at least 30), command_timeout_ms {} and max_queue {} (at least 1)",
                cfg.lease_ms, cfg.command_timeout_ms, cfg.max_queue
            )));
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let shared = Arc::new(Shared {
            wake: tokio::sync::Notify::new(),
            up: AtomicBool::new(false),
            detail: Mutex::new("connecting".into()),
            ops: AtomicU64::new(0),
            upkeep_ops: AtomicU64::new(0),
            stop: AtomicU8::new(RUN),
        });
        let (tx, rx) = crossbeam_channel::bounded(cfg.max_queue);
        let (ended_tx, ended) = crossbeam_channel::bounded::<()>(0);
        // The thread's longest uninterruptible stretch is a connect attempt or a lease renewal
        // (each bounded by a few command timeouts), then the final drain and lease delete.
        let stop_wait = Duration::from_millis(cfg.command_timeout_ms.saturating_mul(8) + 1000);
        let name = format!("fg-redis-{}", me.name);
        let worker = worker::Worker::new(cfg, redis, me, sink, rx, shared.clone());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            runtime.block_on(worker.run());
            drop(ended_tx);
        })?;
        Ok(Handle { tx, shared, thread: Some(thread), ended, stop_wait })
    }

    /// Queues a batch without blocking. [`Full`] hands the batch back when `max_queue` batches
    /// are waiting (or the thread has ended): the caller fails those commands fast.
    pub fn send(&self, cmds: Vec<Cmd>) -> Result<(), Full> {
        if cmds.is_empty() {
            return Ok(());
        }
        match self.tx.try_send(cmds) {
            Ok(()) => {
                self.shared.wake.notify_one();
                Ok(())
            }
            Err(TrySendError::Full(c) | TrySendError::Disconnected(c)) => Err(Full(c)),
        }
    }

    /// Up (as last reported) and the detail of the last status change, for /healthz.
    pub fn status(&self) -> (bool, String) {
        let detail = self.shared.detail.lock().map(|d| d.clone()).unwrap_or_default();
        (self.shared.up.load(Ordering::Relaxed), detail)
    }

    /// Redis commands issued for commands so far: one per claim, move and release (plus a
    /// second on a `NOSCRIPT` reload), one per uid looked up. Lease upkeep is counted apart
    /// ([`Handle::upkeep_ops`]), so this divides cleanly by logins or pushes.
    pub fn ops(&self) -> u64 {
        self.shared.ops.load(Ordering::Relaxed)
    }

    /// Redis commands issued for upkeep: connecting, loading scripts, lease renewals (3 per
    /// renewal plus one `GET` per other node), stop.
    pub fn upkeep_ops(&self) -> u64 {
        self.shared.upkeep_ops.load(Ordering::Relaxed)
    }

    /// Stops the thread: commands still queued run (or get [`Event::Unavailable`] when Redis is
    /// down), the lease is deleted (best effort), and the thread is joined; all bounded by a
    /// few command timeouts.
    pub fn stop(mut self) {
        self.finish(STOP_RELEASE);
    }

    fn finish(&mut self, how: u8) {
        let Some(thread) = self.thread.take() else { return };
        self.shared.stop.store(how, Ordering::Relaxed);
        self.shared.wake.notify_one();
        // The thread drops its end when it is done; a timeout leaves it detached.
        match self.ended.recv_timeout(self.stop_wait) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    wait_ms = self.stop_wait.as_millis() as u64,
                    "redis thread did not stop in time; left running"
                );
            }
            _ => {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Handle {
    /// Dropping without [`Handle::stop`] ends the thread as a crash would: queued commands get
    /// [`Event::Unavailable`], the connection closes, and the lease is left to lapse (within
    /// `lease_ms`).
    fn drop(&mut self) {
        self.finish(STOP_ABANDON);
    }
}
