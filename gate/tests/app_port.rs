//! The app port end to end against a real gate process: login on several shards, keepalive,
//! GPS coalescing, displacement, logout, timeouts, metrics, graceful shutdown.

mod common;

use client::ClientError;
use common::{point, sum_metric, token, Gate, EVENTUALLY};
use schema::wire::{ErrorCode, GoAwayReason};
use schema::Cmd;
use std::collections::HashMap;

/// Reads until a GoAway arrives; returns its reason.
fn expect_go_away(c: &mut client::AppConn) -> GoAwayReason {
    loop {
        let f = c.recv().expect("a go-away before the close");
        if let Some(g) = f.go_away() {
            return g.reason();
        }
    }
}

#[test]
fn many_logins_on_both_shards_gps_coalesced_and_counted() {
    let gate = Gate::start(&["--cores", "all"]);
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
    let drivers: Vec<_> = (1..=120u64).map(|uid| (uid, gate.login(uid, 1))).collect();
    // Each driver sends 5 points, newest last; one flush must forward only the newest.
    let mut sent = 0;
    let mut drivers = drivers;
    for (uid, c) in drivers.iter_mut() {
        for i in 0..4u64 {
            c.send_gps(*uid, &point(1_000 + i, *uid as i32)).expect("gps");
            sent += 1;
        }
        c.send_gps_batch(*uid, &[point(2_000, *uid as i32)]).expect("gps batch");
        sent += 1;
    }
    gate.eventually("every driver's newest point forwarded", || {
        let body = gate.http_get("/debug/gps");
        let latest: HashMap<u64, u64> = body
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .collect();
        (1..=120u64).all(|uid| latest.get(&uid) == Some(&2_000))
    });
    let m = gate.http_get("/metrics");
    assert_eq!(sum_metric(&m, "fleetgate_gps_points_in_total", ""), sent as f64);
    assert_eq!(sum_metric(&m, "fleetgate_sessions", ""), 120.0);
    assert_eq!(sum_metric(&m, "fleetgate_directory_sessions", ""), 120.0);
    let forwarded = sum_metric(&m, "fleetgate_gps_points_forwarded_total", "");
    let coalesced = sum_metric(&m, "fleetgate_gps_points_coalesced_total", "");
    assert!(forwarded >= 120.0 && forwarded < sent as f64, "forwarded {forwarded} of {sent}");
    assert_eq!(forwarded + coalesced, sent as f64, "every point is either forwarded or coalesced");
    for s in 0..shards {
        let label = format!("shard=\"{s}\"");
        assert!(sum_metric(&m, "fleetgate_sessions", &label) > 0.0, "shard {s} holds no session:\n{m}");
        assert!(sum_metric(&m, "fleetgate_frames_in_total", &format!("{label},cmd=\"Login\"")) > 0.0);
    }
    // Keepalive answers on every connection.
    for (_, c) in drivers.iter_mut().take(10) {
        c.keepalive().expect("keepalive");
    }
}

#[test]
fn gps_forward_all_keeps_every_point() {
    let gate = Gate::start(&["--cores", "0", "--gps-forward", "all"]);
    let mut c = gate.login(9, 1);
    for i in 0..50u64 {
        c.send_gps(0, &point(i, 1)).expect("gps");
    }
    gate.eventually("all 50 points forwarded", || {
        gate.metric("fleetgate_gps_points_forwarded_total", "") == 50.0
    });
    assert_eq!(gate.metric("fleetgate_gps_points_coalesced_total", ""), 0.0);
}

#[test]
fn second_login_displaces_the_first() {
    let gate = Gate::start(&[]);
    let mut a = gate.login(7, 1);
    let mut b = gate.login(7, 1);
    assert_eq!(expect_go_away(&mut a), GoAwayReason::Displaced);
    assert!(matches!(a.recv(), Err(ClientError::Closed)));
    b.keepalive().expect("the newer session works");
    gate.eventually("one session left", || gate.metric("fleetgate_directory_sessions", "") == 1.0);
}

#[test]
fn logout_answers_then_closes_and_ends_the_session() {
    let gate = Gate::start(&[]);
    let mut c = gate.login(11, 2);
    c.logout().expect("logout answered");
    let mut closed = false;
    for _ in 0..4 {
        match c.recv() {
            Err(ClientError::Closed) => {
                closed = true;
                break;
            }
            Ok(f) => assert!(f.go_away().is_some() || f.cmd == Cmd::Logout, "{f:?}"),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(closed);
    gate.eventually("no session left", || gate.metric("fleetgate_directory_sessions", "") == 0.0);
}

#[test]
fn passengers_may_not_report_gps() {
    let gate = Gate::start(&[]);
    let mut c = gate.login(12, 2);
    c.send_gps(77, &point(1, 1)).expect("send");
    let f = c.recv().expect("an error frame");
    let e = f.error().expect("error");
    assert_eq!(e.code, ErrorCode::NotAllowed);
    assert_eq!(f.log_id(), 77, "the error echoes the log-id");
    c.keepalive().expect("connection stays");
}

#[test]
fn idle_connections_are_closed_with_a_reason() {
    let gate = Gate::start(&["--heartbeat-ms", "100", "--idle-timeout-ms", "400", "--hold-ms", "0"]);
    let mut c = gate.login(13, 1);
    let t = std::time::Instant::now();
    assert_eq!(expect_go_away(&mut c), GoAwayReason::IdleTimeout);
    assert!(t.elapsed() < EVENTUALLY);
    gate.eventually("session ended", || gate.metric("fleetgate_directory_sessions", "") == 0.0);
}

#[test]
fn no_login_within_the_timeout_is_closed() {
    let gate = Gate::start(&["--login-timeout-ms", "300"]);
    let mut c = gate.connect();
    common::expect_refusal(&mut c, ErrorCode::NotLoggedIn);
    assert!(matches!(c.recv(), Err(ClientError::Closed | ClientError::Channel(_))));
}

#[test]
fn sigterm_sends_go_away_and_exits_zero() {
    let mut gate = Gate::start(&[]);
    let mut c = gate.login(14, 1);
    let st = gate.terminate();
    assert_eq!(expect_go_away(&mut c), GoAwayReason::Shutdown);
    assert!(st.success(), "exit status {st:?}");
}

#[test]
fn resume_is_refused_until_sessions_are_held() {
    let gate = Gate::start(&[]);
    let mut c = gate.connect();
    match c.resume(b"not-a-token") {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::ResumeRefused),
        other => panic!("{other:?}"),
    }
    c.login(&token(15, 1), "t").expect("login after a refused resume");
}

#[test]
fn metrics_and_healthz_answer() {
    let gate = Gate::start(&[]);
    assert_eq!(gate.http_get("/healthz"), "ok\n");
    let m = gate.http_get("/metrics");
    assert!(m.contains("# TYPE fleetgate_connections gauge"));
    assert!(m.contains("fleetgate_mesh_hop_us_bucket"));
}
