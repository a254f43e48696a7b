//! The app port's secure channel (docs/PROTOCOL.md §14), gate side: the bytes an app sends
//! become records, records become frame bytes for the frame decoder; the frames the gate queues
//! for an app are sealed into Data records when its connection is flushed.
//!
//! A connection in secure mode carries a [`Secure`] (boxed: plaintext connections pay one
//! pointer). The handshake runs here:
//! - **Hello** (a fresh session, Noise IK): its first frames (a Login) are decrypted and *held*;
//!   the Accept goes out at once, carrying no frames.
//! - **ResumeHello** (Noise NNpsk0): its resume_id is the session's resume token; the gate
//!   verifies its MAC and asks the uid's logic shard for the session's resumption secret
//!   (`Input::ResumeSecret`, answered by [`on_resume_secret`]), decrypts the first frames (a
//!   Resume) with it, holds them and sends the Accept.
//! - **Commit**: the app's first Data record proves it made the handshake (a replayed Hello or
//!   ResumeHello decrypts again, but its replayer cannot seal that record). Only then are the
//!   held frames decoded, so the login or resume they ask for runs, displaces, rotates and
//!   replays held pushes only for the app that made the handshake; the Session answer follows
//!   in a Data record. An Accept lost with its connection commits nothing: the session, its
//!   resume token and its secret stay as they were, and the app resumes with them again.
//!
//! The resumption secret each Accept derives becomes the session's when the held Login or
//! Resume succeeds (`Input::Login` / `Input::Resume` carry it to the logic shard, where it lives
//! with the session and moves with it).

use crate::lifecycle::{CloseReason, Port};
use crate::state::{Conn, Shard};
use channel::{ChannelError, RecordReader, RejectReason, ServerChannel, ServerEvent};
use logic::{ConnRef, Input};
use schema::token;
use schema::wire::GoAwayReason;
use std::sync::atomic::Ordering::Relaxed;

/// One app connection's secure channel.
#[derive(Debug, Default)]
pub struct Secure {
    /// The handshake and the transport.
    chan: ServerChannel,
    /// Bytes of a record not yet whole (allocated only while one is partial).
    reader: RecordReader,
    /// The first frames (Login or Resume), held until the commit.
    held: Vec<u8>,
    /// The resumption secret the Accept derived: the session's once the held frames succeed.
    secret: Option<channel::ResumeSecret>,
    /// The session whose secret opened this channel (uid, epoch): its resume is proved current.
    resumed: Option<(u64, u64)>,
    /// Bytes at the front of the connection's `out` that are already records (the Accept, or
    /// sealed Data waiting for the socket); what follows is plaintext frames not yet sealed.
    pub sealed: usize,
}

impl Secure {
    /// The secret for the session a Login or Resume on this channel asks for (kept: a refused
    /// resume may be followed by a login on the same channel).
    pub fn secret(&self) -> Option<[u8; 32]> {
        self.secret.as_ref().map(|s| s.0)
    }

    /// True when this channel was opened with `uid`'s session secret of `epoch`.
    pub fn proved(&self, uid: u64, epoch: u64) -> bool {
        self.resumed == Some((uid, epoch))
    }

    /// True while a record has started and not completed (the read timeout runs).
    pub fn partial(&self) -> bool {
        self.reader.in_record()
    }
}

/// Bytes arrived on a secure connection: appends the frame bytes they carried (possibly none)
/// to `plain`. False when the channel failed (the connection is closing; the reason is logged).
pub fn on_bytes(shard: &mut Shard, me: ConnRef, mut input: &[u8], plain: &mut Vec<u8>) -> bool {
    let now_ms = crate::net::now_ms();
    let mut lookup = None;
    let result = {
        // Disjoint fields: the connection, the keys and the token secret.
        let Shard { conns, keys, token_secret, all_metrics, id, .. } = shard;
        let m = &all_metrics[*id as usize];
        let Some(c) = conns.get_mut(me.slot as usize).filter(|c| c.gen == me.gen) else { return false };
        let Some(sec) = c.secure.as_deref_mut() else { return false };
        let mut out = Vec::new();
        let mut result = Ok(());
        // Bounded by the input, which one read bounds: every record consumes its bytes.
        loop {
            let record = match sec.reader.next(&mut input) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    // Before a transport exists, say why (a plaintext app on a secure port
                    // lands here): a Reject, which `reject` writes only while there is none.
                    let why =
                        "not a secure-channel record: this port speaks the secure channel (PROTOCOL.md §14)";
                    sec.chan.reject(RejectReason::BadHandshake, why, &mut out);
                    result = Err(ChannelError::Record(e));
                    break;
                }
            };
            let at = plain.len();
            match sec.chan.on_record(keys, now_ms, record, plain, &mut out) {
                Ok(ServerEvent::Hello { .. }) => {
                    // The Login waits for the commit; the Accept goes now.
                    sec.held = plain.split_off(at);
                    match sec.chan.accept(&[], &mut out) {
                        Ok(secret) => sec.secret = Some(secret),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                    m.handshakes.add(0, 1);
                }
                Ok(ServerEvent::ResumeHello { resume_id }) => {
                    match token::verify_resume(token_secret, resume_id) {
                        Ok(claims) => {
                            // The app sends nothing more until the Accept: nothing else to read.
                            lookup = Some(claims);
                            break;
                        }
                        Err(_) => {
                            let r = channel::Rejection {
                                reason: RejectReason::UnknownSession,
                                message: "the resume id is not a resume token of this gate",
                            };
                            sec.chan.reject(r.reason, r.message, &mut out);
                            result = Err(ChannelError::Refused(r));
                            break;
                        }
                    }
                }
                Ok(ServerEvent::Committed) => {
                    // The held Login or Resume goes first, then what the commit record carried.
                    let held = std::mem::take(&mut sec.held);
                    plain.splice(at..at, held);
                }
                Ok(ServerEvent::Data) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if !out.is_empty() {
            // Handshake records go out as they are, ahead of anything sealed after them.
            put_records(c, m, &out);
        }
        (result, !out.is_empty())
    };
    let (result, wrote) = result;
    if wrote {
        // What the records asked to send (an Accept, a Reject) goes out on this turn's flush.
        shard.mark_dirty(me);
    }
    if let Some(claims) = lookup {
        if let Some(sec) = shard.conn(me).and_then(|c| c.secure.as_deref_mut()) {
            sec.resumed = Some((claims.uid, claims.epoch));
        }
        shard.to_logic(claims.uid, Input::ResumeSecret { uid: claims.uid, epoch: claims.epoch, conn: me });
    }
    match result {
        Ok(()) => true,
        Err(e) => {
            fail(shard, me, &e);
            false
        }
    }
}

/// The uid's logic shard answered a ResumeHello's lookup: decrypt the waiting ResumeHello with
/// the session's secret (none: Reject UnknownSession and close), hold its Resume, send the Accept.
pub fn on_resume_secret(shard: &mut Shard, me: ConnRef, secret: Option<[u8; 32]>) {
    let result = {
        let Shard { conns, all_metrics, id, .. } = shard;
        let m = &all_metrics[*id as usize];
        let Some(c) = conns.get_mut(me.slot as usize).filter(|c| c.gen == me.gen) else { return };
        if c.life.closing.is_some() {
            return;
        }
        let Some(sec) = c.secure.as_deref_mut() else { return };
        let mut out = Vec::new();
        let secret = secret.map(channel::ResumeSecret);
        let mut held = Vec::new();
        let r = sec.chan.resume(secret.as_ref(), &mut held, &mut out).and_then(|()| {
            sec.held = held;
            sec.chan.accept(&[], &mut out)
        });
        let r = match r {
            Ok(next) => {
                sec.secret = Some(next);
                m.handshakes.add(1, 1);
                Ok(())
            }
            Err(e) => Err(e),
        };
        if !out.is_empty() {
            put_records(c, m, &out);
        }
        r
    };
    if let Err(e) = result {
        fail(shard, me, &e);
    }
    shard.mark_dirty(me);
}

/// Seals the plaintext frames queued after the already-sealed front of `c.out` into Data
/// records, in place; returns how many bytes the queue grew by (record headers and tags).
/// Before the Accept there is no transport: frames queued then (a login-timeout error before
/// any Hello) cannot be read by the app and are dropped; a Reject tells a closing app why.
pub fn seal_out(c: &mut Conn) -> isize {
    let Some(sec) = c.secure.as_deref_mut() else { return 0 };
    if c.out.len() <= sec.sealed {
        return 0;
    }
    let before = c.out.len();
    let sealed = sec.chan.transport().is_some() && {
        let r = sec.chan.seal_in_place(&mut c.out, sec.sealed);
        if let Err(e) = &r {
            // Only nonce exhaustion (2^64 records): the connection cannot go on.
            tracing::warn!(error = %e, "secure channel: cannot seal; closing");
            c.life.close(CloseReason::GoAway(GoAwayReason::ProtocolError));
        }
        r.is_ok()
    };
    if !sealed {
        // Plaintext never goes out on a secure connection.
        c.out.truncate(sec.sealed);
        if c.life.closing.is_some() && sec.sealed == 0 && sec.chan.transport().is_none() {
            let why = match c.life.closing {
                Some(CloseReason::LoginTimeout) => "no handshake within the login timeout",
                Some(CloseReason::GoAway(GoAwayReason::Shutdown)) => "gate shutting down",
                _ => "closed before a handshake completed",
            };
            sec.chan.reject(RejectReason::BadHandshake, why, &mut c.out);
        }
    }
    sec.sealed = c.out.len();
    c.out.len() as isize - before as isize
}

/// Appends handshake records (Accept, Reject) to the connection's queue, ahead of any plaintext
/// not yet sealed.
fn put_records(c: &mut Conn, m: &crate::metrics::ShardMetrics, records: &[u8]) {
    let Some(sec) = c.secure.as_deref_mut() else { return };
    let at = sec.sealed;
    c.out.splice(at..at, records.iter().copied());
    sec.sealed += records.len();
    m.out_queue_bytes.fetch_add(records.len() as i64, Relaxed);
}

/// The channel failed: count it, log why, close (what the failure appended, a Reject before
/// the transport existed, goes out first).
fn fail(shard: &mut Shard, me: ConnRef, e: &ChannelError) {
    let kind = error_kind(e);
    shard.metrics().channel_errors.add(kind, 1);
    let log_id = shard.new_log_id();
    tracing::info!(
        log_id,
        shard = shard.id,
        slot = me.slot,
        kind = crate::metrics::CHANNEL_ERRORS[kind],
        error = %e,
        "secure channel failed; closing the connection"
    );
    shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
}

/// The `CHANNEL_ERRORS` index of a failure.
pub fn error_kind(e: &ChannelError) -> usize {
    match e {
        ChannelError::Record(_) => 0,
        ChannelError::Unexpected { .. } => 1,
        ChannelError::Refused(_) | ChannelError::Handshake(_) => 2,
        ChannelError::Transport(channel::TransportError::Authentication) => 3,
        _ => 4,
    }
}

/// A new app connection in secure mode (`None` in plaintext mode).
pub fn new_conn(shard: &Shard, port: Port) -> Option<Box<Secure>> {
    (port == Port::App && !shard.cfg.app.plaintext).then(Box::default)
}
