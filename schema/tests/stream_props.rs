//! Property tests of the decoder over streams: any split of a valid stream yields the same
//! frames; arbitrary and mutated bytes never panic and never read past a frame.

mod common;

use proptest::prelude::*;
use schema::{Decoded, Frames, Limits, StreamError};

/// What a decoded item looks like, comparable across runs (header + raw body or error text).
#[derive(Debug, PartialEq)]
enum Seen {
    Frame { cmd: u16, seq: u32, log_id: u64, body: Vec<u8> },
    Rejected { cmd: u16, error: String },
}

fn seen(d: &Decoded<'_>) -> Seen {
    match d {
        Decoded::Frame(f) => Seen::Frame {
            cmd: f.header.cmd,
            seq: f.header.seq,
            log_id: f.header.log_id,
            body: f.raw_body.to_vec(),
        },
        Decoded::Rejected { header, error } => Seen::Rejected { cmd: header.cmd, error: error.to_string() },
    }
}

/// Feeds `stream` to a read buffer in the given chunk sizes, the way a connection would:
/// append what arrived, decode every whole frame, keep the rest.
fn decode_in_chunks(stream: &[u8], chunks: &[usize], limits: Limits) -> (Vec<Seen>, Result<(), StreamError>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < stream.len() {
        let n = chunks.get(i).copied().unwrap_or(stream.len()).max(1).min(stream.len() - pos);
        i += 1;
        buf.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
        let mut frames = Frames::new(&buf, limits);
        for item in frames.by_ref() {
            match item {
                Ok(d) => out.push(seen(&d)),
                Err(e) => return (out, Err(e)),
            }
        }
        let used = frames.consumed();
        buf.drain(..used);
    }
    (out, schema::decode::finish(&buf))
}

fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    let all = common::all_frames();
    prop::collection::vec(0..all.len(), 1..40)
        .prop_map(move |picks| picks.iter().flat_map(|&i| all[i].1.iter().copied()).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_split_gives_the_same_frames(stream in valid_stream(), chunks in prop::collection::vec(1usize..97, 0..200)) {
        let (whole, end) = decode_in_chunks(&stream, &[], Limits::SIDECAR);
        prop_assert_eq!(end, Ok(()));
        let all_frames = whole.iter().all(|s| matches!(s, Seen::Frame { .. }));
        prop_assert!(all_frames);
        let (split, end) = decode_in_chunks(&stream, &chunks, Limits::SIDECAR);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), chunks in prop::collection::vec(1usize..64, 0..64)) {
        let _ = decode_in_chunks(&bytes, &chunks, Limits::APP);
    }

    #[test]
    fn random_bodies_behind_valid_headers_never_panic(
        cmd_ty in prop::sample::select(common::all_frames().into_iter().map(|(_, f)| (f[2], u16::from_le_bytes([f[4], f[5]]))).collect::<Vec<_>>()),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let (ty, cmd) = cmd_ty;
        let mut frame = schema::Header { version: 1, ty, flags: 0, cmd, seq: 1, body_len: body.len() as u32, log_id: 9 }.to_bytes().to_vec();
        frame.extend_from_slice(&body);
        // Whatever the body, the frame's length is sound: exactly one item, and the stream goes on.
        let (items, end) = decode_in_chunks(&frame, &[], Limits::APP);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(items.len(), 1);
    }

    #[test]
    fn mutated_valid_streams_never_panic(stream in valid_stream(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16)) {
        let mut s = stream;
        for (at, v) in flips {
            let i = at.index(s.len());
            s[i] = v;
        }
        let _ = decode_in_chunks(&s, &[7, 13, 1, 64], Limits::APP);
    }

    #[test]
    fn unknown_cmd_is_skipped_and_the_next_frame_decodes(cmd in 0x0200u16.., body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut s = schema::Header { version: 1, ty: 1, flags: 0, cmd, seq: 5, body_len: body.len() as u32, log_id: 1 }.to_bytes().to_vec();
        s.extend_from_slice(&body);
        let good = &common::all_frames()[0].1;
        s.extend_from_slice(good);
        let (items, end) = decode_in_chunks(&s, &[3], Limits::APP);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(items.len(), 2);
        let first_is_unknown_cmd = matches!(&items[0], Seen::Rejected { error, .. } if error.starts_with("unknown cmd"));
        let second_is_frame = matches!(&items[1], Seen::Frame { .. });
        prop_assert!(first_is_unknown_cmd, "first was {:?}", items[0]);
        prop_assert!(second_is_frame);
    }
}

#[test]
fn stream_errors_are_typed() {
    let good = &common::all_frames()[8].1; // a GPS report
    let mut bad_magic = good.clone();
    bad_magic[0] = b'G';
    assert_eq!(schema::decode(&bad_magic, &Limits::APP).unwrap_err(), StreamError::BadMagic(b'G'));
    let mut v2 = good.clone();
    v2[1] = 2;
    assert_eq!(schema::decode(&v2, &Limits::APP).unwrap_err(), StreamError::UnsupportedVersion(2));
    let mut huge = good.clone();
    huge[12..16].copy_from_slice(&(1u32 << 20).to_le_bytes());
    assert_eq!(
        schema::decode(&huge, &Limits::APP).unwrap_err(),
        StreamError::FrameTooLarge { len: 1 << 20, max: schema::decode::MAX_APP_BODY }
    );
    // Too large is refused from the header alone, before the body arrives.
    assert!(schema::decode(&huge[..24], &Limits::APP).is_err());
    assert!(matches!(schema::decode(&good[..30], &Limits::APP), Ok(None)));
    assert_eq!(
        schema::decode::finish(&good[..30]),
        Err(StreamError::Truncated { have: 30, need: good.len() })
    );
    assert_eq!(schema::decode::finish(&good[..3]), Err(StreamError::Truncated { have: 3, need: 24 }));
}

#[test]
fn corrupt_body_is_rejected_alone() {
    let good = &common::all_frames()[9].1; // a GPS batch
    let mut s = good.clone();
    s[24] = 0xFF; // root offset points outside the body
    s.extend_from_slice(good);
    let (items, end) = decode_in_chunks(&s, &[], Limits::APP);
    assert_eq!(end, Ok(()));
    assert!(
        matches!(&items[0], Seen::Rejected { error, .. } if error.starts_with("corrupt GpsBatch")),
        "{:?}",
        items[0]
    );
    assert!(matches!(&items[1], Seen::Frame { .. }));
}

#[test]
fn wrong_type_for_cmd_is_rejected_alone() {
    let mut s = common::all_frames()[8].1.clone();
    s[2] = schema::FrameType::Request as u8; // GPS is an event, never a request
    match schema::decode(&s, &Limits::APP) {
        Ok(Some((Decoded::Rejected { error: schema::FrameError::BadType { .. }, .. }, n))) => {
            assert_eq!(n, s.len())
        }
        other => panic!("{other:?}"),
    }
}
