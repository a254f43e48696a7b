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

/// Reads app frames until a push delivery arrives.
fn next_delivery(c: &mut client::AppConn) -> OwnedFrame {
    loop {
        let f = c.recv().expect("a push");
        if f.cmd == Cmd::PushDelivery {
            return f;
        }
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
    let _ = next_delivery(&mut app);
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
    let _ = next_delivery(&mut app);
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
    let f = idle.recv().expect("the login timeout's error");
    let e = f.error().expect("an error frame");
    assert_eq!((e.code, f.seq()), (ErrorCode::NotLoggedIn, 0));
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1_000) + LATE, "1 s login timeout fired after {took:?}");
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
