//! decode + verify of GPS frames: the per-point cost the gate pays in user space.
//! Run: `cargo bench -p schema --bench decode` (or `make bench-codec`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use schema::wire::GpsPoint;
use schema::{Body, Decoded, Encoder, Frames, Limits};
use std::hint::black_box;

fn point(i: u64) -> GpsPoint {
    GpsPoint::new(1_700_000_000_000 + i, 399_042_000, 1_164_074_000, 120, 9000, 50, 0)
}

/// Decodes every frame in `buf`, copying each point out as the gate does; returns points seen.
fn drain(buf: &[u8]) -> usize {
    let mut n = 0;
    for item in Frames::new(buf, Limits::APP) {
        if let Ok(Decoded::Frame(f)) = item {
            match f.body {
                Body::GpsReport(g) => {
                    if let Some(p) = g.point() {
                        black_box(*p);
                        n += 1;
                    }
                }
                Body::GpsBatch(g) => {
                    if let Some(ps) = g.points() {
                        for p in ps.iter() {
                            black_box(*p);
                            n += 1;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let mut enc = Encoder::new();
    let mut one = Vec::new();
    enc.gps_report(&mut one, 1, &point(0));
    let mut batch = Vec::new();
    let pts: Vec<_> = (0..10).map(point).collect();
    enc.gps_batch(&mut batch, 1, &pts);
    // 64 single-point frames back to back, as one read of a busy socket returns them.
    let mut burst = Vec::new();
    for i in 0..64 {
        enc.gps_report(&mut burst, i, &point(i));
    }

    let mut g = c.benchmark_group("gps_decode_verify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_frame", |b| b.iter(|| drain(black_box(&one))));
    g.throughput(Throughput::Elements(64));
    g.bench_function("burst_of_64_frames", |b| b.iter(|| drain(black_box(&burst))));
    g.throughput(Throughput::Elements(10));
    g.bench_function("batch_of_10_points", |b| b.iter(|| drain(black_box(&batch))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
