//! The gate against docs/PROTOCOL.md, at the wire level: deadlines that must fire on time
//! whatever else is pending, errors an app-server may send, limits on replies, broadcast counts,
//! GPS validation, log-ids, receipt sequence-ids, error origins and close reasons.
//!
//! The app-server side here is a raw socket speaking frames ([`RawSidecar`]), as a team writing
//! its own app-server from the document would, so these tests hold whatever the gate's insides.

mod common;

use client::{FrameReader, OwnedFrame};
use common::{point, Gate, EVENTUALLY, SIDECAR_SECRET};
use schema::wire::{self, ErrorCode, GoAwayReason, Hop, Outcome};
use schema::{Body, Cmd, Encoder, FrameType, Limits};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How late a deadline may fire and still pass: the documented slack (§11) plus room for a
/// loaded machine. A deadline that waits for a longer one pending (the defect these tests
/// guard against) is late by many seconds.
const LATE: Duration = Duration::from_millis(2_500);

/// An app-server connection speaking raw frames.
struct RawSidecar {
    s: TcpStream,
    reader: FrameReader,
    enc: Encoder,
    seq: u32,
}

impl RawSidecar {
    /// Connects and says hello; returns the connection and the welcome frame.
    fn connect(gate: &Gate) -> (RawSidecar, OwnedFrame) {
        let s = TcpStream::connect(gate.sidecar).expect("sidecar connects");
        s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut me = RawSidecar { s, reader: FrameReader::new(Limits::SIDECAR), enc: Encoder::new(), seq: 0 };
        let seq = me.next_seq();
        me.send(|enc, out| {
            enc.frame(out, FrameType::Request, Cmd::AppServerHello, seq, 0, |b| {
                let secret = b.create_vector(SIDECAR_SECRET);
                let name = b.create_string("raw");
                wire::AppServerHello::create(
                    b,
                    &wire::AppServerHelloArgs { secret: Some(secret), name: Some(name) },
                )
            })
        });
        let welcome = me.recv_until(|f| f.seq() == seq && f.cmd == Cmd::AppServerHello);
        assert_eq!(welcome.ty, FrameType::Response, "hello answered: {welcome:?}");
        (me, welcome)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    fn send(&mut self, build: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
        let mut out = Vec::new();
        build(&mut self.enc, &mut out);
        self.s.write_all(&out).expect("write to the sidecar");
    }

    /// Sends a push; returns its sequence-id.
    fn push(&mut self, message_id: u64, uids: &[u64], ttl_ms: u32, broadcast: u8, log_id: u64) -> u32 {
        let seq = self.next_seq();
        self.send(|enc, out| {
            enc.frame(out, FrameType::Request, Cmd::Push, seq, log_id, |b| {
                let uids = b.create_vector(uids);
                let payload = b.create_vector(b"offer");
                wire::Push::create(
                    b,
                    &wire::PushArgs {
                        message_id,
                        uids: Some(uids),
                        payload: Some(payload),
                        ttl_ms,
                        broadcast: wire::Role(broadcast),
                        sent_at_us: 0,
                        kind: 1,
                    },
                )
            })
        });
        seq
    }

    fn recv(&mut self) -> OwnedFrame {
        self.reader.read_frame(&mut self.s).expect("a frame from the gate")
    }

    /// Reads until `f` matches, acking every Receipts frame on the way; fails after EVENTUALLY.
    fn recv_until(&mut self, mut f: impl FnMut(&OwnedFrame) -> bool) -> OwnedFrame {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            assert!(Instant::now() < deadline, "the awaited frame never came");
            let frame = self.recv();
            if frame.cmd == Cmd::Receipts {
                self.ack(&frame);
            }
            if f(&frame) {
                return frame;
            }
        }
    }

    /// Reads until a receipt for (message_id, uid) comes; returns its outcome.
    fn receipt_of(&mut self, message_id: u64, uid: u64) -> Outcome {
        let mut found = None;
        self.recv_until(|f| {
            if let Body::Receipts(r) = f.body() {
                for x in r.receipts().into_iter().flatten() {
                    if x.message_id() == message_id && x.uid() == uid {
                        found = Some(Outcome(x.outcome()));
                    }
                }
            }
            found.is_some()
        });
        found.expect("found")
    }

    fn ack(&mut self, f: &OwnedFrame) {
        let Body::Receipts(r) = f.body() else { return };
        let (seq, batch_id, log_id) = (f.seq(), r.batch_id(), f.log_id());
        self.send(|enc, out| {
            enc.frame(out, FrameType::Ack, Cmd::ReceiptsAck, seq, log_id, |b| {
                wire::ReceiptsAck::create(b, &wire::ReceiptsAckArgs { batch_id })
            })
        });
    }
}

/// One gate shard, so timers and connections share an executor, as the defects were seen.
fn gate(extra: &[&str]) -> Gate {
    let mut args = vec!["--cores", "0"];
    args.extend_from_slice(extra);
    Gate::start(&args)
}

/// A driver logged in with a TTL-30 s push delivered and never acked: a long deadline pending.
fn long_deadline_pending(gate: &Gate, side: &mut RawSidecar, uid: u64) -> client::AppConn {
    let mut app = gate.login(uid, 1);
    side.push(9_000 + uid, &[uid], 30_000, 0, 0);
    let _ = common::next_push(&mut app);
    app
}

// ------------------------------------------------------------------------------------------------
// 1. Deadlines fire on time whatever else is pending
// ------------------------------------------------------------------------------------------------

#[test]
fn short_ttl_expires_on_time_behind_a_longer_one() {
    let gate = gate(&["--hold-ms", "0"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let mut app = long_deadline_pending(&gate, &mut side, 1);
    let t0 = Instant::now();
    side.push(2, &[1], 1_000, 0, 0);
    let _ = common::next_push(&mut app);
    assert_eq!(side.receipt_of(2, 1), Outcome::TtlExpired);
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_000) + LATE, "TTL 1 s receipt came after {took:?}");
}

#[test]
fn hold_expires_on_time_behind_a_longer_ttl() {
    let gate = gate(&["--hold-ms", "1000"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let app = long_deadline_pending(&gate, &mut side, 3);
    let t0 = Instant::now();
    app.shutdown().expect("drop");
    assert_eq!(side.receipt_of(9_003, 3), Outcome::HoldExpired, "the hold ends first, not the TTL");
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_000) + LATE, "1 s hold expired after {took:?}");
}

#[test]
fn request_deadline_fires_on_time_behind_a_longer_ttl() {
    let gate = gate(&["--request-timeout-ms", "1000"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let _driver = long_deadline_pending(&gate, &mut side, 4);
    let mut passenger = gate.login(5, 2);
    let t0 = Instant::now();
    let seq = passenger.place_order(1, 2, 3, 4, b"trip").expect("sent");
    let f = passenger.wait_response(seq).expect("answer");
    let e = f.error().expect("an error frame");
    assert_eq!((e.code, e.origin), (ErrorCode::Timeout, Hop::AppServer));
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_000) + LATE, "1 s request deadline fired after {took:?}");
}

#[test]
fn login_timeout_fires_on_time_behind_a_longer_ttl() {
    let gate = gate(&["--login-timeout-ms", "1000"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let _driver = long_deadline_pending(&gate, &mut side, 6);
    let t0 = Instant::now();
    let mut idle = gate.connect();
    common::expect_refusal(&mut idle, ErrorCode::NotLoggedIn);
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_000) + LATE, "1 s login timeout fired after {took:?}");
}

#[test]
fn a_refused_resume_leaves_the_login_timeout_running_from_accept() {
    let gate = gate(&["--login-timeout-ms", "1500"]);
    let mut first = gate.login(9, 1);
    let token = first.session().expect("session").resume_token.clone();
    first.logout().expect("logout");
    let t0 = Instant::now();
    let mut again = gate.connect();
    match again.resume(&token) {
        Err(client::ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ResumeRefused),
        other => panic!("a logged-out session resumed: {other:?}"),
    }
    // Awaiting a login again, with the clock still running from the accept.
    let f = again.recv().expect("the login timeout's error");
    assert_eq!(f.error().map(|e| (e.code, f.seq())), Some((ErrorCode::NotLoggedIn, 0)));
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1_500), "the login timeout fired early, after {took:?}");
    assert!(took < Duration::from_millis(1_500) + LATE, "1.5 s login timeout fired after {took:?}");
}

#[test]
fn read_and_idle_timeouts_fire_on_time_behind_a_longer_ttl() {
    let gate = gate(&["--read-timeout-ms", "1000", "--idle-timeout-ms", "1500", "--heartbeat-ms", "500"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let mut driver = long_deadline_pending(&gate, &mut side, 7);
    let mut slow = gate.login(8, 1);
    let t0 = Instant::now();
    slow.send_raw(&[0xF7, 1, 3]).expect("half a header");
    let f = slow.recv().expect("go-away");
    assert_eq!(f.go_away().map(|g| g.reason()), Some(GoAwayReason::ReadTimeout));
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_000) + LATE, "1 s read timeout fired after {took:?}");
    // The driver with the long push pending has said nothing since its login: idle.
    let f = loop {
        let f = driver.recv().expect("go-away");
        if f.cmd == Cmd::GoAway {
            break f;
        }
    };
    assert_eq!(f.go_away().map(|g| g.reason()), Some(GoAwayReason::IdleTimeout));
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_500) + LATE, "1.5 s idle timeout fired after {took:?}");
}

/// Counts GpsForward frames the app-server gets while `drivers` report every second for `secs`.
fn gps_forwards(gate: &Gate, side: &mut RawSidecar, uid_base: u64, drivers: u64, secs: u64) -> usize {
    let mut apps: Vec<_> = (0..drivers).map(|i| gate.login(uid_base + i, 1)).collect();
    side.s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let t0 = Instant::now();
    let mut next_report = t0;
    let mut forwards = 0;
    let mut ts = 1_700_000_000_000;
    while t0.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_report {
            ts += 1_000;
            for a in &mut apps {
                a.send_gps(0, &point(ts, 399_042_000)).expect("gps");
            }
            next_report += Duration::from_millis(1_000);
        }
        match side.reader.read_frame(&mut side.s) {
            Ok(f) if f.cmd == Cmd::GpsForward => forwards += 1,
            Ok(f) if f.cmd == Cmd::Receipts => side.ack(&f),
            _ => {}
        }
    }
    side.s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
    forwards
}

#[test]
fn gps_flushes_every_interval_with_and_without_pushes_pending() {
    let gate = gate(&["--gps-flush-ms", "1000"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    // Drivers reporting every second, flush every second: a GpsForward each second (5 or 6 in
    // 6 s, give or take the edges), never one every other second.
    let n = gps_forwards(&gate, &mut side, 100, 50, 6);
    assert!((5..=7).contains(&n), "{n} GpsForward frames in 6 s with a 1 s flush");
    // The same with a TTL-30 s push pending.
    let _driver = long_deadline_pending(&gate, &mut side, 10);
    let n = gps_forwards(&gate, &mut side, 200, 50, 6);
    assert!((5..=7).contains(&n), "{n} GpsForward frames in 6 s with a 1 s flush and a push pending");
}

// ------------------------------------------------------------------------------------------------
// 3–5. Upstream requests: the app-server's Error answers, drops and oversized replies
// ------------------------------------------------------------------------------------------------

/// A passenger's PlaceOrder and the Upstream request it became on the raw app-server.
fn order_upstream(gate: &Gate, side: &mut RawSidecar, uid: u64) -> (client::AppConn, u32, OwnedFrame) {
    let mut passenger = gate.login(uid, 2);
    let seq = passenger.place_order(1, 2, 3, 4, b"trip").expect("sent");
    let up = side.recv_until(|f| f.cmd == Cmd::Upstream);
    assert_eq!(up.ty, FrameType::Request);
    (passenger, seq, up)
}

/// Sends a Keepalive request on the raw app-server and returns the frames read before its
/// answer: an Error among them would be the gate answering something it must not.
fn frames_before_keepalive_answer(side: &mut RawSidecar) -> Vec<OwnedFrame> {
    let seq = side.next_seq();
    side.send(|enc, out| enc.keepalive(out, FrameType::Request, seq, 0, 1));
    let mut before = Vec::new();
    side.recv_until(|f| {
        let done = f.cmd == Cmd::Keepalive && f.seq() == seq;
        if !done {
            before.push(f.clone());
        }
        done
    });
    before
}

#[test]
fn app_server_error_answer_reaches_the_app_as_app_server_error() {
    let gate = Gate::start(&[]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let (mut passenger, seq, up) = order_upstream(&gate, &mut side, 20);
    // The app-server cannot process it: an Error frame with the Upstream's sequence-id and
    // log-id, as §8.3 says.
    side.send(|enc, out| {
        enc.error(
            out,
            up.seq(),
            up.log_id(),
            ErrorCode::AppServerError,
            Hop::AppServer,
            Cmd::Upstream as u16,
            "no such route",
            0,
        )
    });
    let f = passenger.wait_response(seq).expect("answer");
    let e = f.error().expect("an error frame");
    assert_eq!(
        (e.code, e.origin, e.failed_cmd),
        (ErrorCode::AppServerError, Hop::AppServer, Cmd::PlaceOrder as u16)
    );
    assert_eq!(e.message, "no such route", "the app-server's message reaches the app");
    assert_eq!(f.log_id(), up.log_id(), "one log-id across the hops");
    let errors: Vec<_> =
        frames_before_keepalive_answer(&mut side).into_iter().filter(|f| f.cmd == Cmd::Error).collect();
    assert!(errors.is_empty(), "the gate answered the app-server's Error with {errors:?}");
    // An Error matching nothing outstanding is informational: logged, never answered.
    side.send(|enc, out| enc.error(out, 4242, 7, ErrorCode::Unknown, Hop::AppServer, 0, "stray", 0));
    let errors: Vec<_> =
        frames_before_keepalive_answer(&mut side).into_iter().filter(|f| f.cmd == Cmd::Error).collect();
    assert!(errors.is_empty(), "the gate answered a stray Error with {errors:?}");
}

#[test]
fn app_server_dropping_mid_request_answers_no_app_server_at_once() {
    let gate = Gate::start(&["--request-timeout-ms", "10000"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let (mut passenger, seq, _up) = order_upstream(&gate, &mut side, 21);
    let t0 = Instant::now();
    side.s.shutdown(std::net::Shutdown::Both).expect("drop");
    let f = passenger.wait_response(seq).expect("answer");
    let e = f.error().expect("an error frame");
    assert_eq!((e.code, e.origin), (ErrorCode::NoAppServer, Hop::AppServer));
    assert!(t0.elapsed() < Duration::from_secs(3), "NoAppServer came after {:?}, not at once", t0.elapsed());
}

#[test]
fn oversized_reply_ends_in_app_server_error() {
    let gate = Gate::start(&[]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let (mut passenger, seq, up) = order_upstream(&gate, &mut side, 22);
    let request_id = match up.body() {
        Body::Upstream(u) => u.request_id(),
        other => panic!("{other:?}"),
    };
    let big = vec![7u8; 70_000];
    side.send(|enc, out| {
        enc.frame(out, FrameType::Response, Cmd::Upstream, up.seq(), up.log_id(), |b| {
            let payload = b.create_vector(&big);
            let reply =
                wire::Reply::create(b, &wire::ReplyArgs { code: 0, message: None, payload: Some(payload) });
            wire::UpstreamReply::create(b, &wire::UpstreamReplyArgs { request_id, reply: Some(reply) })
        })
    });
    let f = passenger.wait_response(seq).expect("answer");
    let e = f.error().expect("an error frame, not a 70,000-byte Response");
    assert_eq!((e.code, e.origin), (ErrorCode::AppServerError, Hop::AppServer));
    passenger.keepalive().expect("the app's connection stays");
}

// ------------------------------------------------------------------------------------------------
// 6. A broadcast's PushAccepted counts the receipts the app-server is owed
// ------------------------------------------------------------------------------------------------

#[test]
fn broadcast_accepted_counts_every_target_across_shards() {
    let gate = Gate::start(&[]); // a shard per core: the drivers spread over the logic shards
    let (mut side, _) = RawSidecar::connect(&gate);
    let mut drivers: Vec<_> = (30..35).map(|u| gate.login(u, 1)).collect();
    let _passenger = gate.login(36, 2);
    let seq = side.push(500, &[], 30_000, wire::Role::Driver.0, 0);
    let mut outcomes = Vec::new();
    let mut targets = None;
    for d in &mut drivers {
        let f = common::next_push(d);
        d.ack_push(&f).expect("ack");
    }
    side.recv_until(|f| {
        match f.body() {
            Body::PushAccepted(a) if f.seq() == seq => targets = Some(a.targets()),
            Body::Receipts(r) => outcomes.extend(r.receipts().into_iter().flatten().map(|x| x.uid())),
            _ => {}
        }
        targets.is_some() && outcomes.len() >= 5
    });
    assert_eq!(targets, Some(5), "PushAccepted names the 5 drivers, not 0");
    outcomes.sort();
    assert_eq!(outcomes, vec![30, 31, 32, 33, 34]);
}

// ------------------------------------------------------------------------------------------------
// 7. GPS is validated
// ------------------------------------------------------------------------------------------------

#[test]
fn gps_out_of_range_or_missing_is_refused_with_invalid_field() {
    let gate = gate(&[]);
    let mut d = gate.login(40, 1);
    let ok = point(1_700_000_000_000, 399_042_000);
    let bad = [
        wire::GpsPoint::new(1, 950_000_000, 0, 0, 0, 0, 0),
        wire::GpsPoint::new(1, 0, 1_900_000_000, 0, 0, 0, 0),
        wire::GpsPoint::new(1, 0, 0, 0, 40_000, 0, 0),
    ];
    for p in &bad {
        d.send_gps(0, p).expect("sent");
        let f = d.recv().expect("an answer");
        let e = f.error().expect("InvalidField");
        assert_eq!(
            (e.code, e.origin, e.failed_cmd, f.seq()),
            (ErrorCode::InvalidField, Hop::App, Cmd::GpsReport as u16, 0)
        );
    }
    // An empty body: a GpsReport without a point.
    d.send_frame_raw(FrameType::Event as u8, Cmd::GpsReport as u16, 0, 0, &[]).expect("sent");
    let e = d.recv().expect("an answer");
    assert_eq!(e.error().map(|e| e.code), Some(ErrorCode::InvalidField), "{e:?}");
    // A batch with one bad point is refused whole.
    d.send_gps_batch(0, &[ok, bad[0]]).expect("sent");
    let e = d.recv().expect("an answer");
    assert_eq!(
        e.error().map(|e| (e.code, e.failed_cmd)),
        Some((ErrorCode::InvalidField, Cmd::GpsBatch as u16))
    );
    // A good point still goes through, and only good points are counted.
    d.send_gps(0, &ok).expect("sent");
    gate.eventually("the good point counted", || gate.metric("fleetgate_gps_points_in_total", "") == 1.0);
    assert_eq!(gate.metric("fleetgate_gps_invalid_total", ""), 5.0);
    d.keepalive().expect("the connection stays");
}

// ------------------------------------------------------------------------------------------------
// 8–9. log-ids and the sequence-ids of Receipts
// ------------------------------------------------------------------------------------------------

#[test]
fn log_ids_are_assigned_where_none_was_given_and_follow_every_hop() {
    let gate = gate(&["-v"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let mut driver = gate.login(50, 1);
    // A request with log-id 0 gets one from the gate, the same on every hop.
    let seq = driver.next_seq();
    driver.send_frame_raw(FrameType::Request as u8, Cmd::BusinessRequest as u16, seq, 0, &[]).expect("sent");
    let up = side.recv_until(|f| f.cmd == Cmd::Upstream);
    assert_ne!(up.log_id(), 0, "the Upstream carries a gate-assigned log-id");
    let request_id = match up.body() {
        Body::Upstream(u) => u.request_id(),
        other => panic!("{other:?}"),
    };
    side.send(|enc, out| {
        enc.frame(out, FrameType::Response, Cmd::Upstream, up.seq(), up.log_id(), |b| {
            wire::UpstreamReply::create(b, &wire::UpstreamReplyArgs { request_id, reply: None })
        })
    });
    let answer = driver.wait_response(seq).expect("answer");
    assert_eq!(answer.log_id(), up.log_id(), "the app's answer carries the same log-id");
    // A push with log-id 0: PushAccepted, the delivery and the receipt step share one id.
    let pseq = side.push(60, &[50], 30_000, 0, 0);
    let accepted = side.recv_until(|f| f.cmd == Cmd::Push && f.seq() == pseq);
    let push_log = accepted.log_id();
    assert_ne!(push_log, 0);
    let delivery = common::next_push(&mut driver);
    assert_eq!(delivery.log_id(), push_log);
    driver.ack_push(&delivery).expect("ack");
    // Frames the gate starts carry gate-assigned log-ids, and Receipts a non-zero sequence-id.
    let receipts = side.recv_until(|f| f.cmd == Cmd::Receipts);
    assert_ne!(receipts.log_id(), 0, "Receipts carry a gate-assigned log-id");
    assert_ne!(receipts.seq(), 0, "Receipts carry a gate-chosen sequence-id (§6)");
    driver.send_gps(0, &point(1_700_000_000_000, 1)).expect("gps");
    let fwd = side.recv_until(|f| f.cmd == Cmd::GpsForward);
    assert_ne!(fwd.log_id(), 0, "GpsForward carries a gate-assigned log-id");
    driver.logout().expect("logout");
    // Every hop of the push is in the log under its log-id.
    let needle = format!("log_id={push_log}");
    gate.eventually("the receipt step logged", || {
        let log = gate.log_text();
        ["push accepted", "push delivered to connection", "push acked", "push: receipt"]
            .iter()
            .all(|step| log.lines().any(|l| l.contains(&needle) && l.contains(step)))
    });
}

#[test]
fn receipts_frames_carry_distinct_nonzero_sequence_ids() {
    let gate = gate(&["--hold-ms", "0"]);
    let (mut side, _) = RawSidecar::connect(&gate);
    let mut seqs = Vec::new();
    for id in 0..3u64 {
        side.push(70 + id, &[9_999], 30_000, 0, 0); // offline: a receipt at once
        side.recv_until(|f| {
            if f.cmd == Cmd::Receipts {
                seqs.push(f.seq());
                true
            } else {
                false
            }
        });
    }
    assert!(seqs.iter().all(|&s| s != 0), "{seqs:?}");
    let mut unique = seqs.clone();
    unique.dedup();
    assert_eq!(unique.len(), seqs.len(), "{seqs:?}");
}

// ------------------------------------------------------------------------------------------------
// 10. Errors about the app-server's own frames name origin App
// ------------------------------------------------------------------------------------------------

#[test]
fn errors_about_the_app_servers_own_frames_name_origin_app() {
    let gate = gate(&[]);
    let origin_of = |f: &OwnedFrame| f.error().map(|e| (e.code, e.origin));
    // Before the hello: NotLoggedIn.
    let s = TcpStream::connect(gate.sidecar).expect("connect");
    s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
    let mut raw = RawSidecar { s, reader: FrameReader::new(Limits::SIDECAR), enc: Encoder::new(), seq: 0 };
    raw.push(1, &[1], 1_000, 0, 0);
    assert_eq!(origin_of(&raw.recv()), Some((ErrorCode::NotLoggedIn, Hop::App)));
    // A wrong secret: BadSecret.
    raw.send(|enc, out| {
        enc.frame(out, FrameType::Request, Cmd::AppServerHello, 9, 0, |b| {
            let secret = b.create_vector(b"wrong");
            wire::AppServerHello::create(b, &wire::AppServerHelloArgs { secret: Some(secret), name: None })
        })
    });
    assert_eq!(origin_of(&raw.recv()), Some((ErrorCode::BadSecret, Hop::App)));
    // After the hello: a frame of the app port, a TTL over the maximum, a payload over 16 KiB.
    let (mut side, _) = RawSidecar::connect(&gate);
    let mut login = Vec::new();
    schema::write_frame(&mut login, FrameType::Request, Cmd::Login, 77, 0, &[]);
    side.s.write_all(&login).expect("write");
    assert_eq!(origin_of(&side.recv_until(|f| f.seq() == 77)), Some((ErrorCode::NotAllowed, Hop::App)));
    let seq = side.push(2, &[1], 400_000, 0, 0);
    assert_eq!(origin_of(&side.recv_until(|f| f.seq() == seq)), Some((ErrorCode::InvalidField, Hop::App)));
    let seq = side.next_seq();
    side.send(|enc, out| {
        enc.frame(out, FrameType::Request, Cmd::Push, seq, 0, |b| {
            let payload = b.create_vector(&[0u8; 17 * 1024]);
            wire::Push::create(
                b,
                &wire::PushArgs { message_id: 3, payload: Some(payload), ..Default::default() },
            )
        })
    });
    assert_eq!(origin_of(&side.recv_until(|f| f.seq() == seq)), Some((ErrorCode::LimitExceeded, Hop::App)));
}

// ------------------------------------------------------------------------------------------------
// 11. A stream error is answered once
// ------------------------------------------------------------------------------------------------

#[test]
fn a_stream_error_is_answered_with_exactly_one_error_frame() {
    // The frame decoder on raw TCP; on the secure channel garbage is not a record at all
    // (gate/tests/secure.rs: plaintext_is_refused_by_default).
    let gate = gate(&["--max-conns-per-shard", "1000", "--accept-rate-per-shard", "100000", "--plaintext"]);
    let conns: Vec<_> = (0..100)
        .map(|_| {
            std::thread::spawn({
                let addr = gate.app;
                move || {
                    let mut s = TcpStream::connect(addr).expect("connect");
                    s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
                    // Garbage in several writes, so more arrives after the first bad byte.
                    for _ in 0..20 {
                        if s.write_all(&[0x55; 512]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let mut all = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut s, &mut all);
                    let mut reader = FrameReader::new(Limits::APP);
                    let mut cursor = std::io::Cursor::new(all);
                    let mut errors = Vec::new();
                    while let Ok(f) = reader.read_frame(&mut cursor) {
                        errors.push(f.error().map(|e| e.code));
                    }
                    errors
                }
            })
        })
        .collect();
    for c in conns {
        let errors = c.join().expect("thread");
        assert_eq!(errors, vec![Some(ErrorCode::BadMagic)], "one BadMagic, then the close");
    }
    assert_eq!(gate.metric("fleetgate_errors_total", "code=\"BadMagic\""), 100.0);
}

// ------------------------------------------------------------------------------------------------
// 12. Close reasons
// ------------------------------------------------------------------------------------------------

#[test]
fn a_login_timeout_close_is_counted_as_login_timeout() {
    let gate = gate(&["--login-timeout-ms", "300"]);
    let mut c = gate.connect();
    if gate.secure() {
        common::expect_refusal(&mut c, ErrorCode::NotLoggedIn);
    } else {
        let f = c.recv().expect("NotLoggedIn");
        assert_eq!(f.error().map(|e| e.code), Some(ErrorCode::NotLoggedIn));
        assert_ne!(f.log_id(), 0, "a frame the gate starts carries a gate-assigned log-id");
    }
    gate.eventually("the close counted", || {
        gate.metric("fleetgate_connections_closed_total", "reason=\"LoginTimeout\"") == 1.0
    });
    assert_eq!(gate.metric("fleetgate_connections_closed_total", "reason=\"IdleTimeout\""), 0.0);
}
