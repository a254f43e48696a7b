//! One logic shard: the sessions, pushes, pending requests and GPS of its uids, stepped by
//! inputs and a clock.

use crate::directory::Directory;
use crate::directory::{ResumeRefused, ResumeSecret};
use crate::geo::{Filter, GeoIndex, Hit, Query};
use crate::gps::{Coalescer, Forward, GpsStats};
use crate::push::{outcome, Inflight, Origin, PushContent, Receipt, TtlIndex, ACK_GRACE_MS};
use crate::upstream::{Pending, Requests};
use crate::ConnRef;
use schema::wire::{GpsPoint, UidGpsPoint};
use std::sync::Arc;

/// Work done per `tick` call at most, so one tick cannot stall the executor; the rest waits for
/// the next tick (the deadline stays in the past, so it comes at once).
const MAX_EXPIRED_PER_TICK: usize = 4096;

/// Least hold of a session moving to another node as its node drains: the app waits its
/// go-away's retry-after, then resumes there.
const MOVING_HOLD_MS: u64 = 10_000;

/// Settings of a logic shard.
#[derive(Clone, Copy, Debug)]
pub struct ShardConfig {
    /// This shard's index.
    pub id: u16,
    /// How often waiting GPS points are flushed, in ms.
    pub gps_flush_ms: u64,
    /// Coalesce to the latest point, or forward all.
    pub gps_forward: Forward,
    /// Bound on points buffered between flushes in `Forward::All`.
    pub gps_max_buffered: usize,
    /// Pushes in flight per session; past it, `QueueFull`.
    pub push_queue_len: usize,
    /// Upstream requests pending on this shard; past it, `Overloaded`.
    pub max_pending_requests: usize,
    /// How long the app-server has to answer an upstream request, ms.
    pub request_timeout_ms: u64,
    /// How long a session is held after its connection drops, ms (0: not held).
    pub hold_ms: u64,
    /// Held sessions at most; a drop past it ends the session at once.
    pub max_held: usize,
    /// Body bytes in flight or queued per session; past it, `QueueFull`.
    pub push_queue_bytes: usize,
    /// Cluster mode (several nodes sharing a directory in Redis): every session is claimed in
    /// the shared directory and released when it ends, and a push the app-server gave this
    /// node for a uid with no session here is looked for on the other nodes instead of ending
    /// `Offline`.
    pub clustered: bool,
    /// Keep the geo index of drivers' newest points (GeoQuery, GeoPush); off, GPS costs a
    /// little less and geo requests find no driver (the benchmark compares the two).
    pub geo_index: bool,
}

/// Why a connection closed, as the logic shard needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Dropped, timed out, or closed for a protocol error: the session is held.
    Dropped,
    /// Closed as a slow consumer.
    SlowConsumer,
    /// The gate is shutting down.
    Shutdown,
    /// Cluster mode: the node is draining and the app was told to resume on another node: the
    /// session is held (whatever the hold settings) until it is handed over there.
    Moving,
}

/// An upstream failure the gate reports to the app as an error frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFailure {
    /// No app-server connection to take it.
    NoAppServer,
    /// The app-server did not answer in time.
    Timeout,
    /// Too many requests pending on the shard.
    Overloaded,
    /// The gate is shutting down.
    ShuttingDown,
    /// The app-server answered with an Error frame, or its reply does not fit the app's body
    /// limit.
    AppServerError,
}

/// `Input::End` tags carry the gate shard waiting for the answer in their top 16 bits.
pub const END_TAG_SHIFT: u32 = 48;

/// `Input::Geo` tags carry the gate shard waiting for the answer in their top 16 bits, as
/// `Input::End`'s do.
pub const GEO_TAG_SHIFT: u32 = END_TAG_SHIFT;

/// A broadcast's count being gathered on the gate shard that accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    /// The gate shard that accepted the broadcast.
    pub shard: u16,
    /// Its id for the broadcast.
    pub id: u64,
}

/// What the gate tells a logic shard.
#[derive(Clone, Debug)]
pub enum Input {
    /// A connection presented a valid token for `uid` (the gate verified it).
    Login {
        /// The user.
        uid: u64,
        /// `wire::Role` value from the token.
        role: u8,
        /// The connection that logged in.
        conn: ConnRef,
        /// The login request's log-id.
        log_id: u64,
        /// The login request's sequence-id, echoed in the answer.
        seq: u32,
        /// Wall-clock ms since the Unix epoch: a floor for the new session's epoch, so epochs
        /// keep growing across restarts. (`now_ms` everywhere else is the gate's monotonic
        /// clock, which deadlines use.)
        wall_ms: u64,
        /// The resumption secret of the secure channel the login came over (none in plaintext):
        /// the psk of the session's next resume.
        resume_secret: Option<ResumeSecret>,
    },
    /// A connection presented a valid resume token (the gate verified its MAC).
    Resume {
        /// The user.
        uid: u64,
        /// The session epoch the token was issued for.
        epoch: u64,
        /// The session's resume count the token was issued for; `None` when the secure channel
        /// already proved the resume current (its psk is the session's newest secret, and a
        /// resume whose answer was lost must still work with the token the app holds).
        resumes: Option<u32>,
        /// The new connection.
        conn: ConnRef,
        /// The resume request's log-id.
        log_id: u64,
        /// The resume request's sequence-id.
        seq: u32,
        /// The secure channel's new resumption secret, the session's from now on (none in
        /// plaintext).
        resume_secret: Option<ResumeSecret>,
    },
    /// A ResumeHello on the secure channel names this session: its resumption secret, please.
    ResumeSecret {
        /// The user.
        uid: u64,
        /// The session's epoch, from the resume token.
        epoch: u64,
        /// The connection that asks.
        conn: ConnRef,
    },
    /// The app logged out.
    Logout {
        /// The user.
        uid: u64,
        /// Its connection.
        conn: ConnRef,
        /// The logout request's log-id.
        log_id: u64,
        /// The logout request's sequence-id.
        seq: u32,
    },
    /// The connection closed without logout.
    Closed {
        /// The user.
        uid: u64,
        /// The connection that closed.
        conn: ConnRef,
        /// Why.
        reason: CloseReason,
    },
    /// One GPS point of a driver, copied out of its frame.
    Gps {
        /// The driver.
        uid: u64,
        /// The point.
        point: GpsPoint,
    },
    /// A push to these uids (all owned by this shard, no duplicates).
    Push {
        /// What to deliver.
        push: Arc<PushContent>,
        /// The targets.
        uids: Vec<u64>,
    },
    /// A push to every session of a role on this shard.
    Broadcast {
        /// What to deliver.
        push: Arc<PushContent>,
        /// `wire::Role` value.
        role: u8,
        /// Where to report how many targets this shard took (`Output::BroadcastCounted`).
        tally: Tally,
    },
    /// The app acked the push it got with `seq`.
    PushAck {
        /// The app.
        uid: u64,
        /// The connection the ack came on.
        conn: ConnRef,
        /// The delivery's sequence-id.
        seq: u32,
        /// The message id the ack names: it must be the push's sent under `seq`.
        message_id: u64,
        /// The ack's log-id, echoed in an error about it.
        log_id: u64,
        /// When the gate read the ack (monotonic µs; 0: unknown), carried to its receipt.
        read_us: u64,
    },
    /// An app request for the app-server.
    Upstream {
        /// The app.
        uid: u64,
        /// Its role.
        role: u8,
        /// The connection it came on.
        conn: ConnRef,
        /// The app's sequence-id.
        seq: u32,
        /// The app's log-id.
        log_id: u64,
        /// The app's cmd.
        cmd: u16,
        /// The app's body, verified, copied out.
        body: Vec<u8>,
    },
    /// The app-server answered a request.
    UpstreamReply {
        /// The request.
        request_id: u64,
        /// The `Reply` body for the app, already encoded.
        reply: Vec<u8>,
    },
    /// The gate could not hand a request to any app-server connection, or the connection that
    /// had it dropped before answering.
    UpstreamUndeliverable {
        /// The request.
        request_id: u64,
    },
    /// The request failed at the app-server (an Error answer, or a reply too large for the app).
    UpstreamFailed {
        /// The request.
        request_id: u64,
        /// Why, for the app's error frame.
        message: String,
    },
    /// The gate is shutting down: end every push and request.
    Shutdown,
    /// Cluster mode: the shared directory holds a newer session of `uid` on another node (this
    /// node's claim lost, or a later claim elsewhere replaced it). The session of `epoch` ends
    /// here as displaced; a newer local session of the uid is left alone.
    Superseded {
        /// The user.
        uid: u64,
        /// The local session's epoch.
        epoch: u64,
    },
    /// Cluster mode: the directory came back after an outage (or lost its data): claim every
    /// session of this shard again.
    Reclaim,
    /// Cluster mode: node `to` asks for the session of `uid` of `epoch` (its app resumes there):
    /// hand it over with its pushes, or say it is not here.
    HandOver {
        /// The user.
        uid: u64,
        /// The session's epoch, from the app's resume token.
        epoch: u64,
        /// The asking node.
        to: Origin,
    },
    /// Cluster mode: a session another node handed over; it is held here from now on, until
    /// its app resumes (or its hold ends).
    Install {
        /// The user.
        uid: u64,
        /// The session.
        session: Box<Handed>,
    },
    /// An app-server ends `uid`'s session (e.g. its account was banned): connected or held, it
    /// ends at once, its unacked and queued pushes with Offline receipts, with no Unreachable
    /// event (the app-server asked). Answered with `Output::EndAnswered` in any case.
    End {
        /// The user.
        uid: u64,
        /// The gate's id for the ask (the gate shard that waits for the answer in its top 16
        /// bits), echoed in the answer.
        tag: u64,
        /// The ask's log-id.
        log_id: u64,
        /// For the app's GoAway.
        message: String,
    },
    /// An app-server's GeoQuery or GeoPush: this shard's nearest drivers for `query`.
    /// Answered with `Output::GeoAnswered`.
    Geo {
        /// The gate's id for the request (the gate shard that merges the answers in its top 16
        /// bits), echoed in the answer.
        tag: u64,
        /// The selection.
        query: Query,
    },
}

/// A session on its way from one node to another: everything a resume needs.
#[derive(Clone, Debug)]
pub struct Handed {
    /// `wire::Role` value.
    pub role: u8,
    /// The session's epoch (kept: the app's resume token names it).
    pub epoch: u64,
    /// Resumes so far (the app's token is bound to the count).
    pub resumes: u32,
    /// The secure channel's resumption secret.
    pub resume_secret: Option<ResumeSecret>,
    /// How long the session may still be held, ms.
    pub hold_left_ms: u64,
    /// The last sequence-id the session used, so numbering continues.
    pub last_seq: u32,
    /// Pushes not yet acked (sent or queued), in sequence order.
    pub pushes: Vec<HandedPush>,
}

/// One unacked push of a handed-over session.
#[derive(Clone, Debug)]
pub struct HandedPush {
    /// Its sequence-id in the session.
    pub seq: u32,
    /// The push; `origin` names the node its receipt goes to, as the receiving side knows it.
    pub push: Arc<PushContent>,
    /// Time-to-live left, ms.
    pub ttl_left_ms: u64,
    /// Written to a connection before (a resume marks it a redelivery).
    pub sent: bool,
}

/// What a logic shard asks the gate to do.
#[derive(Clone, Debug)]
pub enum Output {
    /// Answer the login: the session exists now.
    LoginOk {
        /// The connection to answer.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// `wire::Role` value.
        role: u8,
        /// The new session's epoch.
        epoch: u64,
        /// The login's log-id.
        log_id: u64,
        /// The login's sequence-id.
        seq: u32,
    },
    /// Tell a connection its session was taken by a newer login, then close it.
    Displaced {
        /// The displaced connection.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// The newer login's log-id, so both ends of the displacement share one trace; 0 when
        /// the newer login was on another node (the gate assigns one).
        log_id: u64,
    },
    /// Cluster mode: a resume (or a secure channel's question for a session's secret) named a
    /// session this node does not hold: the gate asks the node the directory names to hand it
    /// over, then feeds `retry` again (or refuses it when no node has the session).
    Missing {
        /// The user.
        uid: u64,
        /// The session's epoch, from the app's resume token.
        epoch: u64,
        /// The input to feed again once the session is here: `Resume` or `ResumeSecret`.
        retry: Box<Input>,
    },
    /// Cluster mode: the session asked for by node `to`, removed here; the gate sends it there.
    /// Its pushes' receipts are owed by their origins, which now wait on `to`.
    HandedOver {
        /// The user.
        uid: u64,
        /// The asking node.
        to: Origin,
        /// The session.
        session: Box<Handed>,
    },
    /// Cluster mode: node `to` asked for a session that is not here (ended, or another epoch).
    NotHere {
        /// The user.
        uid: u64,
        /// The epoch asked for.
        epoch: u64,
        /// The asking node.
        to: Origin,
    },
    /// Answer the resume: the session continues on `conn`; its queued pushes follow.
    ResumeOk {
        /// The connection to answer.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// `wire::Role` value.
        role: u8,
        /// The session's epoch.
        epoch: u64,
        /// The session's resume count now (the next token is bound to it).
        resumes: u32,
        /// The resume's log-id.
        log_id: u64,
        /// The resume's sequence-id.
        seq: u32,
        /// The session came from a connection on another gate shard.
        moved: bool,
    },
    /// Refuse the resume; the app logs in afresh.
    ResumeRefused {
        /// The connection to answer.
        conn: ConnRef,
        /// The resume's log-id.
        log_id: u64,
        /// The resume's sequence-id.
        seq: u32,
        /// Why.
        why: crate::directory::ResumeRefused,
    },
    /// The answer to `Input::ResumeSecret`: the session's resumption secret, or none (no such
    /// session, another epoch, or a session that came over plaintext).
    ResumeSecret {
        /// The connection that asked.
        conn: ConnRef,
        /// The secret.
        secret: Option<ResumeSecret>,
    },
    /// Tell the app-server a uid's session ended without logout.
    Unreachable {
        /// The user.
        uid: u64,
        /// `wire::Outcome` value: why.
        outcome: u8,
    },
    /// Answer the logout, then close.
    LogoutOk {
        /// The connection to answer.
        conn: ConnRef,
        /// The logout's log-id.
        log_id: u64,
        /// The logout's sequence-id.
        seq: u32,
    },
    /// Write a push to a connection with this sequence-id.
    Deliver {
        /// The connection.
        conn: ConnRef,
        /// The session's sequence-id for this push.
        seq: u32,
        /// The push.
        push: Arc<PushContent>,
        /// Sent before on this session (replayed after a resume).
        redelivery: bool,
    },
    /// A final receipt for the app-server.
    Receipt(Receipt),
    /// An ack named another message id than the push sent under its sequence-id: the app gets
    /// an InvalidField error, and the push stays in flight (a correct ack may still come).
    AckMismatch {
        /// The connection the ack came on.
        conn: ConnRef,
        /// The ack's sequence-id.
        seq: u32,
        /// The ack's log-id.
        log_id: u64,
        /// The message id the ack named.
        message_id: u64,
    },
    /// A request for the app-server.
    Upstream {
        /// Id the app-server echoes.
        request_id: u64,
        /// The app.
        uid: u64,
        /// Its role.
        role: u8,
        /// The app's cmd.
        cmd: u16,
        /// The app's body.
        body: Vec<u8>,
        /// The app's log-id.
        log_id: u64,
    },
    /// The app-server's answer, for the app.
    Reply {
        /// The connection to answer.
        conn: ConnRef,
        /// The app's cmd.
        cmd: u16,
        /// The app's sequence-id.
        seq: u32,
        /// The app's log-id.
        log_id: u64,
        /// Encoded `Reply` body.
        reply: Vec<u8>,
    },
    /// A request failed; the app gets an error frame.
    RequestFailed {
        /// The connection to answer.
        conn: ConnRef,
        /// The app's cmd.
        cmd: u16,
        /// The app's sequence-id.
        seq: u32,
        /// The app's log-id.
        log_id: u64,
        /// Why.
        failure: RequestFailure,
        /// Detail for the app (the app-server's own message for `AppServerError`); empty: the
        /// gate's standard text for `failure`.
        message: String,
    },
    /// How many sessions of this shard a broadcast targets: each gets exactly one receipt. The
    /// accepting gate shard sums the counts of every logic shard into `PushAccepted.targets`.
    BroadcastCounted {
        /// The accepting shard's tally.
        tally: Tally,
        /// Targets on this logic shard.
        targets: u32,
    },
    /// A batch of GPS points for the app-server side.
    GpsBatch(Vec<UidGpsPoint>),
    /// Cluster mode: record in the shared directory that this node holds `uid`'s session of
    /// `epoch` (a login, or a reclaim after an outage).
    Claim {
        /// The user.
        uid: u64,
        /// The session's epoch.
        epoch: u64,
    },
    /// Cluster mode: the session of `epoch` ended here; remove it from the shared directory if
    /// it still names this node and epoch.
    Release {
        /// The user.
        uid: u64,
        /// The ended session's epoch.
        epoch: u64,
    },
    /// Cluster mode: no session here for these targets of a push this node accepted: the gate
    /// asks the directory which node holds each and forwards the push there. Each target still
    /// ends in exactly one receipt, now owed by the gate.
    Elsewhere {
        /// The push.
        push: Arc<PushContent>,
        /// The targets with no session here.
        uids: Vec<u64>,
    },
    /// The app-server ended the session on `conn`: tell the app (GoAway Ended), then close.
    Ended {
        /// The connection.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// The ask's log-id.
        log_id: u64,
        /// The app-server's message for the app.
        message: String,
    },
    /// The answer to `Input::End`.
    EndAnswered {
        /// The ask's tag.
        tag: u64,
        /// The user.
        uid: u64,
        /// A session was found here and ended.
        found: bool,
    },
    /// The answer to `Input::Geo`: this shard's `k` nearest drivers that qualify, nearest
    /// first.
    GeoAnswered {
        /// The request's tag.
        tag: u64,
        /// The drivers.
        hits: Vec<Hit>,
    },
}

impl Output {
    /// The gate shard that must carry this output out: the one holding its connection (or the
    /// broadcast's tally); `None` for what goes to the app-server side, which any shard can send.
    pub fn gate_shard(&self) -> Option<u16> {
        match self {
            Output::LoginOk { conn, .. }
            | Output::ResumeOk { conn, .. }
            | Output::ResumeRefused { conn, .. }
            | Output::ResumeSecret { conn, .. }
            | Output::Displaced { conn, .. }
            | Output::LogoutOk { conn, .. }
            | Output::Deliver { conn, .. }
            | Output::Reply { conn, .. }
            | Output::RequestFailed { conn, .. }
            | Output::AckMismatch { conn, .. }
            | Output::Ended { conn, .. } => Some(conn.shard),
            Output::BroadcastCounted { tally, .. } => Some(tally.shard),
            Output::EndAnswered { tag, .. } => Some((tag >> END_TAG_SHIFT) as u16),
            Output::GeoAnswered { tag, .. } => Some((tag >> GEO_TAG_SHIFT) as u16),
            Output::Receipt(_)
            | Output::Upstream { .. }
            | Output::GpsBatch(_)
            | Output::Unreachable { .. }
            | Output::Claim { .. }
            | Output::Release { .. }
            | Output::Elsewhere { .. }
            | Output::Missing { .. }
            | Output::HandedOver { .. }
            | Output::NotHere { .. } => None,
        }
    }
}

/// One logic shard.
#[derive(Debug)]
pub struct Shard {
    /// Settings.
    cfg: ShardConfig,
    /// Sessions of this shard's uids.
    pub directory: Directory,
    /// GPS waiting for the next flush.
    gps: Coalescer,
    /// When the next GPS flush is due: armed by the first point after an idle spell, then kept
    /// on a steady cadence of `gps_flush_ms` while flushes find points, disarmed by a flush that
    /// finds none (an idle shard takes no GPS ticks).
    gps_due_ms: Option<u64>,
    /// In-flight pushes by deadline.
    ttl: TtlIndex,
    /// Upstream requests waiting for the app-server.
    requests: Requests,
    /// Reused buffer for expiry.
    due: Vec<(u64, u32)>,
    /// Reused buffer for receipts before they become outputs.
    receipts: Vec<Receipt>,
    /// The newest point of every driver with a session here, for geo queries: a uid is in it
    /// only while its session lives (every place a session ends here forgets it).
    pub geo: GeoIndex,
}

impl Shard {
    /// A shard with no sessions.
    pub fn new(cfg: ShardConfig) -> Shard {
        Shard {
            cfg,
            directory: Directory::default(),
            gps: Coalescer::new(cfg.gps_forward, cfg.gps_max_buffered),
            gps_due_ms: None,
            ttl: TtlIndex::default(),
            requests: Requests::default(),
            due: Vec::new(),
            receipts: Vec::new(),
            geo: GeoIndex::new(),
        }
    }

    /// Applies one input at `now_ms`, appending what to do to `out`.
    pub fn handle(&mut self, input: Input, now_ms: u64, out: &mut Vec<Output>) {
        match input {
            Input::Login { uid, role, conn, log_id, seq, wall_ms, resume_secret } => {
                let r = self.directory.login(uid, role, conn, wall_ms, resume_secret);
                if let Some(mut old) = r.displaced {
                    old.pushes.drain_into(uid, outcome::DISPLACED, &mut self.ttl, &mut self.receipts);
                    if old.conn != conn {
                        out.push(Output::Displaced { conn: old.conn, uid, log_id });
                    }
                }
                out.push(Output::LoginOk { conn, uid, role, epoch: r.epoch, log_id, seq });
                if self.cfg.clustered {
                    out.push(Output::Claim { uid, epoch: r.epoch });
                }
            }
            Input::Logout { uid, conn, log_id, seq } => {
                if let Some(mut e) = self.directory.remove_if(uid, conn) {
                    e.pushes.drain_into(uid, outcome::OFFLINE, &mut self.ttl, &mut self.receipts);
                    self.released(uid, e.epoch, out);
                }
                out.push(Output::LogoutOk { conn, log_id, seq });
            }
            Input::Closed { uid, conn, reason } => {
                let held = match reason {
                    CloseReason::Dropped => {
                        self.cfg.hold_ms > 0
                            && self.directory.held_count() < self.cfg.max_held
                            && self.directory.hold(uid, conn, now_ms + self.cfg.hold_ms)
                    }
                    CloseReason::Moving => {
                        self.directory.hold(uid, conn, now_ms + self.cfg.hold_ms.max(MOVING_HOLD_MS))
                    }
                    CloseReason::SlowConsumer | CloseReason::Shutdown => false,
                };
                if !held {
                    if let Some(mut e) = self.directory.remove_if(uid, conn) {
                        let o = match reason {
                            CloseReason::Dropped | CloseReason::Moving => outcome::HOLD_EXPIRED,
                            CloseReason::SlowConsumer => outcome::SLOW_CONSUMER,
                            CloseReason::Shutdown => outcome::SHUTDOWN,
                        };
                        e.pushes.drain_into(uid, o, &mut self.ttl, &mut self.receipts);
                        out.push(Output::Unreachable { uid, outcome: o });
                        self.released(uid, e.epoch, out);
                    }
                }
            }
            Input::ResumeSecret { uid, epoch, conn } => {
                if self.cfg.clustered && self.directory.get(uid).is_none() {
                    let retry = Box::new(Input::ResumeSecret { uid, epoch, conn });
                    out.push(Output::Missing { uid, epoch, retry });
                    return;
                }
                let secret =
                    self.directory.get(uid).filter(|e| e.epoch == epoch).and_then(|e| e.resume_secret);
                out.push(Output::ResumeSecret { conn, secret });
            }
            Input::Resume { uid, epoch, resumes, conn, log_id, seq, resume_secret } => {
                match self.directory.resume(uid, epoch, resumes, conn, resume_secret) {
                    Err(ResumeRefused::NoSession) if self.cfg.clustered => {
                        let retry =
                            Box::new(Input::Resume { uid, epoch, resumes, conn, log_id, seq, resume_secret });
                        out.push(Output::Missing { uid, epoch, retry });
                    }
                    Err(why) => out.push(Output::ResumeRefused { conn, log_id, seq, why }),
                    Ok(r) => {
                        if r.was_attached {
                            out.push(Output::Displaced { conn: r.previous, uid, log_id });
                        }
                        if let Some(e) = self.directory.get_mut(uid) {
                            out.push(Output::ResumeOk {
                                conn,
                                uid,
                                role: e.role,
                                epoch,
                                resumes: e.resumes,
                                log_id,
                                seq,
                                moved: r.previous.shard != conn.shard,
                            });
                            // Replay in order: what was sent and not acked, then what queued.
                            for (&seq, f) in e.pushes.inflight.iter_mut() {
                                out.push(Output::Deliver {
                                    conn,
                                    seq,
                                    push: f.push.clone(),
                                    redelivery: f.sent,
                                });
                                f.sent = true;
                            }
                        }
                    }
                }
            }
            Input::Gps { uid, point } => {
                // Only a driver with a session here is indexed: a point still on its way when
                // the session ended must not bring it back. An indexed driver has a session
                // (every end forgets it), so only a new one needs the directory.
                if self.cfg.geo_index {
                    let (lat_e7, lon_e7, ts_ms) = (point.lat_e7(), point.lon_e7(), point.ts_ms());
                    if !self.geo.update_known(uid, lat_e7, lon_e7, ts_ms, now_ms)
                        && self.directory.get(uid).is_some()
                    {
                        self.geo.update(uid, lat_e7, lon_e7, ts_ms, now_ms);
                    }
                }
                self.gps.push(uid, point);
                // The first point after a flush arms the next one; an idle shard arms nothing.
                if self.gps_due_ms.is_none() {
                    self.gps_due_ms = Some(now_ms + self.cfg.gps_flush_ms);
                }
            }
            Input::Push { push, uids } => {
                let mut elsewhere = Vec::new();
                for uid in uids {
                    // Cluster mode: a target with no session here may be on another node (a push
                    // another node forwarded, too: the session may have moved on meanwhile).
                    if self.cfg.clustered && self.directory.get(uid).is_none() {
                        elsewhere.push(uid);
                    } else {
                        self.push_one(uid, &push, out);
                    }
                }
                if !elsewhere.is_empty() {
                    out.push(Output::Elsewhere { push, uids: elsewhere });
                }
            }
            Input::Broadcast { push, role, tally } => {
                let uids = self.uids_of_role(role);
                out.push(Output::BroadcastCounted { tally, targets: uids.len() as u32 });
                for uid in uids {
                    self.push_one(uid, &push, out);
                }
            }
            Input::PushAck { uid, conn, seq, message_id, log_id, read_us } => {
                if let Some(e) = self.directory.get_mut(uid).filter(|e| e.conn == conn) {
                    match e.pushes.inflight.get(&seq) {
                        // Not the push sent under `seq`: a broken app must not end another
                        // push's pair (nor leave it unacked unnoticed), so it is told, and the
                        // push waits for its own ack or its expiry.
                        Some(f) if f.push.message_id != message_id => {
                            out.push(Output::AckMismatch { conn, seq, log_id, message_id });
                        }
                        Some(_) => {
                            if let Some(f) = e.pushes.remove(seq) {
                                self.ttl.remove(f.expires_ms, uid, seq);
                                // Taken at its expiry or later (the timer has not run yet): the
                                // pair has ended TtlExpired, whatever this turn still finds.
                                let o = if now_ms < f.expires_ms {
                                    outcome::DELIVERED
                                } else {
                                    outcome::TTL_EXPIRED
                                };
                                // The ack's read time goes with the receipt it caused.
                                let r = Receipt::of(&f.push, uid, o);
                                self.receipts.push(Receipt { acked_us: read_us, ..r });
                            }
                        }
                        // An ack for a push already ended (acked twice, expired) is ignored: its
                        // receipt was sent.
                        None => {}
                    }
                }
            }
            Input::Upstream { uid, role, conn, seq, log_id, cmd, body } => {
                let p = Pending {
                    uid,
                    conn,
                    seq,
                    log_id,
                    cmd,
                    deadline_ms: now_ms + self.cfg.request_timeout_ms,
                };
                match self.requests.insert(self.cfg.id, p, self.cfg.max_pending_requests) {
                    Some(request_id) => {
                        out.push(Output::Upstream { request_id, uid, role, cmd, body, log_id })
                    }
                    None => out.push(Output::RequestFailed {
                        conn,
                        cmd,
                        seq,
                        log_id,
                        failure: RequestFailure::Overloaded,
                        message: String::new(),
                    }),
                }
            }
            Input::UpstreamReply { request_id, reply } => {
                // A late answer (after the timeout error) finds nothing: the app got one answer.
                if let Some(p) = self.requests.take(request_id) {
                    let conn = self.directory.get(p.uid).map_or(p.conn, |e| e.conn);
                    out.push(Output::Reply { conn, cmd: p.cmd, seq: p.seq, log_id: p.log_id, reply });
                }
            }
            Input::UpstreamUndeliverable { request_id } => {
                if let Some(p) = self.requests.take(request_id) {
                    out.push(self.failed(p, RequestFailure::NoAppServer));
                }
            }
            Input::UpstreamFailed { request_id, message } => {
                if let Some(p) = self.requests.take(request_id) {
                    let conn = self.directory.get(p.uid).map_or(p.conn, |e| e.conn);
                    let failure = RequestFailure::AppServerError;
                    out.push(Output::RequestFailed {
                        conn,
                        cmd: p.cmd,
                        seq: p.seq,
                        log_id: p.log_id,
                        failure,
                        message,
                    });
                }
            }
            Input::Shutdown => {
                for (uid, e) in self.directory.iter_mut() {
                    e.pushes.drain_into(*uid, outcome::SHUTDOWN, &mut self.ttl, &mut self.receipts);
                }
                for id in self.requests.ids() {
                    if let Some(p) = self.requests.take(id) {
                        out.push(self.failed(p, RequestFailure::ShuttingDown));
                    }
                }
                self.flush_gps(out);
            }
            Input::Superseded { uid, epoch } => {
                let ours = self.directory.get(uid).filter(|e| e.epoch == epoch).map(|e| e.conn);
                if let Some(mut e) = ours.and_then(|conn| self.directory.remove_if(uid, conn)) {
                    // Its newer session lives on another node: this node's index forgets it.
                    self.geo.remove(uid);
                    e.pushes.drain_into(uid, outcome::DISPLACED, &mut self.ttl, &mut self.receipts);
                    if e.held_until_ms.is_none() {
                        out.push(Output::Displaced { conn: e.conn, uid, log_id: 0 });
                    }
                }
            }
            Input::Reclaim => {
                if self.cfg.clustered {
                    out.extend(self.directory.iter().map(|(&uid, e)| Output::Claim { uid, epoch: e.epoch }));
                }
            }
            Input::HandOver { uid, epoch, to } => match self.directory.take(uid, epoch) {
                None => out.push(Output::NotHere { uid, epoch, to }),
                Some(mut e) => {
                    // The session lives on at `to`, whose index takes the driver's next point.
                    self.geo.remove(uid);
                    if e.held_until_ms.is_none() {
                        // The app resumed elsewhere while this connection still looked alive.
                        out.push(Output::Displaced { conn: e.conn, uid, log_id: 0 });
                    }
                    let last_seq = e.pushes.last_seq();
                    let mut pushes = Vec::with_capacity(e.pushes.inflight.len());
                    for (seq, f) in std::mem::take(&mut e.pushes.inflight) {
                        self.ttl.remove(f.expires_ms, uid, seq);
                        // Time left to the push's deadline; the taker adds the grace again.
                        let ttl_left_ms = f.expires_ms.saturating_sub(ACK_GRACE_MS).saturating_sub(now_ms);
                        pushes.push(HandedPush { seq, push: f.push, ttl_left_ms, sent: f.sent });
                    }
                    let hold_left_ms = match e.held_until_ms {
                        Some(until) => until.saturating_sub(now_ms),
                        // Attached: its app is resuming on the taker now, or is about to.
                        None => self.cfg.hold_ms.max(MOVING_HOLD_MS),
                    };
                    let session = Box::new(Handed {
                        role: e.role,
                        epoch: e.epoch,
                        resumes: e.resumes,
                        resume_secret: e.resume_secret,
                        hold_left_ms,
                        last_seq,
                        pushes,
                    });
                    out.push(Output::HandedOver { uid, to, session });
                }
            },
            Input::Install { uid, session } => self.install(uid, *session, now_ms, out),
            Input::End { uid, tag, log_id, message } => {
                let conn = self.directory.get(uid).map(|e| e.conn);
                let ended = conn.and_then(|conn| self.directory.remove_if(uid, conn));
                let found = ended.is_some();
                if let Some(mut e) = ended {
                    // The app-server ended it: like a logout, unacked pushes end Offline.
                    e.pushes.drain_into(uid, outcome::OFFLINE, &mut self.ttl, &mut self.receipts);
                    if e.held_until_ms.is_none() {
                        out.push(Output::Ended { conn: e.conn, uid, log_id, message });
                    }
                    self.released(uid, e.epoch, out);
                }
                out.push(Output::EndAnswered { tag, uid, found });
            }
            Input::Geo { tag, query } => {
                let directory = &self.directory;
                let qualifies = |uid| {
                    directory
                        .get(uid)
                        .is_some_and(|e| query.filter == Filter::OnlineOrHeld || e.held_until_ms.is_none())
                };
                let hits = self.geo.nearest(&query, now_ms, qualifies);
                out.push(Output::GeoAnswered { tag, hits });
            }
        }
        self.emit_receipts(out);
    }

    /// Installs a session handed over from another node, held until its app resumes.
    fn install(&mut self, uid: u64, h: Handed, now_ms: u64, out: &mut Vec<Output>) {
        if let Some(e) = self.directory.get(uid) {
            if e.epoch >= h.epoch {
                // A session as new or newer is here already: the handed one lost the race, and
                // its pushes end as displaced (each with its one receipt).
                for p in h.pushes {
                    self.receipts.push(Receipt::of(&p.push, uid, outcome::DISPLACED));
                }
                return;
            }
        }
        let mut pushes = crate::push::PushState::continuing(h.last_seq);
        for p in h.pushes {
            let expires_ms = now_ms + p.ttl_left_ms + ACK_GRACE_MS;
            self.ttl.insert(expires_ms, uid, p.seq);
            pushes.insert(p.seq, Inflight { push: p.push, expires_ms, sent: p.sent });
        }
        // No connection yet: a slot no connection has, on this shard (the resume replaces it).
        let conn = ConnRef { shard: self.cfg.id, slot: u32::MAX, gen: 0 };
        let entry = crate::directory::Entry {
            conn,
            role: h.role,
            epoch: h.epoch,
            pushes,
            held_until_ms: None,
            resumes: h.resumes,
            resume_secret: h.resume_secret,
        };
        if let Some(mut old) = self.directory.install(uid, entry, now_ms + h.hold_left_ms.max(1)) {
            old.pushes.drain_into(uid, outcome::DISPLACED, &mut self.ttl, &mut self.receipts);
            if old.held_until_ms.is_none() {
                out.push(Output::Displaced { conn: old.conn, uid, log_id: 0 });
            }
        }
    }

    /// Every session of this shard: (uid, epoch).
    pub fn sessions(&self) -> Vec<(u64, u64)> {
        self.directory.iter().map(|(&uid, e)| (uid, e.epoch)).collect()
    }

    /// The uids of every session of `role` here (held ones too): a broadcast's targets.
    pub fn uids_of_role(&self, role: u8) -> Vec<u64> {
        self.directory.iter().filter(|(_, e)| e.role == role).map(|(uid, _)| *uid).collect()
    }

    /// True when this shard holds a session of `uid` of `epoch`.
    pub fn holds(&self, uid: u64, epoch: u64) -> bool {
        self.directory.get(uid).is_some_and(|e| e.epoch == epoch)
    }

    /// A session ended here: the geo index forgets its driver, and in cluster mode the shared
    /// directory forgets it too.
    fn released(&mut self, uid: u64, epoch: u64, out: &mut Vec<Output>) {
        self.geo.remove(uid);
        if self.cfg.clustered {
            out.push(Output::Release { uid, epoch });
        }
    }

    fn failed(&self, p: Pending, failure: RequestFailure) -> Output {
        let conn = self.directory.get(p.uid).map_or(p.conn, |e| e.conn);
        Output::RequestFailed {
            conn,
            cmd: p.cmd,
            seq: p.seq,
            log_id: p.log_id,
            failure,
            message: String::new(),
        }
    }

    fn push_one(&mut self, uid: u64, push: &Arc<PushContent>, out: &mut Vec<Output>) {
        let Some(e) = self.directory.get_mut(uid) else {
            self.receipts.push(Receipt::of(push, uid, outcome::OFFLINE));
            return;
        };
        if e.pushes.inflight.len() >= self.cfg.push_queue_len
            || e.pushes.bytes + push.body.len() > self.cfg.push_queue_bytes
        {
            self.receipts.push(Receipt::of(push, uid, outcome::QUEUE_FULL));
            return;
        }
        let seq = e.pushes.take_seq();
        // The pair ends TtlExpired a grace after the push's deadline (the one its body tells the
        // app), counted from the push's acceptance, not from here.
        let expires_ms = push.deadline_ms + ACK_GRACE_MS;
        // A held session queues the push; the resume delivers it.
        let sent = e.held_until_ms.is_none();
        e.pushes.insert(seq, Inflight { push: push.clone(), expires_ms, sent });
        self.ttl.insert(expires_ms, uid, seq);
        if sent {
            out.push(Output::Deliver { conn: e.conn, seq, push: push.clone(), redelivery: false });
        }
    }

    fn emit_receipts(&mut self, out: &mut Vec<Output>) {
        out.extend(self.receipts.drain(..).map(Output::Receipt));
    }

    /// Runs what is due at `now_ms`: GPS flush, push expiry, request timeouts.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if let Some(due) = self.gps_due_ms.filter(|&due| now_ms >= due) {
            // The cadence stays fixed while points flow. Arming on the first point after each
            // flush instead would drift into step with drivers that report once per interval:
            // their points would land just before each flush and every other flush would find
            // nothing armed, one GpsForward every two intervals.
            let flushed = self.flush_gps(out);
            if flushed > 0 {
                let next = due + self.cfg.gps_flush_ms;
                self.gps_due_ms = Some(if next > now_ms { next } else { now_ms + self.cfg.gps_flush_ms });
            }
        }
        let mut due = std::mem::take(&mut self.due);
        self.ttl.pop_due(now_ms, MAX_EXPIRED_PER_TICK, &mut due);
        for (uid, seq) in due.drain(..) {
            if let Some(f) = self.directory.get_mut(uid).and_then(|e| e.pushes.remove(seq)) {
                self.receipts.push(Receipt::of(&f.push, uid, outcome::TTL_EXPIRED));
            }
        }
        self.due = due;
        let mut ended = Vec::new();
        self.directory.pop_expired_holds(now_ms, MAX_EXPIRED_PER_TICK, &mut ended);
        for (uid, mut e) in ended {
            e.pushes.drain_into(uid, outcome::HOLD_EXPIRED, &mut self.ttl, &mut self.receipts);
            out.push(Output::Unreachable { uid, outcome: outcome::HOLD_EXPIRED });
            self.released(uid, e.epoch, out);
        }
        let mut expired = Vec::new();
        self.requests.pop_due(now_ms, MAX_EXPIRED_PER_TICK, &mut expired);
        for (_, p) in expired {
            out.push(self.failed(p, RequestFailure::Timeout));
        }
        self.emit_receipts(out);
    }

    /// Flushes waiting GPS now (on shutdown, or when the gate wants a batch out early) and
    /// disarms the flush timer; returns how many points went out.
    pub fn flush_gps(&mut self, out: &mut Vec<Output>) -> usize {
        self.gps_due_ms = None;
        let mut batch = Vec::with_capacity(self.gps.pending());
        let n = self.gps.flush_into(&mut batch);
        if n > 0 {
            out.push(Output::GpsBatch(batch));
        }
        n
    }

    /// When `tick` next has work, if ever: the gate sleeps until then.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        [
            self.gps_due_ms,
            self.ttl.first_deadline(),
            self.requests.first_deadline(),
            self.directory.first_hold_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// GPS counters.
    pub fn gps_stats(&self) -> GpsStats {
        self.gps.stats
    }

    /// Pushes waiting for their ack on this shard.
    pub fn pushes_in_flight(&self) -> usize {
        self.ttl.len()
    }

    /// Upstream requests waiting for the app-server.
    pub fn requests_pending(&self) -> usize {
        self.requests.len()
    }

    /// This shard's index.
    pub fn id(&self) -> u16 {
        self.cfg.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> Shard {
        Shard::new(ShardConfig {
            id: 0,
            gps_flush_ms: 100,
            gps_forward: Forward::Latest,
            gps_max_buffered: 1000,
            push_queue_len: 2,
            max_pending_requests: 2,
            request_timeout_ms: 1_000,
            hold_ms: 0,
            max_held: 10,
            push_queue_bytes: 1 << 20,
            clustered: false,
            geo_index: true,
        })
    }

    fn c(slot: u32) -> ConnRef {
        ConnRef { shard: 1, slot, gen: 3 }
    }

    /// A push whose deadline is `deadline_ms` (its acceptance plus its TTL).
    fn push(id: u64, deadline_ms: u64) -> Arc<PushContent> {
        Arc::new(PushContent {
            message_id: id,
            body: Arc::from(&b"x"[..]),
            log_id: id,
            deadline_ms,
            origin: crate::LOCAL,
            accepted_us: 0,
        })
    }

    /// The app's ack of the delivery of message `id` it got with `seq` on `conn`.
    fn ack(uid: u64, conn: ConnRef, seq: u32, id: u64) -> Input {
        Input::PushAck { uid, conn, seq, message_id: id, log_id: 0x99, read_us: 0 }
    }

    /// A Resume of `uid`'s session `epoch` on `conn` (log-id 2, seq 1).
    fn resume(uid: u64, epoch: u64, resumes: Option<u32>, conn: ConnRef, secret: Option<[u8; 32]>) -> Input {
        Input::Resume { uid, epoch, resumes, conn, log_id: 2, seq: 1, resume_secret: secret }
    }

    fn clustered() -> Shard {
        let mut s = shard();
        s.cfg.clustered = true;
        s.cfg.hold_ms = 1_000;
        s
    }

    fn login_input(uid: u64, conn: ConnRef, wall_ms: u64) -> Input {
        Input::Login { uid, role: 1, conn, log_id: 1, seq: 1, wall_ms, resume_secret: None }
    }

    /// Cluster mode: a session handed from one shard (node) to another keeps its epoch, resume
    /// count, secret, numbering and unacked pushes with their TTLs left; the giver owes no receipt
    /// for them, the taker redelivers the sent one and delivers the queued one on the resume.
    #[test]
    fn a_session_handed_over_resumes_on_the_taker_with_its_pushes() {
        let mut a = clustered();
        let mut b = clustered();
        b.cfg.push_queue_len = 10;
        let mut out = Vec::new();
        a.handle(login_input(9, c(1), 5), 0, &mut out);
        let epoch = a.directory.get(9).expect("session").epoch;
        a.handle(Input::Push { push: push(1, 10_000), uids: vec![9] }, 0, &mut out);
        a.handle(Input::Closed { uid: 9, conn: c(1), reason: CloseReason::Dropped }, 100, &mut out);
        a.handle(Input::Push { push: push(2, 10_200), uids: vec![9] }, 200, &mut out);
        out.clear();
        // The taker has no session: the resume asks for it.
        b.handle(resume(9, epoch, Some(0), c(7), None), 300, &mut out);
        let retry = match out.pop() {
            Some(Output::Missing { uid: 9, epoch: e, retry }) if e == epoch => retry,
            o => panic!("{o:?}"),
        };
        // The giver hands it over: no receipt, no release, nothing left here.
        a.handle(Input::HandOver { uid: 9, epoch, to: 3 }, 1_000, &mut out);
        let session = match &out[..] {
            [Output::HandedOver { uid: 9, to: 3, session }] => session.clone(),
            o => panic!("{o:?}"),
        };
        assert_eq!(
            session.pushes.iter().map(|p| (p.seq, p.sent, p.ttl_left_ms)).collect::<Vec<_>>(),
            [(1, true, 9_000), (2, false, 9_200)]
        );
        assert_eq!(session.hold_left_ms, 100, "the hold keeps running");
        assert!(a.directory.get(9).is_none());
        assert_eq!(a.pushes_in_flight(), 0);
        out.clear();
        a.tick(60_000, &mut out);
        assert!(out.is_empty(), "the giver owes nothing more: {out:?}");
        // Asked again (a second taker): not here.
        a.handle(Input::HandOver { uid: 9, epoch, to: 4 }, 1_000, &mut out);
        assert!(matches!(out[..], [Output::NotHere { uid: 9, to: 4, .. }]), "{out:?}");

        out.clear();
        b.handle(Input::Install { uid: 9, session }, 1_000, &mut out);
        b.handle(*retry, 1_000, &mut out);
        assert!(matches!(out[0], Output::ResumeOk { uid: 9, resumes: 1, .. }), "{out:?}");
        assert_eq!(deliveries(&out), vec![(1, 1, true), (2, 2, false)]);
        // Numbering continues and the TTLs left hold: push 3 gets seq 3, push 1's deadline stays
        // at 10 s, and it expires a grace later.
        out.clear();
        b.handle(Input::Push { push: push(3, 61_000), uids: vec![9] }, 1_000, &mut out);
        assert_eq!(deliveries(&out), vec![(3, 3, false)]);
        out.clear();
        b.tick(10_000 + ACK_GRACE_MS - 1, &mut out);
        assert!(receipts(&out).is_empty(), "{out:?}");
        b.tick(10_000 + ACK_GRACE_MS, &mut out);
        assert_eq!(receipts(&out), vec![(1, 9, outcome::TTL_EXPIRED)]);
        // A handoff of an older session than the one here loses: its pushes end displaced.
        let stale = Box::new(Handed {
            role: 1,
            epoch: epoch - 1,
            resumes: 0,
            resume_secret: None,
            hold_left_ms: 1_000,
            last_seq: 0,
            pushes: vec![HandedPush { seq: 1, push: push(4, 12_000), ttl_left_ms: 1_000, sent: false }],
        });
        out.clear();
        b.handle(Input::Install { uid: 9, session: stale }, 11_000, &mut out);
        assert_eq!(receipts(&out), vec![(4, 9, outcome::DISPLACED)]);
        assert!(b.holds(9, epoch));
    }

    /// Cluster mode: a login is claimed in the shared directory and every way a session ends
    /// releases it; a resume (same session) writes nothing; a reclaim claims every session.
    #[test]
    fn a_clustered_session_is_claimed_and_released() {
        let mut s = clustered();
        let mut out = Vec::new();
        s.handle(login_input(1, c(1), 5), 0, &mut out);
        let epoch = match out[..] {
            [Output::LoginOk { epoch, .. }, Output::Claim { uid: 1, epoch: claimed }] if claimed == epoch => {
                epoch
            }
            _ => panic!("{out:?}"),
        };
        out.clear();
        s.handle(Input::Logout { uid: 1, conn: c(1), log_id: 2, seq: 2 }, 1, &mut out);
        assert!(
            out.iter().any(|o| matches!(o, Output::Release { uid: 1, epoch: e } if *e == epoch)),
            "{out:?}"
        );

        // Dropped, held, then the hold runs out: released once, at the end.
        out.clear();
        s.handle(login_input(2, c(2), 6), 0, &mut out);
        s.handle(Input::Closed { uid: 2, conn: c(2), reason: CloseReason::Dropped }, 10, &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::Release { .. })), "held, not released: {out:?}");
        out.clear();
        s.tick(2_000, &mut out);
        assert!(out.iter().any(|o| matches!(o, Output::Release { uid: 2, .. })), "{out:?}");

        // A reclaim after a directory outage claims every live session, and only those.
        out.clear();
        s.handle(login_input(3, c(3), 7), 0, &mut out);
        s.handle(login_input(4, c(4), 7), 0, &mut out);
        out.clear();
        s.handle(Input::Reclaim, 0, &mut out);
        let mut claimed: Vec<u64> = out
            .iter()
            .filter_map(|o| if let Output::Claim { uid, .. } = o { Some(*uid) } else { None })
            .collect();
        claimed.sort_unstable();
        assert_eq!(claimed, vec![3, 4]);

        // Not clustered: no directory writes at all.
        let mut plain = shard();
        out.clear();
        plain.handle(login_input(1, c(1), 5), 0, &mut out);
        plain.handle(Input::Logout { uid: 1, conn: c(1), log_id: 2, seq: 2 }, 1, &mut out);
        plain.handle(Input::Reclaim, 2, &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::Claim { .. } | Output::Release { .. })), "{out:?}");
    }

    /// An app-server's End: a connected session ends with a GoAway for its connection, a held
    /// one without, both with Offline receipts for their unacked pushes and no Unreachable
    /// event; the directory forgets them (cluster mode: released), a resume is refused, and a
    /// uid with no session is answered "not found".
    #[test]
    fn an_app_server_ends_a_session_connected_or_held() {
        let mut s = clustered();
        let mut out = Vec::new();
        s.handle(login_input(1, c(1), 5), 0, &mut out);
        let Output::LoginOk { epoch, .. } = out[0] else { panic!("{out:?}") };
        s.handle(Input::Push { push: push(9, 10_000), uids: vec![1] }, 0, &mut out);
        out.clear();
        let end = |uid, tag| Input::End { uid, tag, log_id: 4, message: "banned".into() };
        s.handle(end(1, (3 << END_TAG_SHIFT) | 7), 1, &mut out);
        assert!(
            out.iter().any(|o| matches!(o, Output::Ended { conn, uid: 1, log_id: 4, message } if *conn == c(1) && message == "banned")),
            "{out:?}"
        );
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Receipt(r) if r.message_id == 9 && r.outcome == outcome::OFFLINE)
            ),
            "{out:?}"
        );
        assert!(
            out.iter().any(|o| matches!(o, Output::Release { uid: 1, epoch: e } if *e == epoch)),
            "{out:?}"
        );
        assert!(!out.iter().any(|o| matches!(o, Output::Unreachable { .. })), "{out:?}");
        let answer = out.iter().find(|o| matches!(o, Output::EndAnswered { .. })).expect("answered");
        assert!(matches!(answer, Output::EndAnswered { uid: 1, found: true, .. }), "{out:?}");
        assert_eq!(answer.gate_shard(), Some(3), "the answer goes to the shard that asked");
        assert!(s.directory.get(1).is_none());
        out.clear();
        s.handle(resume(1, epoch, Some(0), c(2), None), 2, &mut out);
        // Not resumed here; in cluster mode the gate then asks the directory, which was
        // released above and names no node: refused there.
        assert!(matches!(out[..], [Output::ResumeRefused { .. }] | [Output::Missing { .. }]), "{out:?}");
        let mut plain = shard();
        plain.handle(login_input(5, c(5), 9), 0, &mut out);
        let Some(Output::LoginOk { epoch, .. }) = out.last().cloned() else { panic!("{out:?}") };
        out.clear();
        plain.handle(end(5, 1), 1, &mut out);
        out.clear();
        plain.handle(resume(5, epoch, Some(0), c(6), None), 2, &mut out);
        assert!(matches!(out[..], [Output::ResumeRefused { .. }]), "one node: refused at once: {out:?}");

        // Held: ended without a GoAway (no connection to send it on).
        out.clear();
        s.handle(login_input(2, c(3), 6), 0, &mut out);
        s.handle(Input::Closed { uid: 2, conn: c(3), reason: CloseReason::Dropped }, 1, &mut out);
        out.clear();
        s.handle(end(2, 1), 2, &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::Ended { .. })), "{out:?}");
        assert!(out.iter().any(|o| matches!(o, Output::EndAnswered { uid: 2, found: true, .. })), "{out:?}");
        assert_eq!(s.directory.held_count(), 0);
        out.clear();
        s.tick(10_000, &mut out);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Unreachable { .. })),
            "the hold ended with it: {out:?}"
        );

        out.clear();
        s.handle(end(99, 1), 3, &mut out);
        assert!(matches!(out[..], [Output::EndAnswered { uid: 99, found: false, .. }]), "{out:?}");
    }

    /// Cluster mode: a newer session elsewhere ends the local one as displaced (its pushes with
    /// Displaced receipts), but not a newer local session of the same uid.
    #[test]
    fn a_session_superseded_by_another_node_ends_displaced() {
        let mut s = clustered();
        let mut out = Vec::new();
        s.handle(login_input(1, c(1), 5), 0, &mut out);
        let Output::LoginOk { epoch, .. } = out[0] else { panic!("{out:?}") };
        s.handle(Input::Push { push: push(9, 10_000), uids: vec![1] }, 0, &mut out);
        out.clear();
        s.handle(Input::Superseded { uid: 1, epoch: epoch - 1 }, 1, &mut out);
        assert!(out.is_empty() && s.directory.get(1).is_some(), "an older epoch changes nothing: {out:?}");
        s.handle(Input::Superseded { uid: 1, epoch }, 1, &mut out);
        assert!(
            out.iter().any(|o| matches!(o, Output::Displaced { uid: 1, conn, .. } if *conn == c(1))),
            "{out:?}"
        );
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Receipt(r) if r.message_id == 9 && r.outcome == outcome::DISPLACED)
            ),
            "{out:?}"
        );
        assert!(
            !out.iter().any(|o| matches!(o, Output::Release { .. })),
            "the directory names the newer one"
        );
        assert!(s.directory.get(1).is_none());
    }

    /// Cluster mode: targets of a local push with no session here go to the gate to be found
    /// elsewhere; a push that came from another node ends Offline here instead (no second hop),
    /// and its receipt goes back to that node.
    #[test]
    fn a_clustered_push_looks_elsewhere_for_missing_targets() {
        let mut s = clustered();
        let mut out = Vec::new();
        s.handle(login_input(1, c(1), 5), 0, &mut out);
        out.clear();
        s.handle(Input::Push { push: push(9, 10_000), uids: vec![1, 2, 3] }, 0, &mut out);
        assert!(out.iter().any(|o| matches!(o, Output::Deliver { conn, .. } if *conn == c(1))), "{out:?}");
        let elsewhere: Vec<&Output> = out.iter().filter(|o| matches!(o, Output::Elsewhere { .. })).collect();
        assert!(matches!(elsewhere[..], [Output::Elsewhere { uids, .. }] if uids == &vec![2, 3]), "{out:?}");
        assert!(!out.iter().any(|o| matches!(o, Output::Receipt(_))), "no receipt yet: the gate owes them");

        out.clear();
        let remote = Arc::new(PushContent { origin: 7, ..PushContent::clone(&push(10, 10_000)) });
        s.handle(Input::Push { push: remote, uids: vec![1, 2] }, 0, &mut out);
        // Another node's push for a session that is not here (it may have moved on): looked for
        // too, keeping its origin, so the receipt goes back the way the push came.
        assert!(
            out.iter().any(
                |o| matches!(o, Output::Elsewhere { push, uids } if uids == &vec![2] && push.origin == 7)
            ),
            "{out:?}"
        );
        assert!(!out.iter().any(|o| matches!(o, Output::Receipt(_))), "{out:?}");
        out.clear();
        s.handle(ack(1, c(1), 2, 10), 1, &mut out);
        assert!(
            out.iter().any(|o| matches!(o, Output::Receipt(r) if r.message_id == 10 && r.outcome == outcome::DELIVERED && r.origin == 7)),
            "the delivered receipt goes back to the node that accepted the push: {out:?}"
        );
    }

    /// The secure channel's resumption secret: kept with the session from its login, handed to
    /// a lookup for the session's own epoch only, replaced by a resume that brings a new one;
    /// a resume the channel proved current (`resumes: None`) is not held to the token's count,
    /// so one whose Session answer was lost still works with the older token.
    #[test]
    fn the_resumption_secret_lives_with_the_session() {
        let mut s = shard();
        let mut out = Vec::new();
        let login = Input::Login {
            uid: 1,
            role: 1,
            conn: c(1),
            log_id: 1,
            seq: 1,
            wall_ms: 0,
            resume_secret: Some([7; 32]),
        };
        s.handle(login, 0, &mut out);
        let Output::LoginOk { epoch, .. } = out[0] else { panic!("{out:?}") };
        let lookup = |s: &mut Shard, epoch: u64| {
            let mut out = Vec::new();
            s.handle(Input::ResumeSecret { uid: 1, epoch, conn: c(2) }, 0, &mut out);
            match out[..] {
                [Output::ResumeSecret { conn, secret }] if conn == c(2) => secret,
                _ => panic!("{out:?}"),
            }
        };
        assert_eq!(lookup(&mut s, epoch), Some([7; 32]));
        assert_eq!(lookup(&mut s, epoch - 1), None, "another epoch's session");
        out.clear();
        s.handle(resume(1, epoch, None, c(2), Some([8; 32])), 10, &mut out);
        assert!(
            matches!(out[..], [Output::Displaced { .. }, Output::ResumeOk { resumes: 1, .. }, ..]),
            "{out:?}"
        );
        assert_eq!(lookup(&mut s, epoch), Some([8; 32]), "rotated by the resume");
        // The Session of that resume was lost: the app still holds the token of count 0.
        out.clear();
        s.handle(resume(1, epoch, None, c(3), Some([9; 32])), 20, &mut out);
        assert!(out.iter().any(|o| matches!(o, Output::ResumeOk { resumes: 2, .. })), "{out:?}");
        // In plaintext the count still rules.
        out.clear();
        s.handle(resume(1, epoch, Some(0), c(4), None), 30, &mut out);
        assert!(matches!(
            out[0],
            Output::ResumeRefused { why: crate::directory::ResumeRefused::Replayed, .. }
        ));
        assert_eq!(lookup(&mut s, epoch), Some([9; 32]), "a refused resume changes nothing");
    }

    fn login(s: &mut Shard, uid: u64, conn: ConnRef) {
        let mut out = Vec::new();
        s.handle(
            Input::Login { uid, role: 1, conn, log_id: 1, seq: 1, wall_ms: 0, resume_secret: None },
            0,
            &mut out,
        );
    }

    fn receipts(out: &[Output]) -> Vec<(u64, u64, u8)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Receipt(r) => Some((r.message_id, r.uid, r.outcome)),
                _ => None,
            })
            .collect()
    }

    fn delivered_seq(out: &[Output]) -> u32 {
        out.iter()
            .find_map(|o| match o {
                Output::Deliver { seq, .. } => Some(*seq),
                _ => None,
            })
            .expect("a delivery")
    }

    #[test]
    fn login_displace_logout() {
        let mut s = shard();
        let mut out = Vec::new();
        s.handle(
            Input::Login { uid: 5, role: 1, conn: c(1), log_id: 10, seq: 1, wall_ms: 0, resume_secret: None },
            0,
            &mut out,
        );
        assert!(matches!(out[..], [Output::LoginOk { uid: 5, seq: 1, log_id: 10, .. }]));
        out.clear();
        s.handle(
            Input::Login { uid: 5, role: 1, conn: c(2), log_id: 11, seq: 1, wall_ms: 0, resume_secret: None },
            0,
            &mut out,
        );
        assert!(matches!(out[0], Output::Displaced { conn, uid: 5, log_id: 11 } if conn == c(1)));
        assert!(matches!(out[1], Output::LoginOk { conn, .. } if conn == c(2)));
        out.clear();
        // The displaced connection closes late: the session stays with the new one.
        s.handle(Input::Closed { uid: 5, conn: c(1), reason: CloseReason::Dropped }, 0, &mut out);
        assert_eq!(s.directory.get(5).map(|e| e.conn), Some(c(2)));
        s.handle(Input::Logout { uid: 5, conn: c(2), log_id: 12, seq: 2 }, 0, &mut out);
        assert!(matches!(out[..], [Output::LogoutOk { seq: 2, log_id: 12, .. }]));
        assert!(s.directory.is_empty());
    }

    #[test]
    fn gps_flushes_on_the_interval_and_idles_after() {
        let mut s = shard();
        let mut out = Vec::new();
        assert_eq!(s.next_deadline_ms(), None);
        for ts in 0..10 {
            s.handle(Input::Gps { uid: 1, point: GpsPoint::new(ts, 0, 0, 0, 0, 0, 0) }, 1_000 + ts, &mut out);
        }
        assert_eq!(s.next_deadline_ms(), Some(1_100));
        s.tick(1_099, &mut out);
        assert!(out.is_empty());
        s.tick(1_100, &mut out);
        match &out[..] {
            [Output::GpsBatch(b)] => {
                assert_eq!(b.len(), 1);
                assert_eq!(b[0].point().ts_ms(), 9);
            }
            other => panic!("{other:?}"),
        }
        // The cadence holds for one more interval; a flush that finds nothing disarms it.
        assert_eq!(s.next_deadline_ms(), Some(1_200));
        out.clear();
        s.tick(1_200, &mut out);
        assert!(out.is_empty());
        assert_eq!(s.next_deadline_ms(), None);
        assert_eq!(s.gps_stats().coalesced, 9);
    }

    #[test]
    fn gps_flushes_every_interval_when_drivers_report_in_step_with_it() {
        // Drivers report every 100 ms, just before each flush is due: one flush per interval,
        // not one every other interval.
        let mut s = shard();
        let mut out = Vec::new();
        let mut batches = 0;
        for k in 0..20u64 {
            let now = 1_000 + k * 100;
            for uid in 1..=5 {
                s.handle(Input::Gps { uid, point: GpsPoint::new(now, 0, 0, 0, 0, 0, 0) }, now, &mut out);
            }
            s.tick(now, &mut out);
            batches += out.iter().filter(|o| matches!(o, Output::GpsBatch(_))).count();
            out.clear();
        }
        assert_eq!(batches, 19, "one flush per interval after the first");
        // When points stop, one empty tick disarms the timer.
        s.tick(3_000, &mut out);
        assert!(out.is_empty());
        assert_eq!(s.next_deadline_ms(), None);
    }

    #[test]
    fn every_push_target_gets_exactly_one_receipt() {
        let mut s = shard();
        login(&mut s, 1, c(1));
        login(&mut s, 2, c(2));
        login(&mut s, 3, c(3));
        let mut out = Vec::new();
        // uid 9 is offline; 1 acks; 2 never acks (ttl); 3 is displaced.
        s.handle(Input::Push { push: push(70, 500), uids: vec![1, 2, 3, 9] }, 0, &mut out);
        assert_eq!(receipts(&out), vec![(70, 9, outcome::OFFLINE)]);
        let seqs: Vec<(ConnRef, u32)> = out
            .iter()
            .filter_map(|o| match o {
                Output::Deliver { conn, seq, .. } => Some((*conn, *seq)),
                _ => None,
            })
            .collect();
        assert_eq!(seqs.len(), 3);
        out.clear();
        s.handle(ack(1, c(1), seqs[0].1, 70), 10, &mut out);
        s.handle(ack(1, c(1), seqs[0].1, 70), 11, &mut out); // twice
        s.handle(
            Input::Login { uid: 3, role: 1, conn: c(4), log_id: 2, seq: 1, wall_ms: 20, resume_secret: None },
            20,
            &mut out,
        );
        s.tick(499 + ACK_GRACE_MS, &mut out);
        s.tick(500 + ACK_GRACE_MS, &mut out);
        s.handle(ack(2, c(2), seqs[1].1, 70), 600 + ACK_GRACE_MS, &mut out); // too late
        let mut r = receipts(&out);
        r.sort();
        assert_eq!(
            r,
            vec![(70, 1, outcome::DELIVERED), (70, 2, outcome::TTL_EXPIRED), (70, 3, outcome::DISPLACED)]
        );
        assert_eq!(s.pushes_in_flight(), 0);
        assert_eq!(s.next_deadline_ms(), None);
    }

    /// The rule of docs/PROTOCOL.md §9.10: an ack taken before the deadline plus the grace is
    /// Delivered, even after the deadline itself; from deadline + grace on the pair has ended
    /// TtlExpired, whether the timer ran first or the ack came first, and a later ack changes
    /// nothing.
    #[test]
    fn an_ack_within_the_grace_is_delivered_and_from_its_end_ttl_expired() {
        let mut s = shard();
        for uid in 1..=3 {
            login(&mut s, uid, c(uid as u32));
        }
        let mut out = Vec::new();
        // Accepted at 200 with a TTL of 800: deadline 1_000, expiry a grace later.
        s.handle(Input::Push { push: push(5, 1_000), uids: vec![1, 2, 3] }, 200, &mut out);
        let seq = delivered_seq(&out);
        assert_eq!(s.next_deadline_ms(), Some(1_000 + ACK_GRACE_MS));
        out.clear();
        let end = 1_000 + ACK_GRACE_MS;
        s.handle(ack(1, c(1), seq, 5), end - 1, &mut out); // past the deadline, within the grace
        s.tick(end - 1, &mut out);
        assert_eq!(receipts(&out), vec![(5, 1, outcome::DELIVERED)]);
        out.clear();
        s.handle(ack(2, c(2), seq, 5), end, &mut out); // the timer has not run yet
        assert_eq!(receipts(&out), vec![(5, 2, outcome::TTL_EXPIRED)]);
        out.clear();
        s.tick(end, &mut out);
        assert_eq!(receipts(&out), vec![(5, 3, outcome::TTL_EXPIRED)]);
        out.clear();
        s.handle(ack(3, c(3), seq, 5), end + 1, &mut out); // late: its receipt was sent
        s.handle(ack(1, c(1), seq, 5), end + 1, &mut out); // twice
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(s.pushes_in_flight(), 0);
    }

    /// An ack naming another message id than the push sent under its sequence-id is answered
    /// with `AckMismatch` and ends nothing; the push waits for its own ack.
    #[test]
    fn a_mismatched_ack_is_refused_and_the_push_stays_in_flight() {
        let mut s = shard();
        login(&mut s, 1, c(1));
        let mut out = Vec::new();
        s.handle(Input::Push { push: push(5, 10_000), uids: vec![1] }, 0, &mut out);
        let seq = delivered_seq(&out);
        out.clear();
        s.handle(ack(1, c(1), seq, 6), 10, &mut out);
        match &out[..] {
            [Output::AckMismatch { conn, seq: s2, log_id: 0x99, message_id: 6 }] => {
                assert_eq!((*conn, *s2), (c(1), seq));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(s.pushes_in_flight(), 1);
        out.clear();
        // Acks that match nothing outstanding stay ignored (§6), right id or not: another
        // sequence-id, or another connection than the session's.
        s.handle(ack(1, c(1), seq + 1, 6), 11, &mut out);
        s.handle(ack(1, c(2), seq, 6), 11, &mut out);
        assert!(out.is_empty(), "{out:?}");
        s.handle(ack(1, c(1), seq, 5), 12, &mut out);
        assert_eq!(receipts(&out), vec![(5, 1, outcome::DELIVERED)]);
        assert_eq!(s.pushes_in_flight(), 0);
    }

    #[test]
    fn closing_ends_pushes_with_the_close_reason_and_queue_is_bounded() {
        let mut s = shard();
        login(&mut s, 1, c(1));
        let mut out = Vec::new();
        for id in 1..=3 {
            s.handle(Input::Push { push: push(id, 10_000), uids: vec![1] }, 0, &mut out);
        }
        assert_eq!(receipts(&out), vec![(3, 1, outcome::QUEUE_FULL)]);
        out.clear();
        s.handle(Input::Closed { uid: 1, conn: c(1), reason: CloseReason::SlowConsumer }, 1, &mut out);
        assert_eq!(receipts(&out), vec![(1, 1, outcome::SLOW_CONSUMER), (2, 1, outcome::SLOW_CONSUMER)]);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Unreachable { uid: 1, outcome: outcome::SLOW_CONSUMER })));
        assert_eq!(s.pushes_in_flight(), 0);
    }

    #[test]
    fn requests_are_answered_once_by_reply_or_timeout() {
        let mut s = shard();
        login(&mut s, 1, c(1));
        let mut out = Vec::new();
        let up =
            |seq| Input::Upstream { uid: 1, role: 1, conn: c(1), seq, log_id: 5, cmd: 0x20, body: vec![] };
        s.handle(up(1), 0, &mut out);
        s.handle(up(2), 0, &mut out);
        s.handle(up(3), 0, &mut out); // over the bound of 2
        let ids: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Upstream { request_id, .. } => Some(*request_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(matches!(out[2], Output::RequestFailed { seq: 3, failure: RequestFailure::Overloaded, .. }));
        out.clear();
        s.handle(Input::UpstreamReply { request_id: ids[1], reply: vec![1] }, 10, &mut out);
        assert!(matches!(out[..], [Output::Reply { seq: 2, .. }]));
        out.clear();
        s.tick(1_000, &mut out);
        assert!(matches!(out[..], [Output::RequestFailed { seq: 1, failure: RequestFailure::Timeout, .. }]));
        out.clear();
        s.handle(Input::UpstreamReply { request_id: ids[0], reply: vec![1] }, 1_001, &mut out);
        assert!(out.is_empty(), "a late answer after the timeout is dropped");
        assert_eq!(crate::upstream::shard_of_request(ids[0]), 0);
    }

    #[test]
    fn broadcast_reaches_every_session_of_the_role() {
        let mut s = shard();
        login(&mut s, 1, c(1));
        login(&mut s, 2, c(2));
        let mut out = Vec::new();
        s.handle(
            Input::Login { uid: 3, role: 2, conn: c(3), log_id: 1, seq: 1, wall_ms: 0, resume_secret: None },
            0,
            &mut out,
        );
        out.clear();
        let tally = Tally { shard: 1, id: 77 };
        s.handle(Input::Broadcast { push: push(8, 100), role: 1, tally }, 0, &mut out);
        assert_eq!(out.iter().filter(|o| matches!(o, Output::Deliver { .. })).count(), 2);
        assert!(
            out.iter().any(|o| matches!(o, Output::BroadcastCounted { tally: t, targets: 2 } if *t == tally)),
            "the shard reports how many receipts the broadcast is owed"
        );
        let _ = delivered_seq(&out);
    }

    fn held_shard() -> Shard {
        let mut s = shard();
        s.cfg.hold_ms = 1_000;
        s.cfg.push_queue_len = 10;
        s
    }

    fn deliveries(out: &[Output]) -> Vec<(u64, u32, bool)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Deliver { push, seq, redelivery, .. } => Some((push.message_id, *seq, *redelivery)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dropped_session_is_held_queues_and_replays_in_order_on_resume() {
        let mut s = held_shard();
        let mut out = Vec::new();
        s.handle(
            Input::Login { uid: 1, role: 1, conn: c(1), log_id: 1, seq: 1, wall_ms: 0, resume_secret: None },
            0,
            &mut out,
        );
        let epoch = match out[0] {
            Output::LoginOk { epoch, .. } => epoch,
            _ => panic!(),
        };
        out.clear();
        s.handle(Input::Push { push: push(1, 10_000), uids: vec![1] }, 0, &mut out); // sent, not acked
        s.handle(Input::Closed { uid: 1, conn: c(1), reason: CloseReason::Dropped }, 10, &mut out);
        s.handle(Input::Push { push: push(2, 10_020), uids: vec![1] }, 20, &mut out); // queued
        assert_eq!(deliveries(&out), vec![(1, 1, false)]);
        assert!(receipts(&out).is_empty(), "nothing ends while held");
        out.clear();
        // A replayed or stale token is refused; the current one resumes, on another shard too.
        let other = ConnRef { shard: 0, slot: 9, gen: 1 };
        s.handle(resume(1, epoch - 1, Some(0), other, None), 30, &mut out);
        s.handle(resume(1, epoch, Some(5), other, None), 30, &mut out);
        assert!(matches!(
            out[0],
            Output::ResumeRefused { why: crate::directory::ResumeRefused::StaleEpoch, .. }
        ));
        assert!(matches!(
            out[1],
            Output::ResumeRefused { why: crate::directory::ResumeRefused::Replayed, .. }
        ));
        out.clear();
        s.handle(resume(1, epoch, Some(0), other, None), 30, &mut out);
        assert!(matches!(out[0], Output::ResumeOk { resumes: 1, .. }));
        assert_eq!(deliveries(&out), vec![(1, 1, true), (2, 2, false)]);
        out.clear();
        // The same token again is a replay.
        s.handle(resume(1, epoch, Some(0), c(3), None), 40, &mut out);
        assert!(matches!(
            out[0],
            Output::ResumeRefused { why: crate::directory::ResumeRefused::Replayed, .. }
        ));
        out.clear();
        s.handle(ack(1, other, 1, 1), 50, &mut out);
        s.handle(ack(1, other, 2, 2), 50, &mut out);
        assert_eq!(receipts(&out), vec![(1, 1, outcome::DELIVERED), (2, 1, outcome::DELIVERED)]);
    }

    #[test]
    fn an_expired_hold_ends_pushes_and_calls_back() {
        let mut s = held_shard();
        login(&mut s, 1, c(1));
        let mut out = Vec::new();
        s.handle(Input::Closed { uid: 1, conn: c(1), reason: CloseReason::Dropped }, 0, &mut out);
        s.handle(Input::Push { push: push(7, 60_000), uids: vec![1] }, 5, &mut out);
        assert_eq!(s.next_deadline_ms(), Some(1_000));
        s.tick(1_000, &mut out);
        assert_eq!(receipts(&out), vec![(7, 1, outcome::HOLD_EXPIRED)]);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Unreachable { uid: 1, outcome: outcome::HOLD_EXPIRED })));
        assert!(s.directory.is_empty());
        out.clear();
        s.handle(Input::Push { push: push(8, 60_000), uids: vec![1] }, 1_001, &mut out);
        assert_eq!(receipts(&out), vec![(8, 1, outcome::OFFLINE)]);
    }

    fn held_geo_shard() -> Shard {
        let mut s = shard();
        s.cfg.hold_ms = 1_000;
        s
    }

    fn gps(uid: u64, lat_e7: i32, ts: u64) -> Input {
        Input::Gps { uid, point: GpsPoint::new(ts, lat_e7, 0, 0, 0, 0, 0) }
    }

    fn geo_uids(s: &mut Shard, filter: Filter, now: u64) -> Vec<u64> {
        let query = Query { lat_e7: 0, lon_e7: 0, radius_m: 10_000.0, k: 10, max_age_ms: None, filter };
        let mut out = Vec::new();
        s.handle(Input::Geo { tag: 7 << GEO_TAG_SHIFT | 1, query }, now, &mut out);
        match &out[..] {
            [Output::GeoAnswered { tag, hits }] => {
                assert_eq!(Output::GeoAnswered { tag: *tag, hits: vec![] }.gate_shard(), Some(7));
                hits.iter().map(|h| h.uid).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    /// The index holds drivers with a session only: a held one counts for OnlineOrHeld, and
    /// every way a session ends forgets its driver.
    #[test]
    fn geo_answers_online_or_held_drivers_and_forgets_ended_sessions() {
        let mut s = held_geo_shard();
        let mut out = Vec::new();
        for uid in 1..=4 {
            login(&mut s, uid, c(uid as u32));
            s.handle(gps(uid, uid as i32 * 1_000, 1), 0, &mut out);
        }
        s.handle(gps(9, 0, 1), 0, &mut out); // no session: not indexed
        assert_eq!(geo_uids(&mut s, Filter::Online, 0), vec![1, 2, 3, 4]);
        s.handle(Input::Closed { uid: 2, conn: c(2), reason: CloseReason::Dropped }, 0, &mut out);
        assert_eq!(geo_uids(&mut s, Filter::Online, 0), vec![1, 3, 4]);
        assert_eq!(geo_uids(&mut s, Filter::OnlineOrHeld, 0), vec![1, 2, 3, 4]);
        s.handle(Input::Logout { uid: 3, conn: c(3), log_id: 1, seq: 1 }, 0, &mut out);
        s.handle(Input::End { uid: 4, tag: 0, log_id: 1, message: String::new() }, 0, &mut out);
        assert_eq!(geo_uids(&mut s, Filter::OnlineOrHeld, 0), vec![1, 2]);
        s.tick(2_000, &mut out); // uid 2's hold ends
        assert_eq!(geo_uids(&mut s, Filter::OnlineOrHeld, 2_000), vec![1]);
        assert_eq!(s.geo.len(), 1);
    }

    proptest::proptest! {
        /// Whatever happens to sessions, the index holds exactly drivers with a session here
        /// that reported since it began.
        #[test]
        fn geo_index_holds_only_live_sessions(ops in proptest::collection::vec((0u8..6, 0u64..8), 1..200)) {
            let mut s = held_geo_shard();
            let mut out = Vec::new();
            let mut now = 0;
            for (op, uid) in ops {
                now += 100;
                let conn = c(uid as u32);
                let input = match op {
                    0 => Input::Login { uid, role: 1, conn, log_id: 1, seq: 1, wall_ms: now, resume_secret: None },
                    1 | 2 => gps(uid, uid as i32, now),
                    3 => Input::Closed { uid, conn, reason: CloseReason::Dropped },
                    4 => Input::Logout { uid, conn, log_id: 1, seq: 1 },
                    _ => Input::End { uid, tag: 0, log_id: 1, message: String::new() },
                };
                s.handle(input, now, &mut out);
                s.tick(now, &mut out);
                out.clear();
                for uid in s.geo.uids() {
                    proptest::prop_assert!(s.directory.get(uid).is_some(), "uid {} indexed without a session", uid);
                }
                s.geo.check().map_err(proptest::test_runner::TestCaseError::fail)?;
            }
        }
    }
}
