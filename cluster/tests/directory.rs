//! The directory's rules against a real redis-server (and a real 3-primary Redis Cluster):
//! claims by epoch, moves by compare-and-set, releases by the owner only, batched lookups.

mod common;

use std::time::{Duration, Instant};

use cluster::{Cmd, Event, Handle, Owner};
use common::{median_p99_us, Node, PATIENCE};
use testkit::redis::{RedisCluster, RedisServer, Reply};

/// Epochs as the gate makes them: ms since 1970 shifted left by 8 (about 2^49 today).
const BASE: u64 = 1_750_000_000_000 << 8;

#[test]
fn claim_wins_only_with_a_larger_epoch() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    let mut b = Node::start(&redis.url(), "gate-b");
    assert!(!a.wait_up(), "the first Up after a clean start asks for no re-registration");
    b.wait_up();

    assert_eq!(a.claim(1, BASE + 100, 3), (true, None));
    // A late claim with an older epoch does not clobber the newer entry, and is told who holds it.
    assert_eq!(a.claim(1, BASE + 50, 4), (false, Some(a.owner(BASE + 100, 3))));
    assert_eq!(b.claim(1, BASE + 99, 0), (false, Some(a.owner(BASE + 100, 3))));
    // An equal epoch from another node loses too.
    assert_eq!(b.claim(1, BASE + 100, 0), (false, Some(a.owner(BASE + 100, 3))));
    // The very same claim again (a retry, a re-registration) wins without change.
    assert_eq!(a.claim(1, BASE + 100, 3), (true, None));
    // A newer one wins and names what it replaced.
    assert_eq!(b.claim(1, BASE + 200, 1), (true, Some(a.owner(BASE + 100, 3))));
    assert_eq!(a.owner_of(1), Some(b.owner(BASE + 200, 1)));
    // Epochs compare exactly far beyond 2^53 (a double would merge these two).
    let big = u64::MAX - 10;
    assert_eq!(a.claim(2, big - 1, 0), (true, None));
    assert_eq!(b.claim(2, big - 2, 0), (false, Some(a.owner(big - 1, 0))));
    assert_eq!(b.claim(2, big, 0), (true, Some(a.owner(big - 1, 0))));
    // The entry is laid out as documented.
    let stored = redis.command(&["HGETALL", "fg:u:{1}"]).unwrap();
    let Reply::Array(fields) = stored else { panic!("{stored:?}") };
    let fields: Vec<&str> = fields.iter().filter_map(Reply::text).collect();
    assert_eq!(fields, ["node", "gate-b", "epoch", &format!("{:020}", BASE + 200), "shard", "1"]);
}

#[test]
fn concurrent_claims_leave_the_larger_epoch_and_tell_the_loser() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    let mut b = Node::start(&redis.url(), "gate-b");
    a.wait_up();
    b.wait_up();
    const UIDS: u64 = 300;
    const ROUNDS: u64 = 4;
    for round in 0..ROUNDS {
        // Each uid gets one claim from each node; which node has the larger epoch varies.
        let epoch_of = |node: u64, uid: u64| {
            let base = BASE + (round + 1) * 1_000_000 + uid * 4;
            let a_bigger = (uid * 7919 + round).is_multiple_of(2);
            base + if (node == 0) == a_bigger { 2 } else { 1 }
        };
        let batches = |node: u64| -> Vec<Vec<Cmd>> {
            (1..=UIDS)
                .collect::<Vec<_>>()
                .chunks(7)
                .map(|c| {
                    c.iter()
                        .map(|&uid| Cmd::Claim { uid, epoch: epoch_of(node, uid), shard: node as u16 })
                        .collect()
                })
                .collect()
        };
        let (ha, hb) = (a.handle(), b.handle());
        std::thread::scope(|s| {
            s.spawn(|| batches(0).into_iter().for_each(|c| ha.send(c).unwrap()));
            s.spawn(|| batches(1).into_iter().for_each(|c| hb.send(c).unwrap()));
        });
        let answers = |n: &mut Node| -> Vec<(u64, bool, Option<Owner>)> {
            (1..=UIDS)
                .map(|_| match n.wait("claim answer", |e| matches!(e, Event::Claimed { .. })) {
                    Event::Claimed { uid, won, previous, .. } => (uid, won, previous),
                    _ => unreachable!(),
                })
                .collect()
        };
        let mut got_a = answers(&mut a);
        let mut got_b = answers(&mut b);
        got_a.sort_by_key(|x| x.0);
        got_b.sort_by_key(|x| x.0);
        let owners = a.lookup((1..=UIDS).collect());
        for uid in 1..=UIDS {
            let (ea, eb) = (epoch_of(0, uid), epoch_of(1, uid));
            let (ra, rb) = (&got_a[uid as usize - 1], &got_b[uid as usize - 1]);
            let (big, small, big_owner, small_owner) = if ea > eb {
                (ra, rb, a.owner(ea, 0), b.owner(eb, 1))
            } else {
                (rb, ra, b.owner(eb, 1), a.owner(ea, 0))
            };
            assert!(big.1, "round {round} uid {uid}: the larger epoch lost: {big:?}");
            if small.1 {
                // The smaller arrived first; the larger replaced it and says so.
                assert_eq!(big.2.as_ref(), Some(&small_owner), "round {round} uid {uid}");
            } else {
                assert_eq!(
                    small.2.as_ref(),
                    Some(&big_owner),
                    "round {round} uid {uid}: the loser is told the owner"
                );
            }
            assert_eq!(owners[uid as usize - 1], (uid, Some(big_owner)), "round {round}");
        }
    }
}

#[test]
fn move_is_a_compare_and_set_from_the_stored_owner() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    let mut b = Node::start(&redis.url(), "gate-b");
    a.wait_up();
    b.wait_up();
    assert_eq!(a.claim(9, BASE + 10, 2), (true, None));
    let from_a = a.owner(BASE + 10, 2);
    // The session resumes on b: applies, since the entry is exactly a's.
    assert_eq!(b.move_from(9, from_a.clone(), BASE + 11, 5), (true, Some(b.owner(BASE + 11, 5))));
    // The same move again (a retry) answers ok without change.
    assert_eq!(b.move_from(9, from_a.clone(), BASE + 11, 5), (true, Some(b.owner(BASE + 11, 5))));
    // A stale move from the old owner fails and shows the current one.
    assert_eq!(a.move_from(9, from_a.clone(), BASE + 12, 0), (false, Some(b.owner(BASE + 11, 5))));
    // A move never lowers the epoch.
    assert_eq!(a.move_from(9, b.owner(BASE + 11, 5), BASE + 10, 0), (false, Some(b.owner(BASE + 11, 5))));
    // A session taken over keeps its epoch: the same epoch moves.
    assert_eq!(a.move_from(9, b.owner(BASE + 11, 5), BASE + 11, 1), (true, Some(a.owner(BASE + 11, 1))));
    // A move of a uid nobody holds fails with no owner.
    assert_eq!(b.move_from(10, from_a, BASE + 20, 0), (false, None));
    assert_eq!(a.owner_of(9), Some(a.owner(BASE + 11, 1)));
    assert_eq!(a.owner_of(10), None);
}

#[test]
fn release_deletes_only_the_owners_entry() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    let mut b = Node::start(&redis.url(), "gate-b");
    a.wait_up();
    b.wait_up();
    assert_eq!(a.claim(5, BASE + 7, 1), (true, None));
    // Releases have no answer; a lookup sent after them on the same handle runs after them.
    a.send(vec![Cmd::Release { uid: 5, epoch: BASE + 6 }]);
    assert_eq!(a.owner_of(5), Some(a.owner(BASE + 7, 1)), "an older epoch's release is ignored");
    b.send(vec![Cmd::Release { uid: 5, epoch: BASE + 7 }]);
    assert_eq!(b.owner_of(5), Some(a.owner(BASE + 7, 1)), "another node's release is ignored");
    a.send(vec![Cmd::Release { uid: 5, epoch: BASE + 7 }]);
    assert_eq!(a.owner_of(5), None, "the owner's release deletes the entry");
    assert_eq!(redis.command(&["EXISTS", "fg:u:{5}"]).unwrap(), Reply::Int(0));
}

#[test]
fn lookup_answers_many_uids_in_one_command() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    let claims: Vec<Cmd> =
        (0..500).map(|i| Cmd::Claim { uid: 1000 + 2 * i, epoch: BASE + i, shard: (i % 4) as u16 }).collect();
    a.send(claims);
    for _ in 0..500 {
        a.wait("claim", |e| matches!(e, Event::Claimed { won: true, .. }));
    }
    let before = a.handle().ops();
    let uids: Vec<u64> = (1000..2000).collect();
    let owners = a.lookup(uids.clone());
    assert_eq!(a.handle().ops() - before, 1000, "one HMGET per uid");
    assert_eq!(owners.iter().map(|o| o.0).collect::<Vec<_>>(), uids, "answers in the order asked");
    for (uid, owner) in owners {
        let i = (uid - 1000) / 2;
        let want = uid.is_multiple_of(2).then(|| a.owner(BASE + i, (i % 4) as u16));
        assert_eq!(owner, want, "uid {uid}");
    }
    // An empty lookup is answered too.
    assert_eq!(a.lookup(vec![]), vec![]);
}

#[test]
fn a_batch_of_claims_is_one_pipeline_and_ops_count_commands() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    // Up came with the node list; take it so the next batch is the claims' own.
    a.wait_nodes(PATIENCE, |_| true).unwrap();
    assert_eq!(a.handle().ops(), 0, "upkeep is counted apart");
    assert!(a.handle().upkeep_ops() >= 6, "INFO, 3 SCRIPT LOADs, lease writes");
    const N: u64 = 1000;
    a.send((1..=N).map(|uid| Cmd::Claim { uid, epoch: BASE, shard: 0 }).collect());
    // All N answers come in one sink call: one drain, one pipeline (one round trip).
    let mut batch = a.next_batch(PATIENCE);
    batch.retain(|e| !matches!(e, Event::Nodes(_)));
    assert_eq!(batch.len(), N as usize);
    assert!(batch.iter().all(|e| matches!(e, Event::Claimed { won: true, previous: None, .. })));
    assert_eq!(a.handle().ops(), N, "one EVALSHA per claim");
    a.send(vec![Cmd::Release { uid: 1, epoch: BASE }, Cmd::Lookup { uids: vec![1, 2, 3], tag: 1 }]);
    a.wait("lookup", |e| matches!(e, Event::Looked { tag: 1, .. }));
    assert_eq!(a.handle().ops(), N + 4);
}

#[test]
fn scripts_are_loaded_again_after_noscript() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).unwrap(), Reply::Status("OK".into()));
    assert_eq!(a.claim(3, BASE, 0), (true, None));
    assert_eq!(a.handle().ops(), 2, "the EVALSHA that met NOSCRIPT, and its retry");
    assert_eq!(a.claim(3, BASE + 1, 0), (true, Some(a.owner(BASE, 0))));
    assert_eq!(a.handle().ops(), 3);
}

#[test]
fn password_in_the_url() {
    let redis = RedisServer::start_with_password("s3cret-pw").unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    assert_eq!(a.claim(1, BASE, 0), (true, None));
    let mut wrong = Node::start(&format!("redis://:nope@127.0.0.1:{}", redis.port), "gate-b");
    let detail = wrong.wait_down();
    assert!(detail.to_uppercase().contains("WRONGPASS") || detail.contains("auth"), "{detail}");
    assert!(!wrong.handle().status().0);
    assert!(!wrong.handle().status().1.contains("nope"), "no password in the status");
}

#[test]
fn bad_settings_fail_at_start() {
    let sink = || Box::new(|_: Vec<Event>| {}) as cluster::Sink;
    for url in
        ["127.0.0.1:6379", "http://127.0.0.1:6379", "redis://", "redis-sentinel://h:1?sentinelServiceName=x"]
    {
        let err = Handle::start(common::config(url), common::info("a"), sink()).unwrap_err();
        assert!(matches!(err, cluster::Error::Url { .. }), "{url}: {err}");
    }
    let err =
        Handle::start(common::config("redis://127.0.0.1:1"), common::info("has space"), sink()).unwrap_err();
    assert!(matches!(err, cluster::Error::Config(_)), "{err}");
    let cfg = cluster::Config { max_queue: 0, ..common::config("redis://127.0.0.1:1") };
    assert!(matches!(Handle::start(cfg, common::info("a"), sink()), Err(cluster::Error::Config(_))));
}

#[test]
fn redis_cluster_claims_moves_and_lookups() {
    let redis = RedisCluster::start(3).unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    // b is pointed at another node of the cluster: any node will do.
    let mut b = Node::start(&redis.nodes[2].url(), "gate-b");
    a.wait_up();
    b.wait_up();
    let (up, detail) = a.handle().status();
    assert!(up && detail.contains("cluster"), "{detail}");

    // Claims spread over every primary's slots, in one batch.
    const N: u64 = 200;
    a.send((1..=N).map(|uid| Cmd::Claim { uid, epoch: BASE + uid, shard: 1 }).collect());
    for _ in 1..=N {
        a.wait("claim", |e| matches!(e, Event::Claimed { won: true, .. }));
    }
    let owners = b.lookup((1..=N + 5).collect());
    for (uid, owner) in owners {
        let want = (uid <= N).then(|| a.owner(BASE + uid, 1));
        assert_eq!(owner, want, "uid {uid}");
    }
    // Each primary holds some of the entries.
    for node in &redis.nodes {
        let Ok(Reply::Int(keys)) = node.command(&["DBSIZE"]) else { panic!("DBSIZE") };
        assert!(keys > 10, "node {} holds {keys} keys", node.port);
    }
    assert_eq!(b.claim(7, BASE, 0), (false, Some(a.owner(BASE + 7, 1))));
    assert_eq!(b.move_from(7, a.owner(BASE + 7, 1), BASE + 1000, 4), (true, Some(b.owner(BASE + 1000, 4))));
    assert_eq!(a.move_from(7, a.owner(BASE + 7, 1), BASE + 1001, 0), (false, Some(b.owner(BASE + 1000, 4))));
    b.send(vec![Cmd::Release { uid: 7, epoch: BASE + 1000 }]);
    assert_eq!(b.owner_of(7), None);
    assert_eq!(redis.routed_command(&["EXISTS", "fg:u:{8}"]).unwrap(), Reply::Int(1));
    // Both leases are found, wherever their keys live.
    let names = a.wait_nodes(PATIENCE, |n| n.len() == 2).expect("both nodes listed");
    assert_eq!(names.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["gate-a", "gate-b"]);
}

/// Bytes published for a node reach that node's sink, in order, and no other node's; on a
/// Redis Cluster too (sharded pub/sub lives on the channel's slot).
#[test]
fn published_bytes_reach_the_named_node_only() {
    let single = RedisServer::start().unwrap();
    let cluster = RedisCluster::start(3).unwrap();
    for url in [single.url(), cluster.url()] {
        let mut a = Node::start(&url, "pub-a");
        let mut b = Node::start(&url, "pub-b");
        let mut c = Node::start(&url, "pub-c");
        a.wait_up();
        b.wait_up();
        c.wait_up();
        let msgs: Vec<Vec<u8>> = (0u8..20).map(|i| vec![i; 1 + i as usize * 100]).collect();
        a.send(msgs.iter().map(|m| Cmd::Publish { node: "pub-b".into(), bytes: m.clone() }).collect());
        for want in &msgs {
            let got = b.wait("a message", |e| matches!(e, Event::Message(_)));
            assert_eq!(got, Event::Message(want.clone()), "on {url}");
        }
        assert!(
            c.try_wait(Duration::from_millis(300), |e| matches!(e, Event::Message(_))).is_none(),
            "another node heard it on {url}"
        );
    }
}

/// Not a check: prints what a claim costs on loopback (run with `--nocapture`).
#[test]
fn claim_round_trip_figures() {
    let redis = RedisServer::start().unwrap();
    let mut a = Node::start(&redis.url(), "gate-a");
    a.wait_up();
    a.wait_nodes(PATIENCE, |_| true).unwrap();
    // One claim at a time: send, then wait for its answer through the sink.
    let mut single = Vec::new();
    for uid in 0..500u64 {
        let t = Instant::now();
        a.send(vec![Cmd::Claim { uid, epoch: BASE, shard: 0 }]);
        let batch = a.next_batch(PATIENCE);
        single.push(t.elapsed());
        assert!(matches!(batch[0], Event::Claimed { won: true, .. }));
    }
    let (med, p99) = median_p99_us(&mut single);
    // A batch of 1,000 claims: one pipeline.
    let mut batched = Vec::new();
    let cpu_before = directory_thread_cpu_us();
    for round in 1..=20u64 {
        let t = Instant::now();
        a.send(
            (0..1000u64).map(|uid| Cmd::Claim { uid: 10_000 + uid, epoch: BASE + round, shard: 0 }).collect(),
        );
        let mut n = 0;
        while n < 1000 {
            n += a
                .next_batch(PATIENCE)
                .iter()
                .filter(|e| matches!(e, Event::Claimed { won: true, .. }))
                .count();
        }
        batched.push(t.elapsed());
    }
    let cpu_us = directory_thread_cpu_us() - cpu_before;
    let (bmed, bp99) = median_p99_us(&mut batched);
    println!("claim round trip (send -> sink), one at a time: median {med} us, p99 {p99} us (500 claims)");
    println!("1,000 claims in one send -> all answered: median {bmed} us, p99 {bp99} us (20 batches)");
    println!("directory thread CPU per batched claim: {:.1} us", cpu_us as f64 / 20_000.0);
    if let Ok(Reply::Bulk(stats)) = redis.command(&["INFO", "commandstats"]) {
        for line in stats.lines().filter(|l| l.starts_with("cmdstat_evalsha")) {
            println!("redis: {line}");
        }
    }
}

/// CPU time (user + system) of this process's directory thread so far, from /proc (10 ms ticks).
fn directory_thread_cpu_us() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("fg-redis-") {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
            // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
            return (f[11] + f[12]) * 10_000;
        }
    }
    panic!("no directory thread");
}
