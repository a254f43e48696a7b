//! Stress on a 2-shard gate: app-server connections come, go and ack while pushes, receipts,
//! drops and resumes run, checked by an audit: every (message id, uid) of every accepted push
//! ends in exactly one receipt, no receipt says the gate was lost (it never was), every
//! Delivered push was seen by its app, and no app was shown a message twice without the
//! redelivery flag. The gate must survive it (a panic would stop it with exit status 70).

mod common;

use client::{AppConn, AppServerEvent, ClientError, PushSpec};
use common::{token, Gate, EVENTUALLY};
use schema::wire::Outcome;
use schema::Cmd;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const APPS: u64 = 24;
const PUSHES: u64 = 240;
const RUN: Duration = Duration::from_secs(6);

/// What one app saw: message ids shown (first deliveries), and any shown twice without the flag.
#[derive(Default)]
struct Seen {
    shown: HashSet<u64>,
    twice: Vec<u64>,
}

/// One app: receives and acks every push; now and then drops its connection and resumes (or
/// logs in afresh when the resume is refused).
fn app(
    gate_addr: std::net::SocketAddr,
    secure: bool,
    uid: u64,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    // Answers are waited for patiently; pushes are polled every 100 ms.
    let connect = || {
        let mut c = if secure {
            let key = *channel::Keypair::dev().public();
            AppConn::connect_secure(gate_addr, Duration::from_secs(5), key).expect("connect")
        } else {
            AppConn::connect(gate_addr, Duration::from_secs(5)).expect("connect")
        };
        c.set_read_timeout(EVENTUALLY).expect("timeout");
        c
    };
    let polling = |c: &mut AppConn| c.set_read_timeout(Duration::from_millis(100)).expect("timeout");
    let mut conn = connect();
    let mut session = conn.login(&token(uid, 1), "stress").expect("login");
    polling(&mut conn);
    let mut rng = uid.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next_drop = Instant::now() + Duration::from_millis(300 + uid * 37 % 700);
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_drop {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            next_drop = Instant::now() + Duration::from_millis(400 + rng % 900);
            let _ = conn.shutdown();
            conn = connect();
            session = match conn.resume_session(&session) {
                Ok(s) => s,
                Err(ClientError::Server { .. }) => conn.login(&token(uid, 1), "stress").expect("login"),
                // The channel refused the resume (its secret was replaced by a commit this app
                // did not see confirmed): a new connection logs in afresh.
                Err(ClientError::Channel(_)) => {
                    conn = connect();
                    conn.login(&token(uid, 1), "stress").expect("login")
                }
                Err(e) => panic!("uid {uid}: resume failed: {e}"),
            };
            polling(&mut conn);
            continue;
        }
        match conn.recv() {
            Ok(f) if f.cmd == Cmd::PushDelivery => {
                let d = f.delivery().expect("delivery");
                {
                    let mut s = seen.lock().unwrap();
                    if !s.shown.insert(d.message_id) && !d.redelivery {
                        s.twice.push(d.message_id);
                    }
                }
                if conn.ack_push(&f).is_err() {
                    next_drop = Instant::now();
                }
            }
            Ok(_) | Err(ClientError::Timeout) => {}
            // Dropped under us (displaced, a go-away): reconnect at once.
            Err(_) => next_drop = Instant::now(),
        }
    }
}

#[test]
fn app_servers_churn_while_pushes_receipts_and_resumes_run() {
    let mut gate = Gate::start(&["--hold-ms", "5000"]);
    let (srv, events) = gate.appserver();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..APPS).map(|_| Arc::new(Mutex::new(Seen::default()))).collect();
    let apps: Vec<_> = (0..APPS)
        .map(|i| {
            let (addr, secure, stop, seen) =
                (gate.app, gate.secure(), stop.clone(), seen[i as usize].clone());
            std::thread::spawn(move || app(addr, secure, 1_000 + i, stop, seen))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // App-server connections come and go beside the one that pushes: receipts sent on one that
    // goes are resent on another.
    let churn = {
        let (srv, stop) = (srv.connect_another().expect("another connection"), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let extra = srv.connect_another().expect("another connection");
                std::thread::sleep(Duration::from_millis(50 + n * 31 % 200));
                if n.is_multiple_of(2) {
                    extra.sever();
                } else {
                    let _ = extra.close();
                }
                n += 1;
            }
            n
        })
    };

    // Pushes, each to three drivers, spread over the run.
    let mut owed: HashMap<(u64, u64), u32> = HashMap::new();
    let t0 = Instant::now();
    for id in 1..=PUSHES {
        let uids: Vec<u64> = (0..3).map(|k| 1_000 + (id * 7 + k * 5) % APPS).collect();
        let spec = PushSpec {
            message_id: id,
            uids: uids.clone(),
            payload: format!("offer {id}").into_bytes(),
            ttl_ms: 3_000,
            broadcast: 0,
            kind: 1,
            log_id: 0,
        };
        let accepted = srv.push(&spec).expect("push accepted");
        assert_eq!(accepted.targets as usize, uids.iter().collect::<HashSet<_>>().len());
        for uid in uids {
            owed.insert((id, uid), 0);
        }
        let due = t0 + RUN.mul_f64(id as f64 / PUSHES as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }

    // Every pair ends within TTL + 1 s of its push; collect until all are in.
    let mut outcomes: HashMap<(u64, u64), Outcome> = HashMap::new();
    let deadline = Instant::now() + EVENTUALLY;
    while outcomes.len() < owed.len() {
        assert!(Instant::now() < deadline, "{} of {} receipts came", outcomes.len(), owed.len());
        if let Ok(AppServerEvent::Receipt { message_id, uid, outcome }) =
            events.recv_timeout(Duration::from_millis(100))
        {
            let n = owed
                .get_mut(&(message_id, uid))
                .unwrap_or_else(|| panic!("a receipt for a pair never pushed: {message_id}/{uid}"));
            *n += 1;
            outcomes.insert((message_id, uid), outcome);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for a in apps {
        a.join().expect("app thread");
    }
    let cycles = churn.join().expect("churn thread");
    assert!(cycles > 5, "the app-server connections churned ({cycles} cycles)");

    // The audit.
    assert!(owed.values().all(|&n| n == 1), "a pair got more than one receipt");
    let lost = outcomes.values().filter(|o| **o == Outcome::GateLost).count();
    assert_eq!(lost, 0, "the gate was never lost");
    let delivered = outcomes.iter().filter(|(_, o)| **o == Outcome::Delivered).count();
    assert!(delivered > owed.len() / 2, "most pushes delivered ({delivered} of {})", owed.len());
    for ((message_id, uid), o) in &outcomes {
        if *o == Outcome::Delivered {
            let s = seen[(uid - 1_000) as usize].lock().unwrap();
            assert!(s.shown.contains(message_id), "{message_id} Delivered to {uid} but never seen");
        }
    }
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap();
        assert!(
            s.twice.is_empty(),
            "uid {} shown {:?} twice without the redelivery flag",
            1_000 + i,
            s.twice
        );
    }
    assert!(gate.alive(), "the gate survived; log:\n{}", gate.log_text());
    assert!(gate.terminate().success(), "the gate drained and exited 0");
}
