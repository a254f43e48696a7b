//! Properties of the app machine ([`client::proto::app::AppProto`]) driven against the gate's
//! own logic shard, with no sockets and a virtual clock: a small in-test "gate" turns the
//! machine's Login, Resume, PushAck and Keepalive frames into `logic::Input`s and the shard's
//! outputs back into frames (Session answers with real resume tokens, PushDelivery with the
//! redelivery flag on replays, ResumeRefused errors). Random sequences of pushes, connection
//! drops (with or without the bytes in flight), partial deliveries, time passing holds and
//! TTLs, refused resumes, go-aways and overloaded gates must keep these true:
//!
//! - every push the gate got an ack for, on the connection holding the session, before its
//!   deadline plus the grace ended Delivered, and every push ends with exactly one receipt;
//! - the app shows a push only before its deadline, each message id at most once, and every
//!   push that ended Delivered exactly once; it acks every push it gets, but one that came at
//!   or after its deadline and was never shown;
//! - a connection starts with a Resume carrying the token of the last Session the app got, or a
//!   Login when it has none; after a ResumeRefused the next frame is a Login;
//! - the app never reconnects sooner than a retry-after it was given, reconnects at once after a
//!   live session dropped, and is live again once the network heals.

use client::proto::app::{AppProto, Close, Config, Event, Lost, Out, Reconnect};
use logic::gps::Forward;
use logic::push::{outcome, ACK_GRACE_MS};
use logic::{CloseReason, ConnRef, Input, Output, PushContent, Shard, ShardConfig};
use proptest::prelude::*;
use schema::token::{self, Claims, ResumeClaims};
use schema::wire::{self, ErrorCode, GoAwayReason};
use schema::{Body, Cmd, Decoded, Encoder, FrameType, Frames, Limits, FLAG_REDELIVERY};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"proto-app-prop-secret";
const UID: u64 = 7;
const HOLD_MS: u64 = 2_000;
const HEARTBEAT_MS: u32 = 2_000;
const MAX_TTL_MS: u32 = 5_000;
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Sequence-ids above this are the unknown pushes' (the shard's own stay far below).
const UNKNOWN_SEQ: u32 = 1 << 30;
/// Virtual time the app gets to be live again once the network heals.
const HEAL_MS: u64 = 30_000;
/// The wall clock (ms since the Unix epoch) at virtual time 0, for both sides.
const WALL_BASE: u64 = 1_800_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    /// The app-server pushes to the app with this TTL.
    Push(u32),
    /// The network carries this share (of 8) of the bytes in flight each way.
    Net(u8, u8),
    /// The connection drops; `lose`: the bytes in flight are lost (the app's last acks, the
    /// gate's last pushes), else they arrive first.
    Drop { lose: bool },
    /// Time passes (the network carrying everything meanwhile).
    Advance(u32),
    /// The gate refuses the next Resume (a stale token, a gate that forgot).
    RefuseResume,
    /// The gate closes the connection with a GoAway.
    GoAway(u8, u32),
    /// The gate refuses the next connection for load.
    Overload(u32),
    /// A newer gate sends a push of a cmd this build does not know.
    UnknownPush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (500u32..=MAX_TTL_MS).prop_map(Op::Push),
        3 => (0u8..=8, 0u8..=8).prop_map(|(a, b)| Op::Net(a, b)),
        2 => any::<bool>().prop_map(|lose| Op::Drop { lose }),
        3 => (1u32..3_000).prop_map(Op::Advance),
        1 => Just(Op::RefuseResume),
        1 => (0u8..3, 0u32..3_000).prop_map(|(r, ms)| Op::GoAway(r, ms)),
        1 => (0u32..3_000).prop_map(Op::Overload),
        1 => Just(Op::UnknownPush),
    ]
}

/// One push, as the test saw it.
#[derive(Debug, Default)]
struct Rec {
    /// Accepted by the shard at.
    at_ms: u64,
    /// Its TTL.
    ttl_ms: u32,
    /// When the gate first fed the shard an ack for it on the connection holding the session,
    /// before its deadline plus the grace.
    acked_ms: Option<u64>,
    /// Receipts (outcome values).
    receipts: Vec<u8>,
    /// Times the app showed it.
    shown: u32,
}

/// What the first frame on a new connection must be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Resume(Vec<u8>),
    Login,
    Checked,
}

/// The one TCP connection between app and gate.
struct Link {
    conn: ConnRef,
    /// App bytes in flight.
    to_gate: Vec<u8>,
    /// Gate bytes in flight.
    to_app: Vec<u8>,
    /// App bytes the gate has and has not parsed (part of a frame).
    gate_in: Vec<u8>,
    /// A session is on this connection at the gate.
    attached: bool,
    /// The gate closes the connection once `to_app` is delivered, and reads nothing more.
    closing: Option<CloseReason>,
    /// The first frame's rule.
    expect: Expect,
    /// The gate refused a resume: the next frame must be a Login.
    login_next: bool,
    /// Token of the last Session the gate wrote here.
    last_token: Option<Vec<u8>>,
    /// Gate bytes the app has, as the test reads them (to know which pushes it got).
    app_in: Vec<u8>,
    /// Pushes the app got and has not acked yet: (sequence-id, message id).
    acks_due: Vec<(u32, u64)>,
}

struct H {
    now_ms: u64,
    base: Instant,
    shard: Shard,
    genc: Encoder,
    app: AppProto,
    aenc: Encoder,
    aout: Vec<u8>,
    link: Option<Link>,
    /// The app's side of the link is up.
    app_up: bool,
    /// While the app is down: when it may connect (None: never).
    retry_at: Option<u64>,
    /// Token of the last Session the app took.
    app_token: Option<Vec<u8>>,
    refuse_next_resume: bool,
    overload_next: Option<u32>,
    /// The next connect must not come before this (a retry-after the app was given), nor much
    /// after the second value.
    not_before: Option<(u64, u64)>,
    pushes: BTreeMap<u64, Rec>,
    next_mid: u64,
    /// Sequence-id → message id of the current session's deliveries.
    seq_mid: HashMap<u32, u64>,
    /// Sequence-ids of the pushes of an unknown cmd sent, and how many of them were acked.
    unknown_pushes: (u32, u32),
    gen: u32,
    /// The app's session is up on the current link.
    live: bool,
    /// Sessions that came up, and of those by resume.
    ups: u32,
    resumes: u32,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl H {
    fn new(seed: u64) -> H {
        let base = Instant::now();
        let cfg = Config {
            dedup_capacity: 1024,
            session_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: BACKOFF_MAX,
            read_chunk: 64,
            ..Config::default()
        };
        let mut app = AppProto::new(cfg, seed, base);
        app.set_wall_clock(base, WALL_BASE);
        H {
            now_ms: 0,
            base,
            shard: Shard::new(ShardConfig {
                id: 0,
                gps_flush_ms: 100,
                gps_forward: Forward::Latest,
                gps_max_buffered: 1000,
                push_queue_len: 1024,
                max_pending_requests: 16,
                request_timeout_ms: 1_000,
                hold_ms: HOLD_MS,
                max_held: 16,
                push_queue_bytes: 1 << 24,
                clustered: false,
                geo_index: true,
            }),
            genc: Encoder::new(),
            app,
            aenc: Encoder::new(),
            aout: Vec::new(),
            link: None,
            app_up: false,
            retry_at: Some(0),
            app_token: None,
            refuse_next_resume: false,
            overload_next: None,
            not_before: None,
            pushes: BTreeMap::new(),
            next_mid: 1,
            seq_mid: HashMap::new(),
            unknown_pushes: (0, 0),
            gen: 0,
            live: false,
            ups: 0,
            resumes: 0,
        }
    }

    fn t(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    // ---- the app side ----

    /// Handles every event of the machine; its frames go on the link.
    fn app_pump(&mut self) {
        let now = self.t();
        let mut closed = false;
        let mut out = Out::new(&mut self.aenc, &mut self.aout);
        while let Some(ev) = self.app.poll_event(now, &mut out) {
            match ev {
                Event::LoginNeeded { resume_refused } => {
                    if resume_refused {
                        self.app_token = None;
                    }
                    let claims = Claims { uid: UID, role: 1, expires_ms: u64::MAX / 2 };
                    let t = token::issue(SECRET, claims);
                    self.app.login(now, &t, "prop", &mut out).expect("a token was asked for");
                }
                Event::SessionUp { resumed, .. } => {
                    let link = self.link.as_ref().expect("a session needs a link");
                    self.app_token = link.last_token.clone().filter(|t| !t.is_empty());
                    self.live = true;
                    self.ups += 1;
                    self.resumes += u32::from(resumed);
                }
                Event::Push { delivery, .. } => {
                    let rec = self.pushes.get_mut(&delivery.message_id).expect("a pushed id");
                    let due = rec.at_ms + u64::from(rec.ttl_ms);
                    assert_eq!(delivery.deadline_ms, WALL_BASE + due, "the body tells the deadline");
                    assert!(
                        self.now_ms < due,
                        "push {} shown at {}, due {due}",
                        delivery.message_id,
                        self.now_ms
                    );
                    rec.shown += 1;
                }
                Event::Repeat { message_id, .. } => {
                    assert!(self.pushes[&message_id].shown > 0, "a repeat of {message_id}, never shown");
                }
                Event::Close(close) => {
                    let (ra, floor) = match close {
                        Close::GoAway { retry_after_ms, .. } => (retry_after_ms, true),
                        Close::Error { error, .. } => {
                            (error.retry_after_ms, error.code == ErrorCode::Overloaded)
                        }
                        other => panic!("the gate never makes the app close like this: {other:?}"),
                    };
                    if floor {
                        let ra = u64::from(ra);
                        // The wait: the retry-after, its spread, and failures' backoff at most.
                        let late = ra + ra / 4 + ms(BACKOFF_MAX) + 1;
                        self.not_before = Some((self.now_ms + ra, self.now_ms + late));
                    }
                    closed = true;
                    break;
                }
                other => panic!("nothing else is expected here: {other:?}"),
            }
        }
        if let Some(link) = self.link.as_mut().filter(|_| self.app_up) {
            for item in Frames::new(&self.aout, Limits::APP) {
                if let Ok(Decoded::Frame(f)) = item {
                    if let Body::PushAck(a) = f.body {
                        let due = (f.header.seq, a.message_id());
                        let i = link.acks_due.iter().position(|d| *d == due);
                        assert!(i.is_some(), "an ack {due:?} for no push the app got");
                        link.acks_due.remove(i.unwrap_or(0));
                    }
                }
            }
            link.to_gate.append(&mut self.aout);
        }
        self.aout.clear();
        if closed {
            self.app_close(Lost::Local);
            self.teardown();
        }
    }

    /// The app's side of the connection ends.
    fn app_close(&mut self, how: Lost) {
        if !std::mem::take(&mut self.app_up) {
            return;
        }
        let was_live = std::mem::take(&mut self.live);
        let d = self.app.on_disconnected(how);
        self.retry_at = match d.reconnect {
            Reconnect::After(w) => {
                if was_live && how == Lost::Remote {
                    assert_eq!(w, Duration::ZERO, "a live session that dropped comes back at once");
                }
                Some(self.now_ms + ms(w))
            }
            Reconnect::Never => None,
        };
    }

    fn connect(&mut self) {
        if let Some((early, late)) = self.not_before.take() {
            assert!(
                self.now_ms >= early,
                "reconnected at {} before the retry-after ending {early}",
                self.now_ms
            );
            assert!(self.now_ms <= late, "reconnected at {}, long after {late}", self.now_ms);
        }
        self.gen += 1;
        let expect = match &self.app_token {
            Some(t) => Expect::Resume(t.clone()),
            None => Expect::Login,
        };
        let mut link = Link {
            conn: ConnRef { shard: 0, slot: 1, gen: self.gen },
            to_gate: Vec::new(),
            to_app: Vec::new(),
            gate_in: Vec::new(),
            attached: false,
            closing: None,
            expect,
            login_next: false,
            last_token: None,
            app_in: Vec::new(),
            acks_due: Vec::new(),
        };
        if let Some(ra) = self.overload_next.take() {
            self.genc.error(&mut link.to_app, 0, 1, ErrorCode::Overloaded, wire::Hop::Gate, 0, "busy", ra);
            link.closing = Some(CloseReason::Dropped);
        }
        self.link = Some(link);
        self.app_up = true;
        self.retry_at = None;
        let now = self.t();
        let mut out = Out::new(&mut self.aenc, &mut self.aout);
        self.app.on_connected(now, &mut out).expect("never displaced here");
        self.app_pump();
    }

    // ---- the gate side ----

    /// The gate reads `n` bytes the app sent.
    fn gate_recv(&mut self, n: usize) {
        let Some(link) = self.link.as_mut() else { return };
        let n = n.min(link.to_gate.len());
        let bytes: Vec<u8> = link.to_gate.drain(..n).collect();
        if link.closing.is_some() {
            return;
        }
        link.gate_in.extend_from_slice(&bytes);
        let input = std::mem::take(&mut link.gate_in);
        let mut frames = Frames::new(&input, Limits::APP);
        let mut parsed = Vec::new();
        for item in frames.by_ref() {
            match item {
                Ok(Decoded::Frame(f)) => {
                    parsed.push((f.cmd, f.ty, f.header.seq, f.header.log_id, detail(&f.body)))
                }
                other => panic!("the app sent something the gate cannot read: {other:?}"),
            }
        }
        let rest = frames.rest().to_vec();
        self.link.as_mut().expect("link").gate_in = rest;
        for (cmd, ty, seq, log_id, d) in parsed {
            if self.link.as_ref().is_none_or(|l| l.closing.is_some()) {
                break;
            }
            self.gate_frame(cmd, ty, seq, log_id, d);
        }
    }

    fn gate_frame(&mut self, cmd: Cmd, ty: FrameType, seq: u32, log_id: u64, d: Detail) {
        let now = self.now_ms;
        let link = self.link.as_mut().expect("link");
        let conn = link.conn;
        match std::mem::replace(&mut link.expect, Expect::Checked) {
            Expect::Resume(t) => {
                assert_eq!(
                    (cmd, &d),
                    (Cmd::Resume, &Detail::Token(t)),
                    "a connection starts with the latest token"
                )
            }
            Expect::Login => assert_eq!(cmd, Cmd::Login, "with no token a connection starts with a Login"),
            Expect::Checked => {}
        }
        if std::mem::take(&mut link.login_next) {
            assert_eq!(cmd, Cmd::Login, "a refused resume is followed by a Login");
        }
        let mut outs = Vec::new();
        match (cmd, ty, d) {
            (Cmd::Login, FrameType::Request, Detail::Token(t)) => {
                let c = token::verify(SECRET, &t, 0).expect("the app's token verifies");
                self.shard.handle(
                    Input::Login {
                        uid: c.uid,
                        role: c.role,
                        conn,
                        log_id,
                        seq,
                        wall_ms: now,
                        resume_secret: None,
                    },
                    now,
                    &mut outs,
                );
            }
            (Cmd::Resume, FrameType::Request, Detail::Token(t)) => {
                if std::mem::take(&mut self.refuse_next_resume) {
                    link.login_next = true;
                    self.genc.error(
                        &mut link.to_app,
                        seq,
                        log_id,
                        ErrorCode::ResumeRefused,
                        wire::Hop::Gate,
                        Cmd::Resume as u16,
                        "stale",
                        0,
                    );
                } else {
                    let c = token::verify_resume(SECRET, &t).expect("the app returns the token unchanged");
                    let input = Input::Resume {
                        uid: c.uid,
                        epoch: c.epoch,
                        resumes: Some(c.resumes),
                        conn,
                        log_id,
                        seq,
                        resume_secret: None,
                    };
                    self.shard.handle(input, now, &mut outs);
                }
            }
            (Cmd::PushAck, FrameType::Ack, Detail::Ack(0)) if seq > UNKNOWN_SEQ => {
                assert!(seq <= UNKNOWN_SEQ + self.unknown_pushes.0, "an ack of a push never sent");
                self.unknown_pushes.1 += 1;
            }
            (Cmd::PushAck, FrameType::Ack, Detail::Ack(mid)) => {
                let attached = self
                    .shard
                    .directory
                    .get(UID)
                    .is_some_and(|e| e.conn == conn && e.held_until_ms.is_none());
                if attached {
                    assert_eq!(self.seq_mid.get(&seq), Some(&mid), "an ack names its delivery's message id");
                    let rec = self.pushes.get_mut(&mid).expect("a pushed id");
                    if now < rec.at_ms + u64::from(rec.ttl_ms) + ACK_GRACE_MS && rec.acked_ms.is_none() {
                        rec.acked_ms = Some(now);
                    }
                }
                let ack = Input::PushAck { uid: UID, conn, seq, message_id: mid, log_id, read_us: 0 };
                self.shard.handle(ack, now, &mut outs);
            }
            (Cmd::Keepalive, FrameType::Request, Detail::Keepalive(ts)) => {
                assert!(link.attached, "keepalives come from live sessions");
                self.genc.keepalive(&mut link.to_app, FrameType::Response, seq, log_id, ts);
            }
            other => panic!("the app sent {other:?}"),
        }
        self.gate_outputs(outs);
    }

    fn gate_outputs(&mut self, outs: Vec<Output>) {
        for o in outs {
            let link = self.link.as_mut().filter(|l| l.closing.is_none());
            match o {
                Output::LoginOk { conn, uid, epoch, log_id, seq, .. } => {
                    let link = link.filter(|l| l.conn == conn).expect("the login's connection");
                    link.attached = true;
                    self.seq_mid.clear();
                    let t = token::issue_resume(SECRET, ResumeClaims { uid, epoch, resumes: 0 });
                    session(&mut self.genc, link, Cmd::Login, seq, log_id, &t, epoch);
                }
                Output::ResumeOk { conn, uid, epoch, resumes, log_id, seq, .. } => {
                    let link = link.filter(|l| l.conn == conn).expect("the resume's connection");
                    link.attached = true;
                    let t = token::issue_resume(SECRET, ResumeClaims { uid, epoch, resumes });
                    session(&mut self.genc, link, Cmd::Resume, seq, log_id, &t, epoch);
                }
                Output::ResumeRefused { conn, log_id, seq, .. } => {
                    let link = link.filter(|l| l.conn == conn).expect("the resume's connection");
                    link.login_next = true;
                    let (to, code) = (&mut link.to_app, ErrorCode::ResumeRefused);
                    self.genc.error(to, seq, log_id, code, wire::Hop::Logic, Cmd::Resume as u16, "gone", 0);
                }
                Output::Deliver { conn, seq, push, redelivery } => {
                    self.seq_mid.insert(seq, push.message_id);
                    if let Some(link) = link.filter(|l| l.conn == conn) {
                        let start = link.to_app.len();
                        let (ty, cmd) = (FrameType::Push, Cmd::PushDelivery);
                        schema::write_frame(&mut link.to_app, ty, cmd, seq, push.log_id, &push.body);
                        if redelivery {
                            link.to_app[start + 3] |= FLAG_REDELIVERY;
                        }
                    }
                }
                Output::Receipt(r) => {
                    self.pushes.get_mut(&r.message_id).expect("a pushed id").receipts.push(r.outcome)
                }
                // The held session an app's new login replaced: its connection is long gone.
                Output::Displaced { conn, .. } => assert!(link.is_none_or(|l| l.conn != conn)),
                Output::Unreachable { .. } => {}
                other => panic!("the shard said {other:?}"),
            }
        }
    }

    /// The connection ends at both sides; the gate's side holds the session.
    fn teardown(&mut self) {
        self.app_close(Lost::Remote);
        if let Some(link) = self.link.take() {
            if link.attached {
                let reason = link.closing.unwrap_or(CloseReason::Dropped);
                let mut outs = Vec::new();
                self.shard.handle(
                    Input::Closed { uid: UID, conn: link.conn, reason },
                    self.now_ms,
                    &mut outs,
                );
                self.gate_outputs(outs);
            }
        }
    }

    // ---- the network and time ----

    /// The app reads `n` bytes the gate sent.
    fn app_recv(&mut self, n: usize) {
        let Some(link) = self.link.as_mut().filter(|_| self.app_up) else { return };
        let n = n.min(link.to_app.len());
        let bytes: Vec<u8> = link.to_app.drain(..n).collect();
        // Every push (and push of a cmd the app does not know) it gets must be acked at once,
        // but one that came at or after its deadline and was never shown.
        link.app_in.extend_from_slice(&bytes);
        let mut frames = Frames::new(&link.app_in, Limits::APP);
        for item in frames.by_ref() {
            match item {
                Ok(Decoded::Frame(f)) => {
                    if let Body::PushDelivery(d) = f.body {
                        let rec = &self.pushes[&d.message_id()];
                        if self.now_ms < rec.at_ms + u64::from(rec.ttl_ms) || rec.shown > 0 {
                            link.acks_due.push((f.header.seq, d.message_id()));
                        }
                    }
                }
                Ok(Decoded::Rejected { header, .. }) if header.ty == FrameType::Push as u8 => {
                    link.acks_due.push((header.seq, 0));
                }
                other => panic!("the gate wrote {other:?}"),
            }
        }
        let used = frames.consumed();
        link.app_in.drain(..used);
        // Through the zero-copy path, in reads of whatever size the buffer offers.
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let buf = self.app.read_buf();
            let k = buf.len().min(rest.len());
            buf[..k].copy_from_slice(&rest[..k]);
            self.app.read_done(k);
            rest = &rest[k..];
            self.app_pump();
            if !self.app_up {
                return;
            }
        }
        self.app_pump();
        if let Some(link) = self.link.as_ref().filter(|_| self.app_up) {
            assert!(link.acks_due.is_empty(), "pushes the app got and did not ack: {:?}", link.acks_due);
        }
        // A gate that closes does so once its last bytes are out.
        if self.link.as_ref().is_some_and(|l| l.closing.is_some() && l.to_app.is_empty()) {
            self.teardown();
        }
    }

    /// Carries `a`/8 of the app's bytes and `g`/8 of the gate's.
    fn net(&mut self, a: u8, g: u8) {
        let Some(link) = self.link.as_ref() else { return };
        let (na, ng) = (link.to_gate.len() * usize::from(a) / 8, link.to_app.len() * usize::from(g) / 8);
        self.gate_recv(na);
        self.app_recv(ng);
    }

    /// Carries everything until nothing is in flight.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let Some(link) = self.link.as_ref() else { return };
            if link.to_gate.is_empty() && link.to_app.is_empty() {
                if link.closing.is_some() {
                    self.teardown();
                }
                return;
            }
            self.gate_recv(usize::MAX);
            self.app_recv(usize::MAX);
        }
        panic!("the network never settled");
    }

    /// Time passes to `target`, everything due on the way happening at its moment.
    fn advance_to(&mut self, target: u64) {
        for _ in 0..100_000 {
            self.settle();
            let mut next = target;
            if let Some(t) = self.app.poll_timeout() {
                next = next.min(ms(t.saturating_duration_since(self.base)));
            }
            if !self.app_up {
                if let Some(r) = self.retry_at {
                    next = next.min(r);
                }
            }
            if let Some(d) = self.shard.next_deadline_ms() {
                next = next.min(d);
            }
            self.now_ms = self.now_ms.max(next);
            let mut outs = Vec::new();
            self.shard.tick(self.now_ms, &mut outs);
            self.gate_outputs(outs);
            let now = self.t();
            let mut out = Out::new(&mut self.aenc, &mut self.aout);
            self.app.handle_timeout(now, &mut out);
            self.app_pump();
            if !self.app_up && self.retry_at.is_some_and(|r| r <= self.now_ms) {
                self.connect();
            }
            if self.now_ms >= target && self.app.poll_timeout().is_none_or(|t| t > self.t()) {
                self.settle();
                return;
            }
        }
        panic!("time did not move");
    }

    fn push(&mut self, ttl_ms: u32) {
        let message_id = self.next_mid;
        self.next_mid += 1;
        let mut enc = Encoder::new();
        let body = enc
            .body(|b| {
                let payload = b.create_vector(&message_id.to_le_bytes());
                let args = wire::PushDeliveryArgs {
                    message_id,
                    payload: Some(payload),
                    sent_at_us: 1,
                    kind: 1,
                    deadline_ms: WALL_BASE + self.now_ms + u64::from(ttl_ms),
                };
                wire::PushDelivery::create(b, &args)
            })
            .to_vec();
        let push = Arc::new(PushContent {
            message_id,
            body: Arc::from(body),
            log_id: message_id,
            deadline_ms: self.now_ms + u64::from(ttl_ms),
            origin: logic::LOCAL,
            accepted_us: 0,
        });
        self.pushes.insert(message_id, Rec { at_ms: self.now_ms, ttl_ms, ..Rec::default() });
        let mut outs = Vec::new();
        self.shard.handle(Input::Push { push, uids: vec![UID] }, self.now_ms, &mut outs);
        self.gate_outputs(outs);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Push(ttl) => self.push(ttl),
            Op::Net(a, g) => self.net(a, g),
            Op::Drop { lose } => {
                if !lose {
                    self.settle();
                }
                self.teardown();
            }
            Op::Advance(d) => self.advance_to(self.now_ms + u64::from(d)),
            Op::RefuseResume => self.refuse_next_resume = true,
            Op::GoAway(r, retry_after_ms) => {
                let Some(link) = self.link.as_mut().filter(|l| l.closing.is_none()) else { return };
                let (reason, close) = match r {
                    0 => (GoAwayReason::IdleTimeout, CloseReason::Dropped),
                    1 => (GoAwayReason::Overloaded, CloseReason::Dropped),
                    _ => (GoAwayReason::Shutdown, CloseReason::Shutdown),
                };
                self.genc.go_away(&mut link.to_app, 1, reason, "bye", "", retry_after_ms);
                link.closing = Some(close);
            }
            Op::Overload(ms) => self.overload_next = Some(ms),
            Op::UnknownPush => {
                let Some(link) = self.link.as_mut().filter(|l| l.closing.is_none()) else { return };
                self.unknown_pushes.0 += 1;
                let seq = UNKNOWN_SEQ + self.unknown_pushes.0;
                let ty = FrameType::Push as u8;
                client::write_raw_frame(&mut link.to_app, ty, 0x00EE, seq, 1, b"new").expect("small frame");
            }
        }
    }
}

/// What the gate needs of an app frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Detail {
    Token(Vec<u8>),
    Ack(u64),
    Keepalive(u64),
    Other,
}

fn detail(b: &Body<'_>) -> Detail {
    match b {
        Body::Login(l) => Detail::Token(l.token().map(|t| t.bytes().to_vec()).unwrap_or_default()),
        Body::Resume(r) => Detail::Token(r.resume_token().map(|t| t.bytes().to_vec()).unwrap_or_default()),
        Body::PushAck(a) => Detail::Ack(a.message_id()),
        Body::Keepalive(k) => Detail::Keepalive(k.ts_ms()),
        _ => Detail::Other,
    }
}

/// Writes a Session answer with resume token `t` on `link`.
fn session(enc: &mut Encoder, link: &mut Link, cmd: Cmd, seq: u32, log_id: u64, t: &[u8], epoch: u64) {
    enc.frame(&mut link.to_app, FrameType::Response, cmd, seq, log_id, |b| {
        let resume_token = b.create_vector(t);
        let node = b.create_string("127.0.0.1:7100");
        wire::Session::create(
            b,
            &wire::SessionArgs {
                uid: UID,
                role: wire::Role::Driver,
                heartbeat_ms: HEARTBEAT_MS,
                idle_timeout_ms: 3 * HEARTBEAT_MS,
                session_epoch: epoch,
                resume_token: Some(resume_token),
                node: Some(node),
                hold_ms: HOLD_MS as u32,
            },
        )
    });
    link.last_token = Some(t.to_vec());
}

fn run(seed: u64, ops: &[Op]) -> H {
    let mut h = H::new(seed);
    h.advance_to(0);
    for op in ops {
        h.apply(op);
    }
    // The network heals: the app is live again, and every push ends.
    h.refuse_next_resume = false;
    h.overload_next = None;
    h.settle();
    let healed = h.now_ms;
    while !h.live {
        assert!(h.now_ms < healed + HEAL_MS, "the app is not live {HEAL_MS} ms after the network healed");
        h.advance_to(h.now_ms + 100);
    }
    // A push to the live session, over a healthy network, is delivered and shown.
    let last = h.next_mid;
    h.push(MAX_TTL_MS);
    h.advance_to(h.now_ms + u64::from(MAX_TTL_MS) + HOLD_MS + 1_000);
    assert!(h.live, "a healthy network kept the session");
    let r = &h.pushes[&last];
    assert_eq!((r.receipts.as_slice(), r.shown), (&[outcome::DELIVERED][..], 1), "the last push: {r:?}");
    h
}

fn check(h: &H) {
    for (mid, r) in &h.pushes {
        assert_eq!(r.receipts.len(), 1, "push {mid}: receipts {:?}", r.receipts);
        if r.acked_ms.is_some() {
            assert_eq!(r.receipts, vec![outcome::DELIVERED], "push {mid} was acked in time: {r:?}");
        }
        assert!(r.shown <= 1, "push {mid} shown {} times", r.shown);
        if r.receipts == [outcome::DELIVERED] {
            assert_eq!(r.shown, 1, "push {mid} was delivered: {r:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn pushes_end_once_show_once_and_sessions_come_back(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        check(&run(seed, &ops));
    }
}

#[test]
fn a_drop_resumes_and_redelivers_what_was_lost_in_flight() {
    let h = run(
        1,
        &[
            Op::Push(5_000),
            Op::Net(8, 8),
            Op::Push(5_000),
            Op::Net(0, 4),
            Op::Drop { lose: true },
            Op::Advance(100),
            Op::Push(5_000),
        ],
    );
    check(&h);
    assert!(h.pushes.values().all(|r| r.receipts == [outcome::DELIVERED] && r.shown == 1), "{:?}", h.pushes);
    assert_eq!((h.ups, h.resumes), (2, 1));
}

#[test]
fn a_refused_resume_logs_in_and_an_overloaded_gate_is_waited_for() {
    let h = run(
        2,
        &[
            Op::Push(5_000),
            Op::Net(8, 8),
            Op::RefuseResume,
            Op::Overload(1_500),
            Op::Drop { lose: true },
            Op::Advance(3_000),
            Op::GoAway(0, 700),
            Op::Advance(1_000),
        ],
    );
    check(&h);
    // Login, then (after the overloaded attempt) a refused resume and a login, then a resume
    // after the go-away.
    assert_eq!((h.ups, h.resumes), (3, 1));
}
