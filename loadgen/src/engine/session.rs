//! One simulated app's life, as one glommio task: a shell over the client's sans-I/O app
//! machine ([`AppProto`]), which has every rule of the protocol (resume else login, the backoff
//! and the gate's retry-after, keepalives, an ack for every delivery, each message id shown
//! once, request sequence-ids and timeouts). This task only moves bytes, time and events: it
//! connects, reads into the machine's buffer, writes what the machine wrote, sleeps until the
//! machine's next deadline or the role's (GPS, orders), and counts what the machine reports.
//! Nothing here is glommio's but the socket and the timers, so an io_uring shell can take its
//! place.
//!
//! While the session is up the task waits on three things at once: bytes from the gate, its
//! next deadline, and a command from the executor's control task (drop, storm, stop). The
//! executor's `Shown` record catches any push the machine let through twice.

use super::conn::{self, Io};
use super::driver::Driver;
use super::passenger::Passenger;
use super::stats::Counters;
use super::{Exec, Phase, CMD_STOP, CMD_STORM};
use crate::appserver::dispatch::{decode_status, CODE_NO_DRIVER, CODE_TAKEN, KIND_OFFER, KIND_STATUS};
use crate::audit::Showing;
use client::proto::app::{self as proto, AppProto, Close, Event, Lost, Out, Reconnect};
use client::ReplyView;
use futures_lite::AsyncReadExt;
use rand::Rng;
use schema::wire::{self, ErrorCode, GoAwayReason, OrderState};
use schema::{Cmd, Encoder};
use std::cell::RefMut;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Bytes read at a time: a few pushes or answers per read, and all an idle app holds.
const READ_CHUNK: usize = 256;
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
/// Heartbeat assumed when the gate announces none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Shortest wait after a failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait after failed attempts (a gate's retry-after may ask for more).
const BACKOFF_MAX: Duration = Duration::from_millis(50 << 7); // 6.4 s
/// Longest retry-after honoured: gates ask for seconds; more can only be corrupt.
const RETRY_AFTER_CEILING: Duration = Duration::from_secs(60);
/// Least wait after the gate refused a login.
const REFUSED_LOGIN_WAIT: Duration = Duration::from_secs(1);

/// Request tags, to read their answers: a PlaceOrder.
const REQ_PLACE: u8 = 1;
/// A GrabOrder.
const REQ_GRAB: u8 = 2;

/// The machine's settings for a simulated app.
fn proto_config() -> proto::Config {
    proto::Config {
        dedup_capacity: DEDUP,
        max_requests: MAX_REQUESTS,
        request_timeout: REQUEST_TIMEOUT,
        session_timeout: SESSION_TIMEOUT,
        default_heartbeat: DEFAULT_HEARTBEAT,
        backoff_min: BACKOFF_MIN,
        backoff_max: BACKOFF_MAX,
        retry_after_ceiling: RETRY_AFTER_CEILING,
        refused_login_wait: REFUSED_LOGIN_WAIT,
        read_chunk: READ_CHUNK,
    }
}

/// What to do after a connection.
enum End {
    /// Nothing: told to stop, logged out, or displaced.
    Done,
    /// Connect again after this wait.
    Retry(Duration),
}

/// How a connection is ending, as the task saw it.
enum Ending {
    /// Told to stop: log out (if live) and end.
    Stop,
    /// The machine, the gate, the network or a kick ended it.
    Lost(Lost),
}

/// What the app is.
enum RoleState {
    Driver(Driver),
    Passenger(Passenger),
}

/// Frames being written for one app, in the executor's shared encoder and buffer; sent with one
/// write.
struct Tx<'a> {
    enc: RefMut<'a, Encoder>,
    buf: RefMut<'a, Vec<u8>>,
}

impl<'a> Tx<'a> {
    fn new(ex: &'a Exec) -> Tx<'a> {
        let mut buf = ex.out.borrow_mut();
        buf.clear();
        Tx { enc: ex.enc.borrow_mut(), buf }
    }

    fn out(&mut self) -> Out<'_> {
        Out::new(&mut self.enc, &mut self.buf)
    }

    /// Writes the `frames` built.
    fn send(self, io: &mut Io, c: &Counters, frames: u32) {
        if !self.buf.is_empty() {
            io.write(&self.buf);
            c.frames_out.fetch_add(u64::from(frames), Relaxed);
        }
    }
}

/// One connection's shell state.
struct Conn {
    /// Writes.
    io: Io,
    /// The session is up on it.
    live: bool,
    /// Anything was read on it.
    got_bytes: bool,
}

/// One simulated app.
struct App {
    slot: usize,
    uid: u64,
    role_id: u8,
    source: Option<std::net::IpAddr>,
    /// The protocol.
    proto: AppProto,
    role: RoleState,
    /// Dropped by a storm and not back yet.
    storm_victim: bool,
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
    let seed = ex.rng.borrow_mut().random::<u64>();
    let born = Instant::now();
    let mut app = App {
        slot,
        uid: spec.uid,
        role_id: spec.role,
        source: spec.source,
        proto: AppProto::new(proto_config(), seed, born),
        role,
        storm_victim: false,
    };
    let mut down_since: Option<Instant> = None;
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
            End::Done => break,
            End::Retry(after) => wait = after,
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
                return self.after(ex, Ending::Lost(Lost::Remote));
            }
        };
        let mut k =
            Conn { io: Io { fd: stream.as_raw_fd(), ..Io::default() }, live: false, got_bytes: false };
        let mut ending = {
            let mut tx = Tx::new(ex);
            let mut out = tx.out();
            // Never displaced here: a displaced app ends (End::Done).
            let _ = self.proto.on_connected(Instant::now(), &mut out);
            let ending = self.events(ex, &mut k, &mut out, born, down_since);
            let frames = out.frames();
            tx.send(&mut k.io, c, frames);
            ending
        };
        let slot = self.slot;
        while ending.is_none() {
            if !k.io.blocked.is_empty() && !conn::write_blocked(&mut stream, &mut k.io).await {
                k.io.dead = true;
            }
            if k.io.dead {
                if k.got_bytes {
                    c.err_write.fetch_add(1, Relaxed);
                } else {
                    c.err_connect.fetch_add(1, Relaxed);
                }
                ending = Some(Ending::Lost(Lost::Remote));
                break;
            }
            let deadline = self.next_deadline(ex, &k);
            let buf = self.proto.read_buf();
            let step = futures_lite::future::or(
                async { Step::Read(stream.read(buf).await) },
                futures_lite::future::or(
                    async {
                        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
                        Step::Tick
                    },
                    async { Step::Kick(ex.kicked(slot).await) },
                ),
            )
            .await;
            ending = match step {
                Step::Read(Ok(0)) | Step::Read(Err(_)) => {
                    if k.live {
                        c.drops_seen.fetch_add(1, Relaxed);
                    } else if !k.got_bytes {
                        c.err_connect.fetch_add(1, Relaxed);
                    }
                    Some(Ending::Lost(Lost::Remote))
                }
                Step::Read(Ok(n)) => {
                    k.got_bytes = true;
                    self.proto.read_done(n);
                    self.step(ex, &mut k, born, down_since, |_, _, _| {})
                }
                Step::Tick => self.step(ex, &mut k, born, down_since, App::on_tick),
                Step::Kick(CMD_STOP) => {
                    if k.live {
                        let mut tx = Tx::new(ex);
                        let mut out = tx.out();
                        let _ = self.proto.logout(Instant::now(), "loadgen done", &mut out);
                        let frames = out.frames();
                        tx.send(&mut k.io, c, frames);
                    }
                    Some(Ending::Stop)
                }
                Step::Kick(cmd) => {
                    // A drop on purpose: the TCP connection goes, the session stays held.
                    if k.live {
                        c.drops_caused.fetch_add(1, Relaxed);
                    }
                    // Counted by the storm when picked, so it must report back even if its
                    // session went down a moment before the kick.
                    self.storm_victim |= cmd == CMD_STORM;
                    Some(Ending::Lost(Lost::Local))
                }
            };
        }
        let ending = ending.unwrap_or(Ending::Lost(Lost::Local));
        if k.live {
            ex.slots.borrow_mut()[self.slot].live = false;
            ex.stats().g.live.fetch_sub(1, Relaxed);
            if !matches!(ending, Ending::Stop) {
                *down_since = Some(Instant::now());
            }
        }
        self.after(ex, ending)
    }

    /// Tells the machine the connection is gone; says what to do next.
    fn after(&mut self, ex: &Exec, ending: Ending) -> End {
        let how = match ending {
            Ending::Stop => Lost::Local,
            Ending::Lost(how) => how,
        };
        let d = self.proto.on_disconnected(how);
        ex.stats().c.requests_cut.fetch_add(u64::from(d.requests_cut), Relaxed);
        match (ending, d.reconnect) {
            (Ending::Stop, _) | (_, Reconnect::Never) => End::Done,
            (Ending::Lost(_), Reconnect::After(wait)) => End::Retry(wait),
        }
    }

    /// One wake-up: `work` (the role's and the machine's timers, or nothing after a read), then
    /// the machine's events, then one write of everything built.
    fn step(
        &mut self,
        ex: &Exec,
        k: &mut Conn,
        born: Instant,
        down_since: &mut Option<Instant>,
        work: impl FnOnce(&mut App, &Exec, &mut Out<'_>),
    ) -> Option<Ending> {
        let c = &ex.stats().c;
        let mut tx = Tx::new(ex);
        let mut out = tx.out();
        work(self, ex, &mut out);
        let ending = self.events(ex, k, &mut out, born, down_since);
        let frames = out.frames();
        tx.send(&mut k.io, c, frames);
        ending
    }

    /// The next moment something is due on this connection: the machine's (Session deadline,
    /// keepalive, request timeout) or the role's (GPS, order).
    fn next_deadline(&self, ex: &Exec, k: &Conn) -> Instant {
        let mut d = self.proto.poll_timeout().unwrap_or_else(|| Instant::now() + SESSION_TIMEOUT);
        if k.live && Self::sending(ex) {
            match &self.role {
                RoleState::Driver(dr) if ex.plan.rate > 0.0 => d = d.min(dr.next_gps),
                RoleState::Passenger(p) if ex.plan.order_rate > 0.0 => d = d.min(p.next_order),
                _ => {}
            }
        }
        d
    }

    /// Whatever is due: GPS or an order, then the machine's timers.
    fn on_tick(&mut self, ex: &Exec, out: &mut Out<'_>) {
        let c = &ex.stats().c;
        let now = Instant::now();
        if self.proto.is_live() && Self::sending(ex) {
            match &mut self.role {
                RoleState::Driver(d) if ex.plan.rate > 0.0 && now >= d.next_gps => {
                    let log_id = self.proto.new_log_id();
                    let mut points = 0;
                    out.put(|enc, buf| points = d.write_gps(ex, enc, buf, log_id, now));
                    c.gps_frames.fetch_add(1, Relaxed);
                    c.gps_points.fetch_add(u64::from(points), Relaxed);
                    self.proto.sent(now);
                }
                RoleState::Passenger(p) if ex.plan.order_rate > 0.0 && now >= p.next_order => {
                    let args = p.next_order(ex);
                    let sent = self.proto.request(now, out, Cmd::PlaceOrder, REQ_PLACE, move |b| {
                        wire::PlaceOrder::create(b, &args)
                    });
                    match sent {
                        Ok(_) => c.requests.fetch_add(1, Relaxed),
                        Err(_) => c.requests_skipped.fetch_add(1, Relaxed),
                    };
                }
                _ => {}
            }
        }
        self.proto.handle_timeout(now, out);
    }

    /// Everything the machine has to say, counted and acted on; `Some` when the connection
    /// must end.
    fn events(
        &mut self,
        ex: &Exec,
        k: &mut Conn,
        out: &mut Out<'_>,
        born: Instant,
        down_since: &mut Option<Instant>,
    ) -> Option<Ending> {
        let c = &ex.stats().c;
        let now = Instant::now();
        let mut ending = None;
        while let Some(event) = self.proto.poll_event(now, out) {
            match event {
                Event::LoginNeeded { resume_refused } => {
                    if resume_refused {
                        c.resume_refused.fetch_add(1, Relaxed);
                    }
                    let claims = schema::token::Claims {
                        uid: self.uid,
                        role: self.role_id,
                        expires_ms: client::now_ms() + TOKEN_TTL_MS,
                    };
                    let token = schema::token::issue(&ex.plan.token_secret, claims);
                    // The machine is waiting for exactly this.
                    let _ = self.proto.login(now, &token, "loadgen", out);
                }
                Event::SessionUp { resumed, .. } => {
                    k.live = true;
                    self.session_up(ex, resumed, born, down_since);
                }
                Event::Push { delivery: d, .. } => {
                    c.acks.fetch_add(1, Relaxed);
                    if d.redelivery {
                        c.push_redelivery_flag.fetch_add(1, Relaxed);
                    }
                    if ex.shown.borrow_mut().show(self.uid, d.message_id) == Showing::Again {
                        c.push_duplicates.fetch_add(1, Relaxed);
                        continue;
                    }
                    c.push_first.fetch_add(1, Relaxed);
                    if !d.redelivery {
                        let latency = crate::appserver::now_us().saturating_sub(d.sent_at_us);
                        ex.hists.borrow_mut().push.saturating_record(latency);
                    }
                    match (&self.role, d.kind) {
                        (RoleState::Driver(_), KIND_OFFER)
                            if Self::sending(ex) && ex.chance(ex.plan.grab_prob) =>
                        {
                            let Some((order_id, _, _)) = decode_status(d.payload) else {
                                c.err_protocol.fetch_add(1, Relaxed);
                                continue;
                            };
                            let sent = self.proto.request(now, out, Cmd::GrabOrder, REQ_GRAB, |b| {
                                wire::GrabOrder::create(b, &wire::GrabOrderArgs { order_id, payload: None })
                            });
                            match sent {
                                Ok(_) => c.requests.fetch_add(1, Relaxed),
                                Err(_) => c.requests_skipped.fetch_add(1, Relaxed),
                            };
                        }
                        (RoleState::Passenger(_), KIND_STATUS) => {
                            if matches!(decode_status(d.payload), Some((_, OrderState::Taken, _))) {
                                c.orders_taken_seen.fetch_add(1, Relaxed);
                            }
                        }
                        _ => {}
                    }
                }
                Event::Repeat { redelivery, .. } => {
                    c.acks.fetch_add(1, Relaxed);
                    if redelivery {
                        c.push_redelivery_flag.fetch_add(1, Relaxed);
                    }
                    c.push_again.fetch_add(1, Relaxed);
                }
                Event::Reply { tag, sent, reply, .. } => Self::on_reply(ex, tag, now - sent, reply),
                Event::Failed { .. } => {
                    c.request_errors.fetch_add(1, Relaxed);
                }
                // A request unanswered for long, an answer or error that matches nothing sent.
                Event::TimedOut { .. } | Event::Unmatched(_) => {
                    c.err_unexpected.fetch_add(1, Relaxed);
                }
                Event::Rejected { .. } => {
                    c.err_protocol.fetch_add(1, Relaxed);
                }
                Event::LoggedOut => {}
                Event::Close(close) => {
                    Self::count_close(c, &close, k.live);
                    ending = Some(Ending::Lost(Lost::Local));
                    break;
                }
            }
        }
        c.frames_in.fetch_add(u64::from(self.proto.take_frames_in()), Relaxed);
        ending
    }

    /// Counts why the machine ended a connection.
    fn count_close(c: &Counters, close: &Close<'_>, live: bool) {
        let counter = match close {
            Close::GoAway { reason, .. } => {
                c.go_aways.fetch_add(1, Relaxed);
                match *reason {
                    // The session was taken over: this app must not come back.
                    GoAwayReason::Displaced => &c.err_login,
                    GoAwayReason::LoggedOut | GoAwayReason::Shutdown => return,
                    _ if live => &c.drops_seen,
                    _ => return,
                }
            }
            Close::Error { error, .. } => match error.code {
                // Refused at accept or for the login, or the gate is draining: honoured.
                ErrorCode::Overloaded | ErrorCode::ShuttingDown => &c.overloaded,
                ErrorCode::BadToken | ErrorCode::TokenExpired => &c.err_login,
                ErrorCode::NotLoggedIn => &c.err_session_timeout,
                ErrorCode::BadMagic | ErrorCode::UnsupportedVersion | ErrorCode::FrameTooLarge => {
                    &c.err_protocol
                }
                _ => &c.err_unexpected,
            },
            Close::SessionTimeout => &c.err_session_timeout,
            Close::Stream(_) => &c.err_protocol,
        };
        counter.fetch_add(1, Relaxed);
    }

    fn session_up(&mut self, ex: &Exec, resumed: bool, born: Instant, down_since: &mut Option<Instant>) {
        let c = &ex.stats().c;
        ex.slots.borrow_mut()[self.slot].live = true;
        ex.stats().g.live.fetch_add(1, Relaxed);
        let now = Instant::now();
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

    fn on_reply(ex: &Exec, tag: u8, waited: Duration, r: ReplyView<'_>) {
        let c = &ex.stats().c;
        ex.hists.borrow_mut().request.saturating_record(us(waited));
        c.replies.fetch_add(1, Relaxed);
        let counter = match (tag, r.code) {
            (REQ_PLACE, 0) => &c.orders_placed,
            (REQ_PLACE, CODE_NO_DRIVER) => &c.orders_no_driver,
            (REQ_GRAB, 0) => &c.grab_won,
            (REQ_GRAB, CODE_TAKEN) => &c.grab_lost,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }
}
