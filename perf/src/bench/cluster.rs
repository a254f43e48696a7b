//! `bench-cluster`: two gate nodes sharing one Redis (cluster mode, docs/PROTOCOL.md §15), by
//! default 15,000 sessions on each: more than one process may hold here (20,000 open files),
//! so two loadgen processes carry them, each spreading its apps over both nodes (`--gate A,B`
//! and `--gate B,A`, uids apart).
//!
//! Three phases against the same Redis and nodes:
//! - **login**: both `idle` at once: every session logs in once, nothing else happens:
//!   logins/s over both nodes and the Redis operations per login.
//! - **push**: Q `idle` first; once its sessions are up, P runs `push` with its app-server on
//!   node A's sidecar. P's pushes go to its own drivers, half of them on node A (the
//!   app-server's node) and half on node B, so same-node and cross-node latency come from one
//!   run (loadgen's `push.by_node`), and the Redis operations per push are read while nothing
//!   else needs Redis.
//! - **storm**: Q `idle` first again, then P `storm --move`: P's sessions (half of each node's)
//!   are dropped at once and resume on the other node, beside Q's: resumes/s across nodes and
//!   the Redis operations per resume. Resumes/s is loadgen's (from the drop until the last
//!   session is back, reconnecting through the machine included); the nodes' takeovers/s,
//!   from the first to the last they counted, says how much of that the nodes took.
//!
//! Other rates and the operation counts come from the nodes, not from loadgen's clocks: a sampler reads
//! both nodes' `/metrics` and Redis's `INFO commandstats` every [`SAMPLE`], and each figure is a
//! delta over the span where only its event happens (the logins rising, the plateau between the
//! last login and the first logout, the sessions moving). Node commands are what the nodes
//! sent Redis (`fleetgate_cluster_redis_commands_total`: claims, moves, releases, lookups and
//! the node-to-node publishes; lease upkeep apart); Redis-side are the commands Redis ran
//! (`INFO commandstats`: the inner commands of the directory's scripts and the lease upkeep
//! included, the sampler's `INFO` left out), with the scripts and publishes among them apart.

use super::machine::{self, Machine};
use super::plan::Target;
use super::runner;
use super::servers::{pinned, which, Bins, Server};
use loadgen::report::{num, Latency};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the results file says it is.
pub const SCHEMA: &str = "fleetgate-bench-cluster/1";
/// The sampler's period.
pub const SAMPLE: Duration = Duration::from_millis(50);
/// Most samples a phase keeps (an hour at [`SAMPLE`]); a phase is a minute or two.
const MAX_SAMPLES: usize = 72_000;
/// Longest Redis and the nodes may take to come up and see each other.
const START_PATIENCE: Duration = Duration::from_secs(20);
/// Longest one answer (a `/metrics` page, an `INFO`) may take.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the storm's sessions have to come back before P's window ends (on this machine a storm
/// of 15,000 beside 15,000 held sessions took 1 to 8 s).
const STORM_ROOM: Duration = Duration::from_secs(20);
/// First uid of each loadgen process: far enough apart for any allowed fleet (19,500 apps).
const UID_BASES: [u64; 2] = [1_000_000, 2_000_000];

/// What one cluster bench does.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sessions on each node (each loadgen process carries this many, half on each node).
    pub sessions_per_node: u32,
    /// Measured window of each loadgen run, s.
    pub window_s: f64,
    /// Pushes per second of the push phase.
    pub push_rate: f64,
    /// Drivers each push names.
    pub fanout: u32,
    /// GPS points per second per driver of the pushing process (the others send none).
    pub gps_rate: f64,
    /// Apps speak the secure channel (else plaintext, as the reactor rows).
    pub secure: bool,
    /// The core of Redis and both nodes.
    pub server_core: usize,
    /// The core of both loadgen processes.
    pub loadgen_core: usize,
    /// The binaries.
    pub bins: Bins,
    /// Where the JSON and the table go.
    pub out_dir: PathBuf,
    /// Scratch space for logs.
    pub work_dir: PathBuf,
}

/// The nodes' and Redis's counters at one moment (both nodes summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the phase started.
    pub t: f64,
    /// `fleetgate_logins_total`.
    pub logins: f64,
    /// `fleetgate_directory_sessions`.
    pub sessions: f64,
    /// `fleetgate_cluster_sessions_moved_in_total`: sessions taken over from another node.
    pub moved_in: f64,
    /// `fleetgate_pushes_total`.
    pub pushes: f64,
    /// `fleetgate_push_targets_total`.
    pub targets: f64,
    /// `fleetgate_cluster_forwarded_targets_total`: targets sent to another node.
    pub forwarded: f64,
    /// `fleetgate_cluster_redis_commands_total`: the commands the nodes sent Redis (lease
    /// upkeep apart).
    pub ops: f64,
    /// Commands Redis ran (a script's inner commands included; `INFO` left out).
    pub redis_calls: f64,
    /// Of those, scripts run (`EVALSHA`, `EVAL`).
    pub scripts: f64,
    /// Of those, messages published (`SPUBLISH`, `PUBLISH`).
    pub publishes: f64,
}

/// Operations per event over a span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PerEvent {
    /// Events in the span.
    pub events: u64,
    /// Span, s.
    pub span_s: f64,
    /// Events per second over the span.
    pub per_s: f64,
    /// Commands the nodes sent Redis per event.
    pub gate_ops: f64,
    /// Commands Redis ran per event (a script's inner commands and the upkeep included).
    pub redis_calls: f64,
    /// Scripts Redis ran per event.
    pub scripts: f64,
    /// Messages published per event.
    pub publishes: f64,
}

/// The figures of one cluster bench.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Logins over both nodes in the login phase.
    pub login: Option<PerEvent>,
    /// Pushes accepted (on node A) over the push phase's plateau.
    pub push: Option<PerEvent>,
    /// Push targets over the same plateau.
    pub push_targets: u64,
    /// Of those, targets forwarded to node B.
    pub cross_node_targets: u64,
    /// Node commands per cross-node target (the lookups and publishes are for those).
    pub gate_ops_per_cross_node_target: Option<f64>,
    /// App-server → driver, drivers on node A (the app-server's node).
    pub same_node_push_us: Latency,
    /// App-server → driver, drivers on node B.
    pub cross_node_push_us: Latency,
    /// Sessions taken over from the other node in the storm phase, from the first to the last
    /// the nodes counted.
    pub resume: Option<PerEvent>,
    /// Storm → the last session back, by loadgen's clock (connecting through a busy machine
    /// included), ms.
    pub storm_all_back_ms: Option<f64>,
    /// Sessions back by resume on the other node per second, over `storm_all_back_ms`.
    pub storm_moved_per_s: Option<f64>,
    /// The storm's sessions (both loadgens): dropped, back, back by resume on the other node.
    pub storm_dropped: u64,
    /// See `storm_dropped`.
    pub storm_back: u64,
    /// See `storm_dropped`.
    pub storm_moved: u64,
    /// Pushes lost and shown twice over every run (loadgen's audit).
    pub lost: u64,
    /// See `lost`.
    pub duplicates: u64,
}

/// One loadgen process of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// `login`, `push` or `storm`.
    pub phase: String,
    /// `P` (with the app-server in the push phase) or `Q`.
    pub process: String,
    /// Its command line after `loadgen`.
    pub args: Vec<String>,
    /// Exit status.
    pub exit_code: i32,
    /// Its JSON report.
    pub report: serde_json::Value,
}

/// Everything a cluster bench wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// [`SCHEMA`].
    pub schema: String,
    /// When it started and ended.
    pub started_utc: String,
    /// See `started_utc`.
    pub finished_utc: String,
    /// Where.
    pub machine: Machine,
    /// Sessions on each node.
    pub sessions_per_node: u32,
    /// Apps on the secure channel.
    pub secure: bool,
    /// The core of Redis and both nodes.
    pub server_core: usize,
    /// The core of both loadgen processes.
    pub loadgen_core: usize,
    /// How Redis and the nodes were started.
    pub servers: BTreeMap<String, String>,
    /// The figures.
    pub figures: Figures,
    /// Every loadgen run.
    pub runs: Vec<Run>,
    /// Every phase's samples: written apart, to `<UTC>-cluster-samples.json` (one line), since
    /// they are most of the bytes and the figures above are what is read.
    #[serde(skip)]
    pub samples: BTreeMap<String, Vec<Sample>>,
}

// ---- Redis ----

/// A `redis-server` pinned to the server core, on a free loopback port, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(core: usize, dir: &Path) -> Result<Redis, String> {
        let program =
            which("redis-server").ok_or("redis-server is not installed (apt-get install -y redis-server)")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let log = std::fs::File::create(dir.join("redis.log")).map_err(|e| format!("redis log: {e}"))?;
        let child = pinned(&program, core)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let redis = Redis { child, port };
        let deadline = Instant::now() + START_PATIENCE;
        while resp_command(port, &["PING"]).as_deref() != Ok("PONG") {
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {port} did not answer PING"));
            }
            std::thread::sleep(SAMPLE);
        }
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one command to the Redis on `port` and returns its simple or bulk string answer.
fn resp_command(port: u16, args: &[&str]) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), IO_TIMEOUT)
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n{a}\r\n", a.len());
    }
    s.write_all(out.as_bytes()).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end();
    match line.split_at_checked(1) {
        Some(("+", rest)) => Ok(rest.to_owned()),
        Some(("$", len)) => {
            let len: usize = len.parse().map_err(|_| format!("bad bulk length {len:?}"))?;
            // An INFO answer is a few KiB; anything near this is not Redis.
            if len > 1 << 20 {
                return Err(format!("bulk of {len} bytes"));
            }
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(len);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        _ => Err(format!("unexpected answer {line:?}")),
    }
}

/// Calls by command in an `INFO commandstats` answer.
pub fn commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| l.trim_end().strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, stats) = l.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse::<u64>().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// `Sample`'s Redis fields from an `INFO commandstats` answer.
fn redis_counts(s: &mut Sample, text: &str) {
    let calls = commandstats(text);
    let sum = |names: &[&str]| names.iter().filter_map(|n| calls.get(*n)).sum::<u64>() as f64;
    // The sampler's own INFO is not the cluster's work.
    s.redis_calls = calls.iter().filter(|(n, _)| n.as_str() != "info").map(|(_, c)| c).sum::<u64>() as f64;
    s.scripts = sum(&["evalsha", "eval"]);
    s.publishes = sum(&["spublish", "publish"]);
}

// ---- the nodes ----

/// GET `path` on a gate's admin port: the body of a 200 answer.
fn http_get(admin: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&admin, IO_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.take(8 << 20).read_to_string(&mut resp).map_err(|e| e.to_string())?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(format!("bad admin answer from {admin}")),
    }
}

/// The sum of every sample of metric `name` (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let n = series.split_once('{').map_or(series, |(n, _)| n);
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// One sample: both nodes' counters and Redis's.
fn sample(admins: &[SocketAddr], redis_port: u16, t: f64) -> Result<Sample, String> {
    let mut s = Sample { t, ..Sample::default() };
    for &a in admins {
        let m = http_get(a, "/metrics")?;
        s.logins += metric_sum(&m, "fleetgate_logins_total");
        s.sessions += metric_sum(&m, "fleetgate_directory_sessions");
        s.moved_in += metric_sum(&m, "fleetgate_cluster_sessions_moved_in_total");
        s.pushes += metric_sum(&m, "fleetgate_pushes_total");
        s.targets += metric_sum(&m, "fleetgate_push_targets_total");
        s.forwarded += metric_sum(&m, "fleetgate_cluster_forwarded_targets_total");
        s.ops += metric_sum(&m, "fleetgate_cluster_redis_commands_total");
    }
    redis_counts(&mut s, &resp_command(redis_port, &["INFO", "commandstats"])?);
    Ok(s)
}

/// Samples every [`SAMPLE`] until `done`, keeping the latest logins count in `logins`; a
/// sample that fails (a node busy past the timeout) is skipped.
fn sampler(
    admins: Vec<SocketAddr>,
    redis_port: u16,
    done: Arc<AtomicBool>,
    logins: Arc<AtomicU64>,
) -> Vec<Sample> {
    let start = Instant::now();
    let mut out = Vec::new();
    while !done.load(Relaxed) && out.len() < MAX_SAMPLES {
        let next = Instant::now() + SAMPLE;
        if let Ok(s) = sample(&admins, redis_port, start.elapsed().as_secs_f64()) {
            logins.store(s.logins as u64, Relaxed);
            out.push(s);
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    out
}

// ---- spans ----

/// Where `f` rises: from the last sample before it first grows to the first sample at its
/// final value; `None` when it never grows.
pub fn rise(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Option<(usize, usize)> {
    let first = f(samples.first()?);
    let last = f(samples.last()?);
    if last <= first {
        return None;
    }
    let a = samples.iter().position(|s| f(s) > first)?.saturating_sub(1);
    let b = samples.iter().position(|s| f(s) >= last)?;
    Some((a, b))
}

/// From sample `from`, the last sample before the sessions first fall below their level at
/// `from` (the first logout), or the last sample.
pub fn plateau_end(samples: &[Sample], from: usize) -> usize {
    let level = samples[from].sessions;
    samples[from..].iter().position(|s| s.sessions < level).map_or(samples.len() - 1, |i| from + i - 1)
}

/// `events(b) - events(a)` and the operations per event between samples `a` and `b`.
pub fn per_event(
    samples: &[Sample],
    a: usize,
    b: usize,
    events: impl Fn(&Sample) -> f64,
) -> Option<PerEvent> {
    let (sa, sb) = (samples.get(a)?, samples.get(b)?);
    let n = events(sb) - events(sa);
    let span = sb.t - sa.t;
    if n <= 0.0 || span <= 0.0 {
        return None;
    }
    Some(PerEvent {
        events: n as u64,
        span_s: span,
        per_s: n / span,
        gate_ops: (sb.ops - sa.ops) / n,
        redis_calls: (sb.redis_calls - sa.redis_calls) / n,
        scripts: (sb.scripts - sa.scripts) / n,
        publishes: (sb.publishes - sa.publishes) / n,
    })
}

// ---- the bench ----

/// The two loadgen processes of a phase: `(name, subcommand and its own flags)`.
type Pair<'a> = [(&'a str, Vec<String>); 2];

/// Runs the three phases and writes `<UTC>-cluster.json`, `<UTC>-cluster-samples.json` and
/// `<UTC>-cluster.md` into `cfg.out_dir`.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<(Results, PathBuf), String> {
    if cfg.sessions_per_node < 2 || cfg.sessions_per_node > super::plan::MAX_CONNS {
        return Err(format!("sessions per node must be 2..={}", super::plan::MAX_CONNS));
    }
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| format!("{}: {e}", cfg.work_dir.display()))?;
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| format!("{}: {e}", cfg.out_dir.display()))?;
    let started = machine::now_s();
    let mut machine_info = Machine::read();
    let redis = Redis::start(cfg.server_core, &cfg.work_dir)?;
    let target = if cfg.secure { Target::GateSecure } else { Target::Gate };
    let node = |name: &str| {
        let extra = ["--redis", &redis.url(), "--node-name", name].map(str::to_owned);
        Server::start_with(target, &cfg.bins, cfg.server_core, &cfg.work_dir.join(name), false, &extra)
    };
    let (a, b) = (node("node-a")?, node("node-b")?);
    let admins: Vec<SocketAddr> = [&a, &b].iter().filter_map(|s| s.admin).collect();
    if admins.len() != 2 {
        return Err("a node wrote no admin port".into());
    }
    wait_clustered(&admins)?;
    let sidecar = a.sidecar.ok_or("node a has no sidecar port")?;
    let mut servers = BTreeMap::new();
    servers.insert(
        "redis".to_owned(),
        format!("redis-server --save \"\" --appendonly no (core {})", cfg.server_core),
    );
    servers.insert("node-a".to_owned(), a.settings.clone());
    servers.insert("node-b".to_owned(), b.settings.clone());

    let n = cfg.sessions_per_node;
    let w = format!("{}s", cfg.window_s);
    let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    // Q holds its sessions while P runs: it starts first and outlasts P (P's ramp, about a
    // second per thousand sessions here, its window, and its drain: a push's TTL), so its
    // logouts come after everything P measured. Were P slower, the plateau would end at Q's
    // first logout: a shorter span, the same ratios.
    let q_holds = |p_window: f64| format!("{:.1}s", p_window + 15.0 + f64::from(n) / 1000.0);
    // The storm's window leaves its sessions STORM_ROOM to come back before P logs out, so no
    // logout falls in the span the resumes are read over.
    let storm_window = cfg.window_s + STORM_ROOM.as_secs_f64();
    let phases: [(&str, bool, Pair<'_>); 3] = [
        ("login", false, [("P", own(&["idle", "--duration", &w])), ("Q", own(&["idle", "--duration", &w]))]),
        (
            "push",
            true,
            [
                (
                    "P",
                    own(&[
                        "push",
                        "--duration",
                        &w,
                        "--sidecar",
                        &sidecar.to_string(),
                        "--rate",
                        &cfg.gps_rate.to_string(),
                        "--push-rate",
                        &cfg.push_rate.to_string(),
                        "--fanout",
                        &cfg.fanout.min(n).to_string(),
                    ]),
                ),
                ("Q", own(&["idle", "--duration", &q_holds(cfg.window_s)])),
            ],
        ),
        (
            "storm",
            true,
            [
                ("P", storm_args(cfg, storm_window)),
                ("Q", own(&["idle", "--duration", &q_holds(storm_window)])),
            ],
        ),
    ];
    let mut runs = Vec::new();
    let mut samples = BTreeMap::new();
    for (phase, q_first, pair) in phases {
        if stop.load(Relaxed) {
            break;
        }
        eprintln!("bench-cluster: {phase} phase, {} sessions on each node", num(u64::from(n)));
        let (r, s) = run_phase(cfg, phase, &pair, q_first, [&a, &b], &admins, redis.port, stop)?;
        runs.extend(r);
        samples.insert(phase.to_owned(), s);
    }
    drop((a, b));
    drop(redis);
    machine_info.loadavg_end = machine::loadavg();
    let figures = figures(&runs, &samples);
    let results = Results {
        schema: SCHEMA.into(),
        started_utc: machine::utc_iso(started),
        finished_utc: machine::utc_iso(machine::now_s()),
        machine: machine_info,
        sessions_per_node: n,
        secure: cfg.secure,
        server_core: cfg.server_core,
        loadgen_core: cfg.loadgen_core,
        servers,
        figures,
        runs,
        samples,
    };
    let stamp = machine::utc_stamp(started);
    let json = cfg.out_dir.join(format!("{stamp}-cluster.json"));
    let text = serde_json::to_string_pretty(&results).map_err(|e| format!("cannot write JSON: {e}"))?;
    std::fs::write(&json, text).map_err(|e| format!("cannot write {}: {e}", json.display()))?;
    let raw = cfg.out_dir.join(format!("{stamp}-cluster-samples.json"));
    let text = serde_json::to_string(&results.samples).map_err(|e| format!("cannot write JSON: {e}"))?;
    std::fs::write(&raw, text).map_err(|e| format!("cannot write {}: {e}", raw.display()))?;
    let md = cfg.out_dir.join(format!("{stamp}-cluster.md"));
    std::fs::write(&md, table(&results)).map_err(|e| format!("cannot write {}: {e}", md.display()))?;
    Ok((results, json))
}

/// `storm --move` flags: every session dropped at once a third into the window, no app-server
/// and no pushes, so the span's Redis operations are the resumes'.
fn storm_args(cfg: &Config, window_s: f64) -> Vec<String> {
    let mut a: Vec<String> =
        ["storm", "--move", "--storm-percent", "100", "--no-appserver"].map(str::to_owned).to_vec();
    a.extend(["--duration".to_owned(), format!("{window_s}s")]);
    a.extend(["--storm-at".to_owned(), format!("{}s", (cfg.window_s / 3.0).max(0.5))]);
    a.extend(["--rate".to_owned(), cfg.gps_rate.to_string()]);
    a
}

/// Waits until both nodes say the directory is up and see each other.
fn wait_clustered(admins: &[SocketAddr]) -> Result<(), String> {
    let deadline = Instant::now() + START_PATIENCE;
    for &a in admins {
        loop {
            let h = http_get(a, "/healthz").unwrap_or_default();
            if h.contains("directory: up") && h.contains("2 live nodes") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("node at {a} not clustered: {h}"));
            }
            std::thread::sleep(SAMPLE);
        }
    }
    Ok(())
}

/// One phase: P over nodes A then B, Q over B then A, both at once, or with `q_first` Q
/// first and P once every one of Q's sessions is up (so what P causes is all that happens
/// while P runs); sampled throughout.
#[allow(clippy::too_many_arguments)] // one phase's whole setting, used once
fn run_phase(
    cfg: &Config,
    phase: &str,
    pair: &Pair<'_>,
    q_first: bool,
    nodes: [&Server; 2],
    admins: &[SocketAddr],
    redis_port: u16,
    stop: &AtomicBool,
) -> Result<(Vec<Run>, Vec<Sample>), String> {
    let logins_before = sample(admins, redis_port, 0.0)?.logins;
    let done = Arc::new(AtomicBool::new(false));
    let latest = Arc::new(AtomicU64::new(logins_before as u64));
    let sampling = {
        let (admins, done, latest) = (admins.to_vec(), done.clone(), latest.clone());
        std::thread::spawn(move || sampler(admins, redis_port, done, latest))
    };
    let [a, b] = nodes;
    let n = cfg.sessions_per_node;
    let ramp = Duration::from_secs_f64(f64::from(n) / 250.0 + 30.0);
    let timeout = Duration::from_secs_f64(cfg.window_s + 40.0) + 2 * ramp;
    let outcomes: Vec<Result<Run, String>> = std::thread::scope(|sc| {
        let start = |i: usize| {
            let (name, own) = &pair[i];
            let order = if i == 0 { [a, b] } else { [b, a] };
            let mut args = own.clone();
            args.extend(["--gate".to_owned(), format!("{},{}", order[0].app, order[1].app)]);
            args.extend(["--drivers".to_owned(), n.to_string()]);
            args.extend(["--uid-base".to_owned(), UID_BASES[i].to_string()]);
            args.extend(["--cores".to_owned(), cfg.loadgen_core.to_string()]);
            args.extend(["--gate-pid".to_owned(), order[0].pid.to_string()]);
            if !cfg.secure {
                args.push("--plaintext".to_owned());
            }
            args.extend(["--json".to_owned(), "--quiet".to_owned()]);
            let pid = order[0].pid;
            sc.spawn(move || {
                let lg = runner::run(&cfg.bins.loadgen, &args, cfg.loadgen_core, pid, timeout, stop)?;
                Ok(Run {
                    phase: phase.to_owned(),
                    process: (*name).to_owned(),
                    args,
                    exit_code: lg.exit_code,
                    report: lg.report_json,
                })
            })
        };
        let handles = if q_first {
            let q = start(1);
            let deadline = Instant::now() + ramp;
            // Q's sessions are up when the nodes count them all (loadgen says nothing before
            // its report).
            while (latest.load(Relaxed) as f64) < logins_before + f64::from(n)
                && Instant::now() < deadline
                && !stop.load(Relaxed)
                && !q.is_finished()
            {
                std::thread::sleep(SAMPLE);
            }
            vec![start(0), q]
        } else {
            vec![start(0), start(1)]
        };
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a loadgen thread panicked".into())))
            .collect()
    });
    done.store(true, Relaxed);
    let samples = sampling.join().unwrap_or_default();
    let runs = outcomes
        .into_iter()
        .collect::<Result<Vec<Run>, String>>()
        .map_err(|e| format!("{phase} phase: {e}"))?;
    Ok((runs, samples))
}

/// The figures from the runs and each phase's samples.
pub fn figures(runs: &[Run], samples: &BTreeMap<String, Vec<Sample>>) -> Figures {
    let mut f = Figures::default();
    let report = |phase: &str, process: &str| {
        runs.iter()
            .find(|r| r.phase == phase && r.process == process)
            .and_then(|r| runner::read_report(&r.report.to_string()).ok())
    };
    let none = Vec::new();
    let phase = |p: &str| samples.get(p).unwrap_or(&none);
    let login = phase("login");
    if let Some((a, b)) = rise(login, |s| s.logins) {
        f.login = per_event(login, a, b, |s| s.logins);
    }
    let push = phase("push");
    if let Some((_, up)) = rise(push, |s| s.logins) {
        let end = plateau_end(push, up);
        f.push = per_event(push, up, end, |s| s.pushes);
        if let (Some(sa), Some(sb)) = (push.get(up), push.get(end)) {
            f.push_targets = (sb.targets - sa.targets) as u64;
            f.cross_node_targets = (sb.forwarded - sa.forwarded) as u64;
            f.gate_ops_per_cross_node_target =
                (f.cross_node_targets > 0).then(|| (sb.ops - sa.ops) / f.cross_node_targets as f64);
        }
    }
    if let Some(r) = report("push", "P") {
        // P's --gate is A,B and its app-server is on A: node 0 is the same node, 1 the other.
        let by_node = |i: usize| r.push.by_node.get(i).map(|n| n.latency_us).unwrap_or_default();
        f.same_node_push_us = by_node(0);
        f.cross_node_push_us = by_node(1);
    }
    let storm = phase("storm");
    if let Some((a, b)) = rise(storm, |s| s.moved_in) {
        f.resume = per_event(storm, a, b, |s| s.moved_in);
    }
    for p in ["P", "Q"] {
        if let Some(r) = report("storm", p) {
            f.storm_dropped += r.storm.dropped;
            f.storm_back += r.storm.back;
            f.storm_moved += r.storm.moved;
            if let Some(ms) = r.storm.all_back_ms {
                f.storm_all_back_ms = Some(f.storm_all_back_ms.map_or(ms, |m: f64| m.max(ms)));
            }
        }
    }
    f.storm_moved_per_s =
        f.storm_all_back_ms.filter(|ms| *ms > 0.0).map(|ms| f.storm_moved as f64 * 1000.0 / ms);
    for r in runs.iter().filter_map(|r| runner::read_report(&r.report.to_string()).ok()) {
        f.lost += r.push.lost;
        f.duplicates += r.push.duplicates;
    }
    f
}

/// The results as a markdown table.
pub fn table(r: &Results) -> String {
    let f = &r.figures;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "**Two gate nodes, one Redis** ({}, {} to {}): {} sessions on each node from two loadgen processes, apps {}; \
         Redis and both nodes on core {}, both loadgens on core {} ({} cores, load {} → {}).\n",
        r.schema,
        r.started_utc,
        r.finished_utc,
        num(u64::from(r.sessions_per_node)),
        if r.secure { "on the secure channel" } else { "in plaintext" },
        r.server_core,
        r.loadgen_core,
        r.machine.cores,
        r.machine.loadavg_start.map_or("?".into(), |l| format!("{l:.2}")),
        r.machine.loadavg_end.map_or("?".into(), |l| format!("{l:.2}")),
    );
    let _ = writeln!(s, "| figure | value | over |\n| --- | ---: | --- |");
    let ops = |p: &PerEvent| {
        format!(
            "{:.2} sent by the nodes · {:.2} run by Redis ({:.2} scripts, {:.2} publishes)",
            p.gate_ops, p.redis_calls, p.scripts, p.publishes
        )
    };
    let span = |p: &PerEvent, what: &str| format!("{} {what} in {:.2} s", num(p.events), p.span_s);
    if let Some(p) = &f.login {
        let _ = writeln!(s, "| logins/s, both nodes | {} | {} |", num(p.per_s as u64), span(p, "logins"));
        let _ = writeln!(s, "| Redis per login | {} | the same |", ops(p));
    }
    let lat = |l: &Latency| format!("{} / {} µs", num(l.p50), num(l.p99));
    let _ = writeln!(
        s,
        "| push latency p50 / p99, same node (drivers on the app-server's node) | {} | {} deliveries |",
        lat(&f.same_node_push_us),
        num(f.same_node_push_us.count)
    );
    let _ = writeln!(
        s,
        "| push latency p50 / p99, cross node | {} | {} deliveries, the same run |",
        lat(&f.cross_node_push_us),
        num(f.cross_node_push_us.count)
    );
    if let Some(p) = &f.push {
        let _ = writeln!(
            s,
            "| Redis per push | {} | {} ({} targets, {} to the other node{}) |",
            ops(p),
            span(p, "pushes"),
            num(f.push_targets),
            num(f.cross_node_targets),
            f.gate_ops_per_cross_node_target
                .map_or(String::new(), |o| format!(": {o:.2} node commands each"))
        );
    }
    if let (Some(per_s), Some(ms)) = (f.storm_moved_per_s, f.storm_all_back_ms) {
        let _ = writeln!(
            s,
            "| resumes/s across nodes (storm, --move) | {} | {} back on the other node {:.2} s after the drop (loadgen's clock) |",
            num(per_s as u64),
            num(f.storm_moved),
            ms / 1000.0
        );
    }
    if let Some(p) = &f.resume {
        let _ = writeln!(
            s,
            "| takeovers/s at the nodes | {} | {}, the nodes' count from the first to the last |",
            num(p.per_s as u64),
            span(p, "sessions taken over")
        );
        let _ = writeln!(s, "| Redis per resume | {} | the same |", ops(p));
    }
    let _ = writeln!(
        s,
        "| storm | {} of {} back, {} by resume on the other node | loadgen |",
        num(f.storm_back),
        num(f.storm_dropped),
        num(f.storm_moved)
    );
    let _ = writeln!(s, "| audit | {} lost, {} shown twice | every run |", num(f.lost), num(f.duplicates));
    let _ = writeln!(
        s,
        "\nRates and operations are the nodes' counters (sampled every {} ms) over the span of each \
         event alone: the logins rising, the plateau between the last login and the first logout, \
         the sessions moving. Sent by the nodes: `fleetgate_cluster_redis_commands_total` (claims, \
         moves and releases as scripts, lookups, node-to-node publishes; lease upkeep apart). Run \
         by Redis: `INFO commandstats` (the scripts' inner commands and the lease upkeep included).",
        SAMPLE.as_millis()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: f64, logins: f64, sessions: f64, ops: f64) -> Sample {
        Sample { t, logins, sessions, ops, redis_calls: ops + 1.0, ..Sample::default() }
    }

    #[test]
    fn spans_and_rates() {
        let s = vec![
            at(0.0, 0.0, 0.0, 0.0),
            at(0.1, 0.0, 0.0, 0.0),
            at(0.2, 100.0, 100.0, 100.0),
            at(0.3, 300.0, 300.0, 300.0),
            at(0.4, 400.0, 400.0, 400.0),
            at(0.5, 400.0, 400.0, 410.0),
            at(0.6, 400.0, 350.0, 450.0),
        ];
        assert_eq!(rise(&s, |x| x.logins), Some((1, 4)));
        let p = per_event(&s, 1, 4, |x| x.logins).expect("logins");
        assert_eq!(p.events, 400);
        assert!((p.per_s - 400.0 / 0.3).abs() < 1e-6 && (p.gate_ops - 1.0).abs() < 1e-9, "{p:?}");
        assert_eq!(plateau_end(&s, 4), 5, "the sample before the first logout");
        assert_eq!(plateau_end(&s[..6], 4), 5, "no logout: the last sample");
        assert_eq!(rise(&s[..2], |x| x.logins), None, "nothing rose");
        assert_eq!(per_event(&s, 4, 5, |x| x.logins), None, "no event");
    }

    #[test]
    fn counters_parse() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=30000,usec=1,usec_per_call=0.1,rejected_calls=0,failed_calls=0\r\n\
                    cmdstat_info:calls=7,usec=1\r\ncmdstat_spublish:calls=12,usec=3\r\ncmdstat_hset:calls=30000,usec=2\r\n";
        let mut s = Sample::default();
        redis_counts(&mut s, info);
        assert_eq!((s.redis_calls, s.scripts, s.publishes), (60_012.0, 30_000.0, 12.0));
        let m = "# HELP fleetgate_logins_total x\nfleetgate_logins_total{shard=\"0\"} 10\n\
                 fleetgate_logins_total{shard=\"1\"} 5\nfleetgate_logins_total_other 99\n\
                 fleetgate_cluster_redis_commands_total 42\n";
        assert_eq!(metric_sum(m, "fleetgate_logins_total"), 15.0);
        assert_eq!(metric_sum(m, "fleetgate_cluster_redis_commands_total"), 42.0);
        assert_eq!(metric_sum(m, "missing"), 0.0);
    }
}
