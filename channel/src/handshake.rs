//! The two handshakes, one message each way (docs/PROTOCOL.md §14.3).
//!
//! - Fresh session: `Noise_IK_25519_ChaChaPoly_SHA256`. The app (initiator) knows the gate's
//!   static public key; its first message carries the app's first frames (a Login).
//! - Resume: `Noise_NNpsk0_25519_ChaChaPoly_SHA256` with the session's resumption secret as
//!   the psk: one ephemeral-ephemeral DH, no static DH, about a third of IK's cost.
//!
//! These are the building blocks; [`crate::server::ServerChannel`] and
//! [`crate::client::ClientChannel`] drive them in the right order and are what a gate or an
//! app should use.
//!
//! After either handshake both sides derive the next resumption secret from the handshake
//! hash, so it changes on every resume, and take the raw split keys into a [`Transport`].

use std::fmt;
use std::sync::OnceLock;

use snow::params::NoiseParams;
use snow::HandshakeState;
use thiserror::Error;

use crate::keys::{KeyId, KeyRing, Keypair, PublicKey, WhichKey, KEY_LEN};
use crate::record::{write_header, RecordType, MAX_BODY};
use crate::transport::{Transport, TAG_LEN};

/// Hashed into both handshakes, so a handshake of anything else cannot pass for ours.
pub const PROLOGUE: &[u8] = b"fleetgate-channel-v1";

/// The `version` byte of Hello and ResumeHello.
pub const VERSION: u8 = 1;

/// HKDF `info` of the resumption secret.
pub const RESUME_INFO: &[u8] = b"fleetgate resume v1";

/// The most frame bytes a handshake message carries (Hello, ResumeHello or Accept payload):
/// a Login, a Resume or a Session frame with plenty of room, and every record below
/// [`MAX_BODY`].
pub const MAX_HANDSHAKE_FRAMES: usize = 16_000;

/// The longest `resume_id` (its length is one byte).
pub const MAX_RESUME_ID: usize = 255;

/// Accept flag: the Hello used the gate's previous key; the current public key follows.
pub const ACCEPT_NEW_KEY: u8 = 0x01;

const IK: &str = "Noise_IK_25519_ChaChaPoly_SHA256";
const NNPSK0: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";
/// An ephemeral public key on the wire.
const E_LEN: usize = KEY_LEN;

pub(crate) fn ik_params() -> NoiseParams {
    static P: OnceLock<NoiseParams> = OnceLock::new();
    P.get_or_init(|| IK.parse().expect("a valid Noise protocol name")).clone()
}

fn nnpsk0_params() -> NoiseParams {
    static P: OnceLock<NoiseParams> = OnceLock::new();
    P.get_or_init(|| NNPSK0.parse().expect("a valid Noise protocol name")).clone()
}

/// The 32-byte resumption secret: the psk of the next resume. It moves with the held session
/// and must stay as secret as the transport keys. `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeSecret(pub [u8; 32]);

impl fmt::Debug for ResumeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeSecret(<hidden>)")
    }
}

/// HKDF-SHA256(ikm = handshake hash, salt = empty, info = [`RESUME_INFO`]), 32 bytes.
fn resume_secret(handshake_hash: &[u8]) -> ResumeSecret {
    use ring::hkdf::{Salt, HKDF_SHA256};
    let mut out = [0; 32];
    Salt::new(HKDF_SHA256, &[])
        .extract(handshake_hash)
        .expand(&[RESUME_INFO], HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is within HKDF-SHA256's output limit");
    ResumeSecret(out)
}

/// Split the finished handshake into a transport and the next resumption secret.
fn finish(mut hs: HandshakeState) -> (Transport, ResumeSecret) {
    debug_assert!(hs.is_handshake_finished());
    let secret = resume_secret(hs.get_handshake_hash());
    // k1 seals initiator → responder, k2 responder → initiator (Noise's Split()).
    let (k1, k2) = hs.dangerously_get_raw_split();
    let transport =
        if hs.is_initiator() { Transport::from_keys(k1, k2) } else { Transport::from_keys(k2, k1) };
    (transport, secret)
}

/// Why a handshake step failed on the side that called it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("{len} bytes of frames do not fit a handshake message (at most {MAX_HANDSHAKE_FRAMES})")]
    FramesTooLarge { len: usize },
    #[error("resume id of {0} bytes is longer than {MAX_RESUME_ID}")]
    ResumeIdTooLong(usize),
    /// The Accept did not decrypt: it was tampered with, is not the answer to this Hello, or
    /// (login) the gate does not hold the private key the app was given.
    #[error(
        "the Accept did not authenticate (tampered, not the answer to this Hello, or the wrong gate key)"
    )]
    BadAccept,
    #[error("the Accept's payload is malformed: {0}")]
    MalformedAccept(&'static str),
    /// snow refused an operation the protocol never asks of it; a bug, reported rather than
    /// panicking.
    #[error("Noise handshake error: {0}")]
    Noise(String),
}

fn noise(e: snow::Error) -> HandshakeError {
    HandshakeError::Noise(e.to_string())
}

/// Why the gate refuses a handshake: the `reason` byte of a Reject record (§14.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The Hello's key_id names neither the gate's current key nor its unexpired previous one.
    UnknownKey,
    /// A handshake message did not decrypt or parse.
    BadHandshake,
    /// Resume: no held session has this resume_id, or its secret did not match.
    UnknownSession,
    /// The `version` byte is not one this gate speaks.
    Version,
    /// The gate is refusing handshakes for load; retry later.
    Overloaded,
    /// A value this build does not know (from a newer gate).
    Other(u8),
}

impl RejectReason {
    pub fn to_u8(self) -> u8 {
        match self {
            RejectReason::UnknownKey => 1,
            RejectReason::BadHandshake => 2,
            RejectReason::UnknownSession => 3,
            RejectReason::Version => 4,
            RejectReason::Overloaded => 5,
            RejectReason::Other(b) => b,
        }
    }

    pub fn from_u8(b: u8) -> RejectReason {
        match b {
            1 => RejectReason::UnknownKey,
            2 => RejectReason::BadHandshake,
            3 => RejectReason::UnknownSession,
            4 => RejectReason::Version,
            5 => RejectReason::Overloaded,
            b => RejectReason::Other(b),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::UnknownKey => f.write_str("unknown gate key"),
            RejectReason::BadHandshake => f.write_str("bad handshake"),
            RejectReason::UnknownSession => f.write_str("unknown session"),
            RejectReason::Version => f.write_str("unsupported channel version"),
            RejectReason::Overloaded => f.write_str("gate overloaded"),
            RejectReason::Other(b) => write!(f, "reason {b}"),
        }
    }
}

/// The gate refuses a handshake: send [`Rejection::write_record`]'s Reject, then close.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{reason}: {message}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: &'static str,
}

impl Rejection {
    fn new(reason: RejectReason, message: &'static str) -> Rejection {
        Rejection { reason, message }
    }

    /// Appends the Reject record.
    pub fn write_record(&self, out: &mut Vec<u8>) {
        write_reject(out, self.reason, self.message);
    }
}

/// Appends a Reject record: `reason u8 ‖ message` (UTF-8, cut at a character boundary to fit).
pub fn write_reject(out: &mut Vec<u8>, reason: RejectReason, message: &str) {
    let mut end = message.len().min(MAX_BODY - 1);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    write_header(out, RecordType::Reject, 1 + end);
    out.push(reason.to_u8());
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Reads a Reject record's body: the reason and its message (invalid UTF-8 replaced).
/// A Reject is unauthenticated: anyone on the path can forge one, so it is a hint only.
pub fn parse_reject(body: &[u8]) -> (RejectReason, String) {
    match body.split_first() {
        Some((&r, msg)) => (RejectReason::from_u8(r), String::from_utf8_lossy(msg).into_owned()),
        None => (RejectReason::Other(0), String::new()),
    }
}

// ---------------------------------------------------------------------------------------------
// The app's side.

/// The app's half-done handshake: it sent a Hello or ResumeHello and waits for the Accept.
pub struct ClientHandshake {
    hs: HandshakeState,
}

impl fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHandshake").finish_non_exhaustive()
    }
}

/// What the app has once the gate's Accept authenticated.
#[derive(Debug)]
pub struct Accepted {
    pub transport: Transport,
    /// The Accept's frames (the Session answer to the Login or Resume).
    pub frames: Vec<u8>,
    /// Set when the Hello used the gate's previous key: the gate's current public key, which
    /// the app should store in place of the one it had.
    pub new_server_key: Option<PublicKey>,
    /// The psk of this session's next resume; replaces the previous one.
    pub resume_secret: ResumeSecret,
}

impl ClientHandshake {
    /// Starts a fresh session with the gate whose static public key is `server_public`:
    /// appends the Hello record (carrying `frames`, normally one Login frame) to `out`.
    ///
    /// `app_key` is the app's static key. The gate does not authenticate apps by it (the login
    /// token does); an app may keep one per installation or make one per login with
    /// [`Keypair::generate`].
    pub fn login(
        server_public: &PublicKey,
        app_key: &Keypair,
        frames: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientHandshake, HandshakeError> {
        Self::login_with(server_public, app_key, frames, out, None)
    }

    pub(crate) fn login_with(
        server_public: &PublicKey,
        app_key: &Keypair,
        frames: &[u8],
        out: &mut Vec<u8>,
        fixed_ephemeral: Option<&[u8; 32]>,
    ) -> Result<ClientHandshake, HandshakeError> {
        check_frames(frames)?;
        let mut b = snow::Builder::new(ik_params())
            .prologue(PROLOGUE)
            .local_private_key(app_key.private())
            .remote_public_key(server_public);
        if let Some(e) = fixed_ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let mut hs = b.build_initiator().map_err(noise)?;
        // e, es, s (encrypted: key + tag), ss, payload + tag.
        let msg_len = E_LEN + KEY_LEN + TAG_LEN + frames.len() + TAG_LEN;
        let start = out.len();
        write_header(out, RecordType::Hello, 1 + 8 + msg_len);
        out.push(VERSION);
        out.extend_from_slice(&crate::keys::key_id(server_public));
        write_message(&mut hs, frames, msg_len, out).inspect_err(|_| out.truncate(start))?;
        Ok(ClientHandshake { hs })
    }

    /// Resumes a held session: appends the ResumeHello record to `out`, carrying `frames`
    /// (normally one Resume frame). `resume_id` is what the gate gave the app for this purpose
    /// (opaque here); `secret` is the session's current resumption secret.
    pub fn resume(
        resume_id: &[u8],
        secret: &ResumeSecret,
        frames: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientHandshake, HandshakeError> {
        Self::resume_with(resume_id, secret, frames, out, None)
    }

    pub(crate) fn resume_with(
        resume_id: &[u8],
        secret: &ResumeSecret,
        frames: &[u8],
        out: &mut Vec<u8>,
        fixed_ephemeral: Option<&[u8; 32]>,
    ) -> Result<ClientHandshake, HandshakeError> {
        check_frames(frames)?;
        if resume_id.len() > MAX_RESUME_ID {
            return Err(HandshakeError::ResumeIdTooLong(resume_id.len()));
        }
        let mut b = snow::Builder::new(nnpsk0_params()).prologue(PROLOGUE).psk(0, &secret.0);
        if let Some(e) = fixed_ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let mut hs = b.build_initiator().map_err(noise)?;
        // psk, e; the payload is encrypted under a key from the psk and e.
        let msg_len = E_LEN + frames.len() + TAG_LEN;
        let start = out.len();
        write_header(out, RecordType::ResumeHello, 2 + resume_id.len() + msg_len);
        out.push(VERSION);
        out.push(resume_id.len() as u8);
        out.extend_from_slice(resume_id);
        write_message(&mut hs, frames, msg_len, out).inspect_err(|_| out.truncate(start))?;
        Ok(ClientHandshake { hs })
    }

    /// Reads the gate's Accept (the body of an Accept record). On success the app must send a
    /// Data record at once (§14.3, the commit rule): this appends one, with no plaintext, to
    /// `out`, sealed by the returned transport.
    pub fn read_accept(mut self, body: &[u8], out: &mut Vec<u8>) -> Result<Accepted, HandshakeError> {
        let mut payload = vec![0; body.len()];
        let n = self.hs.read_message(body, &mut payload).map_err(|_| HandshakeError::BadAccept)?;
        if !self.hs.is_handshake_finished() {
            return Err(HandshakeError::Noise("handshake unfinished after the Accept".into()));
        }
        payload.truncate(n);
        let Some((&flags, rest)) = payload.split_first() else {
            return Err(HandshakeError::MalformedAccept("no flags byte"));
        };
        if flags & !ACCEPT_NEW_KEY != 0 {
            return Err(HandshakeError::MalformedAccept("unknown flags"));
        }
        let (new_server_key, frames_at) = if flags & ACCEPT_NEW_KEY != 0 {
            let key: PublicKey = rest
                .get(..KEY_LEN)
                .and_then(|k| k.try_into().ok())
                .ok_or(HandshakeError::MalformedAccept("the new-key flag is set but the key is missing"))?;
            (Some(key), 1 + KEY_LEN)
        } else {
            (None, 1)
        };
        payload.drain(..frames_at);
        let (mut transport, resume_secret) = finish(self.hs);
        transport.seal_into(&[], out).expect("a new transport has every nonce left");
        Ok(Accepted { transport, frames: payload, new_server_key, resume_secret })
    }
}

fn check_frames(frames: &[u8]) -> Result<(), HandshakeError> {
    if frames.len() > MAX_HANDSHAKE_FRAMES {
        return Err(HandshakeError::FramesTooLarge { len: frames.len() });
    }
    Ok(())
}

/// Appends the next handshake message, of exactly `msg_len` bytes, to `out` (the record
/// header before it says `msg_len`, so any other length is refused).
fn write_message(
    hs: &mut HandshakeState,
    payload: &[u8],
    msg_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    let start = out.len();
    out.resize(start + msg_len, 0);
    match hs.write_message(payload, &mut out[start..]) {
        Ok(n) if n == msg_len => Ok(()),
        Ok(n) => Err(HandshakeError::Noise(format!("message of {n} bytes, {msg_len} expected"))),
        Err(e) => Err(noise(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// The gate's side.

/// The gate's half-done handshake: the app's message 1 decrypted, the Accept not yet written.
/// The gate reads [`frames`](Self::frames) (the Login or Resume), works out its answer, then
/// calls [`accept`](Self::accept).
pub struct ServerHandshake {
    hs: HandshakeState,
    frames: Vec<u8>,
    /// IK: the app's static public key (from the Hello).
    app_static: Option<PublicKey>,
    /// The Hello used the previous key: the Accept carries this one, the current.
    new_key: Option<PublicKey>,
}

impl fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("frames", &self.frames.len())
            .field("resume", &self.app_static.is_none())
            .field("previous_key", &self.new_key.is_some())
            .finish_non_exhaustive()
    }
}

/// What the gate has once it wrote the Accept.
#[derive(Debug)]
pub struct ServerAccepted {
    pub transport: Transport,
    /// The psk of this session's next resume. Store it with the session only once the app's
    /// first Data record authenticates (the commit, §14.3).
    pub resume_secret: ResumeSecret,
}

/// A ResumeHello, parsed but not yet decrypted: the gate looks up the session named by
/// `resume_id` to find its resumption secret, then calls [`respond_resume`].
#[derive(Debug, Clone, Copy)]
pub struct ResumeHello<'a> {
    pub resume_id: &'a [u8],
    message: &'a [u8],
}

/// Reads a Hello (the body of a Hello record) with the gate's keys. `now_ms` is compared with
/// the previous key's expiry. On a refusal, send the Rejection's record and close.
pub fn respond_hello(keys: &KeyRing, body: &[u8], now_ms: u64) -> Result<ServerHandshake, Rejection> {
    respond_hello_with(keys, body, now_ms, None)
}

pub(crate) fn respond_hello_with(
    keys: &KeyRing,
    body: &[u8],
    now_ms: u64,
    fixed_ephemeral: Option<&[u8; 32]>,
) -> Result<ServerHandshake, Rejection> {
    let bad = |m| Rejection::new(RejectReason::BadHandshake, m);
    let (&version, rest) = body.split_first().ok_or(bad("empty Hello"))?;
    if version != VERSION {
        return Err(Rejection::new(RejectReason::Version, "this gate speaks channel version 1"));
    }
    let (id, message) = rest.split_first_chunk::<8>().ok_or(bad("Hello too short"))?;
    let id: &KeyId = id;
    let (key, which) = keys
        .find(id, now_ms)
        .ok_or(Rejection::new(RejectReason::UnknownKey, "the Hello names a key this gate does not hold"))?;
    let mut b = snow::Builder::new(ik_params()).prologue(PROLOGUE).local_private_key(key.private());
    if let Some(e) = fixed_ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    let mut hs = b.build_responder().map_err(|_| bad("handshake setup failed"))?;
    let mut frames = vec![0; message.len()];
    let n = hs.read_message(message, &mut frames).map_err(|_| bad("the Hello did not decrypt"))?;
    frames.truncate(n);
    let app_static = hs.get_remote_static().and_then(|k| k.try_into().ok());
    let new_key = (which == WhichKey::Previous).then(|| *keys.current().public());
    Ok(ServerHandshake { hs, frames, app_static, new_key })
}

/// Parses a ResumeHello (the body of a ResumeHello record) far enough to read its resume_id.
pub fn parse_resume_hello(body: &[u8]) -> Result<ResumeHello<'_>, Rejection> {
    let bad = |m| Rejection::new(RejectReason::BadHandshake, m);
    let (&version, rest) = body.split_first().ok_or(bad("empty ResumeHello"))?;
    if version != VERSION {
        return Err(Rejection::new(RejectReason::Version, "this gate speaks channel version 1"));
    }
    let (&id_len, rest) = rest.split_first().ok_or(bad("ResumeHello too short"))?;
    if rest.len() < id_len as usize {
        return Err(bad("ResumeHello too short"));
    }
    let (resume_id, message) = rest.split_at(id_len as usize);
    Ok(ResumeHello { resume_id, message })
}

/// Decrypts a ResumeHello with the session's resumption secret. Refused with UnknownSession
/// when it does not decrypt: the secret is not the one the app holds (a replay of an older
/// ResumeHello, after the secret moved on, lands here too).
pub fn respond_resume(hello: &ResumeHello<'_>, secret: &ResumeSecret) -> Result<ServerHandshake, Rejection> {
    respond_resume_with(hello, secret, None)
}

pub(crate) fn respond_resume_with(
    hello: &ResumeHello<'_>,
    secret: &ResumeSecret,
    fixed_ephemeral: Option<&[u8; 32]>,
) -> Result<ServerHandshake, Rejection> {
    let bad = |m| Rejection::new(RejectReason::UnknownSession, m);
    let mut b = snow::Builder::new(nnpsk0_params()).prologue(PROLOGUE).psk(0, &secret.0);
    if let Some(e) = fixed_ephemeral {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    let mut hs = b.build_responder().map_err(|_| bad("handshake setup failed"))?;
    let mut frames = vec![0; hello.message.len()];
    let n = hs
        .read_message(hello.message, &mut frames)
        .map_err(|_| bad("the ResumeHello did not decrypt with this session's secret"))?;
    frames.truncate(n);
    Ok(ServerHandshake { hs, frames, app_static: None, new_key: None })
}

impl ServerHandshake {
    /// The app's first frames, decrypted (a Login or a Resume frame). Tentative until the
    /// commit: a replayed Hello decrypts too.
    pub fn frames(&self) -> &[u8] {
        &self.frames
    }

    /// Moves the frames out (they are not needed for the Accept).
    pub fn take_frames(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.frames)
    }

    /// The app's static public key (login only).
    pub fn app_static(&self) -> Option<&PublicKey> {
        self.app_static.as_ref()
    }

    /// True when the Hello used the gate's previous key (the Accept then names the current).
    pub fn used_previous_key(&self) -> bool {
        self.new_key.is_some()
    }

    /// Appends the Accept record to `out`, carrying `frames` (the Session answer).
    pub fn accept(self, frames: &[u8], out: &mut Vec<u8>) -> Result<ServerAccepted, HandshakeError> {
        let mut hs = self.hs;
        check_frames(frames)?;
        let mut payload = Vec::with_capacity(1 + KEY_LEN + frames.len());
        match &self.new_key {
            Some(k) => {
                payload.push(ACCEPT_NEW_KEY);
                payload.extend_from_slice(k);
            }
            None => payload.push(0),
        }
        payload.extend_from_slice(frames);
        // e, ee (and se for IK), payload + tag.
        let msg_len = E_LEN + payload.len() + TAG_LEN;
        let start = out.len();
        write_header(out, RecordType::Accept, msg_len);
        if let Err(e) = write_message(&mut hs, &payload, msg_len, out) {
            out.truncate(start);
            return Err(e);
        }
        let (transport, resume_secret) = finish(hs);
        Ok(ServerAccepted { transport, resume_secret })
    }
}
