//! The app's reconnecting session: one gate session carried across many TCP connections.
//!
//! The gate holds a session for `hold_ms` after its connection drops and replays every unacked
//! push when the app resumes (§9.13), so an app that reconnects quickly loses nothing.
//! [`AppSession`] is a blocking shell over [`AppProto`], which has every rule of the app's
//! half of that: the latest resume token and the node that issued it, resume else login, the
//! backoff (honouring the gate's `retry_after_ms`), keepalives, an ack for every delivery and
//! each message id shown once. This module only moves bytes between a `std::net` socket and the
//! machine, reads the clock, sleeps, and walks a fallback list of gates.
//!
//! It never reconnects on its own: [`AppSession::recv`] returns the connection's error and the
//! caller decides when to call [`AppSession::connect`] again. Tests and the load generator need
//! to control that moment, and an app may want to wait for network connectivity first.
//!
//! With a gate key ([`SessionConfig::server_key`], the development key by default) it speaks the
//! secure channel (docs/PROTOCOL.md §14), all of it inside the machine: the socket's bytes go
//! into the machine's read buffer as they come (records), and what the machine returns from
//! [`AppProto::wire`] goes to the socket as it is. A resume is a ResumeHello with the
//! session's resumption secret; a gate that does not hold the key is a configuration error that
//! [`AppSession::connect`] returns at once (and the next `connect` waits about a minute before
//! trying again).

use crate::app::{AppConn, SessionInfo};
use crate::frame::{ErrorView, OwnedFrame};
use crate::proto::app::{self as proto, AppProto, Close, Event, Lost, Out, Reconnect, SecureConfig};
use crate::ClientError;
use channel::PublicKey;
use schema::wire::{ErrorCode, GoAwayReason};
use schema::Encoder;
use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::proto::app::{
    backoff_delay, Dedup as DedupSet, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN, DEFAULT_DEDUP_CAPACITY,
    RETRY_AFTER_CEILING,
};

/// Connection attempts in one [`AppSession::connect`], by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Most addresses taken from one gate node name; a name resolving to more adds nothing but
/// attempts that max_attempts would cut anyway.
const MAX_RESOLVED: usize = 4;

/// How an [`AppSession`] reaches its gates.
pub struct SessionConfig {
    /// Gates to try, in order, after the node that held the session.
    pub gates: Vec<SocketAddr>,
    /// Returns a fresh login token when a login is needed (tokens expire, so one taken at
    /// startup may be stale by the time the session has to log in again).
    pub token: Box<dyn FnMut() -> Vec<u8> + Send>,
    /// Free-form device description for the gate's logs.
    pub device: String,
    /// Bound on each TCP connect, and the write timeout of each connection.
    pub connect_timeout: Duration,
    /// Longest wait for a login or resume answer, and the socket's per-read timeout (so
    /// [`AppSession::recv`] returns `Timeout` after this long without a frame).
    pub read_timeout: Duration,
    /// Smallest wait between attempts.
    pub backoff_min: Duration,
    /// Largest wait between attempts that this side picks.
    pub backoff_max: Duration,
    /// Connection attempts in one [`AppSession::connect`] before it gives up (at least 1).
    pub max_attempts: u32,
    /// Message ids remembered to suppress repeats (at least 1). §9.10 asks apps to remember
    /// acked ids for the longest TTL (300 s); size it for the pushes one uid gets in that time.
    pub dedup_capacity: usize,
    /// The gate's public key for the secure channel (docs/PROTOCOL.md §14), as the app ships
    /// it; `None`: plaintext frames, for a gate run with `app.plaintext`.
    pub server_key: Option<PublicKey>,
}

impl SessionConfig {
    /// A configuration with the defaults: device "fleetgate-client", 5 s connect timeout,
    /// 30 s read timeout, backoff 50 ms to 5 s, 10 attempts, 4096 remembered ids, and the
    /// secure channel with the development gate key (`channel::Keypair::dev()`'s public half,
    /// what a gate without a configured key uses; a production app sets its gate's key).
    pub fn new(gates: Vec<SocketAddr>, token: impl FnMut() -> Vec<u8> + Send + 'static) -> SessionConfig {
        SessionConfig {
            gates,
            token: Box::new(token),
            device: "fleetgate-client".to_owned(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            dedup_capacity: DEFAULT_DEDUP_CAPACITY,
            server_key: Some(channel::keys::DEV_PUBLIC_KEY),
        }
    }
}

impl fmt::Debug for SessionConfig {
    /// Everything but the token source, which is opaque.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("gates", &self.gates)
            .field("device", &self.device)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("max_attempts", &self.max_attempts)
            .field("dedup_capacity", &self.dedup_capacity)
            .field("server_key", &self.server_key.as_ref().map(channel::keys::public_file_text))
            .finish_non_exhaustive()
    }
}

/// How [`AppSession::connect`] got a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The held session continued: nothing was lost, unacked pushes are replayed.
    Resumed,
    /// A new session: pushes sent to the old one ended with a receipt that was not Delivered.
    LoggedIn,
}

/// What [`AppSession::recv`] hands the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppEvent {
    /// A push, already acked, never returned twice for one message id.
    Push {
        /// The app-server's id for the push.
        message_id: u64,
        /// The app-server's hint of what the payload is (1 = order offer, 2 = order status).
        kind: u16,
        /// The app-server's opaque content.
        payload: Vec<u8>,
        /// The app-server's clock when it sent the push, µs since the epoch.
        sent_at_us: u64,
        /// True when the gate sent it before (a resume replayed it): an earlier connection may
        /// have received it without this side seeing it.
        redelivery: bool,
        /// Show it only until this moment, ms since the Unix epoch (0: the gate gave no
        /// deadline). A push that came at or after its deadline is never returned.
        deadline_ms: u64,
    },
    /// Any other frame: answers to pipelined requests nobody waited for, errors, keepalives.
    Frame(OwnedFrame),
    /// The gate is closing this connection: the reason, and the least wait (ms) before the next
    /// [`AppSession::connect`], which that call then honours. After Displaced the session refuses
    /// to connect (see [`AppSession::displaced`]); after LoggedOut it has no session to resume.
    GoAway(GoAwayReason, u32),
}

/// Why one connection attempt did not give a session.
enum Failure {
    /// Another attempt (maybe on another gate) may succeed.
    Retry(ClientError),
    /// Every gate would say the same (a bad or expired token, say): stop now.
    Fatal(ClientError),
}

/// What one look at the machine found.
enum Step<T> {
    /// What the caller waits for; the connection ends after it when `closing`.
    Picked(T, bool),
    /// The machine ended the connection, and the caller had nothing to say about it.
    Closed,
    /// Something the machine or this shell handled: look again.
    Again,
    /// Nothing until the socket or a timer says more.
    Idle,
}

/// An app session that survives dropped connections. Blocking, like [`AppConn`].
pub struct AppSession {
    /// Addresses, token source, timeouts and bounds.
    cfg: SessionConfig,
    /// The protocol's rules.
    proto: AppProto,
    /// The current connection; `None` until connected, and after it died or was dropped.
    conn: Option<AppConn>,
    /// Builds the machine's frames.
    enc: Encoder,
    /// The machine's frames, until written to the socket.
    out: Vec<u8>,
    /// Unread bytes on their way between the machine and the connection's own reader.
    scratch: Vec<u8>,
    /// `conn()` lent the connection out: its reader and sequence-ids may have moved on.
    lent: bool,
    /// The socket's read timeout differs from `read_timeout` (set for a shorter wait).
    timeout_changed: bool,
    /// The next connection attempt waits until then (backoff, a gate's retry-after).
    not_before: Option<Instant>,
    /// Successful resumes.
    resumed: u64,
    /// Successful logins.
    logins: u64,
    /// Logins that replaced a session that could not be resumed.
    relogins: u64,
    /// TCP connection attempts made by `connect`.
    attempts: u64,
    /// Deliveries acked but not returned, their message id having been returned before.
    duplicates: u64,
}

impl fmt::Debug for AppSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppSession")
            .field("cfg", &self.cfg)
            .field("proto", &self.proto)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl AppSession {
    /// A session with no connection yet; [`AppSession::connect`] makes one.
    pub fn new(cfg: SessionConfig) -> AppSession {
        let pcfg = proto::Config {
            dedup_capacity: cfg.dedup_capacity,
            session_timeout: cfg.read_timeout,
            request_timeout: cfg.read_timeout,
            backoff_min: cfg.backoff_min,
            backoff_max: cfg.backoff_max,
            ..proto::Config::default()
        };
        let secure = cfg.server_key.map(SecureConfig::new);
        AppSession {
            proto: AppProto::with_secure(pcfg, secure, seed(), Instant::now()),
            cfg,
            conn: None,
            enc: Encoder::new(),
            out: Vec::with_capacity(256),
            scratch: Vec::new(),
            lent: false,
            timeout_changed: false,
            not_before: None,
            resumed: 0,
            logins: 0,
            relogins: 0,
            attempts: 0,
            duplicates: 0,
        }
    }

    /// Gets a session on a fresh connection, replacing the current one if any (closing it lets
    /// the gate hold the session for the resume).
    ///
    /// With a resume token it resumes, on the node that issued the token first; a refused
    /// resume (ResumeRefused) becomes a login with a fresh token on the same connection. A
    /// connection that fails, closes, times out or is refused for load (Overloaded,
    /// ShuttingDown) is followed by the machine's backoff (at least the gate's
    /// `retry_after_ms`) and an attempt on the next address: the node, then `gates` in order,
    /// round and round, at most `max_attempts` in all; the last failure is returned then. A
    /// login the gate refuses (BadToken, TokenExpired...) is returned at once: another gate
    /// would refuse it too; so is a gate that does not hold the configured key, or speaks
    /// another channel version (`Channel(RejectedByGate { UnknownKey | Version })`). A wait the
    /// last connection's end asked for (a GoAway's retry-after, a backoff, about a minute after
    /// such a configuration error) is kept before the first attempt.
    ///
    /// On the secure channel a Reject UnknownSession (the gate does not know the resumption
    /// secret) is followed at once by a resume with the previous secret, then by a login
    /// (docs/PROTOCOL.md §14.6): each is one attempt.
    ///
    /// After a GoAway Displaced it refuses with `Unexpected` until
    /// [`AppSession::forget_session`]: another device holds the session, and taking it back
    /// automatically would only displace that one in turn.
    pub fn connect(&mut self) -> Result<Outcome, ClientError> {
        self.reclaim();
        if self.proto.displaced() {
            return Err(ClientError::Unexpected(
                "the session was displaced by a login elsewhere; forget_session() before logging in again"
                    .to_owned(),
            ));
        }
        if self.cfg.connect_timeout.is_zero() || self.cfg.read_timeout.is_zero() {
            // A zero socket timeout means "block forever" to the OS, and std refuses it.
            return Err(ClientError::Unexpected(
                "connect_timeout and read_timeout must not be zero".to_owned(),
            ));
        }
        if self.conn.is_some() {
            self.lose_conn(Lost::Local);
        }
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err(ClientError::Unexpected("no gate address to connect to".to_owned()));
        }
        let mut last = None;
        for attempt in 0..self.cfg.max_attempts.max(1) {
            if let Some(at) = self.not_before.take() {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            let addr = candidates[attempt as usize % candidates.len()];
            self.attempts += 1;
            match self.try_once(addr) {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClientError::Closed))
    }

    /// One attempt on `addr`: connect, then whatever the machine asks for (Resume, or Login with
    /// a fresh token) until the session is up or the attempt failed.
    fn try_once(&mut self, addr: SocketAddr) -> Result<Outcome, Failure> {
        let conn = if self.proto.is_secure() {
            AppConn::connect_lendable(addr, self.cfg.connect_timeout)
        } else {
            AppConn::connect(addr, self.cfg.connect_timeout)
        };
        let conn = conn.and_then(|mut c| {
            c.set_read_timeout(self.cfg.read_timeout)?;
            Ok(c)
        });
        match conn {
            Ok(c) => self.conn = Some(c),
            Err(e) => {
                self.lose_conn(Lost::Remote);
                return Err(Failure::Retry(e));
            }
        }
        self.timeout_changed = false;
        // Push deadlines are judged by the wall clock: read it again on every connection, so a
        // device clock corrected while the app ran counts from now on.
        let now = Instant::now();
        self.proto.set_wall_clock(now, crate::now_ms());
        let mut out = Out::new(&mut self.enc, &mut self.out);
        let connected = self.proto.on_connected(now, &mut out);
        self.proto.wire(&mut out);
        if connected.is_err() {
            self.lose_conn(Lost::Local);
            return Err(Failure::Fatal(ClientError::Unexpected("the session was displaced".to_owned())));
        }
        // The machine's session timeout bounds the wait.
        let up = self.pump(None, |ev| match ev {
            Event::SessionUp { resumed, relogin, .. } => Some(Ok((resumed, relogin))),
            Event::Close(close) => Some(Err(attempt_failure(close))),
            // Nothing else comes before the session; whatever does is not the app's.
            _ => None,
        });
        match up.map_err(Failure::Retry)? {
            Ok((true, _)) => {
                self.resumed += 1;
                Ok(Outcome::Resumed)
            }
            Ok((false, relogin)) => {
                self.logins += 1;
                self.relogins += u64::from(relogin);
                Ok(Outcome::LoggedIn)
            }
            Err(failure) => Err(failure),
        }
    }

    /// Addresses in the order one connect cycle tries them: where the last GoAway pointed, the
    /// node holding the session, then the configured gates; each once.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::with_capacity(self.cfg.gates.len() + 2 * MAX_RESOLVED);
        let named = self.proto.redirect().into_iter().chain(self.proto.node()).flat_map(resolve);
        for a in named.chain(self.cfg.gates.iter().copied()) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// The next event of the current connection. Pushes are acked (every delivery, repeats
    /// included: the ack of an earlier one may have been lost, and only an ack gets the
    /// app-server its Delivered receipt) and returned once per message id; repeats are counted
    /// in [`AppSession::duplicates_suppressed`] and skipped. Keepalives go out while it waits.
    ///
    /// Errors are the connection's: `Closed` (also when there is no connection), `Io`,
    /// `Protocol` and an error frame that ends the connection end it (`conn()` is `None`
    /// then), and so does a GoAway (returned as an event); `Timeout` (nothing for
    /// `read_timeout`, or only repeats) and `Rejected` leave it. Nothing reconnects here: call
    /// [`AppSession::connect`].
    pub fn recv(&mut self) -> Result<AppEvent, ClientError> {
        self.reclaim();
        let deadline = Instant::now() + self.cfg.read_timeout;
        self.pump(Some(deadline), |ev| match ev {
            Event::Push { delivery: d, .. } => Some(Ok(AppEvent::Push {
                message_id: d.message_id,
                kind: d.kind,
                payload: d.payload.to_vec(),
                sent_at_us: d.sent_at_us,
                redelivery: d.redelivery,
                deadline_ms: d.deadline_ms,
            })),
            Event::Unmatched(f) => Some(Ok(AppEvent::Frame(OwnedFrame::from_frame(&f)))),
            Event::Rejected { header, error } => Some(Err(ClientError::Rejected { header, error })),
            Event::Close(Close::GoAway { reason, retry_after_ms, .. }) => {
                Some(Ok(AppEvent::GoAway(reason, retry_after_ms)))
            }
            Event::Close(Close::Error { error, log_id, .. }) => Some(Err(server_error(error, log_id))),
            Event::Close(Close::SessionTimeout) => Some(Err(ClientError::Timeout)),
            Event::Close(Close::Stream(e)) => Some(Err(e.into())),
            _ => None,
        })?
    }

    /// Runs the machine on the current connection until `pick` takes one of its events: writes
    /// what the machine writes, reads the socket, fires the machine's timers, gives it a login
    /// token when it asks, counts repeats. The connection ends after a Close event. `Timeout`
    /// once `until` passes (repeats do not keep it waiting); an error of the connection ends it.
    /// When a write fails right after the picked event, the event is returned all the same (a
    /// push is the app's even if its ack was lost: the gate replays it, and the repeat is
    /// hidden); the next call finds no connection.
    fn pump<T>(
        &mut self,
        until: Option<Instant>,
        mut pick: impl FnMut(Event<'_>) -> Option<T>,
    ) -> Result<T, ClientError> {
        loop {
            if self.conn.is_none() {
                return Err(ClientError::Closed);
            }
            let now = Instant::now();
            let mut out = Out::new(&mut self.enc, &mut self.out);
            let step = match self.proto.poll_event(now, &mut out) {
                None => Step::Idle,
                Some(Event::LoginNeeded { .. }) => {
                    let token = (self.cfg.token)();
                    // The machine is waiting for exactly this.
                    let _ = self.proto.login(now, &token, &self.cfg.device, &mut out);
                    Step::Again
                }
                Some(Event::Repeat { .. }) => {
                    self.duplicates += 1;
                    Step::Again
                }
                Some(ev) => {
                    let closing = matches!(ev, Event::Close(_));
                    match pick(ev) {
                        Some(t) => Step::Picked(t, closing),
                        None if closing => Step::Closed,
                        None => Step::Again,
                    }
                }
            };
            self.proto.wire(&mut out);
            let flushed = self.flush();
            let again = match step {
                Step::Picked(t, closing) => {
                    if closing && self.conn.is_some() {
                        self.lose_conn(Lost::Local);
                    }
                    return Ok(t);
                }
                Step::Closed => {
                    if self.conn.is_some() {
                        self.lose_conn(Lost::Local);
                    }
                    return Err(ClientError::Closed);
                }
                Step::Again => true,
                Step::Idle => false,
            };
            flushed?;
            if again {
                if until.is_some_and(|u| now >= u) {
                    return Err(ClientError::Timeout);
                }
                continue;
            }
            if self.proto.poll_timeout().is_some_and(|t| t <= now) {
                let mut out = Out::new(&mut self.enc, &mut self.out);
                self.proto.handle_timeout(now, &mut out);
                self.proto.wire(&mut out);
                self.flush()?;
                continue;
            }
            if until.is_some_and(|u| now >= u) {
                return Err(ClientError::Timeout);
            }
            let wake = match (self.proto.poll_timeout(), until) {
                (Some(t), Some(u)) => t.min(u),
                (Some(t), None) | (None, Some(t)) => t,
                (None, None) => now + self.cfg.read_timeout,
            };
            if let Err(e) = self.read_some(wake) {
                self.lose_conn(Lost::Remote);
                return Err(e);
            }
        }
    }

    /// One read from the socket into the machine, waiting until `until` at most (`Ok` also
    /// when nothing came by then). The bytes are the socket's as they are (records on the secure
    /// channel, which the machine opens). The end of the stream is `Closed`, or `Protocol` (or
    /// `Channel`) when it cut a frame (or a record) short.
    fn read_some(&mut self, until: Instant) -> Result<(), ClientError> {
        let Some(conn) = self.conn.as_mut() else { return Err(ClientError::Closed) };
        // Whole milliseconds, at least one: zero would mean "forever" to the socket.
        let wait = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        conn.stream_mut().set_read_timeout(Some(wait))?;
        self.timeout_changed = true;
        loop {
            match conn.stream_mut().read(self.proto.read_buf()) {
                Ok(0) => {
                    return Err(match self.proto.finish_input() {
                        Ok(()) => ClientError::Closed,
                        Err(fault) => fault.into(),
                    })
                }
                Ok(n) => {
                    self.proto.read_done(n);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return match ClientError::from(e) {
                        ClientError::Timeout => Ok(()),
                        other => Err(other),
                    }
                }
            }
        }
    }

    /// Writes what the machine wrote (wire bytes: `wire` was called on them), straight to the
    /// socket; a failed write ends the connection.
    fn flush(&mut self) -> Result<(), ClientError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = match self.conn.as_mut() {
            Some(conn) => conn.send_wire(&self.out),
            None => Err(ClientError::Closed),
        };
        self.out.clear();
        if let Err(e) = written {
            if self.conn.is_some() {
                self.lose_conn(Lost::Remote);
            }
            return Err(e);
        }
        let now = Instant::now();
        self.proto.sent(now);
        Ok(())
    }

    /// Ends the current connection (if any) and tells the machine, which says when the next
    /// attempt may start.
    fn lose_conn(&mut self, how: Lost) {
        if let Some(conn) = self.conn.take() {
            if how == Lost::Local {
                // A socket the peer already closed fails this with NotConnected: nothing left
                // to do.
                let _ = conn.shutdown();
            }
        }
        self.out.clear();
        self.lent = false;
        let d = self.proto.on_disconnected(how);
        self.not_before = match d.reconnect {
            Reconnect::After(wait) => Some(Instant::now() + wait),
            Reconnect::Never => None,
        };
    }

    /// After `conn()` lent the connection out: takes back what its reader holds (queued frames,
    /// bytes read), its sequence-ids and, on the secure channel, the channel with what it
    /// received and did not open yet.
    fn reclaim(&mut self) {
        if !std::mem::take(&mut self.lent) {
            return;
        }
        if let Some(conn) = self.conn.as_mut() {
            self.proto.set_seq_ids(conn.seq_ids());
            self.scratch.clear();
            conn.take_unread(&mut self.scratch);
            self.proto.give_unprocessed(&self.scratch);
            if let Some((chan, raw)) = conn.take_channel() {
                self.proto.return_channel(chan, &raw);
            }
        }
    }

    /// Shuts the connection down abruptly, without logout, as a lost network would: the gate
    /// holds the session, and the resume token is kept for [`AppSession::connect`]. Frames read
    /// but not yet handed out are dropped; unacked pushes among them are replayed on resume.
    pub fn drop_connection(&mut self) {
        if self.conn.is_some() {
            self.lose_conn(Lost::Local);
        }
    }

    /// The current connection, for GPS and requests. Pushes read through it bypass the acks and
    /// the de-duplication of [`AppSession::recv`]; what it reads and does not hand out goes back
    /// to the session with the next call on the session. On the secure channel the session lends
    /// it the open channel meanwhile (`None` if the channel is not open).
    pub fn conn(&mut self) -> Option<&mut AppConn> {
        let conn = self.conn.as_mut()?;
        if !self.lent {
            if self.proto.is_secure() {
                let mut raw = Vec::new();
                let chan = self.proto.lend_channel(&mut raw)?;
                conn.lend_channel(chan, raw);
            }
            self.scratch.clear();
            self.proto.take_unprocessed(&mut self.scratch);
            conn.give_unread(&self.scratch);
            conn.set_seq_ids(self.proto.seq_ids());
            if std::mem::take(&mut self.timeout_changed) {
                // The connection's own waits are bounded by its read timeout again.
                let _ = conn.set_read_timeout(self.cfg.read_timeout);
            }
            self.lent = true;
        }
        Some(conn)
    }

    /// True while there is a connection (it may still turn out dead on its next read).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Logs out and ends the session: no hold, nothing to resume. Without a connection the
    /// session is only forgotten here (the gate's hold then runs out) and the answer is `Closed`.
    pub fn logout(&mut self) -> Result<(), ClientError> {
        self.reclaim();
        let now = Instant::now();
        let mut out = Out::new(&mut self.enc, &mut self.out);
        let sent = self.proto.logout(now, "logout", &mut out);
        self.proto.wire(&mut out);
        let (Some(_), Ok(seq)) = (self.conn.as_ref(), sent) else {
            // Whatever happens, this side is done: the token must not bring the session back.
            if !self.proto.displaced() {
                self.proto.forget_session();
            }
            self.drop_connection();
            return Err(ClientError::Closed);
        };
        let answer = self.pump(Some(now + self.cfg.read_timeout), |ev| match ev {
            Event::LoggedOut => Some(Ok(())),
            Event::Unmatched(f) if f.header.seq == seq => match f.body {
                schema::Body::Error(e) => Some(Err(server_error(ErrorView::of(e), f.header.log_id))),
                _ => None,
            },
            Event::Close(Close::Error { error, log_id, .. }) => Some(Err(server_error(error, log_id))),
            Event::Close(_) => Some(Err(ClientError::Closed)),
            // Pushes meanwhile are acked by the machine; nothing else matters now.
            _ => None,
        });
        self.drop_connection();
        answer?
    }

    /// Forgets the session (resume token, Session, displacement) and drops the connection, so
    /// the next connect logs in afresh. The de-dup set and the counters stay.
    pub fn forget_session(&mut self) {
        self.drop_connection();
        self.proto.forget_session();
    }

    /// The latest resume token (replaced on every resume), if a session can be resumed.
    pub fn resume_token(&self) -> Option<&[u8]> {
        self.proto.resume_token()
    }

    /// host:port of the gate holding the session, from the latest Session.
    pub fn node(&self) -> Option<&str> {
        self.proto.node()
    }

    /// The latest Session (kept while disconnected, cleared by logout).
    pub fn session_info(&self) -> Option<&SessionInfo> {
        self.proto.session()
    }

    /// True after a GoAway Displaced: connect refuses until [`AppSession::forget_session`].
    pub fn displaced(&self) -> bool {
        self.proto.displaced()
    }

    /// The gate key the secure channel uses now (`None` in plaintext): the configured one, or
    /// the gate's new key once an Accept named it (the configured one is being retired). Store
    /// it where the app keeps its gate key.
    pub fn server_key(&self) -> Option<PublicKey> {
        self.proto.server_key().copied()
    }

    /// The fallback list of gates.
    pub fn gates(&self) -> &[SocketAddr] {
        &self.cfg.gates
    }

    /// Replaces the fallback list (gates came and went); used from the next connect on.
    pub fn set_gates(&mut self, gates: Vec<SocketAddr>) {
        self.cfg.gates = gates;
    }

    /// Sessions continued by a resume.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// Logins that replaced a session that could not be resumed (not the first login, nor one
    /// after logout).
    pub fn relogins(&self) -> u64 {
        self.relogins
    }

    /// All successful logins.
    pub fn logins(&self) -> u64 {
        self.logins
    }

    /// TCP connection attempts made by [`AppSession::connect`], successful or not.
    pub fn reconnect_attempts(&self) -> u64 {
        self.attempts
    }

    /// Deliveries acked but not returned, since their message id had been returned before.
    pub fn duplicates_suppressed(&self) -> u64 {
        self.duplicates
    }
}

/// An error frame's fields as a [`ClientError::Server`].
fn server_error(e: ErrorView<'_>, log_id: u64) -> ClientError {
    ClientError::Server {
        code: e.code,
        origin: e.origin,
        message: e.message.to_owned(),
        retry_after_ms: e.retry_after_ms,
        log_id,
    }
}

/// Sorts a failed attempt into retry or stop: a Login or Resume the gate answered with an error
/// other than Overloaded or ShuttingDown stops; anything else is worth another attempt.
fn attempt_failure(close: Close<'_>) -> Failure {
    match close {
        Close::Error { error, log_id, answered_login } => {
            let retry =
                !answered_login || matches!(error.code, ErrorCode::Overloaded | ErrorCode::ShuttingDown);
            let e = server_error(error, log_id);
            if retry {
                Failure::Retry(e)
            } else {
                Failure::Fatal(e)
            }
        }
        Close::GoAway { .. } => Failure::Retry(ClientError::Closed),
        Close::SessionTimeout => Failure::Retry(ClientError::Timeout),
        // A gate that does not hold the key this app was given: so would the next.
        Close::Stream(f) if f.misconfigured().is_some() => Failure::Fatal(f.into()),
        Close::Stream(f) => Failure::Retry(f.into()),
    }
}

/// A seed for the machine's jitter and log-ids, from the clock, the process and a process-wide
/// counter, so sessions started together (a load generator's) do not back off in lockstep.
fn seed() -> u64 {
    static SESSIONS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
    proto::mix64(nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A node name's addresses: parsed when it is an address, else resolved (a gate may advertise
/// a host name); nothing when it does not resolve, so the configured gates are tried instead.
fn resolve(node: &str) -> Vec<SocketAddr> {
    if let Ok(a) = node.parse::<SocketAddr>() {
        return vec![a];
    }
    node.to_socket_addrs().map(|it| it.take(MAX_RESOLVED).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameReader;
    use schema::wire;
    use schema::{Body, Cmd, Encoder, FrameType, Limits};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    const T: Duration = Duration::from_secs(5);

    /// Writes a Session answer naming `node` and the token `[n; 37]`.
    fn session_answer(out: &mut Vec<u8>, req: &OwnedFrame, node: &str, n: u8) {
        Encoder::new().frame(out, FrameType::Response, req.cmd, req.seq(), req.log_id(), |b| {
            let resume_token = b.create_vector(&[n; 37]);
            let node = b.create_string(node);
            wire::Session::create(
                b,
                &wire::SessionArgs {
                    uid: 7,
                    role: wire::Role::Driver,
                    heartbeat_ms: 30_000,
                    idle_timeout_ms: 90_000,
                    session_epoch: 1,
                    resume_token: Some(resume_token),
                    node: Some(node),
                    hold_ms: 10_000,
                },
            )
        });
    }

    fn push(out: &mut Vec<u8>, seq: u32, message_id: u64, redelivery: bool) {
        let start = out.len();
        Encoder::new().frame(out, FrameType::Push, Cmd::PushDelivery, seq, 0x1000 + message_id, |b| {
            let payload = b.create_vector(b"offer");
            wire::PushDelivery::create(
                b,
                &wire::PushDeliveryArgs {
                    message_id,
                    payload: Some(payload),
                    sent_at_us: 9,
                    kind: 1,
                    deadline_ms: 0,
                },
            )
        });
        if redelivery {
            out[start + 3] |= schema::FLAG_REDELIVERY; // the header's flags byte (§2.1)
        }
    }

    fn accept(l: &TcpListener) -> (TcpStream, FrameReader) {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(T)).expect("timeout");
        (s, FrameReader::new(Limits::APP))
    }

    #[test]
    fn overloaded_gate_is_skipped_refused_resume_logs_in_and_repeats_are_acked_once_shown() {
        let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
        let good = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (busy_addr, good_addr) = (busy.local_addr().expect("addr"), good.local_addr().expect("addr"));
        let node = good_addr.to_string();
        let busy_gate = thread::spawn(move || {
            // Refused for load, as a gate does right after accept: Error seq 0, then close.
            let (mut s, _) = accept(&busy);
            let mut out = Vec::new();
            Encoder::new().error(
                &mut out,
                0,
                0,
                wire::ErrorCode::Overloaded,
                wire::Hop::Gate,
                0,
                "too many connections",
                300,
            );
            s.write_all(&out).expect("write");
        });
        let good_gate = thread::spawn(move || {
            let (mut s, mut r) = accept(&good);
            let login = r.read_frame(&mut s).expect("login");
            assert_eq!(login.cmd, Cmd::Login);
            let mut out = Vec::new();
            session_answer(&mut out, &login, &node, 1);
            // Push 5, its replay, then push 6: the app must ack all three.
            push(&mut out, 1, 5, false);
            push(&mut out, 1, 5, true);
            push(&mut out, 2, 6, false);
            s.write_all(&out).expect("write");
            let acks: Vec<_> = (0..3)
                .map(|_| {
                    let a = r.read_frame(&mut s).expect("ack");
                    let Body::PushAck(b) = a.body() else { panic!("not an ack: {a:?}") };
                    (a.seq(), b.message_id())
                })
                .collect();
            assert_eq!(acks, vec![(1, 5), (1, 5), (2, 6)]);

            // The second connection resumes with the token it was given; refuse, then a login.
            let (mut s, mut r) = accept(&good);
            let resume = r.read_frame(&mut s).expect("resume");
            let Body::Resume(b) = resume.body() else { panic!("not a resume: {resume:?}") };
            assert_eq!(b.resume_token().map(|t| t.bytes().to_vec()), Some(vec![1; 37]));
            out.clear();
            Encoder::new().error(
                &mut out,
                resume.seq(),
                resume.log_id(),
                wire::ErrorCode::ResumeRefused,
                wire::Hop::Logic,
                Cmd::Resume as u16,
                "no session",
                0,
            );
            s.write_all(&out).expect("write");
            let login = r.read_frame(&mut s).expect("login on the same connection");
            let Body::Login(l) = login.body() else { panic!("not a login: {login:?}") };
            // token-1 went to the busy gate, token-2 to the first login here: one per login.
            assert_eq!(l.token().map(|t| t.bytes().to_vec()), Some(b"token-3".to_vec()));
            out.clear();
            session_answer(&mut out, &login, &node, 2);
            s.write_all(&out).expect("write");
            // Hold the connection until the client drops it.
            assert!(matches!(r.read_frame(&mut s), Err(ClientError::Closed)));
        });

        let mut n = 0;
        let mut cfg = SessionConfig::new(vec![busy_addr, good_addr], move || {
            n += 1;
            format!("token-{n}").into_bytes()
        });
        cfg.read_timeout = T;
        cfg.server_key = None; // these fake gates speak plaintext
        cfg.backoff_min = Duration::from_millis(1);
        cfg.backoff_max = Duration::from_millis(10);
        cfg.max_attempts = 3;
        let mut s = AppSession::new(cfg);
        assert!(matches!(s.recv(), Err(ClientError::Closed)), "no connection yet");

        let started = Instant::now();
        assert_eq!(s.connect().expect("connect"), Outcome::LoggedIn);
        assert!(started.elapsed() >= Duration::from_millis(300), "retry_after was not honoured");
        assert_eq!((s.reconnect_attempts(), s.logins(), s.relogins()), (2, 1, 0));
        assert_eq!(s.node(), Some(good_addr.to_string().as_str()));
        assert_eq!(s.resume_token(), Some(&[1u8; 37][..]));
        busy_gate.join().expect("busy gate");

        let first = s.recv().expect("push 5");
        assert!(matches!(first, AppEvent::Push { message_id: 5, redelivery: false, kind: 1, .. }));
        let second = s.recv().expect("push 6, the replay of 5 acked and skipped");
        assert!(matches!(second, AppEvent::Push { message_id: 6, .. }));
        assert_eq!(s.duplicates_suppressed(), 1);

        s.drop_connection();
        assert!(s.conn().is_none());
        assert_eq!(s.connect().expect("reconnect"), Outcome::LoggedIn);
        assert_eq!((s.resumed(), s.logins(), s.relogins()), (0, 2, 1));
        assert_eq!(s.reconnect_attempts(), 3, "the node holding the session is tried first");
        assert_eq!(s.resume_token(), Some(&[2u8; 37][..]));
        s.drop_connection();
        good_gate.join().expect("good gate");
    }

    #[test]
    fn displaced_session_does_not_reconnect_until_forgotten() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let gate = thread::spawn(move || {
            let (mut s, mut r) = accept(&l);
            let login = r.read_frame(&mut s).expect("login");
            let mut out = Vec::new();
            session_answer(&mut out, &login, &addr.to_string(), 1);
            Encoder::new().go_away(&mut out, 0, wire::GoAwayReason::Displaced, "elsewhere", "", 0);
            s.write_all(&out).expect("write");
        });
        let mut cfg = SessionConfig::new(vec![addr], Vec::new);
        cfg.read_timeout = T;
        cfg.server_key = None;
        let mut s = AppSession::new(cfg);
        assert_eq!(s.connect().expect("connect"), Outcome::LoggedIn);
        assert_eq!(s.recv().expect("go-away"), AppEvent::GoAway(wire::GoAwayReason::Displaced, 0));
        assert!(s.displaced() && s.resume_token().is_none());
        assert!(matches!(s.connect(), Err(ClientError::Unexpected(_))));
        assert_eq!(s.reconnect_attempts(), 1);
        gate.join().expect("fake gate");
        s.forget_session();
        assert!(!s.displaced() && s.session_info().is_none());
    }
}
