//! End to end: a real gate process on free ports, loadgen's binary against it, and the JSON it
//! prints. Small fleets (under 100 connections) so the tests stay quick on a shared machine.

mod common;

use common::{gate_flags, n, run_loadgen, tail};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use testkit::{workspace_gate_bin, GateProcess};

/// Secret for tokens and the sidecar hello, passed to both sides.
const SECRET: &str = "loadgen-test-secret";
/// Longest a gate may take to write its ports file, and a loadgen run to finish.
const PATIENCE: Duration = Duration::from_secs(60);

/// A gate process (the shared test launcher, from the client crate); killed when dropped.
struct Gate(GateProcess);

impl std::ops::Deref for Gate {
    type Target = GateProcess;
    fn deref(&self) -> &GateProcess {
        &self.0
    }
}

impl Gate {
    fn start() -> Gate {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let bin = workspace_gate_bin(root).expect("gate binary");
        let flags = gate_flags(SECRET, "2000");
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        Gate(GateProcess::start(&bin, &args, PATIENCE).expect("gate starts"))
    }

    /// Runs `loadgen <args>` against this gate and returns its exit code and JSON.
    fn loadgen(&self, args: &[&str]) -> (i32, Value) {
        run_loadgen(args, &[&self.0], &self.0, SECRET, PATIENCE)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn mixed_with_chaos_loses_nothing() {
    let gate = Gate::start();
    let (code, v) = gate.loadgen(&[
        "mixed",
        "--drivers",
        "50",
        "--passengers",
        "10",
        "--duration",
        "5",
        "--disconnect-rate",
        "5",
        "--order-rate",
        "0.5",
        "--hold-ms",
        "2000",
        "--ttl-ms",
        "3000",
    ]);
    let ctx = || format!("{v:#}\ngate log tail:\n{}", tail(&read(&gate.log), 40));
    assert!(n(&v, "/gps/sent") > 0.0, "no GPS sent: {}", ctx());
    assert!(n(&v, "/gps/forwarded") > 0.0, "no GPS reached the app-server: {}", ctx());
    assert!(n(&v, "/orders/placed") > 0.0, "no order placed: {}", ctx());
    assert!(n(&v, "/push/delivered") > 0.0, "no push delivered: {}", ctx());
    assert!(n(&v, "/push/received") > 0.0, "no push received by an app: {}", ctx());
    assert!(n(&v, "/reconnect/count") > 0.0, "chaos dropped nobody: {}", ctx());
    assert_eq!(n(&v, "/push/lost"), 0.0, "pushes lost: {}", ctx());
    assert_eq!(n(&v, "/push/duplicates"), 0.0, "pushes shown twice: {}", ctx());
    assert_eq!(n(&v, "/push/delivered_unseen"), 0.0, "delivered but never seen: {}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "errors: {}", ctx());
    assert_eq!(code, 0, "exit status: {}", ctx());
    assert!(n(&v, "/push/latency_us/p50") > 0.0, "no push latency: {}", ctx());
}

#[test]
fn idle_reports_memory_per_session() {
    let gate = Gate::start();
    let (code, v) = gate.loadgen(&["idle", "--drivers", "20", "--duration", "1"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(n(&v, "/idle/sessions"), 20.0, "{v:#}");
    assert!(v.pointer("/idle/bytes_per_session").is_some_and(Value::is_number), "{v:#}");
    assert_eq!(
        v.pointer("/gate/pid").and_then(Value::as_u64),
        Some(u64::from(gate.pid().expect("running"))),
        "gate found by its port"
    );
    assert!(n(&v, "/gate/rss_bytes") > 0.0, "{v:#}");
}

#[test]
fn mixed_with_orders_offered_by_geo_push_loses_nothing() {
    let gate = Gate::start();
    let (code, v) = gate.loadgen(&[
        "mixed",
        "--drivers",
        "60",
        "--passengers",
        "10",
        "--duration",
        "5",
        "--order-rate",
        "0.5",
        "--dispatch",
        "geo",
        "--ttl-ms",
        "3000",
    ]);
    let ctx = || format!("{v:#}\ngate log tail:\n{}", tail(&read(&gate.log), 40));
    assert!(n(&v, "/orders/placed") > 0.0, "no order offered: {}", ctx());
    assert!(n(&v, "/push/delivered") > 0.0, "no offer delivered: {}", ctx());
    assert_eq!(n(&v, "/push/lost"), 0.0, "pushes lost: {}", ctx());
    assert_eq!(n(&v, "/push/duplicates"), 0.0, "pushes shown twice: {}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "errors: {}", ctx());
    assert_eq!(code, 0, "exit status: {}", ctx());
}

#[test]
fn geo_orders_choose_exactly_the_nearest_drivers_loadgen_placed() {
    let gate = Gate::start();
    let (code, v) =
        gate.loadgen(&["geo", "--drivers", "300", "--duration", "4", "--geo-rate", "20", "--rate", "1"]);
    let ctx = || format!("{v:#}\ngate log tail:\n{}", tail(&read(&gate.log), 40));
    assert!(n(&v, "/geo/queries") >= 40.0, "too few orders answered: {}", ctx());
    assert!(n(&v, "/geo/chosen") > 0.0, "nobody chosen: {}", ctx());
    assert_eq!(n(&v, "/geo/wrong"), 0.0, "drivers chosen wrongly: {}", ctx());
    assert_eq!(n(&v, "/geo/missed"), 0.0, "drivers left out: {}", ctx());
    assert_eq!(n(&v, "/geo/failed"), 0.0, "requests failed: {}", ctx());
    assert!(n(&v, "/geo/latency_us/p99") > 0.0, "no latency: {}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "errors: {}", ctx());
    assert_eq!(code, 0, "exit status: {}", ctx());
}
