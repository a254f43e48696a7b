//! `loadgen`: see `loadgen --help`. Everything lives in the library; this only parses flags,
//! runs, prints and picks the exit status (0 clean audit, 1 pushes lost or shown twice, 2 the
//! run could not start).

use clap::Parser;
use loadgen::cli::{Cli, Job};

fn main() {
    let cli = Cli::parse();
    let job = match cli.job() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    match job {
        Job::AppServer(cfg) => match loadgen::appserver::run_standalone(&cfg) {
            Ok(out) => {
                let summary = serde_json::json!({
                    "dispatch": out.dispatch,
                    "push": out.audit,
                    "outcomes": out.outcomes.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                    "gps_points": out.gps_points,
                    "upstream": out.upstream,
                    "gate_lost": out.gate_lost,
                });
                if cfg.json {
                    println!("{summary}");
                } else {
                    eprintln!("loadgen appserver: {summary:#}");
                }
            }
            Err(e) => {
                eprintln!("loadgen appserver: {e}");
                std::process::exit(2);
            }
        },
        Job::Fleet { plan, json, hgrm } => {
            let out = match loadgen::run(*plan) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    std::process::exit(2);
                }
            };
            let table = out.report.table(&out.hists);
            if json {
                eprint!("{table}");
                match serde_json::to_string(&out.report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("loadgen: cannot write JSON: {e}"),
                }
            } else {
                print!("{table}");
            }
            if let Some(dir) = hgrm {
                match loadgen::report::write_hgrm(&dir, &out.hists) {
                    Ok(files) => {
                        eprintln!("loadgen: wrote {} histogram(s) to {}", files.len(), dir.display())
                    }
                    Err(e) => eprintln!("loadgen: cannot write histograms to {}: {e}", dir.display()),
                }
            }
            if !out.report.ok {
                std::process::exit(1);
            }
        }
    }
}
