//! What loadgen's end-to-end tests share: running loadgen's binary against gate processes and
//! reading the JSON it prints.

// Each test file uses its own share of these.
#![allow(dead_code)]

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::GateProcess;

/// Runs `loadgen <args>` with `--gate` naming every node of `gates` (in order), `--sidecar`
/// naming `sidecar`'s, both secrets `secret`, and `--json --quiet`; waits at most `patience`
/// and returns its exit code and JSON report. A run that prints no JSON, or does not end,
/// fails the test with loadgen's stderr and the gates' logs.
pub fn run_loadgen(
    args: &[&str],
    gates: &[&GateProcess],
    sidecar: &GateProcess,
    secret: &str,
    patience: Duration,
) -> (i32, Value) {
    let nodes: Vec<String> = gates.iter().map(|g| g.app.to_string()).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args(["--gate", &nodes.join(","), "--sidecar", &sidecar.sidecar.to_string()])
        .args(["--token-secret", secret, "--sidecar-secret", secret, "--json", "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let logs = || gates.iter().map(|g| g.log_text()).collect::<Vec<_>>().join("\n--- next gate ---\n");
    let deadline = Instant::now() + patience;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadgen did not finish in {patience:?}; gate logs:\n{}", logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("no JSON on stdout ({e}): {stdout}\nstderr:\n{stderr}\ngate logs:\n{}", logs())
    });
    eprintln!("{stderr}");
    (out.status.code().unwrap_or(-1), json)
}

/// The gate flags the end-to-end tests share: both secrets `secret`, sessions held `hold_ms`,
/// GPS flushed every 100 ms, 3 s login, read and request timeouts, and the secure channel (as
/// loadgen speaks by default).
pub fn gate_flags(secret: &str, hold_ms: &str) -> Vec<String> {
    [
        "--token-secret",
        secret,
        "--sidecar-secret",
        secret,
        "--hold-ms",
        hold_ms,
        "--gps-flush-ms",
        "100",
        "--login-timeout-ms",
        "3000",
        "--read-timeout-ms",
        "3000",
        "--request-timeout-ms",
        "3000",
        "--app-plaintext",
        "false",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The number at `path` in a report; fails the test when it is missing.
pub fn n(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {v:#}"))
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
