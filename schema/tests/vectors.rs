//! Byte-exact vectors: one frame of every (cmd, type), committed in `tests/vectors/frames.txt`.
//!
//! The encoder must produce these bytes exactly, and the decoder must read them back to the
//! values they were built from. A change to either shows up here as a diff of hex. To accept an
//! intended change, run `FLEETGATE_BLESS=1 cargo test -p schema --test vectors` and review the
//! diff of frames.txt.

mod common;

use schema::{wire, Body, Cmd, Decoded, FrameType, Limits, HEADER_LEN};
use std::collections::BTreeSet;

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/frames.txt");

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn committed() -> Vec<(String, Vec<u8>)> {
    std::fs::read_to_string(FILE)
        .expect("tests/vectors/frames.txt is committed")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, h) = l.split_once(' ').expect("`name hex` per line");
            (name.to_string(), unhex(h.trim()))
        })
        .collect()
}

#[test]
fn encoder_produces_committed_bytes() {
    let built = common::all_frames();
    if std::env::var_os("FLEETGATE_BLESS").is_some() {
        let mut s = String::from("# name hex — one frame of every (cmd, type); see tests/vectors.rs\n");
        for (name, bytes) in &built {
            s.push_str(&format!("{name} {}\n", hex(bytes)));
        }
        std::fs::write(FILE, s).expect("write vectors");
    }
    let want = committed();
    assert_eq!(built.len(), want.len(), "vector count");
    for ((name, bytes), (wname, wbytes)) in built.iter().zip(&want) {
        assert_eq!(name, wname);
        assert_eq!(hex(bytes), hex(wbytes), "vector {name} differs from the committed bytes");
    }
}

#[test]
fn every_cmd_has_a_vector() {
    let mut seen = BTreeSet::new();
    for (name, bytes) in committed() {
        match schema::decode(&bytes, &Limits::SIDECAR) {
            Ok(Some((Decoded::Frame(f), n))) => {
                assert_eq!(n, bytes.len(), "{name}: one whole frame");
                seen.insert(f.cmd as u16);
            }
            other => panic!("{name}: did not decode: {other:?}"),
        }
    }
    for cmd in Cmd::ALL {
        assert!(seen.contains(&(*cmd as u16)), "no vector for {cmd:?}");
    }
}

fn frame(name: &str) -> (schema::Frame<'static>, Vec<u8>) {
    let bytes = committed().into_iter().find(|(n, _)| n == name).expect("vector exists").1;
    let leaked: &'static [u8] = Box::leak(bytes.clone().into_boxed_slice());
    match schema::decode(leaked, &Limits::SIDECAR) {
        Ok(Some((Decoded::Frame(f), _))) => (f, bytes),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn header_fields_read_back() {
    let (f, bytes) = frame("gps_report_event");
    assert_eq!(bytes[0], 0xF7);
    assert_eq!(f.header.version, 1);
    assert_eq!(f.ty, FrameType::Event);
    assert_eq!(f.cmd, Cmd::GpsReport);
    assert_eq!(f.header.seq, 0);
    assert_eq!(f.header.log_id, 0x7777);
    assert_eq!(f.header.body_len as usize, bytes.len() - HEADER_LEN);
}

#[test]
fn bodies_read_back() {
    let Body::GpsReport(g) = frame("gps_report_event").0.body else { panic!("kind") };
    assert_eq!(g.point(), Some(&common::point(0)));
    let Body::GpsBatch(g) = frame("gps_batch_event").0.body else { panic!("kind") };
    let pts: Vec<_> = g.points().expect("points").iter().copied().collect();
    assert_eq!(pts, vec![common::point(0), common::point(1), common::point(2)]);
    let Body::Login(l) = frame("login_request").0.body else { panic!("kind") };
    assert_eq!(l.token().expect("token").bytes(), &[7u8; 50]);
    assert_eq!(l.device(), Some("pixel-7"));
    let Body::Session(s) = frame("login_response").0.body else { panic!("kind") };
    assert_eq!((s.uid(), s.role(), s.heartbeat_ms(), s.session_epoch()), (42, wire::Role::Driver, 30_000, 3));
    assert_eq!(s.node(), Some("127.0.0.1:7100"));
    let Body::Error(e) = frame("error").0.body else { panic!("kind") };
    assert_eq!(
        (e.code(), e.origin(), e.failed_cmd()),
        (wire::ErrorCode::NotLoggedIn, wire::Hop::App, 0x0010)
    );
    assert_eq!(e.message(), Some("log in first"));
    let Body::AppServerWelcome(w) = frame("app_server_hello_response").0.body else { panic!("kind") };
    assert_eq!((w.node(), w.max_body(), w.max_targets()), (Some("127.0.0.1:7100"), 8 << 20, 50_000));
    assert_eq!(w.incarnation(), 0x0123_4567_89AB_CDEF);
    let Body::Push(p) = frame("push_request").0.body else { panic!("kind") };
    assert_eq!(p.uids().expect("uids").iter().collect::<Vec<_>>(), vec![42, 43, 44]);
    assert_eq!((p.message_id(), p.ttl_ms(), p.kind()), (5, 30_000, 1));
    let Body::Receipts(r) = frame("receipts_push").0.body else { panic!("kind") };
    let r: Vec<_> = r.receipts().expect("receipts").iter().map(|r| (r.uid(), r.outcome())).collect();
    assert_eq!(r, vec![(42, 1), (43, 2)]);
    let Body::UpstreamReply(u) = frame("upstream_response").0.body else { panic!("kind") };
    assert_eq!(u.request_id(), 9);
    assert_eq!(u.reply().expect("reply").message(), Some("ok"));
    let Body::PushDelivery(d) = frame("push_delivery").0.body else { panic!("kind") };
    assert_eq!(d.payload().expect("payload").bytes(), b"order 77");
    assert_eq!((d.message_id(), d.sent_at_us(), d.kind()), (5, 1_700_000_000_000_000, 1));
    assert_eq!(d.deadline_ms(), 1_700_000_030_000);
    let Body::PushAck(a) = frame("push_ack").0.body else { panic!("kind") };
    assert_eq!(a.message_id(), 5);
    assert_eq!(frame("push_delivery").0.header.seq, 100);
    let Body::EndSession(e) = frame("end_session_request").0.body else { panic!("kind") };
    assert_eq!((e.uid(), e.message()), (42, Some("account closed")));
    let Body::SessionEnded(e) = frame("end_session_response").0.body else { panic!("kind") };
    assert_eq!((e.uid(), e.found(), e.node()), (42, true, Some("gate-b")));
    let Body::GeoPush(g) = frame("geo_push_request").0.body else { panic!("kind") };
    assert_eq!((g.lat_e7(), g.lon_e7(), g.radius_m(), g.k()), (525_200_000, 134_050_000, 3_000, 20));
    assert_eq!((g.max_age_ms(), g.filter(), g.message_id()), (10_000, wire::GeoFilter::OnlineOrHeld, 77));
    assert_eq!((g.payload().expect("payload").bytes(), g.ttl_ms(), g.kind()), (&b"order 77"[..], 15_000, 1));
    let Body::GeoQuery(g) = frame("geo_query_request").0.body else { panic!("kind") };
    assert_eq!((g.lat_e7(), g.lon_e7(), g.radius_m(), g.k()), (-338_688_000, 1_512_093_000, 50_000, 1_000));
    assert_eq!((g.max_age_ms(), g.filter()), (0, wire::GeoFilter::Online));
    let Body::GeoChosen(c) = frame("geo_push_response").0.body else { panic!("kind") };
    let hits: Vec<_> =
        c.hits().expect("hits").iter().map(|h| (h.uid(), h.distance_m(), h.age_ms())).collect();
    assert_eq!((c.message_id(), hits), (77, vec![(42, 131.5, 900), (43, 655.25, 2_100)]));
}

#[test]
fn empty_body_means_all_defaults() {
    let mut out = Vec::new();
    schema::write_frame(&mut out, FrameType::Request, Cmd::Keepalive, 1, 2, &[]);
    assert_eq!(out.len(), HEADER_LEN);
    match schema::decode(&out, &Limits::APP) {
        Ok(Some((Decoded::Frame(f), 24))) => {
            let Body::Keepalive(k) = f.body else { panic!("kind") };
            assert_eq!(k.ts_ms(), 0);
        }
        other => panic!("{other:?}"),
    }
}
