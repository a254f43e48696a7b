//! One simulated app's life, as one glommio task: connect, log in (or resume with the last
//! resume token, falling back to login when refused), serve the session until it drops,
//! reconnect (at once after a drop; with jittered exponential backoff after failures; never
//! sooner than the gate's retry-after), and at the end log out.
//!
//! While the session is up the task waits on three things at once: bytes from the gate (into
//! a small inline buffer; a frame split across reads is kept in a `Vec` only until it is
//! whole), its next deadline (GPS, order, keepalive, request timeout), and a command from the
//! executor's control task (drop, storm, stop). Every delivery is acked, also redeliveries;
//! each app de-duplicates message ids in a bounded ring and the executor's `Shown` record
//! catches any push shown twice anyway.

use super::conn::{self, Io};
use super::driver::Driver;
use super::passenger::Passenger;
use super::stats::Counters;
use super::{Exec, Phase, CMD_STOP, CMD_STORM};
use crate::appserver::dispatch::{decode_status, CODE_NO_DRIVER, CODE_TAKEN, KIND_OFFER, KIND_STATUS};
use crate::audit::Showing;
use futures_lite::AsyncReadExt;
use schema::wire::{self, ErrorCode, GoAwayReason, OrderState};
use schema::{Body, Cmd, Decoded, Encoder, Frame, FrameError, FrameType, Frames, Limits, FLAG_REDELIVERY};
use std::cell::RefMut;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Inline read buffer: a few pushes or answers per read, and all an idle app reads into.
const INLINE: usize = 256;
/// Message ids each app remembers for de-duplication. Redeliveries after a resume are of
/// pushes sent just before the drop, so the most recent ids suffice.
const DEDUP: usize = 32;
/// Requests an app may have outstanding; more are skipped (counted).
const MAX_REQUESTS: usize = 4;
/// Longest wait for the Session answer after connecting.
const SESSION_TIMEOUT: Duration = Duration::from_secs(15);
/// A request unanswered this long is given up (the gate's own deadline is shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Lifetime of the login tokens loadgen issues.
const TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;
/// Keepalive interval before the gate announced its heartbeat.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Longest retry-after honoured: gates ask for seconds; more can only be corrupt.
const RETRY_AFTER_CEILING: Duration = Duration::from_secs(60);
/// Longest backoff between failed attempts (before jitter).
const MAX_BACKOFF_SHIFT: u32 = 7; // 50 ms << 7 = 6.4 s

/// Request kinds, to read their answers.
const REQ_PLACE: u8 = 1;
/// A GrabOrder.
const REQ_GRAB: u8 = 2;

/// Why a connection ended, and what to do next.
enum End {
    /// Told to stop (or logged out): the app is done.
    Stopped,
    /// The session was taken over (displaced): this app must not come back.
    Fatal,
    /// Connect again after at least `after`; `failed` grows the backoff.
    Retry { after: Duration, failed: bool },
}

impl End {
    fn retry(failed: bool) -> End {
        End::Retry { after: Duration::ZERO, failed }
    }
}

/// What the app is.
enum RoleState {
    Driver(Driver),
    Passenger(Passenger),
}

/// Outstanding requests: (sequence-id, kind, sent at).
#[derive(Default)]
struct Requests {
    list: [(u32, u8, Option<Instant>); MAX_REQUESTS],
}

impl Requests {
    fn add(&mut self, seq: u32, kind: u8) -> bool {
        match self.list.iter_mut().find(|r| r.2.is_none()) {
            Some(r) => {
                *r = (seq, kind, Some(Instant::now()));
                true
            }
            None => false,
        }
    }

    fn take(&mut self, seq: u32) -> Option<(u8, Instant)> {
        let r = self.list.iter_mut().find(|r| r.2.is_some() && r.0 == seq)?;
        let sent = r.2.take()?;
        Some((r.1, sent))
    }

    fn oldest(&self) -> Option<Instant> {
        self.list.iter().filter_map(|r| r.2).min()
    }

    /// Drops requests older than `REQUEST_TIMEOUT`; returns how many.
    fn expire(&mut self, now: Instant) -> u64 {
        let mut n = 0;
        for r in self.list.iter_mut() {
            if r.2.is_some_and(|t| now.duration_since(t) >= REQUEST_TIMEOUT) {
                r.2 = None;
                n += 1;
            }
        }
        n
    }

    /// Forgets every request (its connection is gone: no answer will come); returns how many.
    fn cut(&mut self) -> u64 {
        let n = self.list.iter().filter(|r| r.2.is_some()).count() as u64;
        self.list = Default::default();
        n
    }
}

/// The last message ids seen, oldest overwritten first.
struct Dedup {
    ids: [u64; DEDUP],
    next: usize,
}

impl Dedup {
    /// True if `id` is new (and remembers it).
    fn insert(&mut self, id: u64) -> bool {
        if self.ids.contains(&id) {
            return false;
        }
        self.ids[self.next] = id;
        self.next = (self.next + 1) % DEDUP;
        true
    }
}

/// Frames being written for one app, in the executor's shared buffer; flushed with one send.
struct Tx<'a> {
    enc: RefMut<'a, Encoder>,
    out: RefMut<'a, Vec<u8>>,
    frames: u64,
}

impl<'a> Tx<'a> {
    fn new(ex: &'a Exec) -> Tx<'a> {
        let mut out = ex.out.borrow_mut();
        out.clear();
        Tx { enc: ex.enc.borrow_mut(), out, frames: 0 }
    }

    /// Writes what was built; true if anything was.
    fn flush(self, io: &mut Io, c: &Counters) -> bool {
        if self.out.is_empty() {
            return false;
        }
        io.write(&self.out);
        c.frames_out.fetch_add(self.frames, Relaxed);
        true
    }
}

/// One connection's session state.
struct Conn {
    /// Writes.
    io: Io,
    /// Sequence-id of the Login or Resume waiting for its answer.
    session_seq: u32,
    /// The session is up.
    live: bool,
    /// Until the session is up: give up at this moment.
    deadline: Instant,
    /// Anything was read on this connection.
    got_bytes: bool,
}

/// One simulated app.
struct App {
    slot: usize,
    uid: u64,
    role_id: u8,
    source: Option<std::net::IpAddr>,
    /// The latest resume token; empty when there is none.
    resume: Vec<u8>,
    heartbeat: Duration,
    seq: u32,
    log: u64,
    last_tx: Instant,
    dedup: Dedup,
    requests: Requests,
    role: RoleState,
    /// Bytes of a frame split across reads; empty (unallocated) otherwise.
    partial: Vec<u8>,
    /// Dropped by a storm and not back yet.
    storm_victim: bool,
}

fn next_seq(seq: &mut u32) -> u32 {
    *seq = seq.wrapping_add(1).max(1);
    *seq
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// Runs the app in `slot` until it is told to stop.
pub async fn run_app(ex: Rc<Exec>, slot: usize) {
    let spec = ex.apps[slot];
    let role = if spec.role == wire::Role::Driver.0 {
        RoleState::Driver(Driver::new(&ex))
    } else {
        RoleState::Passenger(Passenger::new(&ex))
    };
    let mut app = App {
        slot,
        uid: spec.uid,
        role_id: spec.role,
        source: spec.source,
        resume: Vec::new(),
        heartbeat: DEFAULT_HEARTBEAT,
        seq: 0,
        log: 0,
        last_tx: Instant::now(),
        dedup: Dedup { ids: [0; DEDUP], next: 0 },
        requests: Requests::default(),
        role,
        partial: Vec::new(),
        storm_victim: false,
    };
    let born = Instant::now();
    let mut down_since: Option<Instant> = None;
    let mut failures = 0u32;
    let mut wait = Duration::ZERO;
    loop {
        if !wait.is_zero() {
            let stop = futures_lite::future::or(
                async {
                    glommio::timer::sleep(wait).await;
                    false
                },
                async { ex.kicked(slot).await == CMD_STOP },
            )
            .await;
            if stop {
                break;
            }
        }
        if ex.control.phase() == Phase::Stop {
            break;
        }
        match app.serve(&ex, born, &mut down_since).await {
            End::Stopped | End::Fatal => break,
            End::Retry { after, failed } => {
                failures = if failed { failures.saturating_add(1) } else { 0 };
                let backoff = if failures == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(50 << failures.min(MAX_BACKOFF_SHIFT)).mul_f64(ex.rand(0.5..1.5))
                };
                // The gate jitters its retry-after already; a little more keeps refused apps
                // from returning in lockstep.
                let after = if after.is_zero() {
                    after
                } else {
                    after.min(RETRY_AFTER_CEILING).mul_f64(ex.rand(1.0..1.25))
                };
                wait = after.max(backoff);
            }
        }
    }
    ex.stats().g.tasks.fetch_sub(1, Relaxed);
}

/// What woke the connection's task.
enum Step {
    Read(std::io::Result<usize>),
    Tick,
    Kick(u8),
}

impl App {
    fn log_id(&mut self) -> u64 {
        self.log = self.log.wrapping_add(1);
        (self.uid << 20) ^ self.log | 1
    }

    /// True while GPS, orders and grabs should flow.
    fn sending(ex: &Exec) -> bool {
        ex.control.phase() <= Phase::Run
    }

    /// One connection: from connect to its end.
    async fn serve(&mut self, ex: &Exec, born: Instant, down_since: &mut Option<Instant>) -> End {
        let c = &ex.stats().c;
        let mut stream = match conn::connect(ex.plan.gate, self.source, None) {
            Ok(s) => s,
            Err(_) => {
                c.err_connect.fetch_add(1, Relaxed);
                return End::retry(true);
            }
        };
        let mut k = Conn {
            io: Io { fd: stream.as_raw_fd(), ..Io::default() },
            session_seq: 0,
            live: false,
            deadline: Instant::now() + SESSION_TIMEOUT,
            got_bytes: false,
        };
        self.open_session(ex, &mut k);
        let mut inline = [0u8; INLINE];
        let end = loop {
            if !k.io.blocked.is_empty() && !conn::write_blocked(&mut stream, &mut k.io).await {
                k.io.dead = true;
            }
            if k.io.dead {
                if k.got_bytes {
                    c.err_write.fetch_add(1, Relaxed);
                } else {
                    c.err_connect.fetch_add(1, Relaxed);
                }
                break End::retry(!k.live);
            }
            let deadline = self.next_deadline(ex, &k);
            let step = futures_lite::future::or(
                async { Step::Read(stream.read(&mut inline).await) },
                futures_lite::future::or(
                    async {
                        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
                        Step::Tick
                    },
                    async { Step::Kick(ex.kicked(self.slot).await) },
                ),
            )
            .await;
            match step {
                Step::Read(Ok(0)) | Step::Read(Err(_)) => {
                    if k.live {
                        c.drops_seen.fetch_add(1, Relaxed);
                    } else if !k.got_bytes {
                        c.err_connect.fetch_add(1, Relaxed);
                    }
                    break End::retry(!k.live);
                }
                Step::Read(Ok(n)) => {
                    k.got_bytes = true;
                    if let Some(e) = self.on_bytes(ex, &mut k, &inline[..n], born, down_since) {
                        break e;
                    }
                }
                Step::Tick => {
                    if let Some(e) = self.on_tick(ex, &mut k) {
                        break e;
                    }
                }
                Step::Kick(CMD_STOP) => {
                    if k.live {
                        self.logout(ex, &mut k);
                    }
                    break End::Stopped;
                }
                Step::Kick(cmd) => {
                    // A drop on purpose: the TCP connection goes, the session stays held.
                    if k.live {
                        c.drops_caused.fetch_add(1, Relaxed);
                    }
                    // Counted by the storm when picked, so it must report back even if its
                    // session went down a moment before the kick.
                    self.storm_victim |= cmd == CMD_STORM;
                    break End::retry(false);
                }
            }
        };
        if k.live {
            ex.slots.borrow_mut()[self.slot].live = false;
            ex.stats().g.live.fetch_sub(1, Relaxed);
            if !matches!(end, End::Stopped) {
                *down_since = Some(Instant::now());
            }
        }
        c.requests_cut.fetch_add(self.requests.cut(), Relaxed);
        self.partial = Vec::new();
        end
    }

    /// Sends Resume if there is a token, else Login.
    fn open_session(&mut self, ex: &Exec, k: &mut Conn) {
        let mut tx = Tx::new(ex);
        self.session_request(ex, &mut tx, k);
        tx.flush(&mut k.io, &ex.stats().c);
        self.last_tx = Instant::now();
    }

    /// Builds the Resume (if there is a token) or Login request.
    fn session_request(&mut self, ex: &Exec, tx: &mut Tx<'_>, k: &mut Conn) {
        k.session_seq = next_seq(&mut self.seq);
        let log_id = self.log_id();
        if self.resume.is_empty() {
            let claims = schema::token::Claims {
                uid: self.uid,
                role: self.role_id,
                expires_ms: client::now_ms() + TOKEN_TTL_MS,
            };
            let token = schema::token::issue(&ex.plan.token_secret, claims);
            tx.enc.frame(&mut tx.out, FrameType::Request, Cmd::Login, k.session_seq, log_id, |b| {
                let token = b.create_vector(&token);
                let device = b.create_string("loadgen");
                wire::Login::create(b, &wire::LoginArgs { token: Some(token), device: Some(device) })
            });
        } else {
            let resume = &self.resume;
            tx.enc.frame(&mut tx.out, FrameType::Request, Cmd::Resume, k.session_seq, log_id, |b| {
                let resume_token = b.create_vector(resume);
                wire::Resume::create(b, &wire::ResumeArgs { resume_token: Some(resume_token) })
            });
        }
        tx.frames += 1;
    }

    fn logout(&mut self, ex: &Exec, k: &mut Conn) {
        let mut tx = Tx::new(ex);
        let seq = next_seq(&mut self.seq);
        let log_id = self.log_id();
        tx.enc.frame(&mut tx.out, FrameType::Request, Cmd::Logout, seq, log_id, |b| {
            let reason = b.create_string("loadgen done");
            wire::Logout::create(b, &wire::LogoutArgs { reason: Some(reason) })
        });
        tx.frames += 1;
        tx.flush(&mut k.io, &ex.stats().c);
    }

    /// The next moment something is due on this connection.
    fn next_deadline(&self, ex: &Exec, k: &Conn) -> Instant {
        if !k.live {
            return k.deadline;
        }
        let mut d = self.last_tx + self.heartbeat / 2;
        if Self::sending(ex) {
            match &self.role {
                RoleState::Driver(dr) if ex.plan.rate > 0.0 => d = d.min(dr.next_gps),
                RoleState::Passenger(p) if ex.plan.order_rate > 0.0 => d = d.min(p.next_order),
                _ => {}
            }
        }
        if let Some(t) = self.requests.oldest() {
            d = d.min(t + REQUEST_TIMEOUT);
        }
        d
    }

    /// Whatever is due: GPS, an order, a keepalive, request timeouts.
    fn on_tick(&mut self, ex: &Exec, k: &mut Conn) -> Option<End> {
        let c = &ex.stats().c;
        let now = Instant::now();
        if !k.live {
            if now >= k.deadline {
                c.err_session_timeout.fetch_add(1, Relaxed);
                return Some(End::retry(true));
            }
            return None;
        }
        let mut tx = Tx::new(ex);
        if Self::sending(ex) {
            match &mut self.role {
                RoleState::Driver(d) if ex.plan.rate > 0.0 && now >= d.next_gps => {
                    self.log = self.log.wrapping_add(1);
                    let log_id = (self.uid << 20) ^ self.log | 1;
                    let points = d.write_gps(ex, &mut tx.enc, &mut tx.out, log_id, now);
                    if points > 0 {
                        tx.frames += 1;
                        c.gps_frames.fetch_add(1, Relaxed);
                        c.gps_points.fetch_add(u64::from(points), Relaxed);
                    }
                }
                RoleState::Passenger(p) if ex.plan.order_rate > 0.0 && now >= p.next_order => {
                    let seq = next_seq(&mut self.seq);
                    if self.requests.add(seq, REQ_PLACE) {
                        self.log = self.log.wrapping_add(1);
                        let log_id = (self.uid << 20) ^ self.log | 1;
                        p.write_order(ex, &mut tx.enc, &mut tx.out, seq, log_id);
                        tx.frames += 1;
                        c.requests.fetch_add(1, Relaxed);
                    } else {
                        c.requests_skipped.fetch_add(1, Relaxed);
                        p.schedule(ex);
                    }
                }
                _ => {}
            }
        }
        if tx.frames == 0 && now >= self.last_tx + self.heartbeat / 2 {
            let seq = next_seq(&mut self.seq);
            let log_id = self.log_id();
            tx.enc.keepalive(&mut tx.out, FrameType::Request, seq, log_id, client::now_ms());
            tx.frames += 1;
        }
        let expired = self.requests.expire(now);
        if expired > 0 {
            c.err_unexpected.fetch_add(expired, Relaxed);
        }
        if tx.flush(&mut k.io, c) {
            self.last_tx = now;
        }
        None
    }

    /// Handles bytes from the gate; a frame split across reads waits in `partial`.
    fn on_bytes(
        &mut self,
        ex: &Exec,
        k: &mut Conn,
        data: &[u8],
        born: Instant,
        down_since: &mut Option<Instant>,
    ) -> Option<End> {
        if self.partial.is_empty() {
            let (used, end) = self.decode(ex, k, data, born, down_since);
            if end.is_none() && used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
            end
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let (used, end) = self.decode(ex, k, &buf, born, down_since);
            buf.drain(..used);
            if !buf.is_empty() && end.is_none() {
                self.partial = buf;
            }
            end
        }
    }

    /// Handles every whole frame in `buf`; returns bytes used and whether the connection ends.
    fn decode(
        &mut self,
        ex: &Exec,
        k: &mut Conn,
        buf: &[u8],
        born: Instant,
        down_since: &mut Option<Instant>,
    ) -> (usize, Option<End>) {
        let c = &ex.stats().c;
        let mut tx = Tx::new(ex);
        let mut frames = Frames::new(buf, Limits::APP);
        let mut end = None;
        for item in frames.by_ref() {
            c.frames_in.fetch_add(1, Relaxed);
            match item {
                Ok(Decoded::Frame(f)) => {
                    end = self.on_frame(ex, &mut tx, k, &f, born, down_since);
                }
                Ok(Decoded::Rejected { header, error: FrameError::UnknownCmd(_) }) => {
                    // A newer gate's push: ack it by sequence-id so the gate's scheme holds
                    // (PROTOCOL §12.2); anything else unknown is ignored.
                    if header.ty == FrameType::Push as u8 && header.seq != 0 {
                        tx.enc.frame(
                            &mut tx.out,
                            FrameType::Ack,
                            Cmd::PushAck,
                            header.seq,
                            header.log_id,
                            |b| wire::PushAck::create(b, &wire::PushAckArgs { message_id: 0 }),
                        );
                        tx.frames += 1;
                    }
                }
                Ok(Decoded::Rejected { error: FrameError::BadType { .. }, .. }) => {}
                Ok(Decoded::Rejected { .. }) => {
                    c.err_protocol.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    c.err_protocol.fetch_add(1, Relaxed);
                    end = Some(End::retry(true));
                }
            }
            if end.is_some() {
                break;
            }
        }
        if tx.flush(&mut k.io, c) {
            self.last_tx = Instant::now();
        }
        (frames.consumed(), end)
    }

    fn on_frame(
        &mut self,
        ex: &Exec,
        tx: &mut Tx<'_>,
        k: &mut Conn,
        f: &Frame<'_>,
        born: Instant,
        down_since: &mut Option<Instant>,
    ) -> Option<End> {
        let c = &ex.stats().c;
        match f.body {
            Body::Session(s) if f.ty == FrameType::Response => {
                if k.live || f.header.seq != k.session_seq {
                    c.err_unexpected.fetch_add(1, Relaxed);
                    return None;
                }
                self.session_up(ex, k, s, f.cmd == Cmd::Resume, born, down_since);
                None
            }
            Body::Error(e) => self.on_error(ex, tx, k, f, e),
            Body::PushDelivery(d) if f.ty == FrameType::Push => {
                self.on_push(ex, tx, f, d);
                None
            }
            Body::GoAway(g) => {
                c.go_aways.fetch_add(1, Relaxed);
                match g.reason() {
                    GoAwayReason::Displaced => {
                        c.err_login.fetch_add(1, Relaxed);
                        Some(End::Fatal)
                    }
                    GoAwayReason::LoggedOut => Some(End::Stopped),
                    reason => {
                        if k.live && reason != GoAwayReason::Shutdown {
                            c.drops_seen.fetch_add(1, Relaxed);
                        }
                        let after = Duration::from_millis(u64::from(g.retry_after_ms()));
                        Some(End::Retry { after, failed: false })
                    }
                }
            }
            Body::Reply(r) if f.ty == FrameType::Response => {
                self.on_reply(ex, tx, f.header.seq, r);
                None
            }
            // Keepalive and Logout answers carry nothing for us.
            _ => None,
        }
    }

    fn session_up(
        &mut self,
        ex: &Exec,
        k: &mut Conn,
        s: wire::Session<'_>,
        resumed: bool,
        born: Instant,
        down_since: &mut Option<Instant>,
    ) {
        let c = &ex.stats().c;
        k.live = true;
        self.resume.clear();
        if let Some(t) = s.resume_token() {
            self.resume.extend_from_slice(t.bytes());
        }
        self.heartbeat = Duration::from_millis(u64::from(s.heartbeat_ms().max(1000)));
        ex.slots.borrow_mut()[self.slot].live = true;
        ex.stats().g.live.fetch_add(1, Relaxed);
        let now = Instant::now();
        self.last_tx = now;
        match down_since.take() {
            Some(t) => {
                ex.hists.borrow_mut().reconnect.saturating_record(us(now - t));
                if resumed {
                    c.resumes.fetch_add(1, Relaxed);
                } else {
                    c.relogins.fetch_add(1, Relaxed);
                }
            }
            None => {
                ex.hists.borrow_mut().login.saturating_record(us(now - born));
                c.logins.fetch_add(1, Relaxed);
            }
        }
        if self.storm_victim {
            self.storm_victim = false;
            let st = &ex.control.storm;
            st.back.fetch_add(1, Relaxed);
            if resumed {
                st.resumed.fetch_add(1, Relaxed);
            } else {
                st.relogin.fetch_add(1, Relaxed);
            }
            st.last_back_ns.fetch_max(ex.control.ns(now), Relaxed);
        }
    }

    fn on_error(
        &mut self,
        ex: &Exec,
        tx: &mut Tx<'_>,
        k: &mut Conn,
        f: &Frame<'_>,
        e: wire::Error<'_>,
    ) -> Option<End> {
        let c = &ex.stats().c;
        let seq = f.header.seq;
        let retry_after = Duration::from_millis(u64::from(e.retry_after_ms()));
        if !k.live && seq != 0 && seq == k.session_seq {
            return match e.code() {
                ErrorCode::ResumeRefused => {
                    // The session is gone (hold expired, or the token is stale): log in afresh
                    // on this connection.
                    c.resume_refused.fetch_add(1, Relaxed);
                    self.resume.clear();
                    self.session_request(ex, tx, k);
                    k.deadline = Instant::now() + SESSION_TIMEOUT;
                    None
                }
                ErrorCode::Overloaded | ErrorCode::ShuttingDown => {
                    c.overloaded.fetch_add(1, Relaxed);
                    Some(End::Retry { after: retry_after, failed: true })
                }
                ErrorCode::BadToken | ErrorCode::TokenExpired => {
                    c.err_login.fetch_add(1, Relaxed);
                    Some(End::Retry { after: Duration::from_secs(1), failed: true })
                }
                _ => {
                    c.err_unexpected.fetch_add(1, Relaxed);
                    Some(End::retry(true))
                }
            };
        }
        if seq == 0 {
            return match e.code() {
                // Refused at accept (or the gate is draining): it closes; come back later.
                ErrorCode::Overloaded | ErrorCode::ShuttingDown => {
                    c.overloaded.fetch_add(1, Relaxed);
                    Some(End::Retry { after: retry_after, failed: true })
                }
                ErrorCode::NotLoggedIn => {
                    c.err_session_timeout.fetch_add(1, Relaxed);
                    Some(End::retry(true))
                }
                ErrorCode::BadMagic | ErrorCode::UnsupportedVersion | ErrorCode::FrameTooLarge => {
                    c.err_protocol.fetch_add(1, Relaxed);
                    Some(End::retry(true))
                }
                _ => {
                    c.err_unexpected.fetch_add(1, Relaxed);
                    None
                }
            };
        }
        if self.requests.take(seq).is_some() {
            c.request_errors.fetch_add(1, Relaxed);
        } else {
            c.err_unexpected.fetch_add(1, Relaxed);
        }
        None
    }

    fn on_push(&mut self, ex: &Exec, tx: &mut Tx<'_>, f: &Frame<'_>, d: wire::PushDelivery<'_>) {
        let c = &ex.stats().c;
        let message_id = d.message_id();
        // Ack every delivery at once, also one seen before: its earlier ack may have been lost.
        tx.enc.frame(&mut tx.out, FrameType::Ack, Cmd::PushAck, f.header.seq, f.header.log_id, |b| {
            wire::PushAck::create(b, &wire::PushAckArgs { message_id })
        });
        tx.frames += 1;
        c.acks.fetch_add(1, Relaxed);
        let redelivery = f.header.flags & FLAG_REDELIVERY != 0;
        if redelivery {
            c.push_redelivery_flag.fetch_add(1, Relaxed);
        }
        if !self.dedup.insert(message_id) {
            c.push_again.fetch_add(1, Relaxed);
            return;
        }
        if ex.shown.borrow_mut().show(self.uid, message_id) == Showing::Again {
            c.push_duplicates.fetch_add(1, Relaxed);
            return;
        }
        c.push_first.fetch_add(1, Relaxed);
        if !redelivery {
            let latency = crate::appserver::now_us().saturating_sub(d.sent_at_us());
            ex.hists.borrow_mut().push.saturating_record(latency);
        }
        let payload = d.payload().map_or(&[][..], |p| p.bytes());
        match (&self.role, d.kind()) {
            (RoleState::Driver(_), KIND_OFFER) if Self::sending(ex) && ex.chance(ex.plan.grab_prob) => {
                let Some((order_id, _, _)) = decode_status(payload) else {
                    c.err_protocol.fetch_add(1, Relaxed);
                    return;
                };
                let seq = next_seq(&mut self.seq);
                if !self.requests.add(seq, REQ_GRAB) {
                    c.requests_skipped.fetch_add(1, Relaxed);
                    return;
                }
                let log_id = self.log_id();
                tx.enc.frame(&mut tx.out, FrameType::Request, Cmd::GrabOrder, seq, log_id, |b| {
                    wire::GrabOrder::create(b, &wire::GrabOrderArgs { order_id, payload: None })
                });
                tx.frames += 1;
                c.requests.fetch_add(1, Relaxed);
            }
            (RoleState::Passenger(_), KIND_STATUS) => {
                if matches!(decode_status(payload), Some((_, OrderState::Taken, _))) {
                    c.orders_taken_seen.fetch_add(1, Relaxed);
                }
            }
            _ => {}
        }
    }

    fn on_reply(&mut self, ex: &Exec, _tx: &mut Tx<'_>, seq: u32, r: wire::Reply<'_>) {
        let c = &ex.stats().c;
        let Some((kind, sent)) = self.requests.take(seq) else {
            c.err_unexpected.fetch_add(1, Relaxed);
            return;
        };
        ex.hists.borrow_mut().request.saturating_record(us(sent.elapsed()));
        c.replies.fetch_add(1, Relaxed);
        let counter = match (kind, r.code()) {
            (REQ_PLACE, 0) => &c.orders_placed,
            (REQ_PLACE, CODE_NO_DRIVER) => &c.orders_no_driver,
            (REQ_GRAB, 0) => &c.grab_won,
            (REQ_GRAB, CODE_TAKEN) => &c.grab_lost,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }
}
