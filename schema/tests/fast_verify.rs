//! The specialised GpsReport check must agree with the generic FlatBuffers verifier on every
//! input: accepting more would be unsound, accepting less would refuse good frames.

mod common;

use proptest::prelude::*;
use schema::decode::gps_report_is_valid;
use schema::wire;

fn generic(b: &[u8]) -> bool {
    schema::flatbuffers::root::<wire::GpsReport>(b).is_ok()
}

fn valid_body() -> Vec<u8> {
    let mut frame = Vec::new();
    schema::Encoder::new().gps_report(&mut frame, 1, &common::point(3));
    frame[schema::HEADER_LEN..].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn agrees_on_random_bytes(b in prop::collection::vec(any::<u8>(), 0..96)) {
        prop_assert_eq!(gps_report_is_valid(&b), generic(&b));
    }

    #[test]
    fn agrees_on_mutated_reports(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in 0usize..8, extra in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut b = valid_body();
        for (at, v) in flips {
            let i = at.index(b.len());
            b[i] = v;
        }
        b.truncate(b.len().saturating_sub(cut));
        b.extend_from_slice(&extra);
        prop_assert_eq!(gps_report_is_valid(&b), generic(&b));
    }

    #[test]
    fn agrees_on_small_offsets(root in 0u32..64, so in -64i32..64, vlen in 0u16..16, field in 0u16..40, len in 0usize..80) {
        // Hand-made layouts that reach every branch: root, soffset, vtable length, field offset.
        let mut b = vec![0u8; len.max(8)];
        b[..4].copy_from_slice(&root.to_le_bytes());
        let t = root as usize;
        if t + 4 <= b.len() {
            b[t..t + 4].copy_from_slice(&so.to_le_bytes());
        }
        let vt = t as i64 - so as i64;
        if vt >= 0 && (vt as usize) + 6 <= b.len() {
            let vt = vt as usize;
            b[vt..vt + 2].copy_from_slice(&vlen.to_le_bytes());
            b[vt + 4..vt + 6].copy_from_slice(&field.to_le_bytes());
        }
        b.truncate(len);
        prop_assert_eq!(gps_report_is_valid(&b), generic(&b));
    }
}

#[test]
fn accepts_what_the_encoder_writes() {
    assert!(gps_report_is_valid(&valid_body()));
    assert!(generic(&valid_body()));
}
