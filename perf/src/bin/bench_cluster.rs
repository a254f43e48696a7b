//! `bench-cluster`: two gate nodes sharing one Redis, measured; see `bench-cluster --help` and
//! perf/src/bench/cluster.rs.

use clap::Parser;
use perf::bench::cluster::{self, Config};
use perf::bench::placement::{pin_self, Placement};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const LONG_ABOUT: &str = "\
Two gate nodes sharing one Redis (cluster mode), with more sessions than one process holds here:
two loadgen processes, P and Q, each spreading its apps over both nodes. Three phases:

  login  both at once, every session logs in: logins/s over both nodes, Redis operations per
         login
  push   Q's sessions up first, then pushes from P's app-server on node A's sidecar to P's
         drivers on both nodes: push latency p50/p99 to drivers on node A (same node) and on
         node B (cross node) from one run, Redis operations per push
  storm  Q's sessions up first, then P's (half of each node's) dropped at once and resumed on
         the other node (loadgen storm --move): resumes/s across nodes, Redis operations per
         resume

Rates and operation counts come from the nodes' /metrics and Redis's INFO commandstats, sampled
every 50 ms. Redis and both nodes run on --server-core, both loadgens on --loadgen-core. Needs
redis-server (apt-get install -y redis-server) and the release binaries of gate and loadgen
beside this one (cargo build --release -p gate -p loadgen -p perf). Each process may open
20,000 files at most here, so --sessions is at most 18,500 (per loadgen process).

Results: a table on stdout, <out>/<UTC>-cluster.json (every figure and each loadgen's report),
<UTC>-cluster-samples.json (the nodes' and Redis's counters every 50 ms) and <UTC>-cluster.md.

Examples:
  bench-cluster                               15,000 sessions on each node
  bench-cluster --sessions 2000 --window 5    a quick look";

#[derive(Debug, Parser)]
#[command(name = "bench-cluster", version, about = "two gate nodes sharing one Redis, measured", long_about = LONG_ABOUT)]
struct Args {
    /// Sessions on each node (each of the two loadgen processes carries this many, half on
    /// each node), e.g. `--sessions 2000`
    #[arg(long, default_value_t = 15_000)]
    sessions: u32,
    /// Measured window of each loadgen run, seconds, e.g. `--window 5`
    #[arg(long, default_value_t = 10.0)]
    window: f64,
    /// Pushes per second in the push phase, e.g. `--push-rate 100`
    #[arg(long, default_value_t = 200.0)]
    push_rate: f64,
    /// Drivers each push names, picked at random, e.g. `--fanout 5`
    #[arg(long, default_value_t = 5)]
    fanout: u32,
    /// GPS points per second per driver of the pushing process, e.g. `--gps-rate 0` for none
    #[arg(long, default_value_t = 1.0)]
    gps_rate: f64,
    /// Apps speak the secure channel (a handshake per login) instead of plaintext, e.g.
    /// `--secure`
    #[arg(long)]
    secure: bool,
    /// Where results go, e.g. `--out /tmp/cluster` [default: perf/results/cluster]
    #[arg(long)]
    out: Option<PathBuf>,
    // --server-core is Redis's and both nodes' core, --loadgen-core both loadgens'.
    #[command(flatten)]
    placement: Placement,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench-cluster: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).ok_or("no workspace root")?;
    if !(args.window.is_finite() && (1.0..=600.0).contains(&args.window)) {
        return Err("--window must be 1..=600 seconds".into());
    }
    for (flag, v) in [("--push-rate", args.push_rate), ("--gps-rate", args.gps_rate)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{flag} must be a number ≥ 0"));
        }
    }
    let (server_core, loadgen_core) = args.placement.cores("bench-cluster")?;
    let bins = args.placement.bins()?;
    pin_self(loadgen_core);
    let work_dir = std::env::temp_dir().join(format!("fleetgate-bench-cluster-{}", std::process::id()));
    let cfg = Config {
        sessions_per_node: args.sessions,
        window_s: args.window,
        push_rate: args.push_rate,
        fanout: args.fanout.max(1),
        gps_rate: args.gps_rate,
        secure: args.secure,
        server_core,
        loadgen_core,
        bins,
        out_dir: args.out.unwrap_or_else(|| root.join("perf/results/cluster")),
        work_dir: work_dir.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    let (results, json) = cluster::run(&cfg, &stop)
        .map_err(|e| format!("{e}\n(the nodes' and Redis's logs are in {})", work_dir.display()))?;
    let _ = std::fs::remove_dir_all(&work_dir);
    print!("{}", cluster::table(&results));
    eprintln!("bench-cluster: wrote {}", json.display());
    let f = &results.figures;
    Ok(if f.lost > 0 || f.duplicates > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
