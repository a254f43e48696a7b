//! Handshakes and channels end to end, attacks on them, interoperation with snow's own
//! transport, and the test vector of docs/PROTOCOL.md §14.8.

use proptest::prelude::*;

use crate::handshake::{
    parse_resume_hello, respond_hello, respond_hello_with, respond_resume, respond_resume_with,
    ClientHandshake, HandshakeError, RejectReason, ResumeSecret, PROLOGUE,
};
use crate::keys::{hex, KeyRing, Keypair, PublicKey};
use crate::record::{write_record, Record, RecordReader, RecordType};
use crate::transport::{Transport, TransportError};
use crate::{ChannelError, ClientChannel, ClientEvent, ClientState, ServerChannel, ServerEvent, ServerState};

/// Every record in `wire`, owned.
fn records(wire: &[u8]) -> Vec<(RecordType, Vec<u8>)> {
    let mut reader = RecordReader::new();
    let mut input = wire;
    let mut out = Vec::new();
    while let Some(r) = reader.next(&mut input).unwrap() {
        out.push((r.kind, r.body.to_vec()));
    }
    reader.finish().unwrap();
    out
}

fn one(wire: &[u8]) -> (RecordType, Vec<u8>) {
    let mut rs = records(wire);
    assert_eq!(rs.len(), 1);
    rs.remove(0)
}

fn rec(kind: RecordType, body: &[u8]) -> Record<'_> {
    Record { kind, body }
}

/// The gate side of a test: its channel, keys and the bytes it produced.
struct Gate {
    ch: ServerChannel,
    keys: KeyRing,
    now_ms: u64,
    plain: Vec<u8>,
    out: Vec<u8>,
}

impl Gate {
    fn new(keys: KeyRing) -> Gate {
        Gate { ch: ServerChannel::new(), keys, now_ms: 0, plain: Vec::new(), out: Vec::new() }
    }

    /// Feeds every record of `wire`; returns the events (as owned descriptions) or the error.
    fn feed(&mut self, wire: &[u8]) -> Result<Vec<String>, ChannelError> {
        let mut evs = Vec::new();
        for (kind, body) in records(wire) {
            let ev = self.ch.on_record(
                &self.keys,
                self.now_ms,
                rec(kind, &body),
                &mut self.plain,
                &mut self.out,
            )?;
            evs.push(match ev {
                ServerEvent::Hello { used_previous_key, .. } => format!("hello prev={used_previous_key}"),
                ServerEvent::ResumeHello { resume_id } => format!("resume {}", hex(resume_id)),
                ServerEvent::Committed => "committed".into(),
                ServerEvent::Data => "data".into(),
            });
        }
        Ok(evs)
    }

    fn take_out(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn take_plain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.plain)
    }
}

/// The app side of a test.
struct App {
    ch: ClientChannel,
    plain: Vec<u8>,
    out: Vec<u8>,
}

impl App {
    fn login(server: &PublicKey, frames: &[u8]) -> App {
        let mut out = Vec::new();
        let ch = ClientChannel::login(server, &Keypair::generate(), frames, &mut out).unwrap();
        App { ch, plain: Vec::new(), out }
    }

    fn resume(id: &[u8], secret: &ResumeSecret, frames: &[u8]) -> App {
        let mut out = Vec::new();
        let ch = ClientChannel::resume(id, secret, frames, &mut out).unwrap();
        App { ch, plain: Vec::new(), out }
    }

    fn feed(&mut self, wire: &[u8]) -> Result<Vec<ClientEvent>, ChannelError> {
        let mut evs = Vec::new();
        for (kind, body) in records(wire) {
            evs.push(self.ch.on_record(rec(kind, &body), &mut self.plain, &mut self.out)?);
        }
        Ok(evs)
    }

    fn take_out(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

/// A full login: returns both sides open and committed, with the secrets each derived.
fn login(keys: &KeyRing, server: &PublicKey) -> (App, Gate, ResumeSecret, ResumeSecret) {
    let mut app = App::login(server, b"LOGIN");
    let mut gate = Gate::new(keys.clone());
    assert_eq!(gate.feed(&app.take_out()).unwrap(), ["hello prev=false"]);
    assert_eq!(gate.take_plain(), b"LOGIN");
    let gate_secret = gate.ch.accept(b"SESSION", &mut gate.out).unwrap();
    assert_eq!(gate.ch.state(), ServerState::AwaitingConfirm);
    let evs = app.feed(&gate.take_out()).unwrap();
    let [ClientEvent::Accepted { new_server_key: None, resume_secret }] = &evs[..] else { panic!("{evs:?}") };
    assert_eq!(std::mem::take(&mut app.plain), b"SESSION");
    assert_eq!(gate.feed(&app.take_out()).unwrap(), ["committed"]);
    assert!(gate.ch.is_committed());
    (app, gate, resume_secret.clone(), gate_secret)
}

#[test]
fn login_round_trip_then_data_both_ways() {
    let gate_key = Keypair::generate();
    let keys = KeyRing::new(gate_key.clone());
    let (mut app, mut gate, app_secret, gate_secret) = login(&keys, gate_key.public());
    assert_eq!(app_secret, gate_secret, "both sides derive the same resumption secret");
    assert!(gate.take_plain().is_empty(), "the commit record carries no plaintext");

    app.ch.seal(b"GPS1", &mut app.out).unwrap();
    app.ch.seal(b"GPS2", &mut app.out).unwrap();
    assert_eq!(gate.feed(&app.take_out()).unwrap(), ["data", "data"]);
    assert_eq!(gate.take_plain(), b"GPS1GPS2");

    gate.ch.seal(b"PUSH", &mut gate.out).unwrap();
    assert_eq!(app.feed(&gate.take_out()).unwrap(), [ClientEvent::Data]);
    assert_eq!(app.plain, b"PUSH");
    assert_eq!(app.ch.state(), ClientState::Open);
    assert_eq!(gate.ch.transport().unwrap().received(), 3);
}

#[test]
fn an_app_may_seal_and_open_in_its_own_buffers() {
    let gate_key = Keypair::generate();
    let keys = KeyRing::new(gate_key.clone());
    // Opening in place before the Accept ends the channel, like a Data record fed to on_record.
    let mut early = App::login(gate_key.public(), b"LOGIN");
    let e = early.ch.open_in_place(&mut [0; 20]).unwrap_err();
    assert!(matches!(e, ChannelError::Unexpected { kind: RecordType::Data, .. }), "{e:?}");
    assert_eq!(early.ch.state(), ClientState::Closed);
    assert!(matches!(early.ch.seal_in_place(&mut vec![1], 0), Err(ChannelError::NotReady { .. })));

    let (mut app, mut gate, _, _) = login(&keys, gate_key.public());
    let mut buf = b"GPS1GPS2".to_vec();
    app.ch.seal_in_place(&mut buf, 4).unwrap();
    assert_eq!(&buf[..4], b"GPS1", "bytes before `from` are kept");
    assert_eq!(gate.feed(&buf[4..]).unwrap(), ["data"]);
    assert_eq!(gate.take_plain(), b"GPS2");

    gate.ch.seal(b"PUSH", &mut gate.out).unwrap();
    let (kind, mut body) = one(&gate.take_out());
    assert_eq!(kind, RecordType::Data);
    let n = app.ch.open_in_place(&mut body).unwrap();
    assert_eq!(&body[..n], b"PUSH");
    // A record changed on the path fails and counts nothing; sealing still works.
    gate.ch.seal(b"PUSH2", &mut gate.out).unwrap();
    let (_, good) = one(&gate.take_out());
    let mut bad = good.clone();
    bad[0] ^= 1;
    assert!(matches!(app.ch.open_in_place(&mut bad), Err(ChannelError::Transport(_))));
    let mut good2 = good.clone();
    assert_eq!(app.ch.open_in_place(&mut good2).unwrap(), 5, "the genuine record at that nonce");
    let mut again = good;
    assert!(matches!(app.ch.open_in_place(&mut again), Err(ChannelError::Transport(_))), "a replay");
    let mut buf = b"ACK".to_vec();
    app.ch.seal_in_place(&mut buf, 0).unwrap();
    assert_eq!(gate.feed(&buf).unwrap(), ["data"]);
}

#[test]
fn resume_round_trips_and_the_secret_moves_on_each_time() {
    let gate_key = Keypair::generate();
    let keys = KeyRing::new(gate_key.clone());
    let (_, _, mut secret, _) = login(&keys, gate_key.public());
    let mut seen = vec![secret.clone()];
    for round in 0..3u8 {
        let id = [b'u', round];
        let mut app = App::resume(&id, &secret, b"RESUME");
        let mut gate = Gate::new(keys.clone());
        assert_eq!(gate.feed(&app.take_out()).unwrap(), [format!("resume {}", hex(&id))]);
        assert_eq!(gate.ch.state(), ServerState::AwaitingSecret);
        assert_eq!(gate.ch.resume_id(), Some(&id[..]));
        gate.ch.resume(Some(&secret), &mut gate.plain, &mut gate.out).unwrap();
        assert_eq!(gate.take_plain(), b"RESUME");
        let gate_secret = gate.ch.accept(b"SESSION", &mut gate.out).unwrap();
        let evs = app.feed(&gate.take_out()).unwrap();
        let [ClientEvent::Accepted { new_server_key: None, resume_secret }] = &evs[..] else { panic!() };
        assert_eq!(*resume_secret, gate_secret);
        assert!(!seen.contains(resume_secret), "a new secret after every resume");
        assert_eq!(gate.feed(&app.take_out()).unwrap(), ["committed"]);
        app.ch.seal(b"ACK", &mut app.out).unwrap();
        assert_eq!(gate.feed(&app.take_out()).unwrap(), ["data"]);
        assert_eq!(gate.take_plain(), b"ACK");

        // The old secret no longer opens a resume (the gate now holds the new one).
        let mut late = App::resume(&id, &secret, b"RESUME");
        let mut g2 = Gate::new(keys.clone());
        g2.feed(&late.take_out()).unwrap();
        let e = g2.ch.resume(Some(&gate_secret), &mut g2.plain, &mut g2.out).unwrap_err();
        assert!(matches!(&e, ChannelError::Refused(r) if r.reason == RejectReason::UnknownSession), "{e}");
        let evs = late.feed(&g2.take_out());
        assert!(
            matches!(evs, Err(ChannelError::RejectedByGate { reason: RejectReason::UnknownSession, .. })),
            "{evs:?}"
        );

        secret = gate_secret;
        seen.push(secret.clone());
    }
}

#[test]
fn unknown_resume_id_is_refused() {
    let mut app = App::resume(b"nobody", &ResumeSecret([9; 32]), b"RESUME");
    let mut gate = Gate::new(KeyRing::new(Keypair::generate()));
    gate.feed(&app.take_out()).unwrap();
    assert!(gate.ch.resume(None, &mut gate.plain, &mut gate.out).is_err());
    assert_eq!(gate.ch.state(), ServerState::Closed);
    let (kind, body) = one(&gate.take_out());
    assert_eq!((kind, body[0]), (RecordType::Reject, 3));
    assert_eq!(&body[1..], b"no held session has this resume id");
}

#[test]
fn previous_key_is_answered_with_the_current_one() {
    let (old, new) = (Keypair::generate(), Keypair::generate());
    let mut keys = KeyRing::new(old.clone());
    keys.rotate(new.clone(), 10_000);
    let mut app = App::login(old.public(), b"LOGIN");
    let mut gate = Gate::new(keys.clone());
    gate.now_ms = 9_999;
    assert_eq!(gate.feed(&app.take_out()).unwrap(), ["hello prev=true"]);
    let gate_secret = gate.ch.accept(b"SESSION", &mut gate.out).unwrap();
    let evs = app.feed(&gate.take_out()).unwrap();
    let [ClientEvent::Accepted { new_server_key: Some(k), resume_secret }] = &evs[..] else {
        panic!("{evs:?}")
    };
    assert_eq!((k, resume_secret), (new.public(), &gate_secret));
    assert_eq!(gate.feed(&app.take_out()).unwrap(), ["committed"]);
    // With the new key the app gets no key in the Accept.
    login(&keys, new.public());

    // After the previous key expires, or with a key the gate never had: UnknownKey.
    for (server, now) in [(old.public(), 10_000), (Keypair::generate().public(), 0)] {
        let mut app = App::login(server, b"LOGIN");
        let mut gate = Gate::new(keys.clone());
        gate.now_ms = now;
        let e = gate.feed(&app.take_out()).unwrap_err();
        assert!(matches!(&e, ChannelError::Refused(r) if r.reason == RejectReason::UnknownKey), "{e}");
        let e = app.feed(&gate.take_out()).unwrap_err();
        assert!(matches!(e, ChannelError::RejectedByGate { reason: RejectReason::UnknownKey, .. }), "{e}");
        assert_eq!(app.ch.state(), ClientState::Closed);
    }
}

#[test]
fn a_gate_with_the_key_id_but_not_the_private_key_cannot_answer() {
    // The app pins gate key A; a gate holding key B cannot decrypt its Hello, even if the
    // key_id were made to match: the static DH fails.
    let (a, b) = (Keypair::generate(), Keypair::generate());
    let mut hello = Vec::new();
    ClientHandshake::login(a.public(), &Keypair::generate(), b"LOGIN", &mut hello).unwrap();
    let (_, mut body) = one(&hello);
    body[1..9].copy_from_slice(&b.key_id());
    let r = respond_hello(&KeyRing::new(b), &body, 0).unwrap_err();
    assert_eq!(r.reason, RejectReason::BadHandshake);
}

#[test]
fn version_other_than_1_is_refused_with_version() {
    let k = Keypair::generate();
    let mut hello = Vec::new();
    ClientHandshake::login(k.public(), &Keypair::generate(), b"LOGIN", &mut hello).unwrap();
    let (_, mut body) = one(&hello);
    body[0] = 2;
    assert_eq!(respond_hello(&KeyRing::new(k), &body, 0).unwrap_err().reason, RejectReason::Version);
    let mut rh = Vec::new();
    ClientHandshake::resume(b"id", &ResumeSecret([1; 32]), b"R", &mut rh).unwrap();
    let (_, mut body) = one(&rh);
    body[0] = 0;
    assert_eq!(parse_resume_hello(&body).unwrap_err().reason, RejectReason::Version);
}

#[test]
fn records_out_of_order_are_typed_errors() {
    let k = Keypair::generate();
    let keys = KeyRing::new(k.clone());
    // A Data record before the handshake: Unexpected, with a Reject for the app.
    let mut gate = Gate::new(keys.clone());
    let mut data = Vec::new();
    write_record(&mut data, RecordType::Data, &[0; 20]);
    let e = gate.feed(&data).unwrap_err();
    assert_eq!(e, ChannelError::Unexpected { kind: RecordType::Data, state: "before the Hello" });
    assert_eq!(one(&gate.take_out()).0, RecordType::Reject);
    assert_eq!(gate.ch.state(), ServerState::Closed);
    // An Accept or a Reject sent to the gate.
    for kind in [RecordType::Accept, RecordType::Reject] {
        let mut gate = Gate::new(keys.clone());
        let mut r = Vec::new();
        write_record(&mut r, kind, &[1]);
        assert!(matches!(gate.feed(&r), Err(ChannelError::Unexpected { .. })));
    }
    // A second Hello, while the gate answers the first and after the Accept.
    let mut app = App::login(k.public(), b"LOGIN");
    let hello = app.take_out();
    let mut gate = Gate::new(keys.clone());
    gate.feed(&hello).unwrap();
    let e = gate.feed(&hello).unwrap_err();
    assert_eq!(e, ChannelError::Unexpected { kind: RecordType::Hello, state: "before the Accept" });
    let mut gate = Gate::new(keys.clone());
    gate.feed(&hello).unwrap();
    gate.ch.accept(b"S", &mut gate.out).unwrap();
    gate.take_out();
    let e = gate.feed(&hello).unwrap_err();
    assert!(matches!(e, ChannelError::Unexpected { kind: RecordType::Hello, .. }), "{e}");
    assert!(gate.take_out().is_empty(), "no plaintext Reject once there is a transport");
    // App side: Data before the Accept; a second Accept.
    let mut app = App::login(k.public(), b"LOGIN");
    let e = app.feed(&data).unwrap_err();
    assert_eq!(e, ChannelError::Unexpected { kind: RecordType::Data, state: "before the Accept" });
    let (mut app, mut gate, _, _) = login(&keys, k.public());
    gate.ch.seal(b"x", &mut gate.out).unwrap();
    let mut accept = Vec::new();
    write_record(&mut accept, RecordType::Accept, &[0; 64]);
    assert!(matches!(app.feed(&accept), Err(ChannelError::Unexpected { kind: RecordType::Accept, .. })));
    // Calls in the wrong state are refused and change nothing.
    let mut gate = Gate::new(keys.clone());
    let e = gate.ch.accept(b"S", &mut gate.out).unwrap_err();
    assert_eq!(e, ChannelError::NotReady { op: "accept", state: "before the Hello" });
    assert!(gate.ch.seal(b"x", &mut gate.out).is_err());
    assert!(gate.ch.resume(None, &mut gate.plain, &mut gate.out).is_err());
    assert_eq!(gate.ch.state(), ServerState::AwaitingHello);
    assert!(gate.out.is_empty());
}

#[test]
fn reject_writes_a_record_only_before_the_transport() {
    let mut gate = Gate::new(KeyRing::new(Keypair::generate()));
    gate.ch.reject(RejectReason::Overloaded, "try later", &mut gate.out);
    let (kind, body) = one(&gate.take_out());
    assert_eq!((kind, &body[..]), (RecordType::Reject, &b"\x05try later"[..]));
    assert_eq!(gate.ch.state(), ServerState::Closed);
    gate.ch.reject(RejectReason::Overloaded, "again", &mut gate.out);
    assert!(gate.out.is_empty(), "closed: nothing more");
    let k = Keypair::generate();
    let (_, mut gate, _, _) = login(&KeyRing::new(k.clone()), k.public());
    gate.ch.reject(RejectReason::BadHandshake, "no", &mut gate.out);
    assert!(gate.out.is_empty());
    // A long message is cut at a character boundary to fit one record.
    let mut out = Vec::new();
    crate::handshake::write_reject(&mut out, RejectReason::Other(9), &"é".repeat(10_000));
    let (_, body) = one(&out);
    assert_eq!(body.len(), 16_399);
    assert!(std::str::from_utf8(&body[1..]).is_ok());
}

#[test]
fn replayed_hello_yields_an_accept_nobody_can_confirm() {
    let k = Keypair::generate();
    let keys = KeyRing::new(k.clone());
    let mut app = App::login(k.public(), b"LOGIN token");
    let hello = app.take_out();
    // The genuine session, recorded by an eavesdropper.
    let mut gate = Gate::new(keys.clone());
    gate.feed(&hello).unwrap();
    gate.ch.accept(b"SESSION", &mut gate.out).unwrap();
    app.feed(&gate.take_out()).unwrap();
    app.ch.seal(b"GPS", &mut app.out).unwrap();
    let app_records = app.take_out();
    assert_eq!(gate.feed(&app_records).unwrap(), ["committed", "data"]);

    // The replay decrypts (the Login is read again: hence tentative) ...
    let mut replay = Gate::new(keys.clone());
    assert_eq!(replay.feed(&hello).unwrap(), ["hello prev=false"]);
    assert_eq!(replay.take_plain(), b"LOGIN token");
    replay.ch.accept(b"SESSION", &mut replay.out).unwrap();
    assert_eq!(replay.ch.state(), ServerState::AwaitingConfirm);
    // ... but nothing the attacker has confirms it: not the genuine records, not guesses.
    for (kind, body) in records(&app_records) {
        let mut g = Gate::new(keys.clone());
        g.feed(&hello).unwrap();
        g.take_plain();
        g.ch.accept(b"SESSION", &mut g.out).unwrap();
        let e = g.ch.on_record(&g.keys, 0, rec(kind, &body), &mut g.plain, &mut g.out).unwrap_err();
        assert_eq!(e, ChannelError::Transport(TransportError::Authentication));
        assert!(!g.ch.is_committed() && g.plain.is_empty());
    }
    let mut forged = Vec::new();
    Transport::from_keys([0; 32], [0; 32]).seal_into(b"", &mut forged).unwrap();
    assert!(replay.feed(&forged).is_err());
    assert_eq!(replay.ch.state(), ServerState::Closed);
}

#[test]
fn replayed_resume_hello_cannot_be_confirmed_either() {
    let secret = ResumeSecret([7; 32]);
    let mut app = App::resume(b"id", &secret, b"RESUME");
    let rh = app.take_out();
    let keys = KeyRing::new(Keypair::generate());
    let mut gate = Gate::new(keys.clone());
    gate.feed(&rh).unwrap();
    gate.ch.resume(Some(&secret), &mut gate.plain, &mut gate.out).unwrap();
    gate.ch.accept(b"S", &mut gate.out).unwrap();
    app.feed(&gate.take_out()).unwrap();
    let confirm = app.take_out();
    // Replayed while the gate still holds the same secret (the resume never committed).
    let mut replay = Gate::new(keys);
    replay.feed(&rh).unwrap();
    replay.ch.resume(Some(&secret), &mut replay.plain, &mut replay.out).unwrap();
    replay.ch.accept(b"S", &mut replay.out).unwrap();
    assert_eq!(replay.feed(&confirm).unwrap_err(), ChannelError::Transport(TransportError::Authentication));
    assert_eq!(gate.feed(&confirm).unwrap(), ["committed"]);
}

#[test]
fn replayed_reordered_and_foreign_data_records_fail() {
    let k = Keypair::generate();
    let keys = KeyRing::new(k.clone());
    // A committed session and the app's next two Data records, A then B.
    let session = || {
        let (mut app, gate, _, _) = login(&keys, k.public());
        app.ch.seal(b"A", &mut app.out).unwrap();
        let a = app.take_out();
        app.ch.seal(b"B", &mut app.out).unwrap();
        (gate, a, app.take_out())
    };
    let auth = ChannelError::Transport(TransportError::Authentication);
    let (mut gate, a, _) = session();
    gate.feed(&a).unwrap();
    assert_eq!(gate.feed(&a).unwrap_err(), auth, "the same record twice");
    assert_eq!(gate.ch.state(), ServerState::Closed);
    let (mut gate, _, b) = session();
    assert_eq!(gate.feed(&b).unwrap_err(), auth, "B before A");
    let (mut gate, _, _) = session();
    let (_, other_a, _) = session();
    assert_eq!(gate.feed(&other_a).unwrap_err(), auth, "A of another session");
}

#[test]
fn snow_transport_interoperates_with_ours() {
    // The app side made with snow alone, its transport snow's own: our record layer must be
    // Noise's transport exactly.
    let k = Keypair::generate();
    let app_key = Keypair::generate();
    let mut hs = snow::Builder::new(crate::handshake::ik_params())
        .prologue(PROLOGUE)
        .local_private_key(app_key.private())
        .remote_public_key(k.public())
        .build_initiator()
        .unwrap();
    let mut msg = vec![0; 200];
    let n = hs.write_message(b"LOGIN", &mut msg).unwrap();
    let mut hello = vec![1];
    hello.extend_from_slice(&k.key_id());
    hello.extend_from_slice(&msg[..n]);
    let server = respond_hello(&KeyRing::new(k), &hello, 0).unwrap();
    assert_eq!(server.frames(), b"LOGIN");
    assert_eq!(server.app_static(), Some(app_key.public()));
    let mut accept = Vec::new();
    let mut done = server.accept(b"SESSION", &mut accept).unwrap();
    let (_, body) = one(&accept);
    let mut payload = vec![0; 200];
    let n = hs.read_message(&body, &mut payload).unwrap();
    assert_eq!(&payload[..n], b"\x00SESSION");
    let h = hs.get_handshake_hash().to_vec();
    let mut snow_t = hs.into_transport_mode().unwrap();

    for i in 0..3u8 {
        let mut wire = Vec::new();
        done.transport.seal_into(&[i; 100], &mut wire).unwrap();
        let (_, body) = one(&wire);
        let mut p = vec![0; 200];
        let n = snow_t.read_message(&body, &mut p).unwrap();
        assert_eq!(&p[..n], &[i; 100]);
        let n = snow_t.write_message(&[i + 10; 50], &mut p).unwrap();
        let mut plain = Vec::new();
        done.transport.open_into(&p[..n], &mut plain).unwrap();
        assert_eq!(plain, [i + 10; 50]);
    }
    // The resumption secret is HKDF-SHA256 of the handshake hash, computed independently.
    let prk = hmac_sha256(&[0; 32], &h);
    let mut info = crate::handshake::RESUME_INFO.to_vec();
    info.push(1);
    assert_eq!(done.resume_secret.0, hmac_sha256(&prk, &info));
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, data).as_ref().try_into().unwrap()
}

/// One Hello, Accept and a few Data records, made once for the tamper properties.
struct Transcript {
    keys: KeyRing,
    hello: Vec<u8>,
    accept: Vec<u8>,
    confirm: Vec<u8>,
}

fn transcript() -> &'static Transcript {
    static T: std::sync::OnceLock<Transcript> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let k = Keypair::generate();
        let keys = KeyRing::new(k.clone());
        let mut app = App::login(k.public(), b"LOGIN frame bytes");
        let hello = app.take_out();
        let mut gate = Gate::new(keys.clone());
        gate.feed(&hello).unwrap();
        gate.ch.accept(b"SESSION frame bytes", &mut gate.out).unwrap();
        let accept = gate.take_out();
        app.feed(&accept).unwrap();
        Transcript { keys, hello, accept, confirm: app.take_out() }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_tampered_hello_byte_is_refused(at in any::<usize>(), bit in 0u8..8) {
        let t = transcript();
        let (_, mut body) = one(&t.hello);
        let i = at % body.len();
        body[i] ^= 1 << bit;
        prop_assert!(respond_hello(&t.keys, &body, 0).is_err());
    }

    #[test]
    fn any_truncated_hello_is_refused(cut in any::<usize>()) {
        let t = transcript();
        let (_, body) = one(&t.hello);
        let cut = cut % body.len();
        prop_assert!(respond_hello(&t.keys, &body[..cut], 0).is_err());
    }

    #[test]
    fn any_tampered_or_truncated_accept_fails(at in any::<usize>(), bit in 0u8..8, cut in any::<usize>()) {
        // The app's half is not clonable, so each case replays the Hello to a fresh app
        // handshake with the same keys: an Accept for another Hello must fail too.
        let t = transcript();
        let (_, mut body) = one(&t.accept);
        let i = at % body.len();
        body[i] ^= 1 << bit;
        let fresh = || {
            let mut out = Vec::new();
            ClientHandshake::login(t.keys.current().public(), &Keypair::generate(), b"x", &mut out).unwrap()
        };
        prop_assert_eq!(fresh().read_accept(&body, &mut Vec::new()).unwrap_err(), HandshakeError::BadAccept);
        let (_, body) = one(&t.accept);
        prop_assert!(fresh().read_accept(&body[..cut % body.len()], &mut Vec::new()).is_err());
    }

    #[test]
    fn any_tampered_resume_hello_is_refused(at in any::<usize>(), bit in 0u8..8) {
        let secret = ResumeSecret([3; 32]);
        let mut rh = Vec::new();
        ClientHandshake::resume(b"resume-id", &secret, b"RESUME", &mut rh).unwrap();
        let (_, mut body) = one(&rh);
        let i = at % body.len();
        body[i] ^= 1 << bit;
        // The gate finds the secret by resume_id: a changed id finds no session.
        let r = parse_resume_hello(&body).and_then(|h| {
            if h.resume_id == b"resume-id" { respond_resume(&h, &secret) } else { Err(crate::Rejection {
                reason: RejectReason::UnknownSession, message: "" }) }
        });
        prop_assert!(r.is_err());
    }

    #[test]
    fn any_tampered_data_record_fails(at in any::<usize>(), bit in 0u8..8) {
        let t = transcript();
        let (_, mut body) = one(&t.confirm);
        let i = at % body.len();
        body[i] ^= 1 << bit;
        let mut gate = Gate::new(t.keys.clone());
        gate.feed(&t.hello).unwrap();
        // A fresh Accept: the gate's ephemeral differs, so even the untampered record fails;
        // the genuine transport is checked in the unit tests of `transport`.
        gate.ch.accept(b"S", &mut gate.out).unwrap();
        prop_assert!(gate.ch.on_record(&t.keys, 0, rec(RecordType::Data, &body), &mut gate.plain, &mut gate.out).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// The test vector of docs/PROTOCOL.md §14.8.

fn seq(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start + i as u8)
}

struct Vector {
    gate_public: PublicKey,
    app_public: PublicKey,
    hello: Vec<u8>,
    accept: Vec<u8>,
    confirm: Vec<u8>,
    app_data: Vec<u8>,
    gate_data: Vec<u8>,
    secret1: ResumeSecret,
    resume_hello: Vec<u8>,
    resume_accept: Vec<u8>,
    resume_confirm: Vec<u8>,
    secret2: ResumeSecret,
}

fn vector() -> Vector {
    let gate = Keypair::dev();
    let app = Keypair::from_private(seq(0x20));
    let keys = KeyRing::new(gate.clone());
    // Login.
    let mut hello = Vec::new();
    let c = ClientHandshake::login_with(gate.public(), &app, b"login", &mut hello, Some(&seq(0x40))).unwrap();
    let (_, body) = one(&hello);
    let s = respond_hello_with(&keys, &body, 0, Some(&seq(0x60))).unwrap();
    assert_eq!(s.frames(), b"login");
    let mut accept = Vec::new();
    let mut sd = s.accept(b"session", &mut accept).unwrap();
    let (_, body) = one(&accept);
    let mut confirm = Vec::new();
    let mut cd = c.read_accept(&body, &mut confirm).unwrap();
    assert_eq!(cd.frames, b"session");
    assert_eq!(cd.resume_secret, sd.resume_secret);
    let mut plain = Vec::new();
    sd.transport.open_into(&one(&confirm).1, &mut plain).unwrap();
    let mut app_data = Vec::new();
    cd.transport.seal_into(b"gps", &mut app_data).unwrap();
    sd.transport.open_into(&one(&app_data).1, &mut plain).unwrap();
    assert_eq!(plain, b"gps");
    let mut gate_data = Vec::new();
    sd.transport.seal_into(b"push", &mut gate_data).unwrap();
    // Resume with the secret the login left.
    let secret1 = cd.resume_secret.clone();
    let mut resume_hello = Vec::new();
    let c =
        ClientHandshake::resume_with(b"session-42", &secret1, b"resume", &mut resume_hello, Some(&seq(0x80)))
            .unwrap();
    let (_, body) = one(&resume_hello);
    let h = parse_resume_hello(&body).unwrap();
    assert_eq!(h.resume_id, b"session-42");
    let s = respond_resume_with(&h, &secret1, Some(&seq(0xa0))).unwrap();
    assert_eq!(s.frames(), b"resume");
    let mut resume_accept = Vec::new();
    let sd = s.accept(b"session2", &mut resume_accept).unwrap();
    let mut resume_confirm = Vec::new();
    let cd = c.read_accept(&one(&resume_accept).1, &mut resume_confirm).unwrap();
    assert_eq!(cd.resume_secret, sd.resume_secret);
    assert_ne!(cd.resume_secret, secret1);
    Vector {
        gate_public: *gate.public(),
        app_public: *app.public(),
        hello,
        accept,
        confirm,
        app_data,
        gate_data,
        secret1,
        resume_hello,
        resume_accept,
        resume_confirm,
        secret2: cd.resume_secret,
    }
}

/// Hex in rows of 32 bytes, as docs/PROTOCOL.md prints it.
fn rows(b: &[u8]) -> String {
    b.chunks(32)
        .map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// `cargo test -p channel print_test_vector -- --nocapture --ignored` prints it for the spec.
#[test]
#[ignore]
fn print_test_vector() {
    let v = vector();
    for (name, bytes) in [
        ("gate static public", &v.gate_public[..]),
        ("app static public", &v.app_public[..]),
        ("Hello", &v.hello),
        ("Accept", &v.accept),
        ("confirm", &v.confirm),
        ("app Data", &v.app_data),
        ("gate Data", &v.gate_data),
        ("secret1", &v.secret1.0),
        ("ResumeHello", &v.resume_hello),
        ("resume Accept", &v.resume_accept),
        ("resume confirm", &v.resume_confirm),
        ("secret2", &v.secret2.0),
    ] {
        println!("{name} ({} bytes)\n{}\n", bytes.len(), rows(bytes));
    }
}

#[test]
fn test_vector_matches_the_protocol_document() {
    let v = vector();
    let doc = include_str!("../../docs/PROTOCOL.md");
    let section = &doc[doc.find("### 14.8").expect("PROTOCOL.md has §14.8")..];
    // Each block in §14.8 is headed by a line `<name> (<n> bytes)` and fenced.
    let block = |name: &str| {
        let at = section.find(&format!("\n{name} (")).unwrap_or_else(|| panic!("§14.8 lists {name}"));
        let rest = &section[at..];
        let start = rest.find("```\n").unwrap() + 4;
        let end = start + rest[start..].find("```").unwrap();
        unhex(&rest[start..end])
    };
    assert_eq!(block("gate static public"), v.gate_public);
    assert_eq!(block("app static public"), v.app_public);
    assert_eq!(block("Hello"), v.hello);
    assert_eq!(block("Accept"), v.accept);
    assert_eq!(block("confirm"), v.confirm);
    assert_eq!(block("app Data"), v.app_data);
    assert_eq!(block("gate Data"), v.gate_data);
    assert_eq!(block("secret1"), v.secret1.0);
    assert_eq!(block("ResumeHello"), v.resume_hello);
    assert_eq!(block("resume Accept"), v.resume_accept);
    assert_eq!(block("resume confirm"), v.resume_confirm);
    assert_eq!(block("secret2"), v.secret2.0);
}

/// The vector recomputed from the text of §14 by an implementation that shares nothing with
/// this crate. Skipped where python3 or its `cryptography` package is missing.
#[test]
fn test_vector_agrees_with_an_independent_implementation() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_vector.py");
    match std::process::Command::new("python3").arg(script).output() {
        Err(e) => eprintln!("skipped: python3: {e}"),
        Ok(o) if o.status.code() == Some(2) => eprintln!("skipped: {}", String::from_utf8_lossy(&o.stderr)),
        Ok(o) => assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

/// What an idle encrypted session costs the gate in this crate: the channel (its transport
/// inline) and the record reader, which owns no buffer between records.
#[test]
fn per_connection_state_is_small() {
    assert_eq!(std::mem::size_of::<Transport>(), 80);
    assert_eq!(std::mem::size_of::<ServerChannel>(), 88);
    assert_eq!(std::mem::size_of::<ClientChannel>(), 88);
    assert_eq!(std::mem::size_of::<RecordReader>(), 48);
}
