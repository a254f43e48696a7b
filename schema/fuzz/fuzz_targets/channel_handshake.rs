//! The gate's side of the secure channel's handshakes on hostile input: a record stream fed to a
//! `ServerChannel`, or a genuine Hello / ResumeHello with bytes changed or cut. It never panics;
//! a genuine message is accepted and a changed one is refused.
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run channel_handshake` in schema/.
#![no_main]

use std::sync::OnceLock;

use channel::handshake::{parse_resume_hello, respond_hello, respond_resume, ClientHandshake, ResumeSecret};
use channel::{KeyRing, Keypair, RecordReader, ServerChannel, ServerEvent, ServerState};
use libfuzzer_sys::fuzz_target;

const SECRET: ResumeSecret = ResumeSecret([0x5e; 32]);
const RESUME_ID: &[u8] = b"uid-42/epoch-7";

struct Fixture {
    keys: KeyRing,
    hello: Vec<u8>,
    resume_hello: Vec<u8>,
}

/// A ring with a previous key, a Hello for each key and a ResumeHello, bodies only.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let old = Keypair::from_private([1; 32]);
        let keys = KeyRing::with_previous(Keypair::dev(), old, 1_000);
        let mut hello = Vec::new();
        ClientHandshake::login(Keypair::dev().public(), &Keypair::generate(), b"login frames", &mut hello)
            .unwrap();
        let mut resume_hello = Vec::new();
        ClientHandshake::resume(RESUME_ID, &SECRET, b"resume frames", &mut resume_hello).unwrap();
        Fixture { keys, hello: hello[3..].to_vec(), resume_hello: resume_hello[3..].to_vec() }
    })
}

/// Applies the (position u16, xor u8) triples of `edits` to `body`.
fn edit(body: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    for p in edits.chunks_exact(3) {
        // One position past the end means: cut the body at p[2].
        let at = u16::from_le_bytes([p[0], p[1]]) as usize % (b.len() + 1);
        if at < b.len() {
            b[at] ^= p[2];
        } else {
            b.truncate(p[2] as usize % (b.len() + 1));
        }
    }
    b
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            // A raw record stream into a gate-side channel, every step the gate could take.
            let mut ch = ServerChannel::new();
            let mut reader = RecordReader::new();
            let (mut plain, mut out) = (Vec::new(), Vec::new());
            let mut input = rest;
            loop {
                let rec = match reader.next(&mut input) {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(_) => break,
                };
                match ch.on_record(&f.keys, 0, rec, &mut plain, &mut out) {
                    Ok(ServerEvent::ResumeHello { resume_id }) => {
                        let secret = (resume_id == RESUME_ID).then_some(&SECRET);
                        if ch.resume(secret, &mut plain, &mut out).is_err() {
                            break;
                        }
                        ch.accept(b"session", &mut out).unwrap();
                    }
                    Ok(ServerEvent::Hello { .. }) => {
                        ch.accept(b"session", &mut out).unwrap();
                    }
                    Ok(ServerEvent::Committed | ServerEvent::Data) => {
                        unreachable!("nobody without the app's ephemeral key can seal a Data record")
                    }
                    Err(_) => {
                        assert_eq!(ch.state(), ServerState::Closed);
                        break;
                    }
                }
            }
        }
        1 => {
            let body = edit(&f.hello, rest);
            let now = 999;
            match respond_hello(&f.keys, &body, now) {
                Ok(hs) => {
                    assert_eq!(body, f.hello, "a changed Hello was accepted");
                    assert_eq!(hs.frames(), b"login frames");
                    hs.accept(b"session", &mut Vec::new()).unwrap();
                }
                Err(_) => assert_ne!(body, f.hello, "the genuine Hello was refused"),
            }
        }
        _ => {
            let body = edit(&f.resume_hello, rest);
            let r = parse_resume_hello(&body).and_then(|h| {
                if h.resume_id == RESUME_ID {
                    respond_resume(&h, &SECRET)
                } else {
                    Err(channel::Rejection { reason: channel::RejectReason::UnknownSession, message: "" })
                }
            });
            match r {
                Ok(hs) => {
                    assert_eq!(body, f.resume_hello, "a changed ResumeHello was accepted");
                    assert_eq!(hs.frames(), b"resume frames");
                }
                Err(_) => assert_ne!(body, f.resume_hello, "the genuine ResumeHello was refused"),
            }
        }
    }
});
