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
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{workspace_gate_bin, GateProcess};

/// Key of the gate's app login tokens.
const TOKEN_SECRET: &[u8] = b"session-test-token-secret";
/// Key of the gate's sidecar hello.
const SIDECAR_SECRET: &[u8] = b"session-test-sidecar-secret";
/// "Eventually" bound for anything the test waits for.
const EVENTUALLY: Duration = Duration::from_secs(15);
/// The pushed-to user.
const UID: u64 = 7;

/// A gate on free ports: the workspace's gate binary (built first when missing).
fn start_gate() -> GateProcess {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("client sits in the workspace");
    let bin = workspace_gate_bin(root).expect("gate binary");
    let token = String::from_utf8_lossy(TOKEN_SECRET).into_owned();
    let sidecar = String::from_utf8_lossy(SIDECAR_SECRET).into_owned();
    let args = ["--cores", "0", "--hold-ms", "10000", "--token-secret", &token, "--sidecar-secret", &sidecar];
    GateProcess::start(&bin, &args, EVENTUALLY).expect("gate starts")
}

/// Waits until the gate's `name` metric (summed over shards) reaches `at_least`.
fn wait_metric(gate: &GateProcess, name: &str, at_least: f64) {
    let deadline = Instant::now() + EVENTUALLY;
    while gate.metric(name, "", EVENTUALLY).unwrap_or(0.0) < at_least {
        assert!(Instant::now() < deadline, "{name} never reached {at_least}; gate log:\n{}", gate.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn session_config(gates: Vec<SocketAddr>) -> SessionConfig {
    let mut cfg = SessionConfig::new(gates, || dev_token(TOKEN_SECRET, UID, 1, Duration::from_secs(3600)));
    cfg.device = "session-test".to_owned();
    // The gate below runs in plaintext (the launcher's default); tests/secure_session.rs runs
    // the same flows over the secure channel.
    cfg.server_key = None;
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
    let gate = start_gate();
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
    wait_metric(&gate, "fleetgate_held_sessions", 1.0);
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
    let gate = start_gate();
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
