//! The push rules of docs/PROTOCOL.md §9.9–9.11 that make a receipt mean what it says, end to
//! end on a real gate: every delivery carries its deadline, an ack the gate reads before the
//! deadline plus the grace is Delivered and a later one changes nothing (the pair ended
//! TtlExpired at deadline + grace, within the promised bound); an ack naming another push is
//! refused with InvalidField while the push stays in flight; and a gate at its bound on pushes
//! in flight refuses new pushes with Overloaded and a retry-after instead of accepting pairs it
//! cannot hold.

mod common;

use client::{AppConn, ClientError, OwnedFrame};
use common::{next_push, push_spec, receipts, sleep_until_wall, Gate};
use logic::push::ACK_GRACE_MS;
use schema::wire::{self, ErrorCode, Hop, Outcome};
use schema::{Cmd, Encoder, FrameType};

/// Sends a keepalive and waits for its answer; returns the Error frames the gate sent
/// meanwhile (the frames read on the way are queued, then taken here).
fn errors_so_far(app: &mut AppConn) -> Vec<OwnedFrame> {
    app.keepalive().expect("the connection stays and answers");
    let mut errors = Vec::new();
    while app.queued() > 0 {
        let f = app.recv().expect("a queued frame");
        if f.cmd == Cmd::Error {
            errors.push(f);
        }
    }
    errors
}

/// A PushAck of `seq` naming `message_id`, written as the app would.
fn send_ack(app: &mut AppConn, seq: u32, log_id: u64, message_id: u64) {
    let mut enc = Encoder::new();
    let body = enc.body(|b| wire::PushAck::create(b, &wire::PushAckArgs { message_id })).to_vec();
    app.send_frame_raw(FrameType::Ack as u8, Cmd::PushAck as u16, seq, log_id, &body).expect("ack sent");
}

#[test]
fn an_ack_within_the_grace_is_delivered_and_one_after_it_changes_nothing() {
    let gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let mut in_time = gate.login(1, 1);
    let mut late = gate.login(2, 1);
    let ttl_ms = 1_000;
    let before = client::now_ms();
    srv.push(&push_spec(10, &[1, 2], ttl_ms)).expect("accepted");
    let after = client::now_ms();
    let f1 = next_push(&mut in_time);
    let deadline = f1.delivery().expect("delivery").deadline_ms;
    assert!(
        (before + ttl_ms as u64..=after + ttl_ms as u64).contains(&deadline),
        "the deadline is the acceptance plus the TTL by the wall clock: {before}..{after} + {ttl_ms}, got {deadline}"
    );
    let f2 = next_push(&mut late);
    assert_eq!(f2.delivery().expect("delivery").deadline_ms, deadline, "one body for every target");

    // Past the deadline by half the grace (a conforming app would have shown it before the
    // deadline and its ack been slow on the way): the gate still reads it in time.
    sleep_until_wall(deadline + ACK_GRACE_MS / 2);
    in_time.ack_push(&f1).expect("ack");
    // The other target's ack never comes in time: its pair ends TtlExpired at deadline + grace,
    // not before, and within the promised TTL + 1 s of its acceptance.
    let (got, expired_at) = common::receipts_with_expiry(&ev, 2);
    assert_eq!(got, vec![(10, 1, Outcome::Delivered), (10, 2, Outcome::TtlExpired)]);
    assert!(
        expired_at >= deadline + ACK_GRACE_MS,
        "expired {} ms early",
        deadline + ACK_GRACE_MS - expired_at
    );
    assert!(
        expired_at <= after + ttl_ms as u64 + 1_000,
        "TtlExpired came {} ms after the deadline",
        expired_at - deadline
    );

    // The late ack changes nothing: no second receipt, no error, the connection goes on, and
    // the next push to the same app is delivered as usual.
    late.ack_push(&f2).expect("late ack");
    srv.push(&push_spec(11, &[2], 30_000)).expect("accepted");
    let f3 = loop {
        let f = late.recv().expect("the next push");
        assert_ne!(f.cmd, Cmd::Error, "a late ack is not an error: {:?}", f.error());
        if f.cmd == Cmd::PushDelivery {
            break f;
        }
    };
    late.ack_push(&f3).expect("ack");
    assert_eq!(receipts(&ev, 1)[&(11, 2)], vec![Outcome::Delivered], "and nothing about push 10");
    assert!(errors_so_far(&mut late).is_empty(), "a late ack is not an error");
    gate.eventually("nothing in flight", || gate.metric("fleetgate_pushes_in_flight", "") == 0.0);
    assert_eq!(gate.metric("fleetgate_receipts_sent_total", ""), 3.0);
}

#[test]
fn an_ack_naming_another_push_is_refused_and_the_push_stays_in_flight() {
    let gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let mut app = gate.login(3, 1);
    srv.push(&push_spec(20, &[3], 30_000)).expect("accepted");
    let f = next_push(&mut app);
    let (seq, log_id) = (f.header.seq, f.log_id());
    send_ack(&mut app, seq, log_id, 21);
    let e = app.recv().expect("an answer");
    let err = e.error().expect("an Error frame");
    assert_eq!(
        (err.code, err.origin, err.failed_cmd),
        (ErrorCode::InvalidField, Hop::App, Cmd::PushAck as u16)
    );
    assert_eq!((e.header.seq, e.log_id()), (seq, log_id), "it answers the ack");
    assert_eq!(gate.metric("fleetgate_push_acks_mismatched_total", ""), 1.0);
    assert_eq!(gate.metric("fleetgate_pushes_in_flight", ""), 1.0, "the push waits for its own ack");
    // An ack of a sequence-id with nothing outstanding stays ignored, without an error (§6).
    send_ack(&mut app, seq + 100, log_id, 21);
    // The connection stayed: the right ack ends the pair Delivered, once.
    app.ack_push(&f).expect("ack");
    assert_eq!(receipts(&ev, 1)[&(20, 3)], vec![Outcome::Delivered]);
    // The uid's logic shard took the acks in order, so whatever it had to say about the
    // ignored one came before this receipt.
    assert!(errors_so_far(&mut app).is_empty(), "an ack matching nothing is ignored");
    gate.eventually("nothing in flight", || gate.metric("fleetgate_pushes_in_flight", "") == 0.0);
    assert_eq!(gate.metric("fleetgate_receipts_sent_total", ""), 1.0);
    assert_eq!(gate.metric("fleetgate_push_acks_mismatched_total", ""), 1.0);
}

#[test]
fn a_gate_at_its_bound_on_pushes_in_flight_refuses_with_overloaded_and_a_retry_after() {
    // One shard holding at most 3 pairs; no push may name more than 2 uids.
    let gate = Gate::start(&[
        "--cores",
        "0",
        "--limits-max-pushes-in-flight-per-shard",
        "3",
        "--sidecar-max-targets",
        "2",
    ]);
    let (srv, ev) = gate.appserver();
    let mut a = gate.login(1, 1);
    let _b = gate.login(2, 1);
    assert_eq!(srv.push(&push_spec(1, &[1, 2], 30_000)).expect("room for 2").targets, 2);
    assert_eq!(srv.push(&push_spec(2, &[1], 30_000)).expect("room for 1").targets, 1);
    let overloaded = |r: Result<client::Accepted, ClientError>| match r {
        Err(ClientError::Server { code, origin, retry_after_ms, .. }) => {
            assert_eq!((code, origin), (ErrorCode::Overloaded, Hop::Gate));
            assert!((1_000..=2_000).contains(&retry_after_ms), "a jittered second: {retry_after_ms}");
        }
        other => panic!("expected Overloaded, got {other:?}"),
    };
    // Full: a push to a held session, to an offline uid, and a broadcast are all refused, and
    // nothing of them is accepted.
    overloaded(srv.push(&push_spec(3, &[2], 30_000)));
    overloaded(srv.push(&push_spec(4, &[9], 30_000)));
    let mut broadcast = push_spec(5, &[], 30_000);
    broadcast.broadcast = 1;
    overloaded(srv.push(&broadcast));
    assert_eq!(gate.metric("fleetgate_pushes_refused_total", "reason=\"overloaded\""), 3.0);
    assert_eq!(gate.metric("fleetgate_pushes_in_flight", ""), 3.0, "never more than the bound");
    // An ack frees a pair's room: the next push fits.
    let f = next_push(&mut a);
    a.ack_push(&f).expect("ack");
    assert_eq!(receipts(&ev, 1)[&(1, 1)], vec![Outcome::Delivered]);
    assert_eq!(srv.push(&push_spec(6, &[2], 30_000)).expect("room again").targets, 1);
    overloaded(srv.push(&push_spec(7, &[1], 30_000)));
    // The refused pushes never get receipts: only the accepted pairs end, once each.
    drop(a);
    let end = srv.end_session(1, "").expect("answered");
    assert!(end.found);
    assert!(srv.end_session(2, "").expect("answered").found);
    let r = receipts(&ev, 3);
    let mut pairs: Vec<_> = r.keys().copied().collect();
    pairs.sort();
    assert_eq!(pairs, vec![(1, 2), (2, 1), (6, 2)]);
    assert!(r.values().all(|o| o == &vec![Outcome::Offline]), "{r:?}");
    gate.eventually("nothing in flight", || gate.metric("fleetgate_pushes_in_flight", "") == 0.0);
    assert_eq!(gate.metric("fleetgate_receipts_sent_total", ""), 4.0);
}

#[test]
fn a_large_fan_out_does_not_hold_up_a_small_push_behind_it() {
    // One logic shard: a push to 50,000 uids (the default sidecar.max_targets), two of them
    // online at the end of its list, then a push to one other uid, written together. The large
    // push is delivered a slice per turn, so the small one's receipt comes after one slice of
    // its receipts, not after all of them.
    const LARGE: u64 = 1;
    let gate = Gate::start(&["--cores", "0"]);
    let (srv, ev) = gate.appserver();
    let online = [1_000_001u64, 1_000_002];
    let mut apps: Vec<AppConn> = online.iter().map(|&uid| gate.login(uid, 1)).collect();
    let offline: Vec<u64> = (1..=49_998).collect();
    let mut last = offline.clone();
    last.extend(online);
    // In one write: the gate reads the small pushes with the large one's last bytes, so they
    // arrive while its targets wait, however fast or slow either side runs.
    let batch = [
        push_spec(LARGE, &last, 30_000),
        push_spec(100, &[2_000_000], 30_000),
        // A small push to a uid the large one has still to reach waits for it: pushes to one uid
        // are delivered in the order they were accepted.
        push_spec(101, &[online[0]], 30_000),
    ];
    srv.push_many_async(&batch).expect("sent");
    // Every offline target's receipt, in the order they arrive.
    let mut order = Vec::new();
    let offline_receipts = offline.len() + 1;
    common::collect_events(&ev, |e| {
        if let client::AppServerEvent::Receipt { message_id, uid, outcome } = e {
            assert_eq!(*outcome, Outcome::Offline, "{message_id}/{uid}");
            order.push(*message_id);
        }
        order.len() == offline_receipts
    });
    let small = order.iter().position(|&m| m == 100).expect("the small push's receipt");
    let large_after = order.len() - 1 - small;
    assert!(
        large_after > offline_receipts / 2,
        "the small push's receipt came after {small} of the large push's (only {large_after} after it)"
    );
    // The online targets at the end of the large push's list get it, and their acks end it;
    // the first then gets the small push that came after it.
    for app in &mut apps {
        let f = next_push(app);
        assert_eq!(f.delivery().expect("delivery").message_id, LARGE, "in the order accepted");
        app.ack_push(&f).expect("ack");
    }
    let f = next_push(&mut apps[0]);
    assert_eq!(f.delivery().expect("delivery").message_id, 101);
    apps[0].ack_push(&f).expect("ack");
    let r = receipts(&ev, 3);
    assert_eq!(r[&(LARGE, online[0])], vec![Outcome::Delivered]);
    assert_eq!(r[&(LARGE, online[1])], vec![Outcome::Delivered]);
    assert_eq!(r[&(101, online[0])], vec![Outcome::Delivered]);
    gate.eventually("nothing in flight or waiting", || {
        gate.metric("fleetgate_pushes_in_flight", "") == 0.0
            && gate.metric("fleetgate_push_targets_waiting", "") == 0.0
    });
    // The whole reservation was settled: a push as large again is accepted.
    assert_eq!(srv.push(&push_spec(200, &last, 1_000)).expect("room").targets, 50_000);
}

#[test]
fn waiting_pushes_to_one_driver_leave_together_in_the_order_accepted() {
    // One logic shard: a push to 50,000 uids ending with two online drivers, a push to 2,000
    // uids ending with the same two, then four pushes to those two only, written together. Each
    // later push names a uid an earlier one has still to reach, so it waits behind it whole, and
    // all have arrived long before the turns reach the first push's end. Reaching a driver takes
    // every waiting push's delivery to it at once: each driver gets all six in the order
    // accepted, in one send. Taken push by push (at most 1,024 targets a turn), the second
    // push's deliveries to them would leave turns after the first's.
    let gate = Gate::start(&["--cores", "0"]);
    let (srv, ev) = gate.appserver();
    let online = [1_000_001u64, 1_000_002];
    let mut apps: Vec<AppConn> = online.iter().map(|&uid| gate.login(uid, 1)).collect();
    let ending_online = |from: u64, n: u64| {
        let mut uids: Vec<u64> = (from..from + n).collect();
        uids.extend(online);
        uids
    };
    let mut batch = vec![
        push_spec(1, &ending_online(1, 49_998), 30_000),
        push_spec(2, &ending_online(100_001, 2_000), 30_000),
    ];
    batch.extend((3..=6).map(|m| push_spec(m, &[online[1], online[0]], 30_000)));
    let sends_before = gate.metric("fleetgate_app_sends_total", "");
    srv.push_many_async(&batch).expect("sent");
    let mut frames = Vec::new();
    for app in &mut apps {
        let got: Vec<OwnedFrame> = (0..6).map(|_| next_push(app)).collect();
        let ids: Vec<u64> = got.iter().map(|f| f.delivery().expect("delivery").message_id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6], "in the order accepted");
        frames.push(got);
    }
    let sends = gate.metric("fleetgate_app_sends_total", "") - sends_before;
    assert_eq!(sends, 2.0, "twelve deliveries to two drivers, one send each");
    for (app, got) in apps.iter_mut().zip(&frames) {
        for f in got {
            app.ack_push(f).expect("ack");
        }
    }
    let r = receipts(&ev, 49_998 + 2_000 + 12);
    for m in 1..=6 {
        for uid in online {
            assert_eq!(r[&(m, uid)], vec![Outcome::Delivered], "{m}/{uid}");
        }
    }
    gate.eventually("nothing in flight or waiting", || {
        gate.metric("fleetgate_pushes_in_flight", "") == 0.0
            && gate.metric("fleetgate_push_targets_waiting", "") == 0.0
    });
}

#[test]
fn a_shard_with_targets_waiting_past_its_bound_refuses_pushes_with_overloaded() {
    // Ten pushes of 50,000 offline uids in one write: 500,000 targets wait for their slices,
    // far past the bound (65,536 a shard), and a push that comes meanwhile is refused.
    let gate = Gate::start(&["--cores", "0"]);
    let (srv, ev) = gate.appserver();
    let uids: Vec<u64> = (1..=50_000).collect();
    let batch: Vec<client::PushSpec> = (1..=10).map(|m| push_spec(m, &uids, 30_000)).collect();
    srv.push_many_async(&batch).expect("sent");
    // The batch's receipts are taken as they come (so the answers behind them are read); the
    // probes' own receipts are not counted. A push of the batch itself may be refused too (when
    // the gate read it after the first ones' targets were counted waiting): only the accepted
    // pushes' targets get receipts.
    let collector = std::thread::spawn(move || {
        let (mut batch_receipts, mut answers, mut accepted) = (0, 0, 0);
        common::collect_events(&ev, |e| match e {
            client::AppServerEvent::Receipt { message_id, .. } => {
                batch_receipts += usize::from(*message_id <= 10);
                answers == 10 && batch_receipts == accepted
            }
            client::AppServerEvent::PushAnswer { message_id, result, .. } if *message_id <= 10 => {
                answers += 1;
                accepted += result.as_ref().map_or(0, |&n| n as usize);
                answers == 10 && batch_receipts == accepted
            }
            _ => false,
        });
        // The events are handed back, not dropped: dropping them would end the connection the
        // probes still use.
        (batch_receipts, accepted, ev)
    });
    // Probes, one at a time, from the moment the batch is written: the gate refuses one while
    // the batch's targets wait (it reads them in a fraction of the time it takes to write them).
    let mut refused = None;
    for probe in 0..200 {
        match srv.push(&push_spec(100 + probe, &[2_000_000], 30_000)) {
            Ok(_) => {}
            Err(ClientError::Server { code, origin, retry_after_ms, message, .. }) => {
                refused = Some((code, origin, retry_after_ms, message));
                break;
            }
            Err(e) => panic!("probe {probe}: {e:?}"),
        }
    }
    let (code, origin, retry_after_ms, message) = refused.expect("a probe refused while targets waited");
    assert_eq!((code, origin), (ErrorCode::Overloaded, Hop::Gate), "{message}");
    assert!((1_000..=2_000).contains(&retry_after_ms), "a jittered second: {retry_after_ms}");
    assert!(message.contains("waiting"), "{message}");
    // Once written, pushes are taken again; every accepted target of the batch got its receipt,
    // and the first pushes (read before anything waited) were accepted.
    let (batch_receipts, accepted, _ev) = collector.join().expect("receipts");
    assert_eq!(batch_receipts, accepted);
    assert!(accepted >= 50_000, "{accepted}");
    gate.eventually("nothing waiting", || gate.metric("fleetgate_push_targets_waiting", "") == 0.0);
    assert_eq!(srv.push(&push_spec(1_000, &[2_000_000], 30_000)).expect("taken").targets, 1);
    assert!(gate.metric("fleetgate_pushes_refused_total", "reason=\"overloaded\"") >= 1.0);
}
