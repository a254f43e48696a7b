//! The app's side of one connection in secure mode: a sans-I/O state machine
//! (docs/PROTOCOL.md §14.3, §14.6).
//!
//! ```text
//! login() / resume() ──▶ AwaitingAccept ──Accept──▶ Open ──Data──▶ Open
//!        (Hello in out)         │ Reject         (commit record in out)
//!                               ▼
//!                            Closed
//! ```
//!
//! Bytes to send go to `out`; frame bytes from the gate (the Accept's Session answer, then
//! every Data record's plaintext) go to `plain`. Any error ends the channel: close the
//! connection. A Reject is unauthenticated (anyone on the path can forge one), so it is
//! reported as a hint ([`ChannelError::RejectedByGate`]) and ends this attempt; it must not
//! make the app forget its session or its gate key.

use crate::handshake::{parse_reject, ClientHandshake, ResumeSecret};
use crate::keys::{Keypair, PublicKey};
use crate::record::{Record, RecordType};
use crate::transport::Transport;
use crate::ChannelError;

/// Where an app-side channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// The Hello or ResumeHello went out; the next record must be an Accept (or a Reject).
    AwaitingAccept,
    /// Data both ways.
    Open,
    /// Ended by an error or a Reject.
    Closed,
}

impl ClientState {
    fn describe(self) -> &'static str {
        match self {
            ClientState::AwaitingAccept => "before the Accept",
            ClientState::Open => "on an open channel",
            ClientState::Closed => "after the channel closed",
        }
    }
}

/// What a record from the gate meant. Any frame bytes it carried were appended to `plain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The Accept authenticated: the Session answer is in `plain`, and the commit record (a
    /// Data record with no plaintext) is in `out`: send it now, before anything else.
    Accepted {
        /// The gate's current public key, when the Hello used its previous one: store it in
        /// place of the old one.
        new_server_key: Option<PublicKey>,
        /// The psk of the next resume; replaces the previous one.
        resume_secret: ResumeSecret,
    },
    /// A Data record; its plaintext is in `plain`.
    Data,
}

/// One connection's secure channel, app side. 88 bytes once open.
#[derive(Debug)]
pub struct ClientChannel {
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    AwaitingAccept(Box<ClientHandshake>),
    Open(Transport),
    Closed,
}

impl Phase {
    fn state(&self) -> ClientState {
        match self {
            Phase::AwaitingAccept(_) => ClientState::AwaitingAccept,
            Phase::Open(_) => ClientState::Open,
            Phase::Closed => ClientState::Closed,
        }
    }
}

impl ClientChannel {
    /// Starts a fresh session: appends the Hello, carrying `frames` (a Login frame), to `out`.
    /// See [`ClientHandshake::login`] for `app_key`.
    pub fn login(
        server_public: &PublicKey,
        app_key: &Keypair,
        frames: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientChannel, ChannelError> {
        let hs = ClientHandshake::login(server_public, app_key, frames, out)?;
        Ok(ClientChannel { phase: Phase::AwaitingAccept(Box::new(hs)) })
    }

    /// Resumes a held session: appends the ResumeHello, carrying `frames` (a Resume frame), to
    /// `out`.
    pub fn resume(
        resume_id: &[u8],
        secret: &ResumeSecret,
        frames: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientChannel, ChannelError> {
        let hs = ClientHandshake::resume(resume_id, secret, frames, out)?;
        Ok(ClientChannel { phase: Phase::AwaitingAccept(Box::new(hs)) })
    }

    pub fn state(&self) -> ClientState {
        self.phase.state()
    }

    /// Handles one record from the gate.
    pub fn on_record(
        &mut self,
        record: Record<'_>,
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<ClientEvent, ChannelError> {
        let phase = std::mem::replace(&mut self.phase, Phase::Closed);
        match (phase, record.kind) {
            (Phase::AwaitingAccept(hs), RecordType::Accept) => {
                let acc = hs.read_accept(record.body, out)?;
                plain.extend_from_slice(&acc.frames);
                self.phase = Phase::Open(acc.transport);
                Ok(ClientEvent::Accepted {
                    new_server_key: acc.new_server_key,
                    resume_secret: acc.resume_secret,
                })
            }
            (Phase::AwaitingAccept(_), RecordType::Reject) => {
                let (reason, message) = parse_reject(record.body);
                Err(ChannelError::RejectedByGate { reason, message })
            }
            (Phase::Open(mut t), RecordType::Data) => {
                t.open_into(record.body, plain)?;
                self.phase = Phase::Open(t);
                Ok(ClientEvent::Data)
            }
            (phase, kind) => Err(ChannelError::Unexpected { kind, state: phase.state().describe() }),
        }
    }

    /// Seals frame bytes for the gate into Data records appended to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
        match &mut self.phase {
            Phase::Open(t) => {
                t.seal_into(plaintext, out)?;
                Ok(())
            }
            other => Err(ChannelError::NotReady { op: "seal", state: other.state().describe() }),
        }
    }

    /// Seals `buf[from..]` (frame bytes already in the caller's output buffer) in place into
    /// Data records; `buf[..from]` is kept. See [`Transport::seal_in_place`].
    pub fn seal_in_place(&mut self, buf: &mut Vec<u8>, from: usize) -> Result<(), ChannelError> {
        match &mut self.phase {
            Phase::Open(t) => {
                t.seal_in_place(buf, from)?;
                Ok(())
            }
            other => Err(ChannelError::NotReady { op: "seal", state: other.state().describe() }),
        }
    }

    /// Opens the body of a Data record in place, for a caller that keeps the gate's bytes in a
    /// buffer of its own: the plaintext is `body[..n]` for the returned `n`. Before the Accept
    /// it ends the channel, as [`ClientChannel::on_record`] does. A record that does not
    /// authenticate is an error that changes nothing here (`body` is garbage then): the caller
    /// must close the connection (§14.4) and open nothing more, but may still seal the answers
    /// to the frames that came before it.
    pub fn open_in_place(&mut self, body: &mut [u8]) -> Result<usize, ChannelError> {
        match &mut self.phase {
            Phase::Open(t) => Ok(t.open_in_place(body)?.len()),
            phase => {
                let state = phase.state().describe();
                self.phase = Phase::Closed;
                Err(ChannelError::Unexpected { kind: RecordType::Data, state })
            }
        }
    }

    /// The transport, once open (for its counters).
    pub fn transport(&self) -> Option<&Transport> {
        match &self.phase {
            Phase::Open(t) => Some(t),
            _ => None,
        }
    }
}
