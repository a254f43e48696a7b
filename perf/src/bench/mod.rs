//! `bench`: one command that measures fleetgate, its peers (mosquitto, rumqttd, nats-server)
//! and the machine's ceiling on the same traffic, in one run, and writes the results.
//!
//! Each run starts its server afresh, pinned to the server core, on free loopback ports
//! ([`servers`]); runs the loadgen binary pinned to the other core with the run's flags
//! ([`plan`], [`runner`]); reads what loadgen cannot see itself (its own CPU in the window, the
//! kernel's socket memory, the ceiling's counters, the server's CPU with no connection); stops
//! the server; and turns it all into a [`results::RunResult`]. At the end come the ratios, the
//! DESIGN goals beside their figures, the JSON in `perf/results/<UTC>.json`, the tables and
//! the SVG plots ([`plots`]).
//!
//! Bounds: every server start, loadgen run and server stop has a deadline; a run that fails is
//! tried once more (the machine is shared: a stray signal or a port taken between free-port and
//! bind must not lose a figure); the whole bench has a time budget past which runs are skipped,
//! and SIGINT/SIGTERM skip the rest and still write what was measured.

pub mod cluster;
pub mod machine;
pub mod placement;
pub mod plan;
pub mod plots;
pub mod results;
pub mod runner;
pub mod servers;

use machine::{KernelMem, Machine};
use plan::{Kind, Profile, RunSpec, Target};
use results::{BenchResults, CodecFigure, Extras, RunResult, RunStatus};
use servers::{Bins, Server};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Tries per run (the first failure is retried once).
const TRIES: usize = 2;

/// What one bench does.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sizes.
    pub profile: Profile,
    /// Scenarios to run.
    pub kinds: Vec<Kind>,
    /// Targets to run them against.
    pub targets: Vec<Target>,
    /// Where the JSON, tables and plots go.
    pub out_dir: PathBuf,
    /// Scratch space for server configs, logs and histograms.
    pub work_dir: PathBuf,
    /// The binaries.
    pub bins: Bins,
    /// The servers' core.
    pub server_core: usize,
    /// loadgen's core.
    pub loadgen_core: usize,
    /// Past this, remaining runs are skipped.
    pub budget: Duration,
    /// Draw the plots.
    pub plots: bool,
    /// The source tree (for its revision and criterion's files).
    pub root: PathBuf,
}

/// What a bench wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The results.
    pub results: BenchResults,
    /// The JSON file.
    pub json: PathBuf,
    /// The tables, as markdown.
    pub markdown: PathBuf,
    /// The plots.
    pub plots: Vec<PathBuf>,
}

/// Rough wall time of a run, for the budget: window, ramp, start and stop.
fn estimate(spec: &RunSpec, profile: &Profile) -> Duration {
    let idle = if spec.kind == Kind::Idle { profile.idle_cpu_s } else { 0.0 };
    Duration::from_secs_f64(spec.window_s + f64::from(spec.conns) / 4000.0 + idle + 3.0)
}

/// Runs the bench and writes its results.
pub fn run(cfg: &Config, stop: &AtomicBool) -> Result<Written, String> {
    std::fs::create_dir_all(&cfg.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", cfg.out_dir.display()))?;
    let started = machine::now_s();
    let clock = Instant::now();
    let mut machine_info = Machine::read();
    let versions = versions(cfg);
    let specs = plan::runs(&cfg.profile, &cfg.kinds, &cfg.targets);
    eprintln!(
        "bench: {} runs ({} profile), servers on core {}, loadgen on core {}; budget {:?}",
        specs.len(),
        cfg.profile.name,
        cfg.server_core,
        cfg.loadgen_core,
        cfg.budget
    );
    let mut settings = BTreeMap::new();
    settings.insert(
        "loadgen".to_owned(),
        format!(
            "loadgen --cores {} (its app-server threads too), connect rate 5,000/s, keepalive every 15 s; \
             every process pinned with sched_setaffinity",
            cfg.loadgen_core
        ),
    );
    let mut out = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let label = format!("[{}/{}] {} — {}", i + 1, specs.len(), spec.label(), spec.target.name());
        if stop.load(Relaxed) {
            out.push(RunResult::not_run(spec, RunStatus::Skipped, "interrupted".into()));
            continue;
        }
        if let Err(e) = cfg.bins.server(spec.target) {
            eprintln!("bench: {label}: skipped: {e}");
            out.push(RunResult::not_run(spec, RunStatus::Skipped, e));
            continue;
        }
        if clock.elapsed() + estimate(spec, &cfg.profile) > cfg.budget {
            eprintln!("bench: {label}: skipped: the time budget ({:?}) is spent", cfg.budget);
            out.push(RunResult::not_run(spec, RunStatus::Skipped, "time budget spent".into()));
            continue;
        }
        eprintln!("bench: {label}");
        let mut result = None;
        for attempt in 1..=TRIES {
            let dir = cfg.work_dir.join(format!(
                "run-{:02}-{}-{}-{attempt}",
                i + 1,
                spec.kind.name(),
                spec.target.name()
            ));
            match execute(spec, cfg, &dir, stop, &mut settings) {
                Ok(r) => {
                    result = Some(r);
                    break;
                }
                Err(e) if attempt < TRIES && !stop.load(Relaxed) => {
                    eprintln!("bench: {label}: attempt {attempt} failed, trying again: {e}");
                }
                Err(e) => {
                    eprintln!("bench: {label}: failed: {e}");
                    let status = if stop.load(Relaxed) { RunStatus::Skipped } else { RunStatus::Failed };
                    result = Some(RunResult::not_run(spec, status, e));
                }
            }
        }
        let r = result.unwrap_or_else(|| RunResult::not_run(spec, RunStatus::Failed, "no attempt".into()));
        eprintln!("bench:   {}", one_line(&r));
        out.push(r);
    }
    machine_info.loadavg_end = machine::loadavg();
    results::add_idle_slopes(&mut out);
    let codec = codec_figure(&cfg.root);
    let mut message_bytes = BTreeMap::new();
    message_bytes.insert("gate_gps_frame".to_owned(), plan::GATE_GPS_FRAME_BYTES);
    message_bytes.insert("peer_gps_message".to_owned(), plan::PEER_POINT_BYTES);
    for t in Target::ALL {
        message_bytes.insert(format!("{}_wire_per_point", t.name()), t.gps_wire_bytes());
    }
    message_bytes.insert("push_payload".to_owned(), 64);
    let results = BenchResults {
        schema: results::SCHEMA.into(),
        profile: cfg.profile.clone(),
        started_utc: machine::utc_iso(started),
        finished_utc: machine::utc_iso(machine::now_s()),
        machine: machine_info,
        versions,
        settings,
        server_core: cfg.server_core,
        loadgen_core: cfg.loadgen_core,
        message_bytes,
        ratios: results::ratios(&out),
        goals: results::goals(&out, codec.as_ref()),
        runs: out,
        codec,
    };
    let stamp = machine::utc_stamp(started);
    let json = cfg.out_dir.join(format!("{stamp}.json"));
    let text = serde_json::to_string_pretty(&results).map_err(|e| format!("cannot write JSON: {e}"))?;
    std::fs::write(&json, text).map_err(|e| format!("cannot write {}: {e}", json.display()))?;
    let plots = if cfg.plots {
        plots::draw(&results, &cfg.out_dir, &stamp).unwrap_or_else(|e| {
            eprintln!("bench: cannot draw the plots: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let markdown = write_markdown(&results, &cfg.out_dir, &stamp, &plots)?;
    Ok(Written { results, json, markdown, plots })
}

/// Writes `<dir>/<stamp>.md`: the tables and links to the plots.
fn write_markdown(
    results: &BenchResults,
    dir: &Path,
    stamp: &str,
    plots: &[PathBuf],
) -> Result<PathBuf, String> {
    let mut md = results::table(results);
    if !plots.is_empty() {
        md.push_str("\nPlots: ");
        let links: Vec<String> =
            plots.iter().filter_map(|p| p.file_name()?.to_str().map(|n| format!("[{n}]({n})"))).collect();
        md.push_str(&links.join(", "));
        md.push('\n');
    }
    let markdown = dir.join(format!("{stamp}.md"));
    std::fs::write(&markdown, &md).map_err(|e| format!("cannot write {}: {e}", markdown.display()))?;
    Ok(markdown)
}

/// Draws the tables and plots of an earlier bench again from its JSON (after a change to how
/// they are drawn), beside it, without measuring anything.
pub fn render(json: &Path) -> Result<Written, String> {
    let text = std::fs::read_to_string(json).map_err(|e| format!("cannot read {}: {e}", json.display()))?;
    let results: BenchResults =
        serde_json::from_str(&text).map_err(|e| format!("{} is not a bench result: {e}", json.display()))?;
    let dir = json.parent().unwrap_or(Path::new("."));
    let stamp = json.file_stem().and_then(|s| s.to_str()).ok_or("the file has no name")?;
    let plots = plots::draw(&results, dir, stamp)?;
    let markdown = write_markdown(&results, dir, stamp, &plots)?;
    Ok(Written { results, json: json.to_path_buf(), markdown, plots })
}

/// One run: server up, loadgen, server down, figures.
fn execute(
    spec: &RunSpec,
    cfg: &Config,
    dir: &Path,
    stop: &AtomicBool,
    settings: &mut BTreeMap<String, String>,
) -> Result<RunResult, String> {
    let _normal = servers::NormalPriority::during(!spec.kind.realtime());
    let mut server = Server::start(spec.target, &cfg.bins, cfg.server_core, dir, spec.forward_all)?;
    let key = if spec.forward_all {
        spec.target.name().to_owned()
    } else {
        format!("{} (batch run)", spec.target.name())
    };
    settings.entry(key).or_insert_with(|| server.settings.clone());
    let idle_cpu_percent =
        if spec.kind == Kind::Idle { idle_cpu(server.pid, cfg.profile.idle_cpu_s, stop) } else { None };
    let kernel_before = KernelMem::read();
    let hgrm = dir.join("hgrm");
    let args = spec.loadgen_args(
        server.app,
        server.sidecar,
        server.admin,
        server.tls_ca.as_deref(),
        server.pid,
        cfg.loadgen_core,
        &hgrm,
    );
    let lg = runner::run(&cfg.bins.loadgen, &args, cfg.loadgen_core, server.pid, spec.timeout(), stop);
    let alive = server.alive();
    server.stop();
    let lg = lg?;
    if !alive {
        return Err(format!("{} exited during the run: {}", spec.target.name(), server.log_tail()));
    }
    let ceiling = server.stats_file.as_deref().and_then(servers::ceiling_stats);
    let curve = std::fs::read_to_string(hgrm.join("push_latency.hgrm"))
        .map(|t| plots::parse_hgrm(&t))
        .unwrap_or_default();
    let cpu = lg.window_cpu(cfg.server_core, cfg.loadgen_core);
    let storm_shares = if spec.kind == Kind::Storm {
        let at = spec.storm_at_s();
        let back = lg.report.storm.all_back_ms;
        lg.shares_after_window_start(at, back.map_or(spec.window_s, |ms| at + ms / 1000.0))
    } else {
        None
    };
    let x = Extras {
        window_share: cpu.map(|c| c.loadgen_share),
        contention: cpu.map(|c| results::Contention {
            other_on_server_core: c.other_on_server_core,
            other_on_loadgen_core: c.other_on_loadgen_core,
            steal_on_server_core: c.steal_on_server_core,
        }),
        loadgen_cpu_s: lg.report.loadgen.cpu_s,
        loadgen_wall_s: lg.wall_s,
        exit_code: lg.exit_code,
        kernel_before,
        kernel_end: lg.kernel_at_window_end(),
        idle_cpu_percent,
        ceiling,
        curve,
        storm_shares,
    };
    Ok(results::from_report(spec, &lg.report, lg.report_json, &x))
}

/// The server's CPU with no connection over `secs`, % of a core.
fn idle_cpu(pid: u32, secs: f64, stop: &AtomicBool) -> Option<f64> {
    let a = loadgen::procstat::sample(pid)?;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs && !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = loadgen::procstat::sample(pid)?;
    Some((b.cpu_s - a.cpu_s) / t.elapsed().as_secs_f64() * 100.0)
}

/// A run's headline, for the progress log.
fn one_line(r: &RunResult) -> String {
    if r.status != RunStatus::Ok {
        return format!("{:?}: {}", r.status, r.error.as_deref().unwrap_or("").lines().next().unwrap_or(""));
    }
    let mut s = format!(
        "server CPU {} %, loadgen {} % of its core ({})",
        r.server.cpu_percent.map_or("?".into(), |c| format!("{c:.0}")),
        r.loadgen.core_share.map_or("?".into(), |c| format!("{:.0}", c * 100.0)),
        r.loadgen.share_from
    );
    if let Some(u) = r.loadgen.us_per_send {
        s.push_str(&format!(", its loops {u:.2} µs per GPS send"));
    }
    if r.gps.sent > 0 {
        s.push_str(&format!(
            "; GPS {}/s sent, {}/s delivered, {} µs per point",
            plan::si(r.gps.sent_per_s),
            r.gps.delivered_per_s.map_or("?".into(), plan::si),
            r.gps.cpu_us_per_point.map_or("?".into(), |c| format!("{c:.2}"))
        ));
    }
    if let Some(p) = &r.push {
        s.push_str(&format!("; push p99 {} µs, {}/s delivered", p.p99_us, plan::si(p.deliveries_per_s)));
    }
    if let Some(i) = &r.idle {
        s.push_str(&format!(
            "; {} B per idle session",
            i.user_bytes_per_session.map_or("?".into(), |b| format!("{b:.0}"))
        ));
    }
    if let Some(st) = &r.storm {
        s.push_str(&format!(
            "; storm back in {} ms",
            st.all_back_ms.map_or("?".into(), |m| format!("{m:.0}"))
        ));
    }
    if let Some(c) = r.contention {
        s.push_str(&format!(
            "; others on the server core {:.0} %, on loadgen's {:.0} %",
            (c.other_on_server_core + c.steal_on_server_core) * 100.0,
            c.other_on_loadgen_core * 100.0
        ));
    }
    if r.gps.sent > 0 && r.gps.late > 0 {
        s.push_str(&format!("; {} GPS sends over 10 ms late", loadgen::report::num(r.gps.late)));
    }
    if r.loadgen.bound {
        s.push_str("; LOADGEN-BOUND");
    }
    if r.late {
        s.push_str("; LATE (not quoted)");
    }
    if r.contended {
        s.push_str("; CONTENDED");
    }
    s
}

/// Every binary's own version words, and the source revision.
fn versions(cfg: &Config) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut put = |k: &str, s: Option<String>| {
        v.insert(k.to_owned(), s.unwrap_or_else(|| "unknown".into()));
    };
    put("source", machine::git_revision(&cfg.root));
    put("gate", machine::first_line(&cfg.bins.gate, &["--version"]));
    put("loadgen", machine::first_line(&cfg.bins.loadgen, &["--version"]));
    put("mosquitto", cfg.bins.mosquitto.as_deref().and_then(|m| machine::first_line(m, &["-h"])));
    put("rumqttd", cfg.bins.rumqttd.as_deref().and_then(|r| machine::first_line(r, &["--version"])));
    put("nats-server", cfg.bins.nats.as_deref().and_then(|n| machine::first_line(n, &["--version"])));
    put("rustc", machine::first_line(Path::new("rustc"), &["--version"]));
    v
}

/// The decode benchmark's median from criterion's files, if `make bench-codec` ran here.
fn codec_figure(root: &Path) -> Option<CodecFigure> {
    let path = root.join("target/criterion/gps_decode_verify/one_frame/new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
    let ns = v.pointer("/median/point_estimate")?.as_f64()?;
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    let secs = modified.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(CodecFigure { ns, measured_utc: machine::utc_iso(secs) })
}
