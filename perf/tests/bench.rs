//! End to end: the `bench` binary runs a tiny bench (the gate only, 50 connections, one GPS
//! rate, a 2 s window) with the real gate and loadgen binaries, and writes results that carry
//! the figures. No peers (mosquitto, nats-server) are needed; no timing is asserted.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the tiny bench may take before the test gives up on it.
const PATIENCE: Duration = Duration::from_secs(50);
/// The same for the tiny cluster bench: three phases, each two loadgens and their ramps.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(150);

/// The directory of this build's binaries. The gate and loadgen binaries must be built already
/// (`make test` builds every target of the workspace before it runs the tests; by hand:
/// `cargo build --workspace`): a test that ran cargo itself would spend half a minute building
/// inside the test run.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_bench")).parent().expect("binary directory").to_path_buf();
    for bin in ["gate", "loadgen"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build the workspace first (cargo build --workspace, or make test)",
            dir.join(bin).display()
        );
    }
    dir
}

/// Runs `bench` with `args` into a fresh folder named after `name`; returns the folder, the
/// table it printed and the files it wrote.
fn tiny_bench(name: &str, args: &[&str]) -> (PathBuf, String, Vec<PathBuf>) {
    tiny(Path::new(env!("CARGO_BIN_EXE_bench")), name, args, PATIENCE)
}

/// Runs the bench binary `exe` with `args` into a fresh folder named after `name`, for at most
/// `patience`; returns the folder, the table it printed and the files it wrote.
fn tiny(exe: &Path, name: &str, args: &[&str], patience: Duration) -> (PathBuf, String, Vec<PathBuf>) {
    let bins = bin_dir();
    let out = std::env::temp_dir().join(format!("fleetgate-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut child = Command::new(exe)
        .args(args)
        .arg("--out")
        .arg(&out)
        .arg("--bin-dir")
        .arg(&bins)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("bench starts");
    let deadline = Instant::now() + patience;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish within {patience:?}", exe.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "bench failed: {}\n{table}", output.status);
    let files: Vec<PathBuf> =
        std::fs::read_dir(&out).expect("results folder").flatten().map(|e| e.path()).collect();
    (out, table, files)
}

/// The first run of the results JSON among `files`.
fn first_run(files: &[PathBuf]) -> Value {
    let json = files.iter().find(|p| p.extension().is_some_and(|e| e == "json")).expect("a JSON file");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json).expect("read")).expect("JSON");
    v["runs"][0].clone()
}

#[test]
fn a_tiny_bench_against_the_ceiling_drives_the_peer_fleet() {
    // The ceiling is always built with the bench: loadgen's peer fleet (the same event loop
    // as the gate fleet, the peers' client) writes the gate's GPS frames to it.
    let (out, _table, files) = tiny_bench(
        "ceiling",
        &[
            "--scenarios",
            "gps",
            "--targets",
            "ceiling",
            "--conns",
            "50",
            "--rates",
            "500",
            "--window",
            "2",
            "--no-plots",
        ],
    );
    let r = first_run(&files);
    assert_eq!(r["status"], "ok", "{r:#}");
    assert_eq!(r["spec"]["target"], "ceiling");
    assert_eq!(r["report"]["connections"]["logins"], 50, "{r:#}");
    assert!(r["gps"]["sent"].as_u64().is_some_and(|n| n > 0), "{}", r["gps"]);
    assert!(r["gps"]["delivered"].as_u64().is_some_and(|n| n > 0), "the ceiling counted them: {}", r["gps"]);
    assert!(r["loadgen"]["us_per_send"].as_f64().is_some_and(|u| u > 0.0), "{}", r["loadgen"]);
    assert_eq!(r["report"]["errors"], 0, "{r:#}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_tiny_bench_writes_its_figures() {
    let (out, table, files) = tiny_bench(
        "test",
        &["--scenarios", "gps", "--targets", "gate", "--conns", "50", "--rates", "500", "--window", "2"],
    );
    assert!(table.contains("GPS ingest") && table.contains("DESIGN goals"), "{table}");

    let json = files.iter().find(|p| p.extension().is_some_and(|e| e == "json")).expect("a JSON file");
    assert!(files.iter().any(|p| p.extension().is_some_and(|e| e == "md")), "no tables: {files:?}");
    assert!(files.iter().any(|p| p.extension().is_some_and(|e| e == "svg")), "no plot: {files:?}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json).expect("read")).expect("JSON");

    assert_eq!(v["schema"], "fleetgate-bench/1");
    assert!(v["machine"]["cores"].as_u64().is_some_and(|c| c >= 1), "{}", v["machine"]);
    assert!(v["machine"]["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert!(v["versions"]["gate"].as_str().is_some_and(|g| g.contains("gate")), "{}", v["versions"]);
    assert_eq!(v["message_bytes"]["gate_gps_frame"], 64);
    assert_eq!(v["message_bytes"]["peer_gps_message"], 40);

    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "one rate, one target");
    let r = &runs[0];
    assert_eq!(r["status"], "ok", "{r:#}");
    assert_eq!(r["spec"]["target"], "gate");
    assert_eq!(r["spec"]["conns"], 50);
    assert!(r["gps"]["sent"].as_u64().is_some_and(|n| n > 0), "{}", r["gps"]);
    assert!(r["gps"]["cpu_us_per_point"].as_f64().is_some_and(|c| c > 0.0), "{}", r["gps"]);
    assert!(r["gps"]["delivered"].as_u64().is_some(), "{}", r["gps"]);
    assert!(r["server"]["cpu_s"].as_f64().is_some(), "{}", r["server"]);
    assert!(r["loadgen"]["core_share"].as_f64().is_some(), "{}", r["loadgen"]);
    assert!(r["loadgen"]["us_per_send"].as_f64().is_some_and(|u| u > 0.0), "{}", r["loadgen"]);
    assert!(r["loadgen"]["bound"].is_boolean());
    assert_eq!(r["report"]["scenario"], "gps", "loadgen's own report is kept");

    let goals = v["goals"].as_array().expect("goals");
    assert!(goals.len() >= 10, "every DESIGN goal has a row");
    assert!(
        goals.iter().any(|g| g["goal"] == "loss under node restarts"
            && g["measured"].as_str().is_some_and(|m| m.contains("bench-cluster"))),
        "the goals measured elsewhere say where"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_tiny_cluster_bench_measures_two_nodes() {
    // Needs redis-server, as the cluster tests do.
    let (out, table, files) = tiny(
        Path::new(env!("CARGO_BIN_EXE_bench-cluster")),
        "cluster",
        &["--sessions", "100", "--window", "2", "--push-rate", "50"],
        CLUSTER_PATIENCE,
    );
    assert!(table.contains("logins/s, both nodes") && table.contains("cross node"), "{table}");
    let named = |end: &str| files.iter().find(|p| p.to_string_lossy().ends_with(end)).cloned();
    let json = named("-cluster.json").expect("the results");
    assert!(named("-cluster.md").is_some() && named("-cluster-samples.json").is_some(), "{files:?}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json).expect("read")).expect("JSON");
    assert_eq!(v["schema"], "fleetgate-bench-cluster/1");
    let f = &v["figures"];
    assert_eq!(f["login"]["events"], 200, "every session on both nodes logged in: {f:#}");
    assert!(f["login"]["gate_ops"].as_f64().is_some_and(|o| o > 0.0), "a login costs Redis work: {f:#}");
    assert!(f["push"]["events"].as_u64().is_some_and(|n| n > 0), "{f:#}");
    assert!(f["cross_node_targets"].as_u64().is_some_and(|n| n > 0), "{f:#}");
    assert!(f["same_node_push_us"]["count"].as_u64().is_some_and(|n| n > 0), "{f:#}");
    assert!(f["cross_node_push_us"]["count"].as_u64().is_some_and(|n| n > 0), "{f:#}");
    // P's sessions, half on each node, moved to the other one.
    assert_eq!(f["storm_dropped"], 100, "{f:#}");
    assert_eq!(f["storm_back"], 100, "{f:#}");
    assert!(f["resume"]["events"].as_u64().is_some_and(|n| n > 0), "sessions moved: {f:#}");
    assert_eq!((f["lost"].as_u64(), f["duplicates"].as_u64()), (Some(0), Some(0)), "{f:#}");
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(6), "two loadgens in each of three phases");
    let _ = std::fs::remove_dir_all(&out);
}
