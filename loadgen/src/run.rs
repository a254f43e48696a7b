//! One run, from start to report: check the gate is there, start the app-server and the
//! executors, ramp every session up, measure the window (with storms and chaos), drain (stop
//! pushing, wait for the last receipts), stop, and put the figures together.

use crate::appserver::{self, AppServer};
use crate::audit;
use crate::bad::BadStats;
use crate::engine::stats::{ExecStats, Hists, Snapshot};
use crate::engine::{self, Control, Phase};
use crate::plan::{Plan, Scenario, Target};
use crate::procstat;
use crate::report::{self, Latency, Report};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest the ramp waits without a new session before going on with what it has.
const RAMP_STALL: Duration = Duration::from_secs(30);
/// Longest to wait after the window for a storm's last sessions to come back.
const STORM_PATIENCE: Duration = Duration::from_secs(60);
/// Main loop step.
const STEP: Duration = Duration::from_millis(50);

/// Ramp: calls `step` (wait a little, return how many are up) until all `total` are up, or no
/// progress was made for `RAMP_STALL`; returns the ramp's seconds. Shared by every target.
pub(crate) fn ramp(total: u64, what: &str, mut step: impl FnMut() -> u64) -> f64 {
    let start = Instant::now();
    let mut progress = (0, Instant::now());
    loop {
        let up = step();
        if up >= total {
            break;
        }
        if up > progress.0 {
            progress = (up, Instant::now());
        } else if progress.1.elapsed() > RAMP_STALL {
            eprintln!("loadgen: only {up} of {total} {what} came up; going on with them");
            break;
        }
    }
    start.elapsed().as_secs_f64()
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The plan is inconsistent.
    #[error("{0}")]
    Plan(String),
    /// Nothing answers on the app port.
    #[error("no gate at {addr}: {source}")]
    NoGate {
        /// The app port tried.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The app-server could not connect to the sidecar.
    #[error("the app-server cannot connect to the sidecar at {addr}: {source}")]
    Sidecar {
        /// The sidecar port tried.
        addr: std::net::SocketAddr,
        /// Why.
        source: Box<client::ClientError>,
    },
    /// The executors could not start.
    #[error("{0}")]
    Engine(String),
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    /// Every figure.
    pub report: Report,
    /// The merged latency histograms (µs).
    pub hists: Hists,
}

/// Pins this thread (and the threads it starts later, which inherit it) to `cores`, so the
/// app-server's threads stay off the gate's cores (the executors pin themselves).
pub(crate) fn pin_to(cores: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it; the call
    // affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cores {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// What the main thread watches during the run.
struct Watch<'a> {
    plan: &'a Plan,
    stats: &'a [ExecStats],
    gate_pid: Option<u32>,
    rss_max: Option<u64>,
    start: Instant,
    last_print: Instant,
    last: Snapshot,
    label: &'static str,
}

impl Watch<'_> {
    fn counters(&self) -> Snapshot {
        self.stats.iter().fold(Snapshot::default(), |acc, s| acc.add(&s.c.snapshot()))
    }

    fn live(&self) -> u64 {
        self.stats.iter().map(|s| s.g.live.load(Relaxed).max(0) as u64).sum()
    }

    /// Samples the gate's memory and prints the live line once a second.
    fn tick(&mut self, server: Option<&AppServer>) {
        if self.last_print.elapsed() < Duration::from_secs(1) {
            return;
        }
        let dt = self.last_print.elapsed().as_secs_f64();
        self.last_print = Instant::now();
        if let Some(s) = self.gate_pid.and_then(procstat::sample) {
            self.rss_max = Some(self.rss_max.unwrap_or(0).max(s.rss_bytes));
        }
        let now = self.counters();
        let d = now.since(&self.last);
        self.last = now;
        if self.plan.live {
            let pending = server.map_or(0, |s| s.pending());
            let per_s = |n: u64| report::num((n as f64 / dt) as u64);
            eprintln!(
                "[{:>5.1}s {:<5}] sessions {:>6}/{:<6} gps {:>9} pts/s  out {:>9} fr/s  in {:>8} fr/s  \
                 pushes pending {:>7}  reconnects {:>5}  errors {}",
                self.start.elapsed().as_secs_f64(),
                self.label,
                self.live(),
                self.plan.apps(),
                per_s(d.gps_points),
                per_s(d.frames_out),
                per_s(d.frames_in),
                report::num(pending as u64),
                d.resumes + d.relogins,
                report::num(now.errors())
            );
        }
    }

    /// Waits `d`, ticking.
    fn wait(&mut self, d: Duration, server: Option<&AppServer>) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::thread::sleep(STEP.min(until.saturating_duration_since(Instant::now())));
            self.tick(server);
        }
    }
}

/// Runs `plan` to the end and reports.
pub fn run(plan: Plan) -> Result<Outcome, RunError> {
    plan.validate().map_err(RunError::Plan)?;
    // Peers speak other protocols and have no sessions, receipts or sidecar: their own loop.
    if plan.target != Target::Gate {
        return crate::peers::run(plan);
    }
    pin_to(if plan.appserver_cores.is_empty() { &plan.cores } else { &plan.appserver_cores });
    let cpu_start = procstat::self_cpu_s();
    // Fail fast with a clear message when a node does not listen, instead of ramping forever.
    for &addr in &plan.gates {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|source| RunError::NoGate { addr, source })?;
    }
    let gate_pid = plan.gate_pid.or_else(|| procstat::find_listener_pid(plan.gate().port()));
    let gate_before = gate_pid.and_then(procstat::sample);

    let plan = Arc::new(plan);
    let track = (plan.scenario == crate::plan::Scenario::Geo).then(|| Arc::new(crate::geo::Track::default()));
    let mut server = if plan.appserver {
        let cfg = appserver::Config {
            sidecar: plan.sidecar,
            secret: plan.sidecar_secret.clone(),
            conns: plan.sidecar_conns,
            dispatch_k: plan.dispatch_k,
            dispatch: plan.dispatch,
            ttl_ms: plan.ttl_ms,
            push_rate: plan.push_rate,
            fanout: plan.fanout,
            payload_bytes: plan.payload_bytes,
            drivers: (plan.uid_base, plan.drivers),
            slow_readers: (plan.slow_reader_uid(0), plan.bad.slow_readers, plan.bad.slow_push_bytes),
            geo: track.clone().map(|track| appserver::GeoLoad {
                rate: plan.geo_rate,
                area: (crate::engine::driver::CENTER, plan.area_half_deg),
                track,
            }),
        };
        Some(
            AppServer::start(cfg)
                .map_err(|source| RunError::Sidecar { addr: plan.sidecar, source: Box::new(source) })?,
        )
    } else {
        None
    };
    let control = Arc::new(Control::with_track(track.clone()));
    let stats: Arc<Vec<ExecStats>> = Arc::new((0..plan.cores.len()).map(|_| ExecStats::default()).collect());
    let bad = Arc::new(BadStats::default());
    let engine =
        engine::start(plan.clone(), control.clone(), stats.clone(), bad.clone()).map_err(RunError::Engine)?;

    let mut w = Watch {
        plan: &plan,
        stats: &stats,
        gate_pid,
        rss_max: gate_before.map(|s| s.rss_bytes),
        start: Instant::now(),
        last_print: Instant::now(),
        last: Snapshot::default(),
        label: "ramp",
    };

    let ramp_cpu0 = gate_pid.and_then(procstat::schedstat_cpu_s);
    let ramp_s = ramp(u64::from(plan.apps()), "sessions", || {
        w.wait(STEP, server.as_ref());
        w.live()
    });
    let ramp_cpu1 = gate_pid.and_then(procstat::schedstat_cpu_s);
    let ramp_logins = w.counters().logins;

    // The measured window.
    control.set_phase(Phase::Run);
    if let Some(s) = &server {
        s.start_pushing();
    }
    w.label = "run";
    let live_at_start = w.live();
    let c0 = w.counters();
    let g0 = gate_pid.and_then(procstat::sample);
    let gate_metrics0 = plan.gate_admin.and_then(crate::gatemetrics::scrape);
    let own0 = (procstat::self_cpu_s(), crate::engine::stats::loops_cpu_s(&stats));
    let server_gps0 = server.as_ref().map_or(0, |s| s.counters().gps_points.load(Relaxed));
    let t0 = Instant::now();
    let storm_due = (plan.storm_percent > 0.0).then_some(t0 + plan.storm_at);
    let mut stormed = false;
    // The gate's CPU when the storm was ordered, and when every dropped session was back.
    let (mut storm_cpu0, mut storm_cpu1) = (None, None);
    let all_back = |c: &Control| c.storm.back.load(Relaxed) >= c.storm.victims.load(Relaxed);
    while t0.elapsed() < plan.duration {
        w.wait(STEP.min(plan.duration.saturating_sub(t0.elapsed())), server.as_ref());
        if !stormed && storm_due.is_some_and(|t| Instant::now() >= t) {
            stormed = true;
            w.label = "storm";
            storm_cpu0 = gate_pid.and_then(procstat::schedstat_cpu_s);
            control.storm();
        } else if stormed && storm_cpu1.is_none() && all_back(&control) {
            storm_cpu1 = gate_pid.and_then(procstat::schedstat_cpu_s);
        }
    }
    let window = t0.elapsed();
    let c1 = w.counters();
    let g1 = gate_pid.and_then(procstat::sample);
    let gate_metrics1 = plan.gate_admin.and_then(crate::gatemetrics::scrape);
    let own1 = (procstat::self_cpu_s(), crate::engine::stats::loops_cpu_s(&stats));
    let server_gps1 = server.as_ref().map_or(0, |s| s.counters().gps_points.load(Relaxed));
    let live_at_end = w.live();
    let own_rss = procstat::sample(std::process::id()).map(|s| s.rss_bytes);

    // A storm's last sessions may still be on their way back.
    if stormed {
        let until = Instant::now() + STORM_PATIENCE;
        while control.storm.back.load(Relaxed) < control.storm.victims.load(Relaxed) && Instant::now() < until
        {
            w.wait(STEP, server.as_ref());
        }
        if storm_cpu1.is_none() && all_back(&control) {
            storm_cpu1 = gate_pid.and_then(procstat::schedstat_cpu_s);
        }
    }

    // Drain: no new traffic; wait (bounded) for the receipts of everything pushed.
    control.set_phase(Phase::Drain);
    w.label = "drain";
    if let Some(s) = server.as_mut() {
        s.stop_pushing();
        let until = Instant::now() + plan.receipt_wait();
        while (s.pending() > 0 || s.in_flight() > 0) && Instant::now() < until && !s.gate_lost() {
            w.wait(STEP, Some(s));
        }
    }

    // Stop: apps log out; collect everything.
    control.set_phase(Phase::Stop);
    let results = engine.join();
    let server_out = server.map(AppServer::finish);
    let mut hists = Hists::default();
    for r in &results {
        hists.merge(&r.hists);
    }
    let shown: Vec<audit::Shown> = results.into_iter().map(|r| r.shown).collect();
    let total_counters = w.counters();

    let mut rep = Report {
        scenario: plan.scenario,
        target: plan.target.name().to_owned(),
        window_s: window.as_secs_f64(),
        ..Report::default()
    };
    let win = c1.since(&c0);
    let secs = window.as_secs_f64().max(1e-9);
    rep.connections = report::Connections {
        drivers: plan.drivers,
        passengers: plan.passengers,
        live_at_start,
        live_at_end,
        ramp_s,
        logins: total_counters.logins,
        login_latency_us: Latency::of(&hists.login),
    };
    rep.gps = report::Gps {
        sent: win.gps_points,
        frames: win.gps_frames,
        rate_per_s: win.gps_points as f64 / secs,
        forwarded: server_gps1 - server_gps0,
        gate_cpu_us_per_point: None,
        behind: win.gps_behind,
        late: win.gps_late,
    };
    // The gate's own part of the push path over the same window (absent for a peer target).
    rep.push.set_gate_side(gate_metrics0.as_deref(), gate_metrics1.as_deref());
    if let Some(o) = &server_out {
        rep.set_audit(&o.audit);
        rep.push.outcomes = o.outcomes.iter().map(|&(k, n)| (k.to_owned(), n)).collect();
        let untracked = shown.iter().any(|s| s.untracked > 0);
        // Only uids simulated here can be checked: with several loadgen processes, offers may
        // go to drivers of another one.
        let ours = plan.uid_base..plan.uid_base + u64::from(plan.apps());
        let pairs: Vec<(u64, u64)> =
            o.delivered_pairs.iter().copied().filter(|(_, uid)| ours.contains(uid)).collect();
        rep.push.delivered_unseen = if untracked { 0 } else { audit::delivered_unseen(&pairs, &shown) };
        rep.orders.dispatch = o.dispatch;
        rep.geo = report::GeoReport {
            queries: o.geo.queries,
            chosen: o.geo.chosen,
            wrong: o.geo.wrong,
            missed: o.geo.missed,
            over_k: o.geo.over_k,
            failed: o.geo.failed,
            latency_us: Latency::of(&o.geo.latency_us),
        };
        rep.appserver = report::AppServerReport {
            running: true,
            gps_points: o.gps_points,
            upstream: o.upstream,
            push_refused: o.push_refused,
            push_failed: o.push_failed,
            reply_failed: o.reply_failed,
            unreachable_events: o.unreachable_events,
            connections_lost: o.connections_lost,
            gate_lost: o.gate_lost,
        };
    }
    rep.push.duplicates = total_counters.push_duplicates;
    rep.push.received = total_counters.push_first;
    rep.push.redelivered = total_counters.push_again;
    rep.push.latency_us = Latency::of(&hists.push);
    rep.push.arrival_us = (!hists.push_arrival.is_empty()).then(|| Latency::of(&hists.push_arrival));
    rep.push.loadgen_wait_us = (!hists.push_wait.is_empty()).then(|| Latency::of(&hists.push_wait));
    rep.push.by_node = plan
        .gates
        .iter()
        .enumerate()
        .filter(|_| plan.gates.len() > 1)
        .map(|(i, g)| report::NodePush {
            gate: g.to_string(),
            latency_us: hists.push_by_node.get(i).map(Latency::of).unwrap_or_default(),
        })
        .collect();
    rep.push.deliveries_per_s = win.push_first as f64 / secs;
    rep.request = report::Request {
        sent: total_counters.requests,
        answered: total_counters.replies,
        errors: total_counters.request_errors,
        cut: total_counters.requests_cut,
        latency_us: Latency::of(&hists.request),
    };
    rep.orders.placed = total_counters.orders_placed;
    rep.orders.no_driver = total_counters.orders_no_driver;
    rep.orders.taken_seen = total_counters.orders_taken_seen;
    rep.orders.grab_won = total_counters.grab_won;
    rep.orders.grab_lost = total_counters.grab_lost;
    rep.reconnect = report::Reconnect {
        count: total_counters.resumes + total_counters.relogins,
        resumed: total_counters.resumes,
        relogin: total_counters.relogins,
        moved: total_counters.resumes_moved,
        resume_refused: total_counters.resume_refused,
        drops_caused: total_counters.drops_caused,
        drops_seen: total_counters.drops_seen,
        latency_us: Latency::of(&hists.reconnect),
    };
    let st = &control.storm;
    let (victims, back) = (st.victims.load(Relaxed), st.back.load(Relaxed));
    rep.handshake =
        report::Handshake { secure: plan.server_key.is_some(), latency_us: Latency::of(&hists.login) };
    rep.storm = report::Storm {
        dropped: victims,
        back,
        all_back_ms: (victims > 0 && back >= victims)
            .then(|| st.last_back_ns.load(Relaxed).saturating_sub(st.at_ns.load(Relaxed)) as f64 / 1e6),
        resumed: st.resumed.load(Relaxed),
        relogin: st.relogin.load(Relaxed),
        moved: st.moved.load(Relaxed),
    };
    rep.idle.sessions = live_at_end;
    if plan.scenario == Scenario::Idle && live_at_end > 0 {
        rep.idle.bytes_per_session = match (gate_before, g1) {
            (Some(b), Some(a)) => Some((a.rss_bytes as f64 - b.rss_bytes as f64) / live_at_end as f64),
            _ => None,
        };
    }
    let mut gate = report::Gate::over_window(gate_pid, gate_before, g0, g1, w.rss_max, window);
    let per = |a: Option<f64>, b: Option<f64>, n: u64| match (a, b) {
        (Some(a), Some(b)) if n > 0 => Some(((b - a) * 1e6 / n as f64 * 10.0).round() / 10.0),
        _ => None,
    };
    gate.cpu_us_per_handshake = per(ramp_cpu0, ramp_cpu1, ramp_logins);
    gate.cpu_us_per_resume = per(storm_cpu0, storm_cpu1, back);
    rep.set_gate(gate);
    rep.loadgen = report::Loadgen {
        cpu_s: procstat::self_cpu_s() - cpu_start,
        rss_bytes: own_rss,
        cores: plan.cores.clone(),
        ..report::Loadgen::default()
    };
    rep.loadgen.set_window((own0.0, own1.0), (own0.1, own1.1), win.gps_frames);
    if plan.scenario == Scenario::Bad {
        rep.bad = Some(bad.summary());
    }
    rep.set_errors(&total_counters);
    rep.counters = total_counters;
    rep.ok = rep.push.lost == 0 && rep.push.duplicates == 0 && rep.push.delivered_unseen == 0;
    Ok(Outcome { report: rep, hists })
}
