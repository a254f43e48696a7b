//! The app port on the shard's own io_uring (`--app-io uring`), at the kernel's edges: the
//! buffer ring running dry, receives that end and are re-armed, a completion queue that
//! overflows, a peer that resets, and closes that cancel the receive. Every other integration
//! test runs against this mode too (`make test` runs the gate's suites with
//! `FLEETGATE_APP_IO=uring`).

mod common;

use common::{point, Gate, EVENTUALLY};
use schema::wire::ErrorCode;
use schema::Cmd;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn uring_gate(extra: &[&str]) -> Gate {
    let mut args = vec!["--cores", "0", "--app-io", "uring"];
    args.extend_from_slice(extra);
    Gate::start(&args)
}

/// Sends `n` GPS frames from each of `drivers` connections, back to back, then waits until the
/// gate counted them all.
fn flood(gate: &Gate, drivers: u64, n: u64) {
    let mut apps: Vec<_> = (0..drivers).map(|i| gate.login(500 + i, 1)).collect();
    for k in 0..n {
        for a in &mut apps {
            a.send_gps(0, &point(1_700_000_000_000 + k, 1)).expect("gps");
        }
    }
    let want = (drivers * n) as f64;
    gate.eventually("every point counted", || gate.metric("fleetgate_gps_points_in_total", "") == want);
    for a in &mut apps {
        a.keepalive().expect("every connection still serves");
    }
}

#[test]
fn a_dry_buffer_ring_loses_nothing() {
    // Two buffers of 256 bytes for 20 connections sending 200 frames each: the ring runs dry
    // again and again; every receive that ends for want of a buffer is re-armed.
    let gate = uring_gate(&["--app-ring-buffers", "2", "--app-ring-buffer-size", "256"]);
    flood(&gate, 20, 200);
    assert!(gate.metric("fleetgate_ring_rearms_total", "") > 0.0, "the ring never ran dry");
}

#[test]
fn an_overflowing_completion_queue_loses_nothing() {
    let gate = uring_gate(&["--app-ring-cq-entries", "16", "--app-ring-window-us", "1000"]);
    flood(&gate, 30, 100);
}

#[test]
fn a_reset_peer_ends_only_its_own_connection_and_its_session_is_held() {
    let gate = uring_gate(&["--hold-ms", "5000"]);
    let mut other = gate.login(2, 1);
    let mut victim = gate.login(1, 1);
    // SO_LINGER 0: closing sends RST instead of FIN.
    socket2::SockRef::from(&*victim.stream_mut()).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(victim);
    gate.eventually("the session is held", || gate.metric("fleetgate_held_sessions", "") == 1.0);
    other.keepalive().expect("the other connection serves on");
}

#[test]
fn closes_cancel_the_receive_and_free_the_slot() {
    let gate = uring_gate(&["--login-timeout-ms", "300"]);
    // A stream error, a logout, a login timeout: each ends its connection.
    let mut garbage = TcpStream::connect(gate.app).expect("connect");
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut c = gate.login(3, 1);
    c.logout().expect("logout");
    let mut silent = gate.connect();
    common::expect_refusal(&mut silent, ErrorCode::NotLoggedIn);
    gate.eventually("every connection ended", || gate.metric("fleetgate_connections", "") == 0.0);
    // The slots are reused cleanly.
    let mut again = gate.login(3, 1);
    again.keepalive().expect("a new connection serves");
}

#[test]
fn pushes_reach_ring_connections_and_a_slow_reader_is_closed() {
    // Pushes to the slow reader stay in flight (unacked): the per-session bounds are raised so
    // the out queue, not the push queue, is what fills.
    let gate = uring_gate(&[
        "--out-queue-bytes",
        "65536",
        "--hold-ms",
        "0",
        "--limits-push-queue-len",
        "100000",
        "--limits-push-queue-bytes",
        "2000000000",
    ]);
    let (srv, _ev) = gate.appserver();
    let mut fast = gate.login(7, 1);
    let slow = gate.login(8, 1);
    // The slow reader never reads: once the kernel's buffers are full its queue passes the bound
    // and it is closed; the fast one keeps getting every push.
    let t0 = Instant::now();
    let slow_closed = || gate.metric("fleetgate_connections_closed_total", "reason=\"SlowConsumer\"") >= 1.0;
    let mut id = 0u64;
    while !(id.is_multiple_of(50) && id > 0 && slow_closed()) {
        id += 1;
        assert!(id <= 4_000 && t0.elapsed() < EVENTUALLY, "the slow reader was never closed");
        let mut spec = common::push_spec(id, &[7, 8], 30_000);
        spec.payload = vec![b'x'; 16 * 1024];
        srv.push(&spec).expect("push");
        let f = loop {
            let f = fast.recv().expect("a push");
            if f.cmd == Cmd::PushDelivery {
                break f;
            }
        };
        assert_eq!(f.delivery().map(|d| d.message_id), Some(id), "the fast reader gets every push in order");
        fast.ack_push(&f).expect("ack");
    }
    drop(slow);
}

#[test]
fn the_loop_turns_many_times_while_the_ring_waits() {
    // Every round trip on the sidecar is a turn of the shard's loop while the app ring has
    // nothing to report: the ring's wake-up must not be re-polled (and its waker kept) on each
    // turn, or a task's waker count overflows after 32,767 turns and the gate stops.
    // The raw sidecar connection never says hello (keepalives are allowed before it): the login
    // timeout must outlast the 40,000 round trips on a loaded machine.
    let gate = uring_gate(&["--login-timeout-ms", "600000"]);
    let mut app = gate.login(9, 1);
    let mut s = TcpStream::connect(gate.sidecar).expect("sidecar");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
    let mut enc = schema::Encoder::new();
    let mut reader = client::FrameReader::new(schema::Limits::SIDECAR);
    let mut out = Vec::new();
    for seq in 1..=40_000u32 {
        out.clear();
        enc.keepalive(&mut out, schema::FrameType::Request, seq, 0, 1);
        s.write_all(&out).expect("write");
        let f = reader
            .read_frame(&mut s)
            .unwrap_or_else(|e| panic!("keepalive {seq}: {e}; gate log:\n{}", gate.log_text()));
        assert_eq!(f.seq(), seq, "{f:?}");
    }
    app.keepalive().expect("the app port still serves");
    assert!(gate.metric("fleetgate_connections", "") >= 1.0);
}
