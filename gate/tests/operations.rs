//! What operators rely on: `gate --version`, the systemd unit in ops/, the admin port's control
//! commands (log filter, drain) against a real gate, and the Grafana dashboard's metric names
//! against a real gate's /metrics.

mod common;

use common::{temp_dir, Gate, EVENTUALLY};
use schema::wire::GoAwayReason;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

#[test]
fn version_names_the_release_and_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_gate")).arg("--version").output().expect("runs");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // The commit the build script saw: this checkout's HEAD, or "unknown" outside git.
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "unknown".to_string(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    assert_eq!(text, format!("gate {} (commit {head})\n", env!("CARGO_PKG_VERSION")));
}

/// Runs `make install-service` with `PREFIX` (and the unit folder) under `prefix`, then puts
/// this build's gate where the installed unit runs it; the unit's path, or `None` (said) where
/// make is absent.
fn install_service(prefix: &Path) -> Option<PathBuf> {
    let out = match Command::new("make")
        .args(["-s", "-C"])
        .arg(repo())
        .arg("install-service")
        .arg(format!("PREFIX={}", prefix.display()))
        .arg(format!("UNITDIR={}/unit", prefix.display()))
        .env_remove("DESTDIR")
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: make is not available here ({e}); make install-service was not run");
            return None;
        }
    };
    assert!(out.status.success(), "make install-service failed: {out:?}");
    std::fs::create_dir_all(prefix.join("bin")).expect("bin folder");
    std::fs::copy(env!("CARGO_BIN_EXE_gate"), prefix.join("bin/gate")).expect("copy the gate");
    Some(prefix.join("unit/fleetgate.service"))
}

#[test]
fn make_install_service_writes_the_unit_for_its_prefix_and_keeps_the_secrets_file() {
    use std::os::unix::fs::PermissionsExt;
    let prefix = temp_dir("prefix");
    let Some(unit) = install_service(&prefix) else { return };
    let text = std::fs::read_to_string(&unit).expect("the installed unit");
    let p = prefix.display();
    assert!(text.contains(&format!("ExecStart={p}/bin/gate -c {p}/etc/fleetgate/gate.toml")), "{text}");
    assert!(text.contains(&format!("EnvironmentFile={p}/etc/fleetgate/secrets.env")), "{text}");
    assert!(!text.contains("/usr/local"), "a path not rewritten to PREFIX:\n{text}");
    let secrets = prefix.join("etc/fleetgate/secrets.env");
    let mode = std::fs::metadata(&secrets).expect("secrets.env").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secrets file is root's alone");
    // A second install keeps the operator's secrets.
    std::fs::write(&secrets, "FLEETGATE_AUTH_TOKEN_SECRET=kept\n").expect("edit");
    install_service(&prefix).expect("make again");
    assert_eq!(std::fs::read_to_string(&secrets).expect("read"), "FLEETGATE_AUTH_TOKEN_SECRET=kept\n");
    let _ = std::fs::remove_dir_all(&prefix);
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let prefix = temp_dir("unit");
    let Some(unit) = install_service(&prefix) else { return };
    let out = match Command::new("systemd-analyze").arg("verify").arg(&unit).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: systemd-analyze is not available here ({e}); the unit was not verified");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    // verify exits 0 on an unknown key or a value it cannot parse (it only warns, "ignoring"),
    // which would silently drop a limit or the stop timeout: any word about the unit fails.
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains("fleetgate.service")).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify warned:\n{}", about_unit.join("\n"));
    let _ = std::fs::remove_dir_all(&prefix);
}

#[test]
fn the_unit_stops_with_sigterm_after_the_drain_bound_and_keeps_secrets_off_the_command_line() {
    let unit = std::fs::read_to_string(repo().join("ops/fleetgate.service")).expect("unit");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing from the unit"))
            .to_string()
    };
    assert_eq!(value("KillSignal"), "SIGTERM");
    assert_eq!(value("Restart"), "on-failure");
    // The drain's bound: 3 s (apps) + 3 s (receipt acks) + 1 s (close) per shard, then up to 5 s
    // for the Redis thread in cluster mode (gate/src/event_loop.rs, cluster/src/lib.rs).
    let stop: u64 = value("TimeoutStopSec").trim_end_matches('s').parse().expect("seconds");
    assert!(stop > 12, "TimeoutStopSec={stop}s is shorter than the drain's 12 s bound");
    let nofile: u64 = value("LimitNOFILE").parse().expect("a number");
    assert!(nofile >= 19_000 * 8, "LimitNOFILE={nofile} does not hold 8 shards at app.max_conns_per_shard");
    let exec = value("ExecStart");
    assert!(
        !exec.contains("secret ") && !exec.contains("--token-secret"),
        "a secret on the command line: {exec}"
    );
}

// ------------------------------------------------------------------------------------------------
// The admin port's control commands
// ------------------------------------------------------------------------------------------------

/// The token the control tests configure (`admin.secret_file`).
const ADMIN_TOKEN: &str = "0123456789abcdef-admin-token";

/// A file holding `ADMIN_TOKEN` (with the newline `echo` would leave), and its folder.
fn admin_secret_file(name: &str) -> (PathBuf, String) {
    let dir = temp_dir(name);
    let path = dir.join("admin-secret");
    std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).expect("write the token");
    let p = path.to_str().expect("utf-8 path").to_owned();
    (dir, p)
}

/// One HTTP request on the admin port: the status code and the body.
fn request(gate: &Gate, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s =
        std::net::TcpStream::connect_timeout(&gate.admin, Duration::from_secs(5)).expect("admin connect");
    s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "{method} {path} HTTP/1.1\r\nHost: gate\r\n{auth}Content-Length: 0\r\n\r\n").expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read the answer");
    let (head, body) = resp.split_once("\r\n\r\n").expect("a head and a body");
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (code, body.to_owned())
}

/// Sends one GPS point with `log_id` and waits until the gate has taken `total` points.
fn gps_and_wait(gate: &Gate, app: &mut client::AppConn, log_id: u64, total: f64) {
    app.send_gps(log_id, &common::point(1_700_000_000_000 + log_id, 300_000_000)).expect("send gps");
    gate.eventually("the point is taken", || gate.metric("fleetgate_gps_points_in_total", "") >= total);
}

#[test]
fn the_log_filter_changes_without_a_restart() {
    let (dir, secret) = admin_secret_file("log");
    let gate = Gate::start(&["--admin-secret-file", &secret]);
    let mut driver = gate.login(31, 1);
    assert_eq!(request(&gate, "GET", "/log", None), (200, "info\n".to_string()));

    // At info, a GPS point's debug line ("gps points", with its log_id) is not written.
    gps_and_wait(&gate, &mut driver, 4_101, 1.0);
    assert!(!gate.log_text().contains("log_id=4101"), "debug line at info:\n{}", gate.log_text());

    let (code, body) = request(&gate, "POST", "/log?level=debug", Some(ADMIN_TOKEN));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("debug") && body.contains("was info"), "{body}");
    assert_eq!(request(&gate, "GET", "/log", None), (200, "debug\n".to_string()));
    gps_and_wait(&gate, &mut driver, 4_102, 2.0);
    gate.eventually("the debug line is written", || {
        gate.log_text().lines().any(|l| l.contains("gps points") && l.contains("log_id=4102"))
    });

    // Directives, %-escaped as a client library would send them; then back to info.
    let (code, body) = request(&gate, "POST", "/log?level=info%2Cgate%3A%3Aapp%3Dwarn", Some(ADMIN_TOKEN));
    assert_eq!(code, 200, "{body}");
    assert_eq!(request(&gate, "GET", "/log", None).1, "gate::app=warn,info\n");
    let (code, body) = request(&gate, "POST", "/log?level=info", Some(ADMIN_TOKEN));
    assert_eq!(code, 200, "{body}");
    gps_and_wait(&gate, &mut driver, 4_103, 3.0);
    assert!(!gate.log_text().contains("log_id=4103"), "debug line after going back to info");
    // Every change is logged with its peer, so the log says who changed it.
    assert_eq!(gate.log_text().matches("admin: log filter changed").count(), 3);

    // A misspelt level is refused and changes nothing.
    let (code, body) = request(&gate, "POST", "/log?level=debugg", Some(ADMIN_TOKEN));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("debugg"), "{body}");
    assert_eq!(request(&gate, "GET", "/log", None).1, "info\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn drain_on_the_admin_port_sends_go_away_and_exits_zero() {
    let (dir, secret) = admin_secret_file("drain");
    let mut gate = Gate::start(&["--admin-secret-file", &secret]);
    let mut apps = [gate.login(41, 1), gate.login(42, 2)];
    let (code, body) = request(&gate, "POST", "/drain", Some(ADMIN_TOKEN));
    assert_eq!(code, 202, "{body}");
    for app in &mut apps {
        let reason = loop {
            let f = app.recv().expect("a go-away before the close");
            if let Some(g) = f.go_away() {
                break g.reason();
            }
        };
        assert_eq!(reason, GoAwayReason::Shutdown);
    }
    let st = gate.wait_exit();
    assert!(st.success(), "exit status {st:?}");
    let log = gate.log_text();
    assert!(log.contains("admin: drain requested") && log.contains("gate stopped"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn control_commands_without_the_right_token_are_refused() {
    // No admin.secret_file: the commands are off, whatever the request carries.
    let mut off = Gate::start(&[]);
    for path in ["/drain", "/log?level=debug"] {
        let (code, body) = request(&off, "POST", path, Some(ADMIN_TOKEN));
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("admin.secret_file"), "{body}");
    }
    assert_eq!(request(&off, "GET", "/log", None).1, "info\n");
    assert!(off.alive(), "a refused drain does not stop the gate");

    let (dir, secret) = admin_secret_file("refused");
    let mut on = Gate::start(&["--admin-secret-file", &secret]);
    let mut app = on.login(51, 1);
    for (token, what) in [(None, "missing"), (Some("0123456789abcdef-admin-tokeN"), "wrong")] {
        for path in ["/drain", "/log?level=trace"] {
            let (code, body) = request(&on, "POST", path, token);
            assert_eq!(code, 401, "{what} token on {path}: {body}");
        }
    }
    // A token of another scheme is not a bearer token, and a header line in the body is no header.
    let body = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    for raw in [
        format!("POST /drain HTTP/1.1\r\nAuthorization: Basic {ADMIN_TOKEN}\r\n\r\n"),
        format!("POST /drain HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    ] {
        let mut s = std::net::TcpStream::connect(on.admin).expect("connect");
        s.write_all(raw.as_bytes()).expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        assert!(resp.starts_with("HTTP/1.1 401"), "{raw:?}: {resp}");
    }
    assert_eq!(request(&on, "GET", "/log", None).1, "info\n", "the filter did not change");
    std::thread::sleep(Duration::from_millis(200));
    assert!(on.alive(), "the gate did not drain");
    app.keepalive().expect("the app's connection still serves");
    assert_eq!(on.log_text().matches("control command refused").count(), 6, "each refusal is logged");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_admin_token_file_the_gate_cannot_use_exits_64_naming_the_setting() {
    let dir = temp_dir("badtoken");
    let short = dir.join("short");
    std::fs::write(&short, "abc\n").expect("write");
    for path in [short, dir.join("missing")] {
        let stderr = common::refused_file("admin.secret_file", &path);
        assert!(!stderr.contains("abc"), "the file's content is never shown: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------------------------------------
// The Grafana dashboard
// ------------------------------------------------------------------------------------------------

/// Every PromQL text in the dashboard: the panels' expressions and the variables' queries.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(dash, &mut out);
    out
}

/// The `fleetgate_*` names a PromQL text uses.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("fleetgate_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The metric names a /metrics text offers: every sample's name, and every declared family
/// (a histogram's with its `_bucket`, `_sum` and `_count` series), so a counter still at zero
/// or a reason not yet seen counts as present.
fn offered_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut it = decl.split_whitespace();
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_the_alerts_and_operations_md_name_is_in_a_running_gates_metrics() {
    let text = std::fs::read_to_string(repo().join("ops/grafana/fleetgate.json"))
        .expect("ops/grafana/fleetgate.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "the dashboard has {} queries", queries.len());
    // A cluster-mode gate, so the cluster panels' metrics are rendered too.
    let redis = testkit::redis::RedisServer::start().expect("redis-server starts");
    let gate = Gate::start(&["--redis", &redis.url(), "--node-name", "dash-a"]);
    gate.eventually("the directory is up", || gate.metric("fleetgate_cluster_directory_up", "") == 1.0);
    let offered = offered_names(&gate.http_get("/metrics"));
    let mut used = std::collections::BTreeSet::new();
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query naming no fleetgate metric: {q}");
        used.extend(names);
    }
    let missing: Vec<&String> = used.iter().filter(|n| !offered.contains(*n)).collect();
    assert!(missing.is_empty(), "the dashboard names metrics the gate does not offer: {missing:?}");
    // The alert rules (YAML): the names on every line that is not a comment.
    let rules =
        std::fs::read_to_string(repo().join("ops/prometheus/fleetgate-alerts.yml")).expect("the rules");
    let in_rules: std::collections::BTreeSet<String> =
        rules.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(metric_names).collect();
    assert!(in_rules.len() >= 10, "the rules name {} metrics", in_rules.len());
    let missing: Vec<&String> = in_rules.iter().filter(|n| !offered.contains(*n)).collect();
    assert!(missing.is_empty(), "the alert rules name metrics the gate does not offer: {missing:?}");
    // docs/OPERATIONS.md's metric table and alerts: operators build on these names too. A name
    // ending in `_` is a family written with a wildcard (`fleetgate_cluster_*_total`).
    let doc = std::fs::read_to_string(repo().join("docs/OPERATIONS.md")).expect("docs/OPERATIONS.md");
    let in_doc: std::collections::BTreeSet<String> =
        metric_names(&doc).into_iter().filter(|n| !n.ends_with('_')).collect();
    assert!(in_doc.len() >= 40, "docs/OPERATIONS.md names {} metrics", in_doc.len());
    let missing: Vec<&String> = in_doc.iter().filter(|n| !offered.contains(*n)).collect();
    assert!(missing.is_empty(), "docs/OPERATIONS.md names metrics the gate does not offer: {missing:?}");
    // The families the dashboard is for, by name (a check on the check).
    for family in [
        "fleetgate_connections",
        "fleetgate_sessions",
        "fleetgate_held_sessions",
        "fleetgate_gps_points_in_total",
        "fleetgate_gps_points_forwarded_total",
        "fleetgate_gps_points_coalesced_total",
        "fleetgate_push_delivery_us_bucket",
        "fleetgate_push_receipt_us_bucket",
        "fleetgate_receipts_total",
        "fleetgate_mesh_hop_us_bucket",
        "fleetgate_connections_refused_total",
        "fleetgate_pushes_refused_total",
    ] {
        assert!(used.contains(family), "the dashboard does not show {family}");
    }
}

#[test]
fn receipts_are_counted_by_outcome() {
    let gate = Gate::start(&[]);
    let mut driver = gate.login(61, 1);
    let (server, events) = gate.appserver();
    // uid 62 never logged in: Offline; uid 61 acks: Delivered.
    server.push(&common::push_spec(7_001, &[61, 62], 30_000)).expect("push accepted");
    let delivery = common::next_push(&mut driver);
    driver.ack_push(&delivery).expect("ack");
    let got = common::receipts(&events, 2);
    assert_eq!(got.len(), 2, "{got:?}");
    let count = |outcome: &str| gate.metric("fleetgate_receipts_total", &format!("outcome=\"{outcome}\""));
    gate.eventually("both receipts counted", || count("Delivered") == 1.0 && count("Offline") == 1.0);
    assert_eq!(count("TtlExpired"), 0.0);
    assert_eq!(gate.metric("fleetgate_receipts_sent_total", ""), 2.0);
}

#[test]
fn the_name_scan_sees_through_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(fleetgate_push_delivery_us_bucket{a=\"b\"}[5m])))"
        ),
        ["fleetgate_push_delivery_us_bucket"]
    );
    let offered = offered_names("# TYPE fleetgate_x_us histogram\nfleetgate_y{shard=\"0\"} 1\n");
    assert!(offered.contains("fleetgate_x_us_bucket") && offered.contains("fleetgate_y"));
    assert!(!offered.contains("fleetgate_z"));
}
