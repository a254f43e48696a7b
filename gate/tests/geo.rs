//! GeoQuery and GeoPush against a real gate on two shards (PROTOCOL.md §9.16): the nearest
//! drivers over both logic shards, the filter, the freshness bound, sessions that end, the
//! push and its receipts, and every bad argument.

mod common;

use client::{ClientError, GeoPushSpec, GeoSpec};
use common::*;
use schema::wire::{ErrorCode, GpsPoint, Hop, Outcome};
use std::time::Duration;

/// The centre of the test's drivers (52.5° N, 13.4° E).
const LAT: i32 = 525_000_000;
const LON: i32 = 134_000_000;
/// Driver `uid` stands `uid` × STEP north of the centre: 11.1 m per uid.
const STEP: i32 = 1_000;

fn at(uid: u64, ts: u64) -> GpsPoint {
    GpsPoint::new(ts, LAT + uid as i32 * STEP, LON, 0, 0, 0, 0)
}

fn spec(radius_m: u32, k: u32) -> GeoSpec {
    GeoSpec { lat_e7: LAT, lon_e7: LON, radius_m, k, ..GeoSpec::default() }
}

fn uids(hits: &[client::Chosen]) -> Vec<u64> {
    hits.iter().map(|h| h.uid).collect()
}

fn refused(r: Result<Vec<client::Chosen>, ClientError>) -> (ErrorCode, Hop, String) {
    match r {
        Err(ClientError::Server { code, origin, message, .. }) => (code, origin, message),
        other => panic!("expected a refusal: {other:?}"),
    }
}

#[test]
fn geo_query_and_push_choose_the_nearest_drivers_over_both_shards() {
    let gate = Gate::start(&["--cores", "0-1", "--hold-ms", "60000"]);
    let (srv, ev) = gate.appserver();
    let mut drivers: Vec<_> = (1..=40u64).map(|uid| (uid, gate.login(uid, 1))).collect();
    for (uid, c) in drivers.iter_mut() {
        c.send_gps(0, &at(*uid, 1_000)).expect("gps");
    }
    gate.eventually("every driver indexed", || {
        srv.geo_query(&spec(1_000, 100)).expect("answered").len() == 40
    });
    let hits = srv.geo_query(&spec(1_000, 10)).expect("answered");
    assert_eq!(uids(&hits), (1..=10).collect::<Vec<_>>(), "the nearest, nearest first");
    for h in &hits {
        let want = h.uid as f32 * 11.119_5;
        assert!((h.distance_m - want).abs() < 0.05, "{h:?}: {want} m");
        assert_eq!((h.lat_e7, h.lon_e7), (LAT + h.uid as i32 * STEP, LON));
    }
    let shards: std::collections::BTreeSet<usize> = hits.iter().map(|h| logic::shard_of(h.uid, 2)).collect();
    assert_eq!(shards.len(), 2, "the ten nearest live on both logic shards");
    let answered = gate.metric("fleetgate_geo_answer_us_count", "");
    assert!(answered >= 2.0, "the gate times its geo answers: {answered}");
    // The radius bounds the choice: 5 drivers within 60 m.
    assert_eq!(uids(&srv.geo_query(&spec(60, 10)).expect("answered")), vec![1, 2, 3, 4, 5]);

    // Driver 3's connection drops (its session is held), driver 2 logs out.
    drivers.remove(2);
    drivers[1].1.logout().expect("logout");
    drivers.remove(1);
    gate.eventually("driver 3 held", || gate.metric("fleetgate_held_sessions", "") == 1.0);
    assert_eq!(uids(&srv.geo_query(&spec(60, 10)).expect("answered")), vec![1, 4, 5]);
    let held = GeoSpec { filter: 1, ..spec(60, 10) };
    assert_eq!(uids(&srv.geo_query(&held).expect("answered")), vec![1, 3, 4, 5]);

    // Only drivers 4 and 5 report again: the freshness bound leaves the others out.
    std::thread::sleep(Duration::from_millis(600));
    for (uid, c) in drivers.iter_mut().filter(|(u, _)| [4, 5].contains(u)) {
        c.send_gps(0, &at(*uid, 2_000)).expect("gps");
    }
    let fresh = GeoSpec { max_age_ms: 400, ..spec(1_000, 10) };
    gate.eventually("drivers 4 and 5 reported again", || {
        uids(&srv.geo_query(&fresh).expect("answered")) == vec![4, 5]
    });
    let aged = srv.geo_query(&spec(60, 10)).expect("answered");
    assert!(aged[0].age_ms >= 600 && aged[1].age_ms < 400, "{aged:?}");

    // GeoPush: the three nearest online drivers get the push, each with its receipt.
    let push = GeoPushSpec { message_id: 71, payload: b"order 71".to_vec(), ttl_ms: 10_000, kind: 1 };
    let chosen = srv.geo_push(&spec(1_000, 3), &push).expect("pushed");
    assert_eq!(uids(&chosen), vec![1, 4, 5]);
    for (uid, c) in drivers.iter_mut().filter(|(u, _)| [1, 4, 5].contains(u)) {
        let f = next_push(c);
        let d = f.delivery().expect("a delivery");
        assert_eq!((d.message_id, d.payload, d.kind), (71, &b"order 71"[..], 1));
        c.ack_push(&f).unwrap_or_else(|e| panic!("driver {uid} acks: {e}"));
    }
    let got = receipts(&ev, 3);
    for uid in [1, 4, 5] {
        assert_eq!(got[&(71, uid)], vec![Outcome::Delivered]);
    }

    // A GeoPush that finds nobody pushes nothing and says so.
    let far = GeoSpec { lat_e7: -LAT, ..spec(1_000, 3) };
    let none = GeoPushSpec { message_id: 72, ..push.clone() };
    assert!(srv.geo_push(&far, &none).expect("answered").is_empty());
}

#[test]
fn geo_requests_with_bad_arguments_are_refused_with_a_clear_error() {
    let gate = Gate::start(&["--cores", "0-1"]);
    let (srv, _ev) = gate.appserver();
    let ok = spec(1_000, 10);
    let cases = [
        (GeoSpec { lat_e7: 900_000_001, ..ok }, ErrorCode::InvalidField, "lat_e7"),
        (GeoSpec { lon_e7: -1_800_000_001, ..ok }, ErrorCode::InvalidField, "lon_e7"),
        (GeoSpec { radius_m: 0, ..ok }, ErrorCode::InvalidField, "radius_m"),
        (GeoSpec { radius_m: 50_001, ..ok }, ErrorCode::LimitExceeded, "radius_m"),
        (GeoSpec { k: 0, ..ok }, ErrorCode::InvalidField, "k "),
        (GeoSpec { k: 1_001, ..ok }, ErrorCode::LimitExceeded, "k "),
        (GeoSpec { filter: 2, ..ok }, ErrorCode::InvalidField, "filter"),
    ];
    let push = GeoPushSpec { message_id: 1, payload: b"x".to_vec(), ttl_ms: 1_000, kind: 1 };
    for (i, (q, code, names)) in cases.into_iter().enumerate() {
        let (c, origin, message) = refused(srv.geo_query(&q));
        assert_eq!((c, origin), (code, Hop::App), "{q:?}: {message}");
        assert!(message.contains(names), "{message} names {names}");
        let p = GeoPushSpec { message_id: 100 + i as u64, ..push.clone() };
        assert_eq!(refused(srv.geo_push(&q, &p)).0, code, "GeoPush {q:?}");
    }
    let big = GeoPushSpec { message_id: 200, payload: vec![0; 16 * 1024 + 1], ..push.clone() };
    assert_eq!(refused(srv.geo_push(&ok, &big)).0, ErrorCode::LimitExceeded);
    let long = GeoPushSpec { message_id: 201, ttl_ms: 300_001, ..push };
    assert_eq!(refused(srv.geo_push(&ok, &long)).0, ErrorCode::InvalidField);
    // The connection stays, and the bounds themselves are valid.
    let edge = GeoSpec { lat_e7: 900_000_000, lon_e7: 1_800_000_000, radius_m: 50_000, k: 1_000, ..ok };
    assert!(srv.geo_query(&edge).expect("answered").is_empty());
}
