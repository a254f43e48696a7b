//! The app-server side of the protocol: sidecar connections to a gate, over blocking sockets.
//!
//! [`AppServerConn::connect`] says hello synchronously, then hands the socket's read half to one
//! reader thread per connection. Everything the gate sends unasked (receipts, upstream requests,
//! GPS, unreachable users) reaches the caller as an [`Event`] through [`AppServerEvents`]; answers
//! to pushes go to whoever waits for them ([`AppServerConn::push`]) or, for pipelined pushes
//! ([`AppServerConn::push_async`]), arrive as [`Event::PushAnswer`]. Writes from the caller's
//! threads and the reader's acks share one lock per connection, one `write_all` per frame, so
//! frames never interleave.
//!
//! Receipts. The gate sends exactly one final receipt per (message_id, uid), but it may send a
//! batch again after a connection drops, and it spreads receipts over all of an app-server's
//! connections. So every (message_id, uid) a push names is registered as pending before the
//! push is written, each receipt is emitted only while its pair is pending, and the pending set
//! is shared by all connections of one group ([`AppServerConn::connect_another`] opens more). A
//! receipt for a pair that is not pending was resolved before (or never pushed from here): it is
//! dropped and counted in [`AppServerConn::duplicate_receipts`]. Each batch is acked after its
//! receipts were handed to the event queue. A broadcast's targets are not known in advance: its
//! receipts are emitted once per uid as they come, and [`PushAccepted`'s
//! `targets`](Accepted::targets) tells when all came.
//!
//! The gate going away (PROTOCOL.md §9.9). The gate keeps every receipt it owes across
//! app-server connection drops, and every Welcome carries the gate process's `incarnation`. When
//! a connection ends while others of the group stay open, [`Event::ConnectionLost`] says so and
//! the others carry on (the gate resends that connection's unacked batches on them). When the
//! group's last connection ends without the caller closing it, the group reconnects to the same
//! address: attempts with a jittered backoff (25 ms doubling to 1 s), at most
//! [`MAX_RECONNECT_ATTEMPTS`] of them and only within
//! [`ConnectOptions::reconnect_within`] (default [`DEFAULT_RECONNECT_WITHIN`], 10 s) of the loss.
//! Each attempt re-does the hello and compares the incarnation with the one the group saw first:
//!
//! - the same (non-zero) incarnation is the same gate process: every pending pair stays pending,
//!   the gate's resent batches resolve them (repeats are dropped as duplicates, and acked on the
//!   new connection), and [`Event::Reconnected`] tells the caller. Every handle the caller has
//!   not closed gets a new connection (its [`AppServerConn::conn_id`] changes).
//! - a different incarnation (the gate restarted; 0, a gate that does not announce one, never
//!   matches), or no such reconnect within the bound: the gate is lost. Every pair still pending
//!   gets a [`Outcome::GateLost`] receipt, every broadcast whose receipts may still be owed one
//!   receipt with uid 0 and GateLost (meaning: every target of that broadcast whose receipt has
//!   not come), then [`Event::GateLost`].
//!
//! A push whose answer was lost with its connection may never have reached the gate, so the
//! same gate owes nothing for it: once the group has been connected for [`UNCONFIRMED_GRACE`]
//! and that long has passed since its receipts were due (sent + TTL + 1 s), its pairs still
//! pending end as GateLost too (receipts only: the gate itself is fine).
//!
//! GateLost means "unknown": the push may or may not have been delivered, and no receipt will
//! ever be emitted for that pair. The group remembers those pairs for [`LOST_MEMORY`]: a receipt
//! for one that still comes (after [`AppServerConn::connect_another`] reopens the group to the
//! same gate, which then sends the receipts it kept) is dropped, acked, and counted in
//! [`AppServerConn::late_receipts`]. After `GateLost` the group has no connection until the caller
//! opens one with `connect_another`; a group whose handles are all closed or dropped ends, and its
//! event queue disconnects once its threads are gone. The caller closing the group's last open
//! connection ([`AppServerConn::close`], or dropping its handle) does not reconnect: what is
//! pending ends as GateLost at once.
//!
//! Bounds. The event queue holds [`EVENT_QUEUE`] events; when the caller falls behind, the
//! reader threads block, stop reading, and the gate's outbound queue to this app-server fills:
//! the gate is backpressured instead of this process growing without bound. Pipelined pushes
//! per connection are capped at [`MAX_IN_FLIGHT_PUSHES`]. The pending set holds one entry per
//! (message_id, uid) the caller pushed and not yet resolved, so it is bounded by what the caller
//! pushes within one TTL (at most 300 s, plus 1 s for the gate's last receipt); watch
//! [`AppServerConn::pending_receipts`]. The memory of lost pairs is bounded by what was pending
//! at a loss, for [`LOST_MEMORY`].

use crate::frame::{answers, FrameReader, OwnedFrame};
use crate::ClientError;
use schema::wire::{self, ErrorCode, Hop, Outcome, UidGpsPoint};
use schema::{body_kind, Body, Cmd, Encoder, FrameError, FrameType, Limits, HEADER_LEN};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most events queued for the caller before the reader threads stop reading (backpressure on
/// the gate). Large enough for a few full receipt batches, so a consumer that keeps up never
/// stalls the reader.
pub const EVENT_QUEUE: usize = 100_000;

/// Most pushes one connection may have sent without an answer yet; past it `push_async`
/// refuses with `ClientError::QueueFull`. Far more than one round trip of pipelining needs.
pub const MAX_IN_FLIGHT_PUSHES: usize = 65_536;

/// How long a group that lost its last connection tries to get back to the same gate before it
/// declares the gate lost, unless [`ConnectOptions::reconnect_within`] says otherwise.
pub const DEFAULT_RECONNECT_WITHIN: Duration = Duration::from_secs(10);

/// Most reconnect attempts after one loss, whatever the time bound.
pub const MAX_RECONNECT_ATTEMPTS: u32 = 50;

/// How long pairs reported GateLost are remembered, so a receipt for one that still comes is
/// counted as late instead of emitted: the longest TTL, with room for a gate that kept its
/// receipts while no app-server was connected.
pub const LOST_MEMORY: Duration = Duration::from_secs(600);

/// First wait before a reconnect attempt; doubled after each failed one, up to `BACKOFF_MAX`,
/// each wait jittered by ±50 % so app-servers do not come back in lockstep.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A push whose answer was lost with its connection may never have reached the gate. Once its
/// receipts were due (sent + TTL + 1 s) this much ago, with the group connected for this long,
/// its pairs still pending end as GateLost.
pub const UNCONFIRMED_GRACE: Duration = Duration::from_secs(5);
/// How often the watch over such pushes looks at them.
const UNCONFIRMED_STEP: Duration = Duration::from_millis(250);

/// The sequence-id of the hello; pushes count up from the next one.
const HELLO_SEQ: u32 = 1;
/// A Push's `ttl_ms` of 0 means this (§9.9).
const DEFAULT_TTL_MS: u32 = 30_000;
/// The longest TTL the gate accepts (§9.9); larger ones are refused with InvalidField.
const MAX_TTL_MS: u32 = 300_000;
/// The gate sends a push's last receipt at most this long after its TTL (§9.9).
const RECEIPT_SLACK: Duration = Duration::from_secs(1);
/// A broadcast's receipts are de-duplicated for this long past its last possible receipt, so a
/// batch resent after a connection drop is still recognised.
const BROADCAST_GRACE: Duration = Duration::from_secs(60);

/// What the gate announced in its AppServerWelcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// host:port of the gate node.
    pub node: String,
    /// Largest body the gate accepts on the sidecar; larger frames would close the connection,
    /// so they are refused here before sending.
    pub max_body: u32,
    /// Most uids one Push may name.
    pub max_targets: u32,
    /// The gate process's random id, the same on every connection to it; another value after a
    /// reconnect means the gate restarted. 0: a gate that does not announce one.
    pub incarnation: u64,
}

/// How a group connects and how long it tries to get back to its gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Bounds the connect, the hello, every write and every [`AppServerConn::push`].
    pub timeout: Duration,
    /// After the group's last connection ends (not closed by the caller), how long it tries to
    /// reconnect to the same gate process before every pending pair ends as GateLost. Zero: no
    /// reconnect, GateLost at once.
    pub reconnect_within: Duration,
}

impl ConnectOptions {
    /// `timeout`, and reconnects within [`DEFAULT_RECONNECT_WITHIN`].
    pub fn new(timeout: Duration) -> ConnectOptions {
        ConnectOptions { timeout, reconnect_within: DEFAULT_RECONNECT_WITHIN }
    }

    /// The same options with another reconnect bound.
    pub fn reconnect_within(self, bound: Duration) -> ConnectOptions {
        ConnectOptions { reconnect_within: bound, ..self }
    }
}

/// One push to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushSpec {
    /// The caller's id for the push; must be unique (apps show each id once). A push whose id
    /// still has pending receipts here (or was reported GateLost within [`LOST_MEMORY`]) is
    /// refused locally.
    pub message_id: u64,
    /// The target users (duplicates count once); ignored by the gate when `broadcast` is set.
    pub uids: Vec<u64>,
    /// Passed to the app verbatim; at most 16 KiB.
    pub payload: Vec<u8>,
    /// Time-to-live in ms: 0 means 30 s, at most 300 s.
    pub ttl_ms: u32,
    /// `wire::Role` value: 0 pushes to `uids`; 1 (drivers) or 2 (passengers) pushes to every
    /// session of that role.
    pub broadcast: u8,
    /// Passed to the app as `PushDelivery.kind` (1 = order offer, 2 = order status).
    pub kind: u16,
    /// The push's log-id, carried to every hop; 0 lets the gate assign one.
    pub log_id: u64,
}

/// A push the gate accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The push's id.
    pub message_id: u64,
    /// How many receipts the gate will send for it. For a broadcast, a gate may announce 0 when
    /// it does not count the targets at acceptance; the receipts tell them.
    pub targets: u32,
}

/// Why a push got no acceptance: the gate's Error frame, or a stand-in when there was no
/// usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerErrorInfo {
    /// Why the push failed (`Unknown` for a lost answer).
    pub code: ErrorCode,
    /// The hop where it failed (`Unknown` for a lost answer).
    pub origin: Hop,
    /// The gate's explanation, or what happened to the answer.
    pub message: String,
    /// For Overloaded and ShuttingDown: wait at least this long before retrying.
    pub retry_after_ms: u32,
    /// The log-id the answer echoed (0 when there was none).
    pub log_id: u64,
    /// True when the gate refused the push with an Error frame: it sends no receipts for it, and
    /// its pairs are no longer pending. False when no usable answer came (the connection ended
    /// first, or the answer did not verify): the push may have been accepted, so its pairs stay
    /// pending and still end with a receipt (GateLost if the gate is lost).
    pub refused: bool,
}

impl From<ServerErrorInfo> for ClientError {
    fn from(e: ServerErrorInfo) -> ClientError {
        ClientError::Server {
            code: e.code,
            origin: e.origin,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            log_id: e.log_id,
        }
    }
}

/// An app's request, forwarded by the gate; answer it with [`AppServerConn::reply`] (or
/// [`AppServerConn::reply_error`]), in any order, whenever ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// The gate's id for the request; echoed in the reply.
    pub request_id: u64,
    /// The requesting user, from its token.
    pub uid: u64,
    /// The requesting user's role (`wire::Role` value), from its token; the gate does not check
    /// it against `cmd`, so the app-server must.
    pub role: u8,
    /// The app's cmd number (PlaceOrder, GrabOrder, OrderStatus, BusinessRequest); kept raw so
    /// a cmd this build does not know can still be answered with an error.
    pub cmd: u16,
    /// The app's verified body, byte for byte (empty means all defaults); see
    /// [`UpstreamRequest::app_body`].
    pub body: Vec<u8>,
    /// The app's log-id; the reply carries it back.
    pub log_id: u64,
    /// The gate's sequence-id for the request; the reply carries it back.
    pub seq: u32,
    /// The connection it arrived on (see [`AppServerConn::conn_id`]); the reply must go back on
    /// it, and [`AppServerConn::reply`] sends it there whichever connection of the group it is
    /// called on.
    pub conn: u32,
}

/// A FlatBuffers table with every field at its default: what an empty body means.
static EMPTY_TABLE: [u8; 12] = [8, 0, 0, 0, 4, 0, 4, 0, 4, 0, 0, 0];

impl UpstreamRequest {
    /// The app's cmd, if this build knows it.
    pub fn app_cmd(&self) -> Option<Cmd> {
        Cmd::from_u16(self.cmd)
    }

    /// The app's body as the table its cmd names (PlaceOrder, GrabOrder, OrderStatusQuery,
    /// BusinessRequest). The gate verified it already; this verifies again, since this process
    /// trusts no bytes from the network.
    pub fn app_body(&self) -> Result<Body<'_>, FrameError> {
        let cmd = self.app_cmd().ok_or(FrameError::UnknownCmd(self.cmd))?;
        let kind = body_kind(cmd, FrameType::Request)
            .ok_or(FrameError::BadType { cmd, ty: FrameType::Request as u8 })?;
        let bytes = if self.body.is_empty() { &EMPTY_TABLE[..] } else { &self.body[..] };
        Body::verify(kind, bytes).map_err(|source| FrameError::CorruptBody { kind, source })
    }
}

/// Something the gate sent (or the end of the gate), in the order the reader threads saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The final outcome of one (message_id, uid) of a push, emitted once per pair. For a
    /// broadcast, uid 0 with outcome GateLost stands for every target whose receipt has not come
    /// (see the module docs).
    Receipt {
        /// The push's id.
        message_id: u64,
        /// The target user (0 in a broadcast's GateLost).
        uid: u64,
        /// How it ended; values this build does not know read as `Outcome::Unknown` (final,
        /// not delivered).
        outcome: Outcome,
    },
    /// An app's request to answer.
    Upstream(UpstreamRequest),
    /// Drivers' latest positions, coalesced by the gate.
    Gps(Vec<UidGpsPoint>),
    /// A user's session ended without logout (hold expired, slow consumer, shutdown).
    Unreachable {
        /// The user whose session ended.
        uid: u64,
        /// Why; unknown values read as `Outcome::Unknown`.
        outcome: Outcome,
    },
    /// The answer to a push sent with [`AppServerConn::push_async`], or to a [`AppServerConn::push`]
    /// that stopped waiting (timeout) before it came.
    PushAnswer {
        /// The connection the push was sent on.
        conn: u32,
        /// The push's sequence-id, as `push_async` returned it.
        seq: u32,
        /// The push's id.
        message_id: u64,
        /// How many receipts will follow, or why none will (see [`ServerErrorInfo::refused`]).
        result: Result<u32, ServerErrorInfo>,
    },
    /// One connection of the group ended. Its pushes still waiting for an answer got a
    /// `PushAnswer` with a lost answer first, and upstream requests that came on it can no longer
    /// be answered (the gate answered them NoAppServer). While other connections stay open they
    /// carry on (the gate resends unacked receipt batches on them); if it was the last, the group
    /// reconnects ([`Event::Reconnected`]) or declares the gate lost ([`Event::GateLost`]).
    ConnectionLost {
        /// The connection that ended.
        conn: u32,
    },
    /// The group got back to the same gate process after losing every connection: pending pairs
    /// stay pending and their receipts will come. One per handle given a new connection.
    Reconnected {
        /// The new connection (the handle's new [`AppServerConn::conn_id`]).
        conn: u32,
        /// The gate's incarnation, the same as before the loss.
        incarnation: u64,
    },
    /// The gate is lost (restarted, unreachable for the reconnect bound, or the caller closed the
    /// last connection): every pair still pending got a GateLost receipt just before this, and
    /// every broadcast still owed receipts one with uid 0. No receipt will be emitted for those
    /// pairs. The group has no connection now; [`AppServerConn::connect_another`] may reopen it.
    /// The queue disconnects once every handle is closed or dropped and the threads are gone.
    GateLost,
}

/// The receiving end of a group's events. Dropping it ends the group's connections at their
/// next event: receipts would otherwise be acked and upstream requests left unanswered with
/// nobody to see them, while the gate would resend or answer them elsewhere.
pub struct AppServerEvents {
    /// Bounded by `EVENT_QUEUE`; the reader threads hold the senders.
    rx: Receiver<Event>,
}

impl AppServerEvents {
    /// Waits for the next event; `Err` once the group ended and every event was taken.
    pub fn recv(&self) -> Result<Event, RecvError> {
        self.rx.recv()
    }

    /// Waits at most `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        self.rx.try_recv()
    }

    /// Blocks for each event in turn; ends once the group ended and every event was taken.
    pub fn iter(&self) -> mpsc::Iter<'_, Event> {
        self.rx.iter()
    }

    /// The events queued now, without waiting.
    pub fn try_iter(&self) -> mpsc::TryIter<'_, Event> {
        self.rx.try_iter()
    }
}

impl<'a> IntoIterator for &'a AppServerEvents {
    type Item = Event;
    type IntoIter = mpsc::Iter<'a, Event>;

    fn into_iter(self) -> Self::IntoIter {
        self.rx.iter()
    }
}

impl IntoIterator for AppServerEvents {
    type Item = Event;
    type IntoIter = mpsc::IntoIter<Event>;

    fn into_iter(self) -> Self::IntoIter {
        self.rx.into_iter()
    }
}

/// What a push waiter gets: the accepted targets, or why not.
type Answer = Result<u32, ServerErrorInfo>;

/// The write half of one connection, with its reusable encoder and buffer.
struct Writer {
    /// The socket (a clone of the reader's); its write timeout bounds every write.
    stream: TcpStream,
    /// Reused FlatBuffers builder for outgoing bodies.
    enc: Encoder,
    /// Reused outgoing buffer: each frame is built here, then written with one `write_all`.
    out: Vec<u8>,
}

/// One sidecar connection, shared by its handle, its reader thread and the group (for reply
/// routing).
struct Link {
    /// The group's id for this connection.
    id: u32,
    /// A clone of the socket kept outside the write lock, so `close` works even while a write
    /// is blocked (shutting down unblocks it).
    ctl: TcpStream,
    /// The write half; one frame per lock.
    writer: Mutex<Writer>,
    /// Last sequence-id handed to a push.
    seq: AtomicU32,
    /// Largest body to send: the Welcome's `max_body`.
    max_body: u32,
    /// The caller closed it ([`AppServerConn::close`] or a dropped handle): its end does not
    /// make the group reconnect.
    closed_by_caller: AtomicBool,
}

impl Link {
    /// A fresh sequence-id, never 0 (errors about events carry 0).
    fn next_seq(&self) -> u32 {
        loop {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if seq != 0 {
                return seq;
            }
        }
    }

    /// Builds one frame with `build` and writes it.
    fn send(&self, build: impl FnOnce(&mut Encoder, &mut Vec<u8>)) -> Result<(), ClientError> {
        let mut guard = lock(&self.writer);
        let Writer { stream, enc, out } = &mut *guard;
        out.clear();
        build(enc, out);
        self.check_size(out)?;
        self.write(stream, out)
    }

    /// Refuses a frame whose body is over the gate's limit: the gate would close the connection.
    fn check_size(&self, frame: &[u8]) -> Result<(), ClientError> {
        let body = frame.len().saturating_sub(HEADER_LEN);
        if body > self.max_body as usize {
            return Err(ClientError::Unexpected(format!(
                "a body of {body} bytes is over the gate's max_body of {}",
                self.max_body
            )));
        }
        Ok(())
    }

    /// Writes one whole frame. A failed write may have left part of a frame on the wire, so
    /// framing is lost: the connection is shut down, and its reader reports the end.
    fn write(&self, stream: &mut TcpStream, frame: &[u8]) -> Result<(), ClientError> {
        stream.write_all(frame).map_err(|e| {
            let _ = self.ctl.shutdown(Shutdown::Both);
            ClientError::from(e)
        })
    }
}

/// A push sent on a connection and not answered yet.
struct InFlight {
    /// The push's id, to un-register its pairs if the gate refuses it.
    message_id: u64,
    /// The `push` call waiting for the answer; `None` for `push_async` (and for a `push` that
    /// gave up waiting), whose answer becomes an event.
    waiter: Option<SyncSender<Answer>>,
    /// When the gate would have sent its last receipt had it accepted the push (sent, TTL,
    /// slack): for a push whose answer is lost with its connection.
    receipts_due: Instant,
}

/// A connection's entry in the group.
struct LinkEntry {
    /// The connection, for reply routing.
    link: Arc<Link>,
    /// Its unanswered pushes by sequence-id; at most `MAX_IN_FLIGHT_PUSHES`.
    in_flight: HashMap<u32, InFlight>,
}

/// A broadcast push whose receipts may still come.
struct Broadcast {
    /// Users whose receipt was emitted, to drop resent ones.
    seen: HashSet<u64>,
    /// The targets the gate announced in its PushAccepted; `None` until the answer came.
    targets: Option<u32>,
    /// After this no receipt can come (TTL, slack, grace); the entry is dropped.
    expires: Instant,
}

impl Broadcast {
    /// True while receipts may still be owed: no answer yet, an announced 0 (a gate that does
    /// not count broadcast targets at acceptance), or fewer receipts than announced targets.
    fn outstanding(&self) -> bool {
        match self.targets {
            None | Some(0) => true,
            Some(t) => self.seen.len() < t as usize,
        }
    }
}

/// Which pairs of one push were reported GateLost.
enum LostTargets {
    /// A push to uids: these uids.
    Uids(HashSet<u64>),
    /// A broadcast: every uid except these, whose receipts had come.
    Broadcast(HashSet<u64>),
}

/// Pairs of one push reported GateLost, remembered so that a receipt for one of them that still
/// comes is counted as late instead of emitted.
struct Lost {
    /// The pairs.
    targets: LostTargets,
    /// Forgotten after this (`LOST_MEMORY` after the report).
    expires: Instant,
}

/// What becomes of one receipt from the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    /// Its pair was pending: emit it.
    Fresh,
    /// Its pair was resolved by an earlier receipt (a resent batch), or never pushed from here.
    Duplicate,
    /// Its pair was reported GateLost.
    Late,
}

/// A handle's hold on a connection: the group gives it a new connection when it reconnects.
struct Slot {
    /// The connection the handle uses now.
    link: Mutex<Arc<Link>>,
    /// The caller closed the handle (or dropped it): the group never reconnects it.
    closed: AtomicBool,
}

impl Slot {
    /// The connection the handle uses now.
    fn link(&self) -> Arc<Link> {
        Arc::clone(&lock(&self.link))
    }

    /// False once the caller closed the handle.
    fn open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

/// State shared by a group's connections, under one lock so that registering a push and a
/// connection's end cannot interleave.
struct GroupState {
    /// Where the threads' event senders come from; `None` once the group ended.
    events: Option<SyncSender<Event>>,
    /// Open connections by id.
    links: HashMap<u32, LinkEntry>,
    /// The handles the caller has not closed (closed ones are pruned when seen).
    slots: Vec<Arc<Slot>>,
    /// The incarnation of the gate process: from the first Welcome, or from the one that
    /// reopened the group after GateLost.
    incarnation: Option<u64>,
    /// From the loss of the last connection until the reconnect succeeds or gives up.
    reconnecting: bool,
    /// Pairs awaiting their final receipt: message_id -> uids. Bounded by what the caller
    /// pushes (see the module docs).
    pending: HashMap<u64, HashSet<u64>>,
    /// Number of pairs in `pending`.
    pending_len: usize,
    /// Broadcasts whose receipts may still come, by message_id; bounded by the broadcasts the
    /// caller sends within one TTL.
    broadcasts: HashMap<u64, Broadcast>,
    /// Pushes with pairs reported GateLost, by message_id, for `LOST_MEMORY`.
    lost: HashMap<u64, Lost>,
    /// Pushes whose answer was lost with their connection (the gate may never have read them),
    /// by message_id, with when their receipts were due.
    unconfirmed: HashMap<u64, Instant>,
    /// A thread watches `unconfirmed`.
    watching: bool,
    /// Since when the group has had a connection without a break.
    up_since: Instant,
}

impl GroupState {
    /// What the receipt for (message_id, uid) is: the first one for a pending pair (emit it), a
    /// repeat, or one for a pair reported GateLost.
    fn resolve(&mut self, message_id: u64, uid: u64, now: Instant) -> Resolution {
        if let Some(uids) = self.pending.get_mut(&message_id) {
            if !uids.remove(&uid) {
                return Resolution::Duplicate;
            }
            self.pending_len -= 1;
            if uids.is_empty() {
                self.pending.remove(&message_id);
            }
            return Resolution::Fresh;
        }
        if let Some(b) = self.broadcasts.get_mut(&message_id) {
            if b.expires > now {
                return if b.seen.insert(uid) { Resolution::Fresh } else { Resolution::Duplicate };
            }
        }
        match self.lost.get(&message_id) {
            Some(l) if l.expires > now => match &l.targets {
                LostTargets::Uids(uids) if uids.contains(&uid) => Resolution::Late,
                LostTargets::Broadcast(seen) if !seen.contains(&uid) => Resolution::Late,
                _ => Resolution::Duplicate,
            },
            _ => Resolution::Duplicate,
        }
    }

    /// Forgets a push's pairs: the gate refused it, or it never reached the gate.
    fn unregister(&mut self, message_id: u64) {
        if let Some(uids) = self.pending.remove(&message_id) {
            self.pending_len -= uids.len();
        }
        self.broadcasts.remove(&message_id);
    }

    /// True while a handle the caller has not closed remains.
    fn has_open_slot(&mut self) -> bool {
        self.slots.retain(|s| s.open());
        !self.slots.is_empty()
    }

    /// Declares the gate lost: every pending pair and every broadcast still owed receipts is
    /// remembered as lost and gets a GateLost receipt (a broadcast one with uid 0), then
    /// `Event::GateLost`; returns those events in that order, for the caller to emit.
    fn declare_lost(&mut self, now: Instant) -> Vec<Event> {
        self.reconnecting = false;
        self.unconfirmed.clear();
        self.lost.retain(|_, l| l.expires > now);
        let expires = now + LOST_MEMORY;
        let mut pairs = Vec::with_capacity(self.pending_len);
        for (message_id, uids) in std::mem::take(&mut self.pending) {
            pairs.extend(uids.iter().map(|&uid| (message_id, uid)));
            self.lost.insert(message_id, Lost { targets: LostTargets::Uids(uids), expires });
        }
        self.pending_len = 0;
        pairs.sort_unstable();
        let mut broadcasts = Vec::new();
        let mut complete = HashMap::new();
        for (message_id, b) in std::mem::take(&mut self.broadcasts) {
            if b.expires <= now {
                continue;
            }
            if b.outstanding() {
                broadcasts.push(message_id);
                self.lost.insert(message_id, Lost { targets: LostTargets::Broadcast(b.seen), expires });
            } else {
                // Kept to recognise repeats of its receipts.
                complete.insert(message_id, b);
            }
        }
        self.broadcasts = complete;
        broadcasts.sort_unstable();
        let gate_lost = |(message_id, uid)| Event::Receipt { message_id, uid, outcome: Outcome::GateLost };
        let mut events: Vec<Event> = pairs.into_iter().map(gate_lost).collect();
        events.extend(broadcasts.into_iter().map(|m| gate_lost((m, 0))));
        events.push(Event::GateLost);
        events
    }

    /// Gives up on one push's pairs still pending (or a broadcast still owed receipts): they are
    /// remembered as lost and get GateLost receipts, returned for the caller to emit.
    fn give_up_on(&mut self, message_id: u64, now: Instant) -> Vec<Event> {
        let expires = now + LOST_MEMORY;
        let gate_lost = |uid| Event::Receipt { message_id, uid, outcome: Outcome::GateLost };
        if let Some(uids) = self.pending.remove(&message_id) {
            self.pending_len -= uids.len();
            let mut sorted: Vec<u64> = uids.iter().copied().collect();
            sorted.sort_unstable();
            self.lost.insert(message_id, Lost { targets: LostTargets::Uids(uids), expires });
            return sorted.into_iter().map(gate_lost).collect();
        }
        match self.broadcasts.remove(&message_id) {
            Some(b) if b.expires > now && b.outstanding() => {
                self.lost.insert(message_id, Lost { targets: LostTargets::Broadcast(b.seen), expires });
                vec![gate_lost(0)]
            }
            Some(b) => {
                self.broadcasts.insert(message_id, b);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Ends the group: nothing more is sent or reconnected, and the event queue disconnects
    /// once the threads holding a sender are gone.
    fn end(&mut self) {
        self.events = None;
        self.reconnecting = false;
        self.unconfirmed.clear();
        self.pending.clear();
        self.pending_len = 0;
        self.broadcasts.clear();
    }
}

/// What connections of one app-server share.
struct Group {
    /// The gate's address, for `connect_another` and reconnects.
    addr: SocketAddr,
    /// The sidecar secret, for `connect_another` and reconnects.
    secret: Vec<u8>,
    /// The app-server's name, for `connect_another` and reconnects.
    name: String,
    /// Connect and hello timeout, write timeout, and the longest `push` waits.
    timeout: Duration,
    /// How long to try to get back to the same gate after losing every connection.
    reconnect_within: Duration,
    /// Last connection id handed out.
    next_conn: AtomicU32,
    /// Receipts dropped because their pair was not pending.
    duplicates: AtomicU64,
    /// Receipts dropped because their pair had been reported GateLost.
    late: AtomicU64,
    /// Pending pairs, connections and their unanswered pushes.
    state: Mutex<GroupState>,
}

impl Group {
    /// Registers a push about to be written on `link`: its sequence-id and its pairs.
    fn register(
        &self,
        link: u32,
        seq: u32,
        p: &PushSpec,
        waiter: Option<SyncSender<Answer>>,
    ) -> Result<(), ClientError> {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.events.is_none() {
            return Err(ClientError::Closed);
        }
        let Some(entry) = st.links.get_mut(&link) else {
            return Err(ClientError::Closed);
        };
        if entry.in_flight.len() >= MAX_IN_FLIGHT_PUSHES {
            return Err(ClientError::QueueFull);
        }
        if entry.in_flight.contains_key(&seq) {
            // Only after 2^32 pushes with one still unanswered; the next call gets the next seq.
            return Err(ClientError::Unexpected(format!("sequence-id {seq} is still in flight")));
        }
        if !st.broadcasts.is_empty() {
            st.broadcasts.retain(|_, b| b.expires > now);
        }
        let lost = st.lost.get(&p.message_id).is_some_and(|l| l.expires > now);
        if st.pending.contains_key(&p.message_id) || st.broadcasts.contains_key(&p.message_id) || lost {
            return Err(ClientError::Unexpected(format!(
                "message_id {} still awaits receipts (or was reported GateLost); message ids must be \
                 unique",
                p.message_id
            )));
        }
        let ttl = if p.ttl_ms == 0 { DEFAULT_TTL_MS } else { p.ttl_ms.min(MAX_TTL_MS) };
        let receipts_due = now + Duration::from_millis(u64::from(ttl)) + RECEIPT_SLACK;
        if p.broadcast != 0 {
            let expires = receipts_due + BROADCAST_GRACE;
            st.broadcasts.insert(p.message_id, Broadcast { seen: HashSet::new(), targets: None, expires });
        } else if !p.uids.is_empty() {
            let uids: HashSet<u64> = p.uids.iter().copied().collect();
            st.pending_len += uids.len();
            st.pending.insert(p.message_id, uids);
        }
        entry.in_flight.insert(seq, InFlight { message_id: p.message_id, waiter, receipts_due });
        Ok(())
    }

    /// Undoes `register` for a push whose frame could not be written whole (so the gate never
    /// read it).
    fn unregister_unsent(&self, link: u32, seq: u32, message_id: u64) {
        let mut st = lock(&self.state);
        if let Some(entry) = st.links.get_mut(&link) {
            entry.in_flight.remove(&seq);
        }
        st.unregister(message_id);
    }

    /// Makes a connection that said hello part of the group and starts its reader: `revive`'s
    /// new connection, or a new handle's. A new handle is refused while the group reconnects, and
    /// when another gate process answered while the group still has connections to the one it
    /// knows; with none (after GateLost) it adopts the new incarnation. `joined` runs before the
    /// reader starts, so whatever it emits comes before the connection's events.
    fn join(
        self: &Arc<Self>,
        d: Dialed,
        revive: Option<&Arc<Slot>>,
        joined: impl FnOnce(u32),
    ) -> Result<Arc<Slot>, ClientError> {
        let Dialed { stream, frames, enc, out, welcome } = d;
        let read_half = stream.try_clone()?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let max_body = if welcome.max_body == 0 { Limits::SIDECAR.max_body } else { welcome.max_body };
        let link = Arc::new(Link {
            id,
            ctl: stream.try_clone()?,
            writer: Mutex::new(Writer { stream, enc, out }),
            seq: AtomicU32::new(HELLO_SEQ),
            max_body,
            closed_by_caller: AtomicBool::new(false),
        });
        let joining = {
            let mut guard = lock(&self.state);
            let st = &mut *guard;
            let joining = match st.events.clone() {
                // The group ended meanwhile.
                None => Err(ClientError::Closed),
                Some(events) => match revive {
                    Some(slot) if slot.open() => {
                        *lock(&slot.link) = Arc::clone(&link);
                        st.reconnecting = false;
                        Ok((Arc::clone(slot), events))
                    }
                    Some(_) => Err(ClientError::Closed),
                    None if st.reconnecting => Err(ClientError::Closed),
                    None => match st.incarnation {
                        Some(known)
                            if !st.links.is_empty()
                                && known != 0
                                && welcome.incarnation != 0
                                && known != welcome.incarnation =>
                        {
                            Err(ClientError::Unexpected(format!(
                                "another gate process answered (incarnation {:016x}, the group's is \
                                 {known:016x})",
                                welcome.incarnation
                            )))
                        }
                        _ => {
                            st.incarnation = Some(welcome.incarnation);
                            let slot = Arc::new(Slot {
                                link: Mutex::new(Arc::clone(&link)),
                                closed: AtomicBool::new(false),
                            });
                            st.slots.push(Arc::clone(&slot));
                            Ok((slot, events))
                        }
                    },
                },
            };
            if joining.is_ok() {
                if st.links.is_empty() {
                    st.up_since = Instant::now();
                }
                st.links.insert(id, LinkEntry { link: Arc::clone(&link), in_flight: HashMap::new() });
            }
            joining
        };
        let (slot, events) = match joining {
            Ok(j) => j,
            Err(e) => {
                let _ = link.ctl.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        joined(id);
        let reader = Reader { group: Arc::clone(self), link: Arc::clone(&link), events };
        let spawned = thread::Builder::new()
            .name(format!("fleetgate-sidecar-{id}"))
            .spawn(move || reader.run(read_half, frames));
        if let Err(e) = spawned {
            // The reader (moved into the failed spawn) is gone; end the connection as its thread
            // would have, so the group's bookkeeping stays whole.
            let events = lock(&self.state).events.clone();
            if let Some(events) = events {
                Reader { group: Arc::clone(self), link, events }.finish(false);
            }
            return Err(ClientError::Io(e));
        }
        Ok(slot)
    }
}

/// A connection that said hello, not yet part of a group.
struct Dialed {
    /// The socket, without a read timeout now.
    stream: TcpStream,
    /// What was read past the Welcome stays here.
    frames: FrameReader,
    /// The encoder the hello was built with.
    enc: Encoder,
    /// The buffer the hello was built in.
    out: Vec<u8>,
    /// The gate's Welcome.
    welcome: Welcome,
}

/// Says hello on a fresh socket: `write_timeout` stays on the socket for every write, `wait`
/// bounds the Welcome.
fn hello(
    stream: TcpStream,
    secret: &[u8],
    name: &str,
    write_timeout: Duration,
    wait: Duration,
) -> Result<Dialed, ClientError> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(write_timeout))?;
    stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
    let mut frames = FrameReader::new(Limits::SIDECAR);
    let mut enc = Encoder::new();
    let mut out = Vec::with_capacity(256);
    enc.frame(&mut out, FrameType::Request, Cmd::AppServerHello, HELLO_SEQ, 0, |b| {
        let secret = b.create_vector(secret);
        let name = b.create_string(name);
        wire::AppServerHello::create(b, &wire::AppServerHelloArgs { secret: Some(secret), name: Some(name) })
    });
    (&stream).write_all(&out)?;
    let mut read_half = stream.try_clone()?;
    let welcome = read_welcome(&frames.read_frame(&mut read_half)?)?;
    // From now on the reader thread waits for the gate as long as it takes: the sidecar has no
    // idle timeout, and `close` unblocks it.
    stream.set_read_timeout(None)?;
    Ok(Dialed { stream, frames, enc, out, welcome })
}

/// One sidecar connection to a gate. Cheap to share between threads by reference: every method
/// takes `&self`. Dropping it closes the connection. When the group reconnects after losing
/// every connection, the handle gets a new connection (and a new [`AppServerConn::conn_id`]).
pub struct AppServerConn {
    /// What this connection shares with the others of its group.
    group: Arc<Group>,
    /// This handle's connection, replaced when the group reconnects.
    slot: Arc<Slot>,
    /// The gate's Welcome on this handle's first connection.
    welcome: Welcome,
}

impl AppServerConn {
    /// Connects to the gate's sidecar port at `addr` (each resolved address in turn), says hello
    /// with `secret` and `name`, and starts the reader thread. `timeout` bounds the connect, the
    /// hello, every write and every [`AppServerConn::push`]; a lost gate is reconnected within
    /// [`DEFAULT_RECONNECT_WITHIN`] (see [`AppServerConn::connect_with`]).
    ///
    /// A refused hello is `ClientError::Server` with code BadSecret. The events of this
    /// connection, and of any opened with [`AppServerConn::connect_another`], arrive on the
    /// returned [`AppServerEvents`].
    pub fn connect(
        addr: impl ToSocketAddrs,
        secret: &[u8],
        name: &str,
        timeout: Duration,
    ) -> Result<(AppServerConn, AppServerEvents), ClientError> {
        AppServerConn::connect_with(addr, secret, name, ConnectOptions::new(timeout))
    }

    /// [`AppServerConn::connect`] with options: the timeout and the reconnect bound.
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        secret: &[u8],
        name: &str,
        options: ConnectOptions,
    ) -> Result<(AppServerConn, AppServerEvents), ClientError> {
        let timeout = options.timeout;
        let mut last = None;
        let mut dialed = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => {
                    dialed = Some((stream, a));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some((stream, addr)) = dialed else {
            return Err(match last {
                Some(e) => e.into(),
                None => ClientError::Unexpected("address resolved to nothing".to_owned()),
            });
        };
        let d = hello(stream, secret, name, timeout, timeout)?;
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        let group = Arc::new(Group {
            addr,
            secret: secret.to_vec(),
            name: name.to_owned(),
            timeout,
            reconnect_within: options.reconnect_within,
            next_conn: AtomicU32::new(0),
            duplicates: AtomicU64::new(0),
            late: AtomicU64::new(0),
            state: Mutex::new(GroupState {
                events: Some(tx),
                links: HashMap::new(),
                slots: Vec::new(),
                incarnation: None,
                reconnecting: false,
                pending: HashMap::new(),
                pending_len: 0,
                broadcasts: HashMap::new(),
                lost: HashMap::new(),
                unconfirmed: HashMap::new(),
                watching: false,
                up_since: Instant::now(),
            }),
        });
        let conn = AppServerConn::join_new(group, d)?;
        Ok((conn, AppServerEvents { rx }))
    }

    /// Opens one more connection to the same gate with the same secret, name and timeout. It
    /// shares this one's pending receipts and event queue, as the gate spreads receipts,
    /// upstream requests and GPS over all of an app-server's connections.
    ///
    /// After [`Event::GateLost`] this reopens the group: if the gate is the same process, the
    /// receipts it kept for pairs reported GateLost arrive and are counted in
    /// [`AppServerConn::late_receipts`]. `Closed` while the group reconnects and once it ended
    /// (every handle closed); `Unexpected` if another gate process answers while the group
    /// still has connections to the one it knows.
    pub fn connect_another(&self) -> Result<AppServerConn, ClientError> {
        {
            let st = lock(&self.group.state);
            if st.events.is_none() || st.reconnecting {
                return Err(ClientError::Closed);
            }
        }
        let g = &self.group;
        let stream = TcpStream::connect_timeout(&g.addr, g.timeout)?;
        let d = hello(stream, &g.secret, &g.name, g.timeout, g.timeout)?;
        AppServerConn::join_new(Arc::clone(g), d)
    }

    /// A new handle for a connection that said hello.
    fn join_new(group: Arc<Group>, d: Dialed) -> Result<AppServerConn, ClientError> {
        let welcome = d.welcome.clone();
        let slot = group.join(d, None, |_| {})?;
        Ok(AppServerConn { group, slot, welcome })
    }

    /// Sends a push and waits (at most the connection's timeout) for the gate's answer.
    ///
    /// Every (message_id, uid) is registered as pending before the frame is written, since
    /// receipts may arrive before the acceptance. A refusal (`ClientError::Server`: e.g.
    /// LimitExceeded, InvalidField, ShuttingDown) un-registers them: no receipts follow.
    /// On `Timeout` the pairs stay pending and the late answer arrives as
    /// [`Event::PushAnswer`]; on `Closed` after the frame was written they stay pending too (the
    /// push may have been accepted) and end with receipts, GateLost ones if the gate is lost;
    /// likewise on `Unexpected` for an answer that did not verify. `Closed` before anything was
    /// written (this handle's connection is down: the group is reconnecting, or lost) registers
    /// nothing.
    pub fn push(&self, p: &PushSpec) -> Result<Accepted, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (link, seq) = self.send_push(p, Some(tx))?;
        let answer = match rx.recv_timeout(self.group.timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Disconnected) => return Err(ClientError::Closed),
            Err(RecvTimeoutError::Timeout) => {
                // The reader hands answers over under the group lock, so either the push is
                // still in flight (and its answer will become an event) or the answer is
                // already in the channel (or the connection ended).
                let mut st = lock(&self.group.state);
                let in_flight = st.links.get_mut(&link).and_then(|e| e.in_flight.get_mut(&seq));
                if let Some(f) = in_flight {
                    f.waiter = None;
                    return Err(ClientError::Timeout);
                }
                drop(st);
                rx.try_recv().map_err(|_| ClientError::Closed)?
            }
        };
        match answer {
            Ok(targets) => Ok(Accepted { message_id: p.message_id, targets }),
            Err(e) if e.refused => Err(e.into()),
            Err(e) => Err(ClientError::Unexpected(e.message)),
        }
    }

    /// Sends a push without waiting; returns its sequence-id. The answer arrives as
    /// [`Event::PushAnswer`] with this connection's id and that sequence-id. Pairs are
    /// registered as for [`AppServerConn::push`]. `QueueFull` past `MAX_IN_FLIGHT_PUSHES`
    /// unanswered pushes on this connection.
    pub fn push_async(&self, p: &PushSpec) -> Result<u32, ClientError> {
        self.send_push(p, None).map(|(_, seq)| seq)
    }

    /// Encodes, registers and writes a push; the write lock is held from encoding to writing, so
    /// pushes go out in sequence-id order. Returns the connection id and the sequence-id.
    fn send_push(&self, p: &PushSpec, waiter: Option<SyncSender<Answer>>) -> Result<(u32, u32), ClientError> {
        let sent_at_us = now_us();
        let link = self.slot.link();
        let mut guard = lock(&link.writer);
        let seq = link.next_seq();
        let Writer { stream, enc, out } = &mut *guard;
        out.clear();
        enc.frame(out, FrameType::Request, Cmd::Push, seq, p.log_id, |b| {
            let uids = b.create_vector(&p.uids);
            let payload = b.create_vector(&p.payload);
            wire::Push::create(
                b,
                &wire::PushArgs {
                    message_id: p.message_id,
                    uids: Some(uids),
                    payload: Some(payload),
                    ttl_ms: p.ttl_ms,
                    broadcast: wire::Role(p.broadcast),
                    sent_at_us,
                    kind: p.kind,
                },
            )
        });
        link.check_size(out)?;
        self.group.register(link.id, seq, p, waiter)?;
        if let Err(e) = link.write(stream, out) {
            drop(guard);
            self.group.unregister_unsent(link.id, seq, p.message_id);
            return Err(e);
        }
        Ok((link.id, seq))
    }

    /// Answers an upstream request: an Upstream Response with the request's sequence-id and
    /// log-id, on the connection it came from. A non-zero `code` is the app-server's own and
    /// still a normal answer for the app. `Closed` if that connection has ended (the gate has
    /// answered the app NoAppServer by then).
    pub fn reply(
        &self,
        req: &UpstreamRequest,
        code: u16,
        message: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.link_of(req)?.send(|enc, out| {
            enc.frame(out, FrameType::Response, Cmd::Upstream, req.seq, req.log_id, |b| {
                let message = b.create_string(message);
                let payload = b.create_vector(payload);
                let reply = wire::Reply::create(
                    b,
                    &wire::ReplyArgs { code, message: Some(message), payload: Some(payload) },
                );
                wire::UpstreamReply::create(
                    b,
                    &wire::UpstreamReplyArgs { request_id: req.request_id, reply: Some(reply) },
                )
            })
        })
    }

    /// Answers an upstream request with an Error frame (origin AppServer), for a request the
    /// app-server cannot process (e.g. a cmd it does not know); the app gets AppServerError with
    /// `message`.
    pub fn reply_error(
        &self,
        req: &UpstreamRequest,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), ClientError> {
        self.link_of(req)?.send(|enc, out| {
            enc.error(out, req.seq, req.log_id, code, Hop::AppServer, Cmd::Upstream as u16, message, 0)
        })
    }

    /// The connection an upstream request arrived on.
    fn link_of(&self, req: &UpstreamRequest) -> Result<Arc<Link>, ClientError> {
        let st = lock(&self.group.state);
        st.links.get(&req.conn).map(|e| Arc::clone(&e.link)).ok_or(ClientError::Closed)
    }

    /// What the gate announced on this handle's first connection (a reconnect only ever goes on
    /// with the same gate process).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The id within its group of this handle's current connection (the `conn` of its events and
    /// upstream requests); a new one after the group reconnected.
    pub fn conn_id(&self) -> u32 {
        self.slot.link().id
    }

    /// Pairs of the group's pushes still awaiting their final receipt (broadcasts not included:
    /// their targets are unknown until their receipts arrive).
    pub fn pending_receipts(&self) -> usize {
        lock(&self.group.state).pending_len
    }

    /// Receipts the group dropped because their pair was not pending: resent batches, or
    /// pushes not sent from this group.
    pub fn duplicate_receipts(&self) -> u64 {
        self.group.duplicates.load(Ordering::Relaxed)
    }

    /// Receipts the group dropped (and acked) because their pair had been reported GateLost:
    /// they came from a gate the group had given up on, e.g. after `connect_another` reopened
    /// the group to the same gate process.
    pub fn late_receipts(&self) -> u64 {
        self.group.late.load(Ordering::Relaxed)
    }

    /// Pushes sent on this handle's current connection and not answered yet.
    pub fn pushes_in_flight(&self) -> usize {
        let id = self.slot.link().id;
        lock(&self.group.state).links.get(&id).map_or(0, |e| e.in_flight.len())
    }

    /// Closes this handle: shuts both directions of its connection down, and the group never
    /// reconnects it. Its reader then reports the end: [`Event::ConnectionLost`], and if it was
    /// the group's last open connection, GateLost receipts and [`Event::GateLost`] (no
    /// reconnect: the caller asked for the end).
    pub fn close(&self) -> Result<(), ClientError> {
        self.slot.closed.store(true, Ordering::Release);
        let link = {
            let mut st = lock(&self.group.state);
            // No connection and no reconnect under way (after GateLost): the last handle closed
            // ends the group.
            if st.links.is_empty() && !st.reconnecting && !st.has_open_slot() {
                st.end();
            }
            // Read under the group lock: a reconnect gives a handle its new connection under it,
            // and checks for a closed handle first.
            self.slot.link()
        };
        link.closed_by_caller.store(true, Ordering::Release);
        match link.ctl.shutdown(Shutdown::Both) {
            Err(e) if e.kind() != ErrorKind::NotConnected => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Cuts this handle's connection as a network failure would: unlike [`AppServerConn::close`],
    /// the group treats it as a drop it did not ask for, so if it was the last connection the
    /// group reconnects. For tests and failover drills.
    pub fn sever(&self) {
        let _ = self.slot.link().ctl.shutdown(Shutdown::Both);
    }
}

impl Drop for AppServerConn {
    /// Closes the handle, so its reader thread ends instead of outliving it.
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Reads the hello's answer: the Welcome, or the gate's refusal.
fn read_welcome(f: &OwnedFrame) -> Result<Welcome, ClientError> {
    if !answers(f, HELLO_SEQ) {
        return Err(ClientError::Unexpected(format!(
            "expected the hello's answer, got {:?} {:?} (seq {})",
            f.cmd, f.ty, f.header.seq
        )));
    }
    if let Some(e) = f.server_error() {
        return Err(e);
    }
    match f.body() {
        Body::AppServerWelcome(w) if f.cmd == Cmd::AppServerHello => Ok(Welcome {
            node: w.node().unwrap_or("").to_owned(),
            max_body: w.max_body(),
            max_targets: w.max_targets(),
            incarnation: w.incarnation(),
        }),
        _ => Err(ClientError::Unexpected(format!("expected an AppServerWelcome, got {:?}", f.cmd))),
    }
}

/// The receiver of events went away: the reader stops.
struct Gone;

/// What a connection's end leads to.
enum AfterEnd {
    /// Nothing more: other connections carry on, a reconnect is under way, or the group ended.
    Nothing,
    /// It was the last connection: reconnect.
    Reconnect,
    /// The gate is lost: these events (GateLost receipts, then `Event::GateLost`).
    Lost(Vec<Event>),
}

/// A connection's reader thread.
struct Reader {
    /// The group, for pending pairs and unanswered pushes.
    group: Arc<Group>,
    /// The connection read.
    link: Arc<Link>,
    /// Where events go; blocks when the caller falls behind (backpressure on the gate).
    events: SyncSender<Event>,
}

impl Reader {
    /// Reads and dispatches frames until the connection ends, then reports the end.
    fn run(self, mut stream: TcpStream, mut frames: FrameReader) {
        let gone = loop {
            let step = match frames.read_frame(&mut stream) {
                Ok(f) => self.dispatch(&f),
                Err(ClientError::Rejected { header, error }) => self.rejected(header, &error),
                // No read timeout is set after the hello; should one fire, nothing is lost.
                Err(ClientError::Timeout) => Ok(()),
                // EOF, reset, lost framing: the connection is over.
                Err(_) => break false,
            };
            if step.is_err() {
                break true;
            }
        };
        self.finish(gone);
    }

    /// Hands one event to the caller, waiting while the queue is full.
    fn emit(&self, ev: Event) -> Result<(), Gone> {
        self.events.send(ev).map_err(|_| Gone)
    }

    /// Acts on one frame from the gate. `Err` ends the connection.
    fn dispatch(&self, f: &OwnedFrame) -> Result<(), Gone> {
        match (f.ty, f.body()) {
            (FrameType::Push, Body::Receipts(r)) => self.receipts(f, r),
            (FrameType::Request, Body::Upstream(u)) => self.emit(Event::Upstream(UpstreamRequest {
                request_id: u.request_id(),
                uid: u.uid(),
                role: u.role().0,
                cmd: u.cmd(),
                body: u.body().map_or_else(Vec::new, |b| b.bytes().to_vec()),
                log_id: f.header.log_id,
                seq: f.header.seq,
                conn: self.link.id,
            })),
            (FrameType::Event, Body::GpsForward(g)) => {
                let points = g.points().map_or_else(Vec::new, |p| p.iter().copied().collect());
                self.emit(Event::Gps(points))
            }
            (FrameType::Event, Body::Unreachable(u)) => {
                self.emit(Event::Unreachable { uid: u.uid(), outcome: known_outcome(u.outcome()) })
            }
            (FrameType::Response, Body::PushAccepted(a)) => self.answer(f.header.seq, Ok(a.targets())),
            // Only errors about a Push answer one: the gate's own requests (whose answers or acks
            // it may find fault with) count sequence-ids in another space (§6).
            (FrameType::Error, Body::Error(e))
                if e.failed_cmd() == Cmd::Push as u16 || e.failed_cmd() == 0 =>
            {
                self.answer(
                    f.header.seq,
                    Err(ServerErrorInfo {
                        code: e.code(),
                        origin: e.origin(),
                        message: e.message().unwrap_or("").to_owned(),
                        retry_after_ms: e.retry_after_ms(),
                        log_id: f.header.log_id,
                        refused: true,
                    }),
                )
            }
            (FrameType::Request, _) => {
                // A request the gate should not send to an app-server; answer so it does not
                // wait for nothing.
                self.answer_request(
                    f.header.seq,
                    f.header.log_id,
                    f.header.cmd,
                    ErrorCode::NotAllowed,
                    "not an app-server request",
                )
            }
            // Anything else (a late Welcome, frames of the app port) carries nothing for us.
            _ => Ok(()),
        }
    }

    /// Emits a batch's fresh receipts, then acks the batch.
    fn receipts(&self, f: &OwnedFrame, r: wire::Receipts<'_>) -> Result<(), Gone> {
        let batch_id = r.batch_id();
        let mut fresh = Vec::new();
        let (mut duplicates, mut late) = (0, 0);
        if let Some(list) = r.receipts() {
            let now = Instant::now();
            let mut st = lock(&self.group.state);
            for rc in list.iter() {
                let (message_id, uid) = (rc.message_id(), rc.uid());
                match st.resolve(message_id, uid, now) {
                    Resolution::Fresh => fresh.push(Event::Receipt {
                        message_id,
                        uid,
                        outcome: known_outcome(Outcome(rc.outcome())),
                    }),
                    Resolution::Duplicate => duplicates += 1,
                    Resolution::Late => late += 1,
                }
            }
        }
        self.group.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.group.late.fetch_add(late, Ordering::Relaxed);
        // Events are handed over without the lock held: a full queue must not stall pushes.
        for ev in fresh {
            self.emit(ev)?;
        }
        self.link
            .send(|enc, out| {
                enc.frame(out, FrameType::Ack, Cmd::ReceiptsAck, f.header.seq, f.header.log_id, |b| {
                    wire::ReceiptsAck::create(b, &wire::ReceiptsAckArgs { batch_id })
                })
            })
            .map_err(|_| Gone)
    }

    /// Routes a push's answer to its waiter, or makes it an event. A refusal un-registers the
    /// push's pairs first, since no receipts follow it. An answer matching no unanswered push is
    /// informational (§6) and dropped.
    fn answer(&self, seq: u32, answer: Answer) -> Result<(), Gone> {
        let (message_id, unclaimed) = {
            let mut guard = lock(&self.group.state);
            let st = &mut *guard;
            let Some(f) = st.links.get_mut(&self.link.id).and_then(|e| e.in_flight.remove(&seq)) else {
                return Ok(());
            };
            match &answer {
                Err(e) if e.refused => st.unregister(f.message_id),
                Ok(targets) => {
                    if let Some(b) = st.broadcasts.get_mut(&f.message_id) {
                        b.targets = Some(*targets);
                    }
                }
                Err(_) => {}
            }
            // Handed over under the lock: `push` checks for it under the lock when it times out.
            let unclaimed = match f.waiter {
                Some(w) => match w.try_send(answer) {
                    Ok(()) => None,
                    Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => Some(a),
                },
                None => Some(answer),
            };
            (f.message_id, unclaimed)
        };
        match unclaimed {
            Some(result) => self.emit(Event::PushAnswer { conn: self.link.id, seq, message_id, result }),
            None => Ok(()),
        }
    }

    /// A frame whose body did not verify: answer a request so the gate does not wait for
    /// nothing; fail the push an acceptance was meant for, without un-registering its pairs (it
    /// may have been accepted). A corrupt Error frame cannot say what it answers, so it is
    /// dropped; a `push` waiting for it times out.
    fn rejected(&self, header: schema::Header, error: &FrameError) -> Result<(), Gone> {
        match FrameType::from_u8(header.ty) {
            Some(FrameType::Request) => self.answer_request(
                header.seq,
                header.log_id,
                header.cmd,
                ErrorCode::CorruptBody,
                &error.to_string(),
            ),
            Some(FrameType::Response) if header.cmd == Cmd::Push as u16 => self.answer(
                header.seq,
                Err(ServerErrorInfo {
                    code: ErrorCode::CorruptBody,
                    origin: Hop::Gate,
                    message: format!("the gate's answer did not verify: {error}"),
                    retry_after_ms: 0,
                    log_id: header.log_id,
                    refused: false,
                }),
            ),
            _ => Ok(()),
        }
    }

    /// Answers a gate request with an Error frame.
    fn answer_request(
        &self,
        seq: u32,
        log_id: u64,
        cmd: u16,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), Gone> {
        self.link
            .send(|enc, out| enc.error(out, seq, log_id, code, Hop::AppServer, cmd, message, 0))
            .map_err(|_| Gone)
    }

    /// Reports the connection's end: its unanswered async pushes get a lost answer (waiting
    /// `push` calls wake up with `Closed`), then `ConnectionLost`. If it was the group's last
    /// connection, the group reconnects in a thread of its own, unless the caller closed it,
    /// reconnecting is off, or no handle is left open: then the gate is lost at once. `gone`:
    /// the caller dropped the event queue, so the group ends.
    fn finish(self, gone: bool) {
        let _ = self.link.ctl.shutdown(Shutdown::Both);
        let by_caller = self.link.closed_by_caller.load(Ordering::Acquire);
        let (mut lost, watch, after) = {
            let mut st = lock(&self.group.state);
            let in_flight = st.links.remove(&self.link.id).map(|e| e.in_flight).unwrap_or_default();
            let mut lost = Vec::new();
            for (seq, f) in in_flight {
                // The gate may never have read it: watched until its receipts are overdue.
                st.unconfirmed.insert(f.message_id, f.receipts_due);
                // Dropping a waiter's sender here is what wakes its `push` with `Closed`.
                if f.waiter.is_none() {
                    lost.push((seq, f.message_id));
                }
            }
            let after = if !st.links.is_empty() || st.events.is_none() || st.reconnecting {
                AfterEnd::Nothing
            } else if gone {
                st.end();
                AfterEnd::Nothing
            } else if !by_caller && !self.group.reconnect_within.is_zero() && st.has_open_slot() {
                st.reconnecting = true;
                AfterEnd::Reconnect
            } else {
                let events = st.declare_lost(Instant::now());
                if !st.has_open_slot() {
                    st.end();
                }
                AfterEnd::Lost(events)
            };
            let watch = !st.unconfirmed.is_empty() && !st.watching && st.events.is_some();
            st.watching |= watch;
            (lost, watch, after)
        };
        if watch {
            let (group, events) = (Arc::clone(&self.group), self.events.clone());
            let spawned = thread::Builder::new()
                .name("fleetgate-sidecar-unconfirmed".to_owned())
                .spawn(move || watch_unconfirmed(&group, &events));
            if spawned.is_err() {
                // Without the watch such pairs stay pending until the gate is lost.
                lock(&self.group.state).watching = false;
            }
        }
        lost.sort_unstable();
        let conn = self.link.id;
        let lost_answer = ServerErrorInfo {
            code: ErrorCode::Unknown,
            origin: Hop::Unknown,
            message: "the connection ended before the gate answered".to_owned(),
            retry_after_ms: 0,
            log_id: 0,
            refused: false,
        };
        let mut report = lost
            .into_iter()
            .map(|(seq, message_id)| Event::PushAnswer {
                conn,
                seq,
                message_id,
                result: Err(lost_answer.clone()),
            })
            .chain(std::iter::once(Event::ConnectionLost { conn }));
        if report.try_for_each(|ev| self.emit(ev)).is_err() {
            lock(&self.group.state).end();
            return;
        }
        match after {
            AfterEnd::Nothing => {}
            AfterEnd::Lost(events) => {
                for ev in events {
                    if self.emit(ev).is_err() {
                        return;
                    }
                }
            }
            AfterEnd::Reconnect => {
                let (group, events) = (Arc::clone(&self.group), self.events.clone());
                let spawned = thread::Builder::new()
                    .name("fleetgate-sidecar-reconnect".to_owned())
                    .spawn(move || reconnect(&group, &events, conn));
                if spawned.is_err() {
                    give_up(&self.group, &self.events);
                }
            }
        }
    }
}

/// Gets a group that lost its last connection (`lost_conn`) back to the same gate process:
/// attempts with a jittered backoff, bounded by `reconnect_within` and `MAX_RECONNECT_ATTEMPTS`,
/// each a connect and a hello whose incarnation must be the one the group knows. On success the
/// handle whose connection was lost (else any open one) gets the new connection, then every other
/// open handle without one gets a connection too (one attempt each); otherwise the gate is lost.
fn reconnect(group: &Arc<Group>, events: &SyncSender<Event>, lost_conn: u32) {
    let deadline = Instant::now() + group.reconnect_within;
    let known = lock(&group.state).incarnation.unwrap_or(0);
    let mut backoff = BACKOFF_MIN;
    let mut attempts = 0;
    let dialed = loop {
        let now = Instant::now();
        if attempts >= MAX_RECONNECT_ATTEMPTS || now >= deadline {
            break None;
        }
        {
            let mut st = lock(&group.state);
            if st.events.is_none() || !st.has_open_slot() {
                break None;
            }
        }
        thread::sleep(jitter(backoff).min(deadline - now));
        backoff = (backoff * 2).min(BACKOFF_MAX);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        attempts += 1;
        let wait = group.timeout.min(left);
        let attempt = TcpStream::connect_timeout(&group.addr, wait)
            .map_err(ClientError::from)
            .and_then(|s| hello(s, &group.secret, &group.name, group.timeout, wait));
        match attempt {
            // The same process: what it owes will come.
            Ok(d) if known != 0 && d.welcome.incarnation == known => break Some(d),
            // Another process (the gate restarted): what the old one owed is gone.
            Ok(_) => break None,
            // Not up (yet), refused, or too slow: try again.
            Err(_) => {}
        }
    };
    let Some(d) = dialed else {
        give_up(group, events);
        return;
    };
    let slots = {
        let mut st = lock(&group.state);
        st.has_open_slot();
        let mut slots = st.slots.clone();
        // The handle whose connection was lost first.
        slots.sort_by_key(|s| s.link().id != lost_conn);
        slots
    };
    let Some((first, others)) = slots.split_first() else {
        give_up(group, events);
        return;
    };
    let reconnected = |conn| {
        let _ = events.send(Event::Reconnected { conn, incarnation: known });
    };
    if group.join(d, Some(first), reconnected).is_err() {
        give_up(group, events);
        return;
    }
    for slot in others {
        let down = !lock(&group.state).links.contains_key(&slot.link().id);
        if !down || !slot.open() {
            continue;
        }
        let again = TcpStream::connect_timeout(&group.addr, group.timeout)
            .map_err(ClientError::from)
            .and_then(|s| hello(s, &group.secret, &group.name, group.timeout, group.timeout));
        match again {
            Ok(d) if d.welcome.incarnation == known => {
                // Best effort: a handle that gets no connection here answers `Closed`.
                let _ = group.join(d, Some(slot), reconnected);
            }
            _ => {}
        }
    }
}

/// Watches pushes whose answer was lost with their connection: once the group has been
/// connected for `UNCONFIRMED_GRACE` and such a push's receipts were due that long ago, the gate
/// never read it or its receipts are gone: its pairs still pending end as GateLost (without
/// `Event::GateLost`: the gate itself is fine). Ends when nothing is watched or the group ended.
fn watch_unconfirmed(group: &Group, events: &SyncSender<Event>) {
    loop {
        thread::sleep(UNCONFIRMED_STEP);
        let now = Instant::now();
        let lost = {
            let mut st = lock(&group.state);
            if st.events.is_none() || st.unconfirmed.is_empty() {
                st.watching = false;
                return;
            }
            if st.reconnecting || st.links.is_empty() || now < st.up_since + UNCONFIRMED_GRACE {
                continue;
            }
            let mut overdue: Vec<u64> = st
                .unconfirmed
                .iter()
                .filter(|(_, &due)| now >= due + UNCONFIRMED_GRACE)
                .map(|(&m, _)| m)
                .collect();
            overdue.sort_unstable();
            let mut lost = Vec::new();
            for m in overdue {
                st.unconfirmed.remove(&m);
                lost.extend(st.give_up_on(m, now));
            }
            lost
        };
        for ev in lost {
            if events.send(ev).is_err() {
                lock(&group.state).watching = false;
                return;
            }
        }
    }
}

/// The reconnect failed (or could not start): the gate is lost. The group ends if no handle is
/// left open.
fn give_up(group: &Group, events: &SyncSender<Event>) {
    let lost = {
        let mut st = lock(&group.state);
        if st.events.is_none() {
            return;
        }
        let lost = st.declare_lost(Instant::now());
        if !st.has_open_slot() {
            st.end();
        }
        lost
    };
    for ev in lost {
        if events.send(ev).is_err() {
            return;
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so app-servers that lost the same gate do not
/// come back in lockstep.
fn jitter(d: Duration) -> Duration {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos()));
    let r = h.finish() % 1_000;
    d.mul_f64(0.5 + r as f64 / 1_000.0)
}

/// An outcome as the caller should read it: values this build does not know are Unknown
/// (final, not delivered), per §9.11.
fn known_outcome(o: Outcome) -> Outcome {
    if o.variant_name().is_some() {
        o
    } else {
        Outcome::Unknown
    }
}

/// Locks a mutex, going on after a panic elsewhere: every critical section here leaves the state
/// consistent between statements that can panic, and the reader must still report the end.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wall-clock µs since the Unix epoch, for `Push.sent_at_us` (apps measure latency with it).
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::wire::{GpsPoint, Receipt, Role};
    use std::net::TcpListener;
    use std::sync::mpsc::channel;
    use std::thread::JoinHandle;

    const T: Duration = Duration::from_secs(5);
    const SECRET: &[u8] = b"dev-secret";

    /// The fake gate's end of one sidecar connection.
    struct Side {
        /// The accepted socket.
        s: TcpStream,
        /// Frames from the client.
        r: FrameReader,
        /// Builds the gate's bodies.
        e: Encoder,
        /// Reused outgoing buffer.
        out: Vec<u8>,
    }

    impl Side {
        fn read(&mut self) -> OwnedFrame {
            self.r.read_frame(&mut self.s).expect("a frame from the client")
        }

        fn send(&mut self, build: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
            self.out.clear();
            build(&mut self.e, &mut self.out);
            self.s.write_all(&self.out).expect("write to the client");
        }

        /// Reads a Push request and checks its frame fields.
        fn read_push(&mut self) -> (OwnedFrame, u64, Vec<u64>) {
            let f = self.read();
            assert_eq!((f.cmd, f.ty), (Cmd::Push, FrameType::Request));
            let Body::Push(p) = f.body() else { panic!("not a Push body") };
            let uids = p.uids().map(|u| u.iter().collect()).unwrap_or_default();
            let message_id = p.message_id();
            (f, message_id, uids)
        }

        fn accept_push(&mut self, req: &OwnedFrame, message_id: u64, targets: u32) {
            self.send(|e, o| {
                e.frame(o, FrameType::Response, Cmd::Push, req.seq(), req.log_id(), |b| {
                    wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id, targets })
                })
            });
        }

        fn refuse(&mut self, req: &OwnedFrame, code: ErrorCode, message: &str) {
            self.send(|e, o| {
                e.error(o, req.seq(), req.log_id(), code, Hop::App, Cmd::Push as u16, message, 0)
            });
        }

        fn receipts(&mut self, seq: u32, batch_id: u64, rs: &[(u64, u64, Outcome)]) {
            let rs: Vec<Receipt> = rs.iter().map(|&(m, u, o)| Receipt::new(m, u, o.0, 0, 0, 0)).collect();
            self.send(|e, o| {
                e.frame(o, FrameType::Push, Cmd::Receipts, seq, 0x5EC, |b| {
                    let receipts = b.create_vector(&rs);
                    wire::Receipts::create(b, &wire::ReceiptsArgs { batch_id, receipts: Some(receipts) })
                })
            });
        }

        /// Reads the client's ack of a receipts batch: same seq and log-id, its batch_id.
        fn expect_ack(&mut self, seq: u32, batch_id: u64) {
            let ack = self.read();
            assert_eq!(
                (ack.cmd, ack.ty, ack.seq(), ack.log_id()),
                (Cmd::ReceiptsAck, FrameType::Ack, seq, 0x5EC)
            );
            assert!(matches!(ack.body(), Body::ReceiptsAck(a) if a.batch_id() == batch_id), "{ack:?}");
        }

        /// Reads the ack of a batch and a Push, in either order: a caller may push as soon as it
        /// has the batch's receipts, before the reader thread wrote the ack. Returns the Push.
        fn ack_and_push(&mut self, seq: u32, batch_id: u64) -> OwnedFrame {
            let (a, b) = (self.read(), self.read());
            let (ack, push) = if a.cmd == Cmd::ReceiptsAck { (a, b) } else { (b, a) };
            assert_eq!(
                (ack.cmd, ack.ty, ack.seq(), ack.log_id()),
                (Cmd::ReceiptsAck, FrameType::Ack, seq, 0x5EC)
            );
            assert!(matches!(ack.body(), Body::ReceiptsAck(r) if r.batch_id() == batch_id), "{ack:?}");
            assert_eq!((push.cmd, push.ty), (Cmd::Push, FrameType::Request), "{push:?}");
            push
        }

        #[allow(clippy::too_many_arguments)]
        fn upstream(
            &mut self,
            seq: u32,
            log_id: u64,
            request_id: u64,
            uid: u64,
            role: Role,
            cmd: u16,
            body: &[u8],
        ) {
            self.send(|e, o| {
                e.frame(o, FrameType::Request, Cmd::Upstream, seq, log_id, |b| {
                    let body = b.create_vector(body);
                    wire::Upstream::create(
                        b,
                        &wire::UpstreamArgs { request_id, uid, role, cmd, body: Some(body) },
                    )
                })
            });
        }

        /// Reads the client's Upstream Response: same seq and log-id; returns (request_id, code,
        /// message, payload).
        fn expect_reply(&mut self, seq: u32, log_id: u64) -> (u64, u16, String, Vec<u8>) {
            let f = self.read();
            assert_eq!((f.cmd, f.ty, f.seq(), f.log_id()), (Cmd::Upstream, FrameType::Response, seq, log_id));
            let Body::UpstreamReply(u) = f.body() else { panic!("not an UpstreamReply: {f:?}") };
            let r = u.reply().expect("a Reply table");
            (
                u.request_id(),
                r.code(),
                r.message().unwrap_or("").to_owned(),
                r.payload().map(|p| p.bytes().to_vec()).unwrap_or_default(),
            )
        }
    }

    /// The incarnation the fake gate announces unless a test says otherwise.
    const INCARNATION: u64 = 0x1AC4_0000_0000_0007;

    /// Accepts one sidecar connection and answers its hello: a Welcome announcing `max_body`
    /// for the right secret; Error BadSecret and a close (then `None`) for a wrong one.
    fn accept(l: &TcpListener, max_body: u32) -> Option<Side> {
        accept_as(l, max_body, INCARNATION)
    }

    /// [`accept`] for a gate process of the given incarnation.
    fn accept_as(l: &TcpListener, max_body: u32, incarnation: u64) -> Option<Side> {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut side = Side { s, r: FrameReader::new(Limits::SIDECAR), e: Encoder::new(), out: Vec::new() };
        let hello = side.read();
        assert_eq!((hello.cmd, hello.ty), (Cmd::AppServerHello, FrameType::Request));
        let Body::AppServerHello(h) = hello.body() else { panic!("not a hello body") };
        assert_eq!(h.name(), Some("dispatch-1"));
        if h.secret().map(|s| s.bytes()) != Some(SECRET) {
            side.send(|e, o| {
                e.error(
                    o,
                    hello.seq(),
                    hello.log_id(),
                    ErrorCode::BadSecret,
                    Hop::App,
                    Cmd::AppServerHello as u16,
                    "bad secret",
                    0,
                )
            });
            return None;
        }
        side.send(|e, o| {
            e.frame(o, FrameType::Response, Cmd::AppServerHello, hello.seq(), hello.log_id(), |b| {
                let node = b.create_string("127.0.0.1:7100");
                wire::AppServerWelcome::create(
                    b,
                    &wire::AppServerWelcomeArgs {
                        node: Some(node),
                        max_body,
                        max_targets: 50_000,
                        incarnation,
                    },
                )
            })
        });
        Some(side)
    }

    fn fake_gate(script: impl FnOnce(TcpListener) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, thread::spawn(move || script(listener)))
    }

    fn next(events: &AppServerEvents) -> Event {
        events.recv_timeout(T).expect("an event")
    }

    /// Options with a short reconnect bound, for fake gates that go away for good.
    fn short_reconnect(timeout: Duration) -> ConnectOptions {
        ConnectOptions::new(timeout).reconnect_within(Duration::from_millis(200))
    }

    fn spec(message_id: u64, uids: &[u64]) -> PushSpec {
        PushSpec {
            message_id,
            uids: uids.to_vec(),
            payload: b"order 77".to_vec(),
            ttl_ms: 30_000,
            broadcast: 0,
            kind: 1,
            log_id: 0xF00 + message_id,
        }
    }

    fn receipt(message_id: u64, uid: u64, outcome: Outcome) -> Event {
        Event::Receipt { message_id, uid, outcome }
    }

    fn point(i: u64) -> UidGpsPoint {
        UidGpsPoint::new(
            40 + i,
            &GpsPoint::new(1_700_000_000_000 + i, 399_042_000, 1_164_074_000, 120, 9000, 50, 0),
        )
    }

    #[test]
    fn wrong_secret_is_refused_with_bad_secret() {
        let (addr, gate) = fake_gate(|l| assert!(accept(&l, 1 << 20).is_none()));
        match AppServerConn::connect(addr, b"not-the-secret", "dispatch-1", T) {
            Err(ClientError::Server { code: ErrorCode::BadSecret, origin: Hop::App, .. }) => {}
            Err(other) => panic!("expected BadSecret, got {other:?}"),
            Ok(_) => panic!("expected BadSecret, got a connection"),
        }
        gate.join().expect("fake gate");
    }

    #[test]
    fn pushes_receipts_upstream_gps_and_gate_lost() {
        let (addr, gate) = fake_gate(|l| {
            let mut g = accept(&l, 8 << 20).expect("hello");

            // A push, accepted.
            let (p, message_id, uids) = g.read_push();
            assert_eq!((message_id, uids.as_slice(), p.log_id()), (5, &[42, 43, 44][..], 0xF05));
            let Body::Push(body) = p.body() else { panic!("not a Push") };
            assert_eq!(body.payload().map(|b| b.bytes()), Some(&b"order 77"[..]));
            assert_eq!((body.ttl_ms(), body.broadcast(), body.kind()), (30_000, Role::Unknown, 1));
            assert!(body.sent_at_us() > 1_700_000_000_000_000, "sent_at_us is the wall clock in µs");
            g.accept_push(&p, 5, 3);

            // A batch, then the same batch again (as after a drop); both acked.
            let batch = [(5, 42, Outcome::Delivered), (5, 43, Outcome::Offline)];
            g.receipts(3, 1, &batch);
            g.expect_ack(3, 1);
            g.receipts(4, 1, &batch);
            g.expect_ack(4, 1);

            // An upstream request, answered with a reply; one with an unknown cmd, answered with
            // an error.
            let place = {
                let mut e = Encoder::new();
                e.body(|b| {
                    wire::PlaceOrder::create(
                        b,
                        &wire::PlaceOrderArgs {
                            from_lat_e7: 1,
                            from_lon_e7: 2,
                            to_lat_e7: 3,
                            to_lon_e7: 4,
                            payload: None,
                        },
                    )
                })
                .to_vec()
            };
            g.upstream(77, 0x9999, 9, 42, Role::Passenger, Cmd::PlaceOrder as u16, &place);
            assert_eq!(g.expect_reply(77, 0x9999), (9, 0, "ok".to_owned(), b"order 1".to_vec()));
            g.upstream(78, 0x9998, 10, 43, Role::Driver, 0x7777, &[]);
            let err = g.read();
            assert_eq!(
                (err.cmd, err.ty, err.seq(), err.log_id()),
                (Cmd::Error, FrameType::Error, 78, 0x9998)
            );
            let ev = err.error().expect("error view");
            assert_eq!(
                (ev.code, ev.origin, ev.message),
                (ErrorCode::UnknownCmd, Hop::AppServer, "no such request")
            );

            // Two refused pushes: one pipelined, one waited for.
            let (p6, message_id, _) = g.read_push();
            assert_eq!(message_id, 6);
            g.refuse(&p6, ErrorCode::LimitExceeded, "too many targets");
            let (p7, message_id, _) = g.read_push();
            assert_eq!(message_id, 7);
            g.refuse(&p7, ErrorCode::InvalidField, "ttl_ms over 300000");

            // GPS, an unreachable user, the last receipt of push 5 and one for a push never sent.
            g.send(|e, o| {
                e.frame(o, FrameType::Event, Cmd::GpsForward, 0, 0, |b| {
                    let points = b.create_vector(&[point(0), point(1)]);
                    wire::GpsForward::create(b, &wire::GpsForwardArgs { points: Some(points) })
                });
                e.frame(o, FrameType::Event, Cmd::Unreachable, 0, 0, |b| {
                    wire::Unreachable::create(
                        b,
                        &wire::UnreachableArgs { uid: 42, outcome: Outcome::HoldExpired },
                    )
                });
            });
            g.receipts(5, 2, &[(5, 44, Outcome::TtlExpired), (99, 1, Outcome::Delivered)]);

            // A pipelined push whose first receipt beats its acceptance; then the gate goes away
            // with its second receipt still owed. The client may send it before the ack of the
            // batch above: the caller pushes as soon as it has that batch's receipt.
            let p8 = g.ack_and_push(5, 2);
            let Body::Push(push8) = p8.body() else { panic!("not a Push: {p8:?}") };
            let uids: Vec<u64> = push8.uids().map(|u| u.iter().collect()).unwrap_or_default();
            assert_eq!((push8.message_id(), uids.as_slice()), (8, &[60, 61][..]));
            g.receipts(6, 3, &[(8, 60, Outcome::Delivered)]);
            g.accept_push(&p8, 8, 2);
            g.expect_ack(6, 3);
        });

        let (conn, events) =
            AppServerConn::connect_with(addr, SECRET, "dispatch-1", short_reconnect(T)).expect("connect");
        assert_eq!(
            conn.welcome(),
            &Welcome {
                node: "127.0.0.1:7100".to_owned(),
                max_body: 8 << 20,
                max_targets: 50_000,
                incarnation: INCARNATION
            }
        );
        assert_eq!(
            conn.push(&spec(5, &[42, 43, 44])).expect("push 5"),
            Accepted { message_id: 5, targets: 3 }
        );
        assert_eq!(next(&events), receipt(5, 42, Outcome::Delivered));
        assert_eq!(next(&events), receipt(5, 43, Outcome::Offline));

        // The resent batch added nothing; the upstream request comes next.
        let Event::Upstream(req) = next(&events) else { panic!("expected the upstream request") };
        assert_eq!((conn.duplicate_receipts(), conn.pending_receipts()), (2, 1));
        assert_eq!(
            (req.request_id, req.uid, req.role, req.app_cmd(), req.log_id, req.seq, req.conn),
            (9, 42, Role::Passenger.0, Some(Cmd::PlaceOrder), 0x9999, 77, conn.conn_id())
        );
        let Ok(Body::PlaceOrder(po)) = req.app_body() else { panic!("not a PlaceOrder body") };
        assert_eq!((po.from_lat_e7(), po.to_lon_e7()), (1, 4));
        conn.reply(&req, 0, "ok", b"order 1").expect("reply");
        let Event::Upstream(unknown) = next(&events) else { panic!("expected the second request") };
        assert_eq!(unknown.app_cmd(), None);
        assert!(matches!(unknown.app_body(), Err(FrameError::UnknownCmd(0x7777))));
        conn.reply_error(&unknown, ErrorCode::UnknownCmd, "no such request").expect("reply error");

        // A pipelined refusal comes as an event, a waited-for one as the call's error; neither
        // leaves pairs pending, and a message id still pending is refused before sending.
        let seq6 = conn.push_async(&spec(6, &[50, 51])).expect("push 6");
        match next(&events) {
            Event::PushAnswer { conn: c, seq, message_id: 6, result: Err(e) } => {
                assert_eq!((c, seq), (conn.conn_id(), seq6));
                assert_eq!(
                    (e.code, e.origin, e.message.as_str(), e.log_id, e.refused),
                    (ErrorCode::LimitExceeded, Hop::App, "too many targets", 0xF06, true)
                );
            }
            other => panic!("expected push 6's refusal, got {other:?}"),
        }
        assert!(matches!(
            conn.push(&spec(7, &[52])),
            Err(ClientError::Server { code: ErrorCode::InvalidField, log_id: 0xF07, .. })
        ));
        assert!(matches!(conn.push(&spec(5, &[44])), Err(ClientError::Unexpected(_))));
        assert_eq!((conn.pending_receipts(), conn.pushes_in_flight()), (1, 0));

        assert_eq!(next(&events), Event::Gps(vec![point(0), point(1)]));
        assert_eq!(next(&events), Event::Unreachable { uid: 42, outcome: Outcome::HoldExpired });
        assert_eq!(next(&events), receipt(5, 44, Outcome::TtlExpired));
        assert_eq!(conn.duplicate_receipts(), 3);
        assert_eq!(conn.pending_receipts(), 0);

        let seq8 = conn.push_async(&spec(8, &[60, 61])).expect("push 8");
        assert_eq!(next(&events), receipt(8, 60, Outcome::Delivered));
        assert_eq!(
            next(&events),
            Event::PushAnswer { conn: conn.conn_id(), seq: seq8, message_id: 8, result: Ok(2) }
        );
        // The gate went away for good: no reconnect within the bound.
        assert_eq!(next(&events), Event::ConnectionLost { conn: conn.conn_id() });
        assert_eq!(next(&events), receipt(8, 61, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);
        gate.join().expect("fake gate");

        // The gate is lost: nothing can be sent, and the pairs are resolved.
        assert_eq!(conn.pending_receipts(), 0);
        assert!(matches!(conn.push(&spec(9, &[1])), Err(ClientError::Closed)));
        assert!(matches!(conn.reply(&req, 0, "late", b""), Err(ClientError::Closed)));
        assert!(matches!(conn.push(&spec(8, &[61])), Err(ClientError::Closed)));
        // Closing the last handle ends the group: the queue disconnects.
        conn.close().expect("closing a closed connection is fine");
        assert!(matches!(events.recv_timeout(T), Err(RecvTimeoutError::Disconnected)));
        assert!(matches!(conn.connect_another(), Err(ClientError::Closed)));
    }

    #[test]
    fn connections_of_a_group_share_receipts_and_route_replies() {
        let (addr, gate) = fake_gate(|l| {
            let mut a = accept(&l, 8 << 20).expect("hello a");
            let mut b = accept(&l, 8 << 20).expect("hello b");
            let (p, _, _) = a.read_push();
            a.accept_push(&p, 1, 2);
            // The receipt comes on the other connection; the batch is resent on the first.
            b.receipts(1, 10, &[(1, 10, Outcome::Delivered)]);
            b.expect_ack(1, 10);
            a.receipts(1, 10, &[(1, 10, Outcome::Delivered)]);
            a.expect_ack(1, 10);
            b.upstream(5, 0x55, 3, 7, Role::Driver, Cmd::GrabOrder as u16, &[]);
            assert_eq!(b.expect_reply(5, 0x55), (3, 0, "taken".to_owned(), Vec::new()));
            drop(b);
            // The first connection still works after the second is gone.
            let (p, _, _) = a.read_push();
            a.accept_push(&p, 2, 0);
        });
        let (a, events) =
            AppServerConn::connect_with(addr, SECRET, "dispatch-1", short_reconnect(T)).expect("connect a");
        let b = a.connect_another().expect("connect b");
        assert_ne!(a.conn_id(), b.conn_id());
        assert_eq!(a.push(&spec(1, &[10, 11])).expect("push 1").targets, 2);
        assert_eq!(next(&events), receipt(1, 10, Outcome::Delivered));
        let Event::Upstream(req) = next(&events) else { panic!("expected the upstream request") };
        assert_eq!(req.conn, b.conn_id());
        assert_eq!((a.duplicate_receipts(), b.pending_receipts()), (1, 1));
        // Answered through the other handle: it goes back on the connection it came from.
        a.reply(&req, 0, "taken", b"").expect("reply");
        assert_eq!(next(&events), Event::ConnectionLost { conn: b.conn_id() });
        assert!(matches!(b.push(&spec(3, &[1])), Err(ClientError::Closed)));
        assert_eq!(a.push(&spec(2, &[20])).expect("push 2").targets, 0);
        gate.join().expect("fake gate");
        assert_eq!(next(&events), Event::ConnectionLost { conn: a.conn_id() });
        assert_eq!(next(&events), receipt(1, 11, Outcome::GateLost));
        assert_eq!(next(&events), receipt(2, 20, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);
    }

    #[test]
    fn a_late_answer_becomes_an_event_and_oversized_pushes_stay_local() {
        let (go_on, wait) = channel::<()>();
        let (addr, gate) = fake_gate(move |l| {
            let mut g = accept(&l, 1024).expect("hello");
            let (p, _, _) = g.read_push();
            wait.recv().expect("the client gave up waiting");
            g.accept_push(&p, 1, 1);
            // A broadcast: its receipts come for whoever was online, once each.
            let (p, _, uids) = g.read_push();
            assert!(uids.is_empty());
            assert!(matches!(p.body(), Body::Push(b) if b.broadcast() == Role::Driver));
            g.accept_push(&p, 2, 2);
            let batch = [(2, 70, Outcome::Delivered), (2, 71, Outcome::Offline)];
            g.receipts(1, 1, &batch);
            g.expect_ack(1, 1);
            g.receipts(2, 1, &batch);
            g.expect_ack(2, 1);
            g.send(|e, o| {
                e.frame(o, FrameType::Event, Cmd::GpsForward, 0, 0, |b| {
                    wire::GpsForward::create(b, &wire::GpsForwardArgs { points: None })
                })
            });
            // Closed by the client.
            assert!(matches!(g.r.read_frame(&mut g.s), Err(ClientError::Closed)));
        });
        let short = Duration::from_millis(500);
        let (conn, events) = AppServerConn::connect(addr, SECRET, "dispatch-1", short).expect("connect");
        assert_eq!(conn.welcome().max_body, 1024);
        let mut big = spec(3, &[1]);
        big.payload = vec![0; 2048];
        assert!(matches!(conn.push(&big), Err(ClientError::Unexpected(_))));
        assert_eq!(conn.pending_receipts(), 0);

        assert!(matches!(conn.push(&spec(1, &[1])), Err(ClientError::Timeout)));
        assert_eq!((conn.pending_receipts(), conn.pushes_in_flight()), (1, 1));
        go_on.send(()).expect("gate waits");
        match next(&events) {
            Event::PushAnswer { message_id: 1, result: Ok(1), .. } => {}
            other => panic!("expected the late acceptance, got {other:?}"),
        }

        let mut all = spec(2, &[]);
        all.broadcast = Role::Driver.0;
        assert_eq!(conn.push(&all).expect("broadcast").targets, 2);
        assert_eq!(next(&events), receipt(2, 70, Outcome::Delivered));
        assert_eq!(next(&events), receipt(2, 71, Outcome::Offline));
        assert!(matches!(conn.push(&all), Err(ClientError::Unexpected(_))), "a broadcast id is tracked too");
        // The resent batch added nothing: GPS (no points) comes next.
        assert_eq!(next(&events), Event::Gps(Vec::new()));
        assert_eq!(conn.duplicate_receipts(), 2);
        conn.close().expect("close");
        // Closed by the caller: no reconnect. The broadcast owes nothing (both of its announced
        // targets' receipts came); push 1's receipt does.
        assert_eq!(next(&events), Event::ConnectionLost { conn: conn.conn_id() });
        assert_eq!(next(&events), receipt(1, 1, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);
        gate.join().expect("fake gate");
    }

    #[test]
    fn a_reconnect_to_the_same_gate_keeps_pairs_pending_until_their_receipts() {
        let (addr, gate) = fake_gate(|l| {
            let mut g = accept(&l, 8 << 20).expect("hello");
            let (p, _, _) = g.read_push();
            g.accept_push(&p, 1, 2);
            g.receipts(2, 41, &[(1, 10, Outcome::Delivered)]);
            // The connection breaks before the ack; the same gate process takes the reconnect,
            // resends the unacked batch and then the receipt it kept.
            drop(g);
            let mut g = accept(&l, 8 << 20).expect("the reconnect's hello");
            g.receipts(1, 41, &[(1, 10, Outcome::Delivered), (1, 11, Outcome::TtlExpired)]);
            // The ack, and the reconnected handle's push on its new connection.
            let p = g.ack_and_push(1, 41);
            assert!(matches!(p.body(), Body::Push(b) if b.message_id() == 2), "{p:?}");
            g.accept_push(&p, 2, 1);
        });
        let (conn, events) = AppServerConn::connect(addr, SECRET, "dispatch-1", T).expect("connect");
        let first = conn.conn_id();
        assert_eq!(conn.push(&spec(1, &[10, 11])).expect("push 1").targets, 2);
        assert_eq!(next(&events), receipt(1, 10, Outcome::Delivered));
        assert_eq!(next(&events), Event::ConnectionLost { conn: first });
        let Event::Reconnected { conn: second, incarnation } = next(&events) else {
            panic!("expected the reconnect")
        };
        assert_eq!((second, incarnation), (conn.conn_id(), INCARNATION));
        assert_ne!(second, first);
        // The pending pair got its real receipt, and the repeat of the first was dropped.
        assert_eq!(next(&events), receipt(1, 11, Outcome::TtlExpired));
        assert_eq!((conn.duplicate_receipts(), conn.late_receipts(), conn.pending_receipts()), (1, 0, 0));
        assert_eq!(conn.push(&spec(2, &[12])).expect("push 2 after the reconnect").targets, 1);
        gate.join().expect("fake gate");
        conn.close().expect("close");
        assert_eq!(next(&events), Event::ConnectionLost { conn: second });
        assert_eq!(next(&events), receipt(2, 12, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);
        assert!(matches!(events.recv_timeout(T), Err(RecvTimeoutError::Disconnected)));
    }

    #[test]
    fn a_restarted_gate_ends_pending_pairs_and_owed_broadcasts_as_gate_lost() {
        let (addr, gate) = fake_gate(|l| {
            let mut g = accept(&l, 8 << 20).expect("hello");
            let (p, _, _) = g.read_push();
            g.accept_push(&p, 1, 2);
            // A broadcast announced with 0 targets (a gate that does not count them): one
            // receipt came, more may be owed.
            let (p, _, _) = g.read_push();
            g.accept_push(&p, 2, 0);
            g.receipts(1, 51, &[(2, 70, Outcome::Delivered)]);
            // A broadcast whose one announced target's receipt came: it owes nothing.
            let p = g.ack_and_push(1, 51);
            g.accept_push(&p, 3, 1);
            g.receipts(2, 52, &[(3, 71, Outcome::Offline)]);
            // A push never answered: its pairs stay pending too.
            let _ = g.ack_and_push(2, 52);
            drop(g);
            // Another process answers on the same address: the client closes it.
            let mut g = accept_as(&l, 8 << 20, INCARNATION + 1).expect("the reconnect's hello");
            assert!(matches!(g.r.read_frame(&mut g.s), Err(ClientError::Closed)));
        });
        let (conn, events) = AppServerConn::connect(addr, SECRET, "dispatch-1", T).expect("connect");
        let started = Instant::now();
        assert_eq!(conn.push(&spec(1, &[10, 11])).expect("push 1").targets, 2);
        let broadcast = |message_id| {
            let mut b = spec(message_id, &[]);
            b.broadcast = Role::Driver.0;
            conn.push(&b)
        };
        assert_eq!(broadcast(2).expect("broadcast 2").targets, 0);
        assert_eq!(next(&events), receipt(2, 70, Outcome::Delivered));
        assert_eq!(broadcast(3).expect("broadcast 3").targets, 1);
        assert_eq!(next(&events), receipt(3, 71, Outcome::Offline));
        let seq4 = conn.push_async(&spec(4, &[12])).expect("push 4");
        let lost = ServerErrorInfo {
            code: ErrorCode::Unknown,
            origin: Hop::Unknown,
            message: "the connection ended before the gate answered".to_owned(),
            retry_after_ms: 0,
            log_id: 0,
            refused: false,
        };
        let first = conn.conn_id();
        assert_eq!(
            next(&events),
            Event::PushAnswer { conn: first, seq: seq4, message_id: 4, result: Err(lost) }
        );
        assert_eq!(next(&events), Event::ConnectionLost { conn: first });
        assert_eq!(next(&events), receipt(1, 10, Outcome::GateLost));
        assert_eq!(next(&events), receipt(1, 11, Outcome::GateLost));
        assert_eq!(next(&events), receipt(4, 12, Outcome::GateLost));
        assert_eq!(next(&events), receipt(2, 0, Outcome::GateLost), "the broadcast still owed receipts");
        assert_eq!(next(&events), Event::GateLost);
        assert!(started.elapsed() < DEFAULT_RECONNECT_WITHIN, "a restart is known at once, not at the bound");
        assert_eq!(conn.pending_receipts(), 0);
        gate.join().expect("fake gate");
        // Lost message ids are not reused.
        assert!(matches!(conn.push(&spec(1, &[10])), Err(ClientError::Closed | ClientError::Unexpected(_))));
    }

    #[test]
    fn receipts_for_pairs_reported_gate_lost_are_late_and_not_emitted() {
        let (addr, gate) = fake_gate(|l| {
            let mut g = accept(&l, 8 << 20).expect("hello");
            let (p, _, _) = g.read_push();
            g.accept_push(&p, 1, 2);
            let (p, _, _) = g.read_push();
            g.accept_push(&p, 2, 0);
            g.receipts(1, 61, &[(1, 10, Outcome::Delivered), (2, 70, Outcome::Delivered)]);
            g.expect_ack(1, 61);
            drop(g);
            // The caller reopens the group to the same process after GateLost; the gate sends
            // what it kept: receipts for pairs already reported lost, and repeats.
            let mut g = accept(&l, 8 << 20).expect("hello again");
            let late = [
                (1, 10, Outcome::Delivered),
                (1, 11, Outcome::Delivered),
                (2, 70, Outcome::Delivered),
                (2, 71, Outcome::Offline),
                (2, 72, Outcome::Delivered),
            ];
            g.receipts(1, 62, &late);
            g.expect_ack(1, 62);
            g.send(|e, o| {
                e.frame(o, FrameType::Event, Cmd::GpsForward, 0, 0, |b| {
                    wire::GpsForward::create(b, &wire::GpsForwardArgs { points: None })
                })
            });
        });
        // No reconnect at all: the first drop is GateLost at once.
        let options = ConnectOptions::new(T).reconnect_within(Duration::ZERO);
        let (conn, events) =
            AppServerConn::connect_with(addr, SECRET, "dispatch-1", options).expect("connect");
        conn.push(&spec(1, &[10, 11])).expect("push 1");
        let mut all = spec(2, &[]);
        all.broadcast = Role::Passenger.0;
        conn.push(&all).expect("broadcast 2");
        assert_eq!(next(&events), receipt(1, 10, Outcome::Delivered));
        assert_eq!(next(&events), receipt(2, 70, Outcome::Delivered));
        assert_eq!(next(&events), Event::ConnectionLost { conn: conn.conn_id() });
        assert_eq!(next(&events), receipt(1, 11, Outcome::GateLost));
        assert_eq!(next(&events), receipt(2, 0, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);

        let again = conn.connect_another().expect("reopen the group");
        assert_eq!(again.welcome().incarnation, INCARNATION);
        // Nothing of the batch is emitted: 11, 71 and 72 were reported lost (late), 10 and 70
        // had their receipts (repeats).
        assert_eq!(next(&events), Event::Gps(Vec::new()));
        assert_eq!((again.late_receipts(), again.duplicate_receipts()), (3, 2));
        gate.join().expect("fake gate");
    }

    #[test]
    fn a_push_the_gate_may_never_have_read_ends_gate_lost_once_overdue() {
        let (addr, gate) = fake_gate(|l| {
            let mut g = accept(&l, 8 << 20).expect("hello");
            // Read, never answered: the connection breaks first (the gate may or may not have
            // taken it). The same process takes the reconnect and owes nothing for it.
            let _ = g.read_push();
            drop(g);
            let mut g = accept(&l, 8 << 20).expect("the reconnect's hello");
            g.s.set_read_timeout(Some(UNCONFIRMED_GRACE * 3)).expect("timeout");
            let (p, message_id, _) = g.read_push();
            assert_eq!(message_id, 2);
            g.accept_push(&p, 2, 1);
        });
        let (conn, events) = AppServerConn::connect(addr, SECRET, "dispatch-1", T).expect("connect");
        let mut short = spec(1, &[10]);
        short.ttl_ms = 100;
        let seq = conn.push_async(&short).expect("push 1");
        let first = conn.conn_id();
        assert!(matches!(
            next(&events),
            Event::PushAnswer { conn: c, seq: s, message_id: 1, result: Err(ServerErrorInfo { refused: false, .. }) }
                if (c, s) == (first, seq)
        ));
        assert_eq!(next(&events), Event::ConnectionLost { conn: first });
        assert!(matches!(next(&events), Event::Reconnected { incarnation: INCARNATION, .. }));
        let reconnected = Instant::now();
        assert_eq!(conn.pending_receipts(), 1);
        // Overdue: receipts due 1.1 s after the push, plus the grace, with the group connected.
        let ev = events.recv_timeout(UNCONFIRMED_GRACE * 2).expect("the overdue pair's outcome");
        assert_eq!(ev, receipt(1, 10, Outcome::GateLost));
        assert!(reconnected.elapsed() >= UNCONFIRMED_GRACE - Duration::from_millis(200));
        assert_eq!(conn.pending_receipts(), 0);
        // The gate itself is fine: no Event::GateLost, and pushes go on.
        assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(conn.push(&spec(2, &[11])).expect("push 2").targets, 1);
        gate.join().expect("fake gate");
    }
}
