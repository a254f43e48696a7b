//! GeoQuery, GeoPush and GeoChosen: any field values survive encode and decode, and any bytes
//! behind a geo header decode or are rejected alone, never panic.

use proptest::prelude::*;
use schema::{wire, Body, Cmd, Decoded, Encoder, FrameType, Limits};

#[derive(Debug, Clone)]
struct Sel {
    lat_e7: i32,
    lon_e7: i32,
    radius_m: u32,
    k: u32,
    max_age_ms: u32,
    filter: u8,
}

fn sel() -> impl Strategy<Value = Sel> {
    (any::<i32>(), any::<i32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u8>()).prop_map(
        |(lat_e7, lon_e7, radius_m, k, max_age_ms, filter)| Sel {
            lat_e7,
            lon_e7,
            radius_m,
            k,
            max_age_ms,
            filter,
        },
    )
}

fn decode_one(bytes: &[u8]) -> Decoded<'_> {
    match schema::decode(bytes, &Limits::SIDECAR) {
        Ok(Some((d, n))) => {
            assert_eq!(n, bytes.len());
            d
        }
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn geo_query_round_trips(s in sel(), seq in any::<u32>()) {
        let mut out = Vec::new();
        Encoder::new().frame(&mut out, FrameType::Request, Cmd::GeoQuery, seq, 1, |b| {
            wire::GeoQuery::create(b, &wire::GeoQueryArgs {
                lat_e7: s.lat_e7, lon_e7: s.lon_e7, radius_m: s.radius_m, k: s.k,
                max_age_ms: s.max_age_ms, filter: wire::GeoFilter(s.filter),
            })
        });
        let Decoded::Frame(f) = decode_one(&out) else { panic!("rejected") };
        let Body::GeoQuery(g) = f.body else { panic!("kind") };
        prop_assert_eq!((g.lat_e7(), g.lon_e7(), g.radius_m(), g.k()), (s.lat_e7, s.lon_e7, s.radius_m, s.k));
        prop_assert_eq!((g.max_age_ms(), g.filter().0, f.header.seq), (s.max_age_ms, s.filter, seq));
    }

    #[test]
    fn geo_push_round_trips(
        s in sel(),
        message_id in any::<u64>(),
        payload in prop::collection::vec(any::<u8>(), 0..300),
        ttl_ms in any::<u32>(),
        sent_at_us in any::<u64>(),
        kind in any::<u16>(),
    ) {
        let mut out = Vec::new();
        Encoder::new().frame(&mut out, FrameType::Request, Cmd::GeoPush, 3, 1, |b| {
            let payload = b.create_vector(&payload);
            wire::GeoPush::create(b, &wire::GeoPushArgs {
                lat_e7: s.lat_e7, lon_e7: s.lon_e7, radius_m: s.radius_m, k: s.k,
                max_age_ms: s.max_age_ms, filter: wire::GeoFilter(s.filter),
                message_id, payload: Some(payload), ttl_ms, sent_at_us, kind,
            })
        });
        let Decoded::Frame(f) = decode_one(&out) else { panic!("rejected") };
        let Body::GeoPush(g) = f.body else { panic!("kind") };
        prop_assert_eq!((g.lat_e7(), g.lon_e7(), g.radius_m(), g.k()), (s.lat_e7, s.lon_e7, s.radius_m, s.k));
        prop_assert_eq!((g.max_age_ms(), g.filter().0), (s.max_age_ms, s.filter));
        prop_assert_eq!((g.message_id(), g.ttl_ms(), g.sent_at_us(), g.kind()), (message_id, ttl_ms, sent_at_us, kind));
        prop_assert_eq!(g.payload().map(|p| p.bytes().to_vec()).unwrap_or_default(), payload);
    }

    #[test]
    fn geo_chosen_round_trips(
        message_id in any::<u64>(),
        hits in prop::collection::vec((any::<u64>(), any::<i32>(), any::<i32>(), 0f32..60_000.0, any::<u32>()), 0..100),
    ) {
        let hits: Vec<wire::GeoHit> = hits.iter().map(|&(u, a, o, d, t)| wire::GeoHit::new(u, a, o, d, t)).collect();
        for cmd in [Cmd::GeoQuery, Cmd::GeoPush] {
            let mut out = Vec::new();
            Encoder::new().frame(&mut out, FrameType::Response, cmd, 9, 1, |b| {
                let v = b.create_vector(&hits);
                wire::GeoChosen::create(b, &wire::GeoChosenArgs { message_id, hits: Some(v) })
            });
            let Decoded::Frame(f) = decode_one(&out) else { panic!("rejected") };
            let Body::GeoChosen(c) = f.body else { panic!("kind") };
            prop_assert_eq!(c.message_id(), message_id);
            prop_assert_eq!(c.hits().map(|h| h.iter().copied().collect::<Vec<_>>()).unwrap_or_default(), hits.clone());
        }
    }

    /// Any body behind a geo (cmd, type) header decodes or is rejected alone.
    #[test]
    fn any_geo_body_decodes_or_is_rejected_alone(
        which in 0usize..4,
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let (ty, cmd) = [
            (FrameType::Request, Cmd::GeoQuery),
            (FrameType::Request, Cmd::GeoPush),
            (FrameType::Response, Cmd::GeoQuery),
            (FrameType::Response, Cmd::GeoPush),
        ][which];
        let mut out = Vec::new();
        schema::write_frame(&mut out, ty, cmd, 1, 2, &body);
        match decode_one(&out) {
            Decoded::Frame(f) => {
                let geo = matches!(f.body, Body::GeoQuery(_) | Body::GeoPush(_) | Body::GeoChosen(_));
                prop_assert!(geo);
            }
            Decoded::Rejected { error, .. } => {
                let corrupt = matches!(error, schema::FrameError::CorruptBody { .. });
                prop_assert!(corrupt);
            }
        }
    }
}
