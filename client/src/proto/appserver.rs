//! The app-server side of the sidecar protocol (PROTOCOL.md §5.5, §6, §7, §8, §9.7–§9.12,
//! §9.14) as a state machine without I/O: a [`Session`] is one app-server's group of sidecar
//! connections to one gate.
//!
//! # Driving it
//!
//! The owner opens TCP connections when told to, moves bytes, and reads the clock:
//!
//! - commands: [`Session::open`] (a new handle: one of the caller's connections, which keeps its
//!   identity across reconnects), [`Session::push`], [`Session::end_session`],
//!   [`Session::reply`], [`Session::reply_error`], [`Session::close`], [`Session::abandon`];
//! - inputs: [`Session::dialed`] / [`Session::dial_failed`] (the outcome of an
//!   [`Action::Connect`]), [`Session::handle_input`] (bytes received on a connection),
//!   [`Session::connection_lost`] (end of stream, reset, failed write), and
//!   [`Session::handle_timeout`] once [`Session::poll_timeout`] has passed;
//! - outputs: [`Session::transmit`] (the bytes to write on a connection, whole frames in order),
//!   [`Session::poll_action`] (open a connection, close one), [`Session::poll_event`] (what the
//!   caller hears about: receipts, push answers, upstream requests, GPS, unreachable users,
//!   connections lost, reconnects, the gate lost), [`Session::poll_end_answer`] (the answers to
//!   EndSession, for the call that waits for each) and [`Session::take_opened`] (how a new
//!   handle's hello ended).
//!
//! Every input and command may produce output; the owner polls after each one. The event queue
//! grows by what one input produces, so an owner that polls events between inputs keeps it
//! bounded.
//!
//! # The rules it owns
//!
//! **Hello.** Every connection starts with AppServerHello (sequence-id 1) and must get its
//! AppServerWelcome within the timeout; an Error answer is the gate's refusal (BadSecret). The
//! group records the incarnation of its first Welcome (§9.8). A new handle is refused while the
//! group reconnects, and when another gate process (another non-zero incarnation) answers while
//! the group has connections to the one it knows; with none (after GateLost) it adopts the new
//! one.
//!
//! **Pushes and receipts.** Every (message_id, uid) a push names is pending from the moment the
//! push is queued (receipts may beat the PushAccepted), in one set shared by every connection (the
//! gate spreads receipts over them and resends an unacked batch on another). Each receipt is
//! emitted only while its pair is pending, so exactly once; a repeat is dropped and counted
//! ([`Session::duplicate_receipts`]). Every Receipts batch is acked, repeats too, with its
//! sequence-id, log-id and batch_id, but only once the events of its receipts have been polled:
//! a batch is acked after the caller has it. A refusal (an Error frame about the push) ends the
//! push's pairs (no receipts follow). A broadcast's targets are unknown until its receipts come;
//! its PushAccepted tells how many to expect (0: a gate that does not count them).
//!
//! **Sequence-ids.** Pushes and EndSession requests count up from 2 per connection, never 0,
//! never one still in flight; answers are matched by sequence-id on their connection. An
//! EndSession whose connection ends before its answer gets a lost answer (the gate may or may
//! not have ended the session: asking again is harmless). Errors about other cmds answer nothing
//! of ours and are dropped (§6).
//!
//! **Upstream requests** are remembered with the connection they came on; the reply goes back on
//! it, once. A request the gate should not send, or one that does not verify, is answered with an
//! Error frame at once.
//!
//! **The gate going away (§9.9).** When a connection ends, its unanswered pushes get a
//! [`Event::PushAnswer`] with a lost answer (they stay pending: the gate may have taken them),
//! then [`Event::ConnectionLost`]. While other connections are up they carry on. When the last
//! one ends (not closed by the caller), the group reconnects: attempts after a jittered backoff
//! (25 ms doubling to 1 s, ±50 %), at most [`MAX_RECONNECT_ATTEMPTS`], within
//! `reconnect_within` of the loss. A Welcome with the same non-zero incarnation is the same
//! process: pairs stay pending, [`Event::Reconnected`] names the new connection, and every other
//! open handle gets one attempt at a connection of its own. Another incarnation (or 0), or no
//! such Welcome within the bound: the gate is lost. Every pair still pending ends with a
//! GateLost receipt, every broadcast whose receipts may still be owed with one GateLost receipt
//! of uid 0, then [`Event::GateLost`]. The caller closing its last connection ends what is
//! pending the same way, without reconnecting.
//!
//! **Overdue pushes.** A push whose answer was lost may never have been read by the gate, which
//! then owes nothing for it: once the group has been connected for [`UNCONFIRMED_GRACE`] and that
//! long has passed since its receipts were due (sent + TTL + 1 s), its pairs still pending end
//! as GateLost (no [`Event::GateLost`]: the gate itself is fine).
//!
//! **Late receipts.** Pairs reported GateLost are remembered for [`LOST_MEMORY`]; a receipt
//! for one that still comes (the same process reached again after the bound) is acked, dropped
//! and counted ([`Session::late_receipts`]).
//!
//! **Bounds.** Pending pairs ([`MAX_PENDING_PAIRS`]), broadcasts tracked ([`MAX_BROADCASTS`]),
//! pushes in flight per connection ([`MAX_IN_FLIGHT_PUSHES`]) and bytes waiting to be written
//! ([`MAX_OUTBOX`]) refuse new pushes with `QueueFull` when full; remembered lost pairs
//! ([`MAX_LOST_PAIRS`]) and upstream requests awaiting a reply ([`MAX_UPSTREAM`]) forget the
//! oldest.

use crate::ClientError;
use schema::wire::{self, ErrorCode, Hop, Outcome, UidGpsPoint};
use schema::{
    body_kind, decode, Body, Cmd, Decoded, Encoder, Frame, FrameError, FrameType, Header, Limits, HEADER_LEN,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Most pushes one connection may have sent without an answer yet; past it a push is refused
/// with `ClientError::QueueFull`. Far more than one round trip of pipelining needs.
pub const MAX_IN_FLIGHT_PUSHES: usize = 65_536;

/// How long a group that lost its last connection tries to get back to the same gate before it
/// declares the gate lost, unless configured otherwise.
pub const DEFAULT_RECONNECT_WITHIN: Duration = Duration::from_secs(10);

/// Most reconnect attempts after one loss, whatever the time bound.
pub const MAX_RECONNECT_ATTEMPTS: u32 = 50;

/// How long pairs reported GateLost are remembered, so a receipt for one that still comes is
/// counted as late instead of emitted: the longest TTL, with room for a gate that kept its
/// receipts while no app-server was connected.
pub const LOST_MEMORY: Duration = Duration::from_secs(600);

/// A push whose answer was lost with its connection may never have reached the gate. Once its
/// receipts were due (sent + TTL + 1 s) this much ago, with the group connected for this long,
/// its pairs still pending end as GateLost.
pub const UNCONFIRMED_GRACE: Duration = Duration::from_secs(5);

/// Most (message_id, uid) pairs pending at once; a push that would pass it is refused with
/// `QueueFull`.
pub const MAX_PENDING_PAIRS: usize = 1 << 22;

/// Most broadcasts tracked at once (until their last receipt could come, plus a grace); past it a
/// broadcast is refused with `QueueFull`.
pub const MAX_BROADCASTS: usize = 65_536;

/// Most pairs remembered as lost (a broadcast's entry counts the receipts that had come); past
/// it the oldest reports are forgotten first.
pub const MAX_LOST_PAIRS: usize = 1 << 22;

/// Most upstream requests awaiting a reply per connection; past it the oldest is forgotten (the
/// gate has answered it Timeout long before), and a reply to it is refused locally.
pub const MAX_UPSTREAM: usize = 65_536;

/// Most bytes waiting to be written on one connection before pushes and replies are refused with
/// `QueueFull` (acks are never refused).
pub const MAX_OUTBOX: usize = 16 << 20;

/// Most EndSession requests one connection may have sent without an answer; past it one is
/// refused with `QueueFull`.
pub const MAX_IN_FLIGHT_ENDS: usize = 4096;

/// Most EndSession answers kept for the owner to poll; past it the oldest is dropped (its call
/// has given up long before).
const MAX_END_ANSWERS: usize = 4096;

/// Most uids remembered per broadcast to drop repeats of its receipts; receipts past it are
/// emitted without being remembered.
const MAX_BROADCAST_SEEN: usize = 1 << 20;
/// First wait before a reconnect attempt; doubled after each one, up to `BACKOFF_MAX`, each wait
/// jittered by ±50 % so app-servers do not come back in lockstep.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
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

/// The group's id for one sidecar connection: the `conn` of events and upstream requests. A
/// reconnect gives a handle a new one.
pub type ConnId = u32;

/// One of the caller's connections, which keeps its identity when the group reconnects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandleId(u32);

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

impl ServerErrorInfo {
    /// The stand-in for an answer lost with its connection.
    fn lost() -> ServerErrorInfo {
        ServerErrorInfo {
            code: ErrorCode::Unknown,
            origin: Hop::Unknown,
            message: "the connection ended before the gate answered".to_owned(),
            retry_after_ms: 0,
            log_id: 0,
            refused: false,
        }
    }

    /// The gate's Error frame `e` (of log-id `log_id`) refusing a request.
    fn refusal(e: &wire::Error<'_>, log_id: u64) -> ServerErrorInfo {
        ServerErrorInfo {
            code: e.code(),
            origin: e.origin(),
            message: e.message().unwrap_or("").to_owned(),
            retry_after_ms: e.retry_after_ms(),
            log_id,
            refused: true,
        }
    }

    /// True when no answer came at all: the connection ended first.
    pub fn answer_lost(&self) -> bool {
        !self.refused && self.code == ErrorCode::Unknown
    }
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

/// The gate's answer to an EndSession (PROTOCOL.md §9.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// The user.
    pub uid: u64,
    /// True when a session (connected or held) was found and ended.
    pub found: bool,
    /// The name of the gate node that held it; empty when none was found.
    pub node: String,
}

/// The answer to one EndSession request, as [`Session::poll_end_answer`] hands it out.
pub type EndAnswer = (ConnId, u32, Result<SessionEnd, ServerErrorInfo>);

/// A GeoQuery's selection, and a GeoPush's (PROTOCOL.md §9.16): the `k` nearest drivers within
/// `radius_m` of a point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeoSpec {
    /// Latitude, 1e-7 degrees (±900,000,000).
    pub lat_e7: i32,
    /// Longitude, 1e-7 degrees (±1,800,000,000).
    pub lon_e7: i32,
    /// Radius in metres, 1 ..= 50,000.
    pub radius_m: u32,
    /// Drivers wanted at most, 1 ..= 1,000.
    pub k: u32,
    /// Leave out drivers whose newest point the gate received longer ago; 0: any age.
    pub max_age_ms: u32,
    /// `wire::GeoFilter` value: 0 drivers online, 1 online or held.
    pub filter: u8,
    /// The request's log-id; 0 lets the gate assign one.
    pub log_id: u64,
}

/// What a GeoPush pushes to the drivers it chooses (as `PushSpec` without targets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeoPushSpec {
    /// The push's id, unique as a Push's.
    pub message_id: u64,
    /// Passed to the app verbatim; at most 16 KiB.
    pub payload: Vec<u8>,
    /// Time-to-live in ms: 0 means 30 s, at most 300 s.
    pub ttl_ms: u32,
    /// Passed to the app as `PushDelivery.kind`.
    pub kind: u16,
}

/// One driver a GeoQuery or GeoPush chose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chosen {
    /// The driver.
    pub uid: u64,
    /// Its newest point the gate holds, 1e-7 degrees.
    pub lat_e7: i32,
    /// 1e-7 degrees.
    pub lon_e7: i32,
    /// Great-circle distance from the request's point, metres.
    pub distance_m: f32,
    /// How long ago the gate received that point, ms.
    pub age_ms: u32,
}

/// The answer to one GeoQuery or GeoPush, as [`Session::poll_geo_answer`] hands it out: the
/// chosen drivers, nearest first.
pub type GeoAnswer = (ConnId, u32, Result<Vec<Chosen>, ServerErrorInfo>);

/// An app's request, forwarded by the gate; answer it with [`Session::reply`] (or
/// [`Session::reply_error`]), in any order, whenever ready.
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
    /// The connection it arrived on; the reply goes back on it.
    pub conn: ConnId,
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

/// Something the gate sent, or what the group concluded about it, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The final outcome of one (message_id, uid) of a push, emitted once per pair. For a
    /// broadcast, uid 0 with outcome GateLost stands for every target whose receipt has not come.
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
    /// The answer to a push: the accepted targets, or why none will come.
    PushAnswer {
        /// The connection the push was sent on.
        conn: ConnId,
        /// The push's sequence-id.
        seq: u32,
        /// The push's id.
        message_id: u64,
        /// How many receipts will follow, or why none will (see [`ServerErrorInfo::refused`]).
        result: Result<u32, ServerErrorInfo>,
    },
    /// One connection of the group ended. Its pushes still waiting for an answer got a
    /// `PushAnswer` with a lost answer first, and upstream requests that came on it can no longer
    /// be answered (the gate answered them NoAppServer). While other connections stay up they
    /// carry on (the gate resends unacked receipt batches on them); if it was the last, the group
    /// reconnects ([`Event::Reconnected`]) or declares the gate lost ([`Event::GateLost`]).
    ConnectionLost {
        /// The connection that ended.
        conn: ConnId,
    },
    /// The group got back to the same gate process after losing every connection: pending pairs
    /// stay pending and their receipts will come. One per handle given a new connection.
    Reconnected {
        /// The new connection.
        conn: ConnId,
        /// The gate's incarnation, the same as before the loss.
        incarnation: u64,
    },
    /// The gate is lost (restarted, unreachable for the reconnect bound, or the caller closed the
    /// last connection): every pair still pending got a GateLost receipt just before this, and
    /// every broadcast still owed receipts one with uid 0. No receipt will be emitted for those
    /// pairs. The group has no connection now; a new handle may reopen it.
    GateLost,
}

/// What the owner must do for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the gate for `conn`, giving up after `timeout`, and report the
    /// outcome with [`Session::dialed`] or [`Session::dial_failed`].
    Connect {
        /// The connection to open.
        conn: ConnId,
        /// How long the attempt may take.
        timeout: Duration,
    },
    /// Close `conn` in both directions; the session has forgotten it and ignores its input.
    Close {
        /// The connection to close.
        conn: ConnId,
    },
}

/// How the group says hello and how long it tries to get back to its gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The sidecar secret sent in every hello.
    pub secret: Vec<u8>,
    /// The app-server's name, for the gate's logs.
    pub name: String,
    /// The longest wait for a Welcome, and for each reconnect attempt's connect.
    pub timeout: Duration,
    /// After the last connection ends (not closed by the caller), how long to try to get back to
    /// the same gate process before every pending pair ends as GateLost. Zero: no reconnect.
    pub reconnect_within: Duration,
}

/// A push sent on a connection and not answered yet.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The push's id.
    message_id: u64,
    /// When the gate would have sent its last receipt had it accepted the push (sent, TTL,
    /// slack): for a push whose answer is lost with its connection.
    receipts_due: Instant,
}

/// Why a connection was opened; decides what its Welcome means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A new handle's first connection.
    Handle(HandleId),
    /// An attempt to get back to the gate after losing every connection; the Welcome decides
    /// which handle gets it.
    Reconnect,
    /// After a successful reconnect, one attempt for another open handle.
    Revive(HandleId),
}

/// Upstream requests awaiting a reply on one connection.
#[derive(Debug, Default)]
struct Upstreams {
    /// By the gate's sequence-id: the request_id and the arrival number.
    by_seq: HashMap<u32, (u64, u64)>,
    /// By arrival, oldest first: sequence-ids.
    order: BTreeMap<u64, u32>,
    /// Last arrival number handed out.
    arrivals: u64,
}

impl Upstreams {
    /// Remembers a request, forgetting the oldest past `MAX_UPSTREAM`.
    fn insert(&mut self, seq: u32, request_id: u64) {
        self.arrivals += 1;
        if let Some((_, old)) = self.by_seq.insert(seq, (request_id, self.arrivals)) {
            self.order.remove(&old);
        }
        self.order.insert(self.arrivals, seq);
        while self.by_seq.len() > MAX_UPSTREAM {
            let Some((_, seq)) = self.order.pop_first() else { break };
            self.by_seq.remove(&seq);
        }
    }

    /// True when `seq` awaits a reply with `request_id`.
    fn awaits(&self, seq: u32, request_id: u64) -> bool {
        self.by_seq.get(&seq).is_some_and(|&(r, _)| r == request_id)
    }

    /// Forgets an answered request.
    fn remove(&mut self, seq: u32) {
        if let Some((_, arrival)) = self.by_seq.remove(&seq) {
            self.order.remove(&arrival);
        }
    }
}

/// A connection that said hello.
#[derive(Debug)]
struct Up {
    /// Largest body to send: the Welcome's `max_body`.
    max_body: u32,
    /// Unanswered pushes by sequence-id; at most `MAX_IN_FLIGHT_PUSHES`.
    in_flight: HashMap<u32, InFlight>,
    /// Upstream requests that came on it and await a reply.
    upstream: Upstreams,
    /// EndSession requests sent and not answered: sequence-id → uid.
    ends: HashMap<u32, u64>,
    /// GeoQuery and GeoPush requests sent and not answered: sequence-id → a GeoPush's
    /// message_id.
    geos: HashMap<u32, Option<u64>>,
}

/// Where a connection is in its life.
// `Up` is where a connection spends its life, so it is kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Phase {
    /// The owner is opening the TCP connection.
    Dialing(Purpose),
    /// The hello is sent; the Welcome must come by `deadline`.
    Hello {
        /// Why the connection was opened.
        purpose: Purpose,
        /// When the hello fails for want of an answer.
        deadline: Instant,
    },
    /// Part of the group.
    Up(Up),
}

/// One sidecar connection.
#[derive(Debug)]
struct Conn {
    /// Where it is in its life.
    phase: Phase,
    /// Bytes received and not yet a whole frame.
    inbox: Vec<u8>,
    /// Bytes to write: whole frames, in order.
    outbox: Vec<u8>,
    /// Last sequence-id used (the hello's is 1).
    seq: u32,
}

impl Conn {
    /// A connection about to be opened.
    fn new(purpose: Purpose) -> Conn {
        Conn { phase: Phase::Dialing(purpose), inbox: Vec::new(), outbox: Vec::new(), seq: HELLO_SEQ }
    }

    /// The group's part of it, if it said hello.
    fn up(&self) -> Option<&Up> {
        match &self.phase {
            Phase::Up(up) => Some(up),
            _ => None,
        }
    }
}

/// One of the caller's handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandleState {
    /// Saying hello on `conn`; not part of the group until the Welcome.
    Opening {
        /// The connection saying hello.
        conn: ConnId,
    },
    /// Part of the group; `conn` is its current connection, or its last one while it has none.
    Open {
        /// Its connection.
        conn: ConnId,
    },
}

/// Where the group is with its gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// No connection up and nothing to get back to: before the first Welcome, or after GateLost.
    Idle,
    /// At least one connection up, to the process of `incarnation`.
    Connected {
        /// The gate process, from the first Welcome (or the one that reopened the group).
        incarnation: u64,
        /// Since when the group has had a connection without a break.
        since: Instant,
    },
    /// Every connection ended; trying to get back to the same process.
    Reconnecting(Reconnect),
    /// Every handle closed, or the owner stopped listening: nothing more happens.
    Ended,
}

/// A reconnect under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reconnect {
    /// The process to get back to.
    incarnation: u64,
    /// The connection whose end started it; its handle gets the new connection first.
    last_conn: ConnId,
    /// The gate is lost if no attempt succeeds by then.
    deadline: Instant,
    /// Attempts started.
    attempts: u32,
    /// The wait before the next attempt (before jitter).
    backoff: Duration,
    /// Waiting or trying.
    step: Step,
}

/// The state of a reconnect between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The next attempt starts at `until`.
    Waiting {
        /// When.
        until: Instant,
    },
    /// An attempt on `conn` is under way.
    Trying {
        /// The attempt's connection.
        conn: ConnId,
    },
}

/// A broadcast push whose receipts may still come.
#[derive(Debug)]
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
#[derive(Debug)]
enum LostTargets {
    /// A push to uids: these uids.
    Uids(HashSet<u64>),
    /// A broadcast: every uid except these, whose receipts had come.
    Broadcast(HashSet<u64>),
}

impl LostTargets {
    /// What the entry counts against `MAX_LOST_PAIRS`.
    fn weight(&self) -> usize {
        match self {
            LostTargets::Uids(s) | LostTargets::Broadcast(s) => s.len().max(1),
        }
    }
}

/// Pairs of one push reported GateLost.
#[derive(Debug)]
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

/// Every pushed pair and what became of it.
#[derive(Debug, Default)]
struct Ledger {
    /// Pairs awaiting their final receipt: message_id -> uids.
    pending: HashMap<u64, HashSet<u64>>,
    /// Number of pairs in `pending`.
    pending_len: usize,
    /// Broadcasts whose receipts may still come, by message_id.
    broadcasts: HashMap<u64, Broadcast>,
    /// (expires, message_id) of every entry of `broadcasts`.
    broadcast_expiry: BTreeSet<(Instant, u64)>,
    /// Pushes with pairs reported GateLost, by message_id.
    lost: HashMap<u64, Lost>,
    /// (expires, message_id) of every entry of `lost`, oldest first.
    lost_expiry: BTreeSet<(Instant, u64)>,
    /// The weight of every entry of `lost`.
    lost_len: usize,
    /// Pushes whose answer was lost with their connection: (receipts due, message_id).
    unconfirmed: BTreeSet<(Instant, u64)>,
    /// Receipts dropped because their pair was not pending.
    duplicates: u64,
    /// Receipts dropped because their pair had been reported GateLost.
    late: u64,
}

impl Ledger {
    /// Registers a push's pairs as pending; returns when its receipts are due.
    fn register(&mut self, p: &PushSpec, now: Instant) -> Result<Instant, ClientError> {
        let id = p.message_id;
        let lost = self.lost.get(&id).is_some_and(|l| l.expires > now);
        if self.pending.contains_key(&id) || self.broadcasts.contains_key(&id) || lost {
            return Err(ClientError::Unexpected(format!(
                "message_id {id} still awaits receipts (or was reported GateLost); message ids must be unique"
            )));
        }
        let ttl = if p.ttl_ms == 0 { DEFAULT_TTL_MS } else { p.ttl_ms.min(MAX_TTL_MS) };
        let due = now + Duration::from_millis(u64::from(ttl)) + RECEIPT_SLACK;
        if p.broadcast != 0 {
            if self.broadcasts.len() >= MAX_BROADCASTS {
                return Err(ClientError::QueueFull);
            }
            let expires = due + BROADCAST_GRACE;
            self.broadcasts.insert(id, Broadcast { seen: HashSet::new(), targets: None, expires });
            self.broadcast_expiry.insert((expires, id));
        } else if !p.uids.is_empty() {
            let uids: HashSet<u64> = p.uids.iter().copied().collect();
            if self.pending_len + uids.len() > MAX_PENDING_PAIRS {
                return Err(ClientError::QueueFull);
            }
            self.pending_len += uids.len();
            self.pending.insert(id, uids);
        }
        Ok(due)
    }

    /// Forgets a push's pairs: the gate refused it, or it never reached the gate.
    fn unregister(&mut self, message_id: u64) {
        if let Some(uids) = self.pending.remove(&message_id) {
            self.pending_len -= uids.len();
        }
        if let Some(b) = self.broadcasts.remove(&message_id) {
            self.broadcast_expiry.remove(&(b.expires, message_id));
        }
    }

    /// A GeoPush's answer named its drivers: their pairs are pending from now on, less those
    /// whose receipt came already.
    fn chosen(&mut self, message_id: u64, uids: impl Iterator<Item = u64>) {
        let Some(b) = self.broadcasts.remove(&message_id) else { return };
        self.broadcast_expiry.remove(&(b.expires, message_id));
        let left: HashSet<u64> = uids.filter(|u| !b.seen.contains(u)).collect();
        if !left.is_empty() {
            self.pending_len += left.len();
            self.pending.insert(message_id, left);
        }
    }

    /// Records a broadcast's announced targets.
    fn accepted(&mut self, message_id: u64, targets: u32) {
        if let Some(b) = self.broadcasts.get_mut(&message_id) {
            b.targets = Some(targets);
        }
    }

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
                if b.seen.len() >= MAX_BROADCAST_SEEN {
                    return if b.seen.contains(&uid) { Resolution::Duplicate } else { Resolution::Fresh };
                }
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

    /// Remembers pairs reported GateLost, forgetting the oldest reports past `MAX_LOST_PAIRS`.
    fn remember_lost(&mut self, message_id: u64, targets: LostTargets, now: Instant) {
        let expires = now + LOST_MEMORY;
        self.lost_len += targets.weight();
        if let Some(old) = self.lost.insert(message_id, Lost { targets, expires }) {
            self.lost_len -= old.targets.weight();
            self.lost_expiry.remove(&(old.expires, message_id));
        }
        self.lost_expiry.insert((expires, message_id));
        while self.lost_len > MAX_LOST_PAIRS {
            let Some((_, oldest)) = self.lost_expiry.pop_first() else { break };
            if let Some(l) = self.lost.remove(&oldest) {
                self.lost_len -= l.targets.weight();
            }
        }
    }

    /// The gate is lost: every pending pair and every broadcast still owed receipts is remembered
    /// as lost. Returns the pairs (sorted) and the broadcasts (sorted).
    fn declare_lost(&mut self, now: Instant) -> (Vec<(u64, u64)>, Vec<u64>) {
        self.unconfirmed.clear();
        let mut pairs = Vec::with_capacity(self.pending_len);
        for (message_id, uids) in std::mem::take(&mut self.pending) {
            pairs.extend(uids.iter().map(|&uid| (message_id, uid)));
            self.remember_lost(message_id, LostTargets::Uids(uids), now);
        }
        self.pending_len = 0;
        pairs.sort_unstable();
        let mut owed: Vec<u64> = self
            .broadcasts
            .iter()
            .filter(|(_, b)| b.expires > now && b.outstanding())
            .map(|(&m, _)| m)
            .collect();
        owed.sort_unstable();
        for &message_id in &owed {
            if let Some(b) = self.broadcasts.remove(&message_id) {
                self.broadcast_expiry.remove(&(b.expires, message_id));
                self.remember_lost(message_id, LostTargets::Broadcast(b.seen), now);
            }
        }
        (pairs, owed)
    }

    /// Gives up on one push: its pairs still pending are remembered as lost and returned
    /// (sorted); a broadcast still owed receipts returns uid 0.
    fn give_up_on(&mut self, message_id: u64, now: Instant) -> Vec<u64> {
        if let Some(uids) = self.pending.remove(&message_id) {
            self.pending_len -= uids.len();
            let mut sorted: Vec<u64> = uids.iter().copied().collect();
            sorted.sort_unstable();
            self.remember_lost(message_id, LostTargets::Uids(uids), now);
            return sorted;
        }
        let owed = self.broadcasts.get(&message_id).is_some_and(|b| b.expires > now && b.outstanding());
        if !owed {
            return Vec::new();
        }
        let Some(b) = self.broadcasts.remove(&message_id) else { return Vec::new() };
        self.broadcast_expiry.remove(&(b.expires, message_id));
        self.remember_lost(message_id, LostTargets::Broadcast(b.seen), now);
        vec![0]
    }

    /// Forgets broadcasts and lost pairs whose time is up.
    fn prune(&mut self, now: Instant) {
        while let Some(&(expires, message_id)) = self.broadcast_expiry.first() {
            if expires > now {
                break;
            }
            self.broadcast_expiry.pop_first();
            self.broadcasts.remove(&message_id);
        }
        while let Some(&(expires, message_id)) = self.lost_expiry.first() {
            if expires > now {
                break;
            }
            self.lost_expiry.pop_first();
            if let Some(l) = self.lost.remove(&message_id) {
                self.lost_len -= l.targets.weight();
            }
        }
    }
}

/// A batch's ack, written once the events before it were polled.
#[derive(Debug)]
struct HeldAck {
    /// Released once this many events were polled.
    after: u64,
    /// The connection the batch came on.
    conn: ConnId,
    /// The ReceiptsAck frame.
    frame: Vec<u8>,
}

/// SplitMix64: the reconnect jitter's randomness, seeded by the owner.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    /// The next 64 random bits.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `d` scaled by a random factor in [0.5, 1.5).
    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + (self.next() % 1_000) as f64 / 1_000.0)
    }
}

/// One app-server's sidecar connections to one gate, as a state machine (see the module docs).
#[derive(Debug)]
pub struct Session {
    /// Hello, timeouts, reconnect bound.
    config: Config,
    /// The reconnect jitter.
    rng: Rng,
    /// Builds outgoing bodies.
    enc: Encoder,
    /// Where a push or reply is built before it is checked and queued.
    scratch: Vec<u8>,
    /// Where the group is with its gate.
    gate: Gate,
    /// Connections by id, from dialing to their end.
    conns: BTreeMap<ConnId, Conn>,
    /// Last connection id handed out.
    last_conn: ConnId,
    /// The caller's handles still open.
    handles: BTreeMap<HandleId, HandleState>,
    /// Last handle id handed out.
    last_handle: u32,
    /// How new handles' hellos ended, until taken.
    opened: HashMap<HandleId, Result<Welcome, ClientError>>,
    /// Pending pairs, broadcasts, lost pairs.
    ledger: Ledger,
    /// Events not polled yet.
    events: VecDeque<Event>,
    /// Events ever queued.
    queued: u64,
    /// Events ever polled.
    polled: u64,
    /// Acks waiting for the events of their batch to be polled.
    held_acks: VecDeque<HeldAck>,
    /// Actions not polled yet.
    actions: VecDeque<Action>,
    /// EndSession answers not polled yet.
    end_answers: VecDeque<EndAnswer>,
    /// GeoQuery and GeoPush answers not polled yet.
    geo_answers: VecDeque<GeoAnswer>,
}

impl Session {
    /// A group with no connection yet; `seed` drives the reconnect jitter.
    pub fn new(config: Config, seed: u64) -> Session {
        Session {
            config,
            rng: Rng(seed),
            enc: Encoder::new(),
            scratch: Vec::new(),
            gate: Gate::Idle,
            conns: BTreeMap::new(),
            last_conn: 0,
            handles: BTreeMap::new(),
            last_handle: 0,
            opened: HashMap::new(),
            ledger: Ledger::default(),
            events: VecDeque::new(),
            queued: 0,
            polled: 0,
            held_acks: VecDeque::new(),
            actions: VecDeque::new(),
            end_answers: VecDeque::new(),
            geo_answers: VecDeque::new(),
        }
    }

    // --- Commands ---------------------------------------------------------------------------

    /// A new handle: the owner opens a TCP connection for the returned `ConnId` and reports with
    /// [`Session::dialed`] or [`Session::dial_failed`]; [`Session::take_opened`] then tells how
    /// its hello ended. `Closed` while the group reconnects and once it ended.
    pub fn open(&mut self) -> Result<(HandleId, ConnId), ClientError> {
        if matches!(self.gate, Gate::Ended | Gate::Reconnecting(_)) {
            return Err(ClientError::Closed);
        }
        self.last_handle += 1;
        let handle = HandleId(self.last_handle);
        let conn = self.new_conn(Purpose::Handle(handle));
        self.handles.insert(handle, HandleState::Opening { conn });
        Ok((handle, conn))
    }

    /// Queues a push on `conn`, registering its pairs as pending first; returns its sequence-id.
    /// `sent_at_us` is the wall clock for `Push.sent_at_us`. `Closed` if `conn` is not up;
    /// `QueueFull` past the bounds; `Unexpected` for a message id still tracked or a frame over
    /// the gate's `max_body`. Nothing is registered on error.
    pub fn push(
        &mut self,
        conn: ConnId,
        p: &PushSpec,
        sent_at_us: u64,
        now: Instant,
    ) -> Result<u32, ClientError> {
        self.ledger.prune(now);
        let Some(Conn { phase: Phase::Up(up), outbox, seq, .. }) = self.conns.get_mut(&conn) else {
            return Err(ClientError::Closed);
        };
        if up.in_flight.len() >= MAX_IN_FLIGHT_PUSHES || outbox.len() >= MAX_OUTBOX {
            return Err(ClientError::QueueFull);
        }
        next_seq(seq, up);
        self.scratch.clear();
        self.enc.frame(&mut self.scratch, FrameType::Request, Cmd::Push, *seq, p.log_id, |b| {
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
        check_size(&self.scratch, up.max_body)?;
        let receipts_due = self.ledger.register(p, now)?;
        up.in_flight.insert(*seq, InFlight { message_id: p.message_id, receipts_due });
        outbox.extend_from_slice(&self.scratch);
        Ok(*seq)
    }

    /// Queues several pushes on `conn` to leave in one write (the gate then reads them together);
    /// returns their sequence-ids in order. All or nothing: on the first error the pushes
    /// queued before it are taken back (their bytes and their pairs), and the error returned.
    pub fn push_batch(
        &mut self,
        conn: ConnId,
        ps: &[PushSpec],
        sent_at_us: u64,
        now: Instant,
    ) -> Result<Vec<u32>, ClientError> {
        let queued = self.conns.get(&conn).map_or(0, |c| c.outbox.len());
        let mut seqs = Vec::with_capacity(ps.len());
        for p in ps {
            match self.push(conn, p, sent_at_us, now) {
                Ok(seq) => seqs.push(seq),
                Err(e) => {
                    for (&seq, p) in seqs.iter().zip(ps) {
                        self.push_unsent(conn, seq, p.message_id);
                    }
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.outbox.truncate(queued);
                    }
                    return Err(e);
                }
            }
        }
        Ok(seqs)
    }

    /// Queues an EndSession on `conn`: the gate ends `uid`'s session wherever it is, the app
    /// gets GoAway Ended with `message`; returns its sequence-id. The answer comes from
    /// [`Session::poll_end_answer`]. `Closed` if `conn` is not up; `QueueFull` past the bounds.
    pub fn end_session(
        &mut self,
        conn: ConnId,
        uid: u64,
        message: &str,
        log_id: u64,
    ) -> Result<u32, ClientError> {
        let Some(Conn { phase: Phase::Up(up), outbox, seq, .. }) = self.conns.get_mut(&conn) else {
            return Err(ClientError::Closed);
        };
        if up.ends.len() >= MAX_IN_FLIGHT_ENDS || outbox.len() >= MAX_OUTBOX {
            return Err(ClientError::QueueFull);
        }
        next_seq(seq, up);
        self.scratch.clear();
        self.enc.frame(&mut self.scratch, FrameType::Request, Cmd::EndSession, *seq, log_id, |b| {
            let message = b.create_string(message);
            wire::EndSession::create(b, &wire::EndSessionArgs { uid, message: Some(message) })
        });
        check_size(&self.scratch, up.max_body)?;
        up.ends.insert(*seq, uid);
        outbox.extend_from_slice(&self.scratch);
        Ok(*seq)
    }

    /// Queues a GeoQuery (`push` none) or GeoPush on `conn`; returns its sequence-id. The answer
    /// comes from [`Session::poll_geo_answer`]. A GeoPush's receipts are taken from the moment
    /// it is queued, for any uid (they may beat the answer, which names the chosen drivers);
    /// once the answer came, the chosen drivers' pairs are pending as a Push's. `Closed` if
    /// `conn` is not up; `QueueFull` past the bounds; `Unexpected` for a message id still
    /// tracked.
    pub fn geo(
        &mut self,
        conn: ConnId,
        q: &GeoSpec,
        push: Option<&GeoPushSpec>,
        sent_at_us: u64,
        now: Instant,
    ) -> Result<u32, ClientError> {
        self.ledger.prune(now);
        let Some(Conn { phase: Phase::Up(up), outbox, seq, .. }) = self.conns.get_mut(&conn) else {
            return Err(ClientError::Closed);
        };
        if up.geos.len() >= MAX_IN_FLIGHT_ENDS || outbox.len() >= MAX_OUTBOX {
            return Err(ClientError::QueueFull);
        }
        next_seq(seq, up);
        self.scratch.clear();
        let filter = wire::GeoFilter(q.filter);
        let (lat_e7, lon_e7, radius_m, k, max_age_ms) = (q.lat_e7, q.lon_e7, q.radius_m, q.k, q.max_age_ms);
        match push {
            None => {
                self.enc.frame(&mut self.scratch, FrameType::Request, Cmd::GeoQuery, *seq, q.log_id, |b| {
                    wire::GeoQuery::create(
                        b,
                        &wire::GeoQueryArgs { lat_e7, lon_e7, radius_m, k, max_age_ms, filter },
                    )
                })
            }
            Some(p) => {
                self.enc.frame(&mut self.scratch, FrameType::Request, Cmd::GeoPush, *seq, q.log_id, |b| {
                    let payload = b.create_vector(&p.payload);
                    wire::GeoPush::create(
                        b,
                        &wire::GeoPushArgs {
                            lat_e7,
                            lon_e7,
                            radius_m,
                            k,
                            max_age_ms,
                            filter,
                            message_id: p.message_id,
                            payload: Some(payload),
                            ttl_ms: p.ttl_ms,
                            sent_at_us,
                            kind: p.kind,
                        },
                    )
                })
            }
        }
        check_size(&self.scratch, up.max_body)?;
        if let Some(p) = push {
            // Targets unknown until the answer: tracked as a broadcast's are until then.
            let spec =
                PushSpec { message_id: p.message_id, ttl_ms: p.ttl_ms, broadcast: 1, ..PushSpec::default() };
            self.ledger.register(&spec, now)?;
        }
        up.geos.insert(*seq, push.map(|p| p.message_id));
        outbox.extend_from_slice(&self.scratch);
        Ok(*seq)
    }

    /// The next GeoQuery or GeoPush answer: the connection and sequence-id it answers, and the
    /// result.
    pub fn poll_geo_answer(&mut self) -> Option<GeoAnswer> {
        self.geo_answers.pop_front()
    }

    /// The next EndSession answer: the connection and sequence-id it answers, and the result.
    pub fn poll_end_answer(&mut self) -> Option<EndAnswer> {
        self.end_answers.pop_front()
    }

    /// The push `seq` on `conn` was not written whole (the owner's write failed before its last
    /// byte), so the gate never read it: its pairs are no longer pending.
    pub fn push_unsent(&mut self, conn: ConnId, seq: u32, message_id: u64) {
        if let Some(Conn { phase: Phase::Up(up), .. }) = self.conns.get_mut(&conn) {
            up.in_flight.remove(&seq);
        }
        self.ledger.unregister(message_id);
        self.ledger.unconfirmed.retain(|&(_, m)| m != message_id);
    }

    /// Answers an upstream request on the connection it came on: an Upstream Response with its
    /// sequence-id and log-id. `Closed` if that connection ended; `Unexpected` if the request is
    /// not awaiting an answer (answered already) or the reply is over the gate's `max_body`.
    pub fn reply(
        &mut self,
        req: &UpstreamRequest,
        code: u16,
        message: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.answer_upstream(req, |enc, out| {
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
            });
        })
    }

    /// Answers an upstream request with an Error frame (origin AppServer), for a request the
    /// app-server cannot process; the app gets AppServerError with `message`.
    pub fn reply_error(
        &mut self,
        req: &UpstreamRequest,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), ClientError> {
        self.answer_upstream(req, |enc, out| {
            enc.error(out, req.seq, req.log_id, code, Hop::AppServer, Cmd::Upstream as u16, message, 0);
        })
    }

    /// Closes a handle: its connection ends at once ([`Event::ConnectionLost`]) and is never
    /// reconnected. If it was the group's last connection, what is pending ends as GateLost.
    /// Once no handle is open and nothing is under way, the group ends.
    pub fn close(&mut self, handle: HandleId, now: Instant) {
        self.ledger.prune(now);
        match self.handles.remove(&handle) {
            Some(HandleState::Opening { conn }) => {
                if self.conns.remove(&conn).is_some() {
                    self.actions.push_back(Action::Close { conn });
                }
                self.opened.insert(handle, Err(ClientError::Closed));
            }
            Some(HandleState::Open { conn }) => match self.conns.get(&conn).map(|c| &c.phase) {
                Some(Phase::Up(_)) => {
                    self.actions.push_back(Action::Close { conn });
                    self.end_up(conn, true, now);
                }
                Some(_) => {
                    self.conns.remove(&conn);
                    self.actions.push_back(Action::Close { conn });
                }
                None => {}
            },
            None => {}
        }
        if matches!(self.gate, Gate::Reconnecting(_)) && !self.has_open_handle() {
            self.give_up(now);
        }
        self.maybe_end();
    }

    /// The owner stopped listening for events: the group ends at once, closing every
    /// connection, without reporting anything more.
    pub fn abandon(&mut self) {
        self.events.clear();
        self.end();
    }

    // --- Inputs -----------------------------------------------------------------------------

    /// The TCP connection for `conn` is open: the hello is queued on it. False if the session no
    /// longer wants it (it gave up meanwhile): the owner closes the socket.
    pub fn dialed(&mut self, conn: ConnId, now: Instant) -> bool {
        let wait = match self.conns.get(&conn).map(|c| &c.phase) {
            Some(Phase::Dialing(Purpose::Reconnect)) => match &self.gate {
                Gate::Reconnecting(r) => self.config.timeout.min(r.deadline.saturating_duration_since(now)),
                _ => Duration::ZERO,
            },
            Some(Phase::Dialing(_)) => self.config.timeout,
            _ => return false,
        };
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        let Phase::Dialing(purpose) = c.phase else { return false };
        c.phase = Phase::Hello { purpose, deadline: now + wait };
        let Config { secret, name, .. } = &self.config;
        self.enc.frame(&mut c.outbox, FrameType::Request, Cmd::AppServerHello, HELLO_SEQ, 0, |b| {
            let secret = b.create_vector(secret);
            let name = b.create_string(name);
            wire::AppServerHello::create(
                b,
                &wire::AppServerHelloArgs { secret: Some(secret), name: Some(name) },
            )
        });
        true
    }

    /// The TCP connection for `conn` could not be opened.
    pub fn dial_failed(&mut self, conn: ConnId, error: ClientError, now: Instant) {
        if let Some(Phase::Dialing(purpose)) = self.conns.get(&conn).map(|c| &c.phase) {
            let purpose = *purpose;
            self.conns.remove(&conn);
            self.hello_failed(purpose, error, now);
        }
    }

    /// Bytes received on `conn`; whole frames are acted on, the rest waits for more.
    pub fn handle_input(&mut self, conn: ConnId, bytes: &[u8], now: Instant) {
        self.ledger.prune(now);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if matches!(c.phase, Phase::Dialing(_)) {
            return;
        }
        let mut inbox = std::mem::take(&mut c.inbox);
        inbox.extend_from_slice(bytes);
        let mut pos = 0;
        loop {
            match decode(&inbox[pos..], &Limits::SIDECAR) {
                Ok(None) => break,
                Ok(Some((decoded, n))) => {
                    pos += n;
                    self.on_decoded(conn, decoded, now);
                    if !self.conns.contains_key(&conn) {
                        return;
                    }
                }
                Err(e) => {
                    // Framing is lost: the connection cannot go on.
                    self.actions.push_back(Action::Close { conn });
                    self.lost(conn, ClientError::Protocol(e), now);
                    return;
                }
            }
        }
        inbox.drain(..pos);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.inbox = inbox;
        }
    }

    /// `conn` ended: end of stream, a reset, or a write that failed.
    pub fn connection_lost(&mut self, conn: ConnId, now: Instant) {
        self.ledger.prune(now);
        self.lost(conn, ClientError::Closed, now);
    }

    /// The next deadline: call [`Session::handle_timeout`] once it has passed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hellos = self.conns.values().filter_map(|c| match c.phase {
            Phase::Hello { deadline, .. } => Some(deadline),
            _ => None,
        });
        let group = match self.gate {
            Gate::Reconnecting(Reconnect { step: Step::Waiting { until }, .. }) => Some(until),
            Gate::Reconnecting(Reconnect { deadline, .. }) => Some(deadline),
            Gate::Connected { since, .. } => {
                self.ledger.unconfirmed.first().map(|&(due, _)| due.max(since) + UNCONFIRMED_GRACE)
            }
            Gate::Idle | Gate::Ended => None,
        };
        hellos.chain(group).min()
    }

    /// Acts on every deadline that has passed by `now`: hellos without an answer, reconnect
    /// attempts and the reconnect bound, pushes whose receipts are overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.ledger.prune(now);
        let late: Vec<(ConnId, Purpose)> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| match c.phase {
                Phase::Hello { purpose, deadline } if deadline <= now => Some((id, purpose)),
                _ => None,
            })
            .collect();
        for (conn, purpose) in late {
            self.conns.remove(&conn);
            self.actions.push_back(Action::Close { conn });
            self.hello_failed(purpose, ClientError::Timeout, now);
        }
        match self.gate {
            Gate::Reconnecting(Reconnect { step: Step::Waiting { until }, .. }) if until <= now => {
                self.try_reconnect(now);
            }
            Gate::Reconnecting(Reconnect { deadline, .. }) if deadline <= now => self.give_up(now),
            Gate::Connected { since, .. } if since + UNCONFIRMED_GRACE <= now => {
                while let Some(&(due, message_id)) = self.ledger.unconfirmed.first() {
                    if due + UNCONFIRMED_GRACE > now {
                        break;
                    }
                    self.ledger.unconfirmed.pop_first();
                    for uid in self.ledger.give_up_on(message_id, now) {
                        self.emit(Event::Receipt { message_id, uid, outcome: Outcome::GateLost });
                    }
                }
            }
            _ => {}
        }
    }

    // --- Outputs ----------------------------------------------------------------------------

    /// Moves the bytes waiting to be written on `conn` to the end of `out`; false if none.
    pub fn transmit(&mut self, conn: ConnId, out: &mut Vec<u8>) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else { return false };
        if c.outbox.is_empty() {
            return false;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut c.outbox);
        } else {
            out.append(&mut c.outbox);
        }
        true
    }

    /// The connections with bytes waiting to be written.
    pub fn transmits(&self) -> Vec<ConnId> {
        self.conns.iter().filter(|(_, c)| !c.outbox.is_empty()).map(|(&id, _)| id).collect()
    }

    /// The next action for the owner.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event for the caller. Taking the events of a Receipts batch releases its ack.
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.pop_front()?;
        self.polled += 1;
        while self.held_acks.front().is_some_and(|a| a.after <= self.polled) {
            let Some(a) = self.held_acks.pop_front() else { break };
            if let Some(c) = self.conns.get_mut(&a.conn).filter(|c| c.up().is_some()) {
                c.outbox.extend_from_slice(&a.frame);
            }
        }
        Some(ev)
    }

    /// How a new handle's hello ended, once it has; taken once.
    pub fn take_opened(&mut self, handle: HandleId) -> Option<Result<Welcome, ClientError>> {
        self.opened.remove(&handle)
    }

    /// True while some hello's outcome waits in [`Session::take_opened`].
    pub fn has_opened(&self) -> bool {
        !self.opened.is_empty()
    }

    /// True while events wait to be polled.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// True while actions wait to be polled.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    // --- State ------------------------------------------------------------------------------

    /// The handle's connection: its current one, or its last while it has none.
    pub fn handle_conn(&self, handle: HandleId) -> Option<ConnId> {
        self.handles.get(&handle).map(|h| match *h {
            HandleState::Opening { conn } | HandleState::Open { conn } => conn,
        })
    }

    /// True while `conn` is part of the group.
    pub fn is_up(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.up().is_some())
    }

    /// True once every handle closed (or the owner abandoned it): nothing more happens.
    pub fn is_ended(&self) -> bool {
        self.gate == Gate::Ended
    }

    /// True while the group tries to get back to its gate.
    pub fn is_reconnecting(&self) -> bool {
        matches!(self.gate, Gate::Reconnecting(_))
    }

    /// Pairs still awaiting their final receipt (broadcasts not included: their targets are
    /// unknown until their receipts arrive).
    pub fn pending_receipts(&self) -> usize {
        self.ledger.pending_len
    }

    /// Receipts dropped because their pair was not pending: resent batches, or pushes not sent
    /// from this group.
    pub fn duplicate_receipts(&self) -> u64 {
        self.ledger.duplicates
    }

    /// Receipts dropped (and acked) because their pair had been reported GateLost.
    pub fn late_receipts(&self) -> u64 {
        self.ledger.late
    }

    /// Pushes sent on `conn` and not answered yet.
    pub fn pushes_in_flight(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).and_then(Conn::up).map_or(0, |up| up.in_flight.len())
    }

    // --- Frames -----------------------------------------------------------------------------

    /// Acts on one frame (or one that did not verify) from `conn`.
    fn on_decoded(&mut self, conn: ConnId, decoded: Decoded<'_>, now: Instant) {
        let hello = match self.conns.get(&conn).map(|c| &c.phase) {
            Some(Phase::Hello { purpose, .. }) => Some(*purpose),
            Some(Phase::Up(_)) => None,
            _ => return,
        };
        match (hello, decoded) {
            (Some(purpose), Decoded::Frame(f)) => match welcome_of(&f) {
                Ok(w) => self.welcomed(conn, purpose, w, now),
                Err(e) => self.refuse_hello(conn, purpose, e, now),
            },
            (Some(purpose), Decoded::Rejected { header, error }) => {
                self.refuse_hello(conn, purpose, ClientError::Rejected { header, error }, now);
            }
            (None, Decoded::Frame(f)) => self.on_frame(conn, &f, now),
            (None, Decoded::Rejected { header, error }) => self.on_rejected(conn, &header, &error),
        }
    }

    /// Acts on one verified frame from a connection that is up.
    fn on_frame(&mut self, conn: ConnId, f: &Frame<'_>, now: Instant) {
        let (seq, log_id) = (f.header.seq, f.header.log_id);
        match (f.ty, f.body) {
            (FrameType::Push, Body::Receipts(r)) => self.on_receipts(conn, &f.header, r, now),
            (FrameType::Request, Body::Upstream(u)) => {
                if let Some(Phase::Up(up)) = self.conns.get_mut(&conn).map(|c| &mut c.phase) {
                    up.upstream.insert(seq, u.request_id());
                }
                self.emit(Event::Upstream(UpstreamRequest {
                    request_id: u.request_id(),
                    uid: u.uid(),
                    role: u.role().0,
                    cmd: u.cmd(),
                    body: u.body().map_or_else(Vec::new, |b| b.bytes().to_vec()),
                    log_id,
                    seq,
                    conn,
                }));
            }
            (FrameType::Event, Body::GpsForward(g)) => {
                self.emit(Event::Gps(g.points().map_or_else(Vec::new, |p| p.iter().copied().collect())));
            }
            (FrameType::Event, Body::Unreachable(u)) => {
                self.emit(Event::Unreachable { uid: u.uid(), outcome: known_outcome(u.outcome()) });
            }
            (FrameType::Response, Body::PushAccepted(a)) => self.on_answer(conn, seq, Ok(a.targets())),
            (FrameType::Response, Body::SessionEnded(e)) => {
                let end =
                    SessionEnd { uid: e.uid(), found: e.found(), node: e.node().unwrap_or("").to_owned() };
                self.on_end_answer(conn, seq, Ok(end));
            }
            (FrameType::Error, Body::Error(e)) if e.failed_cmd() == Cmd::EndSession as u16 => {
                self.on_end_answer(conn, seq, Err(ServerErrorInfo::refusal(&e, log_id)));
            }
            (FrameType::Response, Body::GeoChosen(c)) => {
                let hits = c.hits().map_or_else(Vec::new, |h| {
                    h.iter()
                        .map(|h| Chosen {
                            uid: h.uid(),
                            lat_e7: h.lat_e7(),
                            lon_e7: h.lon_e7(),
                            distance_m: h.distance_m(),
                            age_ms: h.age_ms(),
                        })
                        .collect()
                });
                self.on_geo_answer(conn, seq, Ok(hits));
            }
            (FrameType::Error, Body::Error(e))
                if e.failed_cmd() == Cmd::GeoQuery as u16 || e.failed_cmd() == Cmd::GeoPush as u16 =>
            {
                self.on_geo_answer(conn, seq, Err(ServerErrorInfo::refusal(&e, log_id)));
            }
            // Only errors about a Push answer one: the gate's own requests (whose answers or acks
            // it may find fault with) count sequence-ids in another space (§6).
            (FrameType::Error, Body::Error(e))
                if e.failed_cmd() == Cmd::Push as u16 || e.failed_cmd() == 0 =>
            {
                self.on_answer(conn, seq, Err(ServerErrorInfo::refusal(&e, log_id)));
            }
            // A request the gate should not send to an app-server: answer so it does not wait.
            (FrameType::Request, _) => {
                self.answer_request(conn, &f.header, ErrorCode::NotAllowed, "not an app-server request");
            }
            // Anything else (a late Welcome, frames of the app port) carries nothing for us.
            _ => {}
        }
    }

    /// A frame that did not verify: answer a request so the gate does not wait for nothing; fail
    /// the push an acceptance was meant for, without ending its pairs (it may have been
    /// accepted). A corrupt Error frame cannot say what it answers: dropped.
    fn on_rejected(&mut self, conn: ConnId, header: &Header, error: &FrameError) {
        match FrameType::from_u8(header.ty) {
            Some(FrameType::Request) => {
                let code = match error {
                    FrameError::UnknownCmd(_) => ErrorCode::UnknownCmd,
                    FrameError::BadType { .. } => ErrorCode::NotAllowed,
                    _ => ErrorCode::CorruptBody,
                };
                self.answer_request(conn, header, code, &error.to_string());
            }
            Some(FrameType::Response)
                if header.cmd == Cmd::Push as u16
                    || header.cmd == Cmd::EndSession as u16
                    || header.cmd == Cmd::GeoQuery as u16
                    || header.cmd == Cmd::GeoPush as u16 =>
            {
                let info = ServerErrorInfo {
                    code: ErrorCode::CorruptBody,
                    origin: Hop::Gate,
                    message: format!("the gate's answer did not verify: {error}"),
                    retry_after_ms: 0,
                    log_id: header.log_id,
                    refused: false,
                };
                if header.cmd == Cmd::Push as u16 {
                    self.on_answer(conn, header.seq, Err(info));
                } else if header.cmd != Cmd::EndSession as u16 {
                    self.on_geo_answer(conn, header.seq, Err(info));
                } else {
                    self.on_end_answer(conn, header.seq, Err(info));
                }
            }
            _ => {}
        }
    }

    /// Emits a batch's fresh receipts and queues its ack (released once they are polled).
    fn on_receipts(&mut self, conn: ConnId, header: &Header, r: wire::Receipts<'_>, now: Instant) {
        let batch_id = r.batch_id();
        for rc in r.receipts().iter().flat_map(|list| list.iter()) {
            let (message_id, uid) = (rc.message_id(), rc.uid());
            match self.ledger.resolve(message_id, uid, now) {
                Resolution::Fresh => {
                    self.emit(Event::Receipt {
                        message_id,
                        uid,
                        outcome: known_outcome(Outcome(rc.outcome())),
                    });
                }
                Resolution::Duplicate => self.ledger.duplicates += 1,
                Resolution::Late => self.ledger.late += 1,
            }
        }
        let mut frame = Vec::new();
        self.enc.frame(&mut frame, FrameType::Ack, Cmd::ReceiptsAck, header.seq, header.log_id, |b| {
            wire::ReceiptsAck::create(b, &wire::ReceiptsAckArgs { batch_id })
        });
        if self.queued <= self.polled {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.outbox.extend_from_slice(&frame);
            }
        } else {
            self.held_acks.push_back(HeldAck { after: self.queued, conn, frame });
        }
    }

    /// A push's answer: a refusal ends its pairs, an acceptance records a broadcast's targets.
    /// An answer matching no unanswered push is informational (§6) and dropped.
    fn on_answer(&mut self, conn: ConnId, seq: u32, result: Result<u32, ServerErrorInfo>) {
        let Some(Phase::Up(up)) = self.conns.get_mut(&conn).map(|c| &mut c.phase) else { return };
        let Some(f) = up.in_flight.remove(&seq) else { return };
        match &result {
            Ok(targets) => self.ledger.accepted(f.message_id, *targets),
            Err(e) if e.refused => self.ledger.unregister(f.message_id),
            Err(_) => {}
        }
        self.emit(Event::PushAnswer { conn, seq, message_id: f.message_id, result });
    }

    /// An EndSession's answer, for the owner to poll; one matching no request is dropped (§6).
    fn on_end_answer(&mut self, conn: ConnId, seq: u32, result: Result<SessionEnd, ServerErrorInfo>) {
        let Some(Phase::Up(up)) = self.conns.get_mut(&conn).map(|c| &mut c.phase) else { return };
        if up.ends.remove(&seq).is_none() {
            return;
        }
        self.queue_end_answer((conn, seq, result));
    }

    /// A GeoQuery's or GeoPush's answer, for the owner to poll; one matching no request is
    /// dropped (§6). A GeoPush's chosen drivers become its pending pairs (less those whose
    /// receipt came already); a refusal ends it (no receipts follow).
    fn on_geo_answer(&mut self, conn: ConnId, seq: u32, result: Result<Vec<Chosen>, ServerErrorInfo>) {
        let Some(Phase::Up(up)) = self.conns.get_mut(&conn).map(|c| &mut c.phase) else { return };
        let Some(push) = up.geos.remove(&seq) else { return };
        if let Some(message_id) = push {
            match &result {
                Ok(hits) => self.ledger.chosen(message_id, hits.iter().map(|h| h.uid)),
                Err(e) if e.refused => self.ledger.unregister(message_id),
                Err(_) => {}
            }
        }
        if self.geo_answers.len() >= MAX_END_ANSWERS {
            self.geo_answers.pop_front();
        }
        self.geo_answers.push_back((conn, seq, result));
    }

    fn queue_end_answer(&mut self, a: EndAnswer) {
        if self.end_answers.len() >= MAX_END_ANSWERS {
            self.end_answers.pop_front();
        }
        self.end_answers.push_back(a);
    }

    /// Answers a gate request with an Error frame (origin AppServer).
    fn answer_request(&mut self, conn: ConnId, header: &Header, code: ErrorCode, message: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let (seq, log_id, cmd) = (header.seq, header.log_id, header.cmd);
            self.enc.error(&mut c.outbox, seq, log_id, code, Hop::AppServer, cmd, message, 0);
        }
    }

    /// Queues the answer to an upstream request `build` writes, on the connection it came on.
    fn answer_upstream(
        &mut self,
        req: &UpstreamRequest,
        build: impl FnOnce(&mut Encoder, &mut Vec<u8>),
    ) -> Result<(), ClientError> {
        let Some(Conn { phase: Phase::Up(up), outbox, .. }) = self.conns.get_mut(&req.conn) else {
            return Err(ClientError::Closed);
        };
        if !up.upstream.awaits(req.seq, req.request_id) {
            return Err(ClientError::Unexpected(format!(
                "upstream request {} (seq {}) on connection {} awaits no answer",
                req.request_id, req.seq, req.conn
            )));
        }
        if outbox.len() >= MAX_OUTBOX {
            return Err(ClientError::QueueFull);
        }
        self.scratch.clear();
        build(&mut self.enc, &mut self.scratch);
        check_size(&self.scratch, up.max_body)?;
        up.upstream.remove(req.seq);
        outbox.extend_from_slice(&self.scratch);
        Ok(())
    }

    // --- Hello and the group's connections ----------------------------------------------------

    /// A connection of `purpose` about to be opened.
    fn new_conn(&mut self, purpose: Purpose) -> ConnId {
        self.last_conn = self.last_conn.wrapping_add(1);
        while self.last_conn == 0 || self.conns.contains_key(&self.last_conn) {
            self.last_conn = self.last_conn.wrapping_add(1);
        }
        self.conns.insert(self.last_conn, Conn::new(purpose));
        self.last_conn
    }

    /// A Welcome on a connection that said hello for `purpose`.
    fn welcomed(&mut self, conn: ConnId, purpose: Purpose, w: Welcome, now: Instant) {
        match purpose {
            Purpose::Handle(handle) => {
                let refusal = match self.gate {
                    Gate::Ended | Gate::Reconnecting(_) => Some(ClientError::Closed),
                    Gate::Connected { incarnation: known, .. }
                        if known != 0 && w.incarnation != 0 && known != w.incarnation =>
                    {
                        Some(ClientError::Unexpected(format!(
                            "another gate process answered (incarnation {:016x}, the group's is {known:016x})",
                            w.incarnation
                        )))
                    }
                    _ => None,
                };
                if let Some(e) = refusal {
                    return self.refuse_hello(conn, purpose, e, now);
                }
                self.gate = match self.gate {
                    Gate::Connected { since, .. } => Gate::Connected { incarnation: w.incarnation, since },
                    _ => Gate::Connected { incarnation: w.incarnation, since: now },
                };
                self.join(conn, handle, &w);
                self.opened.insert(handle, Ok(w));
            }
            Purpose::Reconnect => {
                let Gate::Reconnecting(r) = self.gate else {
                    return self.refuse_hello(conn, purpose, ClientError::Closed, now);
                };
                if r.incarnation == 0 || w.incarnation != r.incarnation {
                    // Another process: what the old one owed is gone.
                    self.conns.remove(&conn);
                    self.actions.push_back(Action::Close { conn });
                    return self.give_up(now);
                }
                // The handle whose connection was lost first, then the others.
                let mut open: Vec<HandleId> = self
                    .handles
                    .iter()
                    .filter(|(_, h)| matches!(h, HandleState::Open { .. }))
                    .map(|(&id, _)| id)
                    .collect();
                open.sort_by_key(|id| self.handles.get(id) != Some(&HandleState::Open { conn: r.last_conn }));
                let Some((&first, others)) = open.split_first() else {
                    self.conns.remove(&conn);
                    self.actions.push_back(Action::Close { conn });
                    return self.give_up(now);
                };
                self.gate = Gate::Connected { incarnation: r.incarnation, since: now };
                self.join(conn, first, &w);
                self.emit(Event::Reconnected { conn, incarnation: r.incarnation });
                for &handle in others {
                    let conn = self.new_conn(Purpose::Revive(handle));
                    self.actions.push_back(Action::Connect { conn, timeout: self.config.timeout });
                }
            }
            Purpose::Revive(handle) => {
                let same =
                    matches!(self.gate, Gate::Connected { incarnation, .. } if incarnation == w.incarnation);
                let down = match self.handles.get(&handle) {
                    Some(HandleState::Open { conn: old }) => !self.is_up(*old),
                    _ => false,
                };
                if same && down {
                    self.join(conn, handle, &w);
                    self.emit(Event::Reconnected { conn, incarnation: w.incarnation });
                } else {
                    // Best effort: a handle that gets no connection here answers `Closed`.
                    self.conns.remove(&conn);
                    self.actions.push_back(Action::Close { conn });
                }
            }
        }
    }

    /// Makes `conn` the connection of `handle`, part of the group.
    fn join(&mut self, conn: ConnId, handle: HandleId, w: &Welcome) {
        let max_body = if w.max_body == 0 { Limits::SIDECAR.max_body } else { w.max_body };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.phase = Phase::Up(Up {
                max_body,
                in_flight: HashMap::new(),
                upstream: Upstreams::default(),
                ends: HashMap::new(),
                geos: HashMap::new(),
            });
        }
        self.handles.insert(handle, HandleState::Open { conn });
    }

    /// A hello failed on a connection that is still open: it is closed.
    fn refuse_hello(&mut self, conn: ConnId, purpose: Purpose, error: ClientError, now: Instant) {
        self.conns.remove(&conn);
        self.actions.push_back(Action::Close { conn });
        self.hello_failed(purpose, error, now);
    }

    /// A connection of `purpose` (already forgotten) never said hello: a new handle fails with
    /// `error`, a reconnect attempt counts as failed, a revive is given up.
    fn hello_failed(&mut self, purpose: Purpose, error: ClientError, now: Instant) {
        match purpose {
            Purpose::Handle(handle) => {
                if self.handles.remove(&handle).is_some() {
                    self.opened.insert(handle, Err(error));
                }
                self.maybe_end();
            }
            Purpose::Reconnect => self.attempt_failed(now),
            Purpose::Revive(_) => {}
        }
    }

    /// `conn` ended without the caller closing it.
    fn lost(&mut self, conn: ConnId, error: ClientError, now: Instant) {
        let purpose = match self.conns.get(&conn).map(|c| &c.phase) {
            Some(Phase::Dialing(purpose) | Phase::Hello { purpose, .. }) => *purpose,
            Some(Phase::Up(_)) => return self.end_up(conn, false, now),
            None => return,
        };
        self.conns.remove(&conn);
        self.hello_failed(purpose, error, now);
    }

    /// A connection that was up ended: its unanswered pushes get a lost answer (they stay
    /// pending, watched until overdue), then `ConnectionLost`. If it was the last, the group
    /// reconnects, unless the caller closed it, reconnecting is off, or no handle is open: then
    /// the gate is lost at once.
    fn end_up(&mut self, conn: ConnId, by_caller: bool, now: Instant) {
        let Some(Conn { phase: Phase::Up(up), .. }) = self.conns.remove(&conn) else { return };
        let mut unanswered: Vec<(u32, InFlight)> = up.in_flight.into_iter().collect();
        unanswered.sort_unstable_by_key(|&(seq, _)| seq);
        for (seq, f) in unanswered {
            self.ledger.unconfirmed.insert((f.receipts_due, f.message_id));
            let result = Err(ServerErrorInfo::lost());
            self.emit(Event::PushAnswer { conn, seq, message_id: f.message_id, result });
        }
        let mut ends: Vec<u32> = up.ends.into_keys().collect();
        ends.sort_unstable();
        for seq in ends {
            self.queue_end_answer((conn, seq, Err(ServerErrorInfo::lost())));
        }
        // A GeoPush whose answer was lost stays tracked as a broadcast (its drivers unknown).
        let mut geos: Vec<u32> = up.geos.into_keys().collect();
        geos.sort_unstable();
        for seq in geos {
            self.geo_answers.push_back((conn, seq, Err(ServerErrorInfo::lost())));
        }
        self.emit(Event::ConnectionLost { conn });
        if self.conns.values().any(|c| c.up().is_some()) {
            return;
        }
        let Gate::Connected { incarnation, .. } = self.gate else { return };
        if !by_caller && !self.config.reconnect_within.is_zero() && self.has_open_handle() {
            let within = self.config.reconnect_within;
            let until = now + self.rng.jitter(BACKOFF_MIN).min(within);
            self.gate = Gate::Reconnecting(Reconnect {
                incarnation,
                last_conn: conn,
                deadline: now + within,
                attempts: 0,
                backoff: BACKOFF_MIN,
                step: Step::Waiting { until },
            });
        } else {
            self.declare_lost(now);
            self.maybe_end();
        }
    }

    /// Starts the next reconnect attempt, or gives up past the bounds.
    fn try_reconnect(&mut self, now: Instant) {
        let Gate::Reconnecting(r) = self.gate else { return };
        if r.attempts >= MAX_RECONNECT_ATTEMPTS || now >= r.deadline {
            return self.give_up(now);
        }
        let conn = self.new_conn(Purpose::Reconnect);
        let timeout = self.config.timeout.min(r.deadline - now);
        self.actions.push_back(Action::Connect { conn, timeout });
        self.gate = Gate::Reconnecting(Reconnect {
            attempts: r.attempts + 1,
            backoff: (r.backoff * 2).min(BACKOFF_MAX),
            step: Step::Trying { conn },
            ..r
        });
    }

    /// A reconnect attempt failed: wait for the next one, or give up past the bounds.
    fn attempt_failed(&mut self, now: Instant) {
        let Gate::Reconnecting(r) = self.gate else { return };
        if r.attempts >= MAX_RECONNECT_ATTEMPTS || now >= r.deadline {
            return self.give_up(now);
        }
        let until = now + self.rng.jitter(r.backoff).min(r.deadline - now);
        self.gate = Gate::Reconnecting(Reconnect { step: Step::Waiting { until }, ..r });
    }

    /// The reconnect failed: the gate is lost; the group ends if no handle is open.
    fn give_up(&mut self, now: Instant) {
        self.declare_lost(now);
        self.maybe_end();
    }

    /// The gate is lost: every pending pair gets a GateLost receipt, every broadcast still owed
    /// receipts one with uid 0, then `Event::GateLost`. Reconnect attempts under way are closed.
    fn declare_lost(&mut self, now: Instant) {
        let attempts: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(
                    c.phase,
                    Phase::Dialing(Purpose::Reconnect | Purpose::Revive(_))
                        | Phase::Hello { purpose: Purpose::Reconnect | Purpose::Revive(_), .. }
                )
            })
            .map(|(&id, _)| id)
            .collect();
        for conn in attempts {
            self.conns.remove(&conn);
            self.actions.push_back(Action::Close { conn });
        }
        self.gate = Gate::Idle;
        let (pairs, broadcasts) = self.ledger.declare_lost(now);
        let gate_lost = |(message_id, uid)| Event::Receipt { message_id, uid, outcome: Outcome::GateLost };
        for ev in pairs.into_iter().chain(broadcasts.into_iter().map(|m| (m, 0))).map(gate_lost) {
            self.emit(ev);
        }
        self.emit(Event::GateLost);
    }

    /// Ends the group once no handle is open and nothing is up or under way.
    fn maybe_end(&mut self) {
        if self.gate == Gate::Idle
            && !self.has_open_handle()
            && !self.conns.values().any(|c| c.up().is_some())
        {
            self.end();
        }
    }

    /// Ends the group: every connection is closed, handles still saying hello fail `Closed`, and
    /// nothing is pending any more.
    fn end(&mut self) {
        self.gate = Gate::Ended;
        for (conn, c) in std::mem::take(&mut self.conns) {
            if let Phase::Dialing(Purpose::Handle(h)) | Phase::Hello { purpose: Purpose::Handle(h), .. } =
                c.phase
            {
                self.opened.insert(h, Err(ClientError::Closed));
            }
            self.actions.push_back(Action::Close { conn });
        }
        self.handles.clear();
        self.held_acks.clear();
        self.ledger.pending.clear();
        self.ledger.pending_len = 0;
        self.ledger.broadcasts.clear();
        self.ledger.broadcast_expiry.clear();
        self.ledger.unconfirmed.clear();
    }

    /// True while a handle of the group is open.
    fn has_open_handle(&self) -> bool {
        self.handles.values().any(|h| matches!(h, HandleState::Open { .. }))
    }

    /// Queues an event for the caller.
    fn emit(&mut self, ev: Event) {
        self.events.push_back(ev);
        self.queued += 1;
    }
}

/// Reads the hello's answer: the Welcome, or the gate's refusal.
fn welcome_of(f: &Frame<'_>) -> Result<Welcome, ClientError> {
    if f.header.seq != HELLO_SEQ || !matches!(f.ty, FrameType::Response | FrameType::Error) {
        return Err(ClientError::Unexpected(format!(
            "expected the hello's answer, got {:?} {:?} (seq {})",
            f.cmd, f.ty, f.header.seq
        )));
    }
    match f.body {
        Body::Error(e) => Err(ClientError::Server {
            code: e.code(),
            origin: e.origin(),
            message: e.message().unwrap_or("").to_owned(),
            retry_after_ms: e.retry_after_ms(),
            log_id: f.header.log_id,
        }),
        Body::AppServerWelcome(w) if f.cmd == Cmd::AppServerHello => Ok(Welcome {
            node: w.node().unwrap_or("").to_owned(),
            max_body: w.max_body(),
            max_targets: w.max_targets(),
            incarnation: w.incarnation(),
        }),
        _ => Err(ClientError::Unexpected(format!("expected an AppServerWelcome, got {:?}", f.cmd))),
    }
}

/// Refuses a frame whose body is over the gate's limit: the gate would close the connection.
/// Moves `seq` to the next sequence-id free on `up`: never 0, never one of a push or an
/// EndSession still waiting for its answer.
fn next_seq(seq: &mut u32, up: &Up) {
    loop {
        *seq = seq.wrapping_add(1);
        if *seq != 0
            && !up.in_flight.contains_key(seq)
            && !up.ends.contains_key(seq)
            && !up.geos.contains_key(seq)
        {
            break;
        }
    }
}

fn check_size(frame: &[u8], max_body: u32) -> Result<(), ClientError> {
    let body = frame.len().saturating_sub(HEADER_LEN);
    if body > max_body as usize {
        return Err(ClientError::Unexpected(format!(
            "a body of {body} bytes is over the gate's max_body of {max_body}"
        )));
    }
    Ok(())
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

#[cfg(test)]
mod tests;
