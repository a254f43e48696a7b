//! The event loop that carries every simulated app, end to end: a real gate process on free
//! ports, loadgen's binary against it, and the JSON it prints. Each test drives one of the
//! loop's paths (GPS on the wheel, pushes read and acked, a storm's drops and reconnects, the
//! stop's logouts, misbehaving peers beside the loop) with a small fleet; no timing is asserted.

mod common;

use common::{n, run_loadgen};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{workspace_gate_bin, GateProcess};

/// Secret for tokens and the sidecar hello, passed to both sides.
const SECRET: &str = "loadgen-loop-test-secret";
/// Longest a gate may take to write its ports file, and a loadgen run to finish.
const PATIENCE: Duration = Duration::from_secs(90);

/// How long the stop test waits for the gate to forget its sessions: far less than the hold
/// below, so only logouts can explain it.
const FORGET_PATIENCE: Duration = Duration::from_secs(60);

fn gate() -> GateProcess {
    gate_holding("5000")
}

/// A gate that holds a dropped session for `hold_ms`, on the secure channel (loadgen's default).
fn gate_holding(hold_ms: &str) -> GateProcess {
    gate_with(hold_ms, "false")
}

/// A gate that holds a dropped session for `hold_ms`, with `app.plaintext` as given.
fn gate_with(hold_ms: &str, plaintext: &str) -> GateProcess {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let bin = workspace_gate_bin(root).expect("gate binary");
    let args = [
        "--token-secret",
        SECRET,
        "--sidecar-secret",
        SECRET,
        "--hold-ms",
        hold_ms,
        "--gps-flush-ms",
        "100",
        "--gps-forward",
        "all",
        "--login-timeout-ms",
        "2000",
        "--read-timeout-ms",
        "2000",
        "--app-plaintext",
        plaintext,
    ];
    GateProcess::start(&bin, &args, PATIENCE).expect("gate starts")
}

/// Runs `loadgen <args>` against `gate` and returns its exit code and JSON report.
fn loadgen(gate: &GateProcess, args: &[&str]) -> (i32, Value) {
    run_loadgen(args, &[gate], gate, SECRET, PATIENCE)
}

#[test]
fn gps_from_one_loop_reaches_the_app_server_and_its_cost_is_reported() {
    let gate = gate();
    let (code, v) =
        loadgen(&gate, &["gps", "--cores", "0", "--drivers", "300", "--rate", "5", "--duration", "3"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(n(&v, "/connections/logins"), 300.0, "every app logged in once: {v:#}");
    assert_eq!(n(&v, "/connections/live_at_end"), 300.0, "{v:#}");
    let sent = n(&v, "/gps/sent");
    assert!(sent > 0.0, "{v:#}");
    assert_eq!(n(&v, "/gps/frames"), sent, "one point per frame: {v:#}");
    assert!(n(&v, "/gps/forwarded") > 0.0, "{v:#}");
    assert_eq!(n(&v, "/errors"), 0.0, "{v:#}");
    // The loop's own CPU is read from its thread in /proc.
    assert!(n(&v, "/loadgen/loops_window_cpu_s") > 0.0, "{v:#}");
    assert!(n(&v, "/loadgen/loops_us_per_send") > 0.0, "{v:#}");
    assert!(n(&v, "/loadgen/window_cpu_s") >= n(&v, "/loadgen/loops_window_cpu_s"), "{v:#}");
}

#[test]
fn pushes_are_read_acked_and_shown_once() {
    let gate = gate();
    let (code, v) = loadgen(
        &gate,
        &[
            "push",
            "--drivers",
            "100",
            "--rate",
            "1",
            "--push-rate",
            "20",
            "--fanout",
            "10",
            "--duration",
            "3",
        ],
    );
    assert_eq!(code, 0, "the audit holds: {v:#}");
    assert!(n(&v, "/push/received") > 0.0, "{v:#}");
    assert_eq!(n(&v, "/push/lost"), 0.0, "{v:#}");
    assert_eq!(n(&v, "/push/duplicates"), 0.0, "{v:#}");
    assert_eq!(n(&v, "/push/delivered_unseen"), 0.0, "{v:#}");
    assert!(n(&v, "/counters/acks") >= n(&v, "/push/received"), "every delivery acked: {v:#}");
    assert_eq!(n(&v, "/errors"), 0.0, "{v:#}");
    // Each delivery's latency is split at the driver's socket by the kernel's receive stamp:
    // both parts are measured for every first arrival, and neither exceeds the whole.
    let count = n(&v, "/push/latency_us/count");
    assert!(count > 0.0, "{v:#}");
    assert_eq!(n(&v, "/push/arrival_us/count"), count, "{v:#}");
    assert_eq!(n(&v, "/push/loadgen_wait_us/count"), count, "{v:#}");
    for part in ["/push/arrival_us/max", "/push/loadgen_wait_us/max"] {
        // (Histogram values are kept to 3 significant digits.)
        assert!(n(&v, part) <= n(&v, "/push/latency_us/max") * 1.002 + 1.0, "{part}: {v:#}");
    }
}

#[test]
fn a_storm_drops_every_session_and_every_one_comes_back() {
    let gate = gate();
    let (code, v) = loadgen(
        &gate,
        &[
            "storm",
            "--drivers",
            "200",
            "--rate",
            "1",
            "--storm-percent",
            "100",
            "--storm-at",
            "1s",
            "--duration",
            "3",
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(n(&v, "/storm/dropped"), 200.0, "{v:#}");
    assert_eq!(n(&v, "/storm/back"), 200.0, "{v:#}");
    assert_eq!(n(&v, "/storm/resumed") + n(&v, "/storm/relogin"), 200.0, "{v:#}");
    // The gate's cost of a handshake + login over the ramp and of a resume over the storm, from
    // its scheduler time, on the secure channel.
    assert_eq!(v.pointer("/handshake/secure"), Some(&Value::Bool(true)), "{v:#}");
    assert!(n(&v, "/handshake/latency_us/p50") > 0.0, "{v:#}");
    assert!(n(&v, "/gate/cpu_us_per_handshake") > 0.0, "{v:#}");
    assert!(n(&v, "/gate/cpu_us_per_resume") > 0.0, "{v:#}");
    assert_eq!(n(&v, "/counters/drops_caused"), 200.0, "{v:#}");
    assert_eq!(n(&v, "/errors"), 0.0, "{v:#}");
}

#[test]
fn the_stop_logs_every_session_out() {
    // Sessions whose connection merely closed would stay in the directory for ten minutes.
    let gate = gate_holding("600000");
    let (code, v) = loadgen(&gate, &["idle", "--drivers", "50", "--duration", "1"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(n(&v, "/connections/live_at_end"), 50.0, "{v:#}");
    let deadline = Instant::now() + FORGET_PATIENCE;
    loop {
        let left =
            gate.metric("fleetgate_directory_sessions", "", Duration::from_secs(5)).unwrap_or(f64::NAN);
        if left == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions left after the stop: {left}\n{}", gate.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn misbehaving_peers_run_beside_the_loop() {
    // The misbehaving peers write raw frames below any channel: a plaintext gate.
    let gate = gate_with("5000", "true");
    let (code, v) = loadgen(
        &gate,
        &[
            "bad",
            "--plaintext",
            "--drivers",
            "20",
            "--slow-readers",
            "0",
            "--garbage",
            "2",
            "--half-open",
            "0",
            "--duration",
            "2",
        ],
    );
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(n(&v, "/connections/logins"), 20.0, "{v:#}");
    assert!(n(&v, "/bad/garbage_sent") > 0.0, "{v:#}");
    assert!(n(&v, "/bad/garbage_refused") > 0.0, "the gate answered garbage with BadMagic: {v:#}");
}
