//! The TTL index on the push path: every delivery inserts into it and every ack removes from
//! it. One delivery's insert and an older one's removal, with many deliveries in flight (a real
//! fleet's acks take a mobile round trip, so in flight is deliveries/s × that), for
//! `logic::push::TtlIndex` (an ordered map of expiry instants, a hash set of deliveries each)
//! against one ordered set of every delivery, the index before it, in the same run.
//! Run: `taskset -c 1 cargo bench -p logic --bench ttl`.
//!
//! In flight: pushes of fan-out 1,000, each with its own deadline (all its deliveries share it),
//! uids spread over 15,000 drivers.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use logic::push::TtlIndex;
use std::collections::{BTreeSet, VecDeque};
use std::hint::black_box;

const FANOUT: u64 = 1_000;
const DRIVERS: u64 = 15_000;

/// The n-th delivery: (expiry ms, uid, sequence-id), pushes 2 ms apart with a 30 s TTL.
fn delivery(n: u64) -> (u64, u64, u32) {
    let push = n / FANOUT;
    let uid = (n * 7_919) % DRIVERS;
    (30_000 + push * 2, uid, (n / DRIVERS) as u32)
}

fn ttl(c: &mut Criterion) {
    let mut g = c.benchmark_group("ttl_insert_and_remove");
    g.throughput(Throughput::Elements(1));
    for in_flight in [10_000u64, 300_000] {
        g.bench_function(format!("index, {in_flight} in flight"), |b| {
            let mut index = TtlIndex::default();
            let mut live: VecDeque<(u64, u64, u32)> = (0..in_flight).map(delivery).collect();
            for &(t, u, s) in &live {
                index.insert(t, u, s);
            }
            let mut n = in_flight;
            b.iter(|| {
                let (t, u, s) = delivery(n);
                index.insert(t, u, s);
                live.push_back((t, u, s));
                let (t, u, s) = live.pop_front().expect("in flight");
                index.remove(t, u, s);
                n += 1;
                black_box(index.len())
            });
        });
        g.bench_function(format!("one ordered set (before), {in_flight} in flight"), |b| {
            let mut set = BTreeSet::new();
            let mut live: VecDeque<(u64, u64, u32)> = (0..in_flight).map(delivery).collect();
            for &e in &live {
                set.insert(e);
            }
            let mut n = in_flight;
            b.iter(|| {
                let e = delivery(n);
                set.insert(e);
                live.push_back(e);
                let e = live.pop_front().expect("in flight");
                set.remove(&e);
                n += 1;
                black_box(set.len())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, ttl);
criterion_main!(benches);
