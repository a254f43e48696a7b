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
//! receipts were handed to the event queue. When the group's last connection ends, whatever is
//! still pending is reported as [`Outcome::GateLost`], then [`Event::GateLost`]: the caller sees
//! exactly one final outcome per pair even when the gate goes away.
//!
//! Bounds. The event queue holds [`EVENT_QUEUE`] events; when the caller falls behind, the
//! reader threads block, stop reading, and the gate's outbound queue to this app-server fills:
//! the gate is backpressured instead of this process growing without bound. Pipelined pushes
//! per connection are capped at [`MAX_IN_FLIGHT_PUSHES`]. The pending set holds one entry per
//! (message_id, uid) the caller pushed and not yet resolved, so it is bounded by what the caller
//! pushes within one TTL (at most 300 s, plus 1 s for the gate's last receipt); watch
//! [`AppServerConn::pending_receipts`].

use crate::frame::{answers, FrameReader, OwnedFrame};
use crate::ClientError;
use schema::wire::{self, ErrorCode, Hop, Outcome, UidGpsPoint};
use schema::{body_kind, Body, Cmd, Encoder, FrameError, FrameType, Limits, HEADER_LEN};
use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
}

/// One push to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushSpec {
    /// The caller's id for the push; must be unique (apps show each id once). A push whose id
    /// still has pending receipts here is refused locally.
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
    /// How many receipts the gate will send for it (0 for a broadcast, whose targets are only
    /// known as their receipts arrive).
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
    /// pending and still end with a receipt (GateLost if the gate goes away).
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
    /// The final outcome of one (message_id, uid) of a push, emitted once per pair.
    Receipt {
        /// The push's id.
        message_id: u64,
        /// The target user.
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
    /// One connection of the group ended while others stay open; they carry on (the gate
    /// resends unacked receipt batches on them). Its pushes still waiting for an answer got a
    /// `PushAnswer` with a lost answer first.
    ConnectionLost {
        /// The connection that ended.
        conn: u32,
    },
    /// The group's last connection ended: every pair still pending got a GateLost receipt just
    /// before this. Nothing follows; the queue disconnects once the reader threads are gone.
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
    /// After this no receipt can come (TTL, slack, grace); the entry is dropped.
    expires: Instant,
}

/// State shared by a group's connections, under one lock so that registering a push and a
/// connection's end cannot interleave.
struct GroupState {
    /// Where the reader threads' event senders come from; `None` once the group ended.
    events: Option<SyncSender<Event>>,
    /// Open connections by id.
    links: HashMap<u32, LinkEntry>,
    /// Pairs awaiting their final receipt: message_id -> uids. Bounded by what the caller
    /// pushes (see the module docs).
    pending: HashMap<u64, HashSet<u64>>,
    /// Number of pairs in `pending`.
    pending_len: usize,
    /// Broadcasts whose receipts may still come, by message_id; bounded by the broadcasts the
    /// caller sends within one TTL.
    broadcasts: HashMap<u64, Broadcast>,
}

impl GroupState {
    /// Takes the receipt for (message_id, uid) if it is the first one: true to emit it.
    fn resolve(&mut self, message_id: u64, uid: u64, now: Instant) -> bool {
        if let Some(uids) = self.pending.get_mut(&message_id) {
            if !uids.remove(&uid) {
                return false;
            }
            self.pending_len -= 1;
            if uids.is_empty() {
                self.pending.remove(&message_id);
            }
            return true;
        }
        match self.broadcasts.get_mut(&message_id) {
            Some(b) if b.expires > now => b.seen.insert(uid),
            _ => false,
        }
    }

    /// Forgets a push's pairs: the gate refused it, or it never reached the gate.
    fn unregister(&mut self, message_id: u64) {
        if let Some(uids) = self.pending.remove(&message_id) {
            self.pending_len -= uids.len();
        }
        self.broadcasts.remove(&message_id);
    }
}

/// What connections of one app-server share.
struct Group {
    /// The gate's address, for `connect_another`.
    addr: SocketAddr,
    /// The sidecar secret, for `connect_another`.
    secret: Vec<u8>,
    /// The app-server's name, for `connect_another`.
    name: String,
    /// Connect and hello timeout, write timeout, and the longest `push` waits.
    timeout: Duration,
    /// Last connection id handed out.
    next_conn: AtomicU32,
    /// Receipts dropped because their pair was not pending.
    duplicates: AtomicU64,
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
        if st.pending.contains_key(&p.message_id) || st.broadcasts.contains_key(&p.message_id) {
            return Err(ClientError::Unexpected(format!(
                "message_id {} still awaits receipts; message ids must be unique",
                p.message_id
            )));
        }
        if p.broadcast != 0 {
            let ttl = if p.ttl_ms == 0 { DEFAULT_TTL_MS } else { p.ttl_ms.min(MAX_TTL_MS) };
            let expires = now + Duration::from_millis(u64::from(ttl)) + RECEIPT_SLACK + BROADCAST_GRACE;
            st.broadcasts.insert(p.message_id, Broadcast { seen: HashSet::new(), expires });
        } else if !p.uids.is_empty() {
            let uids: HashSet<u64> = p.uids.iter().copied().collect();
            st.pending_len += uids.len();
            st.pending.insert(p.message_id, uids);
        }
        entry.in_flight.insert(seq, InFlight { message_id: p.message_id, waiter });
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
}

/// One sidecar connection to a gate. Cheap to share between threads by reference: every method
/// takes `&self`. Dropping it closes the connection.
pub struct AppServerConn {
    /// What this connection shares with the others of its group.
    group: Arc<Group>,
    /// This connection.
    link: Arc<Link>,
    /// The gate's Welcome on this connection.
    welcome: Welcome,
}

impl AppServerConn {
    /// Connects to the gate's sidecar port at `addr` (each resolved address in turn), says hello
    /// with `secret` and `name`, and starts the reader thread. `timeout` bounds the connect, the
    /// hello, every write and every [`AppServerConn::push`].
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
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        let group = Arc::new(Group {
            addr,
            secret: secret.to_vec(),
            name: name.to_owned(),
            timeout,
            next_conn: AtomicU32::new(0),
            duplicates: AtomicU64::new(0),
            state: Mutex::new(GroupState {
                events: Some(tx),
                links: HashMap::new(),
                pending: HashMap::new(),
                pending_len: 0,
                broadcasts: HashMap::new(),
            }),
        });
        let conn = AppServerConn::open(group, stream)?;
        Ok((conn, AppServerEvents { rx }))
    }

    /// Opens one more connection to the same gate with the same secret, name and timeout. It
    /// shares this one's pending receipts and event queue, as the gate spreads receipts,
    /// upstream requests and GPS over all of an app-server's connections. `Closed` once the
    /// group ended ([`Event::GateLost`]).
    pub fn connect_another(&self) -> Result<AppServerConn, ClientError> {
        if lock(&self.group.state).events.is_none() {
            return Err(ClientError::Closed);
        }
        let stream = TcpStream::connect_timeout(&self.group.addr, self.group.timeout)?;
        AppServerConn::open(Arc::clone(&self.group), stream)
    }

    /// Says hello on a fresh socket, joins the group and starts the reader thread.
    fn open(group: Arc<Group>, stream: TcpStream) -> Result<AppServerConn, ClientError> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(group.timeout))?;
        stream.set_read_timeout(Some(group.timeout))?;
        let mut frames = FrameReader::new(Limits::SIDECAR);
        let mut enc = Encoder::new();
        let mut out = Vec::with_capacity(256);
        enc.frame(&mut out, FrameType::Request, Cmd::AppServerHello, HELLO_SEQ, 0, |b| {
            let secret = b.create_vector(&group.secret);
            let name = b.create_string(&group.name);
            wire::AppServerHello::create(
                b,
                &wire::AppServerHelloArgs { secret: Some(secret), name: Some(name) },
            )
        });
        (&stream).write_all(&out)?;
        let mut read_half = stream.try_clone()?;
        let welcome = read_welcome(&frames.read_frame(&mut read_half)?)?;
        // From now on the reader thread waits for the gate as long as it takes: the sidecar has
        // no idle timeout, and `close` unblocks it.
        stream.set_read_timeout(None)?;

        let id = group.next_conn.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let max_body = if welcome.max_body == 0 { Limits::SIDECAR.max_body } else { welcome.max_body };
        let link = Arc::new(Link {
            id,
            ctl: stream.try_clone()?,
            writer: Mutex::new(Writer { stream, enc, out }),
            seq: AtomicU32::new(HELLO_SEQ),
            max_body,
        });
        let events = {
            let mut st = lock(&group.state);
            let Some(events) = st.events.clone() else {
                // The group ended while this connection said hello.
                let _ = link.ctl.shutdown(Shutdown::Both);
                return Err(ClientError::Closed);
            };
            st.links.insert(id, LinkEntry { link: Arc::clone(&link), in_flight: HashMap::new() });
            events
        };
        let reader = Reader { group: Arc::clone(&group), link: Arc::clone(&link), events };
        let spawned = thread::Builder::new()
            .name(format!("fleetgate-sidecar-{id}"))
            .spawn(move || reader.run(read_half, frames));
        if let Err(e) = spawned {
            // The reader (moved into the failed spawn) is gone; end the connection as its thread
            // would have, so the group's bookkeeping stays whole.
            let events = lock(&group.state).events.clone();
            if let Some(events) = events {
                Reader { group: Arc::clone(&group), link: Arc::clone(&link), events }.finish();
            }
            return Err(ClientError::Io(e));
        }
        Ok(AppServerConn { group, link, welcome })
    }

    /// Sends a push and waits (at most the connection's timeout) for the gate's answer.
    ///
    /// Every (message_id, uid) is registered as pending before the frame is written, since
    /// receipts may arrive before the acceptance. A refusal (`ClientError::Server`: e.g.
    /// LimitExceeded, InvalidField, ShuttingDown) un-registers them: no receipts follow.
    /// On `Timeout` the pairs stay pending and the late answer arrives as
    /// [`Event::PushAnswer`]; on `Closed` they stay pending too (the push may have been
    /// accepted) and end with receipts, GateLost ones if the gate is gone; likewise on
    /// `Unexpected` for an answer that did not verify.
    pub fn push(&self, p: &PushSpec) -> Result<Accepted, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let seq = self.send_push(p, Some(tx))?;
        let answer = match rx.recv_timeout(self.group.timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Disconnected) => return Err(ClientError::Closed),
            Err(RecvTimeoutError::Timeout) => {
                // The reader hands answers over under the group lock, so either the push is
                // still in flight (and its answer will become an event) or the answer is
                // already in the channel (or the connection ended).
                let mut st = lock(&self.group.state);
                let in_flight = st.links.get_mut(&self.link.id).and_then(|e| e.in_flight.get_mut(&seq));
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
        self.send_push(p, None)
    }

    /// Encodes, registers and writes a push; the write lock is held from encoding to writing, so
    /// pushes go out in sequence-id order.
    fn send_push(&self, p: &PushSpec, waiter: Option<SyncSender<Answer>>) -> Result<u32, ClientError> {
        let sent_at_us = now_us();
        let mut guard = lock(&self.link.writer);
        let seq = self.link.next_seq();
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
        self.link.check_size(out)?;
        self.group.register(self.link.id, seq, p, waiter)?;
        if let Err(e) = self.link.write(stream, out) {
            drop(guard);
            self.group.unregister_unsent(self.link.id, seq, p.message_id);
            return Err(e);
        }
        Ok(seq)
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

    /// What the gate announced on this connection.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// This connection's id within its group (the `conn` of its events and upstream requests).
    pub fn conn_id(&self) -> u32 {
        self.link.id
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

    /// Pushes sent on this connection and not answered yet.
    pub fn pushes_in_flight(&self) -> usize {
        lock(&self.group.state).links.get(&self.link.id).map_or(0, |e| e.in_flight.len())
    }

    /// Shuts both directions of this connection down. Its reader then reports the end:
    /// [`Event::ConnectionLost`], or GateLost receipts and [`Event::GateLost`] if it was the
    /// group's last connection.
    pub fn close(&self) -> Result<(), ClientError> {
        match self.link.ctl.shutdown(Shutdown::Both) {
            Err(e) if e.kind() != ErrorKind::NotConnected => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Drop for AppServerConn {
    /// Closes the connection, so its reader thread ends instead of outliving the handle.
    fn drop(&mut self) {
        let _ = self.link.ctl.shutdown(Shutdown::Both);
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
        }),
        _ => Err(ClientError::Unexpected(format!("expected an AppServerWelcome, got {:?}", f.cmd))),
    }
}

/// The receiver of events went away: the reader stops.
struct Gone;

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
        loop {
            let step = match frames.read_frame(&mut stream) {
                Ok(f) => self.dispatch(&f),
                Err(ClientError::Rejected { header, error }) => self.rejected(header, &error),
                // No read timeout is set after the hello; should one fire, nothing is lost.
                Err(ClientError::Timeout) => Ok(()),
                // EOF, reset, lost framing: the connection is over.
                Err(_) => break,
            };
            if step.is_err() {
                break;
            }
        }
        self.finish();
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
        let mut duplicates = 0;
        if let Some(list) = r.receipts() {
            let now = Instant::now();
            let mut st = lock(&self.group.state);
            for rc in list.iter() {
                let (message_id, uid) = (rc.message_id(), rc.uid());
                if st.resolve(message_id, uid, now) {
                    fresh.push(Event::Receipt {
                        message_id,
                        uid,
                        outcome: known_outcome(Outcome(rc.outcome())),
                    });
                } else {
                    duplicates += 1;
                }
            }
        }
        self.group.duplicates.fetch_add(duplicates, Ordering::Relaxed);
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
            if matches!(&answer, Err(e) if e.refused) {
                st.unregister(f.message_id);
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
    /// `push` calls wake up with `Closed`); then, if it was the group's last connection, every
    /// pending pair gets a GateLost receipt and the group ends with `GateLost`.
    fn finish(self) {
        let _ = self.link.ctl.shutdown(Shutdown::Both);
        let (mut lost, pending) = {
            let mut st = lock(&self.group.state);
            let in_flight = st.links.remove(&self.link.id).map(|e| e.in_flight).unwrap_or_default();
            // Dropping a waiter's sender here is what wakes its `push` with `Closed`.
            let lost: Vec<(u32, u64)> = in_flight
                .into_iter()
                .filter(|(_, f)| f.waiter.is_none())
                .map(|(seq, f)| (seq, f.message_id))
                .collect();
            let pending = if st.links.is_empty() {
                st.events = None;
                st.broadcasts.clear();
                st.pending_len = 0;
                Some(std::mem::take(&mut st.pending))
            } else {
                None
            };
            (lost, pending)
        };
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
        for (seq, message_id) in lost {
            let result = Err(lost_answer.clone());
            if self.emit(Event::PushAnswer { conn, seq, message_id, result }).is_err() {
                return;
            }
        }
        let Some(pending) = pending else {
            let _ = self.emit(Event::ConnectionLost { conn });
            return;
        };
        let mut pairs: Vec<(u64, u64)> =
            pending.into_iter().flat_map(|(m, uids)| uids.into_iter().map(move |u| (m, u))).collect();
        pairs.sort_unstable();
        for (message_id, uid) in pairs {
            if self.emit(Event::Receipt { message_id, uid, outcome: Outcome::GateLost }).is_err() {
                return;
            }
        }
        let _ = self.emit(Event::GateLost);
    }
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

    /// Accepts one sidecar connection and answers its hello: a Welcome announcing `max_body`
    /// for the right secret; Error BadSecret and a close (then `None`) for a wrong one.
    fn accept(l: &TcpListener, max_body: u32) -> Option<Side> {
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
                    &wire::AppServerWelcomeArgs { node: Some(node), max_body, max_targets: 50_000 },
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
            g.expect_ack(5, 2);

            // A pipelined push whose first receipt beats its acceptance; then the gate goes away
            // with its second receipt still owed.
            let (p8, message_id, uids) = g.read_push();
            assert_eq!((message_id, uids.as_slice()), (8, &[60, 61][..]));
            g.receipts(6, 3, &[(8, 60, Outcome::Delivered)]);
            g.accept_push(&p8, 8, 2);
            g.expect_ack(6, 3);
        });

        let (conn, events) = AppServerConn::connect(addr, SECRET, "dispatch-1", T).expect("connect");
        assert_eq!(
            conn.welcome(),
            &Welcome { node: "127.0.0.1:7100".to_owned(), max_body: 8 << 20, max_targets: 50_000 }
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
        assert_eq!(next(&events), receipt(8, 61, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);
        gate.join().expect("fake gate");

        // The group is over: nothing more arrives, and nothing more can be sent.
        assert!(matches!(events.recv_timeout(T), Err(RecvTimeoutError::Disconnected)));
        assert_eq!(conn.pending_receipts(), 0);
        assert!(matches!(conn.push(&spec(9, &[1])), Err(ClientError::Closed)));
        assert!(matches!(conn.reply(&req, 0, "late", b""), Err(ClientError::Closed)));
        assert!(matches!(conn.connect_another(), Err(ClientError::Closed)));
        conn.close().expect("closing a closed connection is fine");
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
        let (a, events) = AppServerConn::connect(addr, SECRET, "dispatch-1", T).expect("connect a");
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
            g.accept_push(&p, 2, 0);
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
        assert_eq!(conn.push(&all).expect("broadcast").targets, 0);
        assert_eq!(next(&events), receipt(2, 70, Outcome::Delivered));
        assert_eq!(next(&events), receipt(2, 71, Outcome::Offline));
        assert!(matches!(conn.push(&all), Err(ClientError::Unexpected(_))), "a broadcast id is tracked too");
        // The resent batch added nothing: GPS (no points) comes next.
        assert_eq!(next(&events), Event::Gps(Vec::new()));
        assert_eq!(conn.duplicate_receipts(), 2);
        conn.close().expect("close");
        // The broadcast owes nothing; push 1's receipt does.
        assert_eq!(next(&events), receipt(1, 1, Outcome::GateLost));
        assert_eq!(next(&events), Event::GateLost);
        gate.join().expect("fake gate");
    }
}
