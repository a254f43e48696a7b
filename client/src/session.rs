//! The app's reconnecting session: one gate session carried across many TCP connections.
//!
//! The gate holds a session for `hold_ms` after its connection drops and replays every unacked
//! push when the app resumes (§9.13), so an app that reconnects quickly loses nothing. This
//! module does the app's half of that: it keeps the latest resume token and the node that
//! issued it, reconnects to that node first and resumes, falls back to a fresh login when the
//! resume is refused, backs off (honouring the gate's `retry_after_ms`) across a fallback list of
//! gates, and turns the gate's at-least-once pushes into exactly-once events for the app: every
//! delivery is acked, each message id is returned once.
//!
//! It never reconnects on its own: [`AppSession::recv`] returns the connection's error and the
//! caller decides when to call [`AppSession::connect`] again. Tests and the load generator need
//! to control that moment, and an app may want to wait for network connectivity first.

use crate::app::{AppConn, SessionInfo};
use crate::frame::OwnedFrame;
use crate::ClientError;
use schema::wire::{ErrorCode, GoAwayReason};
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Shortest wait between two connection attempts, by default.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between two connection attempts that this side picks, by default (a gate's
/// `retry_after_ms` may ask for longer).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connection attempts in one [`AppSession::connect`], by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Message ids remembered for de-duplication, by default.
pub const DEFAULT_DEDUP_CAPACITY: usize = 4096;
/// Longest `retry_after_ms` honoured. Gates ask for a few seconds at most; a larger value can
/// only be corrupt or hostile, and must not park a thread for days.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(60);
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
}

impl SessionConfig {
    /// A configuration with the defaults: device "fleetgate-client", 5 s connect timeout,
    /// 30 s read timeout, backoff 50 ms to 5 s, 10 attempts, 4096 remembered ids.
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
    },
    /// Any other frame: answers to pipelined requests nobody waited for, errors, keepalives.
    Frame(OwnedFrame),
    /// The gate is closing this connection: the reason, and the least wait (ms) before the next
    /// [`AppSession::connect`], which that call then honours. After Displaced the session refuses
    /// to connect (see [`AppSession::displaced`]); after LoggedOut it has no session to resume.
    GoAway(GoAwayReason, u32),
}

/// The last `capacity` message ids seen, in arrival order; the oldest is forgotten first.
#[derive(Debug, Clone)]
pub struct DedupSet {
    /// For the membership test.
    seen: HashSet<u64>,
    /// The same ids, oldest first, to know which one to forget.
    order: VecDeque<u64>,
    /// Most ids held.
    capacity: usize,
}

impl DedupSet {
    /// An empty set holding at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> DedupSet {
        let capacity = capacity.max(1);
        // Memory grows with use, so a generous capacity costs nothing until ids arrive.
        let initial = capacity.min(DEFAULT_DEDUP_CAPACITY);
        DedupSet { seen: HashSet::with_capacity(initial), order: VecDeque::with_capacity(initial), capacity }
    }

    /// Remembers `id`; true when it was not remembered already. A repeat does not refresh an
    /// id's age: it is forgotten when its first sighting is the oldest.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.seen.contains(&id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(id);
        self.order.push_back(id);
        true
    }

    /// True when `id` is remembered.
    pub fn contains(&self, id: u64) -> bool {
        self.seen.contains(&id)
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Most ids remembered.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The wait before the next attempt after `failures` failed ones (1 for the first retry):
/// exponential with full jitter, `roll` picking uniformly in `[min, min(max, min · 2^failures)]`,
/// and never less than the gate's `retry_after` (capped at [`RETRY_AFTER_CEILING`]), which may
/// exceed `max`: the gate's word wins. Jitter spreads the reconnects of many apps that lost the
/// same gate at the same moment.
pub fn backoff_delay(
    failures: u32,
    min: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    roll: u64,
) -> Duration {
    let max = max.max(min);
    let cap = min.saturating_mul(1u32 << failures.min(31)).min(max);
    let span = u64::try_from((cap - min).as_nanos()).unwrap_or(u64::MAX);
    // Multiply-shift maps a 64-bit roll onto 0..=span without modulo bias worth speaking of.
    let offset = ((u128::from(roll) * (u128::from(span) + 1)) >> 64) as u64;
    let jittered = min + Duration::from_nanos(offset);
    jittered.max(retry_after.map_or(Duration::ZERO, |r| r.min(RETRY_AFTER_CEILING)))
}

/// SplitMix64: enough randomness for jitter, without a dependency.
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock, the process and a process-wide counter, so sessions started
    /// together (a load generator's) do not back off in lockstep.
    fn new() -> Jitter {
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        Jitter(nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Why one connection attempt did not give a session.
enum Failure {
    /// Another attempt (maybe on another gate) may succeed; wait at least `retry_after`.
    Retry { error: ClientError, retry_after: Option<Duration> },
    /// Every gate would say the same (a bad or expired token, say): stop now.
    Fatal(ClientError),
}

/// An app session that survives dropped connections. Blocking, like [`AppConn`].
pub struct AppSession {
    /// Addresses, token source, timeouts and bounds.
    cfg: SessionConfig,
    /// The current connection; `None` until connected, and after it died or was dropped.
    conn: Option<AppConn>,
    /// The last Session the gate sent (kept while disconnected; cleared by logout).
    info: Option<SessionInfo>,
    /// The latest resume token; `None` when there is no session to resume.
    resume_token: Option<Vec<u8>>,
    /// host:port of the gate that issued the latest Session: it holds the session.
    node: Option<String>,
    /// Where the last GoAway asked to reconnect; tried first by the next connect.
    redirect: Option<String>,
    /// The last GoAway's retry_after: the next connect waits this long first.
    wait_first: Option<Duration>,
    /// Set by GoAway Displaced: another device took the session over.
    displaced: bool,
    /// True once a session existed and was not logged out: a login then replaces a lost one.
    had_session: bool,
    /// Message ids already returned by `recv`.
    dedup: DedupSet,
    /// Randomness for backoff.
    jitter: Jitter,
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

impl AppSession {
    /// A session with no connection yet; [`AppSession::connect`] makes one.
    pub fn new(cfg: SessionConfig) -> AppSession {
        let dedup = DedupSet::new(cfg.dedup_capacity);
        AppSession {
            cfg,
            conn: None,
            info: None,
            resume_token: None,
            node: None,
            redirect: None,
            wait_first: None,
            displaced: false,
            had_session: false,
            dedup,
            jitter: Jitter::new(),
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
    /// ShuttingDown) is followed by a backoff (at least the gate's `retry_after_ms`) and an
    /// attempt on the next address: the node, then `gates` in order, round and round, at most
    /// `max_attempts` in all; the last failure is returned then. A login the gate refuses
    /// (BadToken, TokenExpired...) is returned at once: another gate would refuse it too.
    ///
    /// After a GoAway Displaced it refuses with `Unexpected` until
    /// [`AppSession::forget_session`]: another device holds the session, and taking it back
    /// automatically would only displace that one in turn.
    pub fn connect(&mut self) -> Result<Outcome, ClientError> {
        if self.displaced {
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
        self.conn = None;
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err(ClientError::Unexpected("no gate address to connect to".to_owned()));
        }
        let attempts = self.cfg.max_attempts.max(1);
        let mut wait = self.wait_first.take().map(|w| w.min(RETRY_AFTER_CEILING));
        let mut last = None;
        for attempt in 0..attempts {
            if let Some(w) = wait.take() {
                std::thread::sleep(w);
            }
            let addr = candidates[attempt as usize % candidates.len()];
            self.attempts += 1;
            match self.try_once(addr) {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { error, retry_after }) => {
                    last = Some(error);
                    let roll = self.jitter.next_u64();
                    wait = Some(backoff_delay(
                        attempt + 1,
                        self.cfg.backoff_min,
                        self.cfg.backoff_max,
                        retry_after,
                        roll,
                    ));
                }
            }
        }
        Err(last.unwrap_or(ClientError::Closed))
    }

    /// One attempt on `addr`: connect, resume if there is a token, else (or when refused) log in.
    fn try_once(&mut self, addr: SocketAddr) -> Result<Outcome, Failure> {
        let mut conn = AppConn::connect(addr, self.cfg.connect_timeout).map_err(|e| classify(e, None))?;
        conn.set_read_timeout(self.cfg.read_timeout).map_err(|e| classify(e, None))?;
        if let Some(token) = self.resume_token.clone() {
            match conn.resume(&token) {
                Ok(info) => {
                    self.adopt(conn, info);
                    self.resumed += 1;
                    return Ok(Outcome::Resumed);
                }
                Err(ClientError::Server { code: ErrorCode::ResumeRefused, .. }) => {
                    // The session is gone (hold expired, gate restarted) or this token was
                    // already used: no gate will take it, and the connection is good for a login.
                    self.resume_token = None;
                }
                Err(e) => return Err(classify(e, Some(&mut conn))),
            }
        }
        let token = (self.cfg.token)();
        match conn.login(&token, &self.cfg.device) {
            Ok(info) => {
                if self.had_session {
                    self.relogins += 1;
                }
                self.logins += 1;
                self.adopt(conn, info);
                Ok(Outcome::LoggedIn)
            }
            Err(e) => Err(classify(e, Some(&mut conn))),
        }
    }

    /// Takes a fresh session's connection and remembers where and how to resume it.
    fn adopt(&mut self, conn: AppConn, info: SessionInfo) {
        // An empty token cannot resume anything (a gate without hold sends none).
        self.resume_token = (!info.resume_token.is_empty()).then(|| info.resume_token.clone());
        if !info.node.is_empty() {
            self.node = Some(info.node.clone());
        }
        self.info = Some(info);
        self.conn = Some(conn);
        self.had_session = true;
        self.redirect = None;
    }

    /// Addresses in the order one connect cycle tries them: where the last GoAway pointed, the
    /// node holding the session, then the configured gates; each once.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::with_capacity(self.cfg.gates.len() + 2 * MAX_RESOLVED);
        let named = self.redirect.iter().chain(self.node.iter()).flat_map(|n| resolve(n));
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
    /// in [`AppSession::duplicates_suppressed`] and skipped.
    ///
    /// Errors are the connection's: `Closed` (also when there is no connection), `Io` and
    /// `Protocol` end it (`conn()` is `None` then); `Timeout` (nothing for `read_timeout`, or
    /// only repeats) and `Rejected` leave it. Nothing reconnects here: call
    /// [`AppSession::connect`].
    pub fn recv(&mut self) -> Result<AppEvent, ClientError> {
        // Repeats are skipped without returning, so a gate replaying the same ids must not keep
        // this call busy forever.
        let deadline = Instant::now() + self.cfg.read_timeout;
        loop {
            let Some(conn) = self.conn.as_mut() else { return Err(ClientError::Closed) };
            let f = match conn.recv() {
                Ok(f) => f,
                Err(e) => {
                    if is_dead(&e) {
                        self.conn = None;
                    }
                    return Err(e);
                }
            };
            if let Some(d) = f.delivery() {
                let acked = conn.ack_push(&f);
                let event = self.dedup.insert(d.message_id).then(|| AppEvent::Push {
                    message_id: d.message_id,
                    kind: d.kind,
                    payload: d.payload.to_vec(),
                    sent_at_us: d.sent_at_us,
                    redelivery: d.redelivery,
                });
                if let Err(e) = acked {
                    if is_dead(&e) {
                        self.conn = None;
                    }
                    // A new push is the app's all the same; the gate replays it unacked on
                    // resume, and the de-dup set hides that repeat.
                    if event.is_none() {
                        return Err(e);
                    }
                }
                match event {
                    Some(ev) => return Ok(ev),
                    None => self.duplicates += 1,
                }
                if Instant::now() >= deadline {
                    return Err(ClientError::Timeout);
                }
                continue;
            }
            if let Some(g) = f.go_away() {
                let (reason, retry_after_ms) = (g.reason(), g.retry_after_ms());
                let reconnect = g.reconnect().unwrap_or("").to_owned();
                self.on_go_away(reason, retry_after_ms, reconnect);
                return Ok(AppEvent::GoAway(reason, retry_after_ms));
            }
            return Ok(AppEvent::Frame(f));
        }
    }

    /// Records what a GoAway means for the next connect.
    fn on_go_away(&mut self, reason: GoAwayReason, retry_after_ms: u32, reconnect: String) {
        self.wait_first = Some(Duration::from_millis(u64::from(retry_after_ms)));
        match reason {
            GoAwayReason::Displaced => {
                // Its resume tokens are refused from now on (§9.4).
                self.displaced = true;
                self.resume_token = None;
            }
            GoAwayReason::LoggedOut => {
                self.resume_token = None;
                self.had_session = false;
            }
            _ => self.redirect = (!reconnect.is_empty()).then_some(reconnect),
        }
    }

    /// Shuts the connection down abruptly, without logout, as a lost network would: the gate
    /// holds the session, and the resume token is kept for [`AppSession::connect`]. Frames read
    /// but not yet handed out are dropped; unacked pushes among them are replayed on resume.
    pub fn drop_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            // A socket the peer already closed fails this with NotConnected: nothing left to do.
            let _ = conn.shutdown();
        }
    }

    /// The current connection, for GPS and requests. Pushes read through it bypass the acks and
    /// the de-duplication of [`AppSession::recv`].
    pub fn conn(&mut self) -> Option<&mut AppConn> {
        self.conn.as_mut()
    }

    /// True while there is a connection (it may still turn out dead on its next read).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Logs out and ends the session: no hold, nothing to resume. Without a connection the
    /// session is only forgotten here (the gate's hold then runs out) and the answer is `Closed`.
    pub fn logout(&mut self) -> Result<(), ClientError> {
        // Whatever the gate answers, this side is done: the token must not bring it back.
        self.resume_token = None;
        self.info = None;
        self.had_session = false;
        let Some(mut conn) = self.conn.take() else { return Err(ClientError::Closed) };
        conn.logout()
    }

    /// Forgets the session (resume token, Session, displacement) and drops the connection, so
    /// the next connect logs in afresh. The de-dup set and the counters stay.
    pub fn forget_session(&mut self) {
        self.drop_connection();
        self.resume_token = None;
        self.info = None;
        self.displaced = false;
        self.had_session = false;
        self.redirect = None;
    }

    /// The latest resume token (replaced on every resume), if a session can be resumed.
    pub fn resume_token(&self) -> Option<&[u8]> {
        self.resume_token.as_deref()
    }

    /// host:port of the gate holding the session, from the latest Session.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The latest Session (kept while disconnected, cleared by logout).
    pub fn session_info(&self) -> Option<&SessionInfo> {
        self.info.as_ref()
    }

    /// True after a GoAway Displaced: connect refuses until [`AppSession::forget_session`].
    pub fn displaced(&self) -> bool {
        self.displaced
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

/// True for errors after which the connection cannot carry another frame.
fn is_dead(e: &ClientError) -> bool {
    matches!(e, ClientError::Closed | ClientError::Io(_) | ClientError::Protocol(_))
}

/// A node name's addresses: parsed when it is an address, else resolved (a gate may advertise
/// a host name); nothing when it does not resolve, so the configured gates are tried instead.
fn resolve(node: &str) -> Vec<SocketAddr> {
    if let Ok(a) = node.parse::<SocketAddr>() {
        return vec![a];
    }
    node.to_socket_addrs().map(|it| it.take(MAX_RESOLVED).collect()).unwrap_or_default()
}

/// Sorts a failed attempt into retry or stop. A gate that refuses a connection for load sends
/// Error Overloaded (or ShuttingDown) with sequence-id 0 and closes, so the login or resume
/// sees only `Closed`; the reason sits among the connection's queued frames and is dug out here.
fn classify(error: ClientError, conn: Option<&mut AppConn>) -> Failure {
    match error {
        ClientError::Server {
            code: ErrorCode::Overloaded | ErrorCode::ShuttingDown, retry_after_ms, ..
        } => Failure::Retry { error, retry_after: Some(Duration::from_millis(u64::from(retry_after_ms))) },
        ClientError::Server { .. } => Failure::Fatal(error),
        other => match conn.and_then(refusal_in_queue) {
            Some((said, retry_after)) => {
                Failure::Retry { error: said.unwrap_or(other), retry_after: Some(retry_after) }
            }
            None => Failure::Retry { error: other, retry_after: None },
        },
    }
}

/// The gate's last word among the frames queued on a failed connection: an Error Overloaded or
/// ShuttingDown (as the error to report) or a GoAway, with its retry_after.
fn refusal_in_queue(conn: &mut AppConn) -> Option<(Option<ClientError>, Duration)> {
    let mut found = None;
    // Only what is already queued (bounded by MAX_QUEUED): recv serves the queue first.
    for _ in 0..conn.queued() {
        let Ok(f) = conn.recv() else { break };
        if let Some(e) = f.error() {
            if matches!(e.code, ErrorCode::Overloaded | ErrorCode::ShuttingDown) {
                found = Some((f.server_error(), Duration::from_millis(u64::from(e.retry_after_ms))));
            }
        } else if let Some(g) = f.go_away() {
            found = Some((None, Duration::from_millis(u64::from(g.retry_after_ms()))));
        }
    }
    found
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

    #[test]
    fn dedup_set_is_bounded_and_forgets_the_oldest() {
        let mut d = DedupSet::new(3);
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

        let mut one = DedupSet::new(0);
        assert_eq!(one.capacity(), 1);
        assert!(one.insert(7) && !one.insert(7) && one.insert(8) && one.insert(7));

        let mut big = DedupSet::new(DEFAULT_DEDUP_CAPACITY);
        for id in 0..10_000u64 {
            assert!(big.insert(id));
        }
        assert_eq!(big.len(), DEFAULT_DEDUP_CAPACITY);
        assert!(!big.contains(10_000 - DEFAULT_DEDUP_CAPACITY as u64 - 1));
        assert!(big.contains(10_000 - DEFAULT_DEDUP_CAPACITY as u64));
    }

    #[test]
    fn backoff_stays_within_bounds_grows_and_honours_retry_after() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(5));
        let mut j = Jitter::new();
        for failures in 0..40 {
            let cap = min.saturating_mul(1u32 << failures.min(31)).min(max);
            for _ in 0..200 {
                let d = backoff_delay(failures, min, max, None, j.next_u64());
                assert!(d >= min && d <= cap, "{d:?} outside [{min:?}, {cap:?}] after {failures}");
            }
        }
        // The roll spans the whole range: 0 is the floor, u64::MAX the (growing) cap.
        assert_eq!(backoff_delay(1, min, max, None, 0), min);
        assert_eq!(backoff_delay(1, min, max, None, u64::MAX), Duration::from_millis(100));
        assert_eq!(backoff_delay(3, min, max, None, u64::MAX), Duration::from_millis(400));
        assert_eq!(backoff_delay(30, min, max, None, u64::MAX), max);
        // The gate's retry_after is a floor, even past max; absurd values are capped.
        let ra = Duration::from_millis(1500);
        assert!(backoff_delay(1, min, max, Some(ra), u64::MAX) == ra);
        assert_eq!(backoff_delay(30, min, max, Some(Duration::from_secs(7)), 0), Duration::from_secs(7));
        assert_eq!(backoff_delay(1, min, max, Some(Duration::from_secs(86_400)), 0), RETRY_AFTER_CEILING);
        // A short retry_after does not shorten the backoff.
        assert_eq!(backoff_delay(30, min, max, Some(Duration::from_millis(1)), u64::MAX), max);
        // max below min is read as min.
        assert_eq!(backoff_delay(5, min, Duration::ZERO, None, u64::MAX), min);
    }

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
                &wire::PushDeliveryArgs { message_id, payload: Some(payload), sent_at_us: 9, kind: 1 },
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
