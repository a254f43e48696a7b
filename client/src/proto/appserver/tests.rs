//! The machine's rules, without sockets and without waiting: a scripted fake gate for each rule,
//! and a property test that drives a model gate through random interleavings.

use super::*;
use crate::frame::OwnedFrame;
use proptest::prelude::*;
use schema::wire::{GpsPoint, Receipt, Role};
use std::collections::BTreeMap;

const SECRET: &[u8] = b"dev-secret";
const T: Duration = Duration::from_secs(5);
/// The incarnation the fake gate announces unless a test says otherwise.
const INCARNATION: u64 = 0x1AC4_0000_0000_0007;
/// What the fake gate's receipts batches carry as log-id.
const BATCH_LOG: u64 = 0x5EC;
/// The `sent_at_us` the tests push with.
const SENT_AT: u64 = 1_700_000_000_000_000;

/// The gate's side of a session, frame by frame, with a clock that moves only when told.
struct Fake {
    /// The machine.
    s: Session,
    /// Its clock.
    now: Instant,
    /// Builds the gate's frames.
    enc: Encoder,
    /// Frames the machine wrote, per connection, not read yet.
    sent: BTreeMap<ConnId, VecDeque<OwnedFrame>>,
    /// Events polled, not looked at yet.
    events: VecDeque<Event>,
    /// Actions polled, not looked at yet.
    actions: VecDeque<Action>,
}

impl Fake {
    fn new(reconnect_within: Duration) -> Fake {
        let config =
            Config { secret: SECRET.to_vec(), name: "dispatch-1".to_owned(), timeout: T, reconnect_within };
        Fake {
            s: Session::new(config, 7),
            now: Instant::now(),
            enc: Encoder::new(),
            sent: BTreeMap::new(),
            events: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// Takes everything the machine has for the owner: events first (which releases acks),
    /// then the bytes it wrote, then its actions.
    fn pump(&mut self) {
        while let Some(ev) = self.s.poll_event() {
            self.events.push_back(ev);
        }
        for conn in self.s.transmits() {
            let mut out = Vec::new();
            assert!(self.s.transmit(conn, &mut out));
            let frames = self.sent.entry(conn).or_default();
            let mut pos = 0;
            while let Some((d, n)) =
                decode(&out[pos..], &Limits::SIDECAR).expect("the machine frames its output")
            {
                let Decoded::Frame(f) = d else {
                    panic!("the machine wrote a frame that does not verify: {d:?}")
                };
                frames.push_back(OwnedFrame::from_frame(&f));
                pos += n;
            }
            assert_eq!(pos, out.len(), "the machine writes whole frames");
        }
        while let Some(a) = self.s.poll_action() {
            self.actions.push_back(a);
        }
    }

    fn input(&mut self, conn: ConnId, bytes: &[u8]) {
        self.s.handle_input(conn, bytes, self.now);
        self.pump();
    }

    /// Sends the frames `build` writes on `conn`.
    fn send(&mut self, conn: ConnId, build: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
        let mut out = Vec::new();
        build(&mut self.enc, &mut out);
        self.input(conn, &out);
    }

    fn read(&mut self, conn: ConnId) -> OwnedFrame {
        self.sent.get_mut(&conn).and_then(VecDeque::pop_front).expect("a frame from the machine")
    }

    fn nothing_sent(&self, conn: ConnId) -> bool {
        self.sent.get(&conn).is_none_or(VecDeque::is_empty)
    }

    fn next(&mut self) -> Event {
        self.events.pop_front().expect("an event")
    }

    fn action(&mut self) -> Action {
        self.actions.pop_front().expect("an action")
    }

    /// Moves the clock to `now + d`, handling each deadline at its time.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(t) = self.s.poll_timeout().filter(|&t| t <= target) {
            self.now = self.now.max(t);
            self.s.handle_timeout(self.now);
            self.pump();
        }
        self.now = target;
    }

    /// Reads the hello on `conn` and answers it with a Welcome.
    fn welcome(&mut self, conn: ConnId, incarnation: u64, max_body: u32) {
        let hello = self.read(conn);
        assert_eq!((hello.cmd, hello.ty, hello.seq()), (Cmd::AppServerHello, FrameType::Request, 1));
        let Body::AppServerHello(h) = hello.body() else { panic!("not a hello body") };
        assert_eq!((h.name(), h.secret().map(|s| s.bytes())), (Some("dispatch-1"), Some(SECRET)));
        self.send(conn, |e, o| {
            e.frame(o, FrameType::Response, Cmd::AppServerHello, 1, 0, |b| {
                let node = b.create_string("127.0.0.1:7100");
                wire::AppServerWelcome::create(
                    b,
                    &wire::AppServerWelcomeArgs {
                        node: Some(node),
                        max_body,
                        max_targets: 50_000,
                        incarnation,
                    },
                )
            })
        });
    }

    /// A new handle that says hello to a gate of `incarnation`.
    fn open_as(
        &mut self,
        incarnation: u64,
        max_body: u32,
    ) -> (HandleId, ConnId, Result<Welcome, ClientError>) {
        let (h, conn) = self.s.open().expect("open");
        assert!(self.s.dialed(conn, self.now));
        self.pump();
        self.welcome(conn, incarnation, max_body);
        let outcome = self.s.take_opened(h).expect("the hello ended");
        (h, conn, outcome)
    }

    fn open(&mut self) -> (HandleId, ConnId) {
        let (h, conn, outcome) = self.open_as(INCARNATION, 8 << 20);
        outcome.expect("welcomed");
        (h, conn)
    }

    /// Answers the machine's Connect action with an open connection and a Welcome.
    fn reconnect(&mut self, incarnation: u64) -> ConnId {
        let Action::Connect { conn, .. } = self.action() else { panic!("expected a connect") };
        assert!(self.s.dialed(conn, self.now));
        self.pump();
        self.welcome(conn, incarnation, 8 << 20);
        conn
    }

    fn push(&mut self, h: HandleId, p: &PushSpec) -> Result<u32, ClientError> {
        let conn = self.s.handle_conn(h).expect("an open handle");
        let r = self.s.push(conn, p, SENT_AT, self.now);
        self.pump();
        r
    }

    /// Reads a Push request: the frame, its message_id and uids.
    fn read_push(&mut self, conn: ConnId) -> (OwnedFrame, u64, Vec<u64>) {
        let f = self.read(conn);
        assert_eq!((f.cmd, f.ty), (Cmd::Push, FrameType::Request), "{f:?}");
        let Body::Push(p) = f.body() else { panic!("not a Push body") };
        let uids = p.uids().map(|u| u.iter().collect()).unwrap_or_default();
        let message_id = p.message_id();
        (f, message_id, uids)
    }

    fn accept(&mut self, conn: ConnId, req: &OwnedFrame, message_id: u64, targets: u32) {
        let (seq, log) = (req.seq(), req.log_id());
        self.send(conn, |e, o| {
            e.frame(o, FrameType::Response, Cmd::Push, seq, log, |b| {
                wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id, targets })
            })
        });
    }

    fn refuse(&mut self, conn: ConnId, req: &OwnedFrame, code: ErrorCode, message: &str) {
        let (seq, log) = (req.seq(), req.log_id());
        self.send(conn, |e, o| e.error(o, seq, log, code, Hop::App, Cmd::Push as u16, message, 0));
    }

    fn receipts(&mut self, conn: ConnId, seq: u32, batch_id: u64, rs: &[(u64, u64, Outcome)]) {
        let rs: Vec<Receipt> = rs.iter().map(|&(m, u, o)| Receipt::new(m, u, o.0, 0, 0, 0)).collect();
        self.send(conn, |e, o| {
            e.frame(o, FrameType::Push, Cmd::Receipts, seq, BATCH_LOG, |b| {
                let receipts = b.create_vector(&rs);
                wire::Receipts::create(b, &wire::ReceiptsArgs { batch_id, receipts: Some(receipts) })
            })
        });
    }

    /// Reads the ack of a receipts batch: same seq and log-id, its batch_id.
    fn expect_ack(&mut self, conn: ConnId, seq: u32, batch_id: u64) {
        let ack = self.read(conn);
        assert_eq!(
            (ack.cmd, ack.ty, ack.seq(), ack.log_id()),
            (Cmd::ReceiptsAck, FrameType::Ack, seq, BATCH_LOG)
        );
        assert!(matches!(ack.body(), Body::ReceiptsAck(a) if a.batch_id() == batch_id), "{ack:?}");
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream(
        &mut self,
        conn: ConnId,
        seq: u32,
        log_id: u64,
        request_id: u64,
        uid: u64,
        role: Role,
        cmd: u16,
        body: &[u8],
    ) {
        self.send(conn, |e, o| {
            e.frame(o, FrameType::Request, Cmd::Upstream, seq, log_id, |b| {
                let body = b.create_vector(body);
                wire::Upstream::create(
                    b,
                    &wire::UpstreamArgs { request_id, uid, role, cmd, body: Some(body) },
                )
            })
        });
    }

    /// Reads an Upstream Response: same seq and log-id; returns (request_id, code, message,
    /// payload).
    fn expect_reply(&mut self, conn: ConnId, seq: u32, log_id: u64) -> (u64, u16, String, Vec<u8>) {
        let f = self.read(conn);
        assert_eq!((f.cmd, f.ty, f.seq(), f.log_id()), (Cmd::Upstream, FrameType::Response, seq, log_id));
        let Body::UpstreamReply(u) = f.body() else { panic!("not an UpstreamReply: {f:?}") };
        let r = u.reply().expect("a Reply table");
        let payload = r.payload().map(|p| p.bytes().to_vec()).unwrap_or_default();
        (u.request_id(), r.code(), r.message().unwrap_or("").to_owned(), payload)
    }

    fn gps(&mut self, conn: ConnId, points: &[UidGpsPoint]) {
        self.send(conn, |e, o| {
            e.frame(o, FrameType::Event, Cmd::GpsForward, 0, 0, |b| {
                let points = b.create_vector(points);
                wire::GpsForward::create(b, &wire::GpsForwardArgs { points: Some(points) })
            })
        });
    }
}

/// What a session keeps, counted (tests only).
#[derive(Debug, Default, PartialEq, Eq)]
struct Sizes {
    /// Pending pairs.
    pending: usize,
    /// Pushes with pending pairs.
    pending_pushes: usize,
    /// Broadcast entries and their expiries.
    broadcasts: usize,
    /// Lost entries, their expiries and their weight.
    lost: usize,
    /// Pushes watched for being overdue.
    unconfirmed: usize,
    /// Pushes in flight over every connection.
    in_flight: usize,
    /// Upstream requests awaiting a reply, and their order.
    upstream: usize,
    /// Events, actions, held acks and hello outcomes not taken.
    queued: usize,
    /// Bytes buffered in and out.
    buffered: usize,
}

impl Session {
    /// The size of everything the session keeps, for tests of its bounds.
    fn sizes(&self) -> Sizes {
        let l = &self.ledger;
        Sizes {
            pending: l.pending_len,
            pending_pushes: l.pending.len(),
            broadcasts: l.broadcasts.len() + l.broadcast_expiry.len(),
            lost: l.lost.len() + l.lost_expiry.len() + l.lost_len,
            unconfirmed: l.unconfirmed.len(),
            in_flight: self.conns.values().filter_map(Conn::up).map(|u| u.in_flight.len()).sum(),
            upstream: self
                .conns
                .values()
                .filter_map(Conn::up)
                .map(|u| u.upstream.by_seq.len() + u.upstream.order.len())
                .sum(),
            queued: self.events.len() + self.actions.len() + self.held_acks.len() + self.opened.len(),
            buffered: self.conns.values().map(|c| c.inbox.len() + c.outbox.len()).sum(),
        }
    }
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

fn broadcast(message_id: u64, role: Role) -> PushSpec {
    PushSpec { broadcast: role.0, ..spec(message_id, &[]) }
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

/// EndSession: the request carries uid and message; its answer (found and where, or an error)
/// is matched by sequence-id, once, beside pushes that share the sequence space; one whose
/// connection ends first gets a lost answer.
#[test]
fn end_session_answers_match_their_requests() {
    let mut f = Fake::new(Duration::ZERO);
    let (h, conn) = f.open();
    let seq = f.s.end_session(conn, 42, "banned", 0x77).expect("queued");
    f.pump();
    let req = f.read(conn);
    assert_eq!((req.cmd, req.ty, req.seq(), req.log_id()), (Cmd::EndSession, FrameType::Request, seq, 0x77));
    let Body::EndSession(e) = req.body() else { panic!("not an EndSession body") };
    assert_eq!((e.uid(), e.message()), (42, Some("banned")));
    let pseq = f.push(h, &spec(1, &[5])).expect("push");
    assert_ne!(pseq, seq, "a push takes another sequence-id");
    let answer = |e: &mut Encoder, o: &mut Vec<u8>| {
        e.frame(o, FrameType::Response, Cmd::EndSession, seq, 0x77, |b| {
            let node = b.create_string("gate-b");
            wire::SessionEnded::create(b, &wire::SessionEndedArgs { uid: 42, found: true, node: Some(node) })
        })
    };
    f.send(conn, answer);
    let ended = SessionEnd { uid: 42, found: true, node: "gate-b".into() };
    assert_eq!(f.s.poll_end_answer(), Some((conn, seq, Ok(ended))));
    f.send(conn, answer);
    assert_eq!(f.s.poll_end_answer(), None, "a repeated answer matches nothing");

    let seq = f.s.end_session(conn, 43, "", 0).expect("queued");
    f.pump();
    let _ = f.read(conn);
    f.send(conn, |e, o| {
        e.error(o, seq, 0, ErrorCode::Overloaded, Hop::Directory, Cmd::EndSession as u16, "redis down", 1_000)
    });
    match f.s.poll_end_answer() {
        Some((c, s, Err(i))) if (c, s) == (conn, seq) => {
            assert!(i.refused && i.code == ErrorCode::Overloaded && i.retry_after_ms == 1_000, "{i:?}")
        }
        other => panic!("{other:?}"),
    }

    let seq = f.s.end_session(conn, 44, "", 0).expect("queued");
    f.pump();
    f.s.connection_lost(conn, f.now);
    f.pump();
    match f.s.poll_end_answer() {
        Some((c, s, Err(i))) if (c, s) == (conn, seq) => assert!(i.answer_lost(), "{i:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(f.s.end_session(conn, 45, "", 0), Err(ClientError::Closed)));
}

#[test]
fn a_wrong_secret_is_refused_with_bad_secret_and_the_group_ends() {
    let mut f = Fake::new(T);
    let (h, conn) = f.s.open().expect("open");
    assert!(f.s.dialed(conn, f.now));
    f.pump();
    let hello = f.read(conn);
    f.send(conn, |e, o| {
        e.error(
            o,
            hello.seq(),
            0,
            ErrorCode::BadSecret,
            Hop::App,
            Cmd::AppServerHello as u16,
            "bad secret",
            0,
        )
    });
    match f.s.take_opened(h) {
        Some(Err(ClientError::Server { code: ErrorCode::BadSecret, origin: Hop::App, .. })) => {}
        other => panic!("expected BadSecret, got {other:?}"),
    }
    assert_eq!(f.action(), Action::Close { conn });
    assert!(f.s.is_ended(), "a group whose only handle failed its hello ends");
    assert!(matches!(f.s.open(), Err(ClientError::Closed)));
}

#[test]
fn a_hello_without_answer_times_out_and_anything_else_first_is_unexpected() {
    let mut f = Fake::new(T);
    let (first, c1) = f.open();
    let (h, conn) = f.s.open().expect("open another");
    assert!(f.s.dialed(conn, f.now));
    f.pump();
    f.advance(T - Duration::from_millis(1));
    assert!(f.s.take_opened(h).is_none());
    f.advance(Duration::from_millis(1));
    assert!(matches!(f.s.take_opened(h), Some(Err(ClientError::Timeout))));
    assert_eq!(f.action(), Action::Close { conn });
    // Another handle whose first frame is not the hello's answer.
    let (h, conn) = f.s.open().expect("open a third");
    assert!(f.s.dialed(conn, f.now));
    f.pump();
    f.gps(conn, &[]);
    assert!(matches!(f.s.take_opened(h), Some(Err(ClientError::Unexpected(_)))));
    // Neither touched the group.
    assert!(f.s.is_up(c1) && f.s.handle_conn(first) == Some(c1) && f.events.is_empty());
}

#[test]
fn pushes_receipts_upstream_gps_and_gate_lost() {
    let mut f = Fake::new(Duration::from_millis(200));
    let (h, c) = f.open();

    // A push, accepted; its pairs are pending from the moment it is queued.
    let seq5 = f.push(h, &spec(5, &[42, 43, 44, 42])).expect("push 5");
    assert_eq!(f.s.pending_receipts(), 3, "duplicate uids count once");
    let (p, message_id, uids) = f.read_push(c);
    assert_eq!((p.seq(), message_id, uids.as_slice(), p.log_id()), (seq5, 5, &[42, 43, 44, 42][..], 0xF05));
    assert_eq!(seq5, 2, "pushes count up from the hello's sequence-id");
    let Body::Push(body) = p.body() else { panic!("not a Push") };
    assert_eq!(body.payload().map(|b| b.bytes()), Some(&b"order 77"[..]));
    assert_eq!(
        (body.ttl_ms(), body.broadcast(), body.kind(), body.sent_at_us()),
        (30_000, Role::Unknown, 1, SENT_AT)
    );
    f.accept(c, &p, 5, 3);
    assert_eq!(f.next(), Event::PushAnswer { conn: c, seq: seq5, message_id: 5, result: Ok(3) });

    // A batch, then the same batch again (as after a drop); both acked.
    let batch = [(5, 42, Outcome::Delivered), (5, 43, Outcome::Offline)];
    f.receipts(c, 3, 1, &batch);
    assert_eq!(f.next(), receipt(5, 42, Outcome::Delivered));
    assert_eq!(f.next(), receipt(5, 43, Outcome::Offline));
    f.expect_ack(c, 3, 1);
    f.receipts(c, 4, 1, &batch);
    assert!(f.events.is_empty(), "the resent batch adds nothing");
    f.expect_ack(c, 4, 1);
    assert_eq!((f.s.duplicate_receipts(), f.s.pending_receipts()), (2, 1));

    // An upstream request, answered once on the connection it came on.
    let place = Encoder::new()
        .body(|b| {
            let args = wire::PlaceOrderArgs {
                from_lat_e7: 1,
                from_lon_e7: 2,
                to_lat_e7: 3,
                to_lon_e7: 4,
                payload: None,
            };
            wire::PlaceOrder::create(b, &args)
        })
        .to_vec();
    f.upstream(c, 77, 0x9999, 9, 42, Role::Passenger, Cmd::PlaceOrder as u16, &place);
    let Event::Upstream(req) = f.next() else { panic!("expected the upstream request") };
    assert_eq!(
        (req.request_id, req.uid, req.role, req.app_cmd(), req.log_id, req.seq, req.conn),
        (9, 42, Role::Passenger.0, Some(Cmd::PlaceOrder), 0x9999, 77, c)
    );
    let Ok(Body::PlaceOrder(po)) = req.app_body() else { panic!("not a PlaceOrder body") };
    assert_eq!((po.from_lat_e7(), po.to_lon_e7()), (1, 4));
    f.s.reply(&req, 0, "ok", b"order 1").expect("reply");
    f.pump();
    assert_eq!(f.expect_reply(c, 77, 0x9999), (9, 0, "ok".to_owned(), b"order 1".to_vec()));
    assert!(matches!(f.s.reply(&req, 0, "again", b""), Err(ClientError::Unexpected(_))), "answered once");

    // One with a cmd this build does not know, answered with an error.
    f.upstream(c, 78, 0x9998, 10, 43, Role::Driver, 0x7777, &[]);
    let Event::Upstream(unknown) = f.next() else { panic!("expected the second request") };
    assert_eq!(unknown.app_cmd(), None);
    assert!(matches!(unknown.app_body(), Err(FrameError::UnknownCmd(0x7777))));
    f.s.reply_error(&unknown, ErrorCode::UnknownCmd, "no such request").expect("reply error");
    f.pump();
    let err = f.read(c);
    assert_eq!((err.cmd, err.ty, err.seq(), err.log_id()), (Cmd::Error, FrameType::Error, 78, 0x9998));
    let ev = err.error().expect("error view");
    assert_eq!(
        (ev.code, ev.origin, ev.failed_cmd, ev.message),
        (ErrorCode::UnknownCmd, Hop::AppServer, Cmd::Upstream as u16, "no such request")
    );

    // A refusal ends the push's pairs; a message id still pending is refused before sending.
    let seq6 = f.push(h, &spec(6, &[50, 51])).expect("push 6");
    let (p6, _, _) = f.read_push(c);
    f.refuse(c, &p6, ErrorCode::LimitExceeded, "too many targets");
    match f.next() {
        Event::PushAnswer { conn, seq, message_id: 6, result: Err(e) } => {
            assert_eq!((conn, seq), (c, seq6));
            assert_eq!(
                (e.code, e.origin, e.message.as_str(), e.log_id, e.refused, e.answer_lost()),
                (ErrorCode::LimitExceeded, Hop::App, "too many targets", 0xF06, true, false)
            );
        }
        other => panic!("expected push 6's refusal, got {other:?}"),
    }
    assert!(matches!(f.push(h, &spec(5, &[44])), Err(ClientError::Unexpected(_))));
    assert!(f.nothing_sent(c));
    assert_eq!((f.s.pending_receipts(), f.s.pushes_in_flight(c)), (1, 0));

    // GPS, an unreachable user, the last receipt of push 5 and one for a push never sent.
    f.gps(c, &[point(0), point(1)]);
    f.send(c, |e, o| {
        e.frame(o, FrameType::Event, Cmd::Unreachable, 0, 0, |b| {
            wire::Unreachable::create(b, &wire::UnreachableArgs { uid: 42, outcome: Outcome::HoldExpired })
        })
    });
    f.receipts(c, 5, 2, &[(5, 44, Outcome::TtlExpired), (99, 1, Outcome::Delivered), (5, 45, Outcome(200))]);
    assert_eq!(f.next(), Event::Gps(vec![point(0), point(1)]));
    assert_eq!(f.next(), Event::Unreachable { uid: 42, outcome: Outcome::HoldExpired });
    assert_eq!(f.next(), receipt(5, 44, Outcome::TtlExpired));
    f.expect_ack(c, 5, 2);
    assert_eq!((f.s.duplicate_receipts(), f.s.pending_receipts()), (4, 0));

    // A push whose first receipt beats its acceptance; then the gate goes away for good with its
    // second receipt still owed.
    let seq8 = f.push(h, &spec(8, &[60, 61])).expect("push 8");
    let (p8, _, _) = f.read_push(c);
    f.receipts(c, 6, 3, &[(8, 60, Outcome::Delivered)]);
    f.accept(c, &p8, 8, 2);
    assert_eq!(f.next(), receipt(8, 60, Outcome::Delivered));
    assert_eq!(f.next(), Event::PushAnswer { conn: c, seq: seq8, message_id: 8, result: Ok(2) });
    f.expect_ack(c, 6, 3);
    f.s.connection_lost(c, f.now);
    f.pump();
    assert_eq!(f.next(), Event::ConnectionLost { conn: c });
    assert!(f.s.is_reconnecting());
    // Every attempt fails until the bound.
    while !f.events.iter().any(|e| *e == Event::GateLost) {
        match f.actions.pop_front() {
            Some(Action::Connect { conn, timeout }) => {
                assert!(timeout <= Duration::from_millis(200));
                f.s.dial_failed(conn, ClientError::Closed, f.now);
                f.pump();
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => f.advance(Duration::from_millis(10)),
        }
    }
    assert_eq!(f.next(), receipt(8, 61, Outcome::GateLost));
    assert_eq!(f.next(), Event::GateLost);

    // The gate is lost: nothing can be sent, and the pairs are resolved.
    assert_eq!(f.s.pending_receipts(), 0);
    assert!(matches!(f.s.push(c, &spec(9, &[1]), SENT_AT, f.now), Err(ClientError::Closed)));
    assert!(matches!(f.s.reply(&unknown, 0, "late", b""), Err(ClientError::Closed)));
    // Closing the last handle ends the group.
    assert!(!f.s.is_ended());
    f.s.close(h, f.now);
    assert!(f.s.is_ended());
    assert!(matches!(f.s.open(), Err(ClientError::Closed)));
}

#[test]
fn connections_of_a_group_share_receipts_and_route_replies() {
    let mut f = Fake::new(Duration::ZERO);
    let (ha, a) = f.open();
    let (hb, b) = f.open();
    assert_ne!(a, b);
    f.push(ha, &spec(1, &[10, 11])).expect("push 1");
    let (p, _, _) = f.read_push(a);
    f.accept(a, &p, 1, 2);
    assert!(matches!(f.next(), Event::PushAnswer { result: Ok(2), .. }));
    // The receipt comes on the other connection; the batch is resent on the first. Each is acked
    // on the connection it came on.
    f.receipts(b, 1, 10, &[(1, 10, Outcome::Delivered)]);
    assert_eq!(f.next(), receipt(1, 10, Outcome::Delivered));
    f.expect_ack(b, 1, 10);
    f.receipts(a, 1, 10, &[(1, 10, Outcome::Delivered)]);
    f.expect_ack(a, 1, 10);
    assert!(f.events.is_empty());
    assert_eq!((f.s.duplicate_receipts(), f.s.pending_receipts()), (1, 1));
    // A request on b is answered on b, whichever handle the caller holds.
    f.upstream(b, 5, 0x55, 3, 7, Role::Driver, Cmd::GrabOrder as u16, &[]);
    let Event::Upstream(req) = f.next() else { panic!("expected the upstream request") };
    assert_eq!(req.conn, b);
    f.s.reply(&req, 0, "taken", b"").expect("reply");
    f.pump();
    assert!(f.nothing_sent(a));
    assert_eq!(f.expect_reply(b, 5, 0x55), (3, 0, "taken".to_owned(), Vec::new()));
    // b drops: a carries on; b's handle has no connection now.
    f.s.connection_lost(b, f.now);
    f.pump();
    assert_eq!(f.next(), Event::ConnectionLost { conn: b });
    assert!(f.events.is_empty() && !f.s.is_reconnecting());
    assert!(matches!(f.s.push(b, &spec(3, &[1]), SENT_AT, f.now), Err(ClientError::Closed)));
    assert_eq!(f.s.handle_conn(hb), Some(b), "a handle keeps its last connection's id");
    f.push(ha, &spec(2, &[20])).expect("push 2");
    let (p, _, _) = f.read_push(a);
    f.accept(a, &p, 2, 1);
    assert!(matches!(f.next(), Event::PushAnswer { result: Ok(1), .. }));
    // a drops too; with no reconnect configured the gate is lost at once.
    f.s.connection_lost(a, f.now);
    f.pump();
    assert_eq!(f.next(), Event::ConnectionLost { conn: a });
    assert_eq!(f.next(), receipt(1, 11, Outcome::GateLost));
    assert_eq!(f.next(), receipt(2, 20, Outcome::GateLost));
    assert_eq!(f.next(), Event::GateLost);
    assert!(f.events.is_empty() && f.actions.is_empty());
}

#[test]
fn oversized_pushes_stay_local_and_broadcast_receipts_come_once() {
    let mut f = Fake::new(T);
    let (h, c, w) = f.open_as(INCARNATION, 1024);
    assert_eq!(w.expect("welcomed").max_body, 1024);
    let mut big = spec(3, &[1]);
    big.payload = vec![0; 2048];
    assert!(matches!(f.push(h, &big), Err(ClientError::Unexpected(_))));
    assert!(f.nothing_sent(c));
    assert_eq!((f.s.pending_receipts(), f.s.pushes_in_flight(c)), (0, 0));
    f.push(h, &big).expect_err("still too big, and still not registered");

    f.push(h, &spec(1, &[1])).expect("push 1");
    let (p1, _, _) = f.read_push(c);
    // A broadcast: its receipts come for whoever was online, once each.
    f.push(h, &broadcast(2, Role::Driver)).expect("broadcast");
    let (p, _, uids) = f.read_push(c);
    assert!(uids.is_empty());
    assert!(matches!(p.body(), Body::Push(b) if b.broadcast() == Role::Driver));
    assert_eq!(f.s.pending_receipts(), 1, "a broadcast's targets are unknown");
    f.accept(c, &p, 2, 2);
    let batch = [(2, 70, Outcome::Delivered), (2, 71, Outcome::Offline)];
    f.receipts(c, 1, 1, &batch);
    f.receipts(c, 2, 1, &batch);
    assert!(matches!(f.next(), Event::PushAnswer { message_id: 2, result: Ok(2), .. }));
    assert_eq!(f.next(), receipt(2, 70, Outcome::Delivered));
    assert_eq!(f.next(), receipt(2, 71, Outcome::Offline));
    assert!(f.events.is_empty());
    f.expect_ack(c, 1, 1);
    f.expect_ack(c, 2, 1);
    assert_eq!(f.s.duplicate_receipts(), 2);
    assert!(
        matches!(f.push(h, &broadcast(2, Role::Driver)), Err(ClientError::Unexpected(_))),
        "a broadcast id is tracked too"
    );
    // An answer that does not verify fails the push without ending its pairs.
    let mut out = Vec::new();
    f.enc.frame(&mut out, FrameType::Response, Cmd::Push, p1.seq(), 0, |b| {
        wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id: 1, targets: 1 })
    });
    out.truncate(HEADER_LEN + 4);
    out[12..16].copy_from_slice(&4u32.to_le_bytes());
    f.input(c, &out);
    match f.next() {
        Event::PushAnswer { message_id: 1, result: Err(e), .. } => {
            assert!(!e.refused && !e.answer_lost() && e.code == ErrorCode::CorruptBody, "{e:?}");
        }
        other => panic!("expected push 1's unusable answer, got {other:?}"),
    }
    assert_eq!(f.s.pending_receipts(), 1);
    // Closed by the caller: no reconnect. The broadcast owes nothing (both of its announced
    // targets' receipts came); push 1's receipt does.
    f.s.close(h, f.now);
    f.pump();
    assert_eq!(f.action(), Action::Close { conn: c });
    assert_eq!(f.next(), Event::ConnectionLost { conn: c });
    assert_eq!(f.next(), receipt(1, 1, Outcome::GateLost));
    assert_eq!(f.next(), Event::GateLost);
    assert!(f.events.is_empty() && f.s.is_ended());
}

#[test]
fn a_batch_is_acked_only_once_its_receipts_are_polled() {
    let mut f = Fake::new(T);
    let (h, c) = f.open();
    f.push(h, &spec(1, &[10, 11])).expect("push 1");
    let _ = f.read_push(c);
    let mut out = Vec::new();
    let rs = [
        Receipt::new(1, 10, Outcome::Delivered.0, 0, 0, 0),
        Receipt::new(1, 11, Outcome::Offline.0, 0, 0, 0),
    ];
    f.enc.frame(&mut out, FrameType::Push, Cmd::Receipts, 9, BATCH_LOG, |b| {
        let receipts = b.create_vector(&rs);
        wire::Receipts::create(b, &wire::ReceiptsArgs { batch_id: 77, receipts: Some(receipts) })
    });
    // Split at every offset: framing is the machine's.
    let (head, tail) = out.split_at(13);
    f.s.handle_input(c, head, f.now);
    assert!(!f.s.has_events());
    f.s.handle_input(c, tail, f.now);
    assert!(f.s.transmits().is_empty(), "no ack before the caller has the receipts");
    assert_eq!(f.s.poll_event(), Some(receipt(1, 10, Outcome::Delivered)));
    assert!(f.s.transmits().is_empty());
    assert_eq!(f.s.poll_event(), Some(receipt(1, 11, Outcome::Offline)));
    assert_eq!(f.s.transmits(), vec![c]);
    f.pump();
    f.expect_ack(c, 9, 77);
    // A batch of repeats only (and an empty one) is acked at once.
    f.receipts(c, 10, 77, &[(1, 10, Outcome::Delivered)]);
    f.expect_ack(c, 10, 77);
    f.receipts(c, 11, 78, &[]);
    f.expect_ack(c, 11, 78);
}

#[test]
fn gate_requests_it_should_not_send_get_an_error() {
    let mut f = Fake::new(T);
    let (_, c) = f.open();
    // A known cmd the app-server does not serve.
    f.send(c, |e, o| {
        e.frame(o, FrameType::Request, Cmd::Push, 41, 0x41, |b| {
            wire::Push::create(b, &wire::PushArgs { message_id: 1, ..Default::default() })
        })
    });
    // An Upstream whose body does not verify, and a cmd this build does not know.
    let mut raw = Vec::new();
    raw.extend_from_slice(&Header::new(FrameType::Request, Cmd::Upstream as u16, 42, 0x42, 4).to_bytes());
    raw.extend_from_slice(&[0xFF; 4]);
    raw.extend_from_slice(&Header::new(FrameType::Request, 0x7FFF, 43, 0x43, 0).to_bytes());
    f.input(c, &raw);
    for (seq, cmd, code) in [
        (41, Cmd::Push as u16, ErrorCode::NotAllowed),
        (42, Cmd::Upstream as u16, ErrorCode::CorruptBody),
        (43, 0x7FFF, ErrorCode::UnknownCmd),
    ] {
        let err = f.read(c);
        assert_eq!(
            (err.cmd, err.seq(), err.log_id()),
            (Cmd::Error, seq, u64::from(seq / 10 * 16 + seq % 10))
        );
        let ev = err.error().expect("an error");
        assert_eq!((ev.code, ev.origin, ev.failed_cmd), (code, Hop::AppServer, cmd));
    }
    assert!(f.events.is_empty());
    // Lost framing closes the connection.
    f.input(c, &[0x00; 24]);
    assert_eq!(f.action(), Action::Close { conn: c });
    assert_eq!(f.next(), Event::ConnectionLost { conn: c });
}

#[test]
fn a_reconnect_to_the_same_gate_keeps_pairs_pending_until_their_receipts() {
    let mut f = Fake::new(T);
    let (h, first) = f.open();
    let (h2, other) = f.open();
    f.push(h, &spec(1, &[10, 11])).expect("push 1");
    let (p, _, _) = f.read_push(first);
    f.accept(first, &p, 1, 2);
    f.receipts(first, 2, 41, &[(1, 10, Outcome::Delivered)]);
    assert!(matches!(f.next(), Event::PushAnswer { result: Ok(2), .. }));
    assert_eq!(f.next(), receipt(1, 10, Outcome::Delivered));
    // Both connections break, the first before its ack was written.
    f.sent.clear();
    f.s.connection_lost(other, f.now);
    f.s.connection_lost(first, f.now);
    f.pump();
    assert_eq!(f.next(), Event::ConnectionLost { conn: other });
    assert_eq!(f.next(), Event::ConnectionLost { conn: first });
    assert!(f.s.is_reconnecting() && f.actions.is_empty());
    assert!(matches!(f.s.open(), Err(ClientError::Closed)), "no new handle while reconnecting");
    // The first attempt after a jittered 25 ms fails; the next after a jittered 50 ms.
    let wait = f.s.poll_timeout().expect("the first attempt") - f.now;
    assert!(wait >= Duration::from_micros(12_500) && wait < Duration::from_micros(37_500), "{wait:?}");
    f.advance(wait);
    let Action::Connect { conn, timeout } = f.action() else { panic!("a connect") };
    assert_eq!(timeout, T - wait, "an attempt ends by the bound");
    f.s.dial_failed(conn, ClientError::Closed, f.now);
    f.pump();
    let wait = f.s.poll_timeout().expect("the second attempt") - f.now;
    assert!(wait >= Duration::from_millis(25) && wait < Duration::from_millis(75), "{wait:?}");
    f.advance(wait);
    // The same process: the handle whose connection was lost first gets the new one.
    let second = f.reconnect(INCARNATION);
    assert_eq!(f.next(), Event::Reconnected { conn: second, incarnation: INCARNATION });
    assert_eq!(f.s.handle_conn(h), Some(second));
    assert_eq!(f.s.pending_receipts(), 1);
    // The other handle gets one attempt of its own.
    let third = f.reconnect(INCARNATION);
    assert_eq!(f.next(), Event::Reconnected { conn: third, incarnation: INCARNATION });
    assert_eq!(f.s.handle_conn(h2), Some(third));
    // The gate resends the unacked batch with the receipt it kept; the repeat is dropped.
    f.receipts(third, 1, 41, &[(1, 10, Outcome::Delivered), (1, 11, Outcome::TtlExpired)]);
    assert_eq!(f.next(), receipt(1, 11, Outcome::TtlExpired));
    f.expect_ack(third, 1, 41);
    assert_eq!((f.s.duplicate_receipts(), f.s.late_receipts(), f.s.pending_receipts()), (1, 0, 0));
    f.push(h, &spec(2, &[12])).expect("push 2 after the reconnect");
    let (p, message_id, _) = f.read_push(second);
    assert_eq!(message_id, 2);
    f.accept(second, &p, 2, 1);
    assert!(matches!(f.next(), Event::PushAnswer { result: Ok(1), .. }));
    f.s.close(h2, f.now);
    f.s.close(h, f.now);
    f.pump();
    assert_eq!(f.next(), Event::ConnectionLost { conn: third });
    assert_eq!(f.next(), Event::ConnectionLost { conn: second });
    assert_eq!(f.next(), receipt(2, 12, Outcome::GateLost));
    assert_eq!(f.next(), Event::GateLost);
    assert!(f.s.is_ended());
}

#[test]
fn a_restarted_gate_ends_pending_pairs_and_owed_broadcasts_as_gate_lost_at_once() {
    let mut f = Fake::new(Duration::from_secs(30));
    let (h, c) = f.open();
    f.push(h, &spec(1, &[10, 11])).expect("push 1");
    let (p, _, _) = f.read_push(c);
    f.accept(c, &p, 1, 2);
    // A broadcast announced with 0 targets (a gate that does not count them): one receipt came,
    // more may be owed.
    f.push(h, &broadcast(2, Role::Driver)).expect("broadcast 2");
    let (p, _, _) = f.read_push(c);
    f.accept(c, &p, 2, 0);
    f.receipts(c, 1, 51, &[(2, 70, Outcome::Delivered)]);
    f.expect_ack(c, 1, 51);
    // A broadcast whose one announced target's receipt came: it owes nothing.
    f.push(h, &broadcast(3, Role::Driver)).expect("broadcast 3");
    let (p, _, _) = f.read_push(c);
    f.accept(c, &p, 3, 1);
    f.receipts(c, 2, 52, &[(3, 71, Outcome::Offline)]);
    f.expect_ack(c, 2, 52);
    // A broadcast never answered, and a push never answered: pending too.
    f.push(h, &broadcast(5, Role::Passenger)).expect("broadcast 5");
    let seq4 = f.push(h, &spec(4, &[12])).expect("push 4");
    f.events.clear();
    f.s.connection_lost(c, f.now);
    f.pump();
    assert!(matches!(f.next(), Event::PushAnswer { message_id: 5, .. }));
    assert_eq!(
        f.next(),
        Event::PushAnswer { conn: c, seq: seq4, message_id: 4, result: Err(ServerErrorInfo::lost()) }
    );
    assert_eq!(f.next(), Event::ConnectionLost { conn: c });
    f.advance(Duration::from_millis(40));
    // Another process answers on the same address: the client closes it.
    let again = f.reconnect(INCARNATION + 1);
    assert_eq!(f.action(), Action::Close { conn: again });
    assert_eq!(f.next(), receipt(1, 10, Outcome::GateLost));
    assert_eq!(f.next(), receipt(1, 11, Outcome::GateLost));
    assert_eq!(f.next(), receipt(4, 12, Outcome::GateLost));
    assert_eq!(f.next(), receipt(2, 0, Outcome::GateLost), "the broadcast still owed receipts");
    assert_eq!(f.next(), receipt(5, 0, Outcome::GateLost), "the broadcast never answered");
    assert_eq!(f.next(), Event::GateLost);
    assert!(f.events.is_empty());
    assert_eq!(f.s.pending_receipts(), 0);
    // The group may be reopened to the new process; lost message ids are not reused.
    let (h2, c2, w) = f.open_as(INCARNATION + 1, 8 << 20);
    assert_eq!(w.expect("reopened").incarnation, INCARNATION + 1);
    assert!(matches!(f.push(h2, &spec(1, &[10])), Err(ClientError::Unexpected(_))));
    assert!(f.nothing_sent(c2));
    // A third process answering while the group has a connection is refused.
    let (_, _, refused) = f.open_as(INCARNATION + 2, 8 << 20);
    assert!(matches!(refused, Err(ClientError::Unexpected(_))), "{refused:?}");
}

#[test]
fn the_reconnect_gives_up_at_its_bound_and_an_incarnation_of_zero_never_matches() {
    let bound = Duration::from_millis(1500);
    let mut f = Fake::new(bound);
    let (h, c) = f.open();
    f.push(h, &spec(1, &[10])).expect("push");
    let lost_at = f.now;
    f.s.connection_lost(c, f.now);
    f.pump();
    // Every dial is refused: attempts follow each other with a growing backoff, and each one's
    // connect ends by the bound at the latest.
    let mut attempts = 0;
    while !f.events.contains(&Event::GateLost) {
        while let Some(a) = f.actions.pop_front() {
            if let Action::Connect { conn, timeout } = a {
                attempts += 1;
                // Asked for within the last step of the clock.
                assert!(f.now - Duration::from_millis(1) + timeout <= lost_at + bound);
                f.s.dial_failed(conn, ClientError::Closed, f.now);
            }
        }
        f.advance(Duration::from_millis(1));
    }
    assert_eq!(f.now - lost_at, bound, "declared lost at the bound, not before");
    assert!((3..=MAX_RECONNECT_ATTEMPTS).contains(&attempts), "{attempts} attempts");
    assert!(f.events.contains(&receipt(1, 10, Outcome::GateLost)));

    // A gate without an incarnation: a reconnect can never tell it is the same process.
    let mut f = Fake::new(bound);
    let (h, c, w) = f.open_as(0, 8 << 20);
    assert_eq!(w.expect("welcomed").incarnation, 0);
    f.push(h, &spec(1, &[10])).expect("push");
    f.s.connection_lost(c, f.now);
    f.pump();
    f.advance(Duration::from_millis(40));
    let again = f.reconnect(0);
    assert_eq!(f.action(), Action::Close { conn: again });
    assert!(f.events.contains(&Event::GateLost));
}

#[test]
fn receipts_for_pairs_reported_gate_lost_are_late_and_not_emitted() {
    let mut f = Fake::new(Duration::ZERO);
    let (h, c) = f.open();
    f.push(h, &spec(1, &[10, 11])).expect("push 1");
    f.push(h, &broadcast(2, Role::Passenger)).expect("broadcast 2");
    let (p1, _, _) = f.read_push(c);
    let (p2, _, _) = f.read_push(c);
    f.accept(c, &p1, 1, 2);
    f.accept(c, &p2, 2, 0);
    f.receipts(c, 1, 61, &[(1, 10, Outcome::Delivered), (2, 70, Outcome::Delivered)]);
    f.events.clear();
    // No reconnect at all: the first drop is GateLost at once.
    f.s.connection_lost(c, f.now);
    f.pump();
    assert_eq!(f.next(), Event::ConnectionLost { conn: c });
    assert_eq!(f.next(), receipt(1, 11, Outcome::GateLost));
    assert_eq!(f.next(), receipt(2, 0, Outcome::GateLost));
    assert_eq!(f.next(), Event::GateLost);
    // The caller reopens the group to the same process; the gate sends what it kept: receipts
    // for pairs already reported lost, and repeats. Nothing is emitted; all is acked.
    let (_, c2, w) = f.open_as(INCARNATION, 8 << 20);
    assert_eq!(w.expect("reopened").incarnation, INCARNATION);
    let late = [
        (1, 10, Outcome::Delivered),
        (1, 11, Outcome::Delivered),
        (2, 70, Outcome::Delivered),
        (2, 71, Outcome::Offline),
        (2, 72, Outcome::Delivered),
    ];
    f.receipts(c2, 1, 62, &late);
    f.expect_ack(c2, 1, 62);
    assert!(f.events.is_empty());
    assert_eq!((f.s.late_receipts(), f.s.duplicate_receipts()), (3, 2));
    // Lost pairs are remembered for LOST_MEMORY, then forgotten.
    f.advance(LOST_MEMORY);
    f.s.handle_timeout(f.now);
    assert_eq!(f.s.sizes().lost, 0);
    f.receipts(c2, 2, 63, &late[1..2]);
    assert_eq!(f.s.late_receipts(), 3);
}

#[test]
fn a_push_the_gate_may_never_have_read_ends_gate_lost_once_overdue() {
    let mut f = Fake::new(T);
    let (h, c) = f.open();
    let mut short = spec(1, &[10]);
    short.ttl_ms = 100;
    let seq = f.push(h, &short).expect("push 1");
    let pushed = f.now;
    f.s.connection_lost(c, f.now);
    f.pump();
    match f.next() {
        Event::PushAnswer { conn, seq: s, message_id: 1, result: Err(e) } => {
            assert_eq!((conn, s), (c, seq));
            assert!(e.answer_lost() && !e.refused);
        }
        other => panic!("expected the lost answer, got {other:?}"),
    }
    assert_eq!(f.next(), Event::ConnectionLost { conn: c });
    // Reconnected to the same process 2 s later; it owes nothing for the push.
    f.advance(Duration::from_secs(2));
    let c2 = f.reconnect(INCARNATION);
    assert_eq!(f.next(), Event::Reconnected { conn: c2, incarnation: INCARNATION });
    let reconnected = f.now;
    assert_eq!(f.s.pending_receipts(), 1);
    // Due 1.1 s after the push; overdue 5 s after both that and the reconnect.
    assert_eq!(f.s.poll_timeout(), Some(reconnected + UNCONFIRMED_GRACE));
    assert!(pushed + Duration::from_millis(1100) + UNCONFIRMED_GRACE < reconnected + UNCONFIRMED_GRACE);
    f.advance(UNCONFIRMED_GRACE - Duration::from_millis(1));
    assert!(f.events.is_empty());
    f.advance(Duration::from_millis(1));
    assert_eq!(f.next(), receipt(1, 10, Outcome::GateLost));
    assert_eq!(f.s.pending_receipts(), 0);
    // The gate itself is fine: no Event::GateLost, and pushes go on.
    assert!(f.events.is_empty());
    f.push(h, &spec(2, &[11])).expect("push 2");
    assert_eq!(f.read_push(c2).1, 2);
}

#[test]
fn a_push_not_written_whole_is_forgotten() {
    let mut f = Fake::new(T);
    let (h, c) = f.open();
    let seq = f.push(h, &spec(1, &[10])).expect("push 1");
    f.s.push_unsent(c, seq, 1);
    assert_eq!((f.s.pending_receipts(), f.s.pushes_in_flight(c)), (0, 0));
    // Its id may be used again at once.
    f.sent.clear();
    f.push(h, &spec(1, &[10])).expect("push 1 again");
    assert_eq!(f.read_push(c).1, 1);
}

// --- Property test: random interleavings against a model gate -------------------------------

/// The uids online for broadcasts.
const ONLINE: [u64; 3] = [101, 102, 103];

/// One step of a random run.
#[derive(Debug, Clone)]
enum Op {
    /// The caller pushes on one of its handles (to `uids`, or a broadcast).
    Push { handle: usize, uids: Vec<u64>, broadcast: bool, ttl_s: u32 },
    /// The gate answers one push it read.
    Answer { pick: usize, accept: bool, announce: bool },
    /// The gate sends a batch of owed receipts on one connection, maybe with a repeat.
    Receipts { conn: usize, take: usize, repeat: bool },
    /// The gate resends an unacked batch on one connection.
    Resend { batch: usize, conn: usize },
    /// A connection drops; the gate took the pushes it had read but not answered, or they were
    /// still in the network.
    Drop { conn: usize, taken: bool },
    /// The gate process restarts: everything it owed is gone.
    Restart,
    /// The network to the gate breaks (dials fail) or heals.
    Partition(bool),
    /// Time passes.
    Advance { ms: u64 },
    /// The caller opens another connection.
    ConnectAnother,
    /// The caller closes a handle; the last one only if `last`.
    Close { handle: usize, last: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4usize, proptest::collection::vec(1..7u64, 0..4), proptest::bool::weighted(0.2), 1..6u32)
            .prop_map(|(handle, uids, broadcast, ttl_s)| Op::Push { handle, uids, broadcast, ttl_s }),
        5 => (0..8usize, proptest::bool::weighted(0.85), any::<bool>())
            .prop_map(|(pick, accept, announce)| Op::Answer { pick, accept, announce }),
        5 => (0..4usize, 1..5usize, any::<bool>()).prop_map(|(conn, take, repeat)| Op::Receipts { conn, take, repeat }),
        1 => (0..4usize, 0..4usize).prop_map(|(batch, conn)| Op::Resend { batch, conn }),
        2 => (0..4usize, any::<bool>()).prop_map(|(conn, taken)| Op::Drop { conn, taken }),
        1 => Just(Op::Restart),
        1 => any::<bool>().prop_map(Op::Partition),
        3 => (0..3_000u64).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::ConnectAnother),
        1 => (0..4usize, proptest::bool::weighted(0.05)).prop_map(|(handle, last)| Op::Close { handle, last }),
    ]
}

/// A push the gate read and has not answered.
#[derive(Debug, Clone)]
struct ReadPush {
    conn: ConnId,
    seq: u32,
    message_id: u64,
    uids: Vec<u64>,
    broadcast: bool,
}

/// The gate process and the network as the property test sees them, and what the caller heard.
struct Model {
    f: Fake,
    incarnation: u64,
    reachable: bool,
    /// Connections the gate has (welcomed, not ended).
    conns: BTreeSet<ConnId>,
    /// The caller's open handles.
    handles: Vec<HandleId>,
    unanswered: Vec<ReadPush>,
    /// Receipts owed and not sent in any batch yet.
    owed: BTreeMap<(u64, u64), Outcome>,
    /// Batches sent and not acked: batch_id -> receipts.
    unacked: BTreeMap<u64, Vec<(u64, u64, Outcome)>>,
    /// Deliveries of batches whose ack has not come: (conn, seq) -> batch_id.
    awaiting_ack: BTreeMap<(ConnId, u32), u64>,
    /// Receipts sent before, for repeats.
    sent_receipts: Vec<(u64, u64, Outcome)>,
    next_batch: u64,
    gate_seq: u32,
    next_message: u64,
    /// Pushes the caller made: message_id -> (uids, broadcast).
    pushed: BTreeMap<u64, (Vec<u64>, bool)>,
    /// Pushes the gate refused.
    refused: BTreeSet<u64>,
    /// Final outcomes heard, per pair (uid 0: a broadcast's GateLost).
    outcomes: BTreeMap<(u64, u64), Vec<Outcome>>,
    /// Receipts the gate sent for pairs already reported GateLost.
    late: u64,
}

impl Model {
    fn new(within: Duration) -> Model {
        let mut m = Model {
            f: Fake::new(within),
            incarnation: INCARNATION,
            reachable: true,
            conns: BTreeSet::new(),
            handles: Vec::new(),
            unanswered: Vec::new(),
            owed: BTreeMap::new(),
            unacked: BTreeMap::new(),
            awaiting_ack: BTreeMap::new(),
            sent_receipts: Vec::new(),
            next_batch: 0,
            gate_seq: 0,
            next_message: 0,
            pushed: BTreeMap::new(),
            refused: BTreeSet::new(),
            outcomes: BTreeMap::new(),
            late: 0,
        };
        m.connect_another();
        assert_eq!(m.handles.len(), 1);
        m
    }

    /// Lets everything queued happen: the gate reads what the machine wrote, answers hellos,
    /// opens or refuses the connections the machine asks for; the caller hears the events.
    fn settle(&mut self) {
        loop {
            self.f.pump();
            let mut busy = false;
            while let Some(ev) = self.f.events.pop_front() {
                self.heard(ev);
            }
            while let Some(a) = self.f.actions.pop_front() {
                busy = true;
                match a {
                    Action::Connect { conn, .. } if self.reachable => {
                        assert!(self.f.s.dialed(conn, self.f.now));
                    }
                    Action::Connect { conn, .. } => {
                        self.f.s.dial_failed(conn, ClientError::Closed, self.f.now)
                    }
                    Action::Close { conn } => self.gate_loses(conn, true),
                }
            }
            let frames: Vec<(ConnId, OwnedFrame)> = std::mem::take(&mut self.f.sent)
                .into_iter()
                .flat_map(|(c, fs)| fs.into_iter().map(move |f| (c, f)))
                .collect();
            for (conn, frame) in frames {
                busy = true;
                self.gate_reads(conn, &frame);
            }
            if !busy {
                return;
            }
        }
    }

    /// The gate reads one frame from the machine.
    fn gate_reads(&mut self, conn: ConnId, f: &OwnedFrame) {
        match (f.cmd, f.body()) {
            (Cmd::AppServerHello, _) => {
                let incarnation = self.incarnation;
                let mut out = Vec::new();
                self.f.enc.frame(&mut out, FrameType::Response, Cmd::AppServerHello, 1, 0, |b| {
                    wire::AppServerWelcome::create(
                        b,
                        &wire::AppServerWelcomeArgs {
                            node: None,
                            max_body: 0,
                            max_targets: 50_000,
                            incarnation,
                        },
                    )
                });
                self.conns.insert(conn);
                self.f.s.handle_input(conn, &out, self.f.now);
            }
            (Cmd::Push, Body::Push(p)) => {
                assert!(self.conns.contains(&conn), "a push on a connection the gate does not have");
                self.unanswered.push(ReadPush {
                    conn,
                    seq: f.seq(),
                    message_id: p.message_id(),
                    uids: p.uids().map(|u| u.iter().collect()).unwrap_or_default(),
                    broadcast: p.broadcast() != Role::Unknown,
                });
            }
            (Cmd::ReceiptsAck, Body::ReceiptsAck(a)) => {
                let batch = self.awaiting_ack.remove(&(conn, f.seq()));
                assert_eq!(batch, Some(a.batch_id()), "an ack for a delivery that awaits one");
                self.unacked.remove(&a.batch_id());
            }
            other => panic!("the machine sent {other:?}"),
        }
    }

    /// What the caller hears, checked as it comes.
    fn heard(&mut self, ev: Event) {
        match ev {
            Event::Receipt { message_id, uid, outcome } => {
                let (uids, broadcast) =
                    self.pushed.get(&message_id).cloned().expect("a receipt for a push made");
                assert!(!self.refused.contains(&message_id), "a receipt for a refused push");
                if broadcast {
                    assert!(uid == 0 || ONLINE.contains(&uid));
                    assert!(uid != 0 || outcome == Outcome::GateLost);
                    assert!(
                        !self.outcomes.contains_key(&(message_id, 0)),
                        "a receipt for broadcast {message_id} after its GateLost"
                    );
                } else {
                    assert!(uids.contains(&uid), "a receipt for a uid not pushed to");
                }
                let seen = self.outcomes.entry((message_id, uid)).or_default();
                seen.push(outcome);
                assert_eq!(seen.len(), 1, "({message_id}, {uid}) ended twice: {seen:?}");
            }
            Event::PushAnswer { message_id, result: Err(e), .. } if e.refused => {
                self.refused.insert(message_id);
            }
            _ => {}
        }
    }

    /// The gate loses `conn`; the pushes it had read but not answered were taken (it owes their
    /// receipts) or not.
    fn gate_loses(&mut self, conn: ConnId, taken: bool) {
        if !self.conns.remove(&conn) {
            return;
        }
        let (gone, kept): (Vec<ReadPush>, Vec<ReadPush>) =
            self.unanswered.drain(..).partition(|p| p.conn == conn);
        self.unanswered = kept;
        if taken {
            for p in gone {
                self.owe(&p);
            }
        }
        self.awaiting_ack.retain(|&(c, _), _| c != conn);
    }

    /// The gate accepted `p`: it owes one receipt per target.
    fn owe(&mut self, p: &ReadPush) -> u32 {
        let targets: BTreeSet<u64> =
            if p.broadcast { ONLINE.into_iter().collect() } else { p.uids.iter().copied().collect() };
        for &uid in &targets {
            self.owed.insert(
                (p.message_id, uid),
                if uid % 2 == 0 { Outcome::Delivered } else { Outcome::Offline },
            );
        }
        targets.len() as u32
    }

    fn gate_conn(&self, pick: usize) -> Option<ConnId> {
        (!self.conns.is_empty()).then(|| *self.conns.iter().nth(pick % self.conns.len()).expect("in range"))
    }

    /// The gate sends a batch (new or resent) on `conn`.
    fn deliver(&mut self, conn: ConnId, batch_id: u64, rs: Vec<(u64, u64, Outcome)>) {
        for &(m, u, _) in &rs {
            let lost = |k| self.outcomes.get(&k).is_some_and(|o| o[..] == [Outcome::GateLost]);
            if lost((m, u)) || (lost((m, 0)) && !self.outcomes.contains_key(&(m, u))) {
                self.late += 1;
            }
        }
        self.gate_seq = self.gate_seq.wrapping_add(1).max(1);
        let seq = self.gate_seq;
        self.awaiting_ack.insert((conn, seq), batch_id);
        self.f.receipts(conn, seq, batch_id, &rs);
        self.sent_receipts.extend(rs.iter().copied());
        self.unacked.insert(batch_id, rs);
        self.settle();
        if self.f.s.is_up(conn) {
            assert!(!self.awaiting_ack.contains_key(&(conn, seq)), "batch {batch_id} was not acked");
        }
    }

    fn connect_another(&mut self) {
        let Ok((h, conn)) = self.f.s.open() else { return };
        if self.reachable {
            assert!(self.f.s.dialed(conn, self.f.now));
        } else {
            self.f.s.dial_failed(conn, ClientError::Closed, self.f.now);
        }
        self.settle();
        if let Some(Ok(_)) = self.f.s.take_opened(h) {
            self.handles.push(h);
        }
    }

    /// Moves the clock by `d`, handling each deadline at its time.
    fn advance(&mut self, d: Duration) {
        let target = self.f.now + d;
        while let Some(t) = self.f.s.poll_timeout().filter(|&t| t <= target) {
            self.f.now = self.f.now.max(t);
            self.f.s.handle_timeout(self.f.now);
            self.settle();
        }
        self.f.now = target;
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Push { handle, uids, broadcast, ttl_s } => {
                if self.conns.is_empty() && !self.f.s.is_reconnecting() {
                    // A caller whose group lost its gate reopens it before pushing.
                    self.connect_another();
                }
                let Some(&h) = self.handles.get(handle % self.handles.len().max(1)) else { return };
                let Some(conn) = self.f.s.handle_conn(h) else { return };
                self.next_message += 1;
                let message_id = self.next_message;
                let p = PushSpec {
                    message_id,
                    uids: if broadcast { Vec::new() } else { uids.clone() },
                    ttl_ms: ttl_s * 1000,
                    broadcast: if broadcast { Role::Driver.0 } else { 0 },
                    ..PushSpec::default()
                };
                let up = self.f.s.is_up(conn);
                match self.f.s.push(conn, &p, SENT_AT, self.f.now) {
                    Ok(_) => {
                        assert!(up);
                        self.pushed.insert(message_id, (uids, broadcast));
                    }
                    Err(e) => assert!(!up && matches!(e, ClientError::Closed), "{e:?}"),
                }
            }
            Op::Answer { pick, accept, announce } => {
                if self.unanswered.is_empty() {
                    return;
                }
                let p = self.unanswered.remove(pick % self.unanswered.len());
                let mut out = Vec::new();
                if accept {
                    let targets = self.owe(&p);
                    let targets = if p.broadcast && !announce { 0 } else { targets };
                    self.f.enc.frame(&mut out, FrameType::Response, Cmd::Push, p.seq, 0, |b| {
                        let args = wire::PushAcceptedArgs { message_id: p.message_id, targets };
                        wire::PushAccepted::create(b, &args)
                    });
                } else {
                    let code = ErrorCode::LimitExceeded;
                    self.f.enc.error(&mut out, p.seq, 0, code, Hop::App, Cmd::Push as u16, "no", 0);
                }
                self.f.s.handle_input(p.conn, &out, self.f.now);
            }
            Op::Receipts { conn, take, repeat } => {
                let Some(conn) = self.gate_conn(conn) else { return };
                let keys: Vec<(u64, u64)> = self.owed.keys().take(take).copied().collect();
                let mut rs: Vec<(u64, u64, Outcome)> =
                    keys.iter().map(|k| (k.0, k.1, self.owed.remove(k).expect("owed"))).collect();
                if repeat {
                    rs.extend(self.sent_receipts.last().copied());
                }
                self.next_batch += 1;
                let batch_id = self.next_batch;
                self.deliver(conn, batch_id, rs);
            }
            Op::Resend { batch, conn } => {
                let Some(conn) = self.gate_conn(conn) else { return };
                let Some((&batch_id, rs)) = self.unacked.iter().nth(batch % self.unacked.len().max(1)) else {
                    return;
                };
                let rs = rs.clone();
                self.deliver(conn, batch_id, rs);
            }
            Op::Drop { conn, taken } => {
                let Some(conn) = self.gate_conn(conn) else { return };
                self.gate_loses(conn, taken);
                self.f.s.connection_lost(conn, self.f.now);
            }
            Op::Restart => {
                for conn in std::mem::take(&mut self.conns) {
                    self.f.s.connection_lost(conn, self.f.now);
                }
                self.unanswered.clear();
                self.owed.clear();
                self.unacked.clear();
                self.awaiting_ack.clear();
                self.incarnation += 1;
            }
            Op::Partition(broken) => self.reachable = !broken,
            Op::Advance { ms } => self.advance(Duration::from_millis(ms)),
            Op::ConnectAnother => self.connect_another(),
            Op::Close { handle, last } => {
                if self.handles.is_empty() || (self.handles.len() == 1 && !last) {
                    return;
                }
                let h = self.handles.remove(handle % self.handles.len());
                self.f.s.close(h, self.f.now);
            }
        }
        self.settle();
        let sizes = self.f.s.sizes();
        assert_eq!(sizes.queued, 0, "everything was polled");
        assert!(sizes.pending <= MAX_PENDING_PAIRS && sizes.in_flight <= MAX_IN_FLIGHT_PUSHES);
    }

    /// The gate delivers everything it owes (the network heals, the caller reopens the group if it
    /// lost it), then time passes beyond every bound.
    fn finish(&mut self) {
        self.reachable = true;
        self.advance(Duration::from_secs(15));
        if !self.f.s.is_ended() && !self.handles.is_empty() && self.conns.is_empty() {
            self.connect_another();
        }
        if let Some(conn) = self.gate_conn(0) {
            for p in std::mem::take(&mut self.unanswered) {
                self.owe(&p);
            }
            let rs: Vec<(u64, u64, Outcome)> =
                std::mem::take(&mut self.owed).into_iter().map(|((m, u), o)| (m, u, o)).collect();
            self.next_batch += 1;
            let batch_id = self.next_batch;
            self.deliver(conn, batch_id, rs);
            for (batch_id, rs) in self.unacked.clone() {
                self.deliver(conn, batch_id, rs);
            }
        }
        self.advance(LOST_MEMORY + Duration::from_secs(100));
        self.f.s.handle_timeout(self.f.now);
        self.settle();
    }

    /// Exactly one final outcome per pushed pair; none for refused pushes; nothing left behind.
    fn check(&self) {
        for (&message_id, (uids, broadcast)) in &self.pushed {
            let heard: Vec<u64> =
                self.outcomes.range((message_id, 0)..=(message_id, u64::MAX)).map(|(&(_, u), _)| u).collect();
            if self.refused.contains(&message_id) {
                assert!(heard.is_empty(), "refused push {message_id} got {heard:?}");
            } else if *broadcast {
                let all_real = ONLINE.iter().all(|u| heard.contains(u));
                assert!(heard.contains(&0) || all_real, "broadcast {message_id} ended with {heard:?}");
            } else {
                let want: BTreeSet<u64> = uids.iter().copied().collect();
                let got: BTreeSet<u64> = heard.iter().copied().collect();
                assert_eq!(got, want, "push {message_id}: one outcome per uid");
            }
        }
        let sizes = self.f.s.sizes();
        let live_conns = if self.f.s.is_ended() { 0 } else { self.conns.len() };
        assert_eq!(
            Sizes { in_flight: 0, buffered: 0, upstream: 0, ..sizes },
            Sizes::default(),
            "everything settled and expired ({live_conns} connections up)"
        );
        assert_eq!(self.f.s.pending_receipts(), 0);
        if !self.f.s.is_ended() {
            assert_eq!(self.f.s.late_receipts(), self.late, "receipts for pairs reported lost are late");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_pair_ends_exactly_once_and_every_batch_is_acked(
        ops in proptest::collection::vec(op(), 1..150),
        within_ms in prop_oneof![1 => Just(0u64), 4 => 1..20_000u64],
    ) {
        let mut m = Model::new(Duration::from_millis(within_ms));
        for op in ops {
            m.apply(op);
        }
        m.finish();
        m.check();
    }
}

#[test]
fn a_batch_of_pushes_is_queued_whole_or_not_at_all() {
    let mut f = Fake::new(T);
    let (h, c, _) = f.open_as(INCARNATION, 1024);
    let conn = f.s.handle_conn(h).expect("an open handle");
    // The third is over the gate's max_body: nothing of the batch is queued or registered.
    let mut big = spec(3, &[1]);
    big.payload = vec![0; 2048];
    let bad = [spec(1, &[1, 2]), spec(2, &[3]), big];
    assert!(matches!(f.s.push_batch(conn, &bad, SENT_AT, f.now), Err(ClientError::Unexpected(_))));
    f.pump();
    assert!(f.nothing_sent(c));
    assert_eq!((f.s.pending_receipts(), f.s.pushes_in_flight(c)), (0, 0));
    // The same ids again, valid: all of them leave, in order, their pairs pending.
    let good = [spec(1, &[1, 2]), spec(2, &[3])];
    let seqs = f.s.push_batch(conn, &good, SENT_AT, f.now).expect("queued");
    f.pump();
    assert_eq!(seqs.len(), 2);
    let (p1, m1, u1) = f.read_push(c);
    let (p2, m2, u2) = f.read_push(c);
    assert_eq!((m1, u1, p1.seq()), (1, vec![1, 2], seqs[0]));
    assert_eq!((m2, u2, p2.seq()), (2, vec![3], seqs[1]));
    assert_eq!((f.s.pending_receipts(), f.s.pushes_in_flight(c)), (3, 2));
}
