//! The app side of the secure channel (docs/PROTOCOL.md §14) over a blocking socket: a
//! [`SecureStream`] is a `Read + Write` that carries the frame byte stream inside records.
//!
//! The first write is the first flight: its bytes (a Login, or a Resume when
//! [`SecureStream::resume_with`] was called) travel inside the Hello or ResumeHello. Writes
//! made before the gate's Accept wait in memory. Reading the Accept sends the commit record (a
//! Data record, here carrying whatever waited), after which the gate runs the login or resume
//! and its answer arrives as frames. The Accept's resumption secret, and a new gate key if the
//! Hello used the previous one, are kept for the caller.
//!
//! An [`crate::AppSession`]'s connection has a stream of a third kind, whose channel lives in the
//! session's [`crate::proto::app::AppProto`]: its bytes pass through as they are (the machine
//! reads and writes records itself) until the machine lends it its open channel for a while
//! ([`crate::AppSession::conn`]), and the stream gives the channel back with what it read and
//! did not use.

use channel::{ChannelError, ClientChannel, ClientEvent, Keypair, PublicKey, RecordReader, ResumeSecret};
use std::io::{self, Read, Write};
use std::net::TcpStream;

/// A socket speaking the secure channel. See the module documentation.
pub struct SecureStream {
    /// The socket.
    tcp: TcpStream,
    /// The gate key the app knows.
    server_key: PublicKey,
    /// The app's own static key (IK sends it; the gate does not authenticate apps by it); none
    /// on a lendable stream, which never says hello.
    app_key: Option<Keypair>,
    /// For the next first flight: resume this session instead of logging in.
    resume: Option<(Vec<u8>, ResumeSecret)>,
    /// The channel, from the first write on.
    chan: Option<ClientChannel>,
    /// Frame bytes written before the Accept.
    early: Vec<u8>,
    /// Records from the gate.
    records: RecordReader,
    /// Frame bytes decrypted and not yet read: `plain[pos..]`.
    plain: Vec<u8>,
    pos: usize,
    /// Raw bytes from the socket (allocated at the first read).
    raw: Vec<u8>,
    /// Raw bytes to handle before reading the socket (a lent channel's record in progress).
    pending: Vec<u8>,
    /// The channel lives elsewhere: without a lent one, bytes pass through.
    lendable: bool,
    /// The resumption secret of the last Accept.
    secret: Option<ResumeSecret>,
    /// The gate's new key, when the Hello used its previous one.
    new_server_key: Option<PublicKey>,
}

impl std::fmt::Debug for SecureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream").field("state", &self.chan.as_ref().map(|c| c.state())).finish()
    }
}

impl SecureStream {
    /// Wraps a connected socket; `server_key` is the gate's public key, shipped with the app.
    pub fn new(tcp: TcpStream, server_key: PublicKey) -> SecureStream {
        SecureStream { app_key: Some(Keypair::generate()), lendable: false, ..SecureStream::lendable(tcp) }
            .with_server_key(server_key)
    }

    /// Wraps a connected socket whose channel an [`crate::proto::app::AppProto`] keeps: bytes
    /// pass through until [`SecureStream::lend`].
    pub(crate) fn lendable(tcp: TcpStream) -> SecureStream {
        SecureStream {
            tcp,
            server_key: [0; 32],
            app_key: None,
            resume: None,
            chan: None,
            early: Vec::new(),
            records: RecordReader::new(),
            plain: Vec::new(),
            pos: 0,
            raw: Vec::new(),
            pending: Vec::new(),
            lendable: true,
            secret: None,
            new_server_key: None,
        }
    }

    fn with_server_key(mut self, server_key: PublicKey) -> SecureStream {
        self.server_key = server_key;
        self
    }

    /// A lendable stream takes an open channel and the bytes received on it and not yet opened
    /// (read before the socket).
    pub(crate) fn lend(&mut self, chan: ClientChannel, raw: Vec<u8>) {
        self.chan = Some(chan);
        self.records = RecordReader::new();
        self.pending = raw;
    }

    /// Gives a lent channel back, with the bytes received on it and not yet opened (a record's
    /// first part); the stream passes bytes through again. Frame bytes opened and not yet read
    /// are [`SecureStream::take_plain`]'s.
    pub(crate) fn take_lent(&mut self) -> Option<(ClientChannel, Vec<u8>)> {
        if !self.lendable {
            return None;
        }
        let chan = self.chan.take()?;
        let mut raw = Vec::new();
        self.records.take_partial(&mut raw);
        raw.append(&mut self.pending);
        self.records = RecordReader::new();
        Some((chan, raw))
    }

    /// Moves frame bytes opened and not yet read to `into`.
    pub(crate) fn take_plain(&mut self, into: &mut Vec<u8>) {
        into.extend_from_slice(&self.plain[self.pos..]);
        self.plain.clear();
        self.pos = 0;
    }

    /// True while bytes pass through (a lendable stream with no channel lent).
    fn passing(&self) -> bool {
        self.lendable && self.chan.is_none()
    }

    /// Makes the first flight a ResumeHello for the session whose resume token is `resume_id`
    /// and whose resumption secret is `secret` (both from its last Session and Accept).
    pub fn resume_with(&mut self, resume_id: &[u8], secret: ResumeSecret) {
        self.resume = Some((resume_id.to_vec(), secret));
    }

    /// The resumption secret the last Accept gave: keep it with the session, for its resume.
    pub fn resume_secret(&self) -> Option<&ResumeSecret> {
        self.secret.as_ref()
    }

    /// The gate's new public key, if it said its old one is being retired: store it.
    pub fn new_server_key(&self) -> Option<&PublicKey> {
        self.new_server_key.as_ref()
    }

    /// True once the Accept was read.
    pub fn is_open(&self) -> bool {
        self.chan.as_ref().is_some_and(|c| c.state() == channel::ClientState::Open)
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The socket, for writing raw bytes past the channel (hostile-input tests).
    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Reads records until some frame bytes are decrypted; false at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        loop {
            let pending = std::mem::take(&mut self.pending);
            let n = if pending.is_empty() {
                if self.raw.is_empty() {
                    self.raw = vec![0; 16 * 1024];
                }
                self.tcp.read(&mut self.raw)?
            } else {
                pending.len()
            };
            if n == 0 {
                return match self.records.finish() {
                    Ok(()) => Ok(false),
                    Err(e) => Err(fail(ChannelError::Record(e))),
                };
            }
            let mut input = if pending.is_empty() { &self.raw[..n] } else { &pending[..] };
            let mut out = Vec::new();
            while let Some(rec) = self.records.next(&mut input).map_err(|e| fail(ChannelError::Record(e)))? {
                let Some(chan) = self.chan.as_mut() else {
                    // A gate may refuse a connection before the app said anything (load, a
                    // login timeout): a Reject says why.
                    if rec.kind == channel::RecordType::Reject {
                        let (reason, message) = channel::handshake::parse_reject(rec.body);
                        return Err(fail(ChannelError::RejectedByGate { reason, message }));
                    }
                    return Err(fail(ChannelError::Unexpected { kind: rec.kind, state: "before the Hello" }));
                };
                match chan.on_record(rec, &mut self.plain, &mut out).map_err(fail)? {
                    ClientEvent::Accepted { new_server_key, resume_secret } => {
                        self.secret = Some(resume_secret);
                        self.new_server_key = new_server_key;
                        // The commit record is in `out`; what was written meanwhile follows it.
                        if !self.early.is_empty() {
                            let early = std::mem::take(&mut self.early);
                            chan.seal(&early, &mut out).map_err(fail)?;
                        }
                    }
                    ClientEvent::Data => {}
                }
            }
            if !out.is_empty() {
                self.tcp.write_all(&out)?;
            }
            if self.pos < self.plain.len() {
                return Ok(true);
            }
        }
    }
}

impl Read for SecureStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.passing() {
            return self.tcp.read(buf);
        }
        if self.pos == self.plain.len() {
            self.plain.clear();
            self.pos = 0;
            if !self.fill()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for SecureStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.passing() {
            return self.tcp.write(buf);
        }
        let mut out = Vec::new();
        match self.chan.as_mut() {
            None => {
                let app_key = self.app_key.get_or_insert_with(Keypair::generate);
                let chan = match self.resume.take() {
                    Some((id, secret)) => ClientChannel::resume(&id, &secret, buf, &mut out),
                    None => ClientChannel::login(&self.server_key, app_key, buf, &mut out),
                };
                self.chan = Some(chan.map_err(fail)?);
            }
            Some(c) if c.state() == channel::ClientState::Open => c.seal(buf, &mut out).map_err(fail)?,
            Some(_) => {
                self.early.extend_from_slice(buf);
                return Ok(buf.len());
            }
        }
        self.tcp.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A channel failure as an `io::Error` that `ClientError::from` turns back into
/// `ClientError::Channel`.
fn fail(e: ChannelError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
