//! Leases and outages against a real redis-server: nodes appear and lapse, Redis dies and comes
//! back, Redis is not there at start.

mod common;

use std::time::{Duration, Instant};

use cluster::{Cmd, Event};
use common::{Node, LEASE_MS, PATIENCE};
use testkit::redis::{free_port, RedisServer, Reply};

const EPOCH: u64 = 1_750_000_000_000 << 8;

fn names(nodes: &[cluster::NodeInfo]) -> Vec<&str> {
    nodes.iter().map(|n| n.name.as_str()).collect()
}

#[test]
fn leases_list_live_nodes_and_lapse_after_a_crash() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    let mut b = Node::start(&redis.url(), "gate-b");
    a.wait_up();
    b.wait_up();
    let both = |n: &[cluster::NodeInfo]| n.len() == 2;
    let seen_by_a = a.wait_nodes(PATIENCE, both).expect("a lists both");
    b.wait_nodes(PATIENCE, both).expect("b lists both");
    assert_eq!(seen_by_a[1], b.info, "b's lease carries its NodeInfo");
    let ttl = redis.command(&["PTTL", "fg:node:gate-b"]).unwrap();
    assert!(matches!(ttl, Reply::Int(ms) if ms > 0 && ms <= LEASE_MS as i64), "{ttl:?}");

    // b dies without a word: its lease lapses within lease_ms (it was renewed at the latest
    // just before), and a sees that at its next renewal (every lease_ms / 3): b leaves a's list
    // at most lease_ms + lease_ms / 3 after the crash. (The slack below is for a busy machine.)
    let slack = Duration::from_millis(300);
    let t = Instant::now();
    b.crash();
    while redis.command(&["EXISTS", "fg:node:gate-b"]).unwrap() == Reply::Int(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let lapsed_after = t.elapsed();
    let left = a.wait_nodes(PATIENCE, |n| names(n) == ["gate-a"]).expect("b leaves a's list");
    let gone_after = t.elapsed();
    println!(
        "crashed node: lease lapsed after {} ms (bound {LEASE_MS}), left a's list after {} ms (bound {})",
        lapsed_after.as_millis(),
        gone_after.as_millis(),
        LEASE_MS + LEASE_MS / 3
    );
    assert_eq!(left.len(), 1);
    assert!(lapsed_after <= Duration::from_millis(LEASE_MS) + slack, "{lapsed_after:?}");
    assert!(gone_after <= Duration::from_millis(LEASE_MS + LEASE_MS / 3) + slack, "{gone_after:?}");

    // Restarted under the same name, it has a new incarnation.
    let mut b2 = Node::start(&redis.url(), "gate-b");
    b2.wait_up();
    let back = a.wait_nodes(PATIENCE, both).expect("b is back");
    assert_eq!(back[1].incarnation, b2.info.incarnation);
    assert_ne!(b2.info.incarnation, b.info.incarnation);

    // An advertisement rewrites the lease at once.
    let mut changed = b2.info.clone();
    changed.has_appserver = true;
    b2.send(vec![Cmd::Advertise(changed)]);
    a.wait_nodes(PATIENCE, |n| n.len() == 2 && n[1].has_appserver).expect("a sees the app-server");

    // A clean stop deletes the lease: gone at a's next renewal, before any lapse could explain it.
    let t = Instant::now();
    b2.stop();
    a.wait_nodes(Duration::from_millis(LEASE_MS), |n| names(n) == ["gate-a"]).expect("stopped node gone");
    println!("a stopped node left the list after {} ms", t.elapsed().as_millis());
    assert_eq!(redis.command(&["EXISTS", "fg:node:gate-b"]).unwrap(), Reply::Int(0));
    assert_eq!(redis.command(&["SISMEMBER", "fg:nodes", "gate-b"]).unwrap(), Reply::Int(0));
}

#[test]
fn redis_restart_fails_fast_then_asks_to_reregister() {
    let mut redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    assert!(!a.wait_up());
    assert_eq!(a.claim(1, EPOCH, 0), (true, None));
    // Written to disk, so the restarted server has uid 1's entry (for the replayed release).
    assert_eq!(redis.command(&["SAVE"]).unwrap(), Reply::Status("OK".into()));

    redis.kill();
    let detail = a.wait_down();
    println!("down: {detail}");
    assert!(!a.handle().status().0);
    // While down, commands are answered at once.
    let t = Instant::now();
    let tag = a.tag();
    a.send(vec![Cmd::Claim { uid: 2, epoch: EPOCH, shard: 0 }, Cmd::Lookup { uids: vec![1], tag }]);
    let claim = a.wait("unavailable claim", |e| matches!(e, Event::Unavailable { uid: Some(2), .. }));
    a.wait("unavailable lookup", |e| matches!(e, Event::Unavailable { tag: Some(t), .. } if *t == tag));
    let took = t.elapsed();
    println!("unavailable after {} us: {claim:?}", took.as_micros());
    assert!(took < Duration::from_secs(1), "fails fast: {took:?}");
    let Event::Unavailable { retry_after_ms, epoch, .. } = claim else { unreachable!() };
    assert!((1..=2000).contains(&retry_after_ms), "{retry_after_ms}");
    assert_eq!(epoch, Some(EPOCH));
    // A release while down is kept and replayed after the return.
    a.send(vec![Cmd::Release { uid: 1, epoch: EPOCH }]);

    redis.restart().unwrap();
    let log = std::fs::read_to_string(redis.log_path()).unwrap();
    assert!(log.contains("DB loaded from disk"), "the restarted server has uid 1's entry");
    assert!(a.wait_up(), "a return after a loss asks for re-registration");
    assert_eq!(a.handle().ops(), 2, "the first claim, and the replayed release");
    // The lease is back before Up was sent, and the release was replayed.
    assert_eq!(redis.command(&["EXISTS", "fg:node:gate-a"]).unwrap(), Reply::Int(1));
    assert_eq!(redis.command(&["EXISTS", "fg:u:{1}"]).unwrap(), Reply::Int(0));
    assert!(a.handle().status().0);
    // Claims work again (re-registering the session that was there before).
    assert_eq!(a.claim(2, EPOCH, 0), (true, None));
    assert_eq!(a.claim(2, EPOCH, 0), (true, None), "a re-claim of the same session is a harmless repeat");
}

#[test]
fn unreachable_at_start_comes_up_when_redis_starts() {
    let port = free_port().unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    let mut a = Node::start(&url, "gate-a");
    let detail = a.wait_down();
    println!("down at start: {detail}");
    assert_eq!(a.handle().status(), (false, detail));
    let t = Instant::now();
    a.send(vec![Cmd::Claim { uid: 1, epoch: EPOCH, shard: 0 }]);
    a.wait("unavailable", |e| matches!(e, Event::Unavailable { uid: Some(1), .. }));
    assert!(t.elapsed() < Duration::from_secs(1));

    let redis = RedisServer::start_on(port, None).unwrap();
    // Commands failed meanwhile, so this Up asks for re-registration too.
    assert!(a.wait_up());
    assert_eq!(a.claim(1, EPOCH, 0), (true, None));
    assert_eq!(redis.command(&["EXISTS", "fg:node:gate-a"]).unwrap(), Reply::Int(1));
}

#[test]
fn a_silent_server_times_out_and_a_full_queue_hands_batches_back() {
    // A port that completes TCP handshakes (the kernel's backlog) but never answers: the
    // thread's connect attempt hangs until the command timeout, and meanwhile the queue fills.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let cfg = cluster::Config { max_queue: 2, ..common::config(&url) };
    let mut a = Node::start_with(cfg, common::info("gate-a"));
    // The attempt hangs for command_timeout_ms (500): send in its middle.
    std::thread::sleep(Duration::from_millis(200));
    let mut accepted = 0;
    for uid in 0..10u64 {
        match a.handle().send(vec![Cmd::Claim { uid, epoch: EPOCH, shard: 0 }]) {
            Ok(()) => accepted += 1,
            Err(cluster::Full(back)) => assert_eq!(back, vec![Cmd::Claim { uid, epoch: EPOCH, shard: 0 }]),
        }
    }
    assert_eq!(accepted, 2, "max_queue batches accepted, the rest handed back");
    let detail = a.wait_down();
    println!("down: {detail}");
    for _ in 0..accepted {
        a.wait("answer", |e| matches!(e, Event::Unavailable { uid: Some(_), .. }));
    }
}

#[test]
fn a_hung_redis_times_commands_out_and_counts_as_lost_after_a_lease() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    let pid = redis.pid().unwrap().to_string();
    let signal =
        |sig: &str| assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let t = Instant::now();
    a.send(vec![Cmd::Claim { uid: 1, epoch: EPOCH, shard: 0 }]);
    let e = a.wait("unavailable", |e| matches!(e, Event::Unavailable { uid: Some(1), .. }));
    let took = t.elapsed();
    println!("hung redis: unavailable after {} ms: {e:?}", took.as_millis());
    assert!(took < Duration::from_secs(2), "{took:?}");
    // No lease renewal for lease_ms: the connection counts as lost.
    let detail = a.wait_down();
    println!("down: {detail}");
    signal("-CONT");
    assert!(a.wait_up());
    assert_eq!(a.claim(1, EPOCH, 0), (true, None));
}

#[test]
fn stop_answers_what_is_queued_and_drop_abandons() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    a.send((1..=50).map(|uid| Cmd::Claim { uid, epoch: EPOCH, shard: 0 }).collect());
    a.stop();
    for _ in 1..=50 {
        a.wait("answer", |e| matches!(e, Event::Claimed { .. } | Event::Unavailable { .. }));
    }
    assert_eq!(redis.command(&["EXISTS", "fg:node:gate-a"]).unwrap(), Reply::Int(0));

    let mut b = Node::start(&redis.url(), "gate-b");
    b.wait_up();
    b.crash();
    let ttl = redis.command(&["PTTL", "fg:node:gate-b"]).unwrap();
    assert!(matches!(ttl, Reply::Int(ms) if ms > 0), "an abandoned lease is left to lapse: {ttl:?}");
}
