//! The figures of a bench: one [`RunResult`] per run (taken from loadgen's report and what perf
//! read itself), the ratios gate/peer and gate/ceiling, each DESIGN goal beside its measured
//! figure, and the whole as JSON ([`BenchResults`]) and as tables for people. Pure: built from
//! values, tested from values.

use super::machine::{KernelMem, Machine};
use super::plan::{si, Kind, Profile, RunSpec, Target};
use loadgen::report::Report;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The version of this JSON's layout; bumped when a field changes meaning.
pub const SCHEMA: &str = "fleetgate-bench/1";
/// loadgen at or above this share of its core is the bottleneck: its figures are not the
/// server's and are not quoted as such.
pub const LOADGEN_BOUND_SHARE: f64 = 0.90;
/// A run whose GPS points sent over 10 ms after their schedule (loadgen's `gps.late`) are more
/// than this share of the points sent did not offer its rate on time: it is marked late and
/// not quoted as the server's figure.
pub const LATE_SHARE: f64 = 0.01;
/// A run whose points delivered to the app-server side (forwarded by the gate, received by the
/// peers' subscriber, read by the ceiling) are below this share of the offered points is marked
/// late too: the traffic measured is not the traffic offered.
pub const DELIVERED_SHARE: f64 = 0.99;

/// How a run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// It ran and reported.
    Ok,
    /// It did not finish or report (see `error`).
    Failed,
    /// It was not run (peer missing, time budget spent, interrupted).
    Skipped,
}

/// Server figures over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerFigures {
    /// Its pid.
    pub pid: Option<u32>,
    /// CPU seconds in the window.
    pub cpu_s: Option<f64>,
    /// CPU in the window, % of one core.
    pub cpu_percent: Option<f64>,
    /// RSS before any connection.
    pub rss_before_bytes: Option<u64>,
    /// RSS at the end of the window.
    pub rss_bytes: Option<u64>,
}

/// GPS figures over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GpsFigures {
    /// Points sent.
    pub sent: u64,
    /// Points sent per second.
    pub sent_per_s: f64,
    /// Points that reached the app-server side (the ceiling: that it read, scaled from its
    /// byte count over the whole run).
    pub delivered: Option<u64>,
    /// `delivered` per second.
    pub delivered_per_s: Option<f64>,
    /// Server CPU µs per point sent.
    pub cpu_us_per_point: Option<f64>,
    /// Application bytes one point puts on the wire to this target.
    pub wire_bytes_per_point: u32,
    /// Reports loadgen sent over a second behind their schedule (it started the driver's
    /// schedule afresh).
    pub behind: u64,
    /// Reports loadgen sent more than 10 ms after their schedule (`behind` ones included).
    /// Absent from results written before it was measured.
    #[serde(default)]
    pub late: u64,
    /// `delivered_per_s` (else `sent_per_s`) / the offered rate: below [`DELIVERED_SHARE`] the
    /// run is marked late.
    #[serde(default)]
    pub delivered_of_offered: Option<f64>,
    /// The ceiling: receive completions per point (below 1 when segments coalesce).
    pub recvs_per_point: Option<f64>,
    /// Points the app-server side got over the whole run (drain included) per point sent:
    /// below 1, points were lost, not just late.
    pub delivered_whole_run_ratio: Option<f64>,
}

/// Push figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PushFigures {
    /// Pairs (push, driver) sent.
    pub sent: u64,
    /// Pairs drivers received.
    pub received: u64,
    /// Received pairs per second in the window.
    pub deliveries_per_s: f64,
    /// Latency samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Largest, µs.
    pub max_us: u64,
    /// The gate's audit: accepted pairs without a receipt (peers have no receipts: 0).
    pub lost: u64,
    /// Pushes shown twice.
    pub duplicates: u64,
    /// The gate's own part (sidecar read → delivery written, its `fleetgate_push_delivery_us`
    /// over the window): median and 99th percentile, µs; none for a peer.
    #[serde(default)]
    pub gate_p50_us: Option<u64>,
    /// See `gate_p50_us`.
    #[serde(default)]
    pub gate_p99_us: Option<u64>,
    /// loadgen's own part (the delivery in the driver's socket → decoded, by the kernel's
    /// receive stamp): median and 99th percentile, µs.
    #[serde(default)]
    pub loadgen_p50_us: Option<u64>,
    /// See `loadgen_p50_us`.
    #[serde(default)]
    pub loadgen_p99_us: Option<u64>,
    /// The percentile curve (percentile, µs), from loadgen's .hgrm, for the plot.
    pub curve: Vec<(f64, f64)>,
}

/// Idle figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IdleFigures {
    /// Sessions up at the end.
    pub sessions: u64,
    /// (server RSS at the end − before) / sessions.
    pub user_bytes_per_session: Option<f64>,
    /// Kernel socket memory (buffers, TCP and socket-inode slabs) added per session, both
    /// ends of the loopback connection counted (loadgen's socket and the server's).
    pub kernel_bytes_per_session_both_ends: Option<f64>,
    /// Server CPU with no connection at all, % of a core.
    pub cpu_percent_no_connections: Option<f64>,
    /// Server CPU with the idle sessions (keepalives every 15 s each), % of a core.
    pub cpu_percent_idle_sessions: Option<f64>,
    /// User-space bytes each added session cost between the profile's smaller idle run and
    /// this one: (bytes here − bytes there) / (sessions here − sessions there). Only on the
    /// larger run of a target, when the profile has two sizes ([`add_idle_slopes`]).
    #[serde(default)]
    pub user_bytes_slope: Option<f64>,
    /// The sessions of the smaller run the slope starts from.
    #[serde(default)]
    pub slope_from_sessions: Option<u64>,
}

/// Storm figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StormFigures {
    /// Sessions dropped at once.
    pub dropped: u64,
    /// Back.
    pub back: u64,
    /// Storm → last one back, ms.
    pub all_back_ms: Option<f64>,
    /// Back by resume.
    pub resumed: u64,
    /// Back by login.
    pub relogin: u64,
    /// Sessions back per second (back / all_back_ms).
    pub back_per_s: Option<f64>,
    /// Gate CPU over the window (the storm and a few pushes), s.
    pub gate_cpu_s: Option<f64>,
    /// That CPU per session back, µs.
    pub cpu_us_per_session: Option<f64>,
    /// loadgen's share of its core from the storm until the last session was back (the
    /// window's average hides a storm of a few seconds).
    pub loadgen_core_share_during: Option<f64>,
    /// The gate's share of its core over the same time.
    pub gate_core_share_during: Option<f64>,
    /// The apps spoke the secure channel (a Noise handshake per login).
    pub secure: bool,
    /// First logins per second over the ramp (each a handshake on the secure channel), at
    /// the pace loadgen opens them (at most 512 handshakes open).
    pub logins_per_s: Option<f64>,
    /// Connect → Session answer of each first login, µs.
    pub handshake_p50_us: Option<u64>,
    /// See `handshake_p50_us`.
    pub handshake_p99_us: Option<u64>,
    /// Gate CPU over the ramp ÷ sessions logged in (scheduler ns): a handshake and a login
    /// each, TCP setup included.
    pub cpu_us_per_handshake: Option<f64>,
    /// Gate CPU from the drop until all were back ÷ sessions back: a resume each, TCP setup
    /// included.
    pub cpu_us_per_resume: Option<f64>,
}

/// loadgen's own load.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadgenFigures {
    /// CPU seconds of the whole process.
    pub cpu_s: f64,
    /// Its wall time, s.
    pub wall_s: f64,
    /// Its share of its core in the window (sampled every 100 ms); the whole run's when the
    /// window could not be placed.
    pub core_share: Option<f64>,
    /// `window` or `whole run`.
    pub share_from: String,
    /// It was the bottleneck (`core_share` ≥ 0.9): the run's figures are not the server's.
    pub bound: bool,
    /// Its exit status (1: the gate's push audit failed).
    pub exit_code: i32,
    /// CPU µs its event loops spent per GPS send in the window (its report's
    /// `loadgen.loops_us_per_send`); results written before this field have none.
    #[serde(default)]
    pub us_per_send: Option<f64>,
}

/// What else ran on the two cores during the window: the machine is shared.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Contention {
    /// Share of the server's core that other processes kept busy.
    pub other_on_server_core: f64,
    /// Share of loadgen's core that other processes kept busy.
    pub other_on_loadgen_core: f64,
    /// Share of the server's core the hypervisor stole.
    pub steal_on_server_core: f64,
}

/// Other processes at or above this share of the server's core make a run "contended": its
/// server may have waited for its core, so its figures are marked.
pub const CONTENDED_SHARE: f64 = 0.10;

/// One run's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    /// What ran.
    pub spec: RunSpec,
    /// Its table name.
    pub label: String,
    /// How it went.
    pub status: RunStatus,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    /// The server.
    pub server: ServerFigures,
    /// GPS.
    pub gps: GpsFigures,
    /// Pushes (push and fan-out runs; the storm's audit).
    pub push: Option<PushFigures>,
    /// Idle memory and CPU.
    pub idle: Option<IdleFigures>,
    /// The storm.
    pub storm: Option<StormFigures>,
    /// loadgen.
    pub loadgen: LoadgenFigures,
    /// Other work on the cores during the window, if it could be read.
    pub contention: Option<Contention>,
    /// Other work took ≥ [`CONTENDED_SHARE`] of the server's core (or steal did).
    pub contended: bool,
    /// The GPS traffic was not the one offered ([`late_traffic`]): more than [`LATE_SHARE`] of
    /// the points left over 10 ms late, or fewer than [`DELIVERED_SHARE`] of the offered points
    /// were delivered. Not quoted as the server's figure. Absent (false) in results written
    /// before the rule.
    #[serde(default)]
    pub late: bool,
    /// loadgen's JSON report as it printed it. Kept as JSON, not as a [`Report`]: results
    /// written by earlier versions, whose reports had other fields, must still read back (to
    /// draw their tables again); perf reads the figures from the typed report when it builds
    /// this result.
    pub report: Value,
}

impl RunResult {
    /// A run that did not happen or did not report.
    pub fn not_run(spec: &RunSpec, status: RunStatus, error: String) -> RunResult {
        RunResult {
            spec: spec.clone(),
            label: spec.label(),
            status,
            error: Some(error),
            server: ServerFigures::default(),
            gps: GpsFigures { wire_bytes_per_point: spec.target.gps_wire_bytes(), ..GpsFigures::default() },
            push: None,
            idle: None,
            storm: None,
            loadgen: LoadgenFigures::default(),
            contention: None,
            contended: false,
            late: false,
            report: Value::Null,
        }
    }

    /// True when its figures may be quoted: it ran, loadgen was not the bottleneck, and the
    /// traffic was the one offered (not late).
    pub fn quotable(&self) -> bool {
        self.status == RunStatus::Ok && self.not_quoted().is_none()
    }

    /// Why a run that ran is not quoted, if it is not: loadgen-bound first (a saturated loadgen
    /// is late too), then late.
    pub fn not_quoted(&self) -> Option<NotQuoted> {
        if self.loadgen.bound {
            Some(NotQuoted::LoadgenBound)
        } else if self.late {
            Some(NotQuoted::Late)
        } else {
            None
        }
    }
}

/// Why a run's figures are not quoted as the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotQuoted {
    /// loadgen used ≥ [`LOADGEN_BOUND_SHARE`] of its core in the window.
    LoadgenBound,
    /// The GPS traffic was late or short ([`late_traffic`]).
    Late,
}

impl NotQuoted {
    /// Its words in the tables and goals.
    pub fn words(self) -> &'static str {
        match self {
            NotQuoted::LoadgenBound => "loadgen-bound",
            NotQuoted::Late => "late",
        }
    }

    /// The goals' verdict when no figure is quotable for this reason.
    pub fn status(self) -> GoalStatus {
        match self {
            NotQuoted::LoadgenBound => GoalStatus::LoadgenBound,
            NotQuoted::Late => GoalStatus::Late,
        }
    }

    /// Of several reasons, the one to give: loadgen-bound if any run was (it explains the
    /// rest), else late.
    fn worst(reasons: impl IntoIterator<Item = NotQuoted>) -> Option<NotQuoted> {
        reasons.into_iter().min()
    }
}

/// The late rule: a run that offered GPS (the batch run aside, whose offer is past what the
/// gate takes on purpose) is late when more than [`LATE_SHARE`] of the points it sent left over
/// 10 ms after their schedule, or when the points delivered to the app-server side (the points
/// sent where nothing is delivered: the gate's latest-point forwarding) are below
/// [`DELIVERED_SHARE`] of the offered rate.
pub fn late_traffic(spec: &RunSpec, gps: &GpsFigures) -> bool {
    if spec.offered_per_s <= 0.0 || spec.kind == Kind::Batch {
        return false;
    }
    let late_points = gps.late.saturating_mul(u64::from(spec.batch.max(1)));
    let late = late_points as f64 > LATE_SHARE * gps.sent as f64;
    let short = gps.delivered_of_offered.is_none_or(|d| d < DELIVERED_SHARE);
    late || short
}

/// What perf read itself, beside loadgen's report.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// loadgen's share of its core in the window, if the window could be placed.
    pub window_share: Option<f64>,
    /// Other work on the cores in the window.
    pub contention: Option<Contention>,
    /// Its CPU and wall time.
    pub loadgen_cpu_s: f64,
    /// See `loadgen_cpu_s`.
    pub loadgen_wall_s: f64,
    /// Its exit status.
    pub exit_code: i32,
    /// Kernel socket memory before loadgen started, and at the end of the window.
    pub kernel_before: Option<KernelMem>,
    /// See `kernel_before`.
    pub kernel_end: Option<KernelMem>,
    /// The server's CPU with no connection, % of a core (idle runs).
    pub idle_cpu_percent: Option<f64>,
    /// The ceiling's (bytes, recv completions) over the whole run.
    pub ceiling: Option<(u64, u64)>,
    /// The push latency percentile curve.
    pub curve: Vec<(f64, f64)>,
    /// (loadgen, server) shares of their cores from the storm until all were back.
    pub storm_shares: Option<(f64, f64)>,
}

/// Builds a run's result from loadgen's report (`raw`: the same as it printed it, kept in the
/// results) and perf's own readings.
pub fn from_report(spec: &RunSpec, r: &Report, raw: Value, x: &Extras) -> RunResult {
    let window_s = r.window_s.max(1e-9);
    let sent = r.gps.sent;
    let delivered = match spec.target {
        // The ceiling's byte count is for the whole run; its share of what loadgen sent over
        // the whole run scales the window's count.
        Target::Ceiling => x.ceiling.map(|(bytes, _)| {
            // Ceiling runs send one 64-byte frame per point.
            let total_sent = r.counters.gps_points.max(1);
            let read_points = bytes / u64::from(super::plan::GATE_GPS_FRAME_BYTES);
            ((sent as f64) * (read_points as f64 / total_sent as f64).min(1.0)) as u64
        }),
        _ if r.appserver.running => Some(r.gps.forwarded),
        _ => None,
    };
    let recvs_per_point = match (spec.target, x.ceiling) {
        (Target::Ceiling, Some((bytes, recvs))) if bytes > 0 => {
            Some(recvs as f64 / (bytes as f64 / f64::from(super::plan::GATE_GPS_FRAME_BYTES)))
        }
        _ => None,
    };
    let cpu_s = r.gate.cpu_s;
    let (share, share_from) = match x.window_share {
        Some(s) => (Some(s), "window"),
        None if x.loadgen_wall_s > 0.0 => (Some(x.loadgen_cpu_s / x.loadgen_wall_s), "whole run"),
        None => (None, "unknown"),
    };
    let mut out = RunResult {
        spec: spec.clone(),
        label: spec.label(),
        status: RunStatus::Ok,
        error: None,
        server: ServerFigures {
            pid: r.gate.pid,
            cpu_s,
            cpu_percent: r.gate.cpu_percent,
            rss_before_bytes: r.gate.rss_before_bytes,
            rss_bytes: r.gate.rss_bytes,
        },
        gps: GpsFigures {
            sent,
            sent_per_s: sent as f64 / window_s,
            delivered,
            delivered_per_s: delivered.map(|d| d as f64 / window_s),
            cpu_us_per_point: r.gps.gate_cpu_us_per_point,
            wire_bytes_per_point: spec.target.gps_wire_bytes(),
            behind: r.gps.behind,
            late: r.gps.late,
            delivered_of_offered: (spec.offered_per_s > 0.0).then(|| {
                let got = match delivered {
                    Some(d) if spec.forward_all => d,
                    _ => sent,
                };
                got as f64 / window_s / spec.offered_per_s
            }),
            recvs_per_point,
            delivered_whole_run_ratio: match (spec.target, r.counters.gps_points) {
                (_, 0) => None,
                (Target::Ceiling, total) => x.ceiling.map(|(bytes, _)| {
                    (bytes / u64::from(super::plan::GATE_GPS_FRAME_BYTES)) as f64 / total as f64
                }),
                // Each driver's latest point per flush is not meant to be every point.
                _ if !spec.forward_all => None,
                (_, total) => delivered.map(|_| r.appserver.gps_points as f64 / total as f64),
            },
        },
        push: None,
        idle: None,
        storm: None,
        loadgen: LoadgenFigures {
            cpu_s: x.loadgen_cpu_s,
            wall_s: x.loadgen_wall_s,
            core_share: share,
            share_from: share_from.into(),
            bound: share.is_some_and(|s| s >= LOADGEN_BOUND_SHARE),
            exit_code: x.exit_code,
            us_per_send: r.loadgen.loops_us_per_send,
        },
        contention: x.contention,
        contended: x
            .contention
            .is_some_and(|c| c.other_on_server_core + c.steal_on_server_core >= CONTENDED_SHARE),
        late: false,
        report: raw,
    };
    out.late = late_traffic(spec, &out.gps);
    if spec.fanout > 0 {
        let p = &r.push;
        out.push = Some(PushFigures {
            sent: p.sent,
            received: p.received,
            deliveries_per_s: p.deliveries_per_s,
            count: p.latency_us.count,
            p50_us: p.latency_us.p50,
            p99_us: p.latency_us.p99,
            p999_us: p.latency_us.p999,
            max_us: p.latency_us.max,
            lost: p.lost,
            duplicates: p.duplicates,
            gate_p50_us: p.gate_latency_us.map(|g| g.p50),
            gate_p99_us: p.gate_latency_us.map(|g| g.p99),
            loadgen_p50_us: p.loadgen_wait_us.map(|w| w.p50),
            loadgen_p99_us: p.loadgen_wait_us.map(|w| w.p99),
            curve: x.curve.clone(),
        });
    }
    if spec.kind == Kind::Idle {
        let sessions = r.idle.sessions;
        let kernel = match (x.kernel_before, x.kernel_end) {
            (Some(a), Some(b)) if sessions > 0 => {
                Some((b.bytes() as f64 - a.bytes() as f64) / sessions as f64)
            }
            _ => None,
        };
        out.idle = Some(IdleFigures {
            sessions,
            user_bytes_per_session: r.idle.bytes_per_session,
            kernel_bytes_per_session_both_ends: kernel,
            cpu_percent_no_connections: x.idle_cpu_percent,
            cpu_percent_idle_sessions: r.gate.cpu_percent,
            user_bytes_slope: None,
            slope_from_sessions: None,
        });
    }
    if spec.kind == Kind::Storm {
        let st = &r.storm;
        let (all_back_ms, back) = (st.all_back_ms, st.back);
        out.storm = Some(StormFigures {
            dropped: st.dropped,
            back,
            all_back_ms,
            resumed: st.resumed,
            relogin: st.relogin,
            back_per_s: all_back_ms.filter(|ms| *ms > 0.0).map(|ms| back as f64 / (ms / 1000.0)),
            gate_cpu_s: cpu_s,
            cpu_us_per_session: cpu_s.filter(|_| back > 0).map(|c| c * 1e6 / back as f64),
            loadgen_core_share_during: x.storm_shares.map(|s| s.0),
            gate_core_share_during: x.storm_shares.map(|s| s.1),
            secure: r.handshake.secure,
            logins_per_s: (r.connections.ramp_s > 0.0 && r.connections.logins > 0)
                .then(|| r.connections.logins as f64 / r.connections.ramp_s),
            handshake_p50_us: (r.handshake.latency_us.count > 0).then_some(r.handshake.latency_us.p50),
            handshake_p99_us: (r.handshake.latency_us.count > 0).then_some(r.handshake.latency_us.p99),
            cpu_us_per_handshake: r.gate.cpu_us_per_handshake,
            cpu_us_per_resume: r.gate.cpu_us_per_resume,
        });
        // What matters in a storm is whether loadgen kept up while sessions came back.
        if let Some((l, _)) = x.storm_shares {
            out.loadgen.core_share = Some(l);
            out.loadgen.share_from = "storm".into();
            out.loadgen.bound = l >= LOADGEN_BOUND_SHARE;
        }
    }
    out
}

/// User-space bytes a server held for its idle sessions: RSS at the end of the window less RSS
/// before any connection (else the report's average times the sessions).
fn idle_user_bytes(r: &RunResult) -> Option<f64> {
    match (r.server.rss_bytes, r.server.rss_before_bytes) {
        (Some(end), Some(before)) => Some(end as f64 - before as f64),
        _ => {
            let i = r.idle.as_ref()?;
            Some(i.user_bytes_per_session? * i.sessions as f64)
        }
    }
}

/// For each target with idle runs at two sizes or more: on its largest run, the user-space
/// bytes each added session cost from its smallest run to it (the slope; the average of a run
/// also carries what the server allocated up front).
pub fn add_idle_slopes(runs: &mut [RunResult]) {
    for t in Target::ALL {
        let idle = |r: &RunResult| {
            r.spec.kind == Kind::Idle && r.spec.target == t && r.status == RunStatus::Ok && r.idle.is_some()
        };
        let sized: Vec<(usize, u64)> = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| idle(r))
            .filter_map(|(i, r)| Some((i, r.idle.as_ref()?.sessions)))
            .collect();
        let (Some(&(lo, lo_n)), Some(&(hi, hi_n))) =
            (sized.iter().min_by_key(|x| x.1), sized.iter().max_by_key(|x| x.1))
        else {
            continue;
        };
        if hi_n <= lo_n {
            continue;
        }
        let slope = match (idle_user_bytes(&runs[lo]), idle_user_bytes(&runs[hi])) {
            (Some(a), Some(b)) => Some((b - a) / (hi_n - lo_n) as f64),
            _ => None,
        };
        if let Some(i) = runs[hi].idle.as_mut() {
            i.user_bytes_slope = slope;
            i.slope_from_sessions = Some(lo_n);
        }
    }
}

/// A measured quantity: what a ratio compares and what a DESIGN goal is judged on. Its
/// [`name`](Metric::name) is what the results JSON (`ratios[].metric`) calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Metric {
    /// Server CPU µs per GPS point sent, one point per TCP segment.
    GpsCpuUsPerPoint,
    /// GPS points per second delivered to the app-server side.
    GpsDeliveredPerS,
    /// GPS points per second the gate took in batches of 10 on one core.
    BatchTakenPerS,
    /// Decode and verify one GPS frame, ns (criterion's median).
    DecodeNs,
    /// User-space bytes per idle session.
    IdleUserBytesPerSession,
    /// Push latency app-server → driver, p99, µs.
    PushP99Us,
    /// Push deliveries per second drivers received, large fan-outs.
    FanoutDeliveriesPerS,
    /// The same per second of server CPU: what one server core delivers when busy. loadgen
    /// cannot receive faster than its one core allows, so deliveries/s may measure loadgen;
    /// this one is comparable either way.
    FanoutDeliveriesPerCpuS,
    /// Sessions back per second after a storm.
    StormBackPerS,
    /// Storm → the last session back, ms.
    StormAllBackMs,
    /// A resume's cost beside a fresh handshake and login.
    ResumeCost,
    /// Pushes lost or shown twice (the gate's audit).
    PushLoss,
    /// Pushes lost across node restarts.
    RestartLoss,
    /// Server CPU with no connection, % of a core.
    IdleCpuPercent,
    /// The secure channel's gate CPU per GPS point, one point per segment: gate-secure's µs per
    /// point less the plaintext gate's in the same bench.
    ChannelCpuUsPerPoint,
    /// User-space bytes per idle session on the secure channel.
    SecureIdleUserBytesPerSession,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 16] = [
        Metric::GpsCpuUsPerPoint,
        Metric::GpsDeliveredPerS,
        Metric::BatchTakenPerS,
        Metric::DecodeNs,
        Metric::IdleUserBytesPerSession,
        Metric::PushP99Us,
        Metric::FanoutDeliveriesPerS,
        Metric::FanoutDeliveriesPerCpuS,
        Metric::StormBackPerS,
        Metric::StormAllBackMs,
        Metric::ResumeCost,
        Metric::PushLoss,
        Metric::RestartLoss,
        Metric::IdleCpuPercent,
        Metric::ChannelCpuUsPerPoint,
        Metric::SecureIdleUserBytesPerSession,
    ];

    /// Its name in the results JSON and the plots.
    pub fn name(self) -> &'static str {
        match self {
            Metric::GpsCpuUsPerPoint => "server CPU µs per point",
            Metric::GpsDeliveredPerS => "points/s delivered",
            Metric::BatchTakenPerS => "points/s taken in batches",
            Metric::DecodeNs => "decode + verify ns per frame",
            Metric::IdleUserBytesPerSession => "user bytes per idle session",
            Metric::PushP99Us => "push p99 µs",
            Metric::FanoutDeliveriesPerS => "deliveries/s",
            Metric::FanoutDeliveriesPerCpuS => "deliveries per server CPU-second",
            Metric::StormBackPerS => "sessions back/s in a storm",
            Metric::StormAllBackMs => "ms until a storm's sessions are all back",
            Metric::ResumeCost => "resume cost",
            Metric::PushLoss => "pushes lost or shown twice",
            Metric::RestartLoss => "pushes lost across node restarts",
            Metric::IdleCpuPercent => "server CPU % with no connection",
            Metric::ChannelCpuUsPerPoint => "secure channel CPU µs per point",
            Metric::SecureIdleUserBytesPerSession => "user bytes per idle secure session",
        }
    }

    /// Its figure in run `r`; `None` when the run has none (or it is not a run's figure).
    pub fn of(self, r: &RunResult) -> Option<f64> {
        match self {
            Metric::GpsCpuUsPerPoint => r.gps.cpu_us_per_point,
            Metric::GpsDeliveredPerS => r.gps.delivered_per_s,
            Metric::BatchTakenPerS => Some(r.gps.sent_per_s),
            Metric::IdleUserBytesPerSession => r.idle.as_ref()?.user_bytes_per_session,
            Metric::PushP99Us => r.push.as_ref().map(|p| p.p99_us as f64),
            Metric::FanoutDeliveriesPerS => r.push.as_ref().map(|p| p.deliveries_per_s),
            Metric::FanoutDeliveriesPerCpuS => {
                let cpu = r.server.cpu_percent.filter(|&c| c >= 1.0)?;
                r.push.as_ref().map(|p| p.deliveries_per_s / (cpu / 100.0))
            }
            Metric::StormBackPerS => r.storm.as_ref()?.back_per_s,
            Metric::StormAllBackMs => r.storm.as_ref()?.all_back_ms,
            Metric::PushLoss => r.push.as_ref().map(|p| (p.lost + p.duplicates) as f64),
            Metric::IdleCpuPercent => r.idle.as_ref()?.cpu_percent_no_connections,
            Metric::SecureIdleUserBytesPerSession => r.idle.as_ref()?.user_bytes_per_session,
            // Of two runs (the channel's, the storm's two costs), criterion's, or of parts not
            // built.
            Metric::DecodeNs | Metric::ResumeCost | Metric::RestartLoss | Metric::ChannelCpuUsPerPoint => {
                None
            }
        }
    }

    /// Why run `r`'s figure of this metric is not quoted, if it is not. A figure per second of
    /// server CPU holds whatever the load: a loadgen at its core's limit offers less, and the
    /// server spends less, per delivery the same.
    pub fn not_quoted_in(self, r: &RunResult) -> Option<NotQuoted> {
        match (self, r.not_quoted()) {
            (Metric::FanoutDeliveriesPerCpuS, Some(NotQuoted::LoadgenBound)) => {
                r.late.then_some(NotQuoted::Late)
            }
            (_, why) => why,
        }
    }

    /// True when run `r` ran and its figure of this metric is quoted.
    pub fn quotable_in(self, r: &RunResult) -> bool {
        r.status == RunStatus::Ok && self.not_quoted_in(r).is_none()
    }

    /// The metrics compared gate/peer and gate/ceiling in a scenario's runs.
    pub fn compared_in(kind: Kind) -> &'static [Metric] {
        match kind {
            Kind::Gps | Kind::GpsMany => &[Metric::GpsCpuUsPerPoint, Metric::GpsDeliveredPerS],
            Kind::Push => &[Metric::PushP99Us],
            Kind::Fanout => &[Metric::FanoutDeliveriesPerS, Metric::FanoutDeliveriesPerCpuS],
            Kind::Idle => &[Metric::IdleUserBytesPerSession],
            Kind::Batch | Kind::Storm => &[],
        }
    }
}

impl From<Metric> for &'static str {
    fn from(m: Metric) -> &'static str {
        m.name()
    }
}

impl TryFrom<String> for Metric {
    type Error = String;

    fn try_from(s: String) -> Result<Metric, String> {
        Metric::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| format!("unknown metric {s:?}"))
    }
}

/// One ratio of the gate's figure to another target's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ratio {
    /// The runs compared.
    pub label: String,
    /// What is compared.
    pub metric: Metric,
    /// The other target.
    pub versus: Target,
    /// The gate's figure.
    pub gate: f64,
    /// The other's.
    pub other: f64,
    /// gate / other.
    pub ratio: f64,
    /// Both runs are quotable (neither failed, loadgen-bound nor late).
    pub quotable: bool,
    /// Why not, when not: loadgen-bound if either run was, else late. Absent in results
    /// written before the late rule.
    #[serde(default)]
    pub not_quoted: Option<NotQuoted>,
}

/// The runs of the same scenario and sizes as `r`, by target.
fn siblings<'a>(runs: &'a [RunResult], r: &RunSpec) -> BTreeMap<Target, &'a RunResult> {
    runs.iter()
        .filter(|o| {
            o.status == RunStatus::Ok
                && o.spec.kind == r.kind
                && o.spec.conns == r.conns
                && o.spec.offered_per_s == r.offered_per_s
                && o.spec.fanout == r.fanout
                && o.spec.batch == r.batch
        })
        .map(|o| (o.spec.target, o))
        .collect()
}

/// Every ratio gate/peer and gate/ceiling of the metrics [compared](Metric::compared_in) in
/// each scenario, all in plaintext (the secure rows have their own table).
pub fn ratios(runs: &[RunResult]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for gate in runs.iter().filter(|r| r.spec.target == Target::Gate && r.status == RunStatus::Ok) {
        for (target, other) in siblings(runs, &gate.spec) {
            if target == Target::Gate || target.secure() {
                continue;
            }
            for &metric in Metric::compared_in(gate.spec.kind) {
                if let (Some(g), Some(o)) = (metric.of(gate), metric.of(other)) {
                    if o > 0.0 {
                        out.push(Ratio {
                            label: gate.label.clone(),
                            metric,
                            versus: target,
                            gate: g,
                            other: o,
                            ratio: g / o,
                            quotable: metric.quotable_in(gate) && metric.quotable_in(other),
                            not_quoted: NotQuoted::worst(
                                metric.not_quoted_in(gate).into_iter().chain(metric.not_quoted_in(other)),
                            ),
                        });
                    }
                }
            }
        }
    }
    out
}

/// How a goal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GoalStatus {
    /// Measured and met.
    Met,
    /// Measured and not met.
    NotMet,
    /// Needs a part of fleetgate that does not exist yet.
    NotBuilt,
    /// Not measured by this run (scenario not run, or measured elsewhere).
    NotMeasured,
    /// Measured only where loadgen was the bottleneck: no verdict.
    LoadgenBound,
    /// Measured only where the GPS traffic was late or short (the late rule): no verdict.
    Late,
}

impl GoalStatus {
    /// Its words in the table.
    pub fn words(self) -> &'static str {
        match self {
            GoalStatus::Met => "met",
            GoalStatus::NotMet => "not met",
            GoalStatus::NotBuilt => "not built",
            GoalStatus::NotMeasured => "not measured",
            GoalStatus::LoadgenBound => "no verdict (loadgen-bound)",
            GoalStatus::Late => "no verdict (late traffic)",
        }
    }
}

/// One DESIGN goal and what this bench found: a row of the goals table, in the JSON as in
/// the markdown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GoalRow {
    /// The goal, in DESIGN's words.
    pub goal: String,
    /// Its target figure.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Verdict.
    pub status: GoalStatus,
}

/// The decode benchmark's median, ns, and when it was taken, from criterion's files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CodecFigure {
    /// Median ns per frame.
    pub ns: f64,
    /// When criterion wrote it (UTC).
    pub measured_utc: String,
}

/// What the goals are judged from.
pub struct Inputs<'a> {
    /// Every run.
    pub runs: &'a [RunResult],
    /// Their ratios.
    pub ratios: Vec<Ratio>,
    /// The decode benchmark's figure.
    pub codec: Option<&'a CodecFigure>,
}

impl Inputs<'_> {
    /// The runs of scenario `k` that ran.
    fn ok(&self, k: Kind) -> impl Iterator<Item = &RunResult> {
        self.runs.iter().filter(move |r| r.spec.kind == k && r.status == RunStatus::Ok)
    }

    /// The gate's run of scenario `k` (the largest, when there are several sizes), if it ran.
    fn gate(&self, k: Kind) -> Option<&RunResult> {
        self.of(k, Target::Gate)
    }

    /// Target `t`'s run of scenario `k` (the largest, when there are several sizes), if it ran.
    fn of(&self, k: Kind, t: Target) -> Option<&RunResult> {
        self.ok(k).filter(|r| r.spec.target == t).max_by_key(|r| r.spec.conns)
    }
}

/// A DESIGN goal: the metric it is about, its words, and how its verdict is reached.
#[derive(Debug)]
pub struct Goal {
    /// What it is judged on (one goal per metric).
    pub metric: Metric,
    /// The goal, in DESIGN's words.
    pub goal: &'static str,
    /// Its target figure.
    pub target: &'static str,
    /// What was measured and the verdict, from the metric's figures.
    pub judge: fn(Metric, &Inputs<'_>) -> (String, GoalStatus),
}

/// DESIGN's goals, in the table's order.
pub const GOALS: &[Goal] = &[
    Goal {
        metric: Metric::GpsCpuUsPerPoint,
        goal: "GPS ingest, one point per TCP segment: gate CPU per point",
        target: "≤ 1.25× ceiling, ≤ 0.5× each peer's (mosquitto, rumqttd, nats-server), same offered rate",
        judge: gps_ingest,
    },
    Goal {
        metric: Metric::BatchTakenPerS,
        goal: "GPS ingest with batches of 10 points per frame",
        target: "≥ 1M points/s on one gate core",
        judge: batch_ingest,
    },
    Goal {
        metric: Metric::DecodeNs,
        goal: "decode + verify one GPS frame",
        target: "< 50 ns on one core",
        judge: decode,
    },
    Goal {
        metric: Metric::IdleUserBytesPerSession,
        goal: "idle authenticated session: user-space memory",
        target: "≤ 1 KiB each at 19,000 sessions after 30 s idle, lighter than mosquitto",
        judge: idle_memory,
    },
    Goal {
        metric: Metric::PushP99Us,
        goal: "push to drivers: latency",
        target: "p99 app-server → driver ≤ 1 ms, the gate's part ≤ 0.5 ms: 15,000 drivers reporting GPS every 3 s, and 2,000 idle drivers at 1,000 deliveries/s",
        judge: push_latency,
    },
    Goal {
        metric: Metric::FanoutDeliveriesPerCpuS,
        goal: "push fan-out deliveries per server CPU-second",
        target: "≥ 2× nats-server's for the same push",
        judge: fanout,
    },
    Goal {
        metric: Metric::StormBackPerS,
        goal: "resume rate",
        target: "≥ 50k resumes/s",
        judge: resume_rate,
    },
    Goal {
        metric: Metric::StormAllBackMs,
        goal: "reconnect storm",
        target: "15,000 dropped sessions back within 1 s",
        judge: storm_time,
    },
    Goal {
        metric: Metric::ResumeCost,
        goal: "resume cost",
        target: "≤ 0.5× a secure handshake + login in gate CPU (TCP setup included)",
        judge: resume_cost,
    },
    Goal {
        metric: Metric::PushLoss,
        goal: "loss under reconnect storms",
        target: "0: every push gets exactly one receipt",
        judge: push_loss,
    },
    Goal {
        metric: Metric::RestartLoss,
        goal: "loss under node restarts",
        target: "0: every push gets exactly one receipt",
        judge: |_, _| {
            // Node restarts, drains and moves are the cluster's: bench-cluster's storm with --move and
            // the cluster tests audit them, not this bench's single-node runs.
            (
                "measured by `make bench-cluster` (two nodes, storm with --move) and the cluster tests"
                    .into(),
                GoalStatus::NotMeasured,
            )
        },
    },
    Goal {
        metric: Metric::IdleCpuPercent,
        goal: "idle CPU",
        target: "~0 % when nothing happens",
        judge: idle_cpu,
    },
    Goal {
        metric: Metric::ChannelCpuUsPerPoint,
        goal: "secure channel: crypto per single GPS frame",
        target: "≤ 0.3 µs on top of plaintext (gate CPU per point, same traffic, same bench)",
        judge: channel_cpu,
    },
    Goal {
        metric: Metric::SecureIdleUserBytesPerSession,
        goal: "secure channel: idle encrypted session",
        target: "within the idle goal: ≤ 1 KiB each",
        judge: secure_idle,
    },
];

/// Each DESIGN goal beside its measured figure, in [`GOALS`]' order.
pub fn goals(runs: &[RunResult], codec: Option<&CodecFigure>) -> Vec<GoalRow> {
    let inputs = Inputs { runs, ratios: ratios(runs), codec };
    GOALS
        .iter()
        .map(|g| {
            let (measured, status) = (g.judge)(g.metric, &inputs);
            GoalRow { goal: g.goal.into(), target: g.target.into(), measured, status }
        })
        .collect()
}

/// GPS ingest, one point per segment, at each offered rate of the 1,000-connection runs.
fn gps_ingest(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let mut parts = Vec::new();
    let (mut met, mut missed) = (0, 0);
    let mut unquoted = Vec::new();
    for gate in i.ok(Kind::Gps).chain(i.ok(Kind::GpsMany)).filter(|r| r.spec.target == Target::Gate) {
        let rs: Vec<&Ratio> =
            i.ratios.iter().filter(|x| x.label == gate.label && x.metric == metric).collect();
        if rs.is_empty() {
            continue;
        }
        let limit = |t: Target| if t == Target::Ceiling { 1.25 } else { 0.5 };
        let text: Vec<String> = rs.iter().map(|x| format!("{:.2}× {}", x.ratio, x.versus.name())).collect();
        let why = NotQuoted::worst(rs.iter().filter_map(|x| unquoted_why(x)));
        let pass = rs.iter().all(|x| x.ratio <= limit(x.versus));
        parts.push(format!(
            "{} conns @ {}/s: {}{}",
            loadgen::report::num(u64::from(gate.spec.conns)),
            si(gate.spec.offered_per_s),
            text.join(", "),
            why.map_or(String::new(), |w| format!(" ({})", w.words()))
        ));
        match (why, pass) {
            (Some(w), _) => unquoted.push(w),
            (None, true) => met += 1,
            (None, false) => missed += 1,
        }
    }
    let status = if missed > 0 {
        GoalStatus::NotMet
    } else if met > 0 {
        GoalStatus::Met
    } else {
        NotQuoted::worst(unquoted).map_or(GoalStatus::NotMeasured, NotQuoted::status)
    };
    (if parts.is_empty() { "no comparable runs".into() } else { parts.join("; ") }, status)
}

/// Why a ratio is not quoted (`None` when it is); results written before the late rule say
/// only that it is not, which was loadgen-bound then.
fn unquoted_why(x: &Ratio) -> Option<NotQuoted> {
    match (x.quotable, x.not_quoted) {
        (true, _) => None,
        (false, why) => Some(why.unwrap_or(NotQuoted::LoadgenBound)),
    }
}

/// Batches of 10 on one gate core: points the gate took per second (TCP backpressure holds
/// loadgen to what the gate reads), and what one full core would take at that CPU per point.
fn batch_ingest(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let Some(r) = i.gate(Kind::Batch) else { return ("not run".into(), GoalStatus::NotMeasured) };
    let took = metric.of(r).unwrap_or(0.0);
    let cpu = r.server.cpu_percent.unwrap_or(0.0);
    let mut m = format!("{} points/s taken, gate core {cpu:.0} % busy", si(took));
    if let Some(us) = Metric::GpsCpuUsPerPoint.of(r).filter(|u| *u > 0.0) {
        let _ = write!(m, ", {us:.2} µs per point (≈{} points/s per full core)", si(1e6 / us));
    }
    let status = if took >= 1e6 && !r.contended {
        GoalStatus::Met
    } else if took >= 1e6 {
        m.push_str(" (contended)");
        GoalStatus::Met
    } else if cpu >= 90.0 {
        // The gate's core is full: this is what it takes.
        GoalStatus::NotMet
    } else if r.loadgen.bound {
        // Below 1M with the gate's core not full: the load generator set the rate.
        m.push_str("; loadgen could not offer more");
        GoalStatus::LoadgenBound
    } else {
        GoalStatus::NotMet
    };
    (m, status)
}

/// Decode + verify, from the criterion benchmark.
fn decode(_: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    match i.codec {
        Some(c) => (
            format!(
                "{:.1} ns (criterion, `make bench-codec`, {}; not re-run by this bench)",
                c.ns, c.measured_utc
            ),
            if c.ns < 50.0 { GoalStatus::Met } else { GoalStatus::NotMet },
        ),
        None => ("run `make bench-codec`".into(), GoalStatus::NotMeasured),
    }
}

/// Idle memory, the gate's beside the peers'.
fn idle_memory(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    // Each target's largest run: the goal is at 19,000 sessions.
    let mut by: BTreeMap<Target, &RunResult> = BTreeMap::new();
    for r in i.ok(Kind::Idle) {
        let e = by.entry(r.spec.target).or_insert(r);
        if r.spec.conns > e.spec.conns {
            *e = r;
        }
    }
    let bytes = |t: Target| by.get(&t).and_then(|r| metric.of(r));
    let slope = |t: Target| {
        by.get(&t)
            .and_then(|r| r.idle.as_ref()?.user_bytes_slope)
            .map_or(String::new(), |s| format!(" (slope {s:.0} B)"))
    };
    let Some(g) = bytes(Target::Gate) else { return ("not run".into(), GoalStatus::NotMeasured) };
    let sessions = by.get(&Target::Gate).and_then(|r| r.idle.as_ref()).map_or(0, |i| i.sessions);
    let mut m =
        format!("{g:.0} B per session at {} sessions{}", loadgen::report::num(sessions), slope(Target::Gate));
    let mq = bytes(Target::Mosquitto);
    for t in Target::PEERS {
        if let Some(b) = bytes(t) {
            let _ = write!(m, "; {} {b:.0} B{}", t.name(), slope(t));
        }
    }
    let status = if g <= 1024.0 && mq.is_none_or(|mq| g < mq) { GoalStatus::Met } else { GoalStatus::NotMet };
    (m, status)
}

/// Push latency.
fn push_latency(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    // Every latency run of the gate (the loaded fleet, the idle one): each must meet both.
    let runs: Vec<(&RunResult, &PushFigures, f64)> = i
        .runs
        .iter()
        .filter(|r| r.status == RunStatus::Ok && r.spec.kind == Kind::Push && r.spec.target == Target::Gate)
        .filter_map(|r| Some((r, r.push.as_ref()?, metric.of(r)?)))
        .filter(|(_, p, _)| p.count > 0)
        .collect();
    if runs.is_empty() {
        return ("not run".into(), GoalStatus::NotMeasured);
    }
    let mut parts = Vec::new();
    let mut statuses = Vec::new();
    for (r, p, p99) in runs {
        let gate_part = p.gate_p99_us.map_or(String::new(), |g| format!(", gate's part p99 {g} µs"));
        parts.push(format!(
            "p99 {} µs (p50 {}, p999 {}{gate_part}) with {} drivers, GPS {}/s, fan-out {}{}",
            p.p99_us,
            p.p50_us,
            p.p999_us,
            loadgen::report::num(u64::from(r.spec.conns)),
            si(r.spec.offered_per_s),
            r.spec.fanout,
            r.not_quoted().map_or(String::new(), |w| format!(" {}", w.words()))
        ));
        statuses.push(if let Some(why) = r.not_quoted() {
            why.status()
        } else if p99 <= 1000.0 && p.gate_p99_us.is_none_or(|g| g <= 500) {
            GoalStatus::Met
        } else {
            GoalStatus::NotMet
        });
    }
    // Not met anywhere measured decides; then no verdict where a run was not quoted.
    let status = if statuses.contains(&GoalStatus::NotMet) {
        GoalStatus::NotMet
    } else {
        statuses.into_iter().find(|s| *s != GoalStatus::Met).unwrap_or(GoalStatus::Met)
    };
    (parts.join("; "), status)
}

/// "p50 / p99" of a part of a push's latency, or a dash where it was not measured.
fn pair(p50: Option<u64>, p99: Option<u64>) -> String {
    match (p50, p99) {
        (Some(a), Some(b)) => format!("{} / {}", loadgen::report::num(a), loadgen::report::num(b)),
        _ => "–".to_owned(),
    }
}

/// Fan-out deliveries per server CPU-second against nats-server's.
fn fanout(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let fan: Vec<&Ratio> =
        i.ratios.iter().filter(|x| x.metric == metric && x.versus == Target::NatsServer).collect();
    let parts: Vec<String> = fan
        .iter()
        .map(|x| {
            format!(
                "{}: {:.2}× ({} vs {}{}){}",
                x.label,
                x.ratio,
                si(x.gate),
                si(x.other),
                if x.metric == Metric::FanoutDeliveriesPerCpuS { " per CPU-second" } else { "/s" },
                unquoted_why(x).map_or(String::new(), |w| format!(" {}", w.words()))
            )
        })
        .collect();
    let status = if fan.is_empty() {
        GoalStatus::NotMeasured
    } else if fan.iter().any(|x| x.quotable && x.ratio < 2.0) {
        GoalStatus::NotMet
    } else if fan.iter().any(|x| x.quotable) {
        GoalStatus::Met
    } else {
        NotQuoted::worst(fan.iter().filter_map(|x| unquoted_why(x)))
            .map_or(GoalStatus::NotMeasured, NotQuoted::status)
    };
    (if parts.is_empty() { "not run".into() } else { parts.join("; ") }, status)
}

/// The gate's storm run and its figures.
fn storm_run<'a>(i: &'a Inputs<'_>) -> Option<(&'a RunResult, &'a StormFigures)> {
    i.gate(Kind::Storm).and_then(|r| Some((r, r.storm.as_ref()?)))
}

/// Sessions back per second over the storm.
fn resume_rate(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let Some((r, s)) = storm_run(i) else { return ("not run".into(), GoalStatus::NotMeasured) };
    let rate = metric.of(r);
    let m = match rate {
        Some(v) => {
            format!(
                "{} sessions back/s over the storm ({} resumed, {} by login)",
                si(v),
                s.resumed,
                s.relogin
            )
        }
        None => format!("{} of {} back", s.back, s.dropped),
    };
    let status = match rate {
        Some(v) if v >= 50_000.0 => GoalStatus::Met,
        Some(_) if r.loadgen.bound => GoalStatus::LoadgenBound,
        _ => GoalStatus::NotMet,
    };
    (m, status)
}

/// How long until every dropped session was back.
fn storm_time(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let Some((r, s)) = storm_run(i) else { return ("not run".into(), GoalStatus::NotMeasured) };
    let all_back_ms = metric.of(r);
    let m = format!(
        "{} dropped, all back in {}; gate CPU {}",
        loadgen::report::num(s.dropped),
        all_back_ms.map_or("— (not all back)".into(), |ms| format!("{ms:.0} ms")),
        s.cpu_us_per_session.map_or("?".into(), |u| format!("{u:.0} µs per session"))
    );
    let status = match all_back_ms {
        Some(ms) if ms <= 1000.0 && s.dropped >= 15_000 => GoalStatus::Met,
        Some(ms) if ms <= 1000.0 => GoalStatus::NotMeasured,
        _ if r.loadgen.bound => GoalStatus::LoadgenBound,
        _ => GoalStatus::NotMet,
    };
    (m, status)
}

/// Pushes lost or shown twice over every gate run with pushes, a storm's included.
fn push_loss(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let gate_runs: Vec<&RunResult> = i
        .runs
        .iter()
        .filter(|r| r.status == RunStatus::Ok && r.spec.target == Target::Gate && r.push.is_some())
        .collect();
    if gate_runs.is_empty() {
        return ("no gate push runs".into(), GoalStatus::NotMeasured);
    }
    let pushed: u64 = gate_runs.iter().filter_map(|r| r.push.as_ref()).map(|p| p.sent).sum();
    let lost = gate_runs.iter().filter_map(|r| metric.of(r)).sum::<f64>() as u64;
    let storm = gate_runs.iter().any(|r| r.spec.kind == Kind::Storm);
    (
        format!(
            "{} lost or shown twice of {} pairs pushed in {} gate runs{}",
            lost,
            loadgen::report::num(pushed),
            gate_runs.len(),
            if storm { ", a reconnect storm included" } else { "" }
        ),
        if lost == 0 { GoalStatus::Met } else { GoalStatus::NotMet },
    )
}

/// The gate's CPU with no connection, and with the idle sessions.
fn idle_cpu(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let r = i.gate(Kind::Idle).and_then(|r| Some((r, r.idle.as_ref()?)));
    match r.and_then(|(r, idle)| Some((idle, metric.of(r)?))) {
        Some((idle, none)) => (
            format!(
                "{none:.2} % of a core with no connection; {} % with {} idle sessions (keepalive every 15 s each)",
                idle.cpu_percent_idle_sessions.map_or("?".into(), |c| format!("{c:.1}")),
                loadgen::report::num(idle.sessions)
            ),
            if none <= 0.5 { GoalStatus::Met } else { GoalStatus::NotMet },
        ),
        None => ("not run".into(), GoalStatus::NotMeasured),
    }
}

/// Gate CPU per resume against per handshake + login, from gate-secure's storm: the ramp's
/// logins are the handshakes, the storm's returns the resumes.
fn resume_cost(_: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let Some(r) = i.of(Kind::Storm, Target::GateSecure) else {
        return ("no gate-secure storm run".into(), GoalStatus::NotMeasured);
    };
    let Some(st) = r.storm.as_ref() else { return ("no storm figures".into(), GoalStatus::NotMeasured) };
    match (st.cpu_us_per_resume, st.cpu_us_per_handshake) {
        (Some(res), Some(hs)) if hs > 0.0 => {
            let ratio = res / hs;
            let mut m = format!(
                "{ratio:.2}×: {res:.0} µs per resume (storm, {} resumed) / {hs:.0} µs per handshake + login (ramp)",
                loadgen::report::num(st.resumed)
            );
            if r.contended {
                m.push_str(" (contended)");
            }
            // As every goal: a storm loadgen could not keep up with is not the gate's figure.
            let status = match r.not_quoted() {
                Some(why) => {
                    let _ = write!(m, " ({})", why.words());
                    why.status()
                }
                None if ratio <= 0.5 => GoalStatus::Met,
                None => GoalStatus::NotMet,
            };
            (m, status)
        }
        _ => ("the storm reported no CPU per resume or per handshake".into(), GoalStatus::NotMeasured),
    }
}

/// The secure channel's CPU per GPS point: gate-secure less gate on the same traffic (the real
/// fleet's runs, one point per segment), each pair from one bench.
fn channel_cpu(_: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let mut parts = Vec::new();
    let (mut met, mut missed, mut unquoted) = (0, 0, Vec::new());
    for secure in i.ok(Kind::GpsMany).filter(|r| r.spec.target == Target::GateSecure) {
        let sib = siblings(i.runs, &secure.spec);
        let Some(plain) = sib.get(&Target::Gate) else { continue };
        let (Some(s), Some(p)) = (secure.gps.cpu_us_per_point, plain.gps.cpu_us_per_point) else { continue };
        let d = s - p;
        let why = NotQuoted::worst(secure.not_quoted().into_iter().chain(plain.not_quoted()));
        parts.push(format!(
            "{} conns @ {}/s: {d:+.2} µs ({s:.2} vs {p:.2}){}",
            loadgen::report::num(u64::from(secure.spec.conns)),
            si(secure.spec.offered_per_s),
            why.map_or(String::new(), |w| format!(" ({})", w.words()))
        ));
        match why {
            Some(w) => unquoted.push(w),
            None if d <= 0.3 => met += 1,
            None => missed += 1,
        }
    }
    let status = if missed > 0 {
        GoalStatus::NotMet
    } else if met > 0 {
        GoalStatus::Met
    } else {
        NotQuoted::worst(unquoted).map_or(GoalStatus::NotMeasured, NotQuoted::status)
    };
    (if parts.is_empty() { "no gate-secure GPS runs".into() } else { parts.join("; ") }, status)
}

/// Idle memory on the secure channel, beside the plaintext gate's and mosquitto's with TLS.
fn secure_idle(metric: Metric, i: &Inputs<'_>) -> (String, GoalStatus) {
    let Some(r) = i.of(Kind::Idle, Target::GateSecure) else {
        return ("no gate-secure idle run".into(), GoalStatus::NotMeasured);
    };
    let Some(b) = metric.of(r) else { return ("no figure".into(), GoalStatus::NotMeasured) };
    let mut m = format!(
        "{b:.0} B per session at {} sessions",
        loadgen::report::num(r.idle.as_ref().map_or(0, |x| x.sessions))
    );
    for t in [Target::Gate, Target::MosquittoTls] {
        if let Some(o) = i.of(Kind::Idle, t).and_then(|o| o.idle.as_ref()?.user_bytes_per_session) {
            let _ = write!(m, "; {} {o:.0} B", t.name());
        }
    }
    (m, if b <= 1024.0 { GoalStatus::Met } else { GoalStatus::NotMet })
}

/// Everything one bench found: the JSON written to perf/results/.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchResults {
    /// [`SCHEMA`].
    pub schema: String,
    /// The sizes.
    pub profile: Profile,
    /// When it started and ended (UTC).
    pub started_utc: String,
    /// See `started_utc`.
    pub finished_utc: String,
    /// The machine.
    pub machine: Machine,
    /// Versions: the gate's source revision, each binary's own words.
    pub versions: BTreeMap<String, String>,
    /// How each server was started.
    pub settings: BTreeMap<String, String>,
    /// Cores: the servers', loadgen's.
    pub server_core: usize,
    /// See `server_core`.
    pub loadgen_core: usize,
    /// Bytes per GPS point: the gate's frame, the peers' message, each target's wire bytes.
    pub message_bytes: BTreeMap<String, u32>,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// gate / other for every comparable pair of runs.
    pub ratios: Vec<Ratio>,
    /// DESIGN's goals and what was found.
    pub goals: Vec<GoalRow>,
    /// The decode benchmark's figure, if criterion left one.
    pub codec: Option<CodecFigure>,
}

/// `12.345` → `12.3`, `0.8` → `0.80`.
fn fig(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A run's marks after its figure: ‡ loadgen-bound, † contended, § late.
fn mark(r: &RunResult) -> String {
    let marks: String = [(r.loadgen.bound, '‡'), (r.contended, '†'), (r.late, '§')]
        .into_iter()
        .filter_map(|(on, c)| on.then_some(c))
        .collect();
    if marks.is_empty() {
        marks
    } else {
        format!(" {marks}")
    }
}

/// The results as markdown tables (for the terminal and the README).
pub fn table(b: &BenchResults) -> String {
    let mut s = String::new();
    let m = &b.machine;
    let v = |k: &str| b.versions.get(k).cloned().unwrap_or_else(|| "?".into());
    let _ = writeln!(
        s,
        "Bench `{}`, {} → {}: {} cores ({}), kernel {}, load {} → {}; server on core {}, loadgen on core {}{}.",
        b.profile.name,
        b.started_utc,
        b.finished_utc,
        m.cores,
        m.cpu_model,
        m.kernel,
        m.loadavg_start.map_or("?".into(), |l| format!("{l:.2}")),
        m.loadavg_end.map_or("?".into(), |l| format!("{l:.2}")),
        b.server_core,
        b.loadgen_core,
        if m.realtime {
            ", both at real-time priority but in the fan-out runs (`--realtime`: other processes cannot preempt them)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Versions: {} ({}), {}, {}, {}. One GPS point: the gate's 64-byte frame (the ceiling gets the same); a 40-byte message to the peers ({} B on the wire to mosquitto and rumqttd, {} B to nats-server).",
        v("gate"),
        v("source"),
        v("mosquitto"),
        v("rumqttd"),
        v("nats-server"),
        Target::Mosquitto.gps_wire_bytes(),
        Target::NatsServer.gps_wire_bytes()
    );
    let _ = writeln!(
        s,
        "‡ loadgen-bound: loadgen used ≥ 90 % of its core in the window; the figure is not quoted as the server's. \
         † contended: other processes (or the hypervisor) took ≥ 10 % of the server's core in the window. \
         § late: more than 1 % of the GPS points left loadgen over 10 ms after their schedule, or fewer than 99 % \
         of the offered points reached the app-server side; the figure is not quoted as the server's.\n"
    );

    // GPS ingest.
    let gps: Vec<&RunResult> = b
        .runs
        .iter()
        .filter(|r| matches!(r.spec.kind, Kind::Gps | Kind::GpsMany) && r.spec.target == Target::Gate)
        .collect();
    let gps_heads: Vec<&RunResult> = if gps.is_empty() {
        b.runs.iter().filter(|r| matches!(r.spec.kind, Kind::Gps | Kind::GpsMany)).collect()
    } else {
        gps
    };
    if !gps_heads.is_empty() {
        let _ = writeln!(s, "**GPS ingest, one point per TCP segment**: server CPU µs per point · points/s delivered to the app-server side\n");
        let _ = writeln!(s, "| conns | offered/s | gate | mosquitto | rumqttd | nats-server | ceiling | gate/ceiling | gate/mosquitto | gate/rumqttd | gate/nats |");
        let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut seen = Vec::new();
        for head in gps_heads {
            let key = (head.spec.kind, head.spec.conns, head.spec.offered_per_s.to_bits());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let sib = siblings_any(&b.runs, &head.spec);
            let c = |t: Target| {
                cell(sib.get(&t), &|r| {
                    Some(format!(
                        "{} µs · {}",
                        fig(r.gps.cpu_us_per_point?),
                        r.gps.delivered_per_s.map_or("?".into(), si)
                    ))
                })
            };
            let ratio = |t: Target| {
                let (g, o) = (sib.get(&Target::Gate), sib.get(&t));
                let cpu = |r: Option<&&RunResult>| r.and_then(|r| Metric::GpsCpuUsPerPoint.of(r));
                match (cpu(g), cpu(o)) {
                    (Some(g), Some(o)) if o > 0.0 => format!("{:.2}×", g / o),
                    _ => "—".into(),
                }
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                loadgen::report::num(u64::from(head.spec.conns)),
                si(head.spec.offered_per_s),
                c(Target::Gate),
                c(Target::Mosquitto),
                c(Target::Rumqttd),
                c(Target::NatsServer),
                c(Target::Ceiling),
                ratio(Target::Ceiling),
                ratio(Target::Mosquitto),
                ratio(Target::Rumqttd),
                ratio(Target::NatsServer)
            );
        }
        s.push('\n');
    }

    let batch: Vec<&RunResult> = b.runs.iter().filter(|r| r.spec.kind == Kind::Batch).collect();
    if let Some(first) = batch.first() {
        let _ = writeln!(
            s,
            "**GPS in batches of {} points per frame, one gate core** (the gate forwards each driver's \
             latest point per flush, its default)\n",
            first.spec.batch
        );
        let _ = writeln!(
            s,
            "| target | conns | offered points/s | taken/s | forwarded/s | gate CPU | µs/point | loadgen core |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in batch {
            if r.status == RunStatus::Ok {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {}{} | {} | {} % | {} | {} % |",
                    r.spec.target.name(),
                    loadgen::report::num(u64::from(r.spec.conns)),
                    si(r.spec.offered_per_s),
                    si(r.gps.sent_per_s),
                    mark(r),
                    r.gps.delivered_per_s.map_or("?".into(), si),
                    r.server.cpu_percent.map_or("?".into(), |c| format!("{c:.0}")),
                    r.gps.cpu_us_per_point.map_or("?".into(), fig),
                    r.loadgen.core_share.map_or("?".into(), |c| format!("{:.0}", c * 100.0))
                );
            } else {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | | | | |",
                    r.spec.target.name(),
                    r.spec.conns,
                    si(r.spec.offered_per_s),
                    r.status_words()
                );
            }
        }
        s.push('\n');
    }

    let push: Vec<&RunResult> = b.runs.iter().filter(|r| r.spec.kind == Kind::Push).collect();
    if !push.is_empty() {
        let _ = writeln!(
            s,
            "**Push latency**, app-server → driver, µs (fan-out {}, GPS running)\n",
            push[0].spec.fanout
        );
        let _ = writeln!(
            s,
            "| target | drivers | GPS/s | pushes/s | p50 | p99 | p999 | max | gate's part p50 / p99 | loadgen's part p50 / p99 | received/sent | server CPU |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in push {
            match (&r.push, r.status) {
                (Some(p), RunStatus::Ok) => {
                    let _ = writeln!(
                        s,
                        "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} % |",
                        r.spec.target.name(),
                        mark(r),
                        loadgen::report::num(u64::from(r.spec.conns)),
                        si(r.gps.sent_per_s),
                        si(r.spec.push_rate),
                        loadgen::report::num(p.p50_us),
                        loadgen::report::num(p.p99_us),
                        loadgen::report::num(p.p999_us),
                        loadgen::report::num(p.max_us),
                        pair(p.gate_p50_us, p.gate_p99_us),
                        pair(p.loadgen_p50_us, p.loadgen_p99_us),
                        received(p),
                        r.server.cpu_percent.map_or("?".into(), |c| format!("{c:.0}"))
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | | | | | | | | | | |",
                        r.spec.target.name(),
                        r.status_words()
                    );
                }
            }
        }
        s.push('\n');
    }

    let fan: Vec<&RunResult> =
        b.runs.iter().filter(|r| r.spec.kind == Kind::Fanout && r.spec.target == Target::Gate).collect();
    let fan = if fan.is_empty() {
        b.runs.iter().filter(|r| r.spec.kind == Kind::Fanout).take(1).collect()
    } else {
        fan
    };
    if !fan.is_empty() {
        let _ =
            writeln!(s, "**Push fan-out**: deliveries/s received by drivers (received/sent) · server CPU; and deliveries per server CPU-second, gate against nats-server (comparable even where loadgen is at its core's limit)\n");
        let _ = writeln!(
            s,
            "| fan-out | drivers | offered/s | gate | mosquitto | rumqttd | nats-server | gate/nats | gate/mosquitto | gate/rumqttd | per CPU-s: gate | nats-server | gate/nats |"
        );
        let _ = writeln!(
            s,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for head in fan {
            let sib = siblings_any(&b.runs, &head.spec);
            let c = |t: Target| {
                cell(sib.get(&t), &|r| {
                    let p = r.push.as_ref()?;
                    Some(format!(
                        "{} ({}) · {} %",
                        si(p.deliveries_per_s),
                        received(p),
                        r.server.cpu_percent.map_or("?".into(), |c| format!("{c:.0}"))
                    ))
                })
            };
            let d = |t: Target| sib.get(&t).and_then(|r| Metric::FanoutDeliveriesPerS.of(r));
            let ratio = |t: Target| match (d(Target::Gate), d(t)) {
                (Some(g), Some(o)) if o > 0.0 => format!("{:.2}×", g / o),
                _ => "—".into(),
            };
            let per_cpu = |t: Target| sib.get(&t).and_then(|r| Metric::FanoutDeliveriesPerCpuS.of(r));
            let per_cpu_cell = |t: Target| per_cpu(t).map_or("—".into(), si);
            let per_cpu_ratio = match (per_cpu(Target::Gate), per_cpu(Target::NatsServer)) {
                (Some(g), Some(o)) if o > 0.0 => format!("{:.2}×", g / o),
                _ => "—".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                loadgen::report::num(u64::from(head.spec.fanout)),
                loadgen::report::num(u64::from(head.spec.conns)),
                si(head.spec.push_rate * f64::from(head.spec.fanout)),
                c(Target::Gate),
                c(Target::Mosquitto),
                c(Target::Rumqttd),
                c(Target::NatsServer),
                ratio(Target::NatsServer),
                ratio(Target::Mosquitto),
                ratio(Target::Rumqttd),
                per_cpu_cell(Target::Gate),
                per_cpu_cell(Target::NatsServer),
                per_cpu_ratio
            );
        }
        s.push('\n');
    }

    let idle: Vec<&RunResult> = b.runs.iter().filter(|r| r.spec.kind == Kind::Idle).collect();
    if !idle.is_empty() {
        let _ = writeln!(s, "**Idle sessions** after {} s idle\n", b.profile.idle_window_s);
        let _ = writeln!(s, "| target | sessions | user-space bytes/session | user-space bytes per added session (slope) | kernel bytes/session (both ends) | CPU, no connection | CPU, idle sessions |");
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in idle {
            match (&r.idle, r.status) {
                (Some(i), RunStatus::Ok) => {
                    let slope = match (i.user_bytes_slope, i.slope_from_sessions) {
                        (Some(b), Some(from)) => format!(
                            "{b:.0} ({} → {})",
                            loadgen::report::num(from),
                            loadgen::report::num(i.sessions)
                        ),
                        _ => "—".into(),
                    };
                    let _ = writeln!(
                        s,
                        "| {}{} | {} | {} | {} | {} | {} | {} |",
                        r.spec.target.name(),
                        mark(r),
                        loadgen::report::num(i.sessions),
                        i.user_bytes_per_session.map_or("?".into(), |b| format!("{b:.0}")),
                        slope,
                        i.kernel_bytes_per_session_both_ends.map_or("?".into(), |b| format!("{b:.0}")),
                        i.cpu_percent_no_connections.map_or("?".into(), |c| format!("{c:.2} %")),
                        i.cpu_percent_idle_sessions.map_or("?".into(), |c| format!("{c:.1} %"))
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | | | | |",
                        r.spec.target.name(),
                        loadgen::report::num(u64::from(r.spec.conns)),
                        r.status_words()
                    );
                }
            }
        }
        s.push('\n');
    }

    let storms: Vec<&RunResult> = b.runs.iter().filter(|r| r.spec.kind == Kind::Storm).collect();
    if !storms.is_empty() {
        let _ = writeln!(s, "**Reconnect storm**: every session dropped at once\n");
        let _ = writeln!(
            s,
            "| target | sessions | all back | resumed | by login | sessions back/s | gate CPU | per session |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in storms {
            match (&r.storm, r.status) {
                (Some(st), RunStatus::Ok) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {}{} | {} | {} | {} | {} | {} |",
                        r.spec.target.name(),
                        loadgen::report::num(st.dropped),
                        st.all_back_ms.map_or("not all".into(), |ms| format!("{ms:.0} ms")),
                        mark(r),
                        loadgen::report::num(st.resumed),
                        loadgen::report::num(st.relogin),
                        st.back_per_s.map_or("?".into(), si),
                        st.gate_cpu_s.map_or("?".into(), |c| format!("{c:.2} s")),
                        st.cpu_us_per_session.map_or("?".into(), |u| format!("{u:.0} µs"))
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | | | | | |",
                        r.spec.target.name(),
                        r.spec.conns,
                        r.status_words()
                    );
                }
            }
        }
        s.push('\n');
    }

    s.push_str(&secure_tables(b));

    if !b.goals.is_empty() {
        let _ = writeln!(s, "**DESIGN goals**\n");
        let _ = writeln!(s, "| goal | target | measured | verdict |");
        let _ = writeln!(s, "| --- | --- | --- | --- |");
        for g in &b.goals {
            let _ = writeln!(s, "| {} | {} | {} | {} |", g.goal, g.target, g.measured, g.status.words());
        }
        s.push('\n');
    }

    let failed: Vec<&RunResult> = b.runs.iter().filter(|r| r.status != RunStatus::Ok).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "Runs without figures:");
        for r in failed {
            let why = r.error.as_deref().unwrap_or("").lines().next().unwrap_or("");
            let _ = writeln!(s, "- {} ({}): {} {}", r.label, r.spec.target.name(), r.status_words(), why);
        }
    }
    s
}

/// The secure channel beside plaintext, each pair from the same bench: the gate's Noise channel
/// against its plaintext app port, mosquitto's TLS against its plaintext listener, on the same
/// traffic; and the handshakes and resumes of gate-secure's storm.
fn secure_tables(b: &BenchResults) -> String {
    let mut s = String::new();
    let secure = |k: Kind| -> Vec<&RunResult> {
        b.runs.iter().filter(|r| r.spec.kind == k && r.spec.target.secure()).collect()
    };
    let (gps, idle, batch, storm) =
        (secure(Kind::GpsMany), secure(Kind::Idle), secure(Kind::Batch), secure(Kind::Storm));
    if gps.is_empty() && idle.is_empty() && batch.is_empty() && storm.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "**Secure channel** (gate: Noise IK + ChaCha20-Poly1305 records, development key; mosquitto: \
         TLS 1.3, a test CA's certificate), each beside its own plaintext run in this bench\n"
    );
    let delta = |a: Option<f64>, b: Option<f64>, unit: &str| match (a, b) {
        (Some(a), Some(b)) => format!("{:+.2}{unit}", a - b),
        _ => "—".into(),
    };
    let mut heads: Vec<&RunResult> = gps.clone();
    heads.extend(batch.iter().copied());
    let mut seen = Vec::new();
    if !heads.is_empty() {
        let _ = writeln!(
            s,
            "| GPS | gate | gate-secure | channel | mosquitto | mosquitto-tls | TLS | gate-secure / mosquitto-tls |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    }
    for head in heads {
        let key = (head.spec.kind, head.spec.conns, head.spec.offered_per_s.to_bits());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let sib = siblings_any(&b.runs, &head.spec);
        let us = |t: Target| {
            sib.get(&t).filter(|r| r.status == RunStatus::Ok).and_then(|r| r.gps.cpu_us_per_point)
        };
        let c = |t: Target| cell(sib.get(&t), &|r| Some(format!("{} µs", fig(r.gps.cpu_us_per_point?))));
        let what = if head.spec.kind == Kind::Batch {
            format!(
                "batches of {}, {} conns, {}/s offered",
                head.spec.batch,
                num(head.spec.conns),
                si(head.spec.offered_per_s)
            )
        } else {
            format!(
                "{} conns @ {}/s, one point per segment",
                num(head.spec.conns),
                si(head.spec.offered_per_s)
            )
        };
        let vs = match (us(Target::GateSecure), us(Target::MosquittoTls)) {
            (Some(g), Some(m)) if m > 0.0 => format!("{:.2}×", g / m),
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} | {} | {} | {} | {vs} |",
            c(Target::Gate),
            c(Target::GateSecure),
            delta(us(Target::GateSecure), us(Target::Gate), " µs"),
            c(Target::Mosquitto),
            c(Target::MosquittoTls),
            delta(us(Target::MosquittoTls), us(Target::Mosquitto), " µs"),
        );
    }
    if !seen.is_empty() {
        s.push_str(
            "\nServer CPU µs per GPS point; \"channel\" and \"TLS\" are the difference each makes.\n\n",
        );
    }
    if !idle.is_empty() {
        let _ = writeln!(s, "| idle sessions | gate | gate-secure | mosquitto | mosquitto-tls |");
        let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: |");
        let mut sizes: Vec<u32> = idle.iter().map(|r| r.spec.conns).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for n in sizes {
            let head = idle.iter().find(|r| r.spec.conns == n).copied();
            let Some(head) = head else { continue };
            let sib = siblings_any(&b.runs, &head.spec);
            let c = |t: Target| {
                cell(sib.get(&t), &|r| {
                    let i = r.idle.as_ref()?;
                    Some(format!("{:.0} B", i.user_bytes_per_session?))
                })
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                num(n),
                c(Target::Gate),
                c(Target::GateSecure),
                c(Target::Mosquitto),
                c(Target::MosquittoTls)
            );
        }
        s.push_str("\nUser-space bytes per idle session (server RSS growth ÷ sessions).\n\n");
    }
    if !storm.is_empty() {
        let _ = writeln!(
            s,
            "| storm | logins/s (ramp) | login latency p50 / p99 | gate CPU per login | sessions back/s | gate CPU per resume | resume / login |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let plain = b.runs.iter().filter(|r| r.spec.kind == Kind::Storm && r.spec.target == Target::Gate);
        for r in plain.chain(storm.iter().copied()) {
            let Some(st) = r.storm.as_ref().filter(|_| r.status == RunStatus::Ok) else {
                let _ = writeln!(s, "| {} | {} | | | | | |", r.spec.target.name(), r.status_words());
                continue;
            };
            let us = |v: Option<f64>| v.map_or("?".into(), |u| format!("{u:.0} µs"));
            let ratio = match (st.cpu_us_per_resume, st.cpu_us_per_handshake) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                _ => "—".into(),
            };
            let _ = writeln!(
                s,
                "| {} ({}){} | {} | {} / {} | {} | {} | {} | {ratio} |",
                r.spec.target.name(),
                if st.secure { "handshake + login" } else { "plaintext login" },
                mark(r),
                st.logins_per_s.map_or("?".into(), si),
                st.handshake_p50_us.map_or("?".into(), loadgen::report::num),
                st.handshake_p99_us.map_or("?".into(), loadgen::report::num),
                us(st.cpu_us_per_handshake),
                st.back_per_s.map_or("?".into(), si),
                us(st.cpu_us_per_resume),
            );
        }
        s.push_str(
            "\nGate CPU from /proc/PID/schedstat: over the ramp ÷ sessions logged in, and from the drop until all \
             were back ÷ sessions back; TCP setup included in both. Logins/s is the ramp's pace: loadgen keeps at \
             most 512 handshakes open.\n\n",
        );
    }
    s
}

/// A table cell: a run's figure `f` (with its marks), its status when it did not run, or "—"
/// when there is no such run.
fn cell(r: Option<&&RunResult>, f: &dyn Fn(&RunResult) -> Option<String>) -> String {
    match r {
        None => "—".to_owned(),
        Some(r) if r.status != RunStatus::Ok => r.status_words().to_owned(),
        Some(r) => format!("{}{}", f(r).unwrap_or_else(|| "?".into()), mark(r)),
    }
}

/// `1234` → `1,234`.
fn num(n: u32) -> String {
    loadgen::report::num(u64::from(n))
}

impl RunResult {
    fn status_words(&self) -> &'static str {
        match self.status {
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Skipped if self.error.as_deref().is_some_and(|e| e.contains("is not installed")) => {
                "not installed"
            }
            RunStatus::Skipped => "skipped",
        }
    }
}

/// `received/sent` as a percentage.
fn received(p: &PushFigures) -> String {
    if p.sent == 0 {
        "—".into()
    } else {
        format!("{:.1} %", p.received as f64 * 100.0 / p.sent as f64)
    }
}

/// Like [`siblings`], failed runs included (the table shows them as failed).
fn siblings_any<'a>(runs: &'a [RunResult], r: &RunSpec) -> BTreeMap<Target, &'a RunResult> {
    runs.iter()
        .filter(|o| {
            o.spec.kind == r.kind
                && o.spec.conns == r.conns
                && o.spec.offered_per_s == r.offered_per_s
                && o.spec.fanout == r.fanout
                && o.spec.batch == r.batch
        })
        .map(|o| (o.spec.target, o))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::plan::runs as plan_runs;
    use crate::bench::runner::read_report;
    use serde_json::json;

    fn report(cpu_s: f64, sent: u64, window: f64) -> Report {
        let mut r = Report { window_s: window, ..Report::default() };
        r.gps.sent = sent;
        r.gps.forwarded = sent;
        r.gps.gate_cpu_us_per_point = Some(cpu_s * 1e6 / sent as f64);
        r.gate.pid = Some(7);
        r.gate.cpu_s = Some(cpu_s);
        r.gate.cpu_percent = Some(cpu_s / window * 100.0);
        r.gate.rss_bytes = Some(2_000_000);
        r.gate.rss_before_bytes = Some(1_000_000);
        r.appserver.running = true;
        r.counters.gps_points = sent;
        r.idle.sessions = 1000;
        r.idle.bytes_per_session = Some(900.0);
        r.storm.dropped = 15000;
        r.storm.back = 15000;
        r.storm.all_back_ms = Some(500.0);
        r.storm.resumed = 15000;
        r
    }

    /// A result from `r`, its JSON kept as loadgen would have printed it.
    fn result(s: &RunSpec, r: &Report, x: &Extras) -> RunResult {
        from_report(s, r, serde_json::to_value(r).expect("json"), x)
    }

    fn extras(share: f64) -> Extras {
        Extras { window_share: Some(share), loadgen_cpu_s: 5.0, loadgen_wall_s: 10.0, ..Extras::default() }
    }

    /// One GPS run per target at 100k/s with the given CPU seconds over a 10 s window.
    fn gps_runs(cpu: [(Target, f64); 5], share: f64) -> Vec<RunResult> {
        let specs = plan_runs(&Profile::full(), &[Kind::Gps], &Target::ALL);
        specs
            .iter()
            .filter(|s| s.offered_per_s == 100_000.0)
            .map(|s| {
                let c = cpu.iter().find(|(t, _)| *t == s.target).map_or(1.0, |(_, c)| *c);
                let mut x = extras(share);
                if s.target == Target::Ceiling {
                    x.ceiling = Some((1_000_000 * 64, 900_000));
                }
                result(s, &report(c, 1_000_000, 10.0), &x)
            })
            .collect()
    }

    #[test]
    fn figures_from_a_report() {
        let rs = gps_runs(
            [
                (Target::Gate, 6.0),
                (Target::Mosquitto, 10.0),
                (Target::Rumqttd, 10.0),
                (Target::NatsServer, 10.0),
                (Target::Ceiling, 5.0),
            ],
            0.5,
        );
        let gate = &rs[0];
        assert_eq!(gate.spec.target, Target::Gate);
        assert!((gate.gps.cpu_us_per_point.expect("cpu") - 6.0).abs() < 1e-9);
        assert_eq!(gate.gps.delivered_per_s, Some(100_000.0));
        assert_eq!(gate.gps.wire_bytes_per_point, 64);
        assert!(!gate.loadgen.bound && gate.quotable());
        let ceiling = rs.iter().find(|r| r.spec.target == Target::Ceiling).expect("ceiling");
        assert_eq!(ceiling.gps.delivered, Some(1_000_000));
        assert!((ceiling.gps.recvs_per_point.expect("recvs") - 0.9).abs() < 1e-9);
    }

    #[test]
    fn ratios_and_the_gps_goal() {
        let met = gps_runs(
            [
                (Target::Gate, 6.0),
                (Target::Mosquitto, 13.0),
                (Target::Rumqttd, 12.5),
                (Target::NatsServer, 12.5),
                (Target::Ceiling, 5.0),
            ],
            0.5,
        );
        let rs = ratios(&met);
        let vs = |t: Target| {
            rs.iter().find(|r| r.versus == t && r.metric == Metric::GpsCpuUsPerPoint).expect("ratio").ratio
        };
        assert!((vs(Target::Ceiling) - 1.2).abs() < 1e-9);
        assert!((vs(Target::NatsServer) - 0.48).abs() < 1e-9);
        assert_eq!(row(&goals(&met, None), Metric::GpsCpuUsPerPoint).status, GoalStatus::Met);

        let missed = gps_runs(
            [
                (Target::Gate, 9.0),
                (Target::Mosquitto, 10.0),
                (Target::Rumqttd, 10.0),
                (Target::NatsServer, 10.0),
                (Target::Ceiling, 5.0),
            ],
            0.5,
        );
        let rows = goals(&missed, None);
        let g = row(&rows, Metric::GpsCpuUsPerPoint);
        assert_eq!(g.status, GoalStatus::NotMet);
        assert!(g.measured.contains("1.80× ceiling"), "{}", g.measured);

        let bound = gps_runs(
            [
                (Target::Gate, 6.0),
                (Target::Mosquitto, 13.0),
                (Target::Rumqttd, 13.0),
                (Target::NatsServer, 13.0),
                (Target::Ceiling, 5.0),
            ],
            0.95,
        );
        assert!(bound.iter().all(|r| r.loadgen.bound));
        assert_eq!(row(&goals(&bound, None), Metric::GpsCpuUsPerPoint).status, GoalStatus::LoadgenBound);
        assert_eq!(row(&goals(&[], None), Metric::GpsCpuUsPerPoint).status, GoalStatus::NotMeasured);
    }

    #[test]
    fn every_design_goal_has_a_row_and_the_unbuilt_say_so() {
        let g = goals(&[], Some(&CodecFigure { ns: 23.6, measured_utc: "x".into() }));
        let names: Vec<&str> = g.iter().map(|g| g.goal.as_str()).collect();
        for want in [
            "GPS ingest, one point",
            "batches of 10",
            "decode + verify",
            "idle authenticated",
            "latency",
            "fan-out",
            "resume rate",
            "storm",
            "resume cost",
            "reconnect storms",
            "node restarts",
            "idle CPU",
        ] {
            assert!(names.iter().any(|n| n.contains(want)), "no goal row for {want}: {names:?}");
        }
        assert_eq!(row(&g, Metric::DecodeNs).status, GoalStatus::Met);
        assert_eq!(row(&g, Metric::ResumeCost).status, GoalStatus::NotMeasured);
        assert_eq!(row(&g, Metric::RestartLoss).status, GoalStatus::NotMeasured);
    }

    /// The row of the goal about `m`.
    fn row(rows: &[GoalRow], m: Metric) -> &GoalRow {
        assert_eq!(rows.len(), GOALS.len(), "one row per goal, in order");
        &rows[GOALS.iter().position(|g| g.metric == m).expect("a goal about it")]
    }

    #[test]
    fn the_fan_out_goal_is_judged_per_cpu_second_even_where_loadgen_is_bound() {
        // One fan-out of 1,000 per target: deliveries/s and server CPU seconds over a 10 s
        // window, loadgen at `share` of its core.
        let runs = |gate: (f64, f64), nats: (f64, f64), share: f64| -> Vec<RunResult> {
            plan_runs(&Profile::full(), &[Kind::Fanout], &[Target::Gate, Target::NatsServer])
                .iter()
                .filter(|s| s.fanout == 1000)
                .map(|s| {
                    let (per_s, cpu_s) = if s.target == Target::Gate { gate } else { nats };
                    let mut r = report(cpu_s, 1, 10.0);
                    r.push.deliveries_per_s = per_s;
                    result(s, &r, &extras(share))
                })
                .collect()
        };
        // Gate: 180k/s at 90 % of a core (200k per CPU-s); nats: 60k/s at 100 % (60k per CPU-s).
        let bound = runs((180_000.0, 9.0), (60_000.0, 10.0), 0.95);
        assert!(bound.iter().all(|r| r.loadgen.bound));
        let rs = ratios(&bound);
        let per_cpu = rs
            .iter()
            .find(|r| r.metric == Metric::FanoutDeliveriesPerCpuS && r.versus == Target::NatsServer)
            .expect("ratio");
        assert!((per_cpu.ratio - 200.0 / 60.0).abs() < 1e-9, "{per_cpu:?}");
        assert!(per_cpu.quotable, "per CPU-second holds with loadgen bound");
        let per_s = rs.iter().find(|r| r.metric == Metric::FanoutDeliveriesPerS).expect("ratio");
        assert!(!per_s.quotable, "deliveries/s with loadgen bound is loadgen's figure");
        let rows = goals(&bound, None);
        let g = row(&rows, Metric::FanoutDeliveriesPerCpuS);
        assert_eq!(g.status, GoalStatus::Met);
        assert!(g.measured.contains("3.33×") && g.measured.contains("per CPU-second"), "{}", g.measured);
        // Half the ratio is not met.
        let slow = runs((90_000.0, 9.0), (60_000.0, 10.0), 0.95);
        assert_eq!(row(&goals(&slow, None), Metric::FanoutDeliveriesPerCpuS).status, GoalStatus::NotMet);
    }

    #[test]
    fn the_push_latency_goal_needs_every_latency_run_within_its_bounds() {
        // The loaded fleet's run and the idle one, gate only: (e2e p99, the gate's part p99).
        let runs = |loaded: (u64, u64), idle: (u64, u64)| -> Vec<RunResult> {
            plan_runs(&Profile::full(), &[Kind::Push], &[Target::Gate])
                .iter()
                .map(|s| {
                    let (p99, gate_p99) = if s.offered_per_s > 0.0 { loaded } else { idle };
                    // GPS sent on time over the 10 s window (the late rule holds).
                    let mut r = report(1.0, ((s.offered_per_s * 10.0) as u64).max(1), 10.0);
                    r.push.latency_us.count = 2000;
                    r.push.latency_us.p99 = p99;
                    r.push.gate_latency_us = Some(loadgen::report::GateLatency {
                        count: 2000,
                        p99: gate_p99,
                        ..Default::default()
                    });
                    result(s, &r, &extras(0.5))
                })
                .collect()
        };
        let status = |rs: &[RunResult]| row(&goals(rs, None), Metric::PushP99Us).status;
        let both = runs((900, 300), (500, 100));
        assert_eq!(both.len(), 2);
        assert_eq!(status(&both), GoalStatus::Met);
        let rows = goals(&both, None);
        let g = row(&rows, Metric::PushP99Us);
        assert!(
            g.measured.contains("15,000 drivers") && g.measured.contains("2,000 drivers"),
            "{}",
            g.measured
        );
        assert_eq!(status(&runs((900, 600), (500, 100))), GoalStatus::NotMet, "the gate's part over 0.5 ms");
        assert_eq!(status(&runs((900, 300), (1500, 100))), GoalStatus::NotMet, "the idle row over 1 ms");
    }

    #[test]
    fn one_goal_per_metric_and_names_read_back() {
        for (i, g) in GOALS.iter().enumerate() {
            assert!(GOALS[i + 1..].iter().all(|o| o.metric != g.metric), "two goals about {:?}", g.metric);
        }
        for m in Metric::ALL {
            assert_eq!(serde_json::to_value(m).expect("json"), json!(m.name()));
            assert_eq!(serde_json::from_value::<Metric>(json!(m.name())).expect("reads"), m);
        }
        let e = serde_json::from_value::<Metric>(json!("server CPU per point")).expect_err("unknown");
        assert!(e.to_string().contains("unknown metric"), "{e}");
    }

    #[test]
    fn storm_idle_and_batch_goals() {
        let p = Profile::full();
        let storm = plan_runs(&p, &[Kind::Storm], &Target::ALL);
        let idle = plan_runs(&p, &[Kind::Idle], &Target::ALL);
        let batch = plan_runs(&p, &[Kind::Batch], &Target::ALL);
        let mut x = extras(0.5);
        x.idle_cpu_percent = Some(0.1);
        let mut runs: Vec<RunResult> =
            storm.iter().chain(&idle).map(|s| result(s, &report(1.5, 1, 10.0), &x)).collect();
        for r in runs.iter_mut().filter(|r| r.spec.target == Target::Mosquitto) {
            r.idle.as_mut().expect("idle").user_bytes_per_session = Some(1100.0);
        }
        runs.push(result(&batch[0], &report(9.8, 9_000_000, 10.0), &extras(0.99)));
        let g = goals(&runs, None);
        let status = |m: Metric| row(&g, m).status;
        assert_eq!(
            status(Metric::StormBackPerS),
            GoalStatus::NotMet,
            "15,000 back in 500 ms is 30k/s, below 50k/s"
        );
        assert_eq!(status(Metric::StormAllBackMs), GoalStatus::Met);
        assert_eq!(status(Metric::IdleUserBytesPerSession), GoalStatus::Met);
        assert_eq!(status(Metric::IdleCpuPercent), GoalStatus::Met);
        assert_eq!(status(Metric::BatchTakenPerS), GoalStatus::NotMet, "gate core 98 % busy below 1M");
        let storm_fig = runs[0].storm.as_ref().expect("storm");
        assert_eq!(storm_fig.back_per_s, Some(30_000.0));
        assert_eq!(storm_fig.cpu_us_per_session, Some(100.0));
    }

    #[test]
    fn the_secure_rows_and_their_goals() {
        let p = Profile::full();
        let many = plan_runs(&p, &[Kind::GpsMany], &Target::ALL);
        let idle = plan_runs(&p, &[Kind::Idle], &Target::ALL);
        let storm = plan_runs(&p, &[Kind::Storm], &Target::ALL);
        let x = extras(0.5);
        let mut runs = Vec::new();
        // 45k points/s over 10 s: the gate 3.0 µs a point, its channel 0.2 µs more; mosquitto
        // 6.0, with TLS 8.0.
        for s in many.iter().filter(|s| s.offered_per_s == 45_000.0) {
            let us = match s.target {
                Target::Gate => 3.0,
                Target::GateSecure => 3.2,
                Target::Mosquitto => 6.0,
                Target::MosquittoTls => 8.0,
                _ => 5.0,
            };
            let mut rep = report(us * 0.45, 450_000, 10.0);
            rep.gps.gate_cpu_us_per_point = Some(us);
            runs.push(result(s, &rep, &x));
        }
        for s in idle.iter().chain(&storm) {
            let mut rep = report(1.5, 1, 10.0);
            if s.target == Target::GateSecure {
                rep.idle.bytes_per_session = Some(750.0);
                rep.handshake.secure = true;
                rep.connections.logins = 15_000;
                rep.connections.ramp_s = 3.0;
                rep.gate.cpu_us_per_handshake = Some(320.0);
                rep.gate.cpu_us_per_resume = Some(150.0);
            }
            runs.push(result(s, &rep, &x));
        }
        let g = goals(&runs, None);
        let channel = row(&g, Metric::ChannelCpuUsPerPoint);
        assert_eq!(channel.status, GoalStatus::Met, "{}", channel.measured);
        assert!(channel.measured.contains("+0.20 µs"), "{}", channel.measured);
        let resume = row(&g, Metric::ResumeCost);
        assert_eq!(resume.status, GoalStatus::Met, "{}", resume.measured);
        assert!(resume.measured.starts_with("0.47×"), "{}", resume.measured);
        let secure_idle = row(&g, Metric::SecureIdleUserBytesPerSession);
        assert_eq!(secure_idle.status, GoalStatus::Met, "{}", secure_idle.measured);
        // The plaintext ratios do not compare the gate with the secure targets.
        assert!(ratios(&runs).iter().all(|r| !r.versus.secure()));
        let st = runs.iter().find_map(|r| r.storm.as_ref().filter(|s| s.secure)).expect("secure storm");
        assert_eq!(st.logins_per_s, Some(5_000.0));

        let b = BenchResults {
            schema: SCHEMA.into(),
            profile: p,
            started_utc: "a".into(),
            finished_utc: "b".into(),
            machine: Machine::default(),
            versions: BTreeMap::new(),
            settings: BTreeMap::new(),
            server_core: 0,
            loadgen_core: 1,
            message_bytes: BTreeMap::new(),
            ratios: ratios(&runs),
            goals: g,
            runs,
            codec: None,
        };
        let t = table(&b);
        assert!(t.contains("**Secure channel**"), "{t}");
        assert!(t.contains("| 15,000 conns @ 45k/s, one point per segment | 3.00 µs | 3.20 µs | +0.20 µs | 6.00 µs | 8.00 µs | +2.00 µs | 0.40× |"), "{t}");
        assert!(t.contains("| gate-secure (handshake + login) | 5k |"), "{t}");
        assert!(t.contains("| 150 µs | 0.47× |"), "{t}");

        // A channel costing more than 0.3 µs a point misses its goal.
        let mut worse = b.runs.clone();
        for r in
            worse.iter_mut().filter(|r| r.spec.target == Target::GateSecure && r.spec.kind == Kind::GpsMany)
        {
            r.gps.cpu_us_per_point = Some(3.5);
        }
        assert_eq!(row(&goals(&worse, None), Metric::ChannelCpuUsPerPoint).status, GoalStatus::NotMet);
    }

    /// A real report: `loadgen gps --gate 127.0.0.1:APP --sidecar 127.0.0.1:SIDECAR --drivers 20
    /// --rate 1 --duration 2 --json` against a debug gate started with `gate --cores 0
    /// --app-listen 127.0.0.1:0 --sidecar-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
    /// --ports-file /tmp/p` (APP and SIDECAR from that file). Made again the same way when
    /// loadgen's report gains a field (last: `loadgen.loops_us_per_send`).
    const REAL_GPS_REPORT: &str = include_str!("../../tests/fixtures/loadgen-gps-report.json");

    #[test]
    fn a_real_loadgen_report_reads_as_typed_figures() {
        let r = read_report(REAL_GPS_REPORT).expect("the fixture reads");
        assert_eq!(r.scenario, loadgen::Scenario::Gps);
        assert!(r.window_s > 1.0 && r.gps.sent > 0 && r.appserver.running, "{r:?}");
        assert!(r.gate.pid.is_some() && r.gate.cpu_s.is_some(), "{:?}", r.gate);
        assert!(r.gps.late <= r.gps.frames && r.gps.behind <= r.gps.late, "{:?}", r.gps);
        assert!(r.loadgen.loops_us_per_send.is_some(), "{:?}", r.loadgen);
        let raw: Value = serde_json::from_str(REAL_GPS_REPORT).expect("json");
        let spec = &plan_runs(&Profile::quick(), &[Kind::Gps], &[Target::Gate])[0];
        let run = from_report(spec, &r, raw.clone(), &extras(0.2));
        assert_eq!(run.gps.sent, r.gps.sent);
        assert_eq!(run.gps.cpu_us_per_point, r.gps.gate_cpu_us_per_point);
        assert_eq!(run.gps.delivered, Some(r.gps.forwarded));
        assert_eq!(run.server.cpu_s, r.gate.cpu_s);
        assert_eq!(run.report, raw, "the report is kept as loadgen printed it");
    }

    #[test]
    fn a_report_with_a_renamed_or_missing_field_does_not_read() {
        let raw: Value = serde_json::from_str(REAL_GPS_REPORT).expect("json");
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut v = raw.clone();
            f(&mut v);
            read_report(&v.to_string()).expect_err("must not read").to_string()
        };
        let rename = |section: &'static str, from: &'static str, to: &'static str| {
            edit(&move |v: &mut Value| {
                let o = v.pointer_mut(section).and_then(Value::as_object_mut).expect("section");
                let x = o.remove(from).expect("field");
                o.insert(to.into(), x);
            })
        };
        let e = rename("/push/latency_us", "p99", "p99_us");
        assert!(e.contains("missing field `p99`"), "{e}");
        // An `Option` figure too: renamed, it is missing, not "not measured".
        let e = rename("/gps", "gate_cpu_us_per_point", "cpu_us_per_point");
        assert!(e.contains("missing field `gate_cpu_us_per_point`"), "{e}");
        let e = rename("/gps", "late", "late_sends");
        assert!(e.contains("missing field `late`"), "{e}");
        let e = edit(&|v: &mut Value| {
            v["gate"].as_object_mut().expect("gate").remove("cpu_s");
        });
        assert!(e.contains("missing field `cpu_s`") && e.contains("same sources"), "{e}");
        let e = edit(&|v: &mut Value| v["gps"]["sent"] = Value::from("41"));
        assert!(e.contains("invalid type"), "{e}");
    }

    /// A quick bench's results of `runs`, with their ratios and goals.
    fn bench(runs: Vec<RunResult>) -> BenchResults {
        BenchResults {
            schema: SCHEMA.into(),
            profile: Profile::quick(),
            started_utc: "2026-01-01T00:00:00Z".into(),
            finished_utc: "2026-01-01T00:01:00Z".into(),
            machine: Machine::default(),
            versions: BTreeMap::new(),
            settings: BTreeMap::new(),
            server_core: 0,
            loadgen_core: 1,
            message_bytes: BTreeMap::new(),
            ratios: ratios(&runs),
            goals: goals(&runs, None),
            runs,
            codec: None,
        }
    }

    #[test]
    fn results_keep_the_paths_readers_use() {
        let p = Profile::quick();
        let gps = &plan_runs(&p, &[Kind::Gps], &[Target::Gate])[0];
        let idle = &plan_runs(&p, &[Kind::Idle], &[Target::Gate])[0];
        let runs = vec![
            result(gps, &report(1.0, 100_000, 10.0), &extras(0.5)),
            result(idle, &report(0.1, 1, 10.0), &extras(0.95)),
        ];
        let b = bench(runs);
        let v = serde_json::to_value(&b).expect("json");
        for (run, path, want) in [
            (0, "/status", json!("ok")),
            (0, "/spec/kind", json!("gps")),
            (0, "/spec/target", json!("gate")),
            (0, "/spec/conns", json!(1000)),
            (0, "/spec/offered_per_s", json!(25_000.0)),
            (0, "/gps/sent", json!(100_000)),
            (0, "/gps/behind", json!(0)),
            (0, "/gps/late", json!(0)),
            (0, "/gps/cpu_us_per_point", json!(10.0)),
            (0, "/loadgen/bound", json!(false)),
            (1, "/spec/kind", json!("idle")),
            (1, "/idle/user_bytes_per_session", json!(900.0)),
            (1, "/loadgen/bound", json!(true)),
        ] {
            let at = format!("/runs/{run}{path}");
            assert_eq!(v.pointer(&at), Some(&want), "{at}");
        }
    }

    #[test]
    fn stored_results_still_read_back() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .expect("perf/results")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert!(!files.is_empty(), "no results in {}", dir.display());
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read");
            let b: BenchResults =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(!b.runs.is_empty(), "{}", f.display());
        }
    }

    #[test]
    fn results_serialise_with_the_documented_keys_and_tables_render() {
        let rs = gps_runs(
            [
                (Target::Gate, 6.0),
                (Target::Mosquitto, 13.0),
                (Target::Rumqttd, 12.5),
                (Target::NatsServer, 12.5),
                (Target::Ceiling, 5.0),
            ],
            0.5,
        );
        let b = bench(rs);
        let v = serde_json::to_value(&b).expect("json");
        for path in [
            "/schema",
            "/machine/cores",
            "/machine/kernel",
            "/started_utc",
            "/runs/0/spec/kind",
            "/runs/0/spec/target",
            "/runs/0/spec/offered_per_s",
            "/runs/0/gps/cpu_us_per_point",
            "/runs/0/gps/delivered_per_s",
            "/runs/0/gps/wire_bytes_per_point",
            "/runs/0/server/cpu_s",
            "/runs/0/loadgen/core_share",
            "/runs/0/loadgen/bound",
            "/ratios/0/ratio",
            "/goals/0/status",
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
        assert_eq!(v.pointer("/runs/0/spec/target"), Some(&json!("gate")));
        assert_eq!(v.pointer("/goals/0/status"), Some(&json!("met")));
        let back: BenchResults = serde_json::from_value(v).expect("reads back");
        assert_eq!(back, b);
        let t = table(&b);
        assert!(t.contains("| 1,000 | 100k | 6.00 µs · 100k |"), "{t}");
        assert!(t.contains("| 1.20× | 0.46× | 0.48× | 0.48× |"), "{t}");
        assert!(t.contains("DESIGN goals"), "{t}");
    }

    /// The gate's GPS run at 100k/s over 10 s (1,000,000 points sent), `late` sends over 10 ms
    /// late and `delivered` points delivered.
    fn gps_run(late: u64, delivered: u64, share: f64) -> RunResult {
        let spec = plan_runs(&Profile::full(), &[Kind::Gps], &[Target::Gate])
            .into_iter()
            .find(|s| s.offered_per_s == 100_000.0)
            .expect("a 100k/s run");
        let mut r = report(6.0, 1_000_000, 10.0);
        r.gps.late = late;
        r.gps.forwarded = delivered;
        result(&spec, &r, &extras(share))
    }

    #[test]
    fn the_late_rule() {
        // 1 % late is within the rule; past it, or under 99 % delivered, the run is late.
        let ok = gps_run(10_000, 1_000_000, 0.5);
        assert!(!ok.late && ok.quotable() && ok.not_quoted().is_none(), "{:?}", ok.gps);
        assert_eq!(ok.gps.late, 10_000);
        assert_eq!(ok.gps.delivered_of_offered, Some(1.0));
        let late = gps_run(10_001, 1_000_000, 0.5);
        assert!(late.late && !late.quotable(), "{:?}", late.gps);
        assert_eq!(late.not_quoted(), Some(NotQuoted::Late));
        let short = gps_run(0, 989_999, 0.5);
        assert!(short.late && !short.quotable(), "{:?}", short.gps);
        assert!(!gps_run(0, 990_000, 0.5).late, "99 % delivered is enough");
        // Sent short of the offer is short too, even when all of it arrives.
        let p = Profile::full();
        let spec = plan_runs(&p, &[Kind::Gps], &[Target::Gate])[0].clone();
        let under = result(&spec, &report(1.0, spec.offered_per_s as u64 * 9, 10.0), &extras(0.5));
        assert!(under.late, "90 % of the offer sent: {:?}", under.gps);
        // loadgen-bound explains lateness: that is the reason given.
        let both = gps_run(50_000, 900_000, 0.95);
        assert!(both.late && both.loadgen.bound);
        assert_eq!(both.not_quoted(), Some(NotQuoted::LoadgenBound));

        // Runs with no GPS offered, and the batch run (offered past the gate's core on
        // purpose), are not judged by it.
        let idle = &plan_runs(&p, &[Kind::Idle], &[Target::Gate])[0];
        assert!(!result(idle, &report(0.1, 1, 10.0), &extras(0.5)).late);
        let batch = &plan_runs(&p, &[Kind::Batch], &[Target::Gate])[0];
        let mut r = report(9.0, 9_000_000, 10.0);
        r.gps.late = 900_000;
        assert!(!result(batch, &r, &extras(0.5)).late);
        // The push runs' GPS is judged: late GPS means late pushes too.
        let push = &plan_runs(&p, &[Kind::Push], &[Target::Gate])[0];
        let sent = (push.offered_per_s * 10.0) as u64;
        let mut r = report(3.0, sent, 10.0);
        r.gps.late = sent / 50;
        let push_run = result(push, &r, &extras(0.5));
        assert!(push_run.late);

        // Marked in the tables, with the legend; kept in the JSON.
        let b = bench(vec![late.clone()]);
        let t = table(&b);
        assert!(t.contains("6.00 µs · 100k §"), "{t}");
        assert!(t.contains("§ late: more than 1 % of the GPS points"), "{t}");
        let v = serde_json::to_value(&b).expect("json");
        assert_eq!(v.pointer("/runs/0/late"), Some(&json!(true)));
        assert_eq!(v.pointer("/runs/0/gps/late"), Some(&json!(10_001)));
        let back: BenchResults = serde_json::from_value(v).expect("reads back");
        assert_eq!(back, b);
        assert_eq!(mark(&both), " ‡§");
    }

    #[test]
    fn goals_give_no_verdict_on_late_runs() {
        // Every target's GPS run meets the goal's ratios, but the gate's run is late.
        let mut rs = gps_runs(
            [
                (Target::Gate, 6.0),
                (Target::Mosquitto, 13.0),
                (Target::Rumqttd, 13.0),
                (Target::NatsServer, 13.0),
                (Target::Ceiling, 5.0),
            ],
            0.5,
        );
        assert_eq!(row(&goals(&rs, None), Metric::GpsCpuUsPerPoint).status, GoalStatus::Met);
        rs[0].late = true;
        let rows = goals(&rs, None);
        let g = row(&rows, Metric::GpsCpuUsPerPoint);
        assert_eq!(g.status, GoalStatus::Late, "{}", g.measured);
        assert!(g.measured.contains("(late)"), "{}", g.measured);
        assert_eq!(g.status.words(), "no verdict (late traffic)");
        assert!(ratios(&rs).iter().all(|x| !x.quotable && x.not_quoted == Some(NotQuoted::Late)));
        // A peer's late run takes the verdict away from that row too.
        rs[0].late = false;
        rs.iter_mut().find(|r| r.spec.target == Target::Rumqttd).expect("rumqttd").late = true;
        assert_eq!(row(&goals(&rs, None), Metric::GpsCpuUsPerPoint).status, GoalStatus::Late);
        // Loadgen-bound rows keep their own verdict.
        rs[0].loadgen.bound = true;
        assert_eq!(row(&goals(&rs, None), Metric::GpsCpuUsPerPoint).status, GoalStatus::LoadgenBound);

        // Push latency: a late gate run has no verdict either.
        let push = &plan_runs(&Profile::full(), &[Kind::Push], &[Target::Gate])[0];
        let mut r = report(3.0, 300_000, 10.0);
        r.push.latency_us.count = 1000;
        r.push.latency_us.p99 = 500;
        let mut run = result(push, &r, &extras(0.5));
        assert!(!run.late);
        assert_eq!(run.push.as_ref().map(|p| p.gate_p99_us), Some(None), "no gate scrape, no gate figure");
        r.push.gate_latency_us =
            Some(loadgen::report::GateLatency { count: 1000, p50: 120, p99: 340, p999: 900 });
        let scraped = result(push, &r, &extras(0.5));
        assert_eq!(
            scraped.push.as_ref().map(|p| (p.gate_p50_us, p.gate_p99_us)),
            Some((Some(120), Some(340)))
        );
        assert_eq!(row(&goals(std::slice::from_ref(&run), None), Metric::PushP99Us).status, GoalStatus::Met);
        run.late = true;
        assert_eq!(row(&goals(&[run], None), Metric::PushP99Us).status, GoalStatus::Late);
    }

    #[test]
    fn ratios_from_results_before_the_late_rule_read_as_loadgen_bound() {
        let v = json!({"label": "x", "metric": "server CPU µs per point", "versus": "nats-server",
            "gate": 1.0, "other": 2.0, "ratio": 0.5, "quotable": false});
        let x: Ratio = serde_json::from_value(v).expect("an old ratio reads");
        assert_eq!((x.not_quoted, unquoted_why(&x)), (None, Some(NotQuoted::LoadgenBound)));
    }

    #[test]
    fn idle_slopes_between_two_sizes() {
        let p = Profile::full();
        let idle = plan_runs(&p, &[Kind::Idle], &[Target::Gate, Target::Rumqttd]);
        let mut runs: Vec<RunResult> = idle
            .iter()
            .map(|s| {
                let n = u64::from(s.conns);
                // 4 MB up front at either size, then 1,000 B (gate) or 3,000 B (rumqttd) each.
                let each = if s.target == Target::Gate { 1000 } else { 3000 };
                let mut r = report(0.1, 1, 30.0);
                r.idle.sessions = n;
                r.gate.rss_before_bytes = Some(10_000_000);
                r.gate.rss_bytes = Some(10_000_000 + 4_000_000 + each * n);
                r.idle.bytes_per_session = Some((4_000_000 + each * n) as f64 / n as f64);
                result(s, &r, &extras(0.3))
            })
            .collect();
        add_idle_slopes(&mut runs);
        let at = |t: Target, n: u32| {
            runs.iter()
                .find(|r| r.spec.target == t && r.spec.conns == n)
                .and_then(|r| r.idle.clone())
                .expect("idle run")
        };
        let (small, large) = (at(Target::Gate, 9_250), at(Target::Gate, 18_500));
        assert_eq!((small.user_bytes_slope, small.slope_from_sessions), (None, None));
        assert!((large.user_bytes_slope.expect("slope") - 1000.0).abs() < 1e-6, "{large:?}");
        assert_eq!(large.slope_from_sessions, Some(9_250));
        assert!(large.user_bytes_per_session.expect("average") > 1200.0, "the average carries the 4 MB");
        let r = at(Target::Rumqttd, 18_500);
        assert!((r.user_bytes_slope.expect("slope") - 3000.0).abs() < 1e-6, "{r:?}");

        let b = bench(runs.clone());
        let t = table(&b);
        assert!(t.contains("| 1000 (9,250 → 18,500) |"), "{t}");
        assert!(t.contains("| 3000 (9,250 → 18,500) |"), "{t}");
        let g = row(&b.goals, Metric::IdleUserBytesPerSession);
        assert!(g.measured.contains("at 18,500 sessions (slope 1000 B)"), "{}", g.measured);
        assert!(g.measured.contains("rumqttd 3216 B (slope 3000 B)"), "{}", g.measured);
        let v = serde_json::to_value(&b).expect("json");
        let larger = b.runs.iter().position(|r| r.spec.conns == 18_500).expect("larger");
        assert_eq!(v.pointer(&format!("/runs/{larger}/idle/user_bytes_slope")), Some(&json!(1000.0)));

        // One size: no slope.
        let mut one = vec![runs[0].clone()];
        add_idle_slopes(&mut one);
        assert_eq!(one[0].idle.as_ref().and_then(|i| i.user_bytes_slope), None);
    }

    #[test]
    fn a_peer_not_installed_says_so() {
        let spec = &plan_runs(&Profile::quick(), &[Kind::Gps], &[Target::Rumqttd])[0];
        let r = RunResult::not_run(
            spec,
            RunStatus::Skipped,
            "rumqttd is not installed (cargo install rumqttd --version 0.20.0 --locked)".into(),
        );
        let t = table(&bench(vec![r.clone()]));
        assert!(t.contains("| not installed |"), "{t}");
        assert!(t.contains("(rumqttd): not installed rumqttd is not installed"), "{t}");
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(v.pointer("/status"), Some(&json!("skipped")), "the status keeps its values");
    }
}
