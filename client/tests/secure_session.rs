//! `AppSession` over the secure channel (docs/PROTOCOL.md §14) against a real gate process in
//! secure mode: login in the handshake, a push and its ack sealed both ways, a dropped
//! connection resumed with a ResumeHello (no static-key handshake), a resume whose Accept was
//! lost, whose commit was lost (retried with the previous secret), whose Session answer was lost
//! after the commit, and a wrong gate key reported at once.
//!
//! Connections go through a small proxy in this file that can cut one connection at a chosen
//! step of the handshake; the gate advertises the proxy as its node, so every reconnect goes
//! through it too.

use client::appserver::{AppServerConn, AppServerEvents, Event, PushSpec};
use client::session::{AppEvent, AppSession, Outcome, SessionConfig};
use client::{dev_token, ClientError};
use schema::wire::{GpsPoint, Outcome as Receipt};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use testkit::{workspace_gate_bin, GateProcess};

/// Key of the gate's app login tokens.
const TOKEN_SECRET: &[u8] = b"secure-session-token-secret";
/// Key of the gate's sidecar hello.
const SIDECAR_SECRET: &[u8] = b"secure-session-sidecar-secret";
/// "Eventually" bound for anything the test waits for.
const EVENTUALLY: Duration = Duration::from_secs(15);
/// The pushed-to user.
const UID: u64 = 9;

/// Where the proxy cuts a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Nowhere: bytes pass both ways.
    Pass,
    /// The gate's Accept never reaches the app: the gate committed nothing.
    Accept,
    /// The Accept reaches the app, the app's commit record never reaches the gate.
    Commit,
    /// The gate reads the commit and answers; its Session answer never reaches the app.
    Session,
}

/// A TCP proxy in front of the gate's app port; each new connection takes the next cut queued.
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    cuts: Arc<Mutex<VecDeque<Cut>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let cuts: Arc<Mutex<VecDeque<Cut>>> = Arc::new(Mutex::new(VecDeque::new()));
        let (t, c) = (target.clone(), cuts.clone());
        thread::spawn(move || {
            for app in listener.incoming() {
                let Ok(app) = app else { return };
                let cut = c.lock().expect("cuts").pop_front().unwrap_or(Cut::Pass);
                let Some(to) = *t.lock().expect("target") else { continue };
                let Ok(gate) = TcpStream::connect(to) else { continue };
                relay(app, gate, cut);
            }
        });
        Proxy { addr, target, cuts }
    }

    fn point_at(&self, gate: SocketAddr) {
        *self.target.lock().expect("target") = Some(gate);
    }

    /// The next connection is cut at `cut`.
    fn cut_next(&self, cut: Cut) {
        self.cuts.lock().expect("cuts").push_back(cut);
    }
}

/// Moves bytes between the app and the gate until either side ends, cutting at `cut`. The gate
/// sends nothing between its Accept and the app's commit, so its first read is the Accept and
/// its second the Session answer.
fn relay(app: TcpStream, gate: TcpStream, cut: Cut) {
    let to_gate_stopped = Arc::new(AtomicBool::new(false));
    let (mut app_r, mut gate_w) = (app.try_clone().expect("clone"), gate.try_clone().expect("clone"));
    let stopped = to_gate_stopped.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match app_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                // After a cut the app's bytes are read and dropped, so closing sends no RST.
                Ok(_) if stopped.load(Ordering::SeqCst) => {}
                Ok(n) => {
                    if gate_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = gate_w.shutdown(Shutdown::Write);
    });
    let (mut gate_r, mut app_w) = (gate, app);
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut reads = 0;
        loop {
            let n = match gate_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reads += 1;
            match (cut, reads) {
                (Cut::Accept, 1) | (Cut::Session, 2) => break,
                (Cut::Commit, 1) => {
                    to_gate_stopped.store(true, Ordering::SeqCst);
                    let _ = app_w.write_all(&buf[..n]);
                    // The app reads the Accept and sends its commit, which goes nowhere.
                    thread::sleep(Duration::from_millis(300));
                    break;
                }
                _ => {
                    if app_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = gate_r.shutdown(Shutdown::Both);
        let _ = app_w.shutdown(Shutdown::Both);
    });
}

/// A gate in secure mode with the development key, advertising `node` to its apps.
fn start_gate(node: SocketAddr) -> GateProcess {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("client sits in the workspace");
    let bin = workspace_gate_bin(root).expect("gate binary");
    let token = String::from_utf8_lossy(TOKEN_SECRET).into_owned();
    let sidecar = String::from_utf8_lossy(SIDECAR_SECRET).into_owned();
    let node = node.to_string();
    let args = [
        "--app-plaintext",
        "false",
        "--cores",
        "0",
        "--hold-ms",
        "10000",
        "--token-secret",
        &token,
        "--sidecar-secret",
        &sidecar,
        "--advertise",
        &node,
    ];
    GateProcess::start(&bin, &args, EVENTUALLY).expect("gate starts")
}

/// A gate behind a proxy, an app-server, and a session configured for the proxy.
fn setup() -> (Proxy, GateProcess, AppServerConn, AppServerEvents, AppSession) {
    let proxy = Proxy::start();
    let gate = start_gate(proxy.addr);
    proxy.point_at(gate.app);
    let (srv, events) = AppServerConn::connect(gate.sidecar, SIDECAR_SECRET, "secure-test", EVENTUALLY)
        .expect("app-server connects");
    let mut cfg =
        SessionConfig::new(vec![proxy.addr], || dev_token(TOKEN_SECRET, UID, 1, Duration::from_secs(3600)));
    cfg.device = "secure-session-test".to_owned();
    cfg.read_timeout = Duration::from_secs(5);
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.max_attempts = 5;
    assert!(cfg.server_key.is_some(), "secure by default, with the development key");
    (proxy, gate, srv, events, AppSession::new(cfg))
}

fn handshakes(gate: &GateProcess, kind: &str) -> f64 {
    gate.metric("fleetgate_handshakes_total", &format!("kind=\"{kind}\""), EVENTUALLY).expect("metrics")
}

/// Waits until the gate's `name` metric (summed over shards) reaches `at_least`.
fn wait_metric(gate: &GateProcess, name: &str, at_least: f64) {
    let deadline = Instant::now() + EVENTUALLY;
    while gate.metric(name, "", EVENTUALLY).unwrap_or(0.0) < at_least {
        assert!(Instant::now() < deadline, "{name} never reached {at_least}; gate log:\n{}", gate.log_text());
        thread::sleep(Duration::from_millis(25));
    }
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

/// The next `n` receipts, as (message_id, outcome).
fn receipts(events: &AppServerEvents, n: usize) -> Vec<(u64, Receipt)> {
    let deadline = Instant::now() + EVENTUALLY;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Receipt { message_id, outcome, .. }) => out.push((message_id, outcome)),
            Ok(_) => {}
            Err(e) => panic!("only {out:?} of {n} receipts: {e}"),
        }
    }
    out
}

/// The next session event, which must be a push: (message_id, redelivery).
fn next_push(s: &mut AppSession) -> (u64, bool) {
    match s.recv() {
        Ok(AppEvent::Push { message_id, redelivery, .. }) => (message_id, redelivery),
        other => panic!("expected a push, got {other:?}"),
    }
}

/// The session drops its connection; the gate holds it; message `id` is queued meanwhile.
fn drop_and_queue(s: &mut AppSession, gate: &GateProcess, srv: &AppServerConn, id: u64) {
    s.drop_connection();
    wait_metric(gate, "fleetgate_held_sessions", 1.0);
    push(srv, id);
}

#[test]
fn login_push_ack_and_a_resume_without_a_static_key_handshake() {
    let (_proxy, gate, srv, events, mut s) = setup();
    assert_eq!(s.connect().expect("login over the secure channel"), Outcome::LoggedIn);
    assert_eq!((handshakes(&gate, "login"), handshakes(&gate, "resume")), (1.0, 0.0));
    let info = s.session_info().expect("session");
    assert!(info.resume_secret.is_some(), "the session keeps its resumption secret");
    let first_secret = info.resume_secret;

    push(&srv, 1);
    assert_eq!(next_push(&mut s), (1, false));
    assert_eq!(receipts(&events, 1), vec![(1, Receipt::Delivered)], "the ack went out sealed");

    // The connection lent out speaks the channel too: a GPS fix and a keepalive round trip.
    let conn = s.conn().expect("connected");
    let log_id = conn.new_log_id();
    conn.send_gps(log_id, &GpsPoint::new(1, 2, 3, 4, 5, 6, 0)).expect("gps");
    conn.keepalive().expect("a keepalive through the lent channel");
    push(&srv, 2);
    assert_eq!(next_push(&mut s), (2, false), "the session reads on after taking the channel back");
    assert_eq!(receipts(&events, 1), vec![(2, Receipt::Delivered)]);

    // Dropped: the resume is a ResumeHello with the session's secret, no IK.
    drop_and_queue(&mut s, &gate, &srv, 3);
    assert_eq!(s.connect().expect("resume"), Outcome::Resumed);
    assert_eq!((handshakes(&gate, "login"), handshakes(&gate, "resume")), (1.0, 1.0));
    assert_ne!(s.session_info().and_then(|i| i.resume_secret), first_secret, "the secret moved on");
    assert_eq!(next_push(&mut s), (3, false));
    assert_eq!(receipts(&events, 1), vec![(3, Receipt::Delivered)]);
    assert_eq!(s.server_key(), Some(*channel::Keypair::dev().public()));
    s.logout().expect("logout");
}

#[test]
fn a_resume_whose_accept_was_lost_is_made_again_with_the_same_secret() {
    let (proxy, gate, srv, events, mut s) = setup();
    assert_eq!(s.connect().expect("login"), Outcome::LoggedIn);
    drop_and_queue(&mut s, &gate, &srv, 1);
    proxy.cut_next(Cut::Accept);
    let attempts = s.reconnect_attempts();
    assert_eq!(s.connect().expect("resume after the lost Accept"), Outcome::Resumed);
    assert_eq!(s.reconnect_attempts() - attempts, 2, "the cut attempt, then the resume");
    assert_eq!((handshakes(&gate, "login"), handshakes(&gate, "resume")), (1.0, 2.0));
    assert_eq!(next_push(&mut s), (1, false));
    assert_eq!(receipts(&events, 1), vec![(1, Receipt::Delivered)]);
}

#[test]
fn a_resume_whose_commit_was_lost_is_made_again_with_the_previous_secret() {
    let (proxy, gate, srv, events, mut s) = setup();
    assert_eq!(s.connect().expect("login"), Outcome::LoggedIn);
    drop_and_queue(&mut s, &gate, &srv, 1);
    proxy.cut_next(Cut::Commit);
    let attempts = s.reconnect_attempts();
    assert_eq!(s.connect().expect("resume after the lost commit"), Outcome::Resumed);
    // The cut one; the newest secret, which the gate never committed (Reject UnknownSession);
    // the previous one.
    assert_eq!(s.reconnect_attempts() - attempts, 3);
    assert_eq!(gate.metric("fleetgate_channel_errors_total", "kind=\"refused\"", EVENTUALLY), Ok(1.0));
    assert_eq!((handshakes(&gate, "login"), handshakes(&gate, "resume")), (1.0, 2.0));
    assert_eq!(next_push(&mut s), (1, false));
    assert_eq!(receipts(&events, 1), vec![(1, Receipt::Delivered)]);
}

#[test]
fn a_resume_whose_session_answer_was_lost_after_the_commit_resumes_with_the_newest_secret() {
    let (proxy, gate, srv, events, mut s) = setup();
    assert_eq!(s.connect().expect("login"), Outcome::LoggedIn);
    drop_and_queue(&mut s, &gate, &srv, 1);
    proxy.cut_next(Cut::Session);
    let attempts = s.reconnect_attempts();
    assert_eq!(s.connect().expect("resume after the lost Session"), Outcome::Resumed);
    // The gate committed the cut one and rotated the token the app never saw; the newest
    // secret proves the old token current.
    assert_eq!(s.reconnect_attempts() - attempts, 2);
    assert_eq!((handshakes(&gate, "login"), handshakes(&gate, "resume")), (1.0, 2.0));
    // Push 1 went out on the cut connection too: now it is replayed, flagged.
    assert_eq!(next_push(&mut s), (1, true));
    assert_eq!(receipts(&events, 1), vec![(1, Receipt::Delivered)]);
}

#[test]
fn a_wrong_gate_key_is_a_clear_error_at_once() {
    let (_proxy, gate, _srv, _events, _) = setup();
    let mut cfg =
        SessionConfig::new(vec![gate.app], || dev_token(TOKEN_SECRET, UID, 1, Duration::from_secs(3600)));
    cfg.server_key = Some(*channel::Keypair::generate().public());
    cfg.read_timeout = Duration::from_secs(5);
    let mut s = AppSession::new(cfg);
    let started = Instant::now();
    match s.connect() {
        Err(ClientError::Channel(channel::ChannelError::RejectedByGate { reason, .. })) => {
            assert_eq!(reason, channel::RejectReason::UnknownKey);
        }
        other => panic!("a gate that does not hold the key: {other:?}"),
    }
    assert_eq!(s.reconnect_attempts(), 1, "not retried");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(s.resume_token().is_none() && s.session_info().is_none());
}
