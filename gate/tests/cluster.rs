//! Cluster mode end to end: real redis-server processes and two gate processes sharing them.
//! A push accepted on one node reaches a driver on the other and its receipt comes back; one
//! uid logged in on two nodes keeps exactly one session; Redis unreachable at start, then
//! back; a node killed ends what waited on it as NodeLost within the lease.

mod common;

use client::AppServerEvent;
use common::{next_push, push_spec, receipts, Gate, EVENTUALLY};
use schema::wire::Outcome;
use schema::Cmd;
use std::time::{Duration, Instant};
use testkit::redis::RedisServer;

/// A gate node named `name` on the Redis at `url`, with a short lease.
fn node(url: &str, name: &str, extra: &[&str]) -> Gate {
    let mut args = vec!["--redis", url, "--node-name", name, "--cluster-lease-ms", "900", "--hold-ms", "0"];
    args.extend_from_slice(extra);
    Gate::start(&args)
}

/// Waits until the node's `/healthz` says the directory is up and it sees `nodes` live nodes.
fn until_clustered(g: &Gate, nodes: usize) {
    g.eventually("the directory up with every node", || {
        let h = g.http_get("/healthz");
        h.contains("directory: up") && h.contains(&format!("{nodes} live nodes"))
    });
}

#[test]
fn a_push_accepted_on_one_node_reaches_a_driver_on_another_and_its_receipt_comes_back() {
    let redis = RedisServer::start().expect("redis-server starts");
    let a = node(&redis.url(), "node-a", &[]);
    let b = node(&redis.url(), "node-b", &[]);
    until_clustered(&a, 2);
    until_clustered(&b, 2);
    let mut driver = b.login(41, 1);
    // The login's claim reaches Redis within a turn of the Redis thread.
    a.eventually("the directory knows uid 41", || {
        redis.command(&["HGET", &cluster::uid_key(41), "node"]).ok().and_then(|r| r.text().map(str::to_owned))
            == Some("node-b".into())
    });
    let (srv, ev) = a.appserver();
    let accepted = srv.push(&push_spec(500, &[41, 42], 30_000)).expect("push accepted on node a");
    assert_eq!(accepted.targets, 2);
    let f = next_push(&mut driver);
    assert_eq!(f.delivery().expect("delivery").message_id, 500);
    driver.ack_push(&f).expect("ack");
    let r = receipts(&ev, 2);
    assert_eq!(r[&(500, 41)], vec![Outcome::Delivered], "the receipt came back to the accepting node");
    assert_eq!(r[&(500, 42)], vec![Outcome::Offline], "a uid no node holds");
    assert!(a.metric("fleetgate_cluster_forwarded_targets_total", "") >= 1.0);
    assert!(b.metric("fleetgate_cluster_received_targets_total", "") >= 1.0);
    // Nothing more comes for this push.
    std::thread::sleep(Duration::from_millis(300));
    while let Ok(e) = ev.try_recv() {
        assert!(!matches!(e, AppServerEvent::Receipt { .. }), "extra receipt {e:?}");
    }
}

#[test]
fn one_uid_logged_in_on_two_nodes_keeps_exactly_one_session() {
    let redis = RedisServer::start().expect("redis-server starts");
    let a = node(&redis.url(), "node-a", &[]);
    let b = node(&redis.url(), "node-b", &[]);
    until_clustered(&a, 2);
    until_clustered(&b, 2);
    // One after the other: the newer login (on b) survives, the older one is displaced.
    let mut first = a.login(7, 1);
    a.eventually("claimed", || {
        redis.command(&["HGET", &cluster::uid_key(7), "node"]).ok().and_then(|r| r.text().map(str::to_owned))
            == Some("node-a".into())
    });
    let _second = b.login(7, 1);
    let deadline = Instant::now() + EVENTUALLY;
    let mut displaced = false;
    while Instant::now() < deadline {
        match first.recv() {
            Ok(f) if f.cmd == Cmd::GoAway => {
                displaced = true;
                break;
            }
            Ok(_) => continue,
            Err(_) => {
                displaced = true;
                break;
            }
        }
    }
    assert!(displaced, "the older session on node a ended");
    b.eventually("node b holds uid 7", || {
        redis.command(&["HGET", &cluster::uid_key(7), "node"]).ok().and_then(|r| r.text().map(str::to_owned))
            == Some("node-b".into())
    });
    // At once on both nodes, many times: exactly one session per uid survives.
    let mut keep = Vec::new();
    for uid in 100..110u64 {
        let (ua, ub) = (a.connect(), b.connect());
        let t = std::thread::spawn(move || {
            let mut ua = ua;
            let ok = ua.login(&common::token(uid, 1), "t").is_ok();
            (ua, ok)
        });
        let mut ub = ub;
        let okb = ub.login(&common::token(uid, 1), "t").is_ok();
        let (ua, oka) = t.join().expect("thread");
        assert!(oka && okb, "both logins answered");
        keep.push((uid, ua, ub));
    }
    let sessions = |g: &Gate| g.metric("fleetgate_directory_sessions", "");
    a.eventually("one session per uid across the nodes", || {
        // uid 7's session is on b; each of the ten uids on exactly one node.
        sessions(&a) + sessions(&b) == 11.0
    });
}

#[test]
fn redis_unreachable_at_start_then_back() {
    let port = testkit::redis::free_port().expect("a free port");
    let url = format!("redis://127.0.0.1:{port}");
    let a = node(&url, "node-a", &[]);
    a.eventually("healthz says degraded", || a.http_get("/healthz").starts_with("degraded"));
    // Local sessions work without Redis.
    let mut c = a.login(9, 1);
    c.keepalive().expect("keepalive");
    let (srv, ev) = a.appserver();
    srv.push(&push_spec(1, &[9, 10], 30_000)).expect("push accepted");
    let f = next_push(&mut c);
    c.ack_push(&f).expect("ack");
    let r = receipts(&ev, 2);
    assert_eq!(r[&(1, 9)], vec![Outcome::Delivered]);
    assert_eq!(
        r[&(1, 10)],
        vec![Outcome::DirectoryUnavailable],
        "not here, and the directory cannot be asked"
    );
    // Redis comes up where the node looks for it: the node records its sessions there.
    let redis = RedisServer::start_on(port, None).expect("redis-server starts");
    a.eventually("healthz ok again", || a.http_get("/healthz").starts_with("ok"));
    a.eventually("the session is recorded after the outage", || {
        redis.command(&["HGET", &cluster::uid_key(9), "node"]).ok().and_then(|r| r.text().map(str::to_owned))
            == Some("node-a".into())
    });
}

#[test]
fn a_killed_node_ends_what_waited_on_it_as_node_lost() {
    let redis = RedisServer::start().expect("redis-server starts");
    let a = node(&redis.url(), "node-a", &[]);
    let mut b = node(&redis.url(), "node-b", &[]);
    until_clustered(&a, 2);
    let mut driver = b.login(77, 1);
    a.eventually("claimed", || {
        redis.command(&["HGET", &cluster::uid_key(77), "node"]).ok().and_then(|r| r.text().map(str::to_owned))
            == Some("node-b".into())
    });
    let (srv, ev) = a.appserver();
    srv.push(&push_spec(3, &[77], 60_000)).expect("push accepted");
    let _ = next_push(&mut driver); // received, never acked
    let killed = Instant::now();
    b.kill();
    let r = receipts(&ev, 1);
    assert_eq!(r[&(3, 77)], vec![Outcome::NodeLost]);
    // The lease is 900 ms, renewed every 300 ms; the others look every 300 ms.
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "NodeLost after {took:?}, past the lease bound");
}
