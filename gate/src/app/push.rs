//! The push path, app side: a logic shard's `Deliver` becomes a PushDelivery frame on the
//! session's connection (the shared body behind a per-session header), and the app's PushAck goes
//! back to the logic shard, which sends the `Delivered` receipt (or `TtlExpired`, past the push's
//! deadline plus the grace), or refuses an ack naming another push (`AckMismatch`).

use crate::state::Shard;
use logic::{ConnRef, Input, PushContent};
use schema::wire::{ErrorCode, Hop};
use schema::{Cmd, FrameType, Header, HEADER_LEN};
use std::sync::atomic::Ordering::Relaxed;

/// Writes one push to a connection with the session's sequence-id for it.
pub fn deliver(shard: &mut Shard, conn: ConnRef, seq: u32, push: &PushContent, redelivery: bool) {
    let mut header =
        Header::new(FrameType::Push, Cmd::PushDelivery as u16, seq, push.log_id, push.body.len() as u32);
    if redelivery {
        header.flags |= schema::FLAG_REDELIVERY;
    }
    let written = shard.queue_raw(conn, Cmd::PushDelivery, |out| {
        out.reserve(HEADER_LEN + push.body.len());
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(&push.body);
    });
    if written {
        // A redelivery's clock would include the time its session was away: only first
        // deliveries of this node's pushes are measured.
        if !redelivery && push.accepted_us != 0 {
            shard.mark_written(conn, crate::marks::Started::One(push.accepted_us));
        }
        shard.metrics().push_deliveries.fetch_add(1, Relaxed);
        tracing::debug!(
            log_id = push.log_id,
            message_id = push.message_id,
            seq,
            "push delivered to connection"
        );
    }
    // Not written (connection closing or gone): its close reaches the logic shard, which ends
    // the push with the close's outcome.
}

/// The app acked the push it got with `seq`, naming `message_id`; the uid's logic shard checks
/// that it is the push sent under `seq` and judges it by the push's deadline.
pub fn on_ack(shard: &mut Shard, me: ConnRef, uid: u64, seq: u32, log_id: u64, message_id: u64) {
    tracing::debug!(log_id, uid, seq, message_id, "push acked");
    shard.metrics().push_acks.fetch_add(1, Relaxed);
    let read_us = shard.read_us;
    shard.to_logic(uid, Input::PushAck { uid, conn: me, seq, message_id, log_id, read_us });
}

/// The app acked `seq` with a message id other than the push's sent under it: it is told
/// (InvalidField, origin App, the connection stays), and the push stays in flight.
pub fn ack_mismatch(shard: &mut Shard, conn: ConnRef, seq: u32, log_id: u64, message_id: u64) {
    shard.metrics().push_acks_mismatched.fetch_add(1, Relaxed);
    let message = format!("PushAck message_id {message_id} is not the push sent with sequence-id {seq}");
    let (code, origin) = (ErrorCode::InvalidField, Hop::App);
    shard.send_error(conn, seq, log_id, code, origin, Cmd::PushAck as u16, &message, 0);
}
