//! GeoQuery and GeoPush in cluster mode (PROTOCOL.md §9.16, §15): two gate nodes sharing a real
//! redis-server; the app-server on one node gets the nearest drivers of both, a GeoPush reaches
//! drivers on both with their receipts, and a node that stopped answering is left out after the
//! deadline.

mod common;

use client::{GeoPushSpec, GeoSpec};
use common::{next_push, receipts, Gate};
use schema::wire::{GpsPoint, Outcome};
use std::time::{Duration, Instant};
use testkit::redis::RedisServer;

/// A gate node named `name` on the Redis at `url`, with a short lease.
fn node(url: &str, name: &str) -> Gate {
    Gate::start(&["--redis", url, "--node-name", name, "--cluster-lease-ms", "900", "--cores", "0-1"])
}

/// Waits until the node's `/healthz` says the directory is up and it sees `nodes` live nodes.
fn until_clustered(g: &Gate, nodes: usize) {
    g.eventually("the directory up with every node", || {
        let h = g.http_get("/healthz");
        h.contains("directory: up") && h.contains(&format!("{nodes} live nodes"))
    });
}

const LAT: i32 = 525_000_000;
const LON: i32 = 134_000_000;

/// Driver `uid` stands `uid` × 11.1 m north of the centre.
fn at(uid: u64) -> GpsPoint {
    GpsPoint::new(1_000, LAT + uid as i32 * 1_000, LON, 0, 0, 0, 0)
}

fn spec(k: u32) -> GeoSpec {
    GeoSpec { lat_e7: LAT, lon_e7: LON, radius_m: 1_000, k, ..GeoSpec::default() }
}

fn uids(hits: &[client::Chosen]) -> Vec<u64> {
    hits.iter().map(|h| h.uid).collect()
}

#[test]
fn geo_requests_cover_every_node_and_a_silent_node_is_left_out_after_the_deadline() {
    let redis = RedisServer::start().expect("redis-server starts");
    let a = node(&redis.url(), "node-a");
    let mut b = node(&redis.url(), "node-b");
    until_clustered(&a, 2);
    until_clustered(&b, 2);
    // Odd uids on node a, even ones on node b, interleaved by distance.
    let mut drivers: Vec<_> =
        (1..=8u64).map(|uid| (uid, if uid % 2 == 1 { a.login(uid, 1) } else { b.login(uid, 1) })).collect();
    for (uid, c) in drivers.iter_mut() {
        c.send_gps(0, &at(*uid)).expect("gps");
    }
    let (srv, ev) = a.appserver();
    a.eventually("both nodes' drivers found", || {
        srv.geo_query(&spec(20)).is_ok_and(|h| uids(&h) == (1..=8).collect::<Vec<_>>())
    });
    let hits = srv.geo_query(&spec(5)).expect("answered");
    assert_eq!(uids(&hits), vec![1, 2, 3, 4, 5], "the five nearest of both nodes, merged");
    assert!(a.metric("fleetgate_cluster_geo_asks_total", "direction=\"sent\"") >= 1.0);
    assert!(b.metric("fleetgate_cluster_geo_asks_total", "direction=\"received\"") >= 1.0);

    // A GeoPush from node a reaches the chosen drivers on both nodes, each with its receipt.
    let push = GeoPushSpec { message_id: 90, payload: b"order 90".to_vec(), ttl_ms: 10_000, kind: 1 };
    assert_eq!(uids(&srv.geo_push(&spec(4), &push).expect("pushed")), vec![1, 2, 3, 4]);
    for (_, c) in drivers.iter_mut().filter(|(u, _)| *u <= 4) {
        let f = next_push(c);
        assert_eq!(f.delivery().expect("delivery").message_id, 90);
        c.ack_push(&f).expect("ack");
    }
    let got = receipts(&ev, 4);
    for uid in 1..=4 {
        assert_eq!(got[&(90, uid)], vec![Outcome::Delivered], "uid {uid}");
    }

    // Node b stops answering: node a answers with its own drivers once the deadline passed.
    b.kill();
    let t = Instant::now();
    let hits = srv.geo_query(&spec(20)).expect("answered");
    assert_eq!(uids(&hits), vec![1, 3, 5, 7], "node a's drivers");
    assert!(t.elapsed() < Duration::from_secs(3), "answered within the node deadline: {:?}", t.elapsed());
}
