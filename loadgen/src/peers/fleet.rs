//! Drivers against a peer, as [`Client`]s of one [`Loop`] per plan core, the same loop as the
//! gate fleet in [`crate::engine`] so loadgen spends its CPU the same way whatever the target.
//!
//! A driver connects, does its protocol's handshake (subscribing to its push topic), then
//! reports GPS at its rate and pings when otherwise silent for [`KEEPALIVE`]. Bytes from the
//! server go through [`PeerConn`] (a packet split across reads is kept in a `Vec` only until it
//! is whole); pushes are counted and timed where they arrive.
//!
//! With TLS (`--tls-ca`, MQTT only) each connection has its own [`Tls`]: what the loop reads is
//! ciphertext, decrypted into a plaintext buffer of the loop before the protocol sees it, and
//! what the protocol writes goes to another buffer of the loop and is encrypted into the loop's
//! `out`. The handshake starts as the TCP connection comes up; CONNECT and SUBSCRIBE wait
//! inside rustls until it is done, so a driver is up at its SUBACK as without TLS.

use super::tls::{Tls, TlsClient};
use super::wire::{PeerConn, PeerError};
use super::{mqtt, nats, Proto, GPS_POINT_BYTES, KEEPALIVE};
use crate::engine::driver::{gps_interval, is_late, CENTER};
use crate::engine::event_loop::{Client, Ended, Flow, Loop};
use crate::engine::stats::{ExecStats, Hists};
use crate::engine::{Control, Phase};
use crate::plan::Plan;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use schema::wire::GpsPoint;
use schema::Encoder;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest the handshake may take once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest backoff between failed attempts (before jitter): 50 ms << 7 = 6.4 s.
const MAX_BACKOFF_SHIFT: u32 = 7;
/// Wait before reconnecting after a connection that was not a failure.
const RECONNECT: Duration = Duration::from_millis(10);

/// What one loop's drivers share.
struct Exec {
    /// Index into the stats.
    id: usize,
    /// The run.
    plan: Arc<Plan>,
    /// The protocol.
    proto: Proto,
    /// Phase from the main thread.
    control: Arc<Control>,
    /// Every loop's numbers (this one's at `id`).
    all_stats: Arc<Vec<ExecStats>>,
    /// GPS payloads being built.
    scratch: RefCell<Vec<u8>>,
    /// The gate's frame encoder, for the ceiling's GPS frames.
    enc: RefCell<Encoder>,
    /// Push and connect latencies.
    hists: RefCell<Hists>,
    /// Jitter.
    rng: RefCell<SmallRng>,
    /// TLS for every connection (`--tls-ca`), or none.
    tls: Option<TlsClient>,
    /// With TLS: plaintext decrypted from one read.
    tls_in: RefCell<Vec<u8>>,
    /// With TLS: plaintext written by one callback, before it is encrypted.
    tls_out: RefCell<Vec<u8>>,
    /// A TLS failure was printed already (once per loop is enough to say why).
    tls_said: Cell<bool>,
}

impl Exec {
    fn stats(&self) -> &ExecStats {
        &self.all_stats[self.id]
    }

    fn rand(&self, range: std::ops::Range<f64>) -> f64 {
        self.rng.borrow_mut().random_range(range)
    }

    /// Counts a TLS failure (in the handshake: a failed connect; after it: a protocol error)
    /// and says why on stderr, once per loop.
    fn tls_failed(&self, in_handshake: bool, e: &rustls::Error) {
        let c = &self.stats().c;
        if in_handshake {
            c.err_connect.fetch_add(1, Relaxed);
        } else {
            c.err_protocol.fetch_add(1, Relaxed);
        }
        if !self.tls_said.replace(true) {
            let when = if in_handshake { "handshake" } else { "connection" };
            eprintln!(
                "loadgen: TLS {when} with {} failed: {e} (counted in errors; further failures on core {} are not printed)",
                self.plan.gate(), self.id
            );
        }
    }
}

/// Runs `write` with the buffer a connection's protocol bytes go to: `out` itself, or with TLS
/// the loop's plaintext buffer, encrypted into `out` afterwards.
fn emit<R>(tls: &mut Option<Tls>, ex: &Exec, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let Some(tls) = tls else { return write(out) };
    let mut plain = ex.tls_out.borrow_mut();
    plain.clear();
    let r = write(&mut plain);
    if !plain.is_empty() {
        tls.write(&plain, out);
    }
    r
}

/// The running loops.
pub struct Fleet {
    /// One per core; each returns its histograms.
    handles: Vec<JoinHandle<Hists>>,
}

impl Fleet {
    /// Waits for every loop (after `Phase::Stop`) and merges their histograms.
    pub fn join(self) -> Hists {
        let mut h = Hists::default();
        for r in self.handles.into_iter().filter_map(|h| h.join().ok()) {
            h.merge(&r);
        }
        h
    }
}

/// Splits the drivers over the plan's cores (driver `i` on loop `i % n`) and starts a pinned
/// thread with one loop on each.
pub fn start(
    plan: Arc<Plan>,
    proto: Proto,
    tls: Option<TlsClient>,
    control: Arc<Control>,
    stats: Arc<Vec<ExecStats>>,
) -> Result<Fleet, String> {
    let n = plan.cores.len();
    let mut handles = Vec::with_capacity(n);
    for (id, &cpu) in plan.cores.iter().enumerate() {
        let uids: Vec<u64> =
            (id..plan.drivers as usize).step_by(n).map(|i| plan.driver_uid(i as u32)).collect();
        let (plan, control, stats, tls) = (plan.clone(), control.clone(), stats.clone(), tls.clone());
        let h = std::thread::Builder::new()
            .name(format!("loadgen-peer-{id}"))
            .spawn(move || {
                crate::run::pin_to(&[cpu]);
                let ex = Exec {
                    id,
                    plan,
                    proto,
                    control,
                    all_stats: stats,
                    scratch: RefCell::new(Vec::with_capacity(4096)),
                    enc: RefCell::new(Encoder::new()),
                    hists: RefCell::new(Hists::default()),
                    rng: RefCell::new(SmallRng::from_os_rng()),
                    tls,
                    tls_in: RefCell::new(Vec::new()),
                    tls_out: RefCell::new(Vec::new()),
                    tls_said: Cell::new(false),
                };
                run_loop(&ex, &uids);
                ex.hists.take()
            })
            .map_err(|e| format!("cannot start a thread for core {cpu}: {e}"))?;
        handles.push(h);
    }
    Ok(Fleet { handles })
}

/// One core's drivers in one loop until Stop.
fn run_loop(ex: &Exec, uids: &[u64]) {
    let born = Instant::now();
    let drivers: Vec<Driver> = uids.iter().map(|&uid| Driver::new(ex, uid, born)).collect();
    let g = &ex.stats().g;
    g.loop_tid.store(u64::from(crate::procstat::current_tid().unwrap_or(0)), Relaxed);
    g.tasks.fetch_add(drivers.len() as i64, Relaxed);
    let rate = f64::from(ex.plan.connect_rate) / ex.plan.cores.len() as f64;
    match Loop::new(drivers, rate) {
        // Peers have no storms or random drops: nothing to do on the control tick.
        Ok(mut lp) => lp.run(ex, &ex.control, |_, _, _| {}),
        Err(e) => eprintln!("loadgen: cannot start the loop on core {}: {e}", ex.id),
    }
    g.tasks.fetch_sub(uids.len() as i64, Relaxed);
}

/// A driver's GPS schedule and position (a slow wander; the bytes matter, not the route).
struct Gps {
    /// The driver's uid, carried in every point.
    uid: u64,
    /// When the next report is due.
    next: Instant,
    /// Latitude, 1e-7 degrees.
    lat_e7: i32,
    /// Longitude, 1e-7 degrees.
    lon_e7: i32,
    /// Points sent so far.
    seq: u32,
}

/// One driver against a peer.
struct Driver {
    gps: Gps,
    /// Its GPS topic (subject).
    topic: Vec<u8>,
    /// When its first connect started: the first connection's latency counts from here.
    born: Option<Instant>,
    /// No connection came up yet.
    first: bool,
    /// Failed attempts in a row (the backoff).
    failures: u32,
    /// The current connection's protocol state.
    peer: Option<PeerConn>,
    /// The current connection's TLS (with `--tls-ca`).
    tls: Option<Tls>,
    /// The handshake is done on the current connection.
    live: bool,
    /// When the handshake must be done by.
    handshake_deadline: Instant,
    /// When this side last wrote (keepalives count from it).
    last_tx: Instant,
    /// A packet split across reads, until it is whole (empty and unallocated normally).
    partial: Vec<u8>,
    /// The current connection failed in a way that grows the backoff.
    failed: bool,
    /// When the bytes of the read being handled arrived in the socket (push runs only).
    rx_us: Option<u64>,
}

impl Driver {
    fn new(ex: &Exec, uid: u64, born: Instant) -> Driver {
        Driver {
            gps: Gps {
                uid,
                next: born,
                lat_e7: ((CENTER.0 + ex.rand(-0.1..0.1)) * 1e7) as i32,
                lon_e7: ((CENTER.1 + ex.rand(-0.1..0.1)) * 1e7) as i32,
                seq: 0,
            },
            topic: ex.proto.gps_topic(uid),
            born: None,
            first: true,
            failures: 0,
            peer: None,
            tls: None,
            live: false,
            handshake_deadline: born,
            last_tx: born,
            partial: Vec::new(),
            failed: false,
            rx_us: None,
        }
    }

    /// The handshake is done: count the connection up and start its GPS schedule.
    fn up(&mut self, ex: &Exec, now: Instant) {
        let c = &ex.stats().c;
        self.live = true;
        ex.stats().g.live.fetch_add(1, Relaxed);
        if std::mem::take(&mut self.first) {
            c.logins.fetch_add(1, Relaxed);
            let us =
                now.duration_since(self.born.unwrap_or(now)).as_micros().min(u128::from(u64::MAX)) as u64;
            ex.hists.borrow_mut().login.saturating_record(us);
        } else {
            c.relogins.fetch_add(1, Relaxed);
        }
        // The first report at a random moment within one interval, so the fleet is not in
        // lockstep.
        let phase = gps_interval(ex.plan.rate, ex.plan.batch)
            .map_or(Duration::ZERO, |i| i.mul_f64(ex.rand(0.0..1.0)));
        self.gps.next = now + phase;
    }

    /// Writes what is due now (a GPS report, else a keepalive).
    fn send_due(&mut self, ex: &Exec, now: Instant, out: &mut Vec<u8>) {
        let c = &ex.stats().c;
        let Some(peer) = &self.peer else { return };
        if ex.plan.rate > 0.0 && sending(ex) && now >= self.gps.next {
            let batch = ex.plan.batch.max(1);
            write_gps(ex, &mut self.gps, &self.topic, out, batch);
            c.gps_frames.fetch_add(1, Relaxed);
            c.gps_points.fetch_add(u64::from(batch), Relaxed);
            c.frames_out.fetch_add(1, Relaxed);
            if is_late(self.gps.next, now) {
                c.gps_late.fetch_add(1, Relaxed);
            }
            // Keep the rate on average with ±20 % jitter; more than a second behind (the loop
            // is saturated), start afresh rather than burst, and count it.
            if let Some(interval) = gps_interval(ex.plan.rate, batch) {
                self.gps.next += interval.mul_f64(ex.rand(0.8..1.2));
                if self.gps.next + Duration::from_secs(1) < now {
                    self.gps.next = now + interval.mul_f64(ex.rand(0.0..1.0));
                    c.gps_behind.fetch_add(1, Relaxed);
                }
            }
        } else if now >= self.last_tx + KEEPALIVE {
            peer.ping(out);
        }
        if !out.is_empty() {
            self.last_tx = now;
        }
    }

    /// Handles plaintext from the server: answers (NATS PONG) are written, pushes counted and
    /// timed, and a packet split across reads waits in `partial`.
    fn on_plain(&mut self, ex: &Exec, data: &[u8], now: Instant, out: &mut Vec<u8>) -> Flow {
        let c = &ex.stats().c;
        let rx_us = self.rx_us;
        let Some(peer) = self.peer.as_mut() else { return Flow::End };
        let now_us = crate::appserver::now_us();
        let mut received = 0u64;
        let fed = {
            let mut hists = ex.hists.borrow_mut();
            let mut on_msg = |_topic: &[u8], payload: &[u8]| {
                if let Some((_, sent_at_us)) = super::read_push(payload) {
                    received += 1;
                    hists.record_push(sent_at_us, now_us, rx_us);
                }
            };
            if self.partial.is_empty() {
                peer.feed(data, out, &mut on_msg).map(|used| self.partial.extend_from_slice(&data[used..]))
            } else {
                self.partial.extend_from_slice(data);
                peer.feed(&self.partial, out, &mut on_msg).map(|used| {
                    self.partial.drain(..used);
                })
            }
        };
        c.push_first.fetch_add(received, Relaxed);
        if let Err(e) = fed {
            match e {
                PeerError::Refused(_) => c.err_login.fetch_add(1, Relaxed),
                _ => c.err_protocol.fetch_add(1, Relaxed),
            };
            self.failed = true;
            return Flow::End;
        }
        if self.partial.is_empty() && self.partial.capacity() > 0 {
            // Give back what a split packet needed; an idle driver keeps nothing.
            self.partial = Vec::new();
        }
        if !self.live && peer.ready() {
            self.up(ex, now);
        }
        Flow::Go
    }
}

/// True while GPS should flow (ramp and window, as with the gate).
fn sending(ex: &Exec) -> bool {
    ex.control.phase() <= Phase::Run
}

impl Client for Driver {
    type Shared = Exec;

    fn addr(&self, ex: &Exec) -> (SocketAddr, Option<IpAddr>) {
        (ex.plan.gate(), None)
    }

    fn live(&self) -> bool {
        self.live
    }

    fn on_connecting(&mut self, now: Instant) {
        self.born.get_or_insert(now);
    }

    fn on_connected(&mut self, ex: &Exec, now: Instant, out: &mut Vec<u8>) -> Flow {
        let uid = self.gps.uid;
        self.live = false;
        self.failed = false;
        self.partial = Vec::new();
        self.handshake_deadline = now + HANDSHAKE_TIMEOUT;
        self.last_tx = now;
        self.tls = match &ex.tls {
            None => None,
            Some(client) => match client.start(out) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    ex.tls_failed(true, &e);
                    self.failed = true;
                    return Flow::End;
                }
            },
        };
        let subscribe = (ex.proto != Proto::Ceiling).then(|| ex.proto.push_topic(uid));
        let mut peer = PeerConn::new(ex.proto, format!("fg-d{uid}"), subscribe);
        emit(&mut self.tls, ex, out, |o| peer.start(o));
        if peer.ready() {
            self.peer = Some(peer);
            self.up(ex, now);
        } else {
            self.peer = Some(peer);
        }
        Flow::Go
    }

    fn read_buf<'a>(&'a mut self, scratch: &'a mut [u8]) -> &'a mut [u8] {
        scratch
    }

    /// Handles bytes from the server (with TLS: decrypted first), see [`Driver::on_plain`].
    fn rx_stamps(&self, ex: &Exec) -> bool {
        ex.plan.push_rate > 0.0 && ex.plan.fanout > 0
    }

    fn on_read(
        &mut self,
        ex: &Exec,
        n: usize,
        scratch: &[u8],
        now: Instant,
        rx_us: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Flow {
        self.rx_us = rx_us;
        ex.stats().c.frames_in.fetch_add(1, Relaxed);
        let data = &scratch[..n];
        let Some(mut tls) = self.tls.take() else { return self.on_plain(ex, data, now, out) };
        let mut plain = ex.tls_in.borrow_mut();
        plain.clear();
        let in_handshake = tls.handshaking();
        let flow = match tls.read(data, &mut plain, out) {
            Err(e) => {
                ex.tls_failed(in_handshake, &e);
                self.failed = true;
                Flow::End
            }
            Ok(()) if plain.is_empty() => Flow::Go,
            Ok(()) => {
                let mut answer = ex.tls_out.borrow_mut();
                answer.clear();
                let flow = self.on_plain(ex, &plain, now, &mut answer);
                if !answer.is_empty() {
                    tls.write(&answer, out);
                }
                flow
            }
        };
        self.tls = Some(tls);
        flow
    }
    fn on_due(&mut self, ex: &Exec, now: Instant, out: &mut Vec<u8>) -> Flow {
        if !self.live {
            if now >= self.handshake_deadline {
                ex.stats().c.err_session_timeout.fetch_add(1, Relaxed);
                self.failed = true;
                return Flow::End;
            }
            return Flow::Go;
        }
        let mut tls = self.tls.take();
        emit(&mut tls, ex, out, |o| self.send_due(ex, now, o));
        self.tls = tls;
        Flow::Go
    }

    /// GPS or a keepalive, whichever comes first (the ceiling needs no keepalive); the
    /// handshake's deadline until it is done.
    fn next_due(&self, ex: &Exec) -> Option<Instant> {
        if !self.live {
            return Some(self.handshake_deadline);
        }
        let keepalive = self.last_tx + KEEPALIVE;
        let gps = (ex.plan.rate > 0.0 && sending(ex)).then_some(self.gps.next);
        Some(match gps {
            Some(g) if ex.proto == Proto::Ceiling => g,
            Some(g) => g.min(keepalive),
            None => keepalive,
        })
    }

    fn on_stop(&mut self, ex: &Exec, _now: Instant, out: &mut Vec<u8>) {
        if let Some(peer) = &self.peer {
            emit(&mut self.tls, ex, out, |o| peer.goodbye(o));
        }
        if let Some(tls) = &mut self.tls {
            tls.close(out);
        }
    }

    fn on_ended(&mut self, ex: &Exec, how: Ended, _now: Instant) -> Option<Duration> {
        let c = &ex.stats().c;
        let failed = match how {
            Ended::ConnectFailed => {
                c.err_connect.fetch_add(1, Relaxed);
                true
            }
            Ended::WriteFailed => {
                c.err_write.fetch_add(1, Relaxed);
                !self.live
            }
            Ended::Closed => {
                if self.live {
                    c.drops_seen.fetch_add(1, Relaxed);
                } else {
                    c.err_connect.fetch_add(1, Relaxed);
                }
                !self.live
            }
            // Counted where it was decided.
            Ended::ByClient => self.failed,
            Ended::Dropped | Ended::Stop => false,
        };
        if self.live {
            self.live = false;
            ex.stats().g.live.fetch_sub(1, Relaxed);
        }
        self.peer = None;
        self.tls = None;
        self.partial = Vec::new();
        if how == Ended::Stop {
            return None;
        }
        self.failures = if failed { self.failures.saturating_add(1) } else { 0 };
        Some(if self.failures == 0 {
            RECONNECT
        } else {
            Duration::from_millis(50 << self.failures.min(MAX_BACKOFF_SHIFT)).mul_f64(ex.rand(0.5..1.5))
        })
    }
}

/// Appends one GPS report of `batch` points in the target's format.
fn write_gps(ex: &Exec, gps: &mut Gps, topic: &[u8], out: &mut Vec<u8>, batch: u32) {
    let ts_ms = crate::appserver::now_us() / 1000;
    // A small step per point: positions change as real ones do, at no real cost.
    let step = |g: &mut Gps| {
        g.seq = g.seq.wrapping_add(1);
        g.lat_e7 = g.lat_e7.wrapping_add((g.seq % 7) as i32 - 3);
        g.lon_e7 = g.lon_e7.wrapping_add((g.seq % 5) as i32 - 2);
    };
    if ex.proto == Proto::Ceiling {
        // The ceiling gets exactly what the gate gets: the gate's own GPS frames.
        let mut enc = ex.enc.borrow_mut();
        let point = |g: &Gps| GpsPoint::new(ts_ms, g.lat_e7, g.lon_e7, 300, 10000, 50, 0);
        if batch == 1 {
            step(gps);
            enc.gps_report(out, u64::from(gps.seq), &point(gps));
        } else {
            let points: Vec<GpsPoint> = (0..batch)
                .map(|_| {
                    step(gps);
                    point(gps)
                })
                .collect();
            enc.gps_batch(out, u64::from(gps.seq), &points);
        }
        return;
    }
    let mut payload = ex.scratch.borrow_mut();
    payload.clear();
    for _ in 0..batch {
        step(gps);
        super::gps_point(&mut payload, gps.uid, ts_ms, gps.lat_e7, gps.lon_e7, gps.seq);
    }
    debug_assert_eq!(payload.len(), batch as usize * GPS_POINT_BYTES);
    match ex.proto {
        Proto::Mqtt => mqtt::publish(out, topic, &payload),
        Proto::Nats => nats::publish(out, topic, &payload),
        Proto::Ceiling => {}
    }
}
