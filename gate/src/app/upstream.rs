//! App requests for the app-server (place order, grab order, order status, business requests):
//! they go through the app's logic shard, which remembers them until the app-server answers or
//! the deadline passes; the answer (or an error naming the hop) comes back here.

use crate::state::Shard;
use logic::{ConnRef, Input, RequestFailure};
use schema::wire::{ErrorCode, Hop};
use schema::{Cmd, Frame, FrameType};

/// Forwards a verified app request toward the app-server.
pub fn on_request(shard: &mut Shard, me: ConnRef, uid: u64, role: u8, f: &Frame<'_>) {
    let h = &f.header;
    // In cluster mode a node with an app-server may take it (`cluster::relay`).
    if !shard.sidecars.any() && !crate::cluster::relay::available(shard) {
        tracing::info!(log_id = h.log_id, uid, "request refused: no app-server connected");
        return super::session::error(
            shard,
            me,
            h,
            ErrorCode::NoAppServer,
            Hop::AppServer,
            "no app-server connected",
        );
    }
    tracing::info!(log_id = h.log_id, uid, cmd = f.cmd.name(), "request: to logic");
    shard.to_logic(
        uid,
        Input::Upstream {
            uid,
            role,
            conn: me,
            seq: h.seq,
            log_id: h.log_id,
            cmd: h.cmd,
            body: f.raw_body.to_vec(),
        },
    );
}

/// The app-server's answer: a Response with the app's cmd and sequence-id.
pub fn reply(shard: &mut Shard, conn: ConnRef, cmd: u16, seq: u32, log_id: u64, reply: &[u8]) {
    let Some(cmd) = Cmd::from_u16(cmd) else { return };
    tracing::info!(log_id, seq, cmd = cmd.name(), "request: answered to app");
    shard.queue_raw(conn, cmd, |out| schema::write_frame(out, FrameType::Response, cmd, seq, log_id, reply));
}

/// A request that failed: an error frame naming the hop; `detail` (when not empty) replaces the
/// standard text, e.g. with the app-server's own message.
pub fn failed(
    shard: &mut Shard,
    conn: ConnRef,
    cmd: u16,
    seq: u32,
    log_id: u64,
    failure: RequestFailure,
    detail: &str,
) {
    let (code, origin, message) = match failure {
        RequestFailure::NoAppServer => (ErrorCode::NoAppServer, Hop::AppServer, "no app-server connected"),
        RequestFailure::Timeout => {
            (ErrorCode::Timeout, Hop::AppServer, "the app-server did not answer in time")
        }
        RequestFailure::Overloaded => (ErrorCode::Overloaded, Hop::Logic, "too many requests pending"),
        RequestFailure::ShuttingDown => (ErrorCode::ShuttingDown, Hop::Gate, "gate shutting down"),
        RequestFailure::AppServerError => {
            (ErrorCode::AppServerError, Hop::AppServer, "the app-server could not answer the request")
        }
    };
    let message = if detail.is_empty() { message } else { detail };
    shard.send_error(conn, seq, log_id, code, origin, cmd, message, 0);
}
