//! The login path and every other frame an app sends that is not GPS: login, keepalive, logout,
//! and the error answers for frames that are invalid, unknown or out of order.
//!
//! Login: the gate verifies the token here (uid and role come from the token only), then asks
//! the uid's logic shard to register the session; the answer (`LoginOk`, and `Displaced` for an
//! older connection of the same uid) comes back as a logic output, which the shard's loop hands
//! to [`login_ok`], [`resume_ok`], [`resume_refused`], [`displaced`] or [`logout_ok`].

use crate::lifecycle::{CloseReason, Phase, Role};
use crate::net;
use crate::state::Shard;
use logic::{ConnRef, Input};
use schema::decode::{FrameError, StreamError};
use schema::token::{self, TokenError};
use schema::wire::{self, ErrorCode, GoAwayReason, Hop};
use schema::{Body, Cmd, Frame, FrameType, Header};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Handles one verified frame from an app.
pub fn on_frame(shard: &mut Shard, me: ConnRef, f: &Frame<'_>) {
    shard.metrics().frames_in.add(f.cmd.slot(), 1);
    let Some(phase) = shard.life(me).map(|l| l.phase) else { return };
    let h = &f.header;
    match (f.body, phase) {
        // An Error is never answered with an Error (§8.2), whatever the state.
        (Body::Error(e), _) => log_peer_error(shard, me, h, e, "app"),
        (Body::Keepalive(k), _) if f.ty == FrameType::Request => {
            let ts = k.ts_ms();
            shard.send_frame(me, FrameType::Response, Cmd::Keepalive, h.seq, h.log_id, |b| {
                wire::Keepalive::create(b, &wire::KeepaliveArgs { ts_ms: ts })
            });
        }
        (Body::Login(l), Phase::AwaitingLogin) => login(shard, me, h, l),
        (Body::Login(_) | Body::Resume(_), _) if phase != Phase::AwaitingLogin => {
            error(shard, me, h, ErrorCode::NotAllowed, Hop::App, "already logged in on this connection");
        }
        (Body::Resume(r), Phase::AwaitingLogin) => resume(shard, me, h, r),
        (_, Phase::AwaitingLogin | Phase::LoggingIn { .. } | Phase::AppServer) => {
            let close = shard.life(me).is_none_or(|l| l.pre_login_error());
            error(shard, me, h, ErrorCode::NotLoggedIn, Hop::App, "log in first");
            if close {
                shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
            }
        }
        (Body::GpsReport(_) | Body::GpsBatch(_), Phase::Live { uid, role }) => {
            super::gps::on_frame(shard, me, uid, role.wire(), f)
        }
        (Body::Logout(_), Phase::Live { uid, .. }) if f.ty == FrameType::Request => {
            tracing::info!(log_id = h.log_id, uid, shard = shard.id, "logout");
            shard.to_logic(uid, Input::Logout { uid, conn: me, log_id: h.log_id, seq: h.seq });
        }
        (_, Phase::Live { uid, role }) if f.cmd.is_upstream_request() && f.ty == FrameType::Request => {
            super::upstream::on_request(shard, me, uid, role.wire(), f)
        }
        (Body::PushAck(a), Phase::Live { uid, .. }) => {
            super::push::on_ack(shard, me, uid, h.seq, h.log_id, a.message_id())
        }
        (_, _) => {
            error(shard, me, h, ErrorCode::NotAllowed, Hop::App, "this frame is not accepted from an app")
        }
    }
}

fn login(shard: &mut Shard, me: ConnRef, h: &Header, l: wire::Login<'_>) {
    let tok = l.token().map(|t| t.bytes()).unwrap_or(&[]);
    match token::verify(&shard.token_secret, tok, net::now_ms()) {
        Ok(claims) => {
            if let Some(c) = shard.conn(me) {
                c.life.begin_login(claims.uid, Role::from_wire(claims.role));
                c.login_started = Some(Instant::now());
            }
            tracing::info!(
                log_id = h.log_id,
                uid = claims.uid,
                role = claims.role,
                shard = shard.id,
                "login: token ok"
            );
            let (uid, role, log_id, seq, wall_ms) = (claims.uid, claims.role, h.log_id, h.seq, net::now_ms());
            // Over the secure channel the session takes the handshake's resumption secret.
            let resume_secret = shard.conn(me).and_then(|c| c.secure.as_ref()).and_then(|s| s.secret());
            shard.to_logic(uid, Input::Login { uid, role, conn: me, log_id, seq, wall_ms, resume_secret });
        }
        Err(e) => {
            let code = match e {
                TokenError::Expired => ErrorCode::TokenExpired,
                TokenError::BadSignature | TokenError::Malformed => ErrorCode::BadToken,
            };
            // The app may retry on this connection, within the pre-login error budget.
            let close = shard.life(me).is_none_or(|l| l.pre_login_error());
            error(shard, me, h, code, Hop::App, &format!("login refused: {e}"));
            if close {
                shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
            }
        }
    }
}

/// The resume path: a held (or still attached) session continues on this connection, whichever
/// shard it landed on; its logic shard decides whether the token is current.
fn resume(shard: &mut Shard, me: ConnRef, h: &Header, r: wire::Resume<'_>) {
    let tok = r.resume_token().map(|t| t.bytes()).unwrap_or(&[]);
    match token::verify_resume(&shard.token_secret, tok) {
        Ok(claims) => {
            if let Some(c) = shard.conn(me) {
                c.life.begin_login(claims.uid, None);
                c.login_started = Some(Instant::now());
            }
            tracing::info!(log_id = h.log_id, uid = claims.uid, shard = shard.id, "resume: token ok");
            // A channel opened with this session's secret proved the resume current: the token's
            // resume count may be one behind (its Session answer was lost after the commit).
            let sec = shard.conn(me).and_then(|c| c.secure.as_ref());
            let proved = sec.is_some_and(|s| s.proved(claims.uid, claims.epoch));
            let resume_secret = sec.and_then(|s| s.secret());
            shard.to_logic(
                claims.uid,
                Input::Resume {
                    uid: claims.uid,
                    epoch: claims.epoch,
                    resumes: (!proved).then_some(claims.resumes),
                    conn: me,
                    log_id: h.log_id,
                    seq: h.seq,
                    resume_secret,
                },
            );
        }
        Err(e) => {
            let close = shard.life(me).is_none_or(|l| l.pre_login_error());
            error(shard, me, h, ErrorCode::ResumeRefused, Hop::App, &format!("resume refused: {e}"));
            if close {
                shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
            }
        }
    }
}

/// An Error frame from a peer: logged (it is informational unless it answers something the
/// caller tracks), never answered.
pub fn log_peer_error(shard: &Shard, me: ConnRef, h: &Header, e: wire::Error<'_>, peer: &str) {
    tracing::info!(
        log_id = h.log_id,
        shard = shard.id,
        slot = me.slot,
        seq = h.seq,
        code = ?e.code(),
        origin = ?e.origin(),
        failed_cmd = e.failed_cmd(),
        message = e.message().unwrap_or(""),
        "error frame from {peer}"
    );
}

/// Answers a frame with an error frame carrying its sequence-id and log-id.
pub fn error(shard: &mut Shard, me: ConnRef, h: &Header, code: ErrorCode, origin: Hop, message: &str) {
    shard.send_error(me, h.seq, h.log_id, code, origin, h.cmd, message, 0);
}

/// A frame whose length was sound but whose content was not: error frame, connection stays.
pub fn on_rejected(shard: &mut Shard, me: ConnRef, h: &Header, e: &FrameError) {
    if h.cmd == Cmd::Error as u16 {
        // Even a corrupt Error frame is never answered with an Error (§8.2).
        tracing::info!(log_id = h.log_id, shard = shard.id, slot = me.slot, error = %e, "unreadable error frame from peer");
        return;
    }
    let code = match e {
        FrameError::UnknownCmd(_) => ErrorCode::UnknownCmd,
        FrameError::BadType { .. } => ErrorCode::NotAllowed,
        FrameError::CorruptBody { .. } => ErrorCode::CorruptBody,
    };
    let close = shard.life(me).is_none_or(|l| l.pre_login_error());
    error(shard, me, h, code, Hop::App, &e.to_string());
    if close {
        shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
    }
}

/// Framing is lost: one error frame, then close.
pub fn on_stream_error(shard: &mut Shard, me: ConnRef, e: &StreamError) {
    let code = match e {
        StreamError::BadMagic(_) => ErrorCode::BadMagic,
        StreamError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        StreamError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
        StreamError::Truncated { .. } => ErrorCode::CorruptBody,
    };
    shard.send_error(me, 0, 0, code, Hop::App, 0, &e.to_string(), 0);
    shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
}

/// The session is live on `conn` (after a login or a resume): answer with its Session.
#[allow(clippy::too_many_arguments)]
fn session_live(
    shard: &mut Shard,
    conn: ConnRef,
    cmd: Cmd,
    uid: u64,
    role: u8,
    epoch: u64,
    resumes: u32,
    log_id: u64,
    seq: u32,
) {
    let Some(role_known) = Role::from_wire(role) else { return };
    let admitted =
        shard.conn(conn).and_then(|c| c.life.go_live(uid, role_known).then(|| c.login_started.take()));
    let Some(started) = admitted else {
        // The connection closed (or moved on) while the logic shard registered it: tell it, so
        // the session is held (or ended) instead of kept for a connection nobody has.
        shard.to_logic(uid, Input::Closed { uid, conn, reason: logic::CloseReason::Dropped });
        return;
    };
    if let Some(t) = started {
        shard.metrics().login_us.observe_us(t.elapsed().as_micros() as u64);
    }
    shard.metrics().sessions_on_conns.fetch_add(1, Relaxed);
    let app = shard.cfg.app.clone();
    let node = shard.node.clone();
    let node = node.as_str();
    let resume_token = token::issue_resume(&shard.token_secret, token::ResumeClaims { uid, epoch, resumes });
    shard.send_frame(conn, FrameType::Response, cmd, seq, log_id, |b| {
        let node = b.create_string(node);
        let resume_token = b.create_vector(&resume_token);
        wire::Session::create(
            b,
            &wire::SessionArgs {
                uid,
                role: wire::Role(role),
                heartbeat_ms: app.heartbeat_ms,
                idle_timeout_ms: app.idle_timeout_ms,
                session_epoch: epoch,
                resume_token: Some(resume_token),
                node: Some(node),
                hold_ms: app.hold_ms,
            },
        )
    });
    tracing::info!(log_id, uid, epoch, resumes, shard = shard.id, cmd = cmd.name(), "session live");
}

/// The logic shard registered a login.
pub fn login_ok(shard: &mut Shard, conn: ConnRef, uid: u64, role: u8, epoch: u64, log_id: u64, seq: u32) {
    shard.metrics().logins.fetch_add(1, Relaxed);
    session_live(shard, conn, Cmd::Login, uid, role, epoch, 0, log_id, seq)
}

/// The logic shard let a session resume on this connection.
#[allow(clippy::too_many_arguments)]
pub fn resume_ok(
    shard: &mut Shard,
    conn: ConnRef,
    uid: u64,
    role: u8,
    epoch: u64,
    resumes: u32,
    log_id: u64,
    seq: u32,
    moved: bool,
) {
    let m = shard.metrics();
    m.resumes.fetch_add(1, Relaxed);
    if moved {
        m.resumes_moved.fetch_add(1, Relaxed);
    }
    session_live(shard, conn, Cmd::Resume, uid, role, epoch, resumes, log_id, seq)
}

/// The logic shard refused a resume: the app logs in afresh, on this connection if it likes.
pub fn resume_refused(
    shard: &mut Shard,
    conn: ConnRef,
    log_id: u64,
    seq: u32,
    why: logic::directory::ResumeRefused,
) {
    tracing::info!(log_id, shard = shard.id, why = ?why, "resume refused");
    if let Some(l) = shard.life(conn) {
        l.login_refused();
    }
    // Awaiting a login again: the login timeout (from accept) is its deadline once more.
    shard.watch(conn);
    use logic::directory::ResumeRefused as R;
    let message = match why {
        R::NoSession => "no session to resume (expired or logged out): log in",
        R::StaleEpoch => "the token names an older session: log in",
        R::Replayed => "the token was already used: log in",
        R::DirectoryUnavailable => {
            // The session may live on another node: worth another try once Redis is back.
            let retry = crate::state::jitter(shard.cfg.app.retry_after_ms);
            let message = "the session is not on this node and the directory is unreachable: retry the resume after retry_after_ms, or log in";
            shard.send_error(
                conn,
                seq,
                log_id,
                ErrorCode::Overloaded,
                Hop::Directory,
                Cmd::Resume as u16,
                message,
                retry,
            );
            return;
        }
    };
    shard.send_error(conn, seq, log_id, ErrorCode::ResumeRefused, Hop::App, Cmd::Resume as u16, message, 0);
}

/// A newer login (or a resume) took this connection's session.
pub fn displaced(shard: &mut Shard, conn: ConnRef, uid: u64, log_id: u64) {
    // A displacement that came from another node carries no log-id of the login: the gate
    // starts the flow, so it assigns one (PROTOCOL §7).
    let log_id = shard.log_id_or_new(log_id);
    tracing::info!(log_id, uid, shard = shard.id, "displaced by a newer login");
    shard.go_away(conn, log_id, GoAwayReason::Displaced, "logged in on another connection", 0);
}

/// The session ended on the app's logout: answer, go away, close.
pub fn logout_ok(shard: &mut Shard, conn: ConnRef, log_id: u64, seq: u32) {
    shard.send_frame(conn, FrameType::Response, Cmd::Logout, seq, log_id, |b| {
        wire::Logout::create(b, &wire::LogoutArgs::default())
    });
    let was_live = shard.life(conn).is_some_and(|l| {
        let live = matches!(l.phase, Phase::Live { .. });
        // The session is gone: closing must not report it closed again.
        l.session_ended();
        live
    });
    if was_live {
        shard.metrics().sessions_on_conns.fetch_sub(1, Relaxed);
    }
    shard.go_away(conn, log_id, GoAwayReason::LoggedOut, "logged out", 0);
}
