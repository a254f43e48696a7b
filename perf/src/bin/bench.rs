//! `bench`: fleetgate against mosquitto, rumqttd, nats-server and the ceiling on the same
//! traffic, in one run; see `bench --help` and perf/src/bench/mod.rs.

use clap::Parser;
use perf::bench::placement::{pin_self, Placement};
use perf::bench::plan::{Kind, Profile, Target};
use perf::bench::{self, Config};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

const LONG_ABOUT: &str = "\
fleetgate's benchmarks: the gate, its peers (mosquitto, rumqttd, nats-server) and perf's io_uring
ceiling server on the same loadgen traffic, in one run, each server pinned to one core and loadgen
to another.

Scenarios (--scenarios):
  gps       GPS ingest, one point per TCP segment, at several offered rates (all five servers)
  gps-many  the real fleet: 15,000 connections at 3 and at 1 point/s each (all five)
  batch     GPS in batches of 10 points per frame, offered past one gate core (gate)
  push      push latency, fan-out 5, many drivers, GPS running (gate and the three peers)
  fanout    deliveries/s for fan-outs to 1,000 and 10,000 drivers (the same four)
  idle      memory per idle session at 9,250 and 18,500 sessions, the average and the slope
            between them, user space and kernel (the same four)
  storm     every session dropped at once: time and CPU until all are back (gate)

Each run starts its server afresh on free loopback ports and stops it after. Results: a table
on stdout, perf/results/<UTC>.json (every figure, the machine, every version and setting),
<UTC>.md (the tables) and <UTC>-*.svg (plots). A run where loadgen used 90 % or more of its
core is marked loadgen-bound (‡), one where more than 1 % of the GPS points left loadgen over
10 ms late or fewer than 99 % of the offered points were delivered is marked late (§); neither
is quoted as the server's figure. A peer that is not installed is skipped (\"not installed\").

Examples:
  bench                                  the full bench (about 16 minutes)
  bench --quick                          the same scenarios smaller (under 3 minutes)
  bench --scenarios gps --targets gate,ceiling --rates 100000
  bench --scenarios gps --targets gate --conns 50 --rates 1000 --window 2 --out /tmp/b";

#[derive(Debug, Parser)]
#[command(name = "bench", version, about = "fleetgate against its peers and the ceiling, side by side", long_about = LONG_ABOUT)]
struct Args {
    /// The smaller profile: every scenario, smaller fleets and 2 s windows, e.g. `--quick`
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, e.g. `--scenarios gps,push` [default: all]
    #[arg(long, value_delimiter = ',', value_parser = Kind::parse)]
    scenarios: Vec<Kind>,
    /// Servers to measure, e.g. `--targets gate,nats-server` [default: all]
    #[arg(long, value_delimiter = ',', value_parser = Target::parse)]
    targets: Vec<Target>,
    /// Every connection count set to this (fan-outs capped at it), e.g. `--conns 50`
    #[arg(long)]
    conns: Option<u32>,
    /// Offered GPS rates of the gps scenario, points/s, e.g. `--rates 50000,100000`
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Measured window of every run, seconds, e.g. `--window 5`
    #[arg(long)]
    window: Option<f64>,
    /// Where results go, e.g. `--out /tmp/bench` [default: perf/results]
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    placement: Placement,
    /// Time budget in seconds; runs that would pass it are skipped, e.g. `--budget 600`
    /// [default: 1,500 for the full bench, 170 for --quick]
    #[arg(long)]
    budget: Option<u64>,
    /// Do not draw plots, e.g. `--no-plots`
    #[arg(long)]
    no_plots: bool,
    /// Measure nothing: draw the tables and plots of an earlier run again from its JSON,
    /// beside it, e.g. `--render perf/results/2026-11-27T08-56-09Z.json`
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    if let Some(json) = &args.render {
        let written = bench::render(json)?;
        print!("{}", perf::bench::results::table(&written.results));
        eprintln!("bench: wrote {}", written.markdown.display());
        for p in &written.plots {
            eprintln!("bench: plot {}", p.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).ok_or("no workspace root")?;
    let mut profile = if args.quick { Profile::quick() } else { Profile::full() };
    if let Some(n) = args.conns {
        profile = profile.with_conns(n);
    }
    if !args.rates.is_empty() {
        if args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return Err("--rates must be positive numbers".into());
        }
        profile.gps_rates = args.rates.clone();
    }
    if let Some(w) = args.window {
        if !(w.is_finite() && (0.5..=600.0).contains(&w)) {
            return Err("--window must be 0.5..=600 seconds".into());
        }
        profile.window_s = w;
        profile.idle_window_s = w;
    }
    let (server_core, loadgen_core) = args.placement.cores("bench")?;
    let bins = args.placement.bins()?;
    pin_self(loadgen_core);
    let work_dir = std::env::temp_dir().join(format!("fleetgate-bench-{}", std::process::id()));
    let cfg = Config {
        kinds: if args.scenarios.is_empty() { Kind::ALL.to_vec() } else { args.scenarios },
        targets: if args.targets.is_empty() { Target::ALL.to_vec() } else { args.targets },
        out_dir: args.out.unwrap_or_else(|| root.join("perf/results")),
        work_dir: work_dir.clone(),
        bins,
        server_core,
        loadgen_core,
        budget: Duration::from_secs(args.budget.unwrap_or(if args.quick { 170 } else { 1500 })),
        plots: !args.no_plots,
        root,
        profile,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    let written = bench::run(&cfg, &stop)?;
    let failed =
        written.results.runs.iter().filter(|r| r.status == perf::bench::results::RunStatus::Failed).count();
    if failed == 0 {
        let _ = std::fs::remove_dir_all(&work_dir);
    } else {
        eprintln!("bench: {failed} run(s) failed; their server logs are in {}", work_dir.display());
    }
    print!("{}", perf::bench::results::table(&written.results));
    eprintln!("bench: wrote {} and {}", written.json.display(), written.markdown.display());
    for p in &written.plots {
        eprintln!("bench: plot {}", p.display());
    }
    Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
