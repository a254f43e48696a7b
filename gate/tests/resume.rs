//! Sessions outliving TCP against a real gate: hold and resume (same shard and another shard),
//! replay order with the redelivery flag, duplicate suppression, hold expiry with receipts and
//! the unreachable callback, forged and replayed tokens, and a random-disconnect audit.

mod common;

use client::{AppServerEvent, ClientError};
use common::{collect_events, next_push, push_spec, token, Gate};
use schema::wire::{ErrorCode, Outcome};
use schema::Cmd;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Drops the TCP connection without logout and waits until the gate holds the session.
fn drop_and_wait_held(gate: &Gate, c: client::AppConn, held_before: f64) {
    c.shutdown().expect("shutdown");
    drop(c);
    gate.eventually("the session is held", || gate.metric("fleetgate_held_sessions", "") > held_before);
}

#[test]
fn a_held_session_resumes_with_its_queued_pushes_in_order() {
    let gate = Gate::start(&["--hold-ms", "10000"]);
    let (srv, ev) = gate.appserver();
    let mut c = gate.login(1, 1);
    let s = c.session().expect("session").clone();
    assert_eq!(s.hold_ms, 10_000);
    assert!(!s.resume_token.is_empty());
    srv.push(&push_spec(1, &[1], 30_000)).expect("push 1");
    let first = next_push(&mut c);
    assert!(!first.is_redelivery());
    // Not acked: the drop keeps it in flight.
    drop_and_wait_held(&gate, c, 0.0);
    for m in 2..=4 {
        srv.push(&push_spec(m, &[1], 30_000)).expect("push while held");
    }
    let mut c = gate.connect();
    let resumed = c.resume(&s.resume_token).expect("resume");
    assert_eq!(resumed.uid, 1);
    assert_eq!(resumed.session_epoch, s.session_epoch, "the same session continues");
    assert_ne!(resumed.resume_token, s.resume_token, "the token is rotated");
    let mut order = Vec::new();
    for _ in 0..4 {
        let f = next_push(&mut c);
        let d = f.delivery().expect("delivery");
        order.push((d.message_id, f.is_redelivery()));
        c.ack_push(&f).expect("ack");
    }
    assert_eq!(order, vec![(1, true), (2, false), (3, false), (4, false)]);
    let mut r = HashMap::new();
    collect_events(&ev, |e| {
        if let AppServerEvent::Receipt { message_id, outcome, .. } = e {
            assert!(r.insert(*message_id, *outcome).is_none(), "one receipt per push");
        }
        r.len() == 4
    });
    assert!(r.values().all(|o| *o == Outcome::Delivered));
    // The old token was used: a replay is refused.
    let mut again = gate.connect();
    match again.resume(&s.resume_token) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ResumeRefused),
        other => panic!("{other:?}"),
    }
}

#[test]
fn resumes_land_on_any_shard_and_attach_to_the_session() {
    let gate = Gate::start(&["--cores", "all", "--hold-ms", "10000"]);
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (srv, ev) = gate.appserver();
    let mut tokens = Vec::new();
    for uid in 1..=30u64 {
        let c = gate.login(uid, 1);
        tokens.push((uid, c.session().expect("session").resume_token.clone()));
        c.shutdown().expect("drop");
    }
    gate.eventually("all held", || gate.metric("fleetgate_held_sessions", "") == 30.0);
    let uids: Vec<u64> = (1..=30).collect();
    srv.push(&push_spec(77, &uids, 30_000)).expect("push to held sessions");
    for (uid, t) in &tokens {
        let mut c = gate.connect();
        assert_eq!(c.resume(t).expect("resume").uid, *uid);
        let f = next_push(&mut c);
        c.ack_push(&f).expect("ack");
    }
    let mut n = 0;
    collect_events(&ev, |e| {
        if let AppServerEvent::Receipt { outcome, .. } = e {
            assert_eq!(*outcome, Outcome::Delivered);
            n += 1;
        }
        n == 30
    });
    assert_eq!(gate.metric("fleetgate_resumes_total", ""), 30.0);
    if shards > 1 {
        // SO_REUSEPORT spreads the new connections: some came back on another shard.
        assert!(gate.metric("fleetgate_resumes_moved_total", "") > 0.0, "no resume crossed shards");
    }
}

#[test]
fn an_expired_hold_gives_hold_expired_receipts_and_an_unreachable_callback() {
    let gate = Gate::start(&["--hold-ms", "400"]);
    let (srv, ev) = gate.appserver();
    let c = gate.login(5, 1);
    let t = c.session().expect("session").resume_token.clone();
    drop_and_wait_held(&gate, c, 0.0);
    srv.push(&push_spec(9, &[5], 60_000)).expect("push while held");
    let (mut receipt, mut unreachable) = (None, false);
    collect_events(&ev, |e| {
        match e {
            AppServerEvent::Receipt { message_id: 9, uid: 5, outcome } => receipt = Some(*outcome),
            AppServerEvent::Unreachable { uid: 5, outcome } => {
                assert_eq!(*outcome, Outcome::HoldExpired);
                unreachable = true;
            }
            _ => {}
        }
        receipt.is_some() && unreachable
    });
    assert_eq!(receipt, Some(Outcome::HoldExpired));
    gate.eventually("directory entry removed", || gate.metric("fleetgate_directory_sessions", "") == 0.0);
    let mut c = gate.connect();
    match c.resume(&t) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ResumeRefused),
        other => panic!("{other:?}"),
    }
    c.login(&token(5, 1), "t").expect("a fresh login after a refused resume");
}

#[test]
fn forged_tokens_are_refused_and_the_connection_can_still_log_in() {
    let gate = Gate::start(&[]);
    let c = gate.login(6, 1);
    let mut t = c.session().expect("session").resume_token.clone();
    t[2] ^= 0x40; // another uid under the same MAC
    let mut other = gate.connect();
    match other.resume(&t) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ResumeRefused),
        r => panic!("{r:?}"),
    }
    let forged = schema::token::issue_resume(
        b"not-the-secret",
        schema::token::ResumeClaims { uid: 6, epoch: 1, resumes: 0 },
    );
    match other.resume(&forged) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ResumeRefused),
        r => panic!("{r:?}"),
    }
    other.login(&token(7, 1), "t").expect("login still works");
}

#[test]
fn resuming_while_the_old_connection_lingers_displaces_it() {
    let gate = Gate::start(&[]);
    let mut old = gate.login(8, 1);
    let t = old.session().expect("session").resume_token.clone();
    let mut new = gate.connect();
    new.resume(&t).expect("resume while the old connection is still open");
    let f = old.recv().expect("go-away");
    assert_eq!(f.go_away().expect("go-away").reason(), schema::wire::GoAwayReason::Displaced);
    new.keepalive().expect("the session lives on the new connection");
}

/// Random disconnects under a steady stream of pushes: every push target gets exactly one
/// receipt, every delivered push reached its app (after the app's own de-duplication) exactly
/// once, and none is lost.
#[test]
fn random_disconnect_audit() {
    let gate = Gate::start(&["--cores", "all", "--hold-ms", "5000"]);
    let (srv, ev) = gate.appserver();
    const APPS: u64 = 24;
    let mut apps: Vec<(client::AppConn, Vec<u8>)> = (1..=APPS)
        .map(|u| {
            let c = gate.login(u, 1);
            let t = c.session().expect("session").resume_token.clone();
            (c, t)
        })
        .collect();
    for (c, _) in apps.iter_mut() {
        c.set_read_timeout(Duration::from_millis(5)).expect("timeout");
    }
    let mut seen: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut shown_twice = 0;
    let mut accepted = 0usize;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for m in 1..=40u64 {
        let targets: Vec<u64> = (1..=APPS).filter(|_| next() % 2 == 0).collect();
        accepted += srv.push(&push_spec(m, &targets, 60_000)).expect("push").targets as usize;
        for (i, (c, t)) in apps.iter_mut().enumerate() {
            let uid = i as u64 + 1;
            // Read what arrived; ack everything; show each message id once.
            let mut lose_ack = false;
            loop {
                match c.recv() {
                    Ok(f) if f.cmd == Cmd::PushDelivery => {
                        let id = f.delivery().expect("delivery").message_id;
                        if !seen.entry(uid).or_default().insert(id) && !f.is_redelivery() {
                            shown_twice += 1;
                        }
                        // Sometimes the ack is lost with the connection: drop before acking.
                        if next() % 11 == 0 {
                            lose_ack = true;
                            break;
                        }
                        c.ack_push(&f).expect("ack");
                    }
                    Ok(_) => {}
                    Err(ClientError::Timeout) => break,
                    Err(e) => panic!("uid {uid}: {e}"),
                }
            }
            if lose_ack || next() % 7 == 0 {
                // Drop and resume (on whatever shard the new connection lands).
                let _ = c.shutdown();
                let mut n = gate.connect();
                let s = n.resume(t).expect("resume");
                *t = s.resume_token;
                n.set_read_timeout(Duration::from_millis(5)).expect("timeout");
                *c = n;
            }
        }
    }
    // Drain: keep reading and acking until every receipt is in.
    let mut receipts: HashMap<(u64, u64), Vec<Outcome>> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while receipts.values().map(Vec::len).sum::<usize>() < accepted {
        assert!(std::time::Instant::now() < deadline, "lost receipts: {} of {accepted}", receipts.len());
        for (i, (c, _)) in apps.iter_mut().enumerate() {
            while let Ok(f) = c.recv() {
                if f.cmd == Cmd::PushDelivery {
                    let id = f.delivery().expect("delivery").message_id;
                    seen.entry(i as u64 + 1).or_default().insert(id);
                    c.ack_push(&f).expect("ack");
                }
            }
        }
        while let Ok(e) = ev.try_recv() {
            if let AppServerEvent::Receipt { message_id, uid, outcome } = e {
                receipts.entry((message_id, uid)).or_default().push(outcome);
            }
        }
    }
    assert_eq!(shown_twice, 0, "an app was shown a push twice without the redelivery flag");
    let lost: Vec<_> = receipts.iter().filter(|(_, o)| o.len() != 1).collect();
    assert!(lost.is_empty(), "targets without exactly one receipt: {lost:?}");
    for ((m, uid), o) in &receipts {
        if o[0] == Outcome::Delivered {
            assert!(
                seen.get(uid).is_some_and(|s| s.contains(m)),
                "delivered {m} to {uid} but the app never saw it"
            );
        }
    }
    assert_eq!(receipts.len(), accepted);
    assert!(
        receipts.values().all(|o| o[0] == Outcome::Delivered),
        "with long TTL and hold, all get delivered"
    );
}
