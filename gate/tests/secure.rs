//! The secure channel (docs/PROTOCOL.md §14) against a real gate: handshake and login, wrong
//! and rotated keys, tampered, truncated, replayed and reordered records, replayed Hellos and
//! ResumeHellos, a resume whose answer is lost, resumes across shards, and plaintext refused.

mod common;

use channel::{
    ClientChannel, ClientEvent, Keypair, PublicKey, Record, RecordReader, RecordType, ResumeSecret,
};
use client::{AppConn, ClientError, SessionInfo};
use common::{collect_events, push_spec, token, Gate, EVENTUALLY};
use schema::wire::{GoAwayReason, Outcome};
use schema::{Cmd, Encoder};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A gate in secure mode (the test launcher defaults to plaintext).
fn secure_gate(extra: &[&str]) -> Gate {
    let mut args = vec!["--app-plaintext", "false"];
    args.extend_from_slice(extra);
    Gate::start(&args)
}

fn dev_key() -> PublicKey {
    *Keypair::dev().public()
}

fn connect(gate: &Gate, key: PublicKey) -> AppConn {
    let mut c = AppConn::connect_secure(gate.app, Duration::from_secs(5), key).expect("connect");
    c.set_read_timeout(EVENTUALLY).expect("timeout");
    c
}

fn login(gate: &Gate, uid: u64) -> (AppConn, SessionInfo) {
    let mut c = connect(gate, dev_key());
    let s = c.login(&token(uid, 1), "secure-test").expect("login over the secure channel");
    (c, s)
}

/// An app driven record by record, for the tests that forge, replay or withhold records.
struct Raw {
    tcp: TcpStream,
    chan: Option<ClientChannel>,
    reader: RecordReader,
    buf: Vec<u8>,
    plain: Vec<u8>,
    secret: Option<ResumeSecret>,
}

impl Raw {
    fn connect(gate: &Gate) -> Raw {
        let tcp = TcpStream::connect(gate.app).expect("connect");
        tcp.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
        Raw { tcp, chan: None, reader: RecordReader::new(), buf: Vec::new(), plain: Vec::new(), secret: None }
    }

    /// Sends a Hello carrying a Login for `uid`; returns its bytes.
    fn hello(&mut self, uid: u64) -> Vec<u8> {
        let mut frames = Vec::new();
        client::proto::app::write_login(&mut Encoder::new(), &mut frames, 1, 11, &token(uid, 1), "raw");
        let mut out = Vec::new();
        self.chan =
            Some(ClientChannel::login(&dev_key(), &Keypair::generate(), &frames, &mut out).expect("hello"));
        self.send(&out);
        out
    }

    /// Sends a ResumeHello for `s` with `secret`; returns its bytes.
    fn resume_hello(&mut self, s: &SessionInfo, secret: [u8; 32]) -> Vec<u8> {
        let mut frames = Vec::new();
        client::proto::app::write_resume(&mut Encoder::new(), &mut frames, 1, 12, &s.resume_token);
        let mut out = Vec::new();
        let chan = ClientChannel::resume(&s.resume_token, &ResumeSecret(secret), &frames, &mut out);
        self.chan = Some(chan.expect("resume hello"));
        self.send(&out);
        out
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).expect("write");
    }

    /// The next record from the gate (kind, body); None at end of stream.
    fn record(&mut self) -> Option<(RecordType, Vec<u8>)> {
        loop {
            let mut input = &self.buf[..];
            let got =
                self.reader.next(&mut input).expect("records").map(|r: Record<'_>| (r.kind, r.body.to_vec()));
            let used = self.buf.len() - input.len();
            self.buf.drain(..used);
            if got.is_some() {
                return got;
            }
            let mut b = [0u8; 4096];
            match self.tcp.read(&mut b) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
            }
        }
    }

    /// Reads the Accept; returns the commit record it asks for (not sent).
    fn accept(&mut self) -> Vec<u8> {
        let (kind, body) = self.record().expect("an answer to the hello");
        assert_eq!(kind, RecordType::Accept, "body {body:?}");
        let mut out = Vec::new();
        let rec = Record { kind, body: &body };
        match self
            .chan
            .as_mut()
            .expect("hello sent")
            .on_record(rec, &mut self.plain, &mut out)
            .expect("accept")
        {
            ClientEvent::Accepted { resume_secret, .. } => self.secret = Some(resume_secret),
            other => panic!("{other:?}"),
        }
        out
    }

    /// Seals `frames` into Data records (not sent).
    fn seal(&mut self, frames: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.chan.as_mut().expect("open").seal(frames, &mut out).expect("seal");
        out
    }

    /// Decrypts Data records until a whole frame of `cmd` arrives; its bytes.
    fn frame(&mut self, cmd: Cmd) -> Option<client::OwnedFrame> {
        loop {
            let mut r = client::FrameReader::new(schema::Limits::APP);
            let mut plain = &self.plain[..];
            if let Ok(f) = r.read_frame(&mut plain) {
                let used = self.plain.len() - plain.len() - r.buffered();
                self.plain.drain(..used);
                if f.cmd == cmd {
                    return Some(f);
                }
                continue;
            }
            let (kind, body) = self.record()?;
            let mut out = Vec::new();
            let rec = Record { kind, body: &body };
            self.chan.as_mut().expect("open").on_record(rec, &mut self.plain, &mut out).expect("data");
        }
    }

    /// True when the gate closed the connection (nothing but end of stream follows).
    fn closed(&mut self) -> bool {
        while let Some((kind, _)) = self.record() {
            if kind != RecordType::Data {
                return false;
            }
        }
        true
    }
}

/// The outcome of the first receipt the app-server gets.
fn first_receipt(ev: &client::AppServerEvents) -> Outcome {
    let mut outcome = None;
    collect_events(ev, |e| {
        if let client::AppServerEvent::Receipt { outcome: o, .. } = e {
            outcome = Some(*o);
        }
        outcome.is_some()
    });
    outcome.expect("a receipt")
}

fn keepalive_frame() -> Vec<u8> {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    enc.keepalive(&mut out, schema::FrameType::Request, 5, 15, 1234);
    out
}

#[test]
fn handshake_login_keepalive_and_a_push_over_the_channel() {
    let gate = secure_gate(&[]);
    let (mut app, s) = login(&gate, 7);
    assert_eq!(s.uid, 7);
    assert!(s.resume_secret.is_some(), "the Accept gave a resumption secret");
    app.keepalive().expect("a keepalive round trip, sealed both ways");
    let (srv, ev) = gate.appserver();
    srv.push(&push_spec(70, &[7], 5_000)).expect("push");
    let f = app.recv().expect("the delivery");
    assert_eq!(f.delivery().map(|d| d.message_id), Some(70));
    app.ack_push(&f).expect("ack");
    assert_eq!(first_receipt(&ev), Outcome::Delivered);
    assert_eq!(gate.metric("fleetgate_handshakes_total", "kind=\"login\""), 1.0);
}

#[test]
fn a_wrong_server_key_is_a_clear_failure() {
    let gate = secure_gate(&[]);
    let mut app = connect(&gate, *Keypair::generate().public());
    match app.login(&token(8, 1), "wrong-key") {
        Err(ClientError::Channel(channel::ChannelError::RejectedByGate { reason, message })) => {
            assert_eq!(reason, channel::RejectReason::UnknownKey, "{message}");
        }
        other => panic!("a login with the wrong gate key: {other:?}"),
    }
    assert_eq!(gate.metric("fleetgate_channel_errors_total", "kind=\"refused\""), 1.0);
}

#[test]
fn the_previous_key_still_works_during_the_overlap_and_names_the_new_one() {
    let dir = std::env::temp_dir().join(format!("fleetgate-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (old, new) = (Keypair::generate(), Keypair::generate());
    let (old_path, new_path) = (dir.join("old.key"), dir.join("new.key"));
    let _ = std::fs::remove_file(&old_path);
    let _ = std::fs::remove_file(&new_path);
    old.save_private(&old_path).expect("old key");
    new.save_private(&new_path).expect("new key");
    let (o, n) = (old_path.to_str().expect("path"), new_path.to_str().expect("path"));
    let gate = secure_gate(&["--channel-key-file", n, "--channel-previous-key-file", o]);
    // An app that knows only the old key logs in and learns the new one.
    let mut app = connect(&gate, *old.public());
    app.login(&token(9, 1), "old-key").expect("login with the previous key");
    assert_eq!(app.new_server_key(), Some(*new.public()));
    // One that knows the new key is not told anything.
    let mut app2 = connect(&gate, *new.public());
    app2.login(&token(10, 1), "new-key").expect("login with the current key");
    assert_eq!(app2.new_server_key(), None);
    // The development key is neither.
    let mut app3 = connect(&gate, dev_key());
    assert!(matches!(app3.login(&token(11, 1), "dev"), Err(ClientError::Channel(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tampered_truncated_replayed_and_reordered_records_close_only_their_connection() {
    let gate = secure_gate(&[]);
    let (mut bystander, _) = login(&gate, 20);
    for (i, spoil) in ["tampered", "truncated", "replayed", "reordered"].into_iter().enumerate() {
        let mut raw = Raw::connect(&gate);
        raw.hello(30 + i as u64);
        let commit = raw.accept();
        raw.send(&commit);
        assert!(raw.frame(Cmd::Login).is_some(), "{spoil}: the Session answer");
        let (first, second) = (raw.seal(&keepalive_frame()), raw.seal(&keepalive_frame()));
        match spoil {
            "tampered" => {
                let mut r = first.clone();
                let last = r.len() - 1;
                r[last] ^= 1;
                raw.send(&r);
            }
            "truncated" => {
                // The length says 10 bytes less: the tag is cut.
                let mut r = first[..first.len() - 10].to_vec();
                let len = u16::from_be_bytes([r[1], r[2]]) - 10;
                r[1..3].copy_from_slice(&len.to_be_bytes());
                raw.send(&r);
            }
            "replayed" => {
                raw.send(&first);
                raw.send(&first);
            }
            _ => {
                raw.send(&second);
                raw.send(&first);
            }
        }
        assert!(raw.closed(), "{spoil}: the gate closes the connection");
        bystander.keepalive().expect("the other connection is unharmed");
    }
    assert_eq!(gate.metric("fleetgate_channel_errors_total", "kind=\"authentication\""), 4.0);
}

#[test]
fn a_replayed_hello_logs_nobody_in_and_displaces_nobody() {
    let gate = secure_gate(&[]);
    let mut real = Raw::connect(&gate);
    let hello = real.hello(40);
    let commit = real.accept();
    real.send(&commit);
    assert!(real.frame(Cmd::Login).is_some());
    // The attacker replays the captured Hello: it gets an Accept it cannot use.
    let mut attacker = Raw::connect(&gate);
    attacker.send(&hello);
    let (kind, _) = attacker.record().expect("an accept");
    assert_eq!(kind, RecordType::Accept);
    // Garbage instead of the commit it cannot seal: closed, and the real app is untouched.
    attacker.send(&[5, 0, 17, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]);
    assert!(attacker.closed());
    let ka = real.seal(&keepalive_frame());
    real.send(&ka);
    let f = real.frame(Cmd::Keepalive).expect("still logged in, not displaced");
    assert!(f.go_away().is_none());
    assert_eq!(gate.metric("fleetgate_sessions", ""), 1.0, "only the real session");
}

#[test]
fn a_replayed_resume_hello_does_not_displace_the_resumed_app() {
    let gate = secure_gate(&["--hold-ms", "10000"]);
    let (first, s) = login(&gate, 50);
    first.shutdown().expect("drop");
    drop(first);
    let mut real = Raw::connect(&gate);
    let resume_hello = real.resume_hello(&s, s.resume_secret.expect("secret"));
    let commit = real.accept();
    real.send(&commit);
    assert!(real.frame(Cmd::Resume).is_some(), "resumed");
    let mut attacker = Raw::connect(&gate);
    attacker.send(&resume_hello);
    // The replay decrypts with the session's secret only if it was not rotated; either way the
    // attacker cannot commit.
    let _ = attacker.record();
    drop(attacker);
    let ka = real.seal(&keepalive_frame());
    real.send(&ka);
    assert!(real.frame(Cmd::Keepalive).is_some(), "the resumed app keeps its session");
}

#[test]
fn a_lost_resume_answer_costs_no_push() {
    let gate = secure_gate(&["--hold-ms", "10000"]);
    let (srv, ev) = gate.appserver();
    let (first, s) = login(&gate, 60);
    first.shutdown().expect("drop");
    drop(first);
    gate.eventually("the session is held", || gate.metric("fleetgate_held_sessions", "") == 1.0);
    srv.push(&push_spec(600, &[60], 20_000)).expect("push while held");
    // A resume whose Accept is lost with its connection: nothing is committed.
    let mut lost = Raw::connect(&gate);
    lost.resume_hello(&s, s.resume_secret.expect("secret"));
    let _ = lost.accept();
    drop(lost);
    // The app resumes again with what it has: the old token and the old secret.
    let mut again = connect(&gate, dev_key());
    let s2 = again.resume_session(&s).expect("the second resume works");
    assert_eq!(s2.session_epoch, s.session_epoch);
    let f = again.recv().expect("the held push");
    assert_eq!(f.delivery().map(|d| d.message_id), Some(600));
    again.ack_push(&f).expect("ack");
    assert_eq!(first_receipt(&ev), Outcome::Delivered);
}

#[test]
fn a_lost_session_answer_after_the_commit_still_resumes() {
    let gate = secure_gate(&["--hold-ms", "10000"]);
    let (first, s) = login(&gate, 61);
    first.shutdown().expect("drop");
    drop(first);
    // Committed, then the connection dies before the Session answer is read.
    let mut lost = Raw::connect(&gate);
    lost.resume_hello(&s, s.resume_secret.expect("secret"));
    let commit = lost.accept();
    lost.send(&commit);
    let rotated = lost.secret.as_ref().expect("new secret").0;
    std::thread::sleep(Duration::from_millis(200));
    drop(lost);
    // The app holds the new secret (from the Accept) and the old token (the answer was lost).
    let mut again = connect(&gate, dev_key());
    let old_token = SessionInfo { resume_secret: Some(rotated), ..s.clone() };
    again.resume_session(&old_token).expect("the channel proved the resume current");
}

#[test]
fn resumes_work_on_every_shard() {
    let gate = secure_gate(&["--cores", "all", "--hold-ms", "10000"]);
    let (mut c, mut s) = login(&gate, 70);
    for round in 0..8 {
        c.shutdown().expect("drop");
        c = connect(&gate, dev_key());
        s = c.resume_session(&s).unwrap_or_else(|e| panic!("resume {round}: {e}"));
        c.keepalive().expect("live");
    }
    let resumes = gate.metric("fleetgate_handshakes_total", "kind=\"resume\"");
    assert_eq!(resumes, 8.0);
}

#[test]
fn plaintext_is_refused_by_default() {
    let gate = secure_gate(&[]);
    let mut plain = AppConn::connect(gate.app, Duration::from_secs(5)).expect("connect");
    assert!(plain.login(&token(80, 1), "plaintext").is_err(), "a plaintext login on the secure port");
    assert_eq!(gate.metric("fleetgate_channel_errors_total", "kind=\"malformed\""), 1.0);
}

#[test]
fn a_go_away_is_sealed_too() {
    let gate = secure_gate(&[]);
    let (mut a, _) = login(&gate, 90);
    let (_b, _) = login(&gate, 90);
    let f = a.recv().expect("go-away");
    assert_eq!(f.go_away().map(|g| g.reason()), Some(GoAwayReason::Displaced));
}
