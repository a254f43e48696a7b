//! The app's side of the protocol (drivers, passengers) as one state machine, sans I/O, in the
//! manner of quinn-proto's `Connection`: [`AppProto`] reads no socket and no clock and starts no
//! thread. Its shell hands it what came in and what time it is, and carries out what it says:
//!
//! - **bytes in**: [`AppProto::read_buf`] and [`AppProto::read_done`] (read straight into the
//!   machine's buffer), or [`AppProto::handle_input`] (copied in); at the end of the stream,
//!   [`AppProto::finish_input`] says whether it was cut inside a frame (or a record);
//! - **the connection's life**: [`AppProto::on_connected`] when a transport is up,
//!   [`AppProto::on_disconnected`] when it is gone (the answer says when to connect again);
//! - **time**: [`AppProto::poll_timeout`] is the next moment the machine has something to do,
//!   [`AppProto::handle_timeout`] does it;
//! - **bytes out**: every call that may write takes an [`Out`], the caller's encoder and buffer
//!   (a load generator shares one of each among thousands of machines); the shell calls
//!   [`AppProto::wire`] last and writes the bytes it returns to its transport;
//! - **events**: [`AppProto::poll_event`] until `None` after every input: the session is up, a
//!   push to show, answers to requests by sequence-id, a login token is needed, the connection
//!   must close (and why), frames that are not the machine's.
//!
//! It owns these rules of docs/PROTOCOL.md, so no shell has them:
//!
//! - resume-else-login: a connection resumes with the latest resume token (replaced on every
//!   Session, §9.13), and logs in when there is none or the gate refuses it (ResumeRefused,
//!   §9.13: on the same connection); the node that issued the session is the place to reconnect
//!   first ([`AppProto::node`]), unless a GoAway named another ([`AppProto::redirect`]);
//! - when to reconnect: at once after a drop of a live session; after failed attempts an
//!   exponential backoff with jitter ([`backoff_delay`]); never sooner than a gate's
//!   `retry_after_ms` (GoAway, Overloaded, ShuttingDown; bounded by a ceiling,
//!   [`retry_floor`]); never after Displaced or LoggedOut (§9.4, §9.5);
//! - keepalive: a Keepalive after half a `heartbeat_ms` without sending anything (§9.2);
//! - pushes (§9.10): a PushDelivery is shown only before its deadline and acked at once,
//!   redeliveries too; one that comes at or after its deadline and was never shown is neither
//!   shown nor acked (counted in [`AppProto::expired_pushes`]: the gate ends it TtlExpired, so a
//!   Delivered receipt always means the app had it in time); a push cmd this build does not
//!   know is acked by its sequence-id (§12.2); each message id is shown once, by a bounded
//!   [`Dedup`] ring;
//! - requests: sequence-ids (§6), pipelining up to a bound, answers matched by sequence-id in any
//!   order, and a timeout for each;
//! - the gate's errors and go-aways: which end the connection, which are answers, which are
//!   only information (§8, §9.5);
//! - the secure channel (§14), below.
//!
//! # The secure channel
//!
//! A machine made with [`AppProto::with_secure`] speaks the secure channel (§14) inside: every
//! byte its shell moves is a record, and the shell does nothing about it but what it does in
//! plaintext. The shell's contract, the same in both modes:
//!
//! - **out**: make an [`Out`] for each step (a wake-up, a read), pass it to every call of the
//!   step, [`Out::put`] the shell's own frames into it, then call [`AppProto::wire`] last and
//!   send the bytes it returns. The machine appends frames as they are and turns them into
//!   records in place, in the caller's buffer (no second buffer, no copy): at `wire`, at the end
//!   of each of its own calls, and when [`AppProto::poll_event`] returns `None` or a
//!   [`Event::Close`], each time what was written since the last time in one Data record (as
//!   few as fit: the acks of a burst of pushes share one). An `Out` made
//!   anew takes the bytes its buffer holds already for wire bytes, so the frames of a step must
//!   not outlive its `Out`: a shell that forgot `wire` after [`Out::put`] sends plaintext, which
//!   the gate refuses and closes (loudly, on the first frame).
//! - **in**: read into [`AppProto::read_buf`] as before; the bytes are records, opened in
//!   place in that buffer (no second buffer). [`AppProto::unprocessed`] and
//!   [`AppProto::take_unprocessed`] are frame bytes; [`AppProto::give_unprocessed`] gives frame
//!   bytes back, [`AppProto::handle_input`] takes wire bytes.
//! - **events**: channel failures close the connection like a stream error,
//!   [`Close::Stream`] with a [`Fault::Channel`]: after the frames that came before the failure,
//!   whose answers are still sealed and sent. The gate holds the session; the next connection
//!   resumes it. [`Fault::misconfigured`] tells a configuration error (Reject UnknownKey or
//!   Version) apart; [`Event::SessionUp`] carries a new gate key to store.
//! - **lending**: a shell that lets another reader and writer use the connection for a while
//!   (as [`crate::AppSession::conn`] does) lends the open channel with
//!   [`AppProto::lend_channel`] and takes it back with [`AppProto::return_channel`].
//!
//! ```text
//!   on_connected(now, out) / login / request / handle_timeout / poll_event … (out)
//!   out.put(gps frame)                        the shell's own frames, plaintext for now
//!   let bytes = proto.wire(&mut out);         records: send them
//!   socket.read(proto.read_buf()) → read_done(n); poll_event(now, out) until None; wire; send
//! ```
//!
//! The rules it owns there:
//!
//! - the first flight: the connection's first frame (the Login, or the Resume) goes in a Hello
//!   (Noise IK, to the configured gate key) or, when the session has a resume token and a
//!   resumption secret, in a ResumeHello (NNpsk0, resume_id = the resume token, psk = the
//!   secret): no static-key work on a resume;
//! - frames written before the gate's Accept wait inside the machine; reading the Accept writes
//!   the commit record (§14.3) and then those frames, sealed;
//! - secrets (§14.6): the newest Accept's secret is kept with the session, and until a frame
//!   after that Accept arrives (the gate committed), the one its ResumeHello was made with too
//!   (the gate's until the commit). A ResumeHello that
//!   the gate refuses with Reject UnknownSession is made once more with the previous secret
//!   (the commit may never have reached the gate), then the app logs in afresh, as after
//!   ResumeRefused ([`Event::LoginNeeded`] says the resume was refused); neither is a failed
//!   attempt, so the next connection comes at once. A Reject is unauthenticated: nothing is
//!   deleted because of one;
//! - Reject UnknownKey or Version is a configuration error: a failed attempt that waits about
//!   [`Config::retry_after_ceiling`], never a tight loop; Reject Overloaded waits the retry-after
//!   its message names, like Error Overloaded;
//! - an Accept naming the gate's new key (the old one is being retired) replaces the key for the
//!   next Hello, and the next [`Event::SessionUp`] carries it;
//! - any other channel failure (a record that does not parse or authenticate, an Accept that
//!   does not, a record out of order, the stream cut inside a record) is a failed attempt.
//!
//! The one clock the machine reads is the wall clock, once, when it is made: push deadlines are
//! wall-clock times, and the machine reckons the wall clock from the `now` it is given and that
//! reading ([`AppProto::set_wall_clock`] sets it again, for a test's virtual clock or after the
//! device's clock was corrected).
//!
//! Jitter and log-ids come from a seed given to the constructor, so a test replays exactly.
//! State is kept small for a load generator that runs tens of thousands of these per process:
//! no allocation per frame once the buffers have their working size, a fixed-capacity ring for
//! de-duplication, and enums for every state. The secure channel's state is one boxed value per
//! machine (about 320 bytes, and the handshake's while one is under way).

use crate::frame::{DeliveryView, ErrorView, ReplyView};
use channel::handshake::{parse_reject, MAX_RESUME_ID};
use channel::record::{HEADER_LEN as RECORD_HEADER, MAX_BODY as MAX_RECORD_BODY};
use channel::{
    ChannelError, ClientChannel, ClientEvent, ClientState, Keypair, PublicKey, Record, RecordError,
    RecordType, RejectReason, ResumeSecret,
};
use schema::flatbuffers::{FlatBufferBuilder, WIPOffset};
use schema::wire::{self, ErrorCode, GoAwayReason};
use schema::{
    body_kind, Body, Cmd, Decoded, Encoder, Frame, FrameError, FrameType, Header, Limits, StreamError,
};
use std::time::{Duration, Instant};

/// Shortest wait between two failed connection attempts, by default.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between two failed connection attempts that this side picks, by default (a
/// gate's `retry_after_ms` may ask for longer).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Message ids remembered for de-duplication, by default.
pub const DEFAULT_DEDUP_CAPACITY: usize = 4096;
/// Longest `retry_after_ms` honoured, by default. Gates ask for a few seconds at most; a larger
/// value can only be corrupt or hostile, and must not park an app for days.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(60);
/// Shortest heartbeat taken from a gate: a smaller one would only flood it with keepalives.
const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Bytes of an app-port frame at most (header and the largest body a gate may send).
const MAX_FRAME: usize = schema::HEADER_LEN + schema::decode::MAX_APP_BODY as usize;

/// The machine's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Message ids remembered to show each once (at least 1). §9.10 asks apps to remember acked
    /// ids for the longest TTL (300 s); size it for the pushes one uid gets in that time.
    pub dedup_capacity: usize,
    /// Requests outstanding at most ([`AppProto::request`] refuses more).
    pub max_requests: usize,
    /// A request unanswered this long is given up ([`Event::TimedOut`]).
    pub request_timeout: Duration,
    /// Longest wait for the Session answer on a new connection (and after a refused resume).
    pub session_timeout: Duration,
    /// Heartbeat assumed when a gate announces none.
    pub default_heartbeat: Duration,
    /// Shortest wait after a failed attempt.
    pub backoff_min: Duration,
    /// Longest wait after failed attempts that this side picks.
    pub backoff_max: Duration,
    /// Longest `retry_after_ms` honoured.
    pub retry_after_ceiling: Duration,
    /// Least wait after the gate refused a login (a bad or expired token): another attempt
    /// needs a new token, which takes the token's issuer more than a few milliseconds.
    pub refused_login_wait: Duration,
    /// Bytes [`AppProto::read_buf`] offers at least; the buffer keeps about this size unless a
    /// larger frame needs more.
    pub read_chunk: usize,
}

impl Default for Config {
    /// 4096 remembered ids, 64 outstanding requests with 30 s each, 30 s for the Session,
    /// 30 s default heartbeat, backoff 50 ms to 5 s, retry-after honoured up to 60 s, 1 s after
    /// a refused login, 16 KiB reads.
    fn default() -> Config {
        Config {
            dedup_capacity: DEFAULT_DEDUP_CAPACITY,
            max_requests: 64,
            request_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(30),
            default_heartbeat: Duration::from_secs(30),
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            retry_after_ceiling: RETRY_AFTER_CEILING,
            refused_login_wait: Duration::from_secs(1),
            read_chunk: 16 * 1024,
        }
    }
}

/// The secure channel's settings (docs/PROTOCOL.md §14); give them to
/// [`AppProto::with_secure`]. Without them the machine speaks plaintext frames.
#[derive(Debug, Clone)]
pub struct SecureConfig {
    /// The gate's static public key, shipped with the app. The machine replaces it with the
    /// gate's current key when an Accept names one (the Hello used the key the gate is retiring);
    /// [`Event::SessionUp`] then carries the new key for the app to store.
    pub server_key: PublicKey,
    /// This app's static key pair, which IK sends (the gate does not authenticate apps by it;
    /// the token does): one per machine, made once with [`Keypair::generate`].
    pub app_key: Keypair,
}

impl SecureConfig {
    /// The settings for a gate whose public key is `server_key`, with a fresh app key pair.
    pub fn new(server_key: PublicKey) -> SecureConfig {
        SecureConfig { server_key, app_key: Keypair::generate() }
    }
}

/// What the gate says about a session in its Login or Resume answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The user id, from the signed token.
    pub uid: u64,
    /// `wire::Role` value: 1 driver, 2 passenger.
    pub role: u8,
    /// Send something (a keepalive if nothing else) at least this often.
    pub heartbeat_ms: u32,
    /// The gate closes the connection after this long without input.
    pub idle_timeout_ms: u32,
    /// Grows with every new session of this uid.
    pub session_epoch: u64,
    /// Present it in Resume after a dropped connection; rotated on every resume.
    pub resume_token: Vec<u8>,
    /// host:port of the gate node holding the session.
    pub node: String,
    /// How long the session is held after the connection drops.
    pub hold_ms: u32,
    /// On the secure channel: the resumption secret of the handshake that carried this answer,
    /// the psk of the session's next resume (docs/PROTOCOL.md §14). Not on the wire in frames:
    /// the channel sets it.
    pub resume_secret: Option<[u8; 32]>,
}

impl SessionInfo {
    /// Copies a Session table.
    pub fn from_wire(s: &wire::Session<'_>) -> SessionInfo {
        SessionInfo {
            uid: s.uid(),
            role: s.role().0,
            heartbeat_ms: s.heartbeat_ms(),
            idle_timeout_ms: s.idle_timeout_ms(),
            session_epoch: s.session_epoch(),
            resume_token: s.resume_token().map(|t| t.bytes().to_vec()).unwrap_or_default(),
            node: s.node().unwrap_or("").to_owned(),
            hold_ms: s.hold_ms(),
            resume_secret: None,
        }
    }

    /// Overwrites this with a newer Session, reusing the token's and the node's buffers.
    fn update(&mut self, s: &wire::Session<'_>) {
        self.uid = s.uid();
        self.role = s.role().0;
        self.heartbeat_ms = s.heartbeat_ms();
        self.idle_timeout_ms = s.idle_timeout_ms();
        self.session_epoch = s.session_epoch();
        self.resume_token.clear();
        self.resume_token.extend_from_slice(s.resume_token().map_or(&[][..], |t| t.bytes()));
        self.node.clear();
        self.node.push_str(s.node().unwrap_or(""));
        self.hold_ms = s.hold_ms();
    }
}

/// The last `capacity` message ids seen, in arrival order, in a ring: the oldest is forgotten
/// first, and a repeat does not make an id younger. Membership is a linear scan, which for the
/// few thousand ids an app keeps is a few hundred nanoseconds with no hashing and no per-id
/// allocation.
#[derive(Debug, Clone)]
pub struct Dedup {
    /// The ids; grows to `capacity`, then the oldest is overwritten at `next`.
    ids: Vec<u64>,
    /// Where the next id goes once the ring is full.
    next: u32,
    /// Most ids held.
    capacity: u32,
}

impl Dedup {
    /// An empty ring holding at most `capacity` ids (at least 1). Memory grows with use, up to
    /// `capacity` ids.
    pub fn new(capacity: usize) -> Dedup {
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX).max(1);
        Dedup { ids: Vec::new(), next: 0, capacity }
    }

    /// Remembers `id`; true when it was not remembered already.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        let capacity = self.capacity();
        if self.ids.len() < capacity {
            if self.ids.len() == self.ids.capacity() {
                // Doubling, but never past the capacity.
                let more = self.ids.len().max(4).min(capacity - self.ids.len());
                self.ids.reserve_exact(more);
            }
            self.ids.push(id);
        } else {
            self.ids[self.next as usize] = id;
            self.next = (self.next + 1) % self.capacity;
        }
        true
    }

    /// True when `id` is remembered.
    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Most ids remembered.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }
}

/// Request sequence-ids of one connection's sender: increasing, wrapping, never 0 (§6: errors
/// about events and stream errors carry 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqIds {
    /// The last id handed out; 0 before the first.
    last: u32,
}

impl SeqIds {
    /// A counter whose next id follows `last`.
    pub fn after(last: u32) -> SeqIds {
        SeqIds { last }
    }

    /// A fresh sequence-id.
    pub fn fresh(&mut self) -> u32 {
        self.last = self.last.wrapping_add(1).max(1);
        self.last
    }

    /// The last id handed out (0 before the first).
    pub fn last(&self) -> u32 {
        self.last
    }
}

/// Weyl-sequence step of SplitMix64 (2^64 / golden ratio).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: spreads a counter into well-mixed bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Log-ids for the flows an app starts (§7): non-zero, below 2^63 (the gate's own have the top
/// bit set), well spread, from a seed.
#[derive(Debug, Clone, Copy)]
pub struct LogIds {
    /// SplitMix64 state.
    state: u64,
}

impl LogIds {
    /// A generator seeded with `seed`; two seeds give unrelated sequences.
    pub fn new(seed: u64) -> LogIds {
        LogIds { state: mix64(seed ^ 0x6C6F_6769_6473_0000) }
    }

    /// A fresh log-id.
    pub fn fresh(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        match mix64(self.state) >> 1 {
            0 => 1,
            id => id,
        }
    }
}

/// SplitMix64 for jitter: enough randomness, without a dependency.
#[derive(Debug, Clone, Copy)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }
}

/// `roll` mapped onto `0..=range` (multiply-shift: no modulo bias worth speaking of).
fn spread(range: Duration, roll: u64) -> Duration {
    let span = u64::try_from(range.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(((u128::from(roll) * (u128::from(span) + 1)) >> 64) as u64)
}

/// The wait before the next attempt after `failures` failed ones in a row: none after none (a
/// live session that dropped reconnects at once), else exponential with jitter, `roll` picking
/// uniformly in `[max(min, cap / 2), cap]` where `cap = min(max, min · 2^failures)`. The jitter
/// spreads the reconnects of many apps that lost the same gate at the same moment; the lower
/// half stays out so the wait still grows with every failure.
pub fn backoff_delay(failures: u32, min: Duration, max: Duration, roll: u64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let max = max.max(min);
    let cap = min.saturating_mul(1u32 << failures.min(31)).min(max);
    let low = (cap / 2).max(min);
    low + spread(cap - low, roll)
}

/// The least wait a gate's `retry_after` asks for: at least it (capped at `ceiling`), plus up to
/// a quarter more picked by `roll` so apps refused together do not return together, never past
/// `ceiling`.
pub fn retry_floor(retry_after: Duration, ceiling: Duration, roll: u64) -> Duration {
    let ra = retry_after.min(ceiling);
    (ra + spread(ra / 4, roll)).min(ceiling)
}

/// Appends a Login request (§9.1).
pub fn write_login(enc: &mut Encoder, out: &mut Vec<u8>, seq: u32, log_id: u64, token: &[u8], device: &str) {
    enc.frame(out, FrameType::Request, Cmd::Login, seq, log_id, |b| {
        let token = b.create_vector(token);
        let device = b.create_string(device);
        wire::Login::create(b, &wire::LoginArgs { token: Some(token), device: Some(device) })
    });
}

/// Appends a Resume request with the latest resume token (§9.13).
pub fn write_resume(enc: &mut Encoder, out: &mut Vec<u8>, seq: u32, log_id: u64, resume_token: &[u8]) {
    enc.frame(out, FrameType::Request, Cmd::Resume, seq, log_id, |b| {
        let resume_token = b.create_vector(resume_token);
        wire::Resume::create(b, &wire::ResumeArgs { resume_token: Some(resume_token) })
    });
}

/// Whole milliseconds of `d` (saturating).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Appends the PushAck of a push with `seq` and `log_id` (the push's own flow, §7) and its
/// message id (0 for a push cmd this build does not know, §12.2).
pub fn write_push_ack(enc: &mut Encoder, out: &mut Vec<u8>, seq: u32, log_id: u64, message_id: u64) {
    enc.frame(out, FrameType::Ack, Cmd::PushAck, seq, log_id, |b| {
        wire::PushAck::create(b, &wire::PushAckArgs { message_id })
    });
}

/// Appends a Logout request; `reason` is for the gate's logs.
pub fn write_logout(enc: &mut Encoder, out: &mut Vec<u8>, seq: u32, log_id: u64, reason: &str) {
    enc.frame(out, FrameType::Request, Cmd::Logout, seq, log_id, |b| {
        let reason = b.create_string(reason);
        wire::Logout::create(b, &wire::LogoutArgs { reason: Some(reason) })
    });
}

/// Where a machine writes: the caller's encoder and buffer. What is written is appended; the
/// caller sends the bytes [`AppProto::wire`] returns (the whole buffer) and clears it.
///
/// Frames are appended as they are; on the secure channel the machine turns them into records
/// in place (sealed once the channel is open; held inside the machine before the gate's Accept)
/// at [`AppProto::wire`], and at the end of its own calls. `Out` remembers where the frames not
/// yet turned into records start; the bytes the buffer held when the `Out` was made are taken
/// to be the caller's own, ready to send.
#[derive(Debug)]
pub struct Out<'a> {
    /// Builds bodies.
    enc: &'a mut Encoder,
    /// Receives whole frames and records.
    buf: &'a mut Vec<u8>,
    /// Frames appended through this `Out`.
    frames: u32,
    /// `buf[plain..]` are frames written since the machine last made the buffer wire bytes.
    plain: usize,
}

impl<'a> Out<'a> {
    /// Frames go to `buf`, built with `enc`.
    pub fn new(enc: &'a mut Encoder, buf: &'a mut Vec<u8>) -> Out<'a> {
        let plain = buf.len();
        Out { enc, buf, frames: 0, plain }
    }

    /// Appends a frame with `write` (the shell's own frames: GPS, say) and counts it. On the
    /// secure channel it becomes wire bytes at the machine's next call with this `Out` (at the
    /// latest [`AppProto::wire`]).
    pub fn put(&mut self, write: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
        write(self.enc, self.buf);
        self.frames += 1;
    }

    /// Frames appended through this `Out`.
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// The buffer's bytes (earlier ones included). On the secure channel they are wire bytes
    /// only after [`AppProto::wire`]; send what that returns.
    pub fn bytes(&self) -> &[u8] {
        self.buf
    }
}

/// How the connection was lost, for [`AppProto::on_disconnected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The gate or the network ended it (end of stream, reset, failed write), or the connect
    /// itself failed.
    Remote,
    /// The shell closed it on purpose (not because of anything the gate did).
    Local,
}

/// When to connect again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// After this wait (zero: at once).
    After(Duration),
    /// Not: the session was taken over (Displaced) or ended (logged out).
    Never,
}

/// What [`AppProto::on_disconnected`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected {
    /// When to connect again.
    pub reconnect: Reconnect,
    /// Requests that were outstanding: no answer will come for them (§9.7).
    pub requests_cut: u32,
}

/// Why a request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// No live session on this connection.
    NotLive,
    /// [`Config::max_requests`] are outstanding.
    Full,
    /// The cmd has no Request form, or is one of the machine's own (Login, Resume, Keepalive,
    /// Logout).
    NotARequest,
}

/// A request sent by [`AppProto::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Its sequence-id: the answer's [`Event::Reply`] or [`Event::Failed`] carries it.
    pub seq: u32,
    /// Its log-id (§7).
    pub log_id: u64,
}

/// The call does not fit the connection's state (a login while not waiting for a token, a
/// logout without a live session, a connect while displaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotNow;

/// Why the connection must close. The shell closes it and then calls
/// [`AppProto::on_disconnected`], which says when to come back.
#[derive(Debug, Clone)]
pub enum Close<'a> {
    /// The gate is closing it (§9.5). After Displaced and LoggedOut there is nothing to come
    /// back to; otherwise reconnect (to `reconnect` if not empty) no sooner than
    /// `retry_after_ms`.
    GoAway {
        /// Why.
        reason: GoAwayReason,
        /// The gate's text, for logs.
        message: &'a str,
        /// host:port to reconnect to; empty means the same.
        reconnect: &'a str,
        /// Least wait before reconnecting, ms.
        retry_after_ms: u32,
    },
    /// An error that ends this attempt: the Login or Resume was refused (a bad token,
    /// Overloaded...), or the gate refused the connection (Overloaded, ShuttingDown with
    /// sequence-id 0), gave up waiting for a login (NotLoggedIn) or lost the framing of what
    /// this side sent (BadMagic, UnsupportedVersion, FrameTooLarge).
    Error {
        /// The error.
        error: ErrorView<'a>,
        /// Its log-id.
        log_id: u64,
        /// It answers this connection's Login or Resume (else it carries sequence-id 0: the
        /// gate ends the connection).
        answered_login: bool,
    },
    /// No Session answer within [`Config::session_timeout`].
    SessionTimeout,
    /// The gate's bytes cannot be used any more: the frames lost their framing, or (secure
    /// channel) the channel failed or the gate refused the handshake. See [`Fault`].
    Stream(Fault),
}

/// Why the bytes from the gate cannot be used any more ([`Close::Stream`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The frame stream lost its framing (§8.3).
    Frames(StreamError),
    /// The secure channel ended (§14.7): a record that does not parse or authenticate, an
    /// Accept that does not, a record out of order, or the gate's Reject
    /// ([`ChannelError::RejectedByGate`], unauthenticated: a hint only). The gate holds the
    /// session: the next connection resumes it. A Reject UnknownSession makes the next
    /// connection try the previous resumption secret, then log in (§14.6); UnknownKey and
    /// Version are configuration errors ([`Fault::misconfigured`]) and wait long before the
    /// next attempt.
    Channel(ChannelError),
}

impl Fault {
    /// The gate refused the handshake for this side's configuration: it does not hold the
    /// gate key this app was given (UnknownKey), or speaks another channel version. Another
    /// attempt fails the same way until the app (or the gate) is set up differently.
    pub fn misconfigured(&self) -> Option<RejectReason> {
        match self {
            Fault::Channel(ChannelError::RejectedByGate {
                reason: r @ (RejectReason::UnknownKey | RejectReason::Version),
                ..
            }) => Some(*r),
            _ => None,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Frames(e) => write!(f, "frames: {e}"),
            Fault::Channel(e) => write!(f, "secure channel: {e}"),
        }
    }
}

/// What the machine tells its shell. Events borrow the machine's input buffer: copy out what
/// is needed before the next call.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A login token is needed: call [`AppProto::login`]. `resume_refused`: the gate refused
    /// the resume (the held session is gone), so the login replaces it.
    LoginNeeded {
        /// The gate refused the resume that was tried first.
        resume_refused: bool,
    },
    /// The session is live on this connection ([`AppProto::session`] has the Session).
    SessionUp {
        /// The held session continued (nothing lost; unacked pushes are replayed).
        resumed: bool,
        /// A login that replaced a session that could not be resumed (not the first login,
        /// nor one after logout): pushes to the old one ended without Delivered.
        relogin: bool,
        /// Secure channel: the gate's current public key, when an Accept since the last
        /// SessionUp said the key this app had is being retired. The machine uses it from now
        /// on; store it in place of the old one (§14.5).
        new_server_key: Option<PublicKey>,
    },
    /// A push to show, until its deadline (`delivery.deadline_ms`, wall-clock ms; 0: none):
    /// it came before its deadline, is acked already, and is never reported twice for one
    /// message id.
    Push {
        /// Its fields.
        delivery: DeliveryView<'a>,
        /// Its flow's log-id.
        log_id: u64,
    },
    /// A delivery whose message id was shown before: acked, not to be shown again.
    Repeat {
        /// The message id.
        message_id: u64,
        /// The gate flagged it as a redelivery.
        redelivery: bool,
    },
    /// The answer to a request sent with [`AppProto::request`].
    Reply {
        /// The request's sequence-id.
        seq: u32,
        /// The tag it was sent with.
        tag: u8,
        /// When it was sent.
        sent: Instant,
        /// The answer.
        reply: ReplyView<'a>,
    },
    /// An Error answering a request sent with [`AppProto::request`].
    Failed {
        /// The request's sequence-id.
        seq: u32,
        /// The tag it was sent with.
        tag: u8,
        /// When it was sent.
        sent: Instant,
        /// The error.
        error: ErrorView<'a>,
    },
    /// No answer within [`Config::request_timeout`]; a later one is [`Event::Unmatched`].
    TimedOut {
        /// The request's sequence-id.
        seq: u32,
        /// The tag it was sent with.
        tag: u8,
        /// When it was sent.
        sent: Instant,
    },
    /// The gate answered [`AppProto::logout`]; a GoAway LoggedOut follows.
    LoggedOut,
    /// The connection must close.
    Close(Close<'a>),
    /// A frame that answers nothing the machine sent: a late or unknown answer, an Error that
    /// is only information (§6), a Session on a live connection. A shell that sends requests of
    /// its own finds their answers here.
    Unmatched(Frame<'a>),
    /// A frame whose body did not verify (§2.2); the connection goes on.
    Rejected {
        /// Its header.
        header: Header,
        /// What was wrong.
        error: FrameError,
    },
}

/// Events made outside the frames they answer (timers, a new connection), waiting for
/// [`AppProto::poll_event`].
#[derive(Debug, Clone, Copy)]
enum Note {
    /// [`Event::LoginNeeded`].
    LoginNeeded { resume_refused: bool },
    /// [`Event::TimedOut`].
    TimedOut { seq: u32, tag: u8, sent: Instant },
    /// [`Close::SessionTimeout`].
    SessionTimeout,
}

impl Note {
    fn event(self) -> Event<'static> {
        match self {
            Note::LoginNeeded { resume_refused } => Event::LoginNeeded { resume_refused },
            Note::TimedOut { seq, tag, sent } => Event::TimedOut { seq, tag, sent },
            Note::SessionTimeout => Event::Close(Close::SessionTimeout),
        }
    }
}

/// The app's standing with the gate, across connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// No session: the next connection logs in (the first login, or one after logout).
    Fresh,
    /// A session exists, live or held, and `info.resume_token` resumes it.
    Resumable,
    /// A session existed but cannot be resumed (refused, or the gate gave no token): the next
    /// login replaces it.
    Lost,
    /// Another login took the session over (GoAway Displaced): nothing to come back to.
    Displaced,
}

/// Where the connection is in opening a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Resume sent with this sequence-id.
    Resume { seq: u32 },
    /// Waiting for the shell's [`AppProto::login`].
    AwaitToken,
    /// Login sent with this sequence-id.
    Login { seq: u32 },
}

/// Why a connection the machine ended is ending: decides the next wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A GoAway: not a failure; wait its retry-after.
    GoAway { reason: GoAwayReason, retry_after: Duration },
    /// Refused for load or shutdown: a failed attempt; wait at least its retry-after.
    Refused { retry_after: Duration },
    /// The login was refused: a failed attempt; wait at least `refused_login_wait`.
    LoginRefused,
    /// Any other failure of the attempt.
    Failed,
    /// The gate refused the resumption secret (Reject UnknownSession): the next connection
    /// tries the previous secret, or logs in. Not a failure: at once.
    Again,
    /// The gate refused the handshake for this side's configuration (Reject UnknownKey or
    /// Version): a failed attempt; wait about [`Config::retry_after_ceiling`].
    Misconfigured,
}

/// The current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// None.
    Down,
    /// Connected, the session not yet up; give up at `deadline`.
    Opening { step: Step, deadline: Instant },
    /// The session is live; keep it alive every `keepalive` without sending.
    Live { keepalive: Duration },
    /// Logout sent with this sequence-id.
    LoggingOut { seq: u32 },
    /// The machine said the connection must close; waiting for `on_disconnected`.
    Closing(Ending),
}

/// A request waiting for its answer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Its sequence-id.
    seq: u32,
    /// The shell's tag.
    tag: u8,
    /// When it was sent.
    sent: Instant,
}

/// Bytes received and not yet made into events, in one buffer:
///
/// ```text
/// buf: [ decoded | frames start..end | gap end..raw | records raw..raw_end | free ]
/// ```
///
/// In plaintext the bytes read are frames (`raw == raw_end == end`). On the secure channel
/// they are records: each is opened in place where it arrived and its plaintext moved down to
/// `end` (the gap is the headers and tags of the records opened since the last move), so the
/// frame decoder sees one frame stream and nothing is copied to a second buffer.
#[derive(Debug, Default)]
struct Inbound {
    /// Fully initialised; its length is the buffer's size.
    buf: Vec<u8>,
    /// First frame byte not yet decoded.
    start: usize,
    /// End of the frame bytes.
    end: usize,
    /// Secure channel: first byte of the records not yet opened.
    raw: usize,
    /// End of the bytes received.
    raw_end: usize,
}

impl Inbound {
    /// At least `want` free bytes after `raw_end`: moves unread bytes to the front (closing the
    /// gap), grows when that is not enough, and gives a buffer grown for a large frame back once
    /// it is empty.
    fn reserve(&mut self, want: usize, chunk: usize) {
        if self.start == self.end && self.raw == self.raw_end {
            self.clear();
            if self.buf.len() > 8 * chunk.max(want) {
                self.buf = Vec::new();
            }
        }
        if self.buf.len() - self.raw_end >= want {
            return;
        }
        if self.start > 0 || self.raw > self.end {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.buf.copy_within(self.raw..self.raw_end, self.end);
            self.raw_end = self.end + (self.raw_end - self.raw);
            self.raw = self.end;
        }
        if self.buf.len() - self.raw_end < want {
            let cap = MAX_FRAME + RECORD_HEADER + MAX_RECORD_BODY + chunk;
            let size = (self.raw_end + want).max(self.buf.len().saturating_mul(2).min(cap));
            self.buf.resize(size, 0);
        }
    }

    /// `n` bytes arrived at `raw_end`; in plaintext they are frame bytes at once.
    fn received(&mut self, n: usize, records: bool) {
        self.raw_end = (self.raw_end + n).min(self.buf.len());
        if !records {
            self.end = self.raw_end;
            self.raw = self.raw_end;
        }
    }

    /// Appends received bytes.
    fn push(&mut self, data: &[u8], chunk: usize, records: bool) {
        self.reserve(data.len(), chunk);
        let at = self.raw_end;
        self.buf[at..at + data.len()].copy_from_slice(data);
        self.received(data.len(), records);
    }

    /// Puts frame bytes after the frames held, before any record not yet opened.
    fn push_frames(&mut self, data: &[u8], chunk: usize) {
        self.reserve(data.len(), chunk);
        // After `reserve` the gap is closed unless there was room already; make room for `data`.
        if self.raw < self.end + data.len() {
            let to = self.end + data.len();
            self.buf.copy_within(self.raw..self.raw_end, to);
            self.raw_end = to + (self.raw_end - self.raw);
            self.raw = to;
        }
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// The frame bytes were all used (or dropped): when no record is waiting either, the gap
    /// goes.
    fn frames_done(&mut self) {
        self.start = self.end;
        if self.raw == self.raw_end {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.raw = 0;
        self.raw_end = 0;
    }
}

/// The secure channel's state (docs/PROTOCOL.md §14): the keys, the session's resumption
/// secrets across connections, and the current connection's channel.
#[derive(Debug)]
struct Secure {
    /// The gate's key and this app's.
    cfg: SecureConfig,
    /// The current connection's channel, from its first flight on.
    chan: Option<ClientChannel>,
    /// Frame bytes written before the Accept: sealed right after the commit record.
    early: Vec<u8>,
    /// The resumption secret of the newest Accept.
    newest: Option<ResumeSecret>,
    /// The secret before `newest`, kept until a frame after the newest Accept proves that the
    /// gate committed it (§14.6).
    previous: Option<ResumeSecret>,
    /// The secret this connection's ResumeHello used.
    used: Used,
    /// The gate did not know `newest`: the next ResumeHello uses `previous`.
    try_previous: bool,
    /// An Accept named a new gate key that no [`Event::SessionUp`] reported yet.
    key_news: bool,
    /// The channel failed; reported by [`AppProto::poll_event`] after the frames before it.
    fault: Option<ChannelError>,
}

/// Which resumption secret a connection's ResumeHello used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Used {
    /// None: a Hello, or no handshake yet.
    None,
    /// [`Secure::newest`].
    Newest,
    /// [`Secure::previous`].
    Previous,
}

impl Secure {
    fn new(cfg: SecureConfig) -> Secure {
        Secure {
            cfg,
            chan: None,
            early: Vec::new(),
            newest: None,
            previous: None,
            used: Used::None,
            try_previous: false,
            key_news: false,
            fault: None,
        }
    }

    /// Forgets the connection's channel.
    fn end_connection(&mut self) {
        self.chan = None;
        self.early = Vec::new();
        self.used = Used::None;
        self.fault = None;
    }

    /// Forgets the session's secrets.
    fn forget_secrets(&mut self) {
        self.newest = None;
        self.previous = None;
        self.try_previous = false;
    }

    /// The channel failed: it is gone, and the failure waits to be reported.
    fn fail(&mut self, e: ChannelError) {
        self.chan = None;
        self.early = Vec::new();
        self.fault.get_or_insert(e);
    }

    /// An Accept authenticated: the next resume's secret is `secret`, and the one this
    /// connection resumed with stays until the gate shows it committed (§14.6).
    fn accepted(&mut self, new_server_key: Option<PublicKey>, secret: ResumeSecret) {
        if let Some(k) = new_server_key {
            self.cfg.server_key = k;
            self.key_news = true;
        }
        self.previous = match self.used {
            Used::Newest => self.newest.take(),
            Used::Previous => self.previous.take(),
            Used::None => None,
        };
        self.newest = Some(secret);
        self.try_previous = false;
    }

    /// Writes the first flight, `frames`, in a Hello or (with `resume_id` and a secret) a
    /// ResumeHello, appended to `out`.
    fn open(&mut self, resume_id: Option<&[u8]>, frames: &[u8], out: &mut Vec<u8>) {
        let secret = match (self.try_previous, &self.previous, &self.newest) {
            (true, Some(s), _) => Some((s, Used::Previous)),
            (_, _, Some(s)) => Some((s, Used::Newest)),
            _ => None,
        };
        let chan = match (resume_id, secret) {
            (Some(id), Some((s, used))) if id.len() <= MAX_RESUME_ID => {
                self.used = used;
                ClientChannel::resume(id, s, frames, out)
            }
            // A Resume without a secret (or with a resume id too long to name) rides in a Hello.
            _ => {
                self.used = Used::None;
                ClientChannel::login(&self.cfg.server_key, &self.cfg.app_key, frames, out)
            }
        };
        match chan {
            Ok(c) => self.chan = Some(c),
            Err(e) => self.fail(e),
        }
    }
}

/// The app's session across connections, sans I/O. See the module documentation.
#[derive(Debug)]
pub struct AppProto {
    /// Bytes in; separate from `core` so events can borrow them while `core` changes.
    inbound: Inbound,
    /// Everything else.
    core: Core,
}

/// The machine's state apart from its input bytes.
#[derive(Debug)]
struct Core {
    /// Settings.
    cfg: Config,
    /// Standing with the gate.
    standing: Standing,
    /// The current connection.
    link: Link,
    /// The latest Session (kept while disconnected; cleared by logout and forget).
    info: Option<SessionInfo>,
    /// Where the last GoAway asked to reconnect.
    redirect: Option<String>,
    /// Failed attempts in a row.
    failures: u32,
    /// When this side last sent anything on the connection.
    last_tx: Instant,
    /// The machine's birth: keepalive timestamps count from it.
    epoch: Instant,
    /// The wall clock at `epoch`, ms since the Unix epoch: push deadlines are judged by it.
    wall_at_epoch_ms: u64,
    /// Pushes that came at or after their deadline, never shown: not shown, not acked (it wraps
    /// after four billion).
    expired: u32,
    /// Sequence-ids.
    seqs: SeqIds,
    /// Log-ids.
    logs: LogIds,
    /// Jitter.
    rng: Rng,
    /// Message ids shown.
    dedup: Dedup,
    /// Requests waiting for their answers, oldest first.
    requests: Vec<Pending>,
    /// Events made outside frames, oldest first.
    notes: Vec<Note>,
    /// Frames decoded since [`AppProto::take_frames_in`].
    frames_in: u32,
    /// The secure channel, when the machine speaks it.
    secure: Option<Box<Secure>>,
    /// The gate did not know the session (Reject UnknownSession for both secrets): the next
    /// connection's [`Event::LoginNeeded`] says the resume was refused.
    resume_refused: bool,
}

impl AppProto {
    /// A machine with no connection and no session, speaking plaintext frames. `seed` drives
    /// jitter and log-ids (give each machine its own); `now` is the time origin of keepalive
    /// timestamps, and the wall clock read here is the one push deadlines are judged by.
    pub fn new(cfg: Config, seed: u64, now: Instant) -> AppProto {
        AppProto::with_secure(cfg, None, seed, now)
    }

    /// A machine like [`AppProto::new`] that speaks the secure channel with `secure`'s keys
    /// (`None`: plaintext). Bytes in and out are then records; see the module documentation.
    pub fn with_secure(cfg: Config, secure: Option<SecureConfig>, seed: u64, now: Instant) -> AppProto {
        let dedup = Dedup::new(cfg.dedup_capacity);
        AppProto {
            inbound: Inbound::default(),
            core: Core {
                cfg,
                standing: Standing::Fresh,
                link: Link::Down,
                info: None,
                redirect: None,
                failures: 0,
                last_tx: now,
                epoch: now,
                wall_at_epoch_ms: crate::now_ms(),
                expired: 0,
                seqs: SeqIds::default(),
                logs: LogIds::new(seed),
                rng: Rng(mix64(seed)),
                dedup,
                requests: Vec::new(),
                notes: Vec::new(),
                frames_in: 0,
                secure: secure.map(|s| Box::new(Secure::new(s))),
                resume_refused: false,
            },
        }
    }

    /// A transport to the gate is up: sends Resume if a session can be resumed, else asks for
    /// a login token ([`Event::LoginNeeded`]). Refused while displaced
    /// ([`AppProto::forget_session`] first).
    pub fn on_connected(&mut self, now: Instant, out: &mut Out<'_>) -> Result<(), NotNow> {
        let c = &mut self.core;
        if c.standing == Standing::Displaced {
            return Err(NotNow);
        }
        self.inbound.clear();
        c.notes.clear();
        c.requests.clear();
        if let Some(sec) = c.secure.as_deref_mut() {
            sec.end_connection();
        }
        let deadline = now + c.cfg.session_timeout;
        // Opening, so that frames the shell wrote meanwhile wait for the channel.
        c.link = Link::Opening { step: Step::AwaitToken, deadline };
        let step = match (&c.standing, &c.info) {
            (Standing::Resumable, Some(info)) => {
                let (seq, log_id) = (c.seqs.fresh(), c.logs.fresh());
                let token = &info.resume_token;
                first_flight(c.secure.as_deref_mut(), out, Some(token), |enc, buf| {
                    write_resume(enc, buf, seq, log_id, token)
                });
                c.last_tx = now;
                Step::Resume { seq }
            }
            _ => {
                let resume_refused = std::mem::take(&mut c.resume_refused);
                c.notes.push(Note::LoginNeeded { resume_refused });
                Step::AwaitToken
            }
        };
        c.link = Link::Opening { step, deadline };
        c.settle(out);
        Ok(())
    }

    /// Sends the Login asked for by [`Event::LoginNeeded`], with a fresh `token` and a `device`
    /// description for the gate's logs.
    pub fn login(
        &mut self,
        now: Instant,
        token: &[u8],
        device: &str,
        out: &mut Out<'_>,
    ) -> Result<(), NotNow> {
        let c = &mut self.core;
        let Link::Opening { step: Step::AwaitToken, deadline } = c.link else { return Err(NotNow) };
        let (seq, log_id) = (c.seqs.fresh(), c.logs.fresh());
        first_flight(c.secure.as_deref_mut(), out, None, |enc, buf| {
            write_login(enc, buf, seq, log_id, token, device)
        });
        c.last_tx = now;
        c.link = Link::Opening { step: Step::Login { seq }, deadline };
        c.settle(out);
        Ok(())
    }

    /// Logs out (§9.3): the session ends at once, nothing is left to resume, and the gate's
    /// answer is [`Event::LoggedOut`]. Returns the Logout's sequence-id.
    pub fn logout(&mut self, now: Instant, reason: &str, out: &mut Out<'_>) -> Result<u32, NotNow> {
        let c = &mut self.core;
        if !matches!(c.link, Link::Live { .. }) {
            return Err(NotNow);
        }
        let (seq, log_id) = (c.seqs.fresh(), c.logs.fresh());
        out.put(|enc, buf| write_logout(enc, buf, seq, log_id, reason));
        c.settle(out);
        c.last_tx = now;
        c.link = Link::LoggingOut { seq };
        c.standing = Standing::Fresh;
        c.info = None;
        c.redirect = None;
        if let Some(sec) = c.secure.as_deref_mut() {
            sec.forget_secrets();
        }
        Ok(seq)
    }

    /// Sends a request of `cmd` (PlaceOrder, GrabOrder, OrderStatus, BusinessRequest) whose body
    /// `build` makes; `tag` comes back with its answer. Requests are pipelined: their answers
    /// come as [`Event::Reply`], [`Event::Failed`] or [`Event::TimedOut`], in any order.
    pub fn request<T>(
        &mut self,
        now: Instant,
        out: &mut Out<'_>,
        cmd: Cmd,
        tag: u8,
        build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<T>,
    ) -> Result<Sent, RequestError> {
        let c = &mut self.core;
        if body_kind(cmd, FrameType::Request).is_none()
            || matches!(cmd, Cmd::Login | Cmd::Resume | Cmd::Keepalive | Cmd::Logout)
        {
            return Err(RequestError::NotARequest);
        }
        if !matches!(c.link, Link::Live { .. }) {
            return Err(RequestError::NotLive);
        }
        if c.requests.len() >= c.cfg.max_requests {
            return Err(RequestError::Full);
        }
        let (seq, log_id) = (c.seqs.fresh(), c.logs.fresh());
        out.put(|enc, buf| enc.frame(buf, FrameType::Request, cmd, seq, log_id, build));
        c.settle(out);
        c.last_tx = now;
        c.requests.push(Pending { seq, tag, sent: now });
        Ok(Sent { seq, log_id })
    }

    /// The shell sent frames of its own (GPS, say) at `now`: they count as input for the
    /// gate's idle timeout, so the keepalive can wait.
    pub fn sent(&mut self, now: Instant) {
        self.core.last_tx = now;
    }

    /// Up to [`Config::read_chunk`] bytes (at least) to read the transport into; then
    /// [`AppProto::read_done`] with how many came. The bytes are what the socket carries:
    /// records on the secure channel.
    pub fn read_buf(&mut self) -> &mut [u8] {
        let chunk = self.core.cfg.read_chunk.max(1);
        self.inbound.reserve(chunk, chunk);
        let at = self.inbound.raw_end;
        &mut self.inbound.buf[at..]
    }

    /// `n` bytes were read into [`AppProto::read_buf`].
    pub fn read_done(&mut self, n: usize) {
        let records = self.core.secure.is_some();
        self.inbound.received(n, records);
    }

    /// Bytes received from the gate (records on the secure channel), copied in.
    pub fn handle_input(&mut self, data: &[u8]) {
        let chunk = self.core.cfg.read_chunk.max(1);
        let records = self.core.secure.is_some();
        self.inbound.push(data, chunk, records);
    }

    /// Frame bytes received and not yet made into events (a frame's first part, or frames after
    /// the event being handled); on the secure channel, from the records opened so far.
    pub fn unprocessed(&self) -> &[u8] {
        &self.inbound.buf[self.inbound.start..self.inbound.end]
    }

    /// Moves the unprocessed frame bytes to `into`, for a shell that lets another reader take
    /// the connection's frame stream over for a while ([`AppProto::give_unprocessed`] gives them
    /// back; on the secure channel see [`AppProto::lend_channel`] too).
    pub fn take_unprocessed(&mut self, into: &mut Vec<u8>) {
        into.extend_from_slice(self.unprocessed());
        self.inbound.frames_done();
    }

    /// Gives back frame bytes taken with [`AppProto::take_unprocessed`] and not used (in
    /// plaintext the same as [`AppProto::handle_input`]; on the secure channel they are frames,
    /// not records, and go before any record not yet opened).
    pub fn give_unprocessed(&mut self, frames: &[u8]) {
        let chunk = self.core.cfg.read_chunk.max(1);
        self.inbound.push_frames(frames, chunk);
    }

    /// The stream from the gate ended: `Err` when it ended inside a frame or (secure channel)
    /// inside a record.
    pub fn finish_input(&self) -> Result<(), Fault> {
        let i = &self.inbound;
        if i.raw < i.raw_end {
            let raw = &i.buf[i.raw..i.raw_end];
            let need = match raw.first_chunk::<RECORD_HEADER>() {
                Some(h) => RECORD_HEADER + usize::from(u16::from_be_bytes([h[1], h[2]])),
                None => RECORD_HEADER,
            };
            let (have, need) = (raw.len() as u32, need as u32);
            return Err(Fault::Channel(ChannelError::Record(RecordError::Truncated { have, need })));
        }
        schema::decode::finish(self.unprocessed()).map_err(Fault::Frames)
    }

    /// Makes what was written to `out` wire bytes and returns the buffer to send, whole. Call
    /// it last, after every call of a step, and send what it returns.
    ///
    /// In plaintext nothing changes. On the secure channel, frames written since the machine's
    /// last call with this `out` (the shell's own, [`Out::put`]) are sealed into a Data record
    /// in place, or held inside the machine while the gate's Accept has not come (they follow
    /// the commit record then); without a channel to send them on they are dropped.
    pub fn wire<'b>(&mut self, out: &'b mut Out<'_>) -> &'b [u8] {
        self.core.settle(out);
        out.buf
    }

    /// True when the machine speaks the secure channel.
    pub fn is_secure(&self) -> bool {
        self.core.secure.is_some()
    }

    /// Secure channel: the gate key the next Hello uses (the configured one, or the current key
    /// an Accept named since).
    pub fn server_key(&self) -> Option<&PublicKey> {
        self.core.secure.as_deref().map(|s| &s.cfg.server_key)
    }

    /// Secure channel: lends the connection's open channel, with the bytes received and not
    /// yet opened (appended to `raw`), to a shell that lets another reader and writer use the
    /// connection for a while (with [`AppProto::take_unprocessed`] for the frames opened
    /// already). Give both back with [`AppProto::return_channel`] before any other call that
    /// reads or writes. `None` in plaintext or while the channel is not open.
    pub fn lend_channel(&mut self, raw: &mut Vec<u8>) -> Option<ClientChannel> {
        let sec = self.core.secure.as_deref_mut()?;
        if sec.chan.as_ref().map(ClientChannel::state) != Some(ClientState::Open) {
            return None;
        }
        let i = &mut self.inbound;
        raw.extend_from_slice(&i.buf[i.raw..i.raw_end]);
        i.raw = i.raw_end;
        if i.start == i.end {
            i.clear();
        }
        sec.chan.take()
    }

    /// Takes back a channel lent with [`AppProto::lend_channel`] and the bytes received on it
    /// and not yet opened (a record's first part).
    pub fn return_channel(&mut self, chan: ClientChannel, raw: &[u8]) {
        if let Some(sec) = self.core.secure.as_deref_mut() {
            sec.chan = Some(chan);
            self.handle_input(raw);
        }
    }

    /// The next event, handling the bytes received so far one frame at a time (acks and the
    /// login after a refused resume are written to `out` as they are decided). Call until
    /// `None` after every input, timeout and connect.
    ///
    /// On the secure channel it first opens the records received: an Accept writes the commit
    /// record (and the frames held for it) to `out`, Data records become frames; a channel
    /// failure is reported (as [`Close::Stream`]) after the frames that came before it. What
    /// `out` holds is wire bytes once this returns `None` or a [`Event::Close`].
    pub fn poll_event(&mut self, now: Instant, out: &mut Out<'_>) -> Option<Event<'_>> {
        if !self.core.notes.is_empty() {
            // A few at most (timed-out requests): oldest first.
            return Some(self.core.notes.remove(0).event());
        }
        if matches!(self.core.link, Link::Down | Link::Closing(_)) {
            self.core.settle(out);
            return None;
        }
        if self.core.secure.is_some() {
            open_records(&mut self.inbound, &mut self.core, out);
        }
        loop {
            let bytes = &self.inbound.buf[self.inbound.start..self.inbound.end];
            let (item, n) = match schema::decode(bytes, &Limits::APP) {
                Ok(None) => {
                    let fault = self.core.secure.as_deref_mut().and_then(|s| s.fault.take());
                    let Some(e) = fault else {
                        self.core.settle(out);
                        return None;
                    };
                    let ending = self.core.channel_ending(&e);
                    self.core.link = Link::Closing(ending);
                    self.core.settle(out);
                    return Some(Event::Close(Close::Stream(Fault::Channel(e))));
                }
                Ok(Some(found)) => found,
                Err(e) => {
                    self.inbound.start = self.inbound.end;
                    self.core.link = Link::Closing(Ending::Failed);
                    self.core.settle(out);
                    return Some(Event::Close(Close::Stream(Fault::Frames(e))));
                }
            };
            self.inbound.start += n;
            self.core.frames_in = self.core.frames_in.wrapping_add(1);
            if let Some(event) = self.core.on_item(now, item, out) {
                if matches!(event, Event::Close(_)) {
                    self.core.settle(out);
                }
                return Some(event);
            }
        }
    }

    /// The next moment [`AppProto::handle_timeout`] has something to do: the Session's
    /// deadline, a keepalive, a request's timeout. `None` while there is no connection.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = &self.core;
        let request = c.requests.first().map(|p| p.sent + c.cfg.request_timeout);
        match c.link {
            Link::Opening { deadline, .. } => Some(deadline),
            Link::Live { keepalive } => {
                let ka = c.last_tx + keepalive;
                Some(request.map_or(ka, |r| r.min(ka)))
            }
            Link::LoggingOut { .. } => request,
            Link::Down | Link::Closing(_) => None,
        }
    }

    /// Does what is due at `now`: gives up a Session that did not come
    /// ([`Close::SessionTimeout`]), sends a keepalive, times requests out. Events follow from
    /// [`AppProto::poll_event`].
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Out<'_>) {
        let c = &mut self.core;
        match c.link {
            Link::Opening { deadline, .. } if now >= deadline => {
                c.link = Link::Closing(Ending::Failed);
                c.notes.push(Note::SessionTimeout);
                return;
            }
            Link::Live { keepalive } if now >= c.last_tx + keepalive => {
                let (seq, log_id) = (c.seqs.fresh(), c.logs.fresh());
                let ts_ms =
                    u64::try_from(now.saturating_duration_since(c.epoch).as_millis()).unwrap_or(u64::MAX);
                out.put(|enc, buf| enc.keepalive(buf, FrameType::Request, seq, log_id, ts_ms));
                c.settle(out);
                c.last_tx = now;
            }
            _ => {}
        }
        let timeout = c.cfg.request_timeout;
        while let Some(p) = c.requests.first().copied().filter(|p| now >= p.sent + timeout) {
            c.requests.remove(0);
            c.notes.push(Note::TimedOut { seq: p.seq, tag: p.tag, sent: p.sent });
        }
    }

    /// The transport is gone (or the connect failed): says when to connect again. A failed
    /// attempt (the session did not come up, or the machine ended the connection for an error)
    /// grows the backoff; a drop of a live session, a GoAway or the shell's own close does not.
    /// A gate's retry-after is a floor in any case.
    pub fn on_disconnected(&mut self, how: Lost) -> Disconnected {
        let c = &mut self.core;
        self.inbound.clear();
        c.notes.clear();
        if let Some(sec) = c.secure.as_deref_mut() {
            sec.end_connection();
        }
        let requests_cut = u32::try_from(c.requests.len()).unwrap_or(u32::MAX);
        c.requests.clear();
        let link = std::mem::replace(&mut c.link, Link::Down);
        let (failed, floor) = match link {
            Link::Closing(Ending::GoAway { reason, retry_after }) => {
                if matches!(reason, GoAwayReason::Displaced | GoAwayReason::LoggedOut | GoAwayReason::Ended) {
                    return Disconnected { reconnect: Reconnect::Never, requests_cut };
                }
                (false, Some(retry_floor(retry_after, c.cfg.retry_after_ceiling, c.rng.next_u64())))
            }
            Link::Closing(Ending::Refused { retry_after }) => {
                (true, Some(retry_floor(retry_after, c.cfg.retry_after_ceiling, c.rng.next_u64())))
            }
            Link::Closing(Ending::LoginRefused) => (true, Some(c.cfg.refused_login_wait)),
            Link::Closing(Ending::Failed) => (true, None),
            Link::Closing(Ending::Again) => (false, None),
            Link::Closing(Ending::Misconfigured) => {
                // Three quarters of the ceiling and up to a quarter more: not a tight loop, and
                // apps refused together do not come back together.
                let ceiling = c.cfg.retry_after_ceiling;
                (true, Some((ceiling * 3 / 4 + spread(ceiling / 4, c.rng.next_u64())).min(ceiling)))
            }
            Link::Opening { .. } | Link::Down => (how == Lost::Remote, None),
            Link::LoggingOut { .. } => return Disconnected { reconnect: Reconnect::Never, requests_cut },
            Link::Live { .. } => (false, None),
        };
        if c.standing == Standing::Displaced {
            return Disconnected { reconnect: Reconnect::Never, requests_cut };
        }
        c.failures = if failed { c.failures.saturating_add(1) } else { 0 };
        let backoff = backoff_delay(c.failures, c.cfg.backoff_min, c.cfg.backoff_max, c.rng.next_u64());
        let wait = floor.map_or(backoff, |f| f.max(backoff));
        Disconnected { reconnect: Reconnect::After(wait), requests_cut }
    }

    /// Forgets the session (resume token, Session, displacement, redirect): the next connection
    /// logs in afresh. The de-duplication ring stays, and so do the counters.
    pub fn forget_session(&mut self) {
        let c = &mut self.core;
        c.standing = Standing::Fresh;
        c.info = None;
        c.redirect = None;
        c.resume_refused = false;
        if let Some(sec) = c.secure.as_deref_mut() {
            sec.forget_secrets();
        }
    }

    /// The latest Session (kept while disconnected; cleared by logout and forget).
    pub fn session(&self) -> Option<&SessionInfo> {
        self.core.info.as_ref()
    }

    /// The resume token the next connection will present, if the session can be resumed.
    pub fn resume_token(&self) -> Option<&[u8]> {
        match (&self.core.standing, &self.core.info) {
            (Standing::Resumable, Some(info)) => Some(&info.resume_token),
            _ => None,
        }
    }

    /// host:port of the gate node holding the session: reconnect there first.
    pub fn node(&self) -> Option<&str> {
        self.core.info.as_ref().map(|i| i.node.as_str()).filter(|n| !n.is_empty())
    }

    /// Where the last GoAway asked to reconnect (tried before the node), until a session is up.
    pub fn redirect(&self) -> Option<&str> {
        self.core.redirect.as_deref()
    }

    /// True after a GoAway Displaced: another device holds the session; no reconnect until
    /// [`AppProto::forget_session`].
    pub fn displaced(&self) -> bool {
        self.core.standing == Standing::Displaced
    }

    /// True while the session is live on the current connection.
    pub fn is_live(&self) -> bool {
        matches!(self.core.link, Link::Live { .. })
    }

    /// Requests waiting for their answers.
    pub fn requests_pending(&self) -> usize {
        self.core.requests.len()
    }

    /// The message ids shown.
    pub fn dedup(&self) -> &Dedup {
        &self.core.dedup
    }

    /// Sets the wall clock the machine judges push deadlines by: at `now` it is `unix_ms`
    /// (ms since the Unix epoch). The machine reads the system's once, when it is made.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        let c = &mut self.core;
        c.wall_at_epoch_ms = match now.checked_duration_since(c.epoch) {
            Some(d) => unix_ms.saturating_sub(duration_ms(d)),
            None => unix_ms.saturating_add(duration_ms(c.epoch - now)),
        };
    }

    /// The wall clock at `now`, as the machine reckons it (ms since the Unix epoch).
    pub fn wall_ms(&self, now: Instant) -> u64 {
        self.core.wall_ms(now)
    }

    /// Pushes that came at or after their deadline and were never shown: neither shown nor
    /// acked (their receipt is TtlExpired).
    pub fn expired_pushes(&self) -> u32 {
        self.core.expired
    }

    /// A fresh log-id, for frames the shell sends itself (GPS).
    pub fn new_log_id(&mut self) -> u64 {
        self.core.logs.fresh()
    }

    /// The sequence-id counter, for a shell that lets another sender use the connection for a
    /// while: hand it over, and take it back with [`AppProto::set_seq_ids`], so one connection
    /// never has two requests with one sequence-id.
    pub fn seq_ids(&self) -> SeqIds {
        self.core.seqs
    }

    /// Takes the sequence-id counter back (see [`AppProto::seq_ids`]).
    pub fn set_seq_ids(&mut self, seqs: SeqIds) {
        self.core.seqs = seqs;
    }

    /// Frames decoded since the last call.
    pub fn take_frames_in(&mut self) -> u32 {
        std::mem::take(&mut self.core.frames_in)
    }
}

impl Core {
    /// The wall clock at `now` (ms since the Unix epoch).
    fn wall_ms(&self, now: Instant) -> u64 {
        match now.checked_duration_since(self.epoch) {
            Some(d) => self.wall_at_epoch_ms.saturating_add(duration_ms(d)),
            None => self.wall_at_epoch_ms.saturating_sub(duration_ms(self.epoch - now)),
        }
    }

    /// One decoded frame (or rejected one): the machine's part, and the event for the shell.
    fn on_item<'a>(&mut self, now: Instant, item: Decoded<'a>, out: &mut Out<'_>) -> Option<Event<'a>> {
        let f = match item {
            Decoded::Frame(f) => f,
            Decoded::Rejected { header, error: FrameError::UnknownCmd(_) } => {
                // A newer gate's push: acked by sequence-id so its scheme holds (§12.2).
                if header.ty == FrameType::Push as u8 && header.seq != 0 {
                    out.put(|enc, buf| write_push_ack(enc, buf, header.seq, header.log_id, 0));
                    self.last_tx = now;
                }
                return None;
            }
            // A type this build does not pair with the cmd: a newer gate's; ignored (§12.3).
            Decoded::Rejected { error: FrameError::BadType { .. }, .. } => return None,
            Decoded::Rejected { header, error } => return Some(Event::Rejected { header, error }),
        };
        let seq = f.header.seq;
        match (f.ty, f.body) {
            (FrameType::Response, Body::Session(s)) => self.on_session(now, f, &s),
            (FrameType::Error, Body::Error(e)) => self.on_error(now, f, e),
            (FrameType::Push, Body::PushDelivery(d)) => {
                let delivery = DeliveryView::of(d, f.header.flags);
                let log_id = f.header.log_id;
                let deadline = delivery.deadline_ms;
                if deadline != 0 && self.wall_ms(now) >= deadline && !self.dedup.contains(delivery.message_id)
                {
                    // Too late to show (§9.10). Not acked either: an ack now could still reach
                    // the gate within its grace and make the receipt Delivered for a push
                    // nobody saw; unacked, it ends TtlExpired, which is what happened.
                    self.expired = self.expired.wrapping_add(1);
                    return None;
                }
                // Every delivery in time is acked, also one seen before: the earlier ack may
                // have been lost, and only an ack gets the app-server its Delivered receipt.
                out.put(|enc, buf| write_push_ack(enc, buf, seq, log_id, delivery.message_id));
                self.last_tx = now;
                Some(if self.dedup.insert(delivery.message_id) {
                    Event::Push { delivery, log_id }
                } else {
                    Event::Repeat { message_id: delivery.message_id, redelivery: delivery.redelivery }
                })
            }
            (FrameType::Push, Body::GoAway(g)) => Some(self.on_go_away(g)),
            (FrameType::Response, Body::Reply(r)) => match self.take_request(seq) {
                Some(p) => Some(Event::Reply { seq, tag: p.tag, sent: p.sent, reply: ReplyView::of(r) }),
                None => Some(Event::Unmatched(f)),
            },
            // The machine's own keepalives: nothing to tell.
            (FrameType::Response, Body::Keepalive(_)) => None,
            (FrameType::Response, Body::Logout(_)) if self.link == (Link::LoggingOut { seq }) => {
                Some(Event::LoggedOut)
            }
            _ => Some(Event::Unmatched(f)),
        }
    }

    /// A Session answer: the session is up if it answers this connection's Login or Resume.
    fn on_session<'a>(&mut self, now: Instant, f: Frame<'a>, s: &wire::Session<'a>) -> Option<Event<'a>> {
        let resumed = match self.link {
            Link::Opening { step: Step::Resume { seq }, .. } if seq == f.header.seq => true,
            Link::Opening { step: Step::Login { seq }, .. } if seq == f.header.seq => false,
            _ => return Some(Event::Unmatched(f)),
        };
        let relogin = !resumed && self.standing == Standing::Lost;
        match &mut self.info {
            Some(info) => info.update(s),
            None => self.info = Some(SessionInfo::from_wire(s)),
        }
        let mut new_server_key = None;
        if let (Some(sec), Some(info)) = (self.secure.as_deref_mut(), self.info.as_mut()) {
            // The session takes the secret of the handshake that carried it (§14.6).
            info.resume_secret = sec.newest.as_ref().map(|s| s.0);
            if std::mem::take(&mut sec.key_news) {
                new_server_key = Some(sec.cfg.server_key);
            }
        }
        // An empty token cannot resume anything (a gate without hold sends none).
        self.standing = match s.resume_token() {
            Some(t) if !t.is_empty() => Standing::Resumable,
            _ => Standing::Lost,
        };
        self.redirect = None;
        self.failures = 0;
        let heartbeat = match s.heartbeat_ms() {
            0 => self.cfg.default_heartbeat,
            ms => Duration::from_millis(u64::from(ms)).max(MIN_HEARTBEAT),
        };
        // Half the heartbeat: one late frame does not let the gate's idle timeout fire.
        self.link = Link::Live { keepalive: heartbeat / 2 };
        self.last_tx = now;
        Some(Event::SessionUp { resumed, relogin, new_server_key })
    }

    /// An Error frame: the answer to the Login or Resume, a refusal of the connection, the
    /// answer to a request, or information.
    fn on_error<'a>(&mut self, now: Instant, f: Frame<'a>, e: wire::Error<'a>) -> Option<Event<'a>> {
        let (seq, log_id) = (f.header.seq, f.header.log_id);
        let error = ErrorView::of(e);
        let retry_after = Duration::from_millis(u64::from(error.retry_after_ms));
        if let Link::Opening { step, .. } = self.link {
            match step {
                Step::Resume { seq: s } if s == seq && error.code == ErrorCode::ResumeRefused => {
                    // The session is gone (hold expired, gate restarted) or the token was used:
                    // no gate will take it, and this connection is good for a login (§9.13).
                    self.standing = Standing::Lost;
                    let deadline = now + self.cfg.session_timeout;
                    self.link = Link::Opening { step: Step::AwaitToken, deadline };
                    return Some(Event::LoginNeeded { resume_refused: true });
                }
                Step::Resume { seq: s } | Step::Login { seq: s } if s == seq => {
                    let ending = match error.code {
                        ErrorCode::Overloaded | ErrorCode::ShuttingDown => Ending::Refused { retry_after },
                        ErrorCode::BadToken | ErrorCode::TokenExpired => Ending::LoginRefused,
                        _ => Ending::Failed,
                    };
                    self.link = Link::Closing(ending);
                    return Some(Event::Close(Close::Error { error, log_id, answered_login: true }));
                }
                _ => {}
            }
        }
        if seq == 0 {
            let ending = match error.code {
                // Refused at accept, or the gate is draining: it closes (§9.1, §9.14).
                ErrorCode::Overloaded | ErrorCode::ShuttingDown => Some(Ending::Refused { retry_after }),
                // The login timeout, or the gate lost the framing of what this side sent: it
                // closes (§8.3).
                ErrorCode::NotLoggedIn
                | ErrorCode::BadMagic
                | ErrorCode::UnsupportedVersion
                | ErrorCode::FrameTooLarge => Some(Ending::Failed),
                _ => None,
            };
            if let Some(ending) = ending {
                self.link = Link::Closing(ending);
                return Some(Event::Close(Close::Error { error, log_id, answered_login: false }));
            }
            return Some(Event::Unmatched(f));
        }
        match self.take_request(seq) {
            Some(p) => Some(Event::Failed { seq, tag: p.tag, sent: p.sent, error }),
            None => Some(Event::Unmatched(f)),
        }
    }

    /// A GoAway: the gate closes the connection (§9.5).
    fn on_go_away<'a>(&mut self, g: wire::GoAway<'a>) -> Event<'a> {
        let reason = g.reason();
        let reconnect = g.reconnect().unwrap_or("");
        match reason {
            GoAwayReason::Displaced => {
                // Its resume tokens are refused from now on (§9.4).
                self.standing = Standing::Displaced;
            }
            GoAwayReason::LoggedOut => self.standing = Standing::Fresh,
            GoAwayReason::Ended => {
                // The app-server ended the session (§9.15): nothing to resume, and logging in
                // again takes a token it still issues.
                self.standing = Standing::Fresh;
                self.info = None;
                if let Some(sec) = self.secure.as_deref_mut() {
                    sec.forget_secrets();
                }
            }
            _ => self.redirect = (!reconnect.is_empty()).then(|| reconnect.to_owned()),
        }
        let retry_after = Duration::from_millis(u64::from(g.retry_after_ms()));
        self.link = Link::Closing(Ending::GoAway { reason, retry_after });
        Event::Close(Close::GoAway {
            reason,
            message: g.message().unwrap_or(""),
            reconnect,
            retry_after_ms: g.retry_after_ms(),
        })
    }

    /// Makes what was written to `out` since its last settle wire bytes (secure channel): sealed
    /// in place once the channel is open, held for the commit before the Accept (and before the
    /// first flight while the connection opens), dropped when there is no channel to send it on.
    fn settle(&mut self, out: &mut Out<'_>) {
        let from = out.plain.min(out.buf.len());
        out.plain = out.buf.len();
        let Some(sec) = self.secure.as_deref_mut() else { return };
        if from == out.buf.len() {
            return;
        }
        let opening = matches!(self.link, Link::Opening { .. });
        match sec.chan.as_mut() {
            Some(chan) if chan.state() == ClientState::Open => {
                if let Err(e) = chan.seal_in_place(out.buf, from) {
                    // Only the nonces running out (2^64 records): the connection cannot go on.
                    out.buf.truncate(from);
                    sec.fail(e);
                }
            }
            Some(chan) if chan.state() == ClientState::AwaitingAccept => {
                sec.early.extend_from_slice(&out.buf[from..]);
                out.buf.truncate(from);
            }
            None if opening && sec.fault.is_none() => {
                sec.early.extend_from_slice(&out.buf[from..]);
                out.buf.truncate(from);
            }
            _ => out.buf.truncate(from),
        }
        out.plain = out.buf.len();
    }

    /// How a connection whose channel failed with `e` ends, and what the next one does.
    fn channel_ending(&mut self, e: &ChannelError) -> Ending {
        let Some(sec) = self.secure.as_deref_mut() else { return Ending::Failed };
        let ChannelError::RejectedByGate { reason, message } = e else { return Ending::Failed };
        match reason {
            RejectReason::UnknownSession if sec.used == Used::Newest && sec.previous.is_some() => {
                // The connection that brought the newest secret may have died before the gate
                // read its commit: the gate still has the previous one (§14.6).
                sec.try_previous = true;
                Ending::Again
            }
            RejectReason::UnknownSession if sec.used != Used::None => {
                // Neither secret opens the session: log in afresh, as after ResumeRefused
                // (§9.13). The Reject is unauthenticated, so the secrets stay until a new
                // session replaces them.
                sec.try_previous = false;
                if self.standing == Standing::Resumable {
                    self.standing = Standing::Lost;
                    self.resume_refused = true;
                }
                Ending::Again
            }
            RejectReason::UnknownKey | RejectReason::Version => Ending::Misconfigured,
            RejectReason::Overloaded => Ending::Refused { retry_after: retry_after_in(message) },
            _ => Ending::Failed,
        }
    }

    /// Removes and returns the outstanding request with `seq`.
    fn take_request(&mut self, seq: u32) -> Option<Pending> {
        let i = self.requests.iter().position(|p| p.seq == seq)?;
        Some(self.requests.remove(i))
    }
}

/// Writes a connection's first frame (Login or Resume) with `write`: in plaintext as it is; on
/// the secure channel, when the connection has no channel yet, inside its Hello or (with
/// `resume_id`, when a resumption secret is known) its ResumeHello. Frames the shell wrote
/// before it wait for the commit.
fn first_flight(
    sec: Option<&mut Secure>,
    out: &mut Out<'_>,
    resume_id: Option<&[u8]>,
    write: impl FnOnce(&mut Encoder, &mut Vec<u8>),
) {
    let Some(sec) = sec.filter(|s| s.chan.is_none() && s.fault.is_none()) else {
        out.put(write);
        return;
    };
    let from = out.plain.min(out.buf.len());
    sec.early.extend_from_slice(&out.buf[from..]);
    out.buf.truncate(from);
    let mut frames = Vec::new();
    write(out.enc, &mut frames);
    out.frames += 1;
    sec.open(resume_id, &frames, out.buf);
    out.plain = out.buf.len();
}

/// Opens every whole record received, in place: Data records' plaintext joins the frame bytes,
/// an Accept writes the commit record and the frames held for it to `out`. A failure is kept in
/// [`Secure::fault`] (reported after the frames before it) and stops the opening.
fn open_records(inb: &mut Inbound, c: &mut Core, out: &mut Out<'_>) {
    while c.secure.as_deref().is_some_and(|s| s.fault.is_none()) {
        match open_record(inb, c, out) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                // The channel stays for sealing the answers to the frames before the failure
                // (when it can still seal); nothing after it is read.
                if let Some(sec) = c.secure.as_deref_mut() {
                    sec.fault.get_or_insert(e);
                }
                inb.raw = inb.raw_end;
            }
        }
    }
}

/// Opens the record at `inb.raw` if it is whole; `Ok(false)` when it is not (yet).
fn open_record(inb: &mut Inbound, c: &mut Core, out: &mut Out<'_>) -> Result<bool, ChannelError> {
    let avail = &inb.buf[inb.raw..inb.raw_end];
    let Some(&first) = avail.first() else { return Ok(false) };
    // Refused on its first byte, as the frame decoder refuses a bad magic.
    let kind = RecordType::from_u8(first).ok_or(RecordError::UnknownType(first))?;
    let Some(hdr) = avail.first_chunk::<RECORD_HEADER>() else { return Ok(false) };
    let len = usize::from(u16::from_be_bytes([hdr[1], hdr[2]]));
    if len > MAX_RECORD_BODY {
        return Err(RecordError::TooLong { kind, len: len as u32, max: MAX_RECORD_BODY as u32 }.into());
    }
    if avail.len() < RECORD_HEADER + len {
        return Ok(false);
    }
    let body = inb.raw + RECORD_HEADER..inb.raw + RECORD_HEADER + len;
    let next = body.end;
    let Some(sec) = c.secure.as_deref_mut() else { return Ok(false) };
    match (kind, sec.chan.as_mut()) {
        (RecordType::Data, Some(chan)) => {
            let n = chan.open_in_place(&mut inb.buf[body.clone()])?;
            inb.buf.copy_within(body.start..body.start + n, inb.end);
            inb.end += n;
            if n > 0 {
                // A frame after the Accept: the gate committed, so the secret before the
                // newest one is of no use any more (§14.6).
                sec.previous = None;
            }
        }
        (_, Some(chan)) => {
            // Frames written since the last settle were written before the Accept.
            if chan.state() == ClientState::AwaitingAccept {
                let from = out.plain.min(out.buf.len());
                sec.early.extend_from_slice(&out.buf[from..]);
                out.buf.truncate(from);
            }
            let mut frames = Vec::new();
            let record = Record { kind, body: &inb.buf[body] };
            // An Accept appends the commit record; a Reject or a record the gate may not send
            // now fails.
            match chan.on_record(record, &mut frames, out.buf)? {
                ClientEvent::Accepted { new_server_key, resume_secret } => {
                    let early = std::mem::take(&mut sec.early);
                    if !early.is_empty() {
                        chan.seal(&early, out.buf)?;
                    }
                    out.plain = out.buf.len();
                    sec.accepted(new_server_key, resume_secret);
                }
                ClientEvent::Data => {}
            }
            // Frames the Accept carried (this gate sends none there): a record is longer than
            // its plaintext, so they fit in the bytes it took.
            inb.buf[inb.end..inb.end + frames.len()].copy_from_slice(&frames);
            inb.end += frames.len();
        }
        (RecordType::Reject, None) => {
            // Refused before the first flight went out: at accept, for load.
            let (reason, message) = parse_reject(&inb.buf[body]);
            return Err(ChannelError::RejectedByGate { reason, message });
        }
        (kind, None) => return Err(ChannelError::Unexpected { kind, state: "before the Hello" }),
    }
    inb.raw = next;
    if inb.raw == inb.raw_end {
        inb.raw = inb.end;
        inb.raw_end = inb.end;
    }
    Ok(true)
}

/// The wait a gate's Reject Overloaded asks for: its message ends with "retry after N ms"
/// (unauthenticated, like every Reject; bounded by the retry-after ceiling). Zero if absent.
fn retry_after_in(message: &str) -> Duration {
    let ms = message
        .rsplit_once("retry after ")
        .and_then(|(_, rest)| rest.strip_suffix(" ms"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Frames, FLAG_REDELIVERY};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A machine, its output buffer, and a fake gate's encoder.
    struct Rig {
        m: AppProto,
        enc: Encoder,
        out: Vec<u8>,
        gate: Encoder,
        now: Instant,
    }

    /// A frame the machine wrote, copied out.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Sent {
        cmd: Cmd,
        ty: FrameType,
        seq: u32,
        log_id: u64,
        /// Login: the token; Resume: the resume token; PushAck: the message id (8 bytes LE).
        detail: Vec<u8>,
    }

    /// Owned copy of the events that matter to these tests.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        LoginNeeded(bool),
        Up { resumed: bool, relogin: bool },
        Push(u64, bool),
        Repeat(u64, bool),
        Reply(u32, u8, u16),
        Failed(u32, u8, ErrorCode),
        TimedOut(u32, u8),
        LoggedOut,
        GoAway(GoAwayReason, u32),
        CloseError(ErrorCode, bool),
        SessionTimeout,
        Stream,
        Unmatched(Cmd, u32),
        Rejected(u32),
    }

    impl Rig {
        fn new(cfg: Config) -> Rig {
            let now = Instant::now();
            Rig {
                m: AppProto::new(cfg, 7, now),
                enc: Encoder::new(),
                out: Vec::new(),
                gate: Encoder::new(),
                now,
            }
        }

        fn connect(&mut self) {
            let now = self.now;
            let (m, mut out) = (&mut self.m, Out::new(&mut self.enc, &mut self.out));
            m.on_connected(now, &mut out).expect("not displaced");
        }

        fn login(&mut self, token: &[u8]) {
            let now = self.now;
            let (m, mut out) = (&mut self.m, Out::new(&mut self.enc, &mut self.out));
            m.login(now, token, "test", &mut out).expect("a token was asked for");
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            let now = self.now;
            let (m, mut out) = (&mut self.m, Out::new(&mut self.enc, &mut self.out));
            m.handle_timeout(now, &mut out);
        }

        /// Feeds the gate's bytes and collects every event.
        fn feed(&mut self, bytes: &[u8]) -> Vec<Ev> {
            self.m.handle_input(bytes);
            self.events()
        }

        fn events(&mut self) -> Vec<Ev> {
            let now = self.now;
            let mut evs = Vec::new();
            let mut out = Out::new(&mut self.enc, &mut self.out);
            while let Some(e) = self.m.poll_event(now, &mut out) {
                evs.push(match e {
                    Event::LoginNeeded { resume_refused } => Ev::LoginNeeded(resume_refused),
                    Event::SessionUp { resumed, relogin, .. } => Ev::Up { resumed, relogin },
                    Event::Push { delivery, .. } => Ev::Push(delivery.message_id, delivery.redelivery),
                    Event::Repeat { message_id, redelivery } => Ev::Repeat(message_id, redelivery),
                    Event::Reply { seq, tag, reply, .. } => Ev::Reply(seq, tag, reply.code),
                    Event::Failed { seq, tag, error, .. } => Ev::Failed(seq, tag, error.code),
                    Event::TimedOut { seq, tag, .. } => Ev::TimedOut(seq, tag),
                    Event::LoggedOut => Ev::LoggedOut,
                    Event::Close(Close::GoAway { reason, retry_after_ms, .. }) => {
                        Ev::GoAway(reason, retry_after_ms)
                    }
                    Event::Close(Close::Error { error, answered_login, .. }) => {
                        Ev::CloseError(error.code, answered_login)
                    }
                    Event::Close(Close::SessionTimeout) => Ev::SessionTimeout,
                    Event::Close(Close::Stream(_)) => Ev::Stream,
                    Event::Unmatched(f) => Ev::Unmatched(f.cmd, f.header.seq),
                    Event::Rejected { header, .. } => Ev::Rejected(header.seq),
                });
            }
            evs
        }

        /// The frames the machine wrote since the last call.
        fn sent(&mut self) -> Vec<Sent> {
            let frames = parse_sent(&self.out);
            self.out.clear();
            frames
        }

        /// The wire bytes the machine has for the gate (after [`AppProto::wire`]), taken.
        fn wire(&mut self) -> Vec<u8> {
            let (m, mut out) = (&mut self.m, Out::new(&mut self.enc, &mut self.out));
            m.wire(&mut out);
            std::mem::take(&mut self.out)
        }
    }

    /// The frames in `bytes`, copied out.
    fn parse_sent(bytes: &[u8]) -> Vec<Sent> {
        {
            let mut frames = Vec::new();
            for item in Frames::new(bytes, Limits::APP) {
                let Ok(Decoded::Frame(f)) = item else { panic!("the machine wrote a bad frame: {item:?}") };
                let detail = match f.body {
                    Body::Login(l) => l.token().map(|t| t.bytes().to_vec()).unwrap_or_default(),
                    Body::Resume(r) => r.resume_token().map(|t| t.bytes().to_vec()).unwrap_or_default(),
                    Body::PushAck(a) => a.message_id().to_le_bytes().to_vec(),
                    _ => Vec::new(),
                };
                frames.push(Sent {
                    cmd: f.cmd,
                    ty: f.ty,
                    seq: f.header.seq,
                    log_id: f.header.log_id,
                    detail,
                });
            }
            frames
        }
    }

    impl Rig {
        fn session(&mut self, answering: &Sent, token: &[u8], heartbeat_ms: u32) -> Vec<u8> {
            let mut b = Vec::new();
            self.gate.frame(
                &mut b,
                FrameType::Response,
                answering.cmd,
                answering.seq,
                answering.log_id,
                |fb| {
                    let resume_token = fb.create_vector(token);
                    let node = fb.create_string("10.0.0.1:7100");
                    wire::Session::create(
                        fb,
                        &wire::SessionArgs {
                            uid: 42,
                            role: wire::Role::Driver,
                            heartbeat_ms,
                            idle_timeout_ms: 90_000,
                            session_epoch: 9,
                            resume_token: Some(resume_token),
                            node: Some(node),
                            hold_ms: 60_000,
                        },
                    )
                },
            );
            b
        }

        fn error(&mut self, seq: u32, code: ErrorCode, retry_after_ms: u32) -> Vec<u8> {
            let mut b = Vec::new();
            self.gate.error(&mut b, seq, 5, code, wire::Hop::Gate, 0, "no", retry_after_ms);
            b
        }

        fn push(&mut self, seq: u32, message_id: u64, redelivery: bool) -> Vec<u8> {
            self.push_due(seq, message_id, redelivery, 0)
        }

        /// A push whose deadline is `deadline_ms` (wall clock; 0: none).
        fn push_due(&mut self, seq: u32, message_id: u64, redelivery: bool, deadline_ms: u64) -> Vec<u8> {
            let mut b = Vec::new();
            self.gate.frame(&mut b, FrameType::Push, Cmd::PushDelivery, seq, 0x100 + message_id, |fb| {
                let payload = fb.create_vector(b"offer");
                let args = wire::PushDeliveryArgs {
                    message_id,
                    payload: Some(payload),
                    sent_at_us: 1,
                    kind: 1,
                    deadline_ms,
                };
                wire::PushDelivery::create(fb, &args)
            });
            if redelivery {
                b[3] |= FLAG_REDELIVERY;
            }
            b
        }

        fn go_away(&mut self, reason: GoAwayReason, reconnect: &str, retry_after_ms: u32) -> Vec<u8> {
            let mut b = Vec::new();
            self.gate.go_away(&mut b, 1, reason, "bye", reconnect, retry_after_ms);
            b
        }

        /// Connects and logs in with a fresh machine state; returns the Login frame.
        fn live(&mut self, token: &[u8], heartbeat_ms: u32) -> Sent {
            self.connect();
            assert_eq!(self.events(), vec![Ev::LoginNeeded(false)]);
            self.login(b"login-token");
            let login = self.sent().pop().expect("login");
            let answer = self.session(&login, token, heartbeat_ms);
            assert!(matches!(self.feed(&answer)[..], [Ev::Up { resumed: false, .. }]));
            login
        }
    }

    fn ack_ids(sent: &[Sent]) -> Vec<(u32, u64)> {
        sent.iter()
            .filter(|s| s.cmd == Cmd::PushAck)
            .map(|s| (s.seq, u64::from_le_bytes(s.detail[..8].try_into().expect("8 bytes"))))
            .collect()
    }

    #[test]
    fn dedup_is_bounded_and_forgets_the_oldest() {
        let mut d = Dedup::new(3);
        assert!(d.insert(1) && d.insert(2) && d.insert(3));
        assert!(!d.insert(2), "a repeat is not new");
        assert_eq!(d.len(), 3);
        assert!(d.insert(4), "a fourth id evicts the oldest");
        assert_eq!(d.len(), 3);
        assert!(!d.contains(1) && d.contains(2) && d.contains(3) && d.contains(4));
        // 2 was first seen before 3 and 4: its repeat above did not make it younger.
        assert!(d.insert(5));
        assert!(!d.contains(2) && d.contains(3));
        assert!(d.insert(1), "an evicted id is new again");
        // 0 is an id like any other (no sentinel).
        assert!(d.insert(0) && !d.insert(0));

        let mut one = Dedup::new(0);
        assert_eq!(one.capacity(), 1);
        assert!(one.insert(7) && !one.insert(7) && one.insert(8) && one.insert(7));

        let mut big = Dedup::new(DEFAULT_DEDUP_CAPACITY);
        for id in 0..10_000u64 {
            assert!(big.insert(id));
        }
        assert_eq!(big.len(), DEFAULT_DEDUP_CAPACITY);
        assert!(big.ids.capacity() <= DEFAULT_DEDUP_CAPACITY, "the ring never holds more than asked");
        assert!(!big.contains(10_000 - DEFAULT_DEDUP_CAPACITY as u64 - 1));
        assert!(big.contains(10_000 - DEFAULT_DEDUP_CAPACITY as u64));
    }

    #[test]
    fn backoff_stays_within_bounds_grows_and_is_zero_without_failures() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(5));
        let mut rng = Rng(1);
        assert_eq!(
            backoff_delay(0, min, max, u64::MAX),
            Duration::ZERO,
            "a dropped live session comes back at once"
        );
        for failures in 1..40 {
            let cap = min.saturating_mul(1u32 << failures.min(31)).min(max);
            let low = (cap / 2).max(min);
            for _ in 0..200 {
                let d = backoff_delay(failures, min, max, rng.next_u64());
                assert!(d >= low && d <= cap, "{d:?} outside [{low:?}, {cap:?}] after {failures}");
            }
        }
        // The roll spans the whole range: 0 is the floor, u64::MAX the (growing) cap.
        assert_eq!(backoff_delay(1, min, max, 0), min);
        assert_eq!(backoff_delay(1, min, max, u64::MAX), Duration::from_millis(100));
        assert_eq!(backoff_delay(3, min, max, 0), Duration::from_millis(200));
        assert_eq!(backoff_delay(3, min, max, u64::MAX), Duration::from_millis(400));
        assert_eq!(backoff_delay(30, min, max, 0), max / 2);
        assert_eq!(backoff_delay(30, min, max, u64::MAX), max);
        // max below min is read as min.
        assert_eq!(backoff_delay(5, min, Duration::ZERO, u64::MAX), min);
    }

    #[test]
    fn retry_after_is_a_floor_spread_by_a_quarter_and_capped() {
        let ceiling = RETRY_AFTER_CEILING;
        let ra = Duration::from_millis(1500);
        assert_eq!(retry_floor(ra, ceiling, 0), ra);
        assert_eq!(retry_floor(ra, ceiling, u64::MAX), Duration::from_millis(1875));
        let mut rng = Rng(3);
        for _ in 0..1000 {
            let f = retry_floor(ra, ceiling, rng.next_u64());
            assert!(f >= ra && f <= ra + ra / 4);
        }
        assert_eq!(retry_floor(Duration::from_secs(86_400), ceiling, 0), ceiling, "absurd values are capped");
        assert_eq!(
            retry_floor(Duration::from_secs(59), ceiling, u64::MAX),
            ceiling,
            "the spread stops at the ceiling"
        );
        assert_eq!(retry_floor(Duration::ZERO, ceiling, u64::MAX), Duration::ZERO);
    }

    #[test]
    fn resumes_with_the_latest_token_and_logs_in_after_a_refusal() {
        let mut r = Rig::new(Config::default());
        assert_eq!(r.m.resume_token(), None);
        let login = r.live(&[1; 37], 30_000);
        assert_eq!((login.cmd, login.detail.as_slice()), (Cmd::Login, &b"login-token"[..]));
        assert_eq!(r.m.resume_token(), Some(&[1u8; 37][..]));
        assert_eq!(r.m.node(), Some("10.0.0.1:7100"));
        assert_eq!(r.m.session().map(|s| (s.uid, s.session_epoch)), Some((42, 9)));

        // The live session drops: back at once, with a Resume carrying the token.
        assert_eq!(r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::After(Duration::ZERO));
        r.connect();
        assert_eq!(r.events(), vec![]);
        let resume = r.sent().pop().expect("resume");
        assert_eq!((resume.cmd, resume.detail.as_slice()), (Cmd::Resume, &[1u8; 37][..]));
        let answer = r.session(&resume, &[2; 37], 30_000);
        assert_eq!(r.feed(&answer), vec![Ev::Up { resumed: true, relogin: false }]);
        assert_eq!(r.m.resume_token(), Some(&[2u8; 37][..]), "the token rotates");

        // The next resume is refused: a login on the same connection replaces the session.
        r.m.on_disconnected(Lost::Remote);
        r.connect();
        let resume = r.sent().pop().expect("resume");
        assert_eq!(resume.detail, vec![2; 37]);
        let refusal = r.error(resume.seq, ErrorCode::ResumeRefused, 0);
        assert_eq!(r.feed(&refusal), vec![Ev::LoginNeeded(true)]);
        assert_eq!(r.m.resume_token(), None);
        r.login(b"fresh");
        let login = r.sent().pop().expect("login");
        assert_eq!((login.cmd, login.detail.as_slice()), (Cmd::Login, &b"fresh"[..]));
        assert_ne!(login.seq, resume.seq);
        let answer = r.session(&login, &[3; 37], 30_000);
        assert_eq!(r.feed(&answer), vec![Ev::Up { resumed: false, relogin: true }]);

        // A Session without a token cannot be resumed: the next connection logs in.
        r.m.on_disconnected(Lost::Remote);
        r.connect();
        let resume = r.sent().pop().expect("resume");
        let answer = r.session(&resume, &[], 30_000);
        assert_eq!(r.feed(&answer), vec![Ev::Up { resumed: true, relogin: false }]);
        r.m.on_disconnected(Lost::Remote);
        r.connect();
        assert_eq!(r.events(), vec![Ev::LoginNeeded(false)]);
        assert!(r.sent().is_empty());

        // After logout nothing is resumed and nothing is a relogin.
        r.login(b"again");
        let login = r.sent().pop().expect("login");
        let answer = r.session(&login, &[4; 37], 30_000);
        assert_eq!(r.feed(&answer), vec![Ev::Up { resumed: false, relogin: true }]);
        let now = r.now;
        let (m, mut out) = (&mut r.m, Out::new(&mut r.enc, &mut r.out));
        let seq = m.logout(now, "done", &mut out).expect("live");
        let mut answer = Vec::new();
        r.gate.frame(&mut answer, FrameType::Response, Cmd::Logout, seq, 1, |b| {
            wire::Logout::create(b, &wire::LogoutArgs { reason: None })
        });
        let bye = r.go_away(GoAwayReason::LoggedOut, "", 0);
        answer.extend_from_slice(&bye);
        assert_eq!(r.feed(&answer), vec![Ev::LoggedOut, Ev::GoAway(GoAwayReason::LoggedOut, 0)]);
        assert_eq!(r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::Never);
        assert_eq!((r.m.resume_token(), r.m.session()), (None, None));
        r.connect();
        assert_eq!(r.events(), vec![Ev::LoginNeeded(false)]);
        r.login(b"new");
        let login = r.sent().pop().expect("login");
        let answer = r.session(&login, &[5; 37], 30_000);
        assert_eq!(r.feed(&answer), vec![Ev::Up { resumed: false, relogin: false }]);
    }

    #[test]
    fn every_delivery_is_acked_and_each_message_id_shown_once() {
        let mut r = Rig::new(Config { dedup_capacity: 2, ..Config::default() });
        r.live(&[1; 37], 30_000);
        r.sent();
        let mut bytes = r.push(1, 5, false);
        bytes.extend(r.push(1, 5, true));
        bytes.extend(r.push(2, 6, false));
        // A push cmd this build does not know, then an unknown cmd of another type.
        crate::frame::write_raw_frame(&mut bytes, FrameType::Push as u8, 0x00EE, 3, 9, &[]).expect("raw");
        crate::frame::write_raw_frame(&mut bytes, FrameType::Event as u8, 0x00EF, 0, 9, &[]).expect("raw");
        bytes.extend(r.push(4, 7, false));
        bytes.extend(r.push(5, 5, false));
        assert_eq!(
            r.feed(&bytes),
            vec![
                Ev::Push(5, false),
                Ev::Repeat(5, true),
                Ev::Push(6, false),
                Ev::Push(7, false),
                Ev::Push(5, false)
            ],
            "with room for two ids, 5 is forgotten once 6 and 7 came"
        );
        let sent = r.sent();
        assert_eq!(ack_ids(&sent), vec![(1, 5), (1, 5), (2, 6), (3, 0), (4, 7), (5, 5)]);
        // An ack carries the push's log-id: the flow stays one in the gate's log.
        assert_eq!(sent[0].log_id, 0x105);
        assert!(sent.iter().all(|s| s.ty == FrameType::Ack));
    }

    /// §9.10: a push is shown only before its deadline, by the wall clock the machine keeps
    /// from the `now` it is given; one that comes at or after it and was never shown is neither
    /// shown nor acked; one shown before is acked again (and not shown) whenever it comes.
    #[test]
    fn a_push_past_its_deadline_is_neither_shown_nor_acked() {
        let mut r = Rig::new(Config::default());
        r.live(&[1; 37], 30_000);
        r.sent();
        let wall = 1_800_000_000_000;
        r.m.set_wall_clock(r.now, wall);
        assert_eq!(r.m.wall_ms(r.now + Duration::from_millis(1_500)), wall + 1_500);
        let mut bytes = r.push_due(1, 5, false, wall + 1);
        bytes.extend(r.push_due(2, 6, false, wall)); // due this very millisecond: too late
        bytes.extend(r.push_due(3, 7, false, wall - 10));
        bytes.extend(r.push_due(4, 8, false, 0)); // no deadline given: shown
        assert_eq!(r.feed(&bytes), vec![Ev::Push(5, false), Ev::Push(8, false)]);
        assert_eq!(ack_ids(&r.sent()), vec![(1, 5), (4, 8)]);
        assert_eq!(r.m.expired_pushes(), 2);
        // Time passes: the shown push redelivered after its deadline is acked (its first ack may
        // have been lost; the gate judges it by when it reads it) and not shown again; the one
        // never shown stays unshown and unacked.
        r.advance(Duration::from_millis(5));
        r.sent();
        let mut bytes = r.push_due(1, 5, true, wall + 1);
        bytes.extend(r.push_due(2, 6, true, wall));
        assert_eq!(r.feed(&bytes), vec![Ev::Repeat(5, true)]);
        assert_eq!(ack_ids(&r.sent()), vec![(1, 5)]);
        assert_eq!(r.m.expired_pushes(), 3);
        // Set back (a clock corrected on the device): the next push in time is shown.
        r.m.set_wall_clock(r.now, wall - 60_000);
        let bytes = r.push_due(5, 9, false, wall);
        assert_eq!(r.feed(&bytes), vec![Ev::Push(9, false)]);
    }

    #[test]
    fn frames_split_anywhere_come_out_the_same() {
        let mut whole = Rig::new(Config::default());
        whole.live(&[1; 37], 30_000);
        let mut bytes = Vec::new();
        for i in 1..=4u32 {
            bytes.extend(whole.push(i, u64::from(i), false));
        }
        let expected = whole.feed(&bytes);
        for cut in 1..bytes.len() {
            let mut r = Rig::new(Config { read_chunk: 7, ..Config::default() });
            r.live(&[1; 37], 30_000);
            let mut got = r.feed(&bytes[..cut]);
            // The rest through the zero-copy path, in small reads.
            for chunk in bytes[cut..].chunks(5) {
                let buf = r.m.read_buf();
                assert!(buf.len() >= chunk.len());
                buf[..chunk.len()].copy_from_slice(chunk);
                r.m.read_done(chunk.len());
                got.extend(r.events());
            }
            assert_eq!(got, expected, "cut at {cut}");
            assert!(r.m.unprocessed().is_empty());
        }
    }

    #[test]
    fn keepalive_goes_out_after_half_a_heartbeat_without_sending() {
        let mut r = Rig::new(Config::default());
        r.live(&[1; 37], 4_000);
        r.sent();
        assert_eq!(r.m.poll_timeout(), Some(r.now + Duration::from_secs(2)));
        r.advance(Duration::from_millis(1_999));
        assert!(r.sent().is_empty());
        r.advance(Duration::from_millis(1));
        let ka = r.sent();
        assert_eq!(
            ka.iter().map(|s| (s.cmd, s.ty)).collect::<Vec<_>>(),
            vec![(Cmd::Keepalive, FrameType::Request)]
        );
        assert_eq!(r.m.poll_timeout(), Some(r.now + Duration::from_secs(2)));
        // Its answer is the machine's own business.
        let mut answer = Vec::new();
        r.gate.keepalive(&mut answer, FrameType::Response, ka[0].seq, ka[0].log_id, 1);
        assert_eq!(r.feed(&answer), vec![]);
        // Anything the shell sends puts the next keepalive off.
        r.advance(Duration::from_millis(1_500));
        r.m.sent(r.now);
        r.advance(Duration::from_millis(1_500));
        assert!(r.sent().is_empty());
        assert_eq!(r.m.poll_timeout(), Some(r.now + Duration::from_millis(500)));
        // A gate announcing no heartbeat gets the default; an absurdly small one gets 1 s.
        let mut r = Rig::new(Config { default_heartbeat: Duration::from_secs(10), ..Config::default() });
        r.live(&[1; 37], 0);
        assert_eq!(r.m.poll_timeout(), Some(r.now + Duration::from_secs(5)));
        let mut r = Rig::new(Config::default());
        r.live(&[1; 37], 1);
        assert_eq!(r.m.poll_timeout(), Some(r.now + Duration::from_millis(500)));
    }

    #[test]
    fn requests_pipeline_match_by_seq_bound_and_time_out() {
        let cfg = Config { max_requests: 3, request_timeout: Duration::from_secs(10), ..Config::default() };
        let mut r = Rig::new(cfg);
        let now = r.now;
        let grab = |b: &mut FlatBufferBuilder<'static>| {
            wire::GrabOrder::create(b, &wire::GrabOrderArgs { order_id: 1, payload: None })
        };
        let mut out = Out::new(&mut r.enc, &mut r.out);
        assert_eq!(r.m.request(now, &mut out, Cmd::GrabOrder, 1, grab), Err(RequestError::NotLive));
        r.live(&[1; 37], 30_000);
        r.sent();
        let mut out = Out::new(&mut r.enc, &mut r.out);
        let a = r.m.request(now, &mut out, Cmd::GrabOrder, 1, grab).expect("a");
        let b = r.m.request(now, &mut out, Cmd::GrabOrder, 2, grab).expect("b");
        let c = r.m.request(now, &mut out, Cmd::GrabOrder, 3, grab).expect("c");
        assert_eq!(r.m.request(now, &mut out, Cmd::GrabOrder, 4, grab), Err(RequestError::Full));
        assert_eq!(
            r.m.request(now, &mut out, Cmd::Login, 4, |b| wire::Login::create(
                b,
                &wire::LoginArgs::default()
            )),
            Err(RequestError::NotARequest)
        );
        assert_eq!(out.frames(), 3);
        let sent = r.sent();
        assert_eq!(sent.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![a.seq, b.seq, c.seq]);
        assert_eq!(sent[1].log_id, b.log_id);
        assert!(a.seq < b.seq && b.seq < c.seq);
        // Answers in any order, by sequence-id; an error is an answer too.
        let mut bytes = Vec::new();
        r.gate.frame(&mut bytes, FrameType::Response, Cmd::GrabOrder, c.seq, c.log_id, |fb| {
            wire::Reply::create(fb, &wire::ReplyArgs { code: 409, ..Default::default() })
        });
        r.gate.error(&mut bytes, a.seq, a.log_id, ErrorCode::Timeout, wire::Hop::AppServer, 0x21, "slow", 0);
        assert_eq!(r.feed(&bytes), vec![Ev::Reply(c.seq, 3, 409), Ev::Failed(a.seq, 1, ErrorCode::Timeout)]);
        assert_eq!(r.m.requests_pending(), 1);
        // b times out; its late answer is nobody's.
        assert_eq!(r.m.poll_timeout(), Some(now + Duration::from_secs(10)));
        r.advance(Duration::from_secs(10));
        assert_eq!(r.events(), vec![Ev::TimedOut(b.seq, 2)]);
        let mut late = Vec::new();
        r.gate.frame(&mut late, FrameType::Response, Cmd::GrabOrder, b.seq, b.log_id, |fb| {
            wire::Reply::create(fb, &wire::ReplyArgs::default())
        });
        assert_eq!(r.feed(&late), vec![Ev::Unmatched(Cmd::GrabOrder, b.seq)]);
        // A drop cuts what is outstanding.
        let mut out = Out::new(&mut r.enc, &mut r.out);
        r.m.request(r.now, &mut out, Cmd::GrabOrder, 5, grab).expect("d");
        assert_eq!(r.m.on_disconnected(Lost::Remote).requests_cut, 1);
        assert_eq!(r.m.requests_pending(), 0);
    }

    #[test]
    fn a_go_away_is_honoured_and_displaced_or_logged_out_never_come_back() {
        let mut r = Rig::new(Config::default());
        r.live(&[1; 37], 30_000);
        let bye = r.go_away(GoAwayReason::Shutdown, "10.0.0.2:7100", 2_000);
        assert_eq!(r.feed(&bye), vec![Ev::GoAway(GoAwayReason::Shutdown, 2_000)]);
        assert_eq!(r.m.redirect(), Some("10.0.0.2:7100"));
        // Nothing after a GoAway is read.
        let more = r.push(1, 1, false);
        assert_eq!(r.feed(&more), vec![]);
        let Reconnect::After(wait) = r.m.on_disconnected(Lost::Remote).reconnect else {
            panic!("must come back")
        };
        assert!(wait >= Duration::from_millis(2_000) && wait <= Duration::from_millis(2_500), "{wait:?}");
        // Still resumable; the redirect lasts until a session is up.
        r.connect();
        let resume = r.sent().pop().expect("resume");
        assert_eq!(resume.cmd, Cmd::Resume);
        let answer = r.session(&resume, &[2; 37], 30_000);
        r.feed(&answer);
        assert_eq!(r.m.redirect(), None);

        let bye = r.go_away(GoAwayReason::Displaced, "", 0);
        assert_eq!(r.feed(&bye), vec![Ev::GoAway(GoAwayReason::Displaced, 0)]);
        assert!(r.m.displaced() && r.m.resume_token().is_none());
        assert_eq!(r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::Never);
        let mut out = Out::new(&mut r.enc, &mut r.out);
        assert_eq!(r.m.on_connected(r.now, &mut out), Err(NotNow));
        r.m.forget_session();
        assert!(!r.m.displaced() && r.m.session().is_none());
        r.connect();
        assert_eq!(r.events(), vec![Ev::LoginNeeded(false)]);
    }

    #[test]
    fn a_session_the_app_server_ended_is_not_resumed_nor_reconnected() {
        let mut r = Rig::new(Config::default());
        r.live(&[1; 37], 30_000);
        let bye = r.go_away(GoAwayReason::Ended, "", 0);
        assert_eq!(r.feed(&bye), vec![Ev::GoAway(GoAwayReason::Ended, 0)]);
        assert_eq!(r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::Never);
        assert_eq!((r.m.resume_token(), r.m.session()), (None, None));
        assert!(!r.m.displaced());
        r.connect();
        assert_eq!(r.events(), vec![Ev::LoginNeeded(false)], "a new login, not a resume");
    }

    #[test]
    fn failed_attempts_back_off_and_a_refusal_waits_its_retry_after() {
        let cfg = Config {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            session_timeout: Duration::from_secs(5),
            ..Config::default()
        };
        let mut r = Rig::new(cfg);
        // Refused at accept: Error Overloaded with sequence-id 0, before the login.
        r.connect();
        assert_eq!(r.events(), vec![Ev::LoginNeeded(false)]);
        r.login(b"t");
        let refusal = r.error(0, ErrorCode::Overloaded, 3_000);
        assert_eq!(r.feed(&refusal), vec![Ev::CloseError(ErrorCode::Overloaded, false)]);
        let Reconnect::After(wait) = r.m.on_disconnected(Lost::Remote).reconnect else { panic!() };
        assert!(wait >= Duration::from_secs(3) && wait <= Duration::from_millis(3_750), "{wait:?}");
        // Connects that fail, and a connection that dies before its Session: growing waits.
        let mut waits = Vec::new();
        for i in 0..6 {
            if i % 2 == 0 {
                r.connect();
                r.events();
            }
            let Reconnect::After(wait) = r.m.on_disconnected(Lost::Remote).reconnect else { panic!() };
            waits.push(wait);
        }
        for (i, w) in waits.iter().enumerate() {
            // The refusal was failure 1; these are failures 2 to 7.
            let cap = Duration::from_millis(100 << (i + 2)).min(Duration::from_secs(2));
            assert!(*w >= (cap / 2).max(Duration::from_millis(100)) && *w <= cap, "{i}: {w:?}");
        }
        // The shell's own close of an attempt is not a failure; a Session resets the count.
        r.connect();
        r.events();
        assert_eq!(r.m.on_disconnected(Lost::Local).reconnect, Reconnect::After(Duration::ZERO));
        // No Session within the session timeout: a failure.
        r.connect();
        r.events();
        r.advance(Duration::from_secs(5));
        assert_eq!(r.events(), vec![Ev::SessionTimeout]);
        assert_eq!(r.m.poll_timeout(), None);
        let Reconnect::After(wait) = r.m.on_disconnected(Lost::Local).reconnect else { panic!() };
        assert!(wait >= Duration::from_millis(100) && wait <= Duration::from_millis(200), "{wait:?}");
        // A refused login waits at least refused_login_wait.
        r.connect();
        r.events();
        r.login(b"expired");
        let login = r.sent().pop().expect("login");
        let refusal = r.error(login.seq, ErrorCode::TokenExpired, 0);
        assert_eq!(r.feed(&refusal), vec![Ev::CloseError(ErrorCode::TokenExpired, true)]);
        let Reconnect::After(wait) = r.m.on_disconnected(Lost::Remote).reconnect else { panic!() };
        assert!(wait >= Duration::from_secs(1), "{wait:?}");
        // Informational errors and a late Session are not the machine's.
        r.live(&[1; 37], 30_000);
        let mut bytes = r.error(0, ErrorCode::CorruptBody, 0);
        bytes.extend(r.error(77, ErrorCode::NotAllowed, 0));
        let stray = Sent { cmd: Cmd::Login, ty: FrameType::Request, seq: 1, log_id: 1, detail: Vec::new() };
        bytes.extend(r.session(&stray, &[9; 37], 30_000));
        assert_eq!(
            r.feed(&bytes),
            vec![Ev::Unmatched(Cmd::Error, 0), Ev::Unmatched(Cmd::Error, 77), Ev::Unmatched(Cmd::Login, 1)]
        );
        assert_eq!(r.m.resume_token(), Some(&[1u8; 37][..]), "a stray Session changes nothing");
    }

    #[test]
    fn lost_framing_and_corrupt_bodies() {
        let mut r = Rig::new(Config::default());
        r.live(&[1; 37], 30_000);
        let mut bytes = Vec::new();
        crate::frame::write_raw_frame(
            &mut bytes,
            FrameType::Push as u8,
            Cmd::PushDelivery as u16,
            8,
            1,
            &[0xFF; 9],
        )
        .expect("raw");
        assert_eq!(r.feed(&bytes), vec![Ev::Rejected(8)], "a corrupt body is that frame's problem");
        assert!(r.sent().is_empty(), "nothing to ack without a message id");
        assert!(r.m.is_live());
        assert_eq!(r.feed(b"GET / HTTP/1.1\r\n"), vec![Ev::Stream]);
        assert!(!r.m.is_live());
        let Reconnect::After(wait) = r.m.on_disconnected(Lost::Remote).reconnect else { panic!() };
        assert!(wait > Duration::ZERO && wait < HOUR, "lost framing is a failure: {wait:?}");
    }

    // ---------------------------------------------------------------------------------------
    // The secure channel (docs/PROTOCOL.md §14), against a gate-side `channel::ServerChannel`.

    use channel::{KeyRing, RecordReader, ServerChannel, ServerEvent};
    use proptest::prelude::*;

    /// A gate as far as the channel goes: it holds the first flight until the commit, keeps
    /// the session's resumption secret and replaces it only at the commit (§14.3, §14.6).
    struct FakeGate {
        keys: KeyRing,
        ch: ServerChannel,
        reader: RecordReader,
        /// The Login or Resume, held until the commit.
        held: Vec<u8>,
        /// Frames received after the commit, not yet taken.
        plain: Vec<u8>,
        /// Records for the app, not yet taken.
        out: Vec<u8>,
        /// The held session's secret.
        secret: Option<ResumeSecret>,
        /// The Accept's secret, until the commit.
        tentative: Option<ResumeSecret>,
        /// Hellos and ResumeHellos read.
        hellos: u32,
        resume_hellos: u32,
    }

    impl FakeGate {
        fn new(keys: KeyRing) -> FakeGate {
            FakeGate {
                keys,
                ch: ServerChannel::new(),
                reader: RecordReader::new(),
                held: Vec::new(),
                plain: Vec::new(),
                out: Vec::new(),
                secret: None,
                tentative: None,
                hellos: 0,
                resume_hellos: 0,
            }
        }

        /// A new connection.
        fn accept_conn(&mut self) {
            self.ch = ServerChannel::new();
            self.reader = RecordReader::new();
            self.held.clear();
            self.plain.clear();
            self.out.clear();
            self.tentative = None;
        }

        /// Reads the app's bytes; `Err` when the channel failed (a Reject may be in `out`).
        fn read(&mut self, wire: &[u8]) -> Result<(), ChannelError> {
            let FakeGate { keys, ch, reader, held, plain, out, secret, tentative, .. } = self;
            let mut input = wire;
            while let Some(rec) = reader.next(&mut input)? {
                let mut got = Vec::new();
                let kind = match ch.on_record(keys, 0, rec, &mut got, out)? {
                    ServerEvent::Hello { .. } => 0,
                    ServerEvent::ResumeHello { .. } => 1,
                    ServerEvent::Committed => 2,
                    ServerEvent::Data => 3,
                };
                match kind {
                    0 => {
                        self.hellos += 1;
                        *held = got;
                        *tentative = Some(ch.accept(&[], out)?);
                    }
                    1 => {
                        self.resume_hellos += 1;
                        ch.resume(secret.as_ref(), held, out)?;
                        *tentative = Some(ch.accept(&[], out)?);
                    }
                    2 => {
                        *secret = tentative.take();
                        plain.append(held);
                        plain.extend_from_slice(&got);
                    }
                    _ => plain.extend_from_slice(&got),
                }
            }
            Ok(())
        }

        /// The frames received since the last call.
        fn frames(&mut self) -> Vec<Sent> {
            let sent = parse_sent(&self.plain);
            self.plain.clear();
            sent
        }

        /// Seals frames for the app.
        fn send(&mut self, frames: &[u8]) {
            self.ch.seal(frames, &mut self.out).expect("the Accept went out");
        }

        fn take_out(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.out)
        }
    }

    /// A secure machine and a fake gate.
    struct Sec {
        r: Rig,
        g: FakeGate,
    }

    impl Sec {
        fn new(cfg: Config) -> Sec {
            Sec::with_keys(cfg, Keypair::dev(), KeyRing::new(Keypair::dev()))
        }

        fn with_keys(cfg: Config, known: Keypair, ring: KeyRing) -> Sec {
            let mut r = Rig::new(cfg.clone());
            r.m = AppProto::with_secure(cfg, Some(SecureConfig::new(*known.public())), 7, r.now);
            Sec { r, g: FakeGate::new(ring) }
        }

        /// The machine's bytes go to the gate.
        fn up(&mut self) -> Result<(), ChannelError> {
            let w = self.r.wire();
            self.g.read(&w)
        }

        /// The gate's bytes go to the machine; its events.
        fn down(&mut self) -> Vec<Ev> {
            let b = self.g.take_out();
            self.r.feed(&b)
        }

        /// A new connection: the gate accepts it, the machine is told. What the last one did not
        /// send died with it.
        fn connect(&mut self) -> Vec<Ev> {
            self.g.accept_conn();
            self.r.out.clear();
            self.r.connect();
            self.r.events()
        }

        /// A whole handshake and Session from a connected machine whose first flight is out:
        /// returns the events of the Session.
        fn finish_open(&mut self, token: &[u8]) -> Vec<Ev> {
            self.up().expect("the gate reads the first flight");
            assert!(self.down().is_empty(), "the Accept carries no events");
            self.up().expect("the gate reads the commit");
            let first = self.g.frames().into_iter().next().expect("the held Login or Resume");
            let answer = self.r.session(&first, token, 30_000);
            self.g.send(&answer);
            self.down()
        }

        /// Connects and logs in; the session's token is `token`.
        fn live(&mut self, token: &[u8]) {
            assert_eq!(self.connect(), vec![Ev::LoginNeeded(false)]);
            self.r.login(b"login-token");
            assert_eq!(self.finish_open(token), vec![Ev::Up { resumed: false, relogin: false }]);
        }

        /// The machine's channel failure, as the event says.
        fn fault(&mut self) -> Option<ChannelError> {
            let (now, mut out) = (self.r.now, Out::new(&mut self.r.enc, &mut self.r.out));
            let mut fault = None;
            while let Some(ev) = self.r.m.poll_event(now, &mut out) {
                if let Event::Close(Close::Stream(Fault::Channel(e))) = ev {
                    fault = Some(e);
                }
            }
            fault
        }

        fn secrets(&self) -> (Option<ResumeSecret>, Option<ResumeSecret>) {
            let s = self.r.m.core.secure.as_deref().expect("secure");
            (s.newest.clone(), s.previous.clone())
        }
    }

    /// The record types in `wire`.
    fn record_kinds(wire: &[u8]) -> Vec<RecordType> {
        let mut reader = RecordReader::new();
        let mut input = wire;
        let mut kinds = Vec::new();
        while let Some(r) = reader.next(&mut input).expect("records") {
            kinds.push(r.kind);
        }
        assert!(!reader.in_record());
        kinds
    }

    #[test]
    fn login_and_resume_go_in_the_handshake_and_every_byte_is_a_record() {
        let mut s = Sec::new(Config::default());
        assert_eq!(s.connect(), vec![Ev::LoginNeeded(false)]);
        assert!(s.r.wire().is_empty(), "nothing before the token");
        s.r.login(b"login-token");
        let hello = s.r.wire();
        assert_eq!(record_kinds(&hello), vec![RecordType::Hello]);
        s.g.read(&hello).expect("hello");
        assert!(s.g.frames().is_empty(), "the Login waits for the commit");
        let accept = s.g.take_out();
        assert_eq!(record_kinds(&accept), vec![RecordType::Accept]);
        assert!(s.r.feed(&accept).is_empty());
        let commit = s.r.wire();
        assert_eq!(record_kinds(&commit), vec![RecordType::Data], "the commit record, at once");
        s.g.read(&commit).expect("commit");
        let login = s.g.frames().pop().expect("the held Login, run at the commit");
        assert_eq!((login.cmd, login.detail.as_slice()), (Cmd::Login, &b"login-token"[..]));
        let answer = s.r.session(&login, &[1; 37], 30_000);
        s.g.send(&answer);
        assert_eq!(s.down(), vec![Ev::Up { resumed: false, relogin: false }]);
        let secret = s.g.secret.clone().expect("committed");
        assert_eq!(s.r.m.session().and_then(|i| i.resume_secret), Some(secret.0));

        // A push and its ack, sealed both ways.
        let push = s.r.push(1, 5, false);
        s.g.send(&push);
        assert_eq!(s.down(), vec![Ev::Push(5, false)]);
        let acks = s.r.wire();
        assert_eq!(record_kinds(&acks), vec![RecordType::Data]);
        s.g.read(&acks).expect("ack");
        assert_eq!(ack_ids(&s.g.frames()), vec![(1, 5)]);

        // The shell's own frames are sealed by `wire`.
        let mut out = Out::new(&mut s.r.enc, &mut s.r.out);
        out.put(|enc, buf| enc.gps_report(buf, 9, &wire::GpsPoint::new(1, 2, 3, 4, 5, 6, 0)));
        let gps = s.r.m.wire(&mut out).to_vec();
        s.r.out.clear();
        assert_eq!(record_kinds(&gps), vec![RecordType::Data]);
        s.g.read(&gps).expect("gps");
        assert_eq!(s.g.frames().iter().map(|f| f.cmd).collect::<Vec<_>>(), vec![Cmd::GpsReport]);

        // The connection drops: the next one resumes with a ResumeHello (no static key).
        s.r.m.on_disconnected(Lost::Remote);
        assert!(s.connect().is_empty());
        let first = s.r.wire();
        assert_eq!(record_kinds(&first), vec![RecordType::ResumeHello]);
        s.g.read(&first).expect("resume hello");
        assert!(s.down().is_empty());
        s.up().expect("commit");
        let resume = s.g.frames().pop().expect("the held Resume");
        assert_eq!((resume.cmd, resume.detail.as_slice()), (Cmd::Resume, &[1u8; 37][..]));
        let answer = s.r.session(&resume, &[2; 37], 30_000);
        s.g.send(&answer);
        assert_eq!(s.down(), vec![Ev::Up { resumed: true, relogin: false }]);
        assert_eq!((s.g.hellos, s.g.resume_hellos), (1, 1));
        assert_ne!(s.g.secret, Some(secret), "the secret moved on");
        assert_eq!(s.secrets(), (s.g.secret.clone(), None), "the frame after the Accept confirmed it");
    }

    #[test]
    fn frames_written_before_the_accept_wait_and_follow_the_commit() {
        let mut s = Sec::new(Config::default());
        s.connect();
        s.r.login(b"t");
        s.up().expect("hello");
        // The shell writes before the Accept: nothing goes out yet.
        let mut out = Out::new(&mut s.r.enc, &mut s.r.out);
        out.put(|enc, buf| enc.keepalive(buf, FrameType::Request, 77, 1, 2));
        assert!(s.r.m.wire(&mut out).is_empty(), "held inside the machine");
        // The Accept comes; the commit record goes first, then what waited.
        let accept = s.g.take_out();
        assert!(s.r.feed(&accept).is_empty());
        let sent = s.r.wire();
        assert_eq!(record_kinds(&sent), vec![RecordType::Data, RecordType::Data]);
        s.g.read(&sent).expect("commit and the held keepalive");
        let frames = s.g.frames();
        assert_eq!(
            frames.iter().map(|f| (f.cmd, f.seq)).collect::<Vec<_>>(),
            vec![(Cmd::Login, frames[0].seq), (Cmd::Keepalive, 77)]
        );

        // Frames written before the first flight wait too (the Hello carries the Login only).
        let mut s = Sec::new(Config::default());
        s.connect();
        let now = s.r.now;
        let mut out = Out::new(&mut s.r.enc, &mut s.r.out);
        out.put(|enc, buf| enc.keepalive(buf, FrameType::Request, 78, 1, 2));
        s.r.m.login(now, b"t", "test", &mut out).expect("asked for");
        let hello = s.r.m.wire(&mut out).to_vec();
        assert_eq!(record_kinds(&hello), vec![RecordType::Hello]);
        s.r.out.clear();
        // After the commit: the Login (it rode in the Hello), then what waited.
        s.g.read(&hello).expect("hello");
        s.down();
        s.up().expect("commit");
        let frames = s.g.frames();
        assert_eq!(frames.iter().map(|f| f.cmd).collect::<Vec<_>>(), vec![Cmd::Login, Cmd::Keepalive]);
    }

    #[test]
    fn an_accept_lost_changes_nothing_the_resume_is_made_again() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        let before = s.secrets();
        s.r.m.on_disconnected(Lost::Remote);
        s.connect();
        s.up().expect("resume hello");
        // The Accept is lost with its connection: the gate committed nothing.
        s.g.take_out();
        assert!(matches!(s.r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::After(_)));
        assert_eq!(s.secrets(), before);
        s.connect();
        assert_eq!(s.finish_open(&[2; 37]), vec![Ev::Up { resumed: true, relogin: false }]);
        assert_eq!(s.g.resume_hellos, 2);
    }

    #[test]
    fn a_commit_lost_is_retried_once_with_the_previous_secret() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        let s0 = s.g.secret.clone();
        s.r.m.on_disconnected(Lost::Remote);
        s.connect();
        s.up().expect("resume hello");
        assert!(s.down().is_empty(), "the Accept is read");
        // The commit record is written but the connection dies before the gate reads it.
        assert_eq!(record_kinds(&s.r.wire()), vec![RecordType::Data]);
        let (s1, prev) = s.secrets();
        assert_eq!(prev, s0, "the previous secret is kept until the gate shows it committed");
        assert_ne!(s1, s0);
        s.r.m.on_disconnected(Lost::Remote);

        // The newest secret is unknown to the gate: Reject UnknownSession, and at once again.
        s.connect();
        let e = s.up().expect_err("the gate cannot decrypt it");
        assert!(matches!(e, ChannelError::Refused(_)), "{e:?}");
        let fault = s.down_fault();
        assert!(
            matches!(fault, Some(ChannelError::RejectedByGate { reason: RejectReason::UnknownSession, .. })),
            "{fault:?}"
        );
        assert_eq!(s.r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::After(Duration::ZERO));
        // Then with the previous one: resumed, nothing lost.
        assert!(s.connect().is_empty());
        assert_eq!(s.finish_open(&[2; 37]), vec![Ev::Up { resumed: true, relogin: false }]);
        assert_eq!(s.secrets(), (s.g.secret.clone(), None));
    }

    #[test]
    fn a_session_answer_lost_after_the_commit_resumes_with_the_newest_secret() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        s.r.m.on_disconnected(Lost::Remote);
        s.connect();
        s.up().expect("resume hello");
        s.down();
        s.up().expect("the gate commits");
        let committed = s.g.secret.clone();
        s.g.frames();
        // The Session answer is lost: the app still has token [1; 37] and both secrets.
        s.r.m.on_disconnected(Lost::Remote);
        assert_eq!(s.secrets().0, committed);
        s.connect();
        assert_eq!(s.finish_open(&[3; 37]), vec![Ev::Up { resumed: true, relogin: false }]);
        assert_eq!(s.g.resume_hellos, 2);
    }

    #[test]
    fn a_session_the_gate_does_not_know_falls_back_to_a_login() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        // The gate lost the session (restarted): no secret opens it.
        s.g.secret = None;
        s.r.m.on_disconnected(Lost::Remote);
        assert!(s.connect().is_empty());
        assert!(s.up().is_err());
        let fault = s.down_fault();
        assert!(matches!(
            fault,
            Some(ChannelError::RejectedByGate { reason: RejectReason::UnknownSession, .. })
        ));
        // No previous secret (the last one was confirmed): log in on the next connection.
        assert_eq!(s.r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::After(Duration::ZERO));
        assert_eq!(s.r.m.resume_token(), None);
        assert_eq!(s.connect(), vec![Ev::LoginNeeded(true)]);
        s.r.login(b"again");
        assert_eq!(record_kinds(&s.r.out), vec![RecordType::Hello]);
        assert_eq!(s.finish_open(&[4; 37]), vec![Ev::Up { resumed: false, relogin: true }]);

        // With a previous secret: both tried, then the login.
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        s.r.m.on_disconnected(Lost::Remote);
        s.connect();
        s.up().expect("resume hello");
        s.down();
        s.r.wire(); // the commit, lost
        s.r.m.on_disconnected(Lost::Remote);
        s.g.secret = None;
        for _ in 0..2 {
            assert!(s.connect().is_empty());
            assert!(s.up().is_err());
            assert!(s.down_fault().is_some());
            assert_eq!(s.r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::After(Duration::ZERO));
        }
        assert_eq!(s.connect(), vec![Ev::LoginNeeded(true)]);
    }

    #[test]
    fn a_wrong_gate_key_is_a_configuration_error_that_waits() {
        let wrong = Keypair::generate();
        let mut s = Sec::with_keys(Config::default(), wrong.clone(), KeyRing::new(Keypair::dev()));
        s.connect();
        s.r.login(b"t");
        assert!(s.up().is_err());
        let b = s.g.take_out();
        s.r.m.handle_input(&b);
        let (now, mut out) = (s.r.now, Out::new(&mut s.r.enc, &mut s.r.out));
        let Some(Event::Close(Close::Stream(fault))) = s.r.m.poll_event(now, &mut out) else {
            panic!("the Reject ends the connection")
        };
        assert_eq!(fault.misconfigured(), Some(RejectReason::UnknownKey), "{fault}");
        let Reconnect::After(wait) = s.r.m.on_disconnected(Lost::Remote).reconnect else { panic!() };
        assert!(wait >= RETRY_AFTER_CEILING * 3 / 4 && wait <= RETRY_AFTER_CEILING, "{wait:?}");
        assert_eq!(s.r.m.server_key(), Some(wrong.public()), "a Reject is a hint: the key is kept");
    }

    #[test]
    fn a_new_gate_key_is_used_and_reported_once() {
        let (old, new) = (Keypair::generate(), Keypair::generate());
        let ring = KeyRing::with_previous(new.clone(), old.clone(), u64::MAX);
        let mut s = Sec::with_keys(Config::default(), old, ring);
        s.connect();
        s.r.login(b"t");
        s.up().expect("hello with the previous key");
        s.down();
        s.up().expect("commit");
        let login = s.g.frames().pop().expect("login");
        let answer = s.r.session(&login, &[1; 37], 30_000);
        s.g.send(&answer);
        let b = s.g.take_out();
        s.r.m.handle_input(&b);
        let (now, mut out) = (s.r.now, Out::new(&mut s.r.enc, &mut s.r.out));
        match s.r.m.poll_event(now, &mut out) {
            Some(Event::SessionUp { new_server_key, .. }) => assert_eq!(new_server_key, Some(*new.public())),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.r.m.server_key(), Some(new.public()));
        // The next login says hello to the new key only.
        s.r.m.forget_session();
        s.r.m.on_disconnected(Lost::Local);
        s.g.keys = KeyRing::new(new);
        s.connect();
        s.r.login(b"t");
        s.up().expect("hello with the new key");
        s.down();
        s.up().expect("commit");
        let login = s.g.frames().pop().expect("login");
        let answer = s.r.session(&login, &[2; 37], 30_000);
        s.g.send(&answer);
        let b = s.g.take_out();
        s.r.m.handle_input(&b);
        let (now, mut out) = (s.r.now, Out::new(&mut s.r.enc, &mut s.r.out));
        assert!(matches!(
            s.r.m.poll_event(now, &mut out),
            Some(Event::SessionUp { new_server_key: None, .. })
        ));
    }

    #[test]
    fn a_record_that_does_not_authenticate_ends_the_connection_and_the_session_resumes() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        // A push, then a record changed on the path: the push is handed out first.
        let push = s.r.push(1, 5, false);
        s.g.send(&push);
        s.g.send(&push);
        let mut b = s.g.take_out();
        let last = b.len() - 1;
        b[last] ^= 1;
        s.r.m.handle_input(&b);
        let (now, mut out) = (s.r.now, Out::new(&mut s.r.enc, &mut s.r.out));
        assert!(matches!(s.r.m.poll_event(now, &mut out), Some(Event::Push { .. })));
        match s.r.m.poll_event(now, &mut out) {
            Some(Event::Close(Close::Stream(Fault::Channel(ChannelError::Transport(_))))) => {}
            other => panic!("{other:?}"),
        }
        assert!(s.r.m.poll_event(now, &mut out).is_none());
        // The ack of the push before it still goes out, sealed.
        s.g.read(&s.r.wire()).expect("the ack");
        assert_eq!(ack_ids(&s.g.frames()), vec![(1, 5)]);
        let Reconnect::After(wait) = s.r.m.on_disconnected(Lost::Local).reconnect else { panic!() };
        assert!(wait > Duration::ZERO, "a failed connection backs off");
        assert!(s.connect().is_empty());
        assert_eq!(record_kinds(&s.r.out), vec![RecordType::ResumeHello]);

        // Plaintext frames where records are due: refused on their first byte.
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        let plain = s.r.push(2, 6, false);
        s.r.m.handle_input(&plain);
        let fault = s.fault();
        assert_eq!(fault, Some(ChannelError::Record(RecordError::UnknownType(schema::MAGIC))));
    }

    #[test]
    fn a_reject_for_load_before_the_first_flight_waits_its_retry_after() {
        let mut s = Sec::new(Config::default());
        assert_eq!(s.connect(), vec![Ev::LoginNeeded(false)]);
        let mut reject = Vec::new();
        channel::handshake::write_reject(
            &mut reject,
            RejectReason::Overloaded,
            "queue full; retry after 3000 ms",
        );
        s.r.m.handle_input(&reject);
        let fault = s.fault();
        assert!(matches!(fault, Some(ChannelError::RejectedByGate { reason: RejectReason::Overloaded, .. })));
        let Reconnect::After(wait) = s.r.m.on_disconnected(Lost::Remote).reconnect else { panic!() };
        assert!(wait >= Duration::from_secs(3) && wait <= Duration::from_millis(3_750), "{wait:?}");
        assert_eq!(retry_after_in("no number"), Duration::ZERO);
    }

    #[test]
    fn the_end_of_the_stream_inside_a_record_is_truncation() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        let push = s.r.push(1, 5, false);
        s.g.send(&push);
        let b = s.g.take_out();
        s.r.m.handle_input(&b[..10]);
        assert!(s.r.events().is_empty());
        assert!(matches!(
            s.r.m.finish_input(),
            Err(Fault::Channel(ChannelError::Record(RecordError::Truncated { have: 10, .. })))
        ));
    }

    #[test]
    fn the_channel_lent_out_and_given_back_goes_on() {
        let mut s = Sec::new(Config::default());
        s.live(&[1; 37]);
        // Pushes 5 and 6 in one record, push 7 in the next, of which the end comes later.
        let both = [s.r.push(1, 5, false), s.r.push(2, 6, false)].concat();
        s.g.send(&both);
        let seven = s.r.push(3, 7, false);
        s.g.send(&seven);
        let bytes = s.g.take_out();
        let cut = bytes.len() - 7;
        s.r.m.handle_input(&bytes[..cut]);
        let (now, mut out) = (s.r.now, Out::new(&mut s.r.enc, &mut s.r.out));
        assert!(matches!(s.r.m.poll_event(now, &mut out), Some(Event::Push { .. })), "push 5");
        let ack = s.r.m.wire(&mut out).to_vec();
        s.r.out.clear();
        s.g.read(&ack).expect("its ack");
        // Lent with push 6 opened and push 7's record half-read.
        let mut frames = Vec::new();
        s.r.m.take_unprocessed(&mut frames);
        assert_eq!(frames, s.r.push(2, 6, false));
        let mut raw = Vec::new();
        let mut chan = s.r.m.lend_channel(&mut raw).expect("open");
        assert_eq!(raw, bytes[bytes.len() - seven.len() - 19..cut]);
        assert!(s.r.m.lend_channel(&mut Vec::new()).is_none(), "lent once");
        // The borrower seals a frame of its own.
        let mut ka = Vec::new();
        s.r.gate.keepalive(&mut ka, FrameType::Request, 99, 1, 1);
        let mut sealed = Vec::new();
        chan.seal(&ka, &mut sealed).expect("seal");
        s.g.read(&sealed).expect("the borrower's frame");
        // Given back: push 6 comes out, then the rest of push 7's record arrives.
        s.r.m.give_unprocessed(&frames);
        s.r.m.return_channel(chan, &raw);
        assert_eq!(s.r.feed(&bytes[cut..]), vec![Ev::Push(6, false), Ev::Push(7, false)]);
        s.g.read(&s.r.wire()).expect("acks");
        let sent = s.g.frames();
        assert_eq!(sent[1].seq, 99);
        assert_eq!(ack_ids(&sent), vec![(1, 5), (2, 6), (3, 7)]);
    }

    impl Sec {
        /// The gate's bytes (a Reject) go to the machine; the channel failure they caused.
        fn down_fault(&mut self) -> Option<ChannelError> {
            let b = self.g.take_out();
            self.r.m.handle_input(&b);
            self.fault()
        }
    }

    proptest! {
        #[test]
        fn records_split_anywhere_come_out_the_same(cuts in prop::collection::vec(any::<usize>(), 0..12)) {
            let mut s = Sec::new(Config { read_chunk: 7, ..Config::default() });
            s.live(&[1; 37]);
            for i in 1..=4u32 {
                let p = s.r.push(i, u64::from(i), false);
                s.g.send(&p);
            }
            let bytes = s.g.take_out();
            let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            ends.push(bytes.len());
            ends.sort_unstable();
            let mut got = Vec::new();
            let mut at = 0;
            for end in ends {
                let mut piece = &bytes[at..end];
                at = end;
                // Through the zero-copy path, a read at a time.
                while !piece.is_empty() {
                    let buf = s.r.m.read_buf();
                    let n = buf.len().min(piece.len());
                    buf[..n].copy_from_slice(&piece[..n]);
                    s.r.m.read_done(n);
                    piece = &piece[n..];
                }
                got.extend(s.r.events());
            }
            prop_assert_eq!(got, (1..=4).map(|i| Ev::Push(i, false)).collect::<Vec<_>>());
            prop_assert!(s.r.m.unprocessed().is_empty());
            prop_assert!(s.r.m.finish_input().is_ok());
            s.g.read(&s.r.wire()).expect("acks");
            prop_assert_eq!(ack_ids(&s.g.frames()).len(), 4);
        }

        /// Connections cut at any step of the resume (§14.3, §14.6) never lose a session the
        /// gate holds: once connections work again the app is back within two of them, resumed,
        /// without a login, and both sides agree on the secret.
        #[test]
        fn cuts_anywhere_in_a_resume_never_lose_the_session(cuts in prop::collection::vec(0u8..4, 0..8)) {
            let mut s = Sec::new(Config::default());
            s.live(&[1; 37]);
            let mut token = 1u8;
            for cut in cuts {
                s.r.m.on_disconnected(Lost::Remote);
                prop_assert!(s.connect().is_empty(), "no login is asked for");
                // 0: the gate never reads the first flight; 1: the app never reads the answer;
                // 2: the gate never reads the commit; 3: the Session answer is lost.
                if cut == 0 {
                    continue;
                }
                let refused = s.up().is_err();
                if cut == 1 {
                    continue;
                }
                if refused {
                    prop_assert!(s.down_fault().is_some());
                    continue;
                }
                prop_assert!(s.down().is_empty());
                let commit = s.r.wire();
                if cut == 2 {
                    continue;
                }
                s.g.read(&commit).expect("commit");
                token += 1;
                s.g.frames();
            }
            s.r.m.on_disconnected(Lost::Remote);
            let mut up = None;
            for _ in 0..2 {
                prop_assert!(s.connect().is_empty(), "no login is asked for");
                if s.up().is_err() {
                    prop_assert!(s.down_fault().is_some());
                    prop_assert_eq!(s.r.m.on_disconnected(Lost::Remote).reconnect, Reconnect::After(Duration::ZERO));
                    continue;
                }
                prop_assert!(s.down().is_empty());
                s.up().expect("commit");
                let resume = s.g.frames().pop().expect("the Resume");
                prop_assert_eq!(&resume.detail, &vec![1; 37], "the token the app last got");
                let answer = s.r.session(&resume, &[token + 1; 37], 30_000);
                s.g.send(&answer);
                up = Some(s.down());
                break;
            }
            prop_assert_eq!(up, Some(vec![Ev::Up { resumed: true, relogin: false }]));
            prop_assert_eq!(s.secrets(), (s.g.secret.clone(), None));
        }
    }

    #[test]
    fn machine_state_stays_small() {
        // Tens of thousands of these live in one load generator. 512 bytes, and 16 more for the
        // wall clock push deadlines are judged by (and the count of pushes that came too late).
        assert!(std::mem::size_of::<AppProto>() <= 528, "{}", std::mem::size_of::<AppProto>());
    }
}
