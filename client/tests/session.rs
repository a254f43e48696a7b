//! `AppSession` against a real gate process: a dropped connection resumes and replays what was
//! not acked, each push is shown once and gets one Delivered receipt, a used resume token is
//! refused, and a restarted gate (the session gone) is met with a fresh login.
//!
//! The gate binary is not a dependency of this crate, so it is found in the workspace's target
//! folder and built there first when missing.

use client::appserver::{AppServerConn, AppServerEvents, Event, PushSpec};
use client::session::{AppEvent, AppSession, Outcome, SessionConfig};
use client::{dev_token, AppConn, ClientError};
use schema::wire::{ErrorCode, Outcome as Receipt};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Key of the gate's app login tokens.
const TOKEN_SECRET: &[u8] = b"session-test-token-secret";
/// Key of the gate's sidecar hello.
const SIDECAR_SECRET: &[u8] = b"session-test-sidecar-secret";
/// "Eventually" bound for anything the test waits for.
const EVENTUALLY: Duration = Duration::from_secs(15);
/// The pushed-to user.
const UID: u64 = 7;

/// The workspace root: this crate's parent folder.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("client sits in the workspace").to_path_buf()
}

/// The gate binary, built once per test process when it is not there yet.
fn gate_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
            Some(t) if t.is_relative() => root.join(t),
            Some(t) => t,
            None => root.join("target"),
        };
        let bin = target.join("debug").join("gate");
        if !bin.exists() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "gate"])
                .current_dir(&root)
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build -p gate failed: {status}");
        }
        assert!(bin.exists(), "no gate binary at {}", bin.display());
        bin
    })
}

/// A gate process on free ports; killed when dropped (abruptly: a crash, as far as apps see).
struct Gate {
    child: Child,
    app: SocketAddr,
    sidecar: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    dir: PathBuf,
}

impl Gate {
    fn start() -> Gate {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("fleetgate-session-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ports = dir.join("ports");
        let log = dir.join("gate.log");
        let child = Command::new(gate_bin())
            .arg("--ports-file")
            .arg(&ports)
            .args(["--app-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--sidecar-listen", "127.0.0.1:0", "--cores", "0", "--hold-ms", "10000"])
            .arg("--token-secret")
            .arg(String::from_utf8_lossy(TOKEN_SECRET).as_ref())
            .arg("--sidecar-secret")
            .arg(String::from_utf8_lossy(SIDECAR_SECRET).as_ref())
            .env("FLEETGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("gate starts");
        let deadline = Instant::now() + EVENTUALLY;
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ports) {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "gate wrote no ports file; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let port = |name: &str| -> SocketAddr {
            let p = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .and_then(|p| p.trim().parse::<u16>().ok())
                .unwrap_or_else(|| panic!("no {name} port in {text:?}"));
            SocketAddr::from(([127, 0, 0, 1], p))
        };
        Gate { child, app: port("app"), sidecar: port("sidecar"), admin: port("admin"), log, dir }
    }

    /// Sum of a gauge's or counter's samples over all shards.
    fn metric(&self, name: &str) -> f64 {
        let mut s = TcpStream::connect(self.admin).expect("admin connect");
        s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        resp.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let n = series.split_once('{').map_or(series, |(n, _)| n);
                (n == name).then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }

    fn eventually(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + EVENTUALLY;
        while !f() {
            assert!(Instant::now() < deadline, "never happened: {what}; gate log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn session_config(gates: Vec<SocketAddr>) -> SessionConfig {
    let mut cfg = SessionConfig::new(gates, || dev_token(TOKEN_SECRET, UID, 1, Duration::from_secs(3600)));
    cfg.device = "session-test".to_owned();
    cfg.read_timeout = Duration::from_secs(5);
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.max_attempts = 5;
    cfg
}

fn push(srv: &AppServerConn, message_id: u64) {
    let accepted = srv
        .push(&PushSpec {
            message_id,
            uids: vec![UID],
            payload: format!("offer {message_id}").into_bytes(),
            ttl_ms: 60_000,
            kind: 1,
            ..PushSpec::default()
        })
        .expect("push accepted");
    assert_eq!(accepted.targets, 1);
}

/// The next `n` receipts, in arrival order, as (message_id, uid, outcome).
fn receipts(events: &AppServerEvents, n: usize) -> Vec<(u64, u64, Receipt)> {
    let deadline = Instant::now() + EVENTUALLY;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Receipt { message_id, uid, outcome }) => out.push((message_id, uid, outcome)),
            Ok(_) => {}
            Err(e) => panic!("only {out:?} of {n} receipts: {e}"),
        }
    }
    out
}

/// The next session event, which must be a push: (message_id, payload, redelivery).
fn next_push(s: &mut AppSession) -> (u64, Vec<u8>, bool) {
    match s.recv() {
        Ok(AppEvent::Push { message_id, payload, redelivery, .. }) => (message_id, payload, redelivery),
        other => panic!("expected a push, got {other:?}"),
    }
}

#[test]
fn session_resumes_replays_each_push_once_and_logs_in_after_a_gate_restart() {
    let gate = Gate::start();
    let (srv, events) = AppServerConn::connect(gate.sidecar, SIDECAR_SECRET, "session-test", EVENTUALLY)
        .expect("app-server connects");
    let mut s = AppSession::new(session_config(vec![gate.app]));
    assert_eq!(s.connect().expect("first connect"), Outcome::LoggedIn);
    assert_eq!(s.node(), Some(gate.app.to_string().as_str()));
    assert_eq!(s.resume_token().map(<[u8]>::len), Some(37));

    // Message 1 arrives but is read below the session, so nothing acks it.
    push(&srv, 1);
    let raw = s.conn().expect("connected").recv().expect("push 1");
    assert_eq!(raw.delivery().map(|d| (d.message_id, d.redelivery)), Some((1, false)));
    let used_token = s.resume_token().expect("token").to_vec();
    s.drop_connection();
    assert!(s.conn().is_none() && s.resume_token() == Some(&used_token[..]));

    // Message 2 is queued on the held session.
    gate.eventually("the session is held", || gate.metric("fleetgate_held_sessions") >= 1.0);
    push(&srv, 2);

    assert_eq!(s.connect().expect("resume"), Outcome::Resumed);
    assert_ne!(s.resume_token(), Some(&used_token[..]), "the token rotates on resume");
    assert_eq!(next_push(&mut s), (1, b"offer 1".to_vec(), true));
    assert_eq!(next_push(&mut s), (2, b"offer 2".to_vec(), false));
    assert_eq!(receipts(&events, 2), vec![(1, UID, Receipt::Delivered), (2, UID, Receipt::Delivered)]);

    // A message id shown before (the gate no longer tracks 1) is acked but not shown again.
    push(&srv, 1);
    push(&srv, 3);
    assert_eq!(next_push(&mut s).0, 3);
    assert_eq!(s.duplicates_suppressed(), 1);
    assert_eq!(receipts(&events, 2), vec![(1, UID, Receipt::Delivered), (3, UID, Receipt::Delivered)]);
    assert_eq!(srv.duplicate_receipts(), 0, "the gate sent one receipt per (message, uid)");
    assert_eq!(srv.pending_receipts(), 0);

    // The token used for the resume is refused from now on.
    let mut other = AppConn::connect(gate.app, EVENTUALLY).expect("connect");
    other.set_read_timeout(EVENTUALLY).expect("timeout");
    match other.resume(&used_token) {
        Err(ClientError::Server { code: ErrorCode::ResumeRefused, .. }) => {}
        r => panic!("the used resume token should be refused, got {r:?}"),
    }
    drop(other);
    // And the session was not disturbed by the attempt.
    s.conn().expect("connected").keepalive().expect("keepalive on the resumed session");

    // The gate dies; a new one (on another port) knows nothing of the session.
    let old_app = gate.app;
    drop(srv);
    drop(events);
    drop(gate);
    match s.recv() {
        Err(ClientError::Closed | ClientError::Io(_)) => {}
        other => panic!("the dead gate's connection should end, got {other:?}"),
    }
    let gate = Gate::start();
    assert_ne!(gate.app, old_app);
    s.set_gates(vec![gate.app]);
    let attempts_before = s.reconnect_attempts();
    assert_eq!(s.connect().expect("login after the restart"), Outcome::LoggedIn);
    assert_eq!(
        s.reconnect_attempts() - attempts_before,
        2,
        "the old node first (refused), then the new gate"
    );
    assert_eq!((s.resumed(), s.relogins(), s.logins()), (1, 1, 2));
    assert_eq!(s.node(), Some(gate.app.to_string().as_str()));
    s.logout().expect("logout");
    assert!(s.resume_token().is_none());
}
