//! The gate's side of one connection in secure mode: a sans-I/O state machine that takes the
//! app's records and says what happened (docs/PROTOCOL.md §14.3, §14.6).
//!
//! ```text
//!            Hello ─────────────────────────────┐
//! AwaitingHello                                 ▼
//!            ResumeHello ─▶ AwaitingSecret ─resume()─▶ Handshaking ─accept()─▶ AwaitingConfirm
//!                                                                                  │ first valid Data
//!                                                                                  ▼     (commit)
//!                                                                                 Open
//! ```
//!
//! Bytes to send go to `out`; decrypted frame bytes (the Hello's or ResumeHello's first frames,
//! then every Data record's plaintext) go to `plain`, one frame stream for the frame decoder.
//! Any error ends the channel (state `Closed`): send what is in `out` (a Reject when there is no
//! transport yet) and close the connection.
//!
//! **The commit rule.** A Hello or ResumeHello can be replayed by anyone who saw it, and it
//! decrypts again; only the app that made it can seal the first Data record after the Accept.
//! So the login or resume that the first frames ask for is tentative until
//! [`ServerEvent::Committed`]: until then the gate must not displace another connection of the
//! uid, consume a resume token, replay held pushes, or replace the session's resumption secret
//! with the one [`ServerChannel::accept`] returned. If the connection ends before the commit,
//! the tentative login or resume is dropped as if it never happened.

use crate::handshake::{
    parse_resume_hello, respond_hello, respond_resume, write_reject, RejectReason, Rejection, ResumeSecret,
    ServerHandshake,
};
use crate::keys::{KeyRing, PublicKey};
use crate::record::{Record, RecordType};
use crate::transport::Transport;
use crate::ChannelError;

/// Where a gate-side channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Nothing received yet: the next record must be a Hello or a ResumeHello.
    AwaitingHello,
    /// A ResumeHello arrived: the gate looks up its resume_id, then calls `resume`.
    AwaitingSecret,
    /// The first frames are decrypted: the gate works out its answer, then calls `accept`.
    Handshaking,
    /// The Accept went out: the app's first Data record will commit the login or resume.
    AwaitingConfirm,
    /// Committed: Data both ways.
    Open,
    /// Ended by an error or a rejection.
    Closed,
}

impl ServerState {
    fn describe(self) -> &'static str {
        match self {
            ServerState::AwaitingHello => "before the Hello",
            ServerState::AwaitingSecret => "while the gate looks up the session",
            ServerState::Handshaking => "before the Accept",
            ServerState::AwaitingConfirm => "while awaiting the app's first Data record",
            ServerState::Open => "on an open channel",
            ServerState::Closed => "after the channel closed",
        }
    }
}

/// What a record from the app meant. Any plaintext it carried was appended to `plain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent<'a> {
    /// A Hello decrypted; its frames (a Login) are in `plain`. Answer with
    /// [`ServerChannel::accept`] or [`ServerChannel::reject`].
    Hello { app_static: PublicKey, used_previous_key: bool },
    /// A ResumeHello arrived: find the held session named by `resume_id` and call
    /// [`ServerChannel::resume`] with its resumption secret (or `None`).
    ResumeHello { resume_id: &'a [u8] },
    /// The app's first Data record authenticated: commit the login or resume now.
    Committed,
    /// A Data record; its plaintext is in `plain`.
    Data,
}

/// One app connection's secure channel, gate side. 88 bytes once open.
#[derive(Debug, Default)]
pub struct ServerChannel {
    phase: Phase,
}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    AwaitingHello,
    /// The ResumeHello's body, kept until the gate has found the secret to decrypt it with.
    AwaitingSecret(Box<[u8]>),
    Handshaking(Box<ServerHandshake>),
    AwaitingConfirm(Transport),
    Open(Transport),
    Closed,
}

impl Phase {
    fn state(&self) -> ServerState {
        match self {
            Phase::AwaitingHello => ServerState::AwaitingHello,
            Phase::AwaitingSecret(_) => ServerState::AwaitingSecret,
            Phase::Handshaking(_) => ServerState::Handshaking,
            Phase::AwaitingConfirm(_) => ServerState::AwaitingConfirm,
            Phase::Open(_) => ServerState::Open,
            Phase::Closed => ServerState::Closed,
        }
    }

    fn has_transport(&self) -> bool {
        matches!(self, Phase::AwaitingConfirm(_) | Phase::Open(_))
    }
}

/// The resume_id of a ResumeHello body that [`parse_resume_hello`] accepted.
fn resume_id(body: &[u8]) -> &[u8] {
    body.get(1).and_then(|&n| body.get(2..2 + n as usize)).unwrap_or(&[])
}

impl ServerChannel {
    pub fn new() -> ServerChannel {
        ServerChannel::default()
    }

    pub fn state(&self) -> ServerState {
        self.phase.state()
    }

    /// The waiting ResumeHello's resume_id (state `AwaitingSecret`), for a lookup that
    /// finishes after the event's borrow ended.
    pub fn resume_id(&self) -> Option<&[u8]> {
        match &self.phase {
            Phase::AwaitingSecret(body) => Some(resume_id(body)),
            _ => None,
        }
    }

    /// True once the app's first Data record authenticated.
    pub fn is_committed(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Handles one record from the app. `keys` and `now_ms` are used for a Hello (the
    /// previous key's expiry is compared with `now_ms`).
    pub fn on_record(
        &mut self,
        keys: &KeyRing,
        now_ms: u64,
        record: Record<'_>,
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<ServerEvent<'_>, ChannelError> {
        // Any error leaves the channel closed.
        let phase = std::mem::replace(&mut self.phase, Phase::Closed);
        match (phase, record.kind) {
            (Phase::AwaitingHello, RecordType::Hello) => {
                let mut hs = respond_hello(keys, record.body, now_ms).map_err(|r| refuse(r, out))?;
                plain.extend_from_slice(&hs.take_frames());
                // IK always carries the app's static key.
                let app_static = hs.app_static().copied().unwrap_or_default();
                let used_previous_key = hs.used_previous_key();
                self.phase = Phase::Handshaking(Box::new(hs));
                Ok(ServerEvent::Hello { app_static, used_previous_key })
            }
            (Phase::AwaitingHello, RecordType::ResumeHello) => {
                parse_resume_hello(record.body).map_err(|r| refuse(r, out))?;
                self.phase = Phase::AwaitingSecret(record.body.into());
                Ok(ServerEvent::ResumeHello { resume_id: self.resume_id().unwrap_or_default() })
            }
            (Phase::AwaitingConfirm(mut t), RecordType::Data) => {
                t.open_into(record.body, plain)?;
                self.phase = Phase::Open(t);
                Ok(ServerEvent::Committed)
            }
            (Phase::Open(mut t), RecordType::Data) => {
                t.open_into(record.body, plain)?;
                self.phase = Phase::Open(t);
                Ok(ServerEvent::Data)
            }
            (phase, kind) => {
                if !phase.has_transport() {
                    write_reject(out, RejectReason::BadHandshake, "unexpected record");
                }
                Err(ChannelError::Unexpected { kind, state: phase.state().describe() })
            }
        }
    }

    /// Decrypts the waiting ResumeHello with the session's resumption secret; its frames (a
    /// Resume) are appended to `plain`. `None` (no held session by that resume_id) and a secret
    /// that does not decrypt it both refuse with UnknownSession, writing the Reject to `out`.
    pub fn resume(
        &mut self,
        secret: Option<&ResumeSecret>,
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), ChannelError> {
        let body = match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::AwaitingSecret(body) => body,
            other => return Err(self.wrong_state(other, "resume")),
        };
        let hello = parse_resume_hello(&body).map_err(|r| refuse(r, out))?;
        let result = match secret {
            Some(s) => respond_resume(&hello, s),
            None => Err(Rejection {
                reason: RejectReason::UnknownSession,
                message: "no held session has this resume id",
            }),
        };
        let mut hs = result.map_err(|r| refuse(r, out))?;
        plain.extend_from_slice(&hs.take_frames());
        self.phase = Phase::Handshaking(Box::new(hs));
        Ok(())
    }

    /// Appends the Accept record carrying `frames` (the Session answer) to `out` and returns
    /// the session's next resumption secret: keep it with the tentative session and make it
    /// the session's only at [`ServerEvent::Committed`].
    pub fn accept(&mut self, frames: &[u8], out: &mut Vec<u8>) -> Result<ResumeSecret, ChannelError> {
        let hs = match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Handshaking(hs) => hs,
            other => return Err(self.wrong_state(other, "accept")),
        };
        let done = hs.accept(frames, out)?;
        self.phase = Phase::AwaitingConfirm(done.transport);
        Ok(done.resume_secret)
    }

    /// Ends the channel. Before there is a transport this appends a Reject record with `reason`
    /// and `message` to `out` (a failed login, a refused resume, or Overloaded right after
    /// accepting the connection); after, there is no plaintext to say it in, and nothing is
    /// appended: the gate closes (or sends its error frame sealed first).
    pub fn reject(&mut self, reason: RejectReason, message: &str, out: &mut Vec<u8>) {
        if !self.phase.has_transport() && self.phase.state() != ServerState::Closed {
            write_reject(out, reason, message);
        }
        self.phase = Phase::Closed;
    }

    /// Seals frame bytes for the app into Data records appended to `out` (as few as fit).
    /// Allowed once the Accept went out: the app can read them from then on.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
        match &mut self.phase {
            Phase::AwaitingConfirm(t) | Phase::Open(t) => {
                t.seal_into(plaintext, out)?;
                Ok(())
            }
            other => Err(ChannelError::NotReady { op: "seal", state: other.state().describe() }),
        }
    }

    /// Seals `buf[from..]` (frame bytes) into Data records in place, growing `buf`: the gate's
    /// out queue becomes wire bytes with no second buffer. Allowed once the Accept went out.
    pub fn seal_in_place(&mut self, buf: &mut Vec<u8>, from: usize) -> Result<(), ChannelError> {
        match &mut self.phase {
            Phase::AwaitingConfirm(t) | Phase::Open(t) => {
                t.seal_in_place(buf, from)?;
                Ok(())
            }
            other => Err(ChannelError::NotReady { op: "seal", state: other.state().describe() }),
        }
    }

    /// The transport, once the Accept went out (for its counters).
    pub fn transport(&self) -> Option<&Transport> {
        match &self.phase {
            Phase::AwaitingConfirm(t) | Phase::Open(t) => Some(t),
            _ => None,
        }
    }

    /// A call in the wrong state is the caller's mistake, not the app's: the state is kept.
    fn wrong_state(&mut self, phase: Phase, op: &'static str) -> ChannelError {
        let state = phase.state().describe();
        self.phase = phase;
        ChannelError::NotReady { op, state }
    }
}

fn refuse(r: Rejection, out: &mut Vec<u8>) -> ChannelError {
    r.write_record(out);
    ChannelError::Refused(r)
}
