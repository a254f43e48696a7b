//! The fleet engine, thread-per-core like the gate: one glommio executor pinned to each of
//! `--cores`, each simulating its share of the apps as one task per connection and speaking
//! the wire protocol with raw frames (`schema::Encoder`, `schema::Frames`).
//!
//! - [`session`]: one app's life: connect, log in or resume, read, ack, reconnect.
//! - [`driver`] and [`passenger`]: what each role does while its session is up.
//! - [`conn`]: sockets and writes.
//! - [`stats`]: counters the main thread reads each second, and histograms merged at the end.
//!
//! The main thread steers every executor through [`Control`]: the phase (ramp, run, drain,
//! stop) and storms. Each executor's control task looks at it every 10 ms and pokes its own
//! apps through their slots (no locks between executors; nothing crosses threads but atomics).

pub mod conn;
pub mod driver;
pub mod passenger;
pub mod session;
pub mod stats;

use crate::audit::Shown;
use crate::plan::Plan;
use glommio::{LocalExecutorBuilder, Placement};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use schema::Encoder;
use stats::{ExecStats, Hists};
use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often each executor's control task looks at the main thread's orders.
const CONTROL_TICK: Duration = Duration::from_millis(10);
/// Longest an executor waits for its apps to finish after Stop.
const STOP_PATIENCE: Duration = Duration::from_secs(15);

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
    /// When the last one came back, ns since `Control::epoch`.
    pub last_back_ns: AtomicU64,
}

/// The main thread's orders to every executor, and what comes back from storms.
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
}

impl Default for Control {
    fn default() -> Self {
        Control {
            phase: AtomicU8::new(Phase::Ramp as u8),
            storm_gen: AtomicU32::new(0),
            storm: StormTrack::default(),
            epoch: Instant::now(),
        }
    }
}

impl Control {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Ramp,
            1 => Phase::Run,
            2 => Phase::Drain,
            _ => Phase::Stop,
        }
    }

    /// Moves every executor to `p`.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }

    /// Orders a storm now.
    pub fn storm(&self) {
        self.storm.at_ns.store(self.ns(Instant::now()), Relaxed);
        self.storm_gen.fetch_add(1, Relaxed);
    }

    /// `t` as ns since the epoch.
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// Commands to one app, through its slot.
pub const CMD_DROP: u8 = 1;
/// Drop as part of a storm.
pub const CMD_STORM: u8 = 2;
/// Log out and end.
pub const CMD_STOP: u8 = 3;

/// An app's mailbox on its executor.
#[derive(Debug, Default)]
pub struct Slot {
    /// A pending `CMD_*`, 0 for none.
    pub cmd: u8,
    /// Its session is up.
    pub live: bool,
    /// The app's task, to wake for a command.
    pub waker: Option<Waker>,
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
}

/// One executor's state, shared by its tasks.
pub struct Exec {
    /// Executor index.
    pub id: usize,
    /// The run.
    pub plan: Arc<Plan>,
    /// Orders from the main thread.
    pub control: Arc<Control>,
    /// Every executor's numbers (this one's at `id`).
    pub all_stats: Arc<Vec<ExecStats>>,
    /// The apps this executor simulates, by slot.
    pub apps: Vec<AppSpec>,
    /// Their mailboxes.
    pub slots: RefCell<Vec<Slot>>,
    /// Frame builder shared by every app here (never held across an await).
    pub enc: RefCell<Encoder>,
    /// Outgoing frames of the app being served (never held across an await).
    pub out: RefCell<Vec<u8>>,
    /// Latency histograms.
    pub hists: RefCell<Hists>,
    /// What apps here showed, for the audit.
    pub shown: RefCell<Shown>,
    /// Randomness for jitter and choices.
    pub rng: RefCell<SmallRng>,
    /// Apps spawned so far (the ramp).
    pub spawned: Cell<usize>,
    /// Misbehaving peers' counters.
    pub bad: Arc<crate::bad::BadStats>,
}

impl Exec {
    /// This executor's numbers.
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

    /// Waits for a command to the app in `slot`.
    pub async fn kicked(&self, slot: usize) -> u8 {
        futures_lite::future::poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[slot];
            if s.cmd != 0 {
                return Poll::Ready(std::mem::take(&mut s.cmd));
            }
            match &s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => s.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Sends `cmd` to the app in `slot` (Stop overrides anything pending).
    pub fn kick(&self, slot: usize, cmd: u8) {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[slot];
        if s.cmd != CMD_STOP {
            s.cmd = cmd;
        }
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

/// What an executor hands back at the end.
#[derive(Debug, Default)]
pub struct ExecResult {
    /// Its latency histograms.
    pub hists: Hists,
    /// What its apps showed.
    pub shown: Shown,
}

/// The running executors.
pub struct Engine {
    /// One per core.
    handles: Vec<glommio::ExecutorJoinHandle<ExecResult>>,
}

/// Splits the plan's apps over the executors (app `i` on executor `i % n`, so every executor
/// has a mix of drivers and passengers) and starts them.
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
                AppSpec { uid, role, source }
            })
            .collect();
        let (plan, control, stats, bad) = (plan.clone(), control.clone(), stats.clone(), bad.clone());
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("loadgen-{id}"))
            // Thousands of pending readiness polls: a deep ring gives the kernel's poll table
            // enough buckets (glommio's default of 128 makes every cancel walk a long chain).
            .ring_depth(4096)
            .spawn(move || async move {
                let slots = (0..apps.len()).map(|_| Slot::default()).collect();
                let ex = Rc::new(Exec {
                    id,
                    plan,
                    control,
                    all_stats: stats,
                    apps,
                    slots: RefCell::new(slots),
                    enc: RefCell::new(Encoder::new()),
                    out: RefCell::new(Vec::with_capacity(64 * 1024)),
                    hists: RefCell::new(Hists::default()),
                    shown: RefCell::new(Shown::default()),
                    rng: RefCell::new(SmallRng::from_os_rng()),
                    spawned: Cell::new(0),
                    bad,
                });
                executor_main(ex).await
            })
            .map_err(|e| format!("cannot start an executor on core {cpu}: {e}"))?;
        handles.push(h);
    }
    Ok(Engine { handles })
}

impl Engine {
    /// Waits for every executor (after `Phase::Stop`) and collects their results.
    pub fn join(self) -> Vec<ExecResult> {
        self.handles.into_iter().filter_map(|h| h.join().ok()).collect()
    }
}

/// One executor: spawn the apps at the connect rate, steer them, and wait for them to end.
async fn executor_main(ex: Rc<Exec>) -> ExecResult {
    glommio::spawn_local(control_loop(ex.clone())).detach();
    crate::bad::spawn(&ex);
    let per_exec_rate = (f64::from(ex.plan.connect_rate) / ex.plan.cores.len() as f64).max(1.0);
    let start = Instant::now();
    let g = &ex.stats().g;
    let mut next = 0;
    while next < ex.apps.len() && ex.control.phase() < Phase::Stop {
        // As many apps as the rate allows by now, then a short sleep.
        let allowed = ((start.elapsed().as_secs_f64() * per_exec_rate) as usize + 1).min(ex.apps.len());
        while next < allowed {
            g.tasks.fetch_add(1, Relaxed);
            glommio::spawn_local(session::run_app(ex.clone(), next)).detach();
            next += 1;
        }
        ex.spawned.set(next);
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Apps end after Stop (each logs out); bounded in case one is stuck in a write.
    let mut stopped_at = None;
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        if ex.control.phase() < Phase::Stop {
            continue;
        }
        let t = *stopped_at.get_or_insert_with(Instant::now);
        if g.tasks.load(Relaxed) <= 0 || t.elapsed() > STOP_PATIENCE {
            break;
        }
    }
    ExecResult { hists: ex.hists.take(), shown: ex.shown.take() }
}

/// Carries out the main thread's orders on this executor: storms, random drops, stop.
async fn control_loop(ex: Rc<Exec>) {
    let mut storms_seen = 0;
    let total = f64::from(ex.plan.apps().max(1));
    let share = ex.apps.len() as f64 / total;
    let mut last = Instant::now();
    loop {
        glommio::timer::sleep(CONTROL_TICK).await;
        let now = Instant::now();
        let dt = (now - last).as_secs_f64();
        last = now;
        let phase = ex.control.phase();
        if phase == Phase::Stop {
            // The length first: a borrow in the loop head would live through the loop.
            let n = ex.slots.borrow().len();
            for slot in 0..n {
                ex.kick(slot, CMD_STOP);
            }
            return;
        }
        let gen = ex.control.storm_gen.load(Relaxed);
        if gen != storms_seen {
            storms_seen = gen;
            storm(&ex);
        }
        if phase == Phase::Run && ex.plan.disconnect_rate > 0.0 {
            // A sum of coin flips with the expected number of drops for this tick as its mean:
            // random timing, the asked-for rate on average, at most ceil(expected) drops.
            let mut expected = ex.plan.disconnect_rate * share * dt;
            while expected > 0.0 {
                if ex.chance(expected.min(1.0)) {
                    drop_one(&ex);
                }
                expected -= 1.0;
            }
        }
    }
}

/// Drops one random live session on this executor.
fn drop_one(ex: &Exec) {
    let n = ex.slots.borrow().len();
    if n == 0 {
        return;
    }
    // A few tries to land on a live one without scanning every slot.
    for _ in 0..16 {
        let i = ex.rng.borrow_mut().random_range(0..n);
        let ok = {
            let slots = ex.slots.borrow();
            slots[i].live && slots[i].cmd == 0
        };
        if ok {
            ex.kick(i, CMD_DROP);
            return;
        }
    }
}

/// Drops `storm_percent` of this executor's live sessions at once.
fn storm(ex: &Exec) {
    let live: Vec<usize> = {
        let slots = ex.slots.borrow();
        (0..slots.len()).filter(|&i| slots[i].live && slots[i].cmd == 0).collect()
    };
    let k = ((live.len() as f64) * ex.plan.storm_percent / 100.0).round() as usize;
    let picked = rand::seq::index::sample(&mut *ex.rng.borrow_mut(), live.len(), k.min(live.len()));
    ex.control.storm.victims.fetch_add(picked.len() as u64, Relaxed);
    for i in picked {
        ex.kick(live[i], CMD_STORM);
    }
}
