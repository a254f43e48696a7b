//! The secure channel's costs on the gate: the two handshakes (responder side) and the record
//! layer on GPS-sized frames.
//! Run: `cargo bench -p channel --bench channel`.

use channel::handshake::{parse_resume_hello, respond_hello, respond_resume, ClientHandshake, ResumeSecret};
use channel::{KeyRing, Keypair, Record, RecordReader, RecordType, Transport};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

/// A Login frame's size: 24-byte header and a body holding the 50-byte token and a device.
const LOGIN: [u8; 112] = [0x4c; 112];
/// A Session answer's size.
const SESSION: [u8; 96] = [0x53; 96];
/// One GpsReport frame (docs/PROTOCOL.md §13).
const GPS: [u8; 64] = [0x47; 64];

fn body(wire: &[u8]) -> Vec<u8> {
    let mut reader = RecordReader::new();
    let mut input = wire;
    reader.next(&mut input).unwrap().unwrap().body.to_vec()
}

/// A transport pair after a real login: (app, gate).
fn pair() -> (Transport, Transport) {
    let gate_key = Keypair::generate();
    let keys = KeyRing::new(gate_key.clone());
    let mut hello = Vec::new();
    let app = ClientHandshake::login(gate_key.public(), &Keypair::generate(), &LOGIN, &mut hello).unwrap();
    let mut accept = Vec::new();
    let mut gate = respond_hello(&keys, &body(&hello), 0).unwrap().accept(&SESSION, &mut accept).unwrap();
    let mut confirm = Vec::new();
    let app = app.read_accept(&body(&accept), &mut confirm).unwrap();
    // The app's commit record takes nonce 0.
    gate.transport.open_into(&body(&confirm), &mut Vec::new()).unwrap();
    (app.transport, gate.transport)
}

fn handshakes(c: &mut Criterion) {
    let gate_key = Keypair::generate();
    let keys = KeyRing::new(gate_key.clone());
    let mut hello = Vec::new();
    ClientHandshake::login(gate_key.public(), &Keypair::generate(), &LOGIN, &mut hello).unwrap();
    let hello = body(&hello);
    let mut g = c.benchmark_group("responder");
    g.bench_function("IK: read Hello (112 B Login) + write Accept (96 B Session)", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            let hs = respond_hello(&keys, black_box(&hello), 0).unwrap();
            black_box(hs.accept(&SESSION, &mut out).unwrap());
        })
    });

    let secret = ResumeSecret([7; 32]);
    let mut rh = Vec::new();
    ClientHandshake::resume(&[1; 16], &secret, &LOGIN, &mut rh).unwrap();
    let rh = body(&rh);
    g.bench_function("NNpsk0: read ResumeHello (112 B Resume) + write Accept (96 B Session)", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            let parsed = parse_resume_hello(black_box(&rh)).unwrap();
            let hs = respond_resume(&parsed, &secret).unwrap();
            black_box(hs.accept(&SESSION, &mut out).unwrap());
        })
    });
    g.finish();
}

fn records(c: &mut Criterion) {
    let (mut app, gate) = pair();
    let mut wire = Vec::new();
    app.seal_into(&GPS, &mut wire).unwrap();
    let gps_body = body(&wire);

    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    // Each iteration opens with a fresh copy of the gate's transport, so the nonce matches;
    // the copy (80 bytes) and the body's copy are setup, outside the measurement.
    g.bench_function("open_in_place: one 64 B GPS frame", |b| {
        b.iter_batched_ref(
            || (gate.clone(), gps_body.clone()),
            |(t, body)| {
                black_box(t.open_in_place(body).unwrap().len());
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("read record + open_into: one 64 B GPS frame", |b| {
        let mut plain = Vec::with_capacity(256);
        b.iter_batched_ref(
            || (gate.clone(), RecordReader::new()),
            |(t, reader)| {
                plain.clear();
                let mut input = &wire[..];
                let Record { kind, body } = reader.next(&mut input).unwrap().unwrap();
                debug_assert_eq!(kind, RecordType::Data);
                black_box(t.open_into(body, &mut plain).unwrap());
            },
            BatchSize::SmallInput,
        )
    });

    let ten: Vec<u8> = GPS.repeat(10);
    let (mut tx, _) = pair();
    g.throughput(Throughput::Elements(10));
    g.bench_function("seal_into: 10 × 64 B frames in one record", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            black_box(tx.seal_into(black_box(&ten), &mut out).unwrap());
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal_into: one 64 B frame", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            black_box(tx.seal_into(black_box(&GPS), &mut out).unwrap());
        })
    });
    g.finish();
}

criterion_group!(benches, handshakes, records);
criterion_main!(benches);
