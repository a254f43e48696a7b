//! Decoder + verifier over arbitrary bytes, fed in arbitrary chunk sizes like a socket would.
//! Run: `make fuzz` (or `RUSTC_BOOTSTRAP=1 cargo fuzz run decode` in schema/).
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::{Body, Decoded, Frames, Limits};

fuzz_target!(|data: &[u8]| {
    // First byte picks a chunk size, so splits are explored too.
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = (chunk as usize % 64) + 1;
    let limits = Limits { max_body: 4096 };
    let mut buf = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        let mut frames = Frames::new(&buf, limits);
        for item in frames.by_ref() {
            match item {
                // Touch the verified views: reading them must never panic.
                Ok(Decoded::Frame(f)) => touch(&f.body),
                Ok(Decoded::Rejected { .. }) => {}
                Err(_) => return,
            }
        }
        let used = frames.consumed();
        assert!(used <= buf.len());
        buf.drain(..used);
    }
    let _ = schema::decode::finish(&buf);
    // The specialised GPS check must agree with the generic verifier on any bytes.
    assert_eq!(
        schema::decode::gps_report_is_valid(stream),
        schema::flatbuffers::root::<schema::wire::GpsReport>(stream).is_ok()
    );
});

fn touch(b: &Body<'_>) {
    match b {
        Body::GpsBatch(g) => {
            if let Some(p) = g.points() {
                for x in p.iter() {
                    std::hint::black_box(x.lat_e7());
                }
            }
        }
        Body::GpsReport(g) => {
            std::hint::black_box(g.point().map(|p| p.ts_ms()));
        }
        Body::Login(l) => {
            std::hint::black_box((l.token().map(|t| t.len()), l.device()));
        }
        Body::Push(p) => {
            if let Some(u) = p.uids() {
                std::hint::black_box(u.iter().fold(0u64, u64::wrapping_add));
            }
            std::hint::black_box(p.payload().map(|p| p.len()));
        }
        Body::Error(e) => {
            std::hint::black_box(e.message());
        }
        Body::Upstream(u) => {
            std::hint::black_box(u.body().map(|b| b.len()));
        }
        Body::UpstreamReply(u) => {
            std::hint::black_box(u.reply().and_then(|r| r.message()));
        }
        Body::Receipts(r) => {
            if let Some(r) = r.receipts() {
                std::hint::black_box(r.iter().fold(0u64, |a, x| a.wrapping_add(x.uid())));
            }
        }
        Body::GpsForward(g) => {
            if let Some(p) = g.points() {
                std::hint::black_box(p.iter().fold(0u64, |a, x| a.wrapping_add(x.uid())));
            }
        }
        Body::PushDelivery(d) => {
            std::hint::black_box((d.message_id(), d.payload().map(|p| p.len()), d.sent_at_us()));
            std::hint::black_box((d.kind(), d.deadline_ms()));
        }
        Body::PushAck(a) => {
            std::hint::black_box(a.message_id());
        }
        Body::EndSession(e) => {
            std::hint::black_box((e.uid(), e.message()));
        }
        Body::SessionEnded(e) => {
            std::hint::black_box((e.uid(), e.found(), e.node()));
        }
        Body::GeoQuery(g) => {
            std::hint::black_box((g.lat_e7(), g.lon_e7(), g.radius_m(), g.k(), g.max_age_ms(), g.filter()));
        }
        Body::GeoPush(g) => {
            std::hint::black_box((g.lat_e7(), g.lon_e7(), g.radius_m(), g.k(), g.max_age_ms(), g.filter()));
            std::hint::black_box((g.message_id(), g.payload().map(|p| p.len()), g.ttl_ms(), g.sent_at_us(), g.kind()));
        }
        Body::GeoChosen(c) => {
            if let Some(h) = c.hits() {
                std::hint::black_box(h.iter().fold(0f32, |a, x| a + x.distance_m() + x.age_ms() as f32));
            }
        }
        other => {
            std::hint::black_box(other.kind());
        }
    }
}
