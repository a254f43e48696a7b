//! The geo index: the cost of an update per GPS point and of a K-nearest query, the grid of
//! `logic::geo` against an R-tree (`rstar`, remove + insert per move) and against a scan of
//! every driver; and a logic shard's GPS batch with the index on and off, in the same run.
//! Run: `taskset -c 1 cargo bench -p logic --bench geo`.
//!
//! The fleet is the loadgen `geo` scenario's: 15,000 drivers in a 30 × 30 km area, each report
//! moving a driver about 30 m (10 m/s, one report every 3 s); queries at random points of the
//! area, radius 5 km, K = 20.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use logic::geo::{Filter, GeoIndex, Query};
use logic::{ConnRef, Input, Shard, ShardConfig};
use rstar::primitives::GeomWithData;
use rstar::RTree;
use schema::wire::GpsPoint;
use std::collections::HashMap;
use std::hint::black_box;

const DRIVERS: u64 = 15_000;
/// South-west corner of the area (52.4° N, 13.2° E) and its size in 1e-7 degrees: 30 km of
/// latitude is 0.27°, 30 km of longitude there 0.44°.
const LAT0: i32 = 524_000_000;
const LON0: i32 = 132_000_000;
const LAT_SPAN: i32 = 2_700_000;
const LON_SPAN: i32 = 4_400_000;
/// One report's move, 1e-7 degrees (about 30 m).
const STEP: i32 = 2_700;

/// xorshift64*: a fixed sequence, so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: i32) -> i32 {
        (self.next() % n as u64) as i32
    }
}

/// Every driver's start, then `rounds` reports from each, each a step from the one before.
/// (uid, lat_e7, lon_e7) of a start; (uid, lat_e7, lon_e7, ts_ms) of a report.
type Start = (u64, i32, i32);
type Report = (u64, i32, i32, u64);

fn reports(rounds: usize) -> (Vec<Start>, Vec<Report>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start: Vec<Start> =
        (0..DRIVERS).map(|uid| (uid, LAT0 + rng.below(LAT_SPAN), LON0 + rng.below(LON_SPAN))).collect();
    let mut at = start.clone();
    let mut out = Vec::with_capacity(rounds * DRIVERS as usize);
    for round in 0..rounds {
        for p in at.iter_mut() {
            p.1 = (p.1 + rng.below(2 * STEP + 1) - STEP).clamp(LAT0, LAT0 + LAT_SPAN);
            p.2 = (p.2 + rng.below(2 * STEP + 1) - STEP).clamp(LON0, LON0 + LON_SPAN);
            out.push((p.0, p.1, p.2, 1 + round as u64));
        }
    }
    (start, out)
}

fn queries(n: usize) -> Vec<Query> {
    let mut rng = Rng(42);
    (0..n)
        .map(|_| Query {
            lat_e7: LAT0 + rng.below(LAT_SPAN),
            lon_e7: LON0 + rng.below(LON_SPAN),
            radius_m: 5_000.0,
            k: 20,
            max_age_ms: None,
            filter: Filter::Online,
        })
        .collect()
}

/// Local metres around the area's corner, for the R-tree (it has no notion of a sphere).
fn xy(lat_e7: i32, lon_e7: i32) -> [f64; 2] {
    let cos = (LAT0 as f64 * 1e-7).to_radians().cos();
    [(lon_e7 - LON0) as f64 * 1e-7 * 111_320.0 * cos, (lat_e7 - LAT0) as f64 * 1e-7 * 110_540.0]
}

type Pt = GeomWithData<[f64; 2], u64>;

fn bench(c: &mut Criterion) {
    let (start, moves) = reports(4);
    let qs = queries(256);

    let mut g = c.benchmark_group("geo update");
    g.throughput(Throughput::Elements(moves.len() as u64));
    g.bench_function("grid", |b| {
        b.iter_batched_ref(
            || {
                let mut idx = GeoIndex::new();
                for &(uid, la, lo) in &start {
                    idx.update(uid, la, lo, 0, 0);
                }
                idx
            },
            |idx| {
                for &(uid, la, lo, t) in &moves {
                    idx.update(uid, la, lo, t, t);
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("rtree", |b| {
        b.iter_batched_ref(
            || {
                let pts: Vec<Pt> = start.iter().map(|&(u, la, lo)| Pt::new(xy(la, lo), u)).collect();
                let at: HashMap<u64, [f64; 2]> = start.iter().map(|&(u, la, lo)| (u, xy(la, lo))).collect();
                (RTree::bulk_load(pts), at)
            },
            |(tree, at)| {
                for &(uid, la, lo, _) in &moves {
                    let new = xy(la, lo);
                    if let Some(old) = at.insert(uid, new) {
                        tree.remove(&Pt::new(old, uid));
                    }
                    tree.insert(Pt::new(new, uid));
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut idx = GeoIndex::new();
    let mut tree = RTree::new();
    for &(uid, la, lo) in &start {
        idx.update(uid, la, lo, 0, 0);
        tree.insert(Pt::new(xy(la, lo), uid));
    }
    let mut g = c.benchmark_group("geo query k=20 r=5km");
    g.throughput(Throughput::Elements(qs.len() as u64));
    g.bench_function("grid", |b| {
        b.iter(|| {
            for q in &qs {
                black_box(idx.nearest(q, 0, |_| true));
            }
        })
    });
    g.bench_function("rtree", |b| {
        b.iter(|| {
            for q in &qs {
                let p = xy(q.lat_e7, q.lon_e7);
                let n = tree
                    .nearest_neighbor_iter_with_distance_2(&p)
                    .take_while(|(_, d2)| *d2 <= q.radius_m * q.radius_m)
                    .take(q.k)
                    .count();
                black_box(n);
            }
        })
    });
    g.bench_function("scan", |b| {
        b.iter(|| {
            for q in &qs[..16] {
                black_box(idx.nearest_by_scan(q, 0, |_| true));
            }
        })
    });
    g.finish();

    // A logic shard's GPS path in steady state: every driver logged in and indexed, then
    // batches of 1,000 reports through `Shard::handle`, with the index on and off.
    let mut g = c.benchmark_group("gps batch 1000");
    g.throughput(Throughput::Elements(1_000));
    for (name, geo_index) in [("index on", true), ("index off", false)] {
        let mut s = shard(geo_index);
        let mut out = Vec::new();
        for &(uid, la, lo) in &start {
            let conn = ConnRef { shard: 0, slot: uid as u32, gen: 1 };
            let login =
                Input::Login { uid, role: 1, conn, log_id: 1, seq: 1, wall_ms: 0, resume_secret: None };
            s.handle(login, 0, &mut out);
            s.handle(Input::Gps { uid, point: GpsPoint::new(0, la, lo, 0, 0, 0, 0) }, 0, &mut out);
        }
        s.flush_gps(&mut out);
        out.clear();
        // Each round of reports goes in again with later fix times, so every point is news.
        let mut at = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                for _ in 0..1_000 {
                    let (uid, la, lo, t) = moves[at % moves.len()];
                    let ts = t + (at / moves.len()) as u64 * 10;
                    s.handle(Input::Gps { uid, point: GpsPoint::new(ts, la, lo, 0, 0, 0, 0) }, ts, &mut out);
                    at += 1;
                }
                if at.is_multiple_of(15_000) {
                    s.flush_gps(&mut out);
                    out.clear();
                }
            })
        });
    }
    g.finish();
}

fn shard(geo_index: bool) -> Shard {
    Shard::new(ShardConfig {
        id: 0,
        gps_flush_ms: 1_000,
        gps_forward: logic::gps::Forward::Latest,
        gps_max_buffered: 1 << 20,
        push_queue_len: 256,
        max_pending_requests: 10_000,
        request_timeout_ms: 10_000,
        hold_ms: 60_000,
        max_held: 100_000,
        push_queue_bytes: 1 << 18,
        clustered: false,
        geo_index,
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
