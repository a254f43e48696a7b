//! loadgen against several gate nodes: a real `redis-server` on a free port, two gate
//! processes sharing it as one cluster (docs/PROTOCOL.md §15), and loadgen's binary spread over
//! them with `--gate A,B`. A few hundred apps for a few seconds each; no timing is asserted,
//! only that every push gets its one receipt and every session comes back where it should.

mod common;

use common::{gate_flags, n, run_loadgen, tail};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::redis::RedisServer;
use testkit::{workspace_gate_bin, GateProcess};

/// Secret for tokens and the sidecar hello, passed to both nodes and loadgen.
const SECRET: &str = "loadgen-cluster-test-secret";
/// Longest a gate may take to write its ports file, and a loadgen run to finish.
const PATIENCE: Duration = Duration::from_secs(90);
/// How long the nodes hold a dropped session (loadgen is told too, for its final wait).
const HOLD_MS: &str = "5000";
/// Longest the nodes may take to see the directory up and each other live.
const CLUSTERED: Duration = Duration::from_secs(20);

/// Redis and two gate nodes on it; everything is killed when dropped (the gates first).
struct Cluster {
    a: GateProcess,
    b: GateProcess,
    _redis: RedisServer,
}

impl Cluster {
    /// Starts Redis and the nodes `node-a` and `node-b`, and waits until each sees the
    /// directory up and both nodes live.
    fn start() -> Cluster {
        let redis = RedisServer::start().expect("redis-server starts (apt-get install redis-server)");
        let (a, b) = (node(&redis.url(), "node-a"), node(&redis.url(), "node-b"));
        let deadline = Instant::now() + CLUSTERED;
        for g in [&a, &b] {
            loop {
                let health = g.http_get("/healthz", Duration::from_secs(5)).unwrap_or_default();
                if health.contains("directory: up") && health.contains("2 live nodes") {
                    break;
                }
                assert!(Instant::now() < deadline, "not clustered: {health}\n{}", g.log_text());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Cluster { a, b, _redis: redis }
    }

    /// Runs loadgen with its apps on `apps` and its app-server on `sidecar`'s sidecar, pushes
    /// living 3 s, and the nodes' hold, so its final wait for receipts is short.
    fn loadgen(&self, args: &[&str], apps: &[&GateProcess], sidecar: &GateProcess) -> (i32, Value) {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--ttl-ms", "3000", "--hold-ms", HOLD_MS]);
        run_loadgen(&all, apps, sidecar, SECRET, PATIENCE)
    }

    /// The sum of a counter over both nodes.
    fn metric(&self, name: &str) -> (f64, f64) {
        let m = |g: &GateProcess| g.metric(name, "", Duration::from_secs(5)).expect("metrics");
        (m(&self.a), m(&self.b))
    }

    /// Both nodes' log tails, for a failed assertion.
    fn logs(&self) -> String {
        format!("node a:\n{}\nnode b:\n{}", tail(&self.a.log_text(), 30), tail(&self.b.log_text(), 30))
    }
}

/// A gate node named `name` on the Redis at `url`, on the secure channel (loadgen's default),
/// holding dropped sessions long enough for a storm's resumes to find them.
fn node(url: &str, name: &str) -> GateProcess {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let bin = workspace_gate_bin(root).expect("gate binary");
    let mut args = vec!["--redis", url, "--node-name", name, "--cluster-lease-ms", "900"];
    let flags = gate_flags(SECRET, HOLD_MS);
    args.extend(flags.iter().map(String::as_str));
    GateProcess::start(&bin, &args, PATIENCE).expect("gate node starts")
}

/// The audit's verdict: every push accepted got exactly one receipt, every delivery was shown
/// once, and loadgen exited 0.
fn assert_nothing_lost(code: i32, v: &Value, ctx: &dyn Fn() -> String) {
    assert!(n(v, "/push/accepted") > 0.0, "nothing pushed: {}", ctx());
    assert!(n(v, "/push/delivered") > 0.0, "no push delivered: {}", ctx());
    assert!(n(v, "/push/received") > 0.0, "no push received by an app: {}", ctx());
    assert_eq!(n(v, "/push/lost"), 0.0, "pushes lost: {}", ctx());
    assert_eq!(n(v, "/push/duplicates"), 0.0, "pushes shown twice: {}", ctx());
    assert_eq!(n(v, "/push/delivered_unseen"), 0.0, "delivered but never seen: {}", ctx());
    assert_eq!(code, 0, "exit status: {}", ctx());
}

#[test]
fn apps_spread_over_two_nodes_lose_no_push() {
    let c = Cluster::start();
    let (code, v) = c.loadgen(
        &[
            "push",
            "--drivers",
            "300",
            "--rate",
            "1",
            "--push-rate",
            "20",
            "--fanout",
            "20",
            "--disconnect-rate",
            "10",
            "--duration",
            "4",
        ],
        &[&c.a, &c.b],
        &c.a,
    );
    let ctx = || format!("{v:#}\n{}", c.logs());
    assert_eq!(n(&v, "/connections/logins"), 300.0, "every app logged in once: {}", ctx());
    assert_nothing_lost(code, &v, &ctx);
    // Half the apps logged in on each node, and the app-server's pushes (all through node a)
    // reached the drivers on node b through the directory.
    let (logins_a, logins_b) = c.metric("fleetgate_logins_total");
    assert_eq!((logins_a, logins_b), (150.0, 150.0), "round-robin over the nodes: {}", ctx());
    let (forwarded, _) = c.metric("fleetgate_cluster_forwarded_targets_total");
    assert!(forwarded > 0.0, "no push crossed to node b: {}", ctx());
    // Push latency is reported for each node apart: same-node (a) and cross-node (b).
    let by_node = v.pointer("/push/by_node").and_then(Value::as_array).cloned().unwrap_or_default();
    let nodes: Vec<String> = by_node.iter().filter_map(|p| p["gate"].as_str().map(str::to_owned)).collect();
    assert_eq!(nodes, [c.a.app.to_string(), c.b.app.to_string()], "{}", ctx());
    assert!(by_node.iter().all(|p| n(p, "/latency_us/count") > 0.0), "{}", ctx());
    // Without --move a dropped app comes back to its own node: no resume moved.
    assert!(n(&v, "/reconnect/resumed") > 0.0, "chaos dropped nobody: {}", ctx());
    assert_eq!(n(&v, "/reconnect/moved"), 0.0, "{}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "errors: {}", ctx());
}

#[test]
fn a_storm_with_move_brings_everyone_back_by_resume_on_the_other_node() {
    let c = Cluster::start();
    let (code, v) = c.loadgen(
        &[
            "storm",
            "--move",
            "--drivers",
            "300",
            "--rate",
            "1",
            "--push-rate",
            "10",
            "--fanout",
            "20",
            "--storm-percent",
            "100",
            "--storm-at",
            "1s",
            "--duration",
            "4",
        ],
        &[&c.a, &c.b],
        &c.a,
    );
    let ctx = || format!("{v:#}\n{}", c.logs());
    let dropped = n(&v, "/storm/dropped");
    assert_eq!(dropped, 300.0, "{}", ctx());
    assert_eq!(n(&v, "/storm/back"), dropped, "{}", ctx());
    // At least 99 % back by resume, each on the other node than the one that held it.
    assert!(n(&v, "/storm/moved") >= 0.99 * dropped, "resumed on the other node: {}", ctx());
    assert!(n(&v, "/storm/resumed") >= n(&v, "/storm/moved"), "{}", ctx());
    assert!(n(&v, "/reconnect/moved") >= n(&v, "/storm/moved"), "{}", ctx());
    let (in_a, in_b) = c.metric("fleetgate_cluster_sessions_moved_in_total");
    assert!(in_a > 0.0 && in_b > 0.0, "sessions moved both ways ({in_a}, {in_b}): {}", ctx());
    assert_nothing_lost(code, &v, &ctx);
    assert_eq!(n(&v, "/errors"), 0.0, "errors: {}", ctx());
}

#[test]
fn mixed_with_apps_on_one_node_and_the_app_server_on_the_other_loses_nothing() {
    let c = Cluster::start();
    let (code, v) = c.loadgen(
        &[
            "mixed",
            "--drivers",
            "100",
            "--passengers",
            "20",
            "--order-rate",
            "0.5",
            "--disconnect-rate",
            "5",
            "--duration",
            "5",
        ],
        &[&c.a],
        &c.b,
    );
    let ctx = || format!("{v:#}\n{}", c.logs());
    // Pushes from node b's sidecar reach the drivers on node a, receipts come back to b.
    assert_nothing_lost(code, &v, &ctx);
    let (_, forwarded) = c.metric("fleetgate_cluster_forwarded_targets_total");
    assert!(forwarded > 0.0, "no push crossed from node b to node a: {}", ctx());
    // GPS and orders from node a, which has no app-server, reach the one on node b.
    assert!(n(&v, "/gps/sent") > 0.0, "no GPS sent: {}", ctx());
    assert!(n(&v, "/gps/forwarded") > 0.0, "no GPS reached the app-server through node b: {}", ctx());
    assert!(n(&v, "/orders/placed") > 0.0, "no order reached the app-server through node b: {}", ctx());
    assert!(n(&v, "/orders/grab_won") > 0.0, "no grab reached the app-server: {}", ctx());
    assert!(n(&v, "/orders/taken_seen") > 0.0, "no passenger saw its order taken: {}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "errors: {}", ctx());
}
