//! fleetgate's secure channel on the app port, sans I/O (docs/PROTOCOL.md §14).
//!
//! Every app-port byte in secure mode is a record (`type u8 ‖ len u16 BE ‖ body`). The app opens
//! with a Noise handshake, IK for a fresh session or NNpsk0 with the session's resumption secret
//! for a resume, whose first message carries its first frames; the gate's Accept carries its
//! answer; then Data records carry the frame byte stream, sealed with ChaCha20-Poly1305 as in
//! Noise's transport phase.
//!
//! What to use:
//! - [`RecordReader`]: delimits records in the bytes read from a socket.
//! - [`ServerChannel`] (gate) and [`ClientChannel`] (app): one connection's channel, records in,
//!   events, plaintext and bytes to send out. They enforce the order of records and the commit
//!   rule.
//! - [`keys`]: key pairs, the gate's [`KeyRing`] (current and previous key), key files, the
//!   development key pair.
//! - [`handshake`] and [`Transport`]: the steps the two channels are made of, for callers that
//!   need them one by one.
//!
//! A gate's read loop, in short:
//!
//! ```
//! use channel::{ClientChannel, Keypair, KeyRing, RecordReader, ServerChannel, ServerEvent};
//! let keys = KeyRing::new(Keypair::dev());
//! let (mut to_gate, mut to_app) = (Vec::new(), Vec::new());
//! let mut app =
//!     ClientChannel::login(Keypair::dev().public(), &Keypair::generate(), b"<Login frame>", &mut to_gate)?;
//!
//! let (mut gate, mut reader, mut frames) = (ServerChannel::new(), RecordReader::new(), Vec::new());
//! let mut input = &to_gate[..];
//! while let Some(record) = reader.next(&mut input)? {
//!     match gate.on_record(&keys, 0, record, &mut frames, &mut to_app)? {
//!         ServerEvent::Hello { .. } => {} // `frames` holds the Login: verify it, answer below
//!         ServerEvent::ResumeHello { .. } | ServerEvent::Committed | ServerEvent::Data => {}
//!     }
//! }
//! assert_eq!(frames, b"<Login frame>");
//! let _resume_secret = gate.accept(b"<Session frame>", &mut to_app)?;
//! # let (mut r, mut app_frames, mut back) = (RecordReader::new(), Vec::new(), Vec::new());
//! # let mut input = &to_app[..];
//! # while let Some(record) = r.next(&mut input)? { app.on_record(record, &mut app_frames, &mut back)?; }
//! # let mut input = &back[..];
//! # while let Some(record) = reader.next(&mut input)? { gate.on_record(&keys, 0, record, &mut frames, &mut to_app)?; }
//! # assert!(gate.is_committed());
//! # Ok::<(), channel::ChannelError>(())
//! ```
//!
//! No I/O except reading and writing key files, no clock (callers pass `now_ms`), no async,
//! and no panic on anything from the network.

pub mod client;
pub mod handshake;
pub mod keys;
pub mod record;
pub mod server;
pub mod transport;

#[cfg(test)]
mod tests;

pub use client::{ClientChannel, ClientEvent, ClientState};
pub use handshake::{
    Accepted, ClientHandshake, HandshakeError, RejectReason, Rejection, ResumeSecret, ServerAccepted,
    ServerHandshake,
};
pub use keys::{KeyError, KeyId, KeyRing, Keypair, PublicKey};
pub use record::{Record, RecordError, RecordReader, RecordType};
pub use server::{ServerChannel, ServerEvent, ServerState};
pub use transport::{Transport, TransportError};

use thiserror::Error;

/// A channel ended. Whatever the variant, the connection must close (after sending what the
/// call appended to `out`, if anything).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// The byte stream is not a record stream.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A record the other side may not send now: a Data record before the handshake finished,
    /// a second Hello, an Accept sent to a gate, and so on.
    #[error("unexpected {kind:?} record {state}")]
    Unexpected { kind: RecordType, state: &'static str },
    /// Gate side: the handshake was refused; the Reject record was appended to `out`.
    #[error("handshake refused: {0}")]
    Refused(Rejection),
    /// App side: the gate sent a Reject. Unauthenticated: a hint only.
    #[error("the gate refused the handshake ({reason}: {message}); unauthenticated, a hint only")]
    RejectedByGate { reason: RejectReason, message: String },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A Data record failed authentication, or the nonces ran out.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The caller asked for something the channel's state does not allow (sealing before the
    /// Accept, accepting twice). The state is unchanged.
    #[error("cannot {op} {state}")]
    NotReady { op: &'static str, state: &'static str },
}
