//! The fleet engine, thread-per-core like the gate: one thread pinned to each of `--cores`,
//! each running one [`event_loop::Loop`] that owns its share of the apps, speaking the wire
//! protocol with raw frames (`schema::Encoder`) through the client's sans-I/O app machine.
//!
//! - [`session`]: one app as the loop's [`event_loop::Client`]: log in or resume, read, ack,
//!   reconnect.
//! - [`driver`] and [`passenger`]: what each role does while its session is up.
//! - [`event_loop`]: the loop: a slot per connection, deadlines on a [`wheel`], readiness from
//!   epoll, writes at once; [`net`]: the sockets.
//! - [`stats`]: counters the main thread reads each second, and histograms merged at the end.
//!
//! The main thread steers every loop through [`Control`]: the phase (ramp, run, drain, stop)
//! and storms. Each loop looks at it every turn (the phase) and every 10 ms (storms, random
//! drops), and acts on its own apps (no locks between loops; nothing crosses threads but
//! atomics). Misbehaving peers ([`crate::bad`]) run apart, on glommio executors of their own.

pub mod driver;
pub mod event_loop;
pub mod net;
pub mod passenger;
pub mod session;
pub mod stats;
pub mod wheel;

use crate::audit::Shown;
use crate::plan::Plan;
use event_loop::Loop;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use schema::Encoder;
use session::App;
use stats::{ExecStats, Hists};
use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Apps are connecting; traffic starts as each session comes up.
    Ramp = 0,
    /// The measured window; chaos is on.
    Run = 1,
    /// No new GPS, orders or pushes; apps stay connected to ack what is still coming.
    Drain = 2,
    /// Apps log out and end.
    Stop = 3,
}

/// Tracks the sessions a storm dropped until they are back.
#[derive(Debug, Default)]
pub struct StormTrack {
    /// When the storm was ordered, ns since `Control::epoch`.
    pub at_ns: AtomicU64,
    /// Sessions dropped.
    pub victims: AtomicU64,
    /// Of those, sessions back.
    pub back: AtomicU64,
    /// Back by resume.
    pub resumed: AtomicU64,
    /// Back by a fresh login.
    pub relogin: AtomicU64,
    /// Back by a resume on another node than the one that held the session.
    pub moved: AtomicU64,
    /// When the last one came back, ns since `Control::epoch`.
    pub last_back_ns: AtomicU64,
}

/// The main thread's orders to every loop, and what comes back from storms.
#[derive(Debug)]
pub struct Control {
    /// The current `Phase`.
    phase: AtomicU8,
    /// Incremented to order a storm.
    storm_gen: AtomicU32,
    /// Storm bookkeeping.
    pub storm: StormTrack,
    /// Time origin for the ns fields.
    pub epoch: Instant,
    /// `geo`: every position the drivers sent, for checking the gate's answers.
    pub track: Option<Arc<crate::geo::Track>>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            phase: AtomicU8::new(Phase::Ramp as u8),
            storm_gen: AtomicU32::new(0),
            storm: StormTrack::default(),
            epoch: Instant::now(),
            track: None,
        }
    }
}

impl Control {
    /// A control for a run whose drivers' positions are recorded in `track` (`geo`).
    pub fn with_track(track: Option<Arc<crate::geo::Track>>) -> Control {
        Control { track, ..Control::default() }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Ramp,
            1 => Phase::Run,
            2 => Phase::Drain,
            _ => Phase::Stop,
        }
    }

    /// Moves every loop to `p`.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }

    /// Orders a storm now.
    pub fn storm(&self) {
        self.storm.at_ns.store(self.ns(Instant::now()), Relaxed);
        self.storm_gen.fetch_add(1, Relaxed);
    }

    /// How many storms were ordered so far.
    pub fn storms(&self) -> u32 {
        self.storm_gen.load(Relaxed)
    }

    /// `t` as ns since the epoch.
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// What one simulated app is.
#[derive(Debug, Clone, Copy)]
pub struct AppSpec {
    /// Its uid.
    pub uid: u64,
    /// `wire::Role` value: 1 driver, 2 passenger.
    pub role: u8,
    /// Local address to connect from.
    pub source: Option<IpAddr>,
    /// Index in `Plan::gates` of the node its first connect goes to.
    pub gate: u16,
}

/// What one loop's apps share: the plan, the counters, the encoder, randomness and what is
/// recorded for the end. The loop lends it to one app at a time, so nothing in it is borrowed
/// across calls.
pub struct Exec {
    /// Loop index.
    pub id: usize,
    /// The run.
    pub plan: Arc<Plan>,
    /// Orders from the main thread.
    pub control: Arc<Control>,
    /// Every loop's numbers (this one's at `id`).
    pub all_stats: Arc<Vec<ExecStats>>,
    /// Frame builder shared by every app here.
    pub enc: RefCell<Encoder>,
    /// Latency histograms.
    pub hists: RefCell<Hists>,
    /// What apps here showed, for the audit.
    pub shown: RefCell<Shown>,
    /// Randomness for jitter and choices.
    pub rng: RefCell<SmallRng>,
    /// The secure channel's settings for every app here (one app key pair per loop); none in
    /// plaintext.
    pub secure: Option<client::proto::app::SecureConfig>,
}

impl Exec {
    /// This loop's numbers.
    pub fn stats(&self) -> &ExecStats {
        &self.all_stats[self.id]
    }

    /// A random number in `range`.
    pub fn rand(&self, range: std::ops::Range<f64>) -> f64 {
        self.rng.borrow_mut().random_range(range)
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.rng.borrow_mut().random_bool(p.min(1.0))
    }
}

/// What a loop hands back at the end.
#[derive(Debug, Default)]
pub struct ExecResult {
    /// Its latency histograms.
    pub hists: Hists,
    /// What its apps showed.
    pub shown: Shown,
}

/// The running loops (and the misbehaving peers, if any).
pub struct Engine {
    /// One per core.
    handles: Vec<JoinHandle<ExecResult>>,
    /// The bad peers' executors.
    bad: Option<crate::bad::Running>,
}

/// Splits the plan's apps over the cores (app `i` on loop `i % n`, so every loop has a mix of
/// drivers and passengers) and over the gate nodes (app `i` first connects to node
/// `i % nodes`), and starts a pinned thread with one loop on each.
pub fn start(
    plan: Arc<Plan>,
    control: Arc<Control>,
    stats: Arc<Vec<ExecStats>>,
    bad: Arc<crate::bad::BadStats>,
) -> Result<Engine, String> {
    let n = plan.cores.len();
    let mut handles = Vec::with_capacity(n);
    for (id, &cpu) in plan.cores.iter().enumerate() {
        let apps: Vec<AppSpec> = (id..plan.apps() as usize)
            .step_by(n)
            .map(|i| {
                let i = i as u32;
                let (uid, role) = if i < plan.drivers {
                    (plan.driver_uid(i), 1)
                } else {
                    (plan.passenger_uid(i - plan.drivers), 2)
                };
                let source = (!plan.source_ips.is_empty())
                    .then(|| plan.source_ips[i as usize % plan.source_ips.len()]);
                // Validated: at most MAX_NODES nodes, so the index fits.
                let gate = (i as usize % plan.gates.len()) as u16;
                AppSpec { uid, role, source, gate }
            })
            .collect();
        let (plan, control, stats) = (plan.clone(), control.clone(), stats.clone());
        let h = std::thread::Builder::new()
            .name(format!("loadgen-{id}"))
            .spawn(move || {
                crate::run::pin_to(&[cpu]);
                let secure = plan.server_key.map(client::proto::app::SecureConfig::new);
                let ex = Exec {
                    id,
                    plan,
                    control,
                    all_stats: stats,
                    enc: RefCell::new(Encoder::new()),
                    hists: RefCell::new(Hists::default()),
                    shown: RefCell::new(Shown::default()),
                    rng: RefCell::new(SmallRng::from_os_rng()),
                    secure,
                };
                run_loop(&ex, &apps);
                ExecResult { hists: ex.hists.take(), shown: ex.shown.take() }
            })
            .map_err(|e| format!("cannot start a thread for core {cpu}: {e}"))?;
        handles.push(h);
    }
    let bad = crate::bad::start(&plan, &control, &stats, &bad)?;
    Ok(Engine { handles, bad })
}

impl Engine {
    /// Waits for every loop (after `Phase::Stop`) and collects their results.
    pub fn join(self) -> Vec<ExecResult> {
        if let Some(b) = self.bad {
            b.join();
        }
        self.handles.into_iter().filter_map(|h| h.join().ok()).collect()
    }
}

/// One core: its apps in one loop, ramped at this core's share of the connect rate, steered
/// by the main thread's orders, until Stop.
fn run_loop(ex: &Exec, apps: &[AppSpec]) {
    let born = Instant::now();
    let clients: Vec<App> = apps.iter().map(|spec| App::new(ex, *spec, born)).collect();
    let per_loop_rate = f64::from(ex.plan.connect_rate) / ex.plan.cores.len() as f64;
    let g = &ex.stats().g;
    g.loop_tid.store(u64::from(crate::procstat::current_tid().unwrap_or(0)), Relaxed);
    g.tasks.fetch_add(clients.len() as i64, Relaxed);
    let mut lp = match Loop::new(clients, per_loop_rate) {
        Ok(lp) => lp,
        Err(e) => {
            eprintln!("loadgen: cannot start the loop on core {}: {e}", ex.id);
            g.tasks.fetch_sub(apps.len() as i64, Relaxed);
            return;
        }
    };
    let total = f64::from(ex.plan.apps().max(1));
    let share = apps.len() as f64 / total;
    let mut storms_seen = 0;
    let mut last = Instant::now();
    lp.run(ex, &ex.control, |lp, ex, now| {
        let dt = (now - last).as_secs_f64();
        last = now;
        let gen = ex.control.storms();
        if gen != storms_seen {
            storms_seen = gen;
            storm(lp, ex, now);
        }
        if ex.control.phase() == Phase::Run && ex.plan.disconnect_rate > 0.0 {
            // A sum of coin flips with the expected number of drops for this tick as its mean:
            // random timing, the asked-for rate on average, at most ceil(expected) drops.
            let mut expected = ex.plan.disconnect_rate * share * dt;
            while expected > 0.0 {
                if ex.chance(expected.min(1.0)) {
                    drop_one(lp, ex, now);
                }
                expected -= 1.0;
            }
        }
    });
    g.tasks.fetch_sub(apps.len() as i64, Relaxed);
}

/// Drops one random live session of this loop.
fn drop_one(lp: &mut Loop<App>, ex: &Exec, now: Instant) {
    let n = lp.len();
    if n == 0 {
        return;
    }
    // A few tries to land on a live one without scanning every slot.
    for _ in 0..16 {
        let i = ex.rng.borrow_mut().random_range(0..n);
        if lp.is_live(i) {
            lp.drop_conn(ex, i, false, now);
            return;
        }
    }
}

/// Drops `storm_percent` of this loop's live sessions at once.
fn storm(lp: &mut Loop<App>, ex: &Exec, now: Instant) {
    let live = lp.live_slots();
    let k = ((live.len() as f64) * ex.plan.storm_percent / 100.0).round() as usize;
    let picked = rand::seq::index::sample(&mut *ex.rng.borrow_mut(), live.len(), k.min(live.len()));
    ex.control.storm.victims.fetch_add(picked.len() as u64, Relaxed);
    for i in picked {
        lp.drop_conn(ex, live[i], true, now);
    }
}
