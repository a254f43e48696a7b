//! Hostile and broken input against a running gate. The gate runs one shard, so the attacker and
//! the well-behaved connection provably share it (the metrics show both on shard 0); after
//! every attack the good connection still answers and the gate is alive.

mod common;

use client::ClientError;
use common::{token, Gate};
use schema::wire::{ErrorCode, GoAwayReason};
use schema::{Cmd, FrameType, Header};
use std::io::Write;
use std::time::Duration;

fn one_shard(extra: &[&str]) -> Gate {
    let mut args = vec!["--cores", "0", "--read-timeout-ms", "300"];
    args.extend_from_slice(extra);
    Gate::start(&args)
}

/// The next error frame's code, then the connection must close.
fn error_then_close(c: &mut client::AppConn) -> ErrorCode {
    let f = c.recv().expect("an error frame");
    let code = f.error().unwrap_or_else(|| panic!("not an error: {f:?}")).code;
    loop {
        match c.recv() {
            Err(ClientError::Closed) => return code,
            Ok(_) => {}
            Err(e) => panic!("expected a close, got {e}"),
        }
    }
}

fn still_fine(gate: &mut Gate, good: &mut client::AppConn) {
    good.keepalive().expect("the well-behaved connection still works");
    assert!(gate.alive());
    assert_eq!(gate.metric("fleetgate_connections", "shard=\"0\""), gate.metric("fleetgate_connections", ""));
}

#[test]
fn garbage_bytes_get_bad_magic_and_a_close() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut bad = gate.connect();
    bad.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    assert_eq!(error_then_close(&mut bad), ErrorCode::BadMagic);
    still_fine(&mut gate, &mut good);
}

#[test]
fn oversized_frame_is_refused_from_its_header() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut bad = gate.connect();
    let h = Header::new(FrameType::Request, Cmd::Login as u16, 1, 5, 10 << 20);
    bad.send_raw(&h.to_bytes()).expect("send");
    assert_eq!(error_then_close(&mut bad), ErrorCode::FrameTooLarge);
    still_fine(&mut gate, &mut good);
}

#[test]
fn unsupported_version_is_refused() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut bad = gate.connect();
    let mut h = Header::new(FrameType::Request, Cmd::Keepalive as u16, 1, 5, 0).to_bytes();
    h[1] = 9;
    bad.send_raw(&h).expect("send");
    assert_eq!(error_then_close(&mut bad), ErrorCode::UnsupportedVersion);
    still_fine(&mut gate, &mut good);
}

#[test]
fn a_frame_in_one_byte_writes_still_logs_in() {
    // The frame decoder on raw TCP (gate/tests/secure.rs splits records the same way).
    let mut gate = one_shard(&["--plaintext"]);
    let mut good = gate.login(1, 1);
    let mut slow = gate.connect();
    let mut frame = Vec::new();
    schema::Encoder::new().frame(&mut frame, FrameType::Request, Cmd::Login, 1, 42, |b| {
        let t = b.create_vector(&token(2, 1));
        schema::wire::Login::create(b, &schema::wire::LoginArgs { token: Some(t), device: None })
    });
    for byte in &frame {
        slow.stream_mut().write_all(std::slice::from_ref(byte)).expect("one byte");
        std::thread::sleep(Duration::from_millis(1));
    }
    let f = slow.wait_response(1).expect("login answer");
    assert_eq!(f.cmd, Cmd::Login);
    assert_eq!(f.log_id(), 42);
    still_fine(&mut gate, &mut good);
}

#[test]
fn slowloris_is_closed_after_the_read_timeout() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut bad = gate.login(2, 1);
    let h = Header::new(FrameType::Request, Cmd::Keepalive as u16, 1, 5, 100);
    bad.send_raw(&h.to_bytes()).expect("send"); // a body of 100 bytes that never comes
    let f = bad.recv().expect("a go-away");
    assert_eq!(f.go_away().expect("go-away").reason(), GoAwayReason::ReadTimeout);
    assert!(matches!(bad.recv(), Err(ClientError::Closed)));
    still_fine(&mut gate, &mut good);
}

#[test]
fn frames_before_login_get_not_logged_in_and_the_connection_stays() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut early = gate.connect();
    early.send_gps(9, &common::point(1, 1)).expect("send");
    let f = early.recv().expect("error frame");
    assert_eq!(f.error().expect("error").code, ErrorCode::NotLoggedIn);
    assert_eq!(f.log_id(), 9);
    early.keepalive().expect("keepalive is allowed before login");
    early.login(&token(3, 1), "t").expect("and login still works");
    still_fine(&mut gate, &mut good);
}

#[test]
fn forged_and_expired_tokens_are_refused() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut forged = gate.connect();
    let t = client::dev_token(b"not-the-secret", 5, 1, Duration::from_secs(60));
    match forged.login(&t, "t") {
        Err(ClientError::Server { code, origin, .. }) => {
            assert_eq!(code, ErrorCode::BadToken);
            assert_eq!(origin, schema::wire::Hop::App);
        }
        other => panic!("{other:?}"),
    }
    let mut expired = gate.connect();
    let claims = schema::token::Claims { uid: 5, role: 1, expires_ms: 1_000 };
    let t = schema::token::issue(common::SECRET, claims);
    match expired.login(&t, "t") {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::TokenExpired),
        other => panic!("{other:?}"),
    }
    still_fine(&mut gate, &mut good);
}

#[test]
fn unknown_cmd_gets_an_error_and_the_connection_stays() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut c = gate.login(2, 1);
    let h = Header::new(FrameType::Request, 0x7777, 33, 44, 0);
    c.send_raw(&h.to_bytes()).expect("send");
    let f = c.recv().expect("error frame");
    let e = f.error().expect("error");
    assert_eq!((e.code, e.failed_cmd, f.seq(), f.log_id()), (ErrorCode::UnknownCmd, 0x7777, 33, 44));
    c.keepalive().expect("connection stays");
    still_fine(&mut gate, &mut good);
}

#[test]
fn corrupt_body_gets_an_error_and_the_connection_stays() {
    let mut gate = one_shard(&[]);
    let mut good = gate.login(1, 1);
    let mut c = gate.login(2, 1);
    let mut frame = Header::new(FrameType::Event, Cmd::GpsBatch as u16, 0, 45, 8).to_bytes().to_vec();
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
    c.send_raw(&frame).expect("send");
    let f = c.recv().expect("error frame");
    assert_eq!(f.error().expect("error").code, ErrorCode::CorruptBody);
    c.keepalive().expect("connection stays");
    still_fine(&mut gate, &mut good);
}

#[test]
fn connections_past_the_limit_are_refused_with_retry_after() {
    let mut gate = one_shard(&["--max-conns-per-shard", "20"]);
    let mut good = gate.login(1, 1);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let mut c = gate.connect();
        c.set_read_timeout(Duration::from_millis(300)).expect("timeout");
        match c.recv() {
            Err(ClientError::Timeout) => held.push(c), // admitted: nothing to read yet
            got => {
                assert!(common::refusal(got, ErrorCode::Overloaded) > 0, "a retry-after");
                refused += 1;
            }
        }
    }
    assert_eq!(held.len(), 19, "20 connections per shard, one is the good one");
    assert_eq!(refused, 21);
    assert_eq!(gate.metric("fleetgate_connections_refused_total", "reason=\"conn_limit\""), 21.0);
    still_fine(&mut gate, &mut good);
}

#[test]
fn an_accept_burst_past_the_rate_and_its_queue_is_refused_with_retry_after() {
    let mut gate = one_shard(&["--accept-rate-per-shard", "5", "--accept-queue", "5"]);
    std::thread::sleep(Duration::from_millis(1200)); // the bucket starts full: 5 tokens
    let mut good = gate.login(1, 1);
    let mut conns = Vec::new();
    for _ in 0..30 {
        conns.push(gate.connect());
    }
    let mut refused = 0;
    for c in conns.iter_mut() {
        c.set_read_timeout(Duration::from_millis(200)).expect("timeout");
        match c.recv() {
            Err(ClientError::Timeout) => {} // admitted or queued
            got => {
                let retry = common::refusal(got, ErrorCode::Overloaded);
                assert!(retry >= 1_000, "base retry-after plus jitter");
                refused += 1;
            }
        }
    }
    // 4 tokens left after the good login, 5 may queue: at least 20 of 30 are refused.
    assert!(refused >= 20, "only {refused} refused");
    assert_eq!(gate.metric("fleetgate_connections_refused_total", "reason=\"accept_rate\""), refused as f64);
    // The queued ones are served late, not dropped: they can log in.
    still_fine(&mut gate, &mut good);
}
