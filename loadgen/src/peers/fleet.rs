//! Drivers against a peer: one glommio executor pinned to each of the plan's cores, one task per
//! connection, the same shape as the gate fleet in [`crate::engine`] so loadgen spends its CPU
//! the same way whatever the target.
//!
//! A driver connects, does its protocol's handshake (subscribing to its push topic), then
//! waits on three things at once: bytes from the server (into a small inline buffer; a packet
//! split across reads is kept in a `Vec` only until it is whole), its next deadline (GPS,
//! keepalive) and the executor's stop. Pushes are counted and timed where they arrive.

use super::wire::{PeerConn, PeerError};
use super::{mqtt, nats, Proto, GPS_POINT_BYTES, KEEPALIVE};
use crate::engine::conn::{self, Io};
use crate::engine::driver::{gps_interval, is_late, CENTER};
use crate::engine::stats::{ExecStats, Hists};
use crate::engine::{Control, Phase};
use crate::plan::Plan;
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use schema::wire::GpsPoint;
use schema::Encoder;
use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Inline read buffer: pushes are small; an idle driver reads nothing.
const INLINE: usize = 256;
/// Longest a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the handshake may take once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often each executor looks at the main thread's phase.
const CONTROL_TICK: Duration = Duration::from_millis(10);
/// Longest an executor waits for its drivers to end after Stop.
const STOP_PATIENCE: Duration = Duration::from_secs(10);
/// Longest backoff between failed attempts (before jitter): 50 ms << 7 = 6.4 s.
const MAX_BACKOFF_SHIFT: u32 = 7;

/// One executor's drivers and what they share.
struct Exec {
    /// Index into the stats.
    id: usize,
    /// The run.
    plan: Arc<Plan>,
    /// The protocol.
    proto: Proto,
    /// Phase from the main thread.
    control: Arc<Control>,
    /// Every executor's numbers (this one's at `id`).
    all_stats: Arc<Vec<ExecStats>>,
    /// The uids of the drivers here, by slot.
    uids: Vec<u64>,
    /// Stop was ordered: every driver ends.
    stopping: Cell<bool>,
    /// Each driver's task, to wake for the stop.
    wakers: RefCell<Vec<Option<Waker>>>,
    /// Outgoing bytes of the driver being served (never held across an await).
    out: RefCell<Vec<u8>>,
    /// GPS payloads being built (never held across an await).
    scratch: RefCell<Vec<u8>>,
    /// The gate's frame encoder, for the ceiling's GPS frames.
    enc: RefCell<Encoder>,
    /// Push and connect latencies.
    hists: RefCell<Hists>,
    /// Jitter.
    rng: RefCell<SmallRng>,
}

impl Exec {
    fn stats(&self) -> &ExecStats {
        &self.all_stats[self.id]
    }

    fn rand(&self, range: std::ops::Range<f64>) -> f64 {
        self.rng.borrow_mut().random_range(range)
    }

    /// Resolves once the executor is told to stop.
    async fn stopped(&self, slot: usize) {
        futures_lite::future::poll_fn(|cx| {
            if self.stopping.get() {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.borrow_mut();
            match &wakers[slot] {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => wakers[slot] = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

/// The running executors.
pub struct Fleet {
    /// One per core; each returns its histograms.
    handles: Vec<glommio::ExecutorJoinHandle<Hists>>,
}

impl Fleet {
    /// Waits for every executor (after `Phase::Stop`) and merges their histograms.
    pub fn join(self) -> Hists {
        let mut h = Hists::default();
        for r in self.handles.into_iter().filter_map(|h| h.join().ok()) {
            h.merge(&r);
        }
        h
    }
}

/// Splits the drivers over the plan's cores (driver `i` on executor `i % n`) and starts them.
pub fn start(
    plan: Arc<Plan>,
    proto: Proto,
    control: Arc<Control>,
    stats: Arc<Vec<ExecStats>>,
) -> Result<Fleet, String> {
    let n = plan.cores.len();
    let mut handles = Vec::with_capacity(n);
    for (id, &cpu) in plan.cores.iter().enumerate() {
        let uids: Vec<u64> =
            (id..plan.drivers as usize).step_by(n).map(|i| plan.driver_uid(i as u32)).collect();
        let (plan, control, stats) = (plan.clone(), control.clone(), stats.clone());
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("loadgen-peer-{id}"))
            .spawn(move || async move {
                let wakers = (0..uids.len()).map(|_| None).collect();
                let ex = Rc::new(Exec {
                    id,
                    plan,
                    proto,
                    control,
                    all_stats: stats,
                    uids,
                    stopping: Cell::new(false),
                    wakers: RefCell::new(wakers),
                    out: RefCell::new(Vec::with_capacity(64 * 1024)),
                    scratch: RefCell::new(Vec::with_capacity(4096)),
                    enc: RefCell::new(Encoder::new()),
                    hists: RefCell::new(Hists::default()),
                    rng: RefCell::new(SmallRng::from_os_rng()),
                });
                executor_main(ex).await
            })
            .map_err(|e| format!("cannot start an executor on core {cpu}: {e}"))?;
        handles.push(h);
    }
    Ok(Fleet { handles })
}

/// One executor: start the drivers at the connect rate, pass the stop on, wait for them.
async fn executor_main(ex: Rc<Exec>) -> Hists {
    glommio::spawn_local(control_loop(ex.clone())).detach();
    let per_exec_rate = (f64::from(ex.plan.connect_rate) / ex.plan.cores.len() as f64).max(1.0);
    let start = Instant::now();
    let g = &ex.stats().g;
    let mut next = 0;
    while next < ex.uids.len() && !ex.stopping.get() {
        let allowed = ((start.elapsed().as_secs_f64() * per_exec_rate) as usize + 1).min(ex.uids.len());
        while next < allowed {
            g.tasks.fetch_add(1, Relaxed);
            glommio::spawn_local(run_driver(ex.clone(), next)).detach();
            next += 1;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let mut stopped_at = None;
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        if !ex.stopping.get() {
            continue;
        }
        let t = *stopped_at.get_or_insert_with(Instant::now);
        if g.tasks.load(Relaxed) <= 0 || t.elapsed() > STOP_PATIENCE {
            break;
        }
    }
    ex.hists.take()
}

/// Watches the phase; on Stop, wakes every driver.
async fn control_loop(ex: Rc<Exec>) {
    loop {
        glommio::timer::sleep(CONTROL_TICK).await;
        if ex.control.phase() == Phase::Stop {
            ex.stopping.set(true);
            let wakers: Vec<Waker> = ex.wakers.borrow_mut().iter_mut().filter_map(Option::take).collect();
            for w in wakers {
                w.wake();
            }
            return;
        }
    }
}

/// Why a connection ended.
enum End {
    /// Told to stop.
    Stopped,
    /// Connect again; `failed` grows the backoff.
    Retry { failed: bool },
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

/// Runs one driver until the stop.
async fn run_driver(ex: Rc<Exec>, slot: usize) {
    let born = Instant::now();
    let mut first = true;
    let mut failures = 0u32;
    let mut gps = Gps {
        uid: ex.uids[slot],
        next: Instant::now(),
        lat_e7: ((CENTER.0 + ex.rand(-0.1..0.1)) * 1e7) as i32,
        lon_e7: ((CENTER.1 + ex.rand(-0.1..0.1)) * 1e7) as i32,
        seq: 0,
    };
    while !ex.stopping.get() {
        match serve(&ex, slot, &mut gps, born, &mut first).await {
            End::Stopped => break,
            End::Retry { failed } => {
                failures = if failed { failures.saturating_add(1) } else { 0 };
                let wait = if failures == 0 {
                    Duration::from_millis(10)
                } else {
                    Duration::from_millis(50 << failures.min(MAX_BACKOFF_SHIFT)).mul_f64(ex.rand(0.5..1.5))
                };
                let stop = futures_lite::future::or(
                    async {
                        glommio::timer::sleep(wait).await;
                        false
                    },
                    async {
                        ex.stopped(slot).await;
                        true
                    },
                )
                .await;
                if stop {
                    break;
                }
            }
        }
    }
    ex.stats().g.tasks.fetch_sub(1, Relaxed);
}

/// What woke the connection's task.
enum Step {
    Read(std::io::Result<usize>),
    Tick,
    Stop,
}

/// One connection, from connect to its end.
async fn serve(ex: &Exec, slot: usize, gps: &mut Gps, born: Instant, first: &mut bool) -> End {
    let c = &ex.stats().c;
    let uid = ex.uids[slot];
    let connected = futures_lite::future::or(
        async { Some(TcpStream::connect_timeout(ex.plan.gate, CONNECT_TIMEOUT).await) },
        async {
            ex.stopped(slot).await;
            None
        },
    )
    .await;
    let mut stream = match connected {
        None => return End::Stopped,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            c.err_connect.fetch_add(1, Relaxed);
            return End::Retry { failed: true };
        }
    };
    // One point per segment, as the gate's drivers write: no Nagle delay.
    let _ = stream.set_nodelay(true);
    let subscribe = (ex.proto != Proto::Ceiling).then(|| ex.proto.push_topic(uid));
    let mut peer = PeerConn::new(ex.proto, format!("fg-d{uid}"), subscribe);
    let mut io = Io { fd: stream.as_raw_fd(), ..Io::default() };
    {
        let mut out = ex.out.borrow_mut();
        out.clear();
        peer.start(&mut out);
        io.write(&out);
    }
    let topic = ex.proto.gps_topic(uid);
    let handshake_deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut live = false;
    let mut last_tx = Instant::now();
    let mut partial: Vec<u8> = Vec::new();
    let mut inline = [0u8; INLINE];
    let end = loop {
        if !live && peer.ready() {
            live = true;
            up(ex, gps, born, first);
        }
        if !io.blocked.is_empty() && !conn::write_blocked(&mut stream, &mut io).await {
            io.dead = true;
        }
        if io.dead {
            c.err_write.fetch_add(1, Relaxed);
            break End::Retry { failed: !live };
        }
        let deadline = if live { next_deadline(ex, gps, last_tx) } else { handshake_deadline };
        let step = futures_lite::future::or(
            async { Step::Read(futures_lite::AsyncReadExt::read(&mut stream, &mut inline).await) },
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
                    Step::Tick
                },
                async {
                    ex.stopped(slot).await;
                    Step::Stop
                },
            ),
        )
        .await;
        match step {
            Step::Read(Ok(0)) | Step::Read(Err(_)) => {
                if live {
                    c.drops_seen.fetch_add(1, Relaxed);
                } else {
                    c.err_connect.fetch_add(1, Relaxed);
                }
                break End::Retry { failed: !live };
            }
            Step::Read(Ok(n)) => {
                c.frames_in.fetch_add(1, Relaxed);
                if let Err(e) = on_bytes(ex, &mut peer, &mut partial, &inline[..n], &mut io) {
                    match e {
                        PeerError::Refused(_) => c.err_login.fetch_add(1, Relaxed),
                        _ => c.err_protocol.fetch_add(1, Relaxed),
                    };
                    break End::Retry { failed: true };
                }
            }
            Step::Tick => {
                let now = Instant::now();
                if !live {
                    if now >= handshake_deadline {
                        c.err_session_timeout.fetch_add(1, Relaxed);
                        break End::Retry { failed: true };
                    }
                    continue;
                }
                if send_due(ex, &peer, gps, &topic, &mut io, now, last_tx) {
                    last_tx = now;
                }
            }
            Step::Stop => {
                let mut out = ex.out.borrow_mut();
                out.clear();
                peer.goodbye(&mut out);
                io.write(&out);
                break End::Stopped;
            }
        }
    };
    if live {
        ex.stats().g.live.fetch_sub(1, Relaxed);
    }
    end
}

/// The handshake is done: count the connection up and start its GPS schedule.
fn up(ex: &Exec, gps: &mut Gps, born: Instant, first: &mut bool) {
    let c = &ex.stats().c;
    ex.stats().g.live.fetch_add(1, Relaxed);
    let us = born.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
    if std::mem::take(first) {
        c.logins.fetch_add(1, Relaxed);
        ex.hists.borrow_mut().login.saturating_record(us);
    } else {
        c.relogins.fetch_add(1, Relaxed);
    }
    // The first report at a random moment within one interval, so the fleet is not in lockstep.
    let phase =
        gps_interval(ex.plan.rate, ex.plan.batch).map_or(Duration::ZERO, |i| i.mul_f64(ex.rand(0.0..1.0)));
    gps.next = Instant::now() + phase;
}

/// True while GPS should flow (ramp and window, as with the gate).
fn sending(ex: &Exec) -> bool {
    ex.control.phase() <= Phase::Run
}

/// The next moment something is due: GPS or a keepalive.
fn next_deadline(ex: &Exec, gps: &Gps, last_tx: Instant) -> Instant {
    let keepalive = last_tx + KEEPALIVE;
    if ex.plan.rate > 0.0 && sending(ex) && ex.proto != Proto::Ceiling {
        keepalive.min(gps.next)
    } else if ex.plan.rate > 0.0 && sending(ex) {
        gps.next
    } else {
        keepalive
    }
}

/// Writes what is due now (a GPS report, else a keepalive); true if anything was written.
fn send_due(
    ex: &Exec,
    peer: &PeerConn,
    gps: &mut Gps,
    topic: &[u8],
    io: &mut Io,
    now: Instant,
    last_tx: Instant,
) -> bool {
    let c = &ex.stats().c;
    let mut out = ex.out.borrow_mut();
    out.clear();
    if ex.plan.rate > 0.0 && sending(ex) && now >= gps.next {
        let batch = ex.plan.batch.max(1);
        write_gps(ex, gps, topic, &mut out, batch);
        c.gps_frames.fetch_add(1, Relaxed);
        c.gps_points.fetch_add(u64::from(batch), Relaxed);
        c.frames_out.fetch_add(1, Relaxed);
        if is_late(gps.next, now) {
            c.gps_late.fetch_add(1, Relaxed);
        }
        // Keep the rate on average with ±20 % jitter; more than a second behind (the executor
        // is saturated), start afresh rather than burst, and count it.
        if let Some(interval) = gps_interval(ex.plan.rate, batch) {
            gps.next += interval.mul_f64(ex.rand(0.8..1.2));
            if gps.next + Duration::from_secs(1) < now {
                gps.next = now + interval.mul_f64(ex.rand(0.0..1.0));
                c.gps_behind.fetch_add(1, Relaxed);
            }
        }
    } else if now >= last_tx + KEEPALIVE {
        peer.ping(&mut out);
    }
    if out.is_empty() {
        return false;
    }
    io.write(&out);
    true
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

/// Handles bytes from the server: answers (NATS PONG) are written, pushes counted and timed,
/// and a packet split across reads waits in `partial`.
fn on_bytes(
    ex: &Exec,
    peer: &mut PeerConn,
    partial: &mut Vec<u8>,
    data: &[u8],
    io: &mut Io,
) -> Result<(), PeerError> {
    let c = &ex.stats().c;
    let now_us = crate::appserver::now_us();
    let mut received = 0u64;
    let mut out = ex.out.borrow_mut();
    out.clear();
    {
        let mut hists = ex.hists.borrow_mut();
        let mut on_msg = |_topic: &[u8], payload: &[u8]| {
            if let Some((_, sent_at_us)) = super::read_push(payload) {
                received += 1;
                hists.push.saturating_record(now_us.saturating_sub(sent_at_us));
            }
        };
        if partial.is_empty() {
            let used = peer.feed(data, &mut out, &mut on_msg)?;
            partial.extend_from_slice(&data[used..]);
        } else {
            partial.extend_from_slice(data);
            let used = peer.feed(partial, &mut out, &mut on_msg)?;
            partial.drain(..used);
        }
    }
    if partial.is_empty() && partial.capacity() > INLINE {
        // Give back what a large packet needed; an idle driver keeps nothing.
        *partial = Vec::new();
    }
    c.push_first.fetch_add(received, Relaxed);
    io.write(&out);
    Ok(())
}
