//! The sidecar end to end: an app-server pushes to online, offline and displaced drivers and gets
//! exactly one receipt per target; upstream requests pipelined and answered out of order; an
//! absent or slow app-server; a sidecar connection dropping mid-stream; a wrong secret; GPS and
//! shutdown receipts; EndSession of a connected, a held and an absent session.

mod common;

use client::{AppServerEvent, ClientError};
use common::{collect_events, next_push, point, push_spec, receipts, Gate, EVENTUALLY};
use schema::wire::{ErrorCode, GoAwayReason, Hop, Outcome};
use schema::Body;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn push_to_online_offline_and_displaced_each_get_one_receipt() {
    let gate = Gate::start(&["--hold-ms", "0"]);
    let (srv, ev) = gate.appserver();
    let mut online = gate.login(1, 1);
    let mut displaced = gate.login(2, 1);
    let accepted = srv.push(&push_spec(100, &[1, 2, 3, 1], 30_000)).expect("push accepted");
    assert_eq!(accepted.targets, 3, "uid 1 named twice counts once");
    let f = next_push(&mut online);
    let d = f.delivery().expect("delivery");
    assert_eq!((d.message_id, d.payload), (100, &b"order 100"[..]));
    assert_eq!(f.log_id(), 0xABC0_0000 + 100, "the push's log-id reaches the app");
    online.ack_push(&f).expect("ack");
    let _ = next_push(&mut displaced); // received, never acked
    let _newer = gate.login(2, 1); // displaces the session that holds the push
    let r = receipts(&ev, 3);
    assert_eq!(r[&(100, 1)], vec![Outcome::Delivered]);
    assert_eq!(r[&(100, 2)], vec![Outcome::Displaced]);
    assert_eq!(r[&(100, 3)], vec![Outcome::Offline]);
    // Nothing more can come for this push: no push is in flight any more, and the gate sent
    // exactly the three receipts the client saw (the client de-duplicates nothing here: a
    // fourth would show in the counter).
    gate.eventually("nothing in flight", || gate.metric("fleetgate_pushes_in_flight", "") == 0.0);
    assert_eq!(gate.metric("fleetgate_receipts_sent_total", ""), 3.0);
    while let Ok(e) = ev.try_recv() {
        assert!(!matches!(e, AppServerEvent::Receipt { .. }), "extra receipt {e:?}");
    }
}

#[test]
fn unacked_push_expires_with_ttl_expired() {
    let gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let mut c = gate.login(5, 1);
    srv.push(&push_spec(7, &[5], 300)).expect("push");
    let _ = next_push(&mut c);
    assert_eq!(receipts(&ev, 1)[&(7, 5)], vec![Outcome::TtlExpired]);
}

#[test]
fn broadcast_reaches_every_driver_once() {
    let gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let mut drivers: Vec<_> = (1..=6).map(|u| gate.login(u, 1)).collect();
    let _passenger = gate.login(50, 2);
    let mut spec = push_spec(9, &[], 30_000);
    spec.broadcast = 1;
    srv.push(&spec).expect("broadcast");
    for d in drivers.iter_mut() {
        let f = next_push(d);
        d.ack_push(&f).expect("ack");
    }
    let r = receipts(&ev, 6);
    assert_eq!(r.len(), 6);
    assert!(r.values().all(|o| o == &vec![Outcome::Delivered]));
}

#[test]
fn pipelined_requests_are_answered_out_of_order_and_matched() {
    let gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let mut app = gate.login(10, 2);
    let a = app.place_order(1, 2, 3, 4, b"a").expect("a");
    let b = app.grab_order(77, b"b").expect("b");
    let c = app.business_request("c", b"c").expect("c");
    let mut reqs = Vec::new();
    collect_events(&ev, |e| {
        if let AppServerEvent::Upstream(r) = e {
            reqs.push(r.clone());
        }
        reqs.len() == 3
    });
    assert!(reqs.iter().all(|r| r.uid == 10 && r.role == 2));
    // Answer in reverse order, each with its own payload.
    for r in reqs.iter().rev() {
        let tag = match r.app_body().expect("verified body") {
            Body::PlaceOrder(p) => p.payload().map(|p| p.bytes().to_vec()),
            Body::GrabOrder(g) => g.payload().map(|p| p.bytes().to_vec()),
            Body::BusinessRequest(b) => b.payload().map(|p| p.bytes().to_vec()),
            other => panic!("{other:?}"),
        }
        .expect("payload");
        srv.reply(r, 0, "ok", &[b"re-".as_slice(), &tag].concat()).expect("reply");
    }
    for (seq, want) in [(c, "re-c"), (a, "re-a"), (b, "re-b")] {
        let r = app.wait_reply(seq).expect("reply");
        assert_eq!(r.payload, want.as_bytes(), "seq {seq}");
    }
}

#[test]
fn no_app_server_and_a_slow_one_give_errors_naming_the_app_server() {
    let gate = Gate::start(&["--request-timeout-ms", "300"]);
    let mut app = gate.login(11, 2);
    let seq = app.place_order(1, 2, 3, 4, b"x").expect("send");
    let log_id = app.last_log_id();
    match app.wait_reply(seq) {
        Err(ClientError::Server { code, origin, log_id: l, .. }) => {
            assert_eq!((code, origin, l), (ErrorCode::NoAppServer, Hop::AppServer, log_id));
        }
        other => panic!("{other:?}"),
    }
    let (_srv, ev) = gate.appserver(); // connected, never answers
    let seq = app.place_order(1, 2, 3, 4, b"y").expect("send");
    collect_events(&ev, |e| matches!(e, AppServerEvent::Upstream(_)));
    match app.wait_reply(seq) {
        Err(ClientError::Server { code, origin, .. }) => {
            assert_eq!((code, origin), (ErrorCode::Timeout, Hop::AppServer))
        }
        other => panic!("{other:?}"),
    }
    assert!(gate.log_text().contains(&format!("log_id={log_id}")), "the gate logs the flow's log-id");
}

#[test]
fn a_wrong_secret_is_refused_and_logged() {
    let gate = Gate::start(&[]);
    match client::AppServerConn::connect(gate.sidecar, b"wrong", "intruder", Duration::from_secs(5)) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::BadSecret),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a wrong secret was accepted"),
    }
    gate.eventually("the refusal is logged", || gate.log_text().contains("wrong secret"));
}

#[test]
fn receipts_survive_a_sidecar_connection_dropping_mid_stream() {
    let gate = Gate::start(&[]);
    let (a, ev) = gate.appserver();
    let b = a.connect_another().expect("second connection");
    let uids: Vec<u64> = (1..=40).collect();
    let mut apps: Vec<_> = uids.iter().map(|&u| gate.login(u, 1)).collect();
    for m in 0..10u64 {
        b.push(&push_spec(1_000 + m, &uids, 30_000)).expect("push");
    }
    // Every app acks every push while connection A goes away mid-stream.
    for (i, app) in apps.iter_mut().enumerate() {
        if i == 20 {
            a.close().expect("drop A");
        }
        for _ in 0..10 {
            let f = next_push(app);
            app.ack_push(&f).expect("ack");
        }
    }
    let r = receipts(&ev, 400);
    assert_eq!(r.len(), 400);
    assert!(r.values().all(|o| o == &vec![Outcome::Delivered]), "{r:?}");
}

#[test]
fn coalesced_gps_reaches_the_app_server() {
    let gate = Gate::start(&[]);
    let (_srv, ev) = gate.appserver();
    let mut d = gate.login(21, 1);
    for ts in 1..=5 {
        d.send_gps(1, &point(ts, 7)).expect("gps");
    }
    let (mut last, mut forwarded) = (0, 0);
    collect_events(&ev, |e| {
        if let AppServerEvent::Gps(points) = e {
            for p in points.iter().filter(|p| p.uid() == 21) {
                last = p.point().ts_ms();
                forwarded += 1;
            }
        }
        last == 5
    });
    // Five points sent back to back fall in one flush interval, or straddle one boundary at
    // most: coalescing forwards at most two of them (forward-all would forward five).
    assert!(forwarded <= 2, "{forwarded} of 5 points forwarded: not coalesced");
    assert!(gate.metric("fleetgate_gps_points_coalesced_total", "") >= 3.0);
}

#[test]
fn shutdown_gives_every_pending_push_its_receipt() {
    let mut gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let mut d = gate.login(31, 1);
    srv.push(&push_spec(5, &[31, 32], 60_000)).expect("push");
    let _ = next_push(&mut d); // never acked
    let st = gate.terminate();
    assert!(st.success(), "the gate exited with {st}; log:\n{}", gate.log_text());
    let mut got = HashMap::new();
    collect_events(&ev, |e| {
        if let AppServerEvent::Receipt { message_id, uid, outcome } = e {
            got.insert((*message_id, *uid), *outcome);
        }
        matches!(e, AppServerEvent::GateLost) || got.len() == 2
    });
    assert_eq!(got[&(5, 32)], Outcome::Offline);
    assert_eq!(got[&(5, 31)], Outcome::Shutdown, "a receipt from the gate, not the client's gate_lost");
    let _ = EVENTUALLY;
}

#[test]
fn end_session_ends_a_connected_or_held_session_and_says_when_there_is_none() {
    let gate = Gate::start(&["--hold-ms", "60000"]);
    let (srv, ev) = gate.appserver();
    let mut d = gate.login(91, 1);
    srv.push(&push_spec(5, &[91], 30_000)).expect("push");
    let _ = next_push(&mut d); // never acked
    let ended = srv.end_session(91, "banned").expect("answered");
    assert_eq!((ended.uid, ended.found), (91, true));
    assert_eq!(ended.node, srv.welcome().node, "a single gate names itself by its address");
    let g = loop {
        let f = d.recv().expect("the go-away before the close");
        if let Some(g) = f.go_away() {
            break (g.reason(), g.message().unwrap_or("").to_owned());
        }
    };
    assert_eq!(g, (GoAwayReason::Ended, "banned".to_owned()));
    assert_eq!(receipts(&ev, 1)[&(5, 91)], vec![Outcome::Offline]);
    // Held (its connection dropped): ended too, with nothing to tell the app.
    let held = gate.login(92, 1);
    drop(held);
    gate.eventually("held", || gate.metric("fleetgate_held_sessions", "") == 1.0);
    assert!(srv.end_session(92, "").expect("answered").found);
    assert_eq!(gate.metric("fleetgate_held_sessions", ""), 0.0);
    let none = srv.end_session(93, "").expect("answered");
    assert_eq!((none.found, none.node.as_str()), (false, ""));
    // The app-server ended them: no Unreachable events.
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(e) = ev.try_recv() {
        assert!(!matches!(e, AppServerEvent::Unreachable { .. }), "{e:?}");
    }
}
