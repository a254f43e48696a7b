//! One simulated app, as a [`Client`] of its core's loop: a shell over the client's sans-I/O
//! app machine ([`AppProto`]), which has every rule of the protocol (resume else login, the
//! backoff and the gate's retry-after, keepalives, an ack for every delivery, each message id
//! shown once, request sequence-ids and timeouts). The shell only moves bytes, time and events:
//! the loop connects, reads into the machine's buffer and writes what the machine wrote; the
//! shell says when it is next due (the machine's deadline or the role's: GPS, orders) and
//! counts what the machine reports. The loop's `Shown` record catches any push the machine
//! let through twice.
//!
//! With several gate nodes (`Plan::gates`) the shell also picks where each connect goes: the
//! app's own node first; after a drop the node its Session answer named (where a GoAway pointed,
//! if one did), or with `--move` the next node after it; after an attempt that brought no
//! session, the next node after the one tried. Nodes are known by their place in `--gate`: a
//! Session naming an address not in the list counts as the node the app was connected to.

use super::driver::Driver;
use super::event_loop::{Client, Ended, Flow};
use super::passenger::Passenger;
use super::stats::Counters;
use super::{AppSpec, Exec, Phase};
use crate::appserver::dispatch::{decode_status, CODE_NO_DRIVER, CODE_TAKEN, KIND_OFFER, KIND_STATUS};
use crate::audit::Showing;
use client::proto::app::{self as proto, AppProto, Close, Event, Lost, Out, Reconnect};
use client::ReplyView;
use rand::Rng;
use schema::wire::{self, ErrorCode, GoAwayReason, OrderState};
use schema::Cmd;
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

/// What the app is.
enum RoleState {
    Driver(Driver),
    Passenger(Passenger),
}

/// One simulated app.
pub struct App {
    uid: u64,
    role_id: u8,
    source: Option<std::net::IpAddr>,
    /// Index in `Plan::gates` of the node of the current connection, or of the next one.
    gate: u16,
    /// Index in `Plan::gates` of the node that issued the last Session answer.
    node: Option<u16>,
    /// The protocol.
    proto: AppProto,
    role: RoleState,
    /// Dropped by a storm and not back yet.
    storm_victim: bool,
    /// When its first connect started: the first login's latency counts from here.
    born: Option<Instant>,
    /// When its last live session went down, until the next one is up.
    down_since: Option<Instant>,
    /// The session is up on the current connection.
    live: bool,
    /// Anything was read on the current connection.
    got_bytes: bool,
    /// When the bytes of the read being handled arrived in the socket (push runs only).
    rx_us: Option<u64>,
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl App {
    /// Runs `f` (one step of this app) with an [`Out`] over the loop's buffer and the
    /// loop's shared encoder, counts the frames it wrote, and hands the buffer to the machine's
    /// `wire`: on the secure channel the frames become records there (sealed in place, or held
    /// until the gate's Accept), so what the loop then sends is wire bytes.
    fn step<R>(&mut self, ex: &Exec, buf: &mut Vec<u8>, f: impl FnOnce(&mut App, &mut Out<'_>) -> R) -> R {
        let mut enc = ex.enc.borrow_mut();
        let mut out = Out::new(&mut enc, buf);
        let r = f(self, &mut out);
        let frames = out.frames();
        self.proto.wire(&mut out);
        if frames > 0 {
            ex.stats().c.frames_out.fetch_add(u64::from(frames), Relaxed);
        }
        r
    }

    /// The app `spec`, not connected yet.
    pub fn new(ex: &Exec, spec: AppSpec, born: Instant) -> App {
        let role = if spec.role == wire::Role::Driver.0 {
            RoleState::Driver(Driver::new(ex))
        } else {
            RoleState::Passenger(Passenger::new(ex))
        };
        let seed = ex.rng.borrow_mut().random::<u64>();
        App {
            uid: spec.uid,
            role_id: spec.role,
            source: spec.source,
            gate: spec.gate,
            node: None,
            proto: AppProto::with_secure(proto_config(), ex.secure.clone(), seed, born),
            role,
            storm_victim: false,
            born: None,
            down_since: None,
            live: false,
            got_bytes: false,
            rx_us: None,
        }
    }

    /// True while GPS, orders and grabs should flow.
    fn sending(ex: &Exec) -> bool {
        ex.control.phase() <= Phase::Run
    }

    /// Whatever is due: GPS or an order, then the machine's timers.
    fn on_tick(&mut self, ex: &Exec, now: Instant, out: &mut Out<'_>) {
        let c = &ex.stats().c;
        if self.proto.is_live() && Self::sending(ex) {
            match &mut self.role {
                RoleState::Driver(d) if ex.plan.rate > 0.0 && now >= d.next_gps => {
                    let log_id = self.proto.new_log_id();
                    let mut points = 0;
                    let uid = self.uid;
                    out.put(|enc, buf| points = d.write_gps(uid, ex, enc, buf, log_id, now));
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

    /// Everything the machine has to say, counted and acted on; [`Flow::End`] when the
    /// connection must end.
    fn events(&mut self, ex: &Exec, now: Instant, out: &mut Out<'_>) -> Flow {
        let c = &ex.stats().c;
        let mut flow = Flow::Go;
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
                    self.live = true;
                    self.session_up(ex, resumed, now);
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
                        let mut h = ex.hists.borrow_mut();
                        let latency = h.record_push(d.sent_at_us, crate::appserver::now_us(), self.rx_us);
                        // Same-node and cross-node deliveries apart, when there are nodes to
                        // tell apart.
                        if let (true, Some(node)) = (ex.plan.gates.len() > 1, self.node) {
                            h.node_push(usize::from(node)).saturating_record(latency);
                        }
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
                    Self::count_close(c, &close, self.live);
                    flow = Flow::End;
                    break;
                }
            }
        }
        c.frames_in.fetch_add(u64::from(self.proto.take_frames_in()), Relaxed);
        flow
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

    /// Index in `Plan::gates` of the node a Session answer named (its advertised address), or
    /// the node connected to when the address is not in the list.
    fn node_named(&self, ex: &Exec) -> u16 {
        let named = self.proto.node().and_then(|n| n.parse::<std::net::SocketAddr>().ok());
        node_index(&ex.plan.gates, named).unwrap_or(self.gate)
    }

    /// Where the next connect goes (an index in `Plan::gates`), once a connection ended;
    /// `had_session`: a session was up on it.
    fn next_gate(&self, ex: &Exec, had_session: bool) -> u16 {
        let n = ex.plan.gates.len();
        let after = |i: u16| ((usize::from(i) + 1) % n) as u16;
        // A GoAway that ended the session naming a node (a drained node's successor) is the
        // gate's word: go there, once; if that attempt fails, on to the next.
        let redirect = self.proto.redirect().and_then(|r| r.parse::<std::net::SocketAddr>().ok());
        if let Some(i) = node_index(&ex.plan.gates, redirect).filter(|_| had_session) {
            return i;
        }
        match self.node {
            Some(node) if had_session && ex.plan.move_nodes => after(node),
            Some(node) if had_session => node,
            // The attempt brought no session (refused, failed, cut): the next node after it.
            _ => after(self.gate),
        }
    }

    fn session_up(&mut self, ex: &Exec, resumed: bool, now: Instant) {
        let c = &ex.stats().c;
        ex.stats().g.live.fetch_add(1, Relaxed);
        let here = self.node_named(ex);
        // The session was taken over from another node: the resume crossed nodes.
        let moved = resumed && self.node.is_some_and(|before| before != here);
        self.node = Some(here);
        if moved {
            c.resumes_moved.fetch_add(1, Relaxed);
        }
        match self.down_since.take() {
            Some(t) => {
                ex.hists.borrow_mut().reconnect.saturating_record(us(now - t));
                if resumed {
                    c.resumes.fetch_add(1, Relaxed);
                } else {
                    c.relogins.fetch_add(1, Relaxed);
                }
            }
            None => {
                if let RoleState::Driver(d) = &mut self.role {
                    d.start(ex, now);
                }
                let born = self.born.unwrap_or(now);
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
                if moved {
                    st.moved.fetch_add(1, Relaxed);
                }
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

impl Client for App {
    type Shared = Exec;

    fn addr(&self, ex: &Exec) -> (std::net::SocketAddr, Option<std::net::IpAddr>) {
        (ex.plan.gates[usize::from(self.gate)], self.source)
    }

    fn live(&self) -> bool {
        self.live
    }

    fn on_connecting(&mut self, now: Instant) {
        self.born.get_or_insert(now);
    }

    fn on_connected(&mut self, ex: &Exec, now: Instant, buf: &mut Vec<u8>) -> Flow {
        self.live = false;
        self.got_bytes = false;
        self.step(ex, buf, |app, out| {
            // Never displaced here: a displaced app ends (on_ended says never).
            let _ = app.proto.on_connected(now, out);
            app.events(ex, now, out)
        })
    }

    fn read_buf<'a>(&'a mut self, _scratch: &'a mut [u8]) -> &'a mut [u8] {
        self.proto.read_buf()
    }

    fn rx_stamps(&self, ex: &Exec) -> bool {
        ex.plan.push_rate > 0.0 && ex.plan.fanout > 0
    }

    fn on_read(
        &mut self,
        ex: &Exec,
        n: usize,
        _scratch: &[u8],
        now: Instant,
        rx_us: Option<u64>,
        buf: &mut Vec<u8>,
    ) -> Flow {
        self.got_bytes = true;
        self.rx_us = rx_us;
        self.proto.read_done(n);
        self.step(ex, buf, |app, out| app.events(ex, now, out))
    }

    fn on_due(&mut self, ex: &Exec, now: Instant, buf: &mut Vec<u8>) -> Flow {
        self.step(ex, buf, |app, out| {
            app.on_tick(ex, now, out);
            app.events(ex, now, out)
        })
    }

    /// The machine's next deadline (Session deadline, keepalive, request timeout) or the
    /// role's (GPS, order), whichever is first.
    fn next_due(&self, ex: &Exec) -> Option<Instant> {
        let mut d = self.proto.poll_timeout()?;
        if self.live && Self::sending(ex) {
            match &self.role {
                RoleState::Driver(dr) if ex.plan.rate > 0.0 => d = d.min(dr.next_gps),
                RoleState::Passenger(p) if ex.plan.order_rate > 0.0 => d = d.min(p.next_order),
                _ => {}
            }
        }
        Some(d)
    }

    fn on_drop(&mut self, ex: &Exec, storm: bool) {
        // A drop on purpose: the TCP connection goes, the session stays held.
        if self.live {
            ex.stats().c.drops_caused.fetch_add(1, Relaxed);
        }
        // Counted by the storm when picked, so it must report back when its session is up.
        self.storm_victim |= storm;
    }

    fn on_stop(&mut self, ex: &Exec, now: Instant, buf: &mut Vec<u8>) {
        if self.live {
            self.step(ex, buf, |app, out| {
                let _ = app.proto.logout(now, "loadgen done", out);
            });
        }
    }

    /// Counts how the connection ended, tells the machine, and says when to connect again.
    fn on_ended(&mut self, ex: &Exec, how: Ended, now: Instant) -> Option<Duration> {
        let c = &ex.stats().c;
        match how {
            Ended::ConnectFailed => {
                c.err_connect.fetch_add(1, Relaxed);
            }
            Ended::WriteFailed => {
                if self.got_bytes {
                    c.err_write.fetch_add(1, Relaxed);
                } else {
                    c.err_connect.fetch_add(1, Relaxed);
                }
            }
            Ended::Closed => {
                if self.live {
                    c.drops_seen.fetch_add(1, Relaxed);
                } else if !self.got_bytes {
                    c.err_connect.fetch_add(1, Relaxed);
                }
            }
            // Counted where they were decided.
            Ended::ByClient | Ended::Dropped | Ended::Stop => {}
        }
        let had_session = self.live;
        if self.live {
            self.live = false;
            ex.stats().g.live.fetch_sub(1, Relaxed);
            if how != Ended::Stop {
                self.down_since = Some(now);
            }
        }
        let lost = match how {
            Ended::ConnectFailed | Ended::WriteFailed | Ended::Closed => Lost::Remote,
            Ended::ByClient | Ended::Dropped | Ended::Stop => Lost::Local,
        };
        let d = self.proto.on_disconnected(lost);
        c.requests_cut.fetch_add(u64::from(d.requests_cut), Relaxed);
        self.gate = self.next_gate(ex, had_session);
        match (how, d.reconnect) {
            (Ended::Stop, _) | (_, Reconnect::Never) => None,
            (_, Reconnect::After(wait)) => Some(wait),
        }
    }
}

/// Where `addr` is in `gates`, if it is there.
fn node_index(gates: &[std::net::SocketAddr], addr: Option<std::net::SocketAddr>) -> Option<u16> {
    let addr = addr?;
    // At most MAX_NODES nodes (validated), so the index fits.
    gates.iter().position(|g| *g == addr).map(|i| i as u16)
}
