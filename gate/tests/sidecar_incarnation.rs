//! What an app-server may conclude when its sidecar connections to a gate die (PROTOCOL.md §9.9),
//! against real gate processes: a cut connection to a live gate reconnects and its pending pushes
//! get their real receipts; a killed gate (restarted or not) ends them as GateLost within the
//! reconnect bound; the incarnation tells the two apart.

mod common;

use client::{AppServerEvent, ConnectOptions};
use common::{next_push, push_spec, Gate, EVENTUALLY};
use schema::wire::Outcome;
use std::time::{Duration, Instant};

/// Receives app-server events until `stop` says so; returns them all. Fails after `within`.
fn events_until(
    ev: &client::AppServerEvents,
    within: Duration,
    mut stop: impl FnMut(&AppServerEvent) -> bool,
) -> Vec<AppServerEvent> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ev.recv_timeout(left) {
            Ok(e) => {
                let done = stop(&e);
                got.push(e);
                if done {
                    return got;
                }
            }
            Err(e) => panic!("events stopped ({e:?}) before the end; got {got:?}"),
        }
    }
}

/// The incarnation the gate logged at start-up.
fn logged_incarnation(gate: &Gate) -> u64 {
    let mut found = None;
    gate.eventually("the start-up line logs the incarnation", || {
        found = gate.log_text().split("incarnation=").nth(1).and_then(|rest| {
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            u64::from_str_radix(&hex, 16).ok()
        });
        found.is_some()
    });
    found.expect("logged")
}

#[test]
fn incarnation_is_one_per_process_and_differs_between_processes() {
    let a = Gate::start(&[]);
    let b = Gate::start(&[]);
    let (a1, _ev_a) = a.appserver();
    let a2 = a1.connect_another().expect("second connection");
    let (b1, _ev_b) = b.appserver();
    let ia = a1.welcome().incarnation;
    assert_ne!(ia, 0, "a gate announces a non-zero incarnation");
    assert_eq!(a2.welcome().incarnation, ia, "every connection to one process sees the same");
    // Connections land on different shards (SO_REUSEPORT); all announce the same incarnation.
    let more: Vec<_> = (0..6).map(|_| a1.connect_another().expect("another connection")).collect();
    assert!(more.iter().all(|c| c.welcome().incarnation == ia));
    assert_ne!(b1.welcome().incarnation, ia, "another process draws another incarnation");
    assert_eq!(logged_incarnation(&a), ia);
    assert_eq!(logged_incarnation(&b), b1.welcome().incarnation);
}

#[test]
fn a_cut_connection_reconnects_and_pending_pushes_get_their_real_receipts() {
    let gate = Gate::start(&[]);
    let (srv, ev) = gate.appserver();
    let incarnation = srv.welcome().incarnation;
    let first = srv.conn_id();
    let mut app = gate.login(1, 1);
    srv.push(&push_spec(100, &[1], 60_000)).expect("push 100");
    srv.push(&push_spec(101, &[1], 60_000)).expect("push 101");
    let d100 = next_push(&mut app);
    let d101 = next_push(&mut app);
    assert_eq!(srv.pending_receipts(), 2);

    // The connection breaks (not closed by the app-server); one push is acked while it is down
    // or reconnecting, so its receipt waits at the gate.
    srv.sever();
    app.ack_push(&d100).expect("ack 100");
    let got = events_until(&ev, EVENTUALLY, |e| matches!(e, AppServerEvent::Reconnected { .. }));
    assert!(got.contains(&AppServerEvent::ConnectionLost { conn: first }), "{got:?}");
    let Some(AppServerEvent::Reconnected { conn, incarnation: again }) = got.last().cloned() else {
        unreachable!()
    };
    assert_eq!((conn, again), (srv.conn_id(), incarnation));
    assert_ne!(conn, first, "the handle got a new connection");

    // The other push is acked after the reconnect; both end Delivered, never GateLost.
    app.ack_push(&d101).expect("ack 101");
    let mut receipts = Vec::new();
    for e in got {
        if let AppServerEvent::Receipt { message_id, uid, outcome } = e {
            receipts.push((message_id, uid, outcome));
        }
    }
    let rest = events_until(&ev, EVENTUALLY, |e| {
        if let AppServerEvent::Receipt { message_id, uid, outcome } = e {
            receipts.push((*message_id, *uid, *outcome));
        }
        receipts.len() == 2 || matches!(e, AppServerEvent::GateLost)
    });
    receipts.sort_unstable();
    assert_eq!(receipts, vec![(100, 1, Outcome::Delivered), (101, 1, Outcome::Delivered)], "{rest:?}");
    assert_eq!((srv.pending_receipts(), srv.late_receipts()), (0, 0));

    // The reconnected handle pushes on; nothing reports the gate lost.
    srv.push(&push_spec(102, &[1], 60_000)).expect("push after the reconnect");
    let d102 = next_push(&mut app);
    app.ack_push(&d102).expect("ack 102");
    let tail = events_until(&ev, EVENTUALLY, |e| matches!(e, AppServerEvent::Receipt { .. }));
    assert_eq!(
        tail.last(),
        Some(&AppServerEvent::Receipt { message_id: 102, uid: 1, outcome: Outcome::Delivered })
    );
    std::thread::sleep(Duration::from_millis(200));
    let late: Vec<_> = ev.try_iter().collect();
    assert!(
        !tail.iter().chain(&late).any(|e| matches!(e, AppServerEvent::GateLost)),
        "no GateLost: {tail:?} {late:?}"
    );
}

/// Pushes to uids 1 and 2 (online, never acking) and waits until both apps have them.
fn pending_pushes(gate: &Gate, srv: &client::AppServerConn) -> Vec<client::AppConn> {
    let mut apps = vec![gate.login(1, 1), gate.login(2, 1)];
    srv.push(&push_spec(200, &[1, 2], 60_000)).expect("push 200");
    for app in &mut apps {
        let _ = next_push(app);
    }
    assert_eq!(srv.pending_receipts(), 2);
    apps
}

/// Collects events until GateLost; returns the receipts and when GateLost came.
fn until_gate_lost(ev: &client::AppServerEvents) -> (Vec<(u64, u64, Outcome)>, Instant) {
    let got = events_until(ev, EVENTUALLY, |e| matches!(e, AppServerEvent::GateLost));
    let at = Instant::now();
    let mut receipts: Vec<_> = got
        .iter()
        .filter_map(|e| match e {
            AppServerEvent::Receipt { message_id, uid, outcome } => Some((*message_id, *uid, *outcome)),
            _ => None,
        })
        .collect();
    receipts.sort_unstable();
    assert!(!got.iter().any(|e| matches!(e, AppServerEvent::Reconnected { .. })), "{got:?}");
    (receipts, at)
}

#[test]
fn a_killed_gate_ends_pending_pairs_as_gate_lost_within_the_bound() {
    let mut gate = Gate::start(&[]);
    let bound = Duration::from_millis(1500);
    let (srv, ev) = gate.appserver_with(ConnectOptions::new(Duration::from_secs(5)).reconnect_within(bound));
    let _apps = pending_pushes(&gate, &srv);
    gate.kill();
    let killed = Instant::now();
    let (receipts, at) = until_gate_lost(&ev);
    assert_eq!(receipts, vec![(200, 1, Outcome::GateLost), (200, 2, Outcome::GateLost)]);
    let took = at - killed;
    assert!(took >= bound - Duration::from_millis(300), "declared lost before the bound: {took:?}");
    assert!(took < bound + Duration::from_secs(3), "declared lost long after the bound: {took:?}");
    assert_eq!(srv.pending_receipts(), 0);
}

#[test]
fn a_gate_restarted_on_the_same_ports_is_another_incarnation_and_pending_pairs_are_gate_lost() {
    let mut gate = Gate::start(&[]);
    let (app_port, sidecar_port) = (gate.app.port(), gate.sidecar.port());
    // A bound far longer than the restart takes: the incarnation, not the bound, decides.
    let bound = Duration::from_secs(30);
    let (srv, ev) = gate.appserver_with(ConnectOptions::new(Duration::from_secs(5)).reconnect_within(bound));
    let before = srv.welcome().incarnation;
    let apps = pending_pushes(&gate, &srv);
    gate.kill();
    drop(apps);
    let killed = Instant::now();
    let restarted = Gate::start_at(app_port, sidecar_port, &[]);
    let (receipts, at) = until_gate_lost(&ev);
    assert_eq!(receipts, vec![(200, 1, Outcome::GateLost), (200, 2, Outcome::GateLost)]);
    assert!(at - killed < Duration::from_secs(10), "the restart was told by the incarnation, not the bound");
    // The new process is another incarnation; the group may be reopened to it.
    let again = srv.connect_another().expect("reopen the group to the restarted gate");
    assert_ne!(again.welcome().incarnation, before);
    assert_eq!(again.welcome().incarnation, logged_incarnation(&restarted));
    assert_eq!(srv.late_receipts(), 0, "a new process owes nothing of the old one's");
}
