//! The push path's entry: an app-server's Push is validated, its `PushDelivery` body is encoded
//! once, and its targets are split by logic shard; each logic shard then delivers to the
//! sessions it owns and answers with exactly one receipt per target (logic::push). The app side
//! of the path (writing deliveries, taking acks) is in `app::push`.

use crate::app::session::error;
use crate::mesh::Msg;
use crate::state::{PendingBroadcast, Shard};
use logic::{Input, PushContent, Tally};
use schema::wire::{self, ErrorCode, Hop};
use schema::{Cmd, Frame, FrameType};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Largest payload a push may carry.
pub const MAX_PAYLOAD: usize = 16 * 1024;

/// Validates and fans out one Push; answers PushAccepted or an error.
pub fn accept(shard: &mut Shard, me: logic::ConnRef, f: &Frame<'_>, p: wire::Push<'_>) {
    let h = &f.header;
    let cfg = &shard.cfg.sidecar;
    // The app-server's own frame is invalid: origin App (§8.1), on the sidecar too.
    if shard.shutting_down {
        return error(
            shard,
            me,
            h,
            ErrorCode::ShuttingDown,
            Hop::Gate,
            "gate shutting down: push not accepted",
        );
    }
    let uids = p.uids();
    let n_uids = uids.map_or(0, |u| u.len());
    let payload = p.payload().map(|b| b.bytes()).unwrap_or(&[]);
    let broadcast = p.broadcast();
    if n_uids > cfg.max_targets as usize {
        return error(shard, me, h, ErrorCode::LimitExceeded, Hop::App, "more uids than sidecar.max_targets");
    }
    if payload.len() > MAX_PAYLOAD {
        return error(shard, me, h, ErrorCode::LimitExceeded, Hop::App, "payload over 16 KiB");
    }
    if p.ttl_ms() > cfg.max_ttl_ms {
        return error(shard, me, h, ErrorCode::InvalidField, Hop::App, "ttl_ms over sidecar.max_ttl_ms");
    }
    if broadcast != wire::Role::Unknown && (n_uids > 0 || broadcast.variant_name().is_none()) {
        return error(
            shard,
            me,
            h,
            ErrorCode::InvalidField,
            Hop::App,
            "a broadcast names a known role and no uids",
        );
    }
    let ttl_ms = if p.ttl_ms() == 0 { cfg.default_ttl_ms } else { p.ttl_ms() };
    let message_id = p.message_id();
    let body: Arc<[u8]> = Arc::from(shard.enc.body(|b| {
        let payload = b.create_vector(payload);
        wire::PushDelivery::create(
            b,
            &wire::PushDeliveryArgs {
                message_id,
                payload: Some(payload),
                sent_at_us: p.sent_at_us(),
                kind: p.kind(),
            },
        )
    }));
    let push = Arc::new(PushContent {
        message_id,
        body,
        log_id: h.log_id,
        ttl_ms,
        origin: logic::LOCAL,
        accepted_us: shard.read_us,
    });

    let shards = shard.mesh.len();
    shard.metrics().pushes.fetch_add(1, Relaxed);
    if broadcast != wire::Role::Unknown {
        // The targets are the role's sessions on every logic shard at acceptance: each shard
        // counts its own, and PushAccepted goes out once every count is in (`on_counted`).
        shard.next_tally += 1;
        let id = shard.next_tally;
        let pending = PendingBroadcast {
            conn: me,
            seq: h.seq,
            log_id: h.log_id,
            message_id,
            waiting: shards,
            targets: 0,
        };
        shard.broadcasts.insert(id, pending);
        let tally = Tally { shard: shard.id, id };
        for s in 0..shards {
            shard.to_shard(s, Msg::Logic(Input::Broadcast { push: push.clone(), role: broadcast.0, tally }));
        }
        tracing::info!(
            log_id = h.log_id,
            message_id,
            ttl_ms,
            broadcast = broadcast.0,
            "push accepted: broadcast"
        );
        return;
    }
    let targets = {
        // One receipt per (message id, uid): a uid named twice counts once.
        let mut all: Vec<u64> = uids.map(|u| u.iter().collect()).unwrap_or_default();
        all.sort_unstable();
        all.dedup();
        for (s, uids) in logic::split_by_shard(all.iter().copied(), shards, |&u| u).into_iter().enumerate() {
            if !uids.is_empty() {
                shard.to_shard(s, Msg::Logic(Input::Push { push: push.clone(), uids }));
            }
        }
        all.len() as u32
    };
    shard.metrics().push_targets.fetch_add(targets as u64, Relaxed);
    tracing::info!(log_id = h.log_id, message_id, targets, ttl_ms, "push accepted");
    shard.send_frame(me, FrameType::Response, Cmd::Push, h.seq, h.log_id, |b| {
        wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id, targets })
    });
}

/// One logic shard counted a broadcast's targets on it; the last count answers PushAccepted.
pub fn on_counted(shard: &mut Shard, tally: Tally, targets: u32) {
    let Some(b) = shard.broadcasts.get_mut(&tally.id) else { return };
    b.targets = b.targets.saturating_add(targets);
    b.waiting -= 1;
    if b.waiting > 0 {
        return;
    }
    let Some(b) = shard.broadcasts.remove(&tally.id) else { return };
    shard.metrics().push_targets.fetch_add(b.targets as u64, Relaxed);
    tracing::info!(
        log_id = b.log_id,
        message_id = b.message_id,
        targets = b.targets,
        "push accepted: broadcast counted"
    );
    let (message_id, targets) = (b.message_id, b.targets);
    shard.send_frame(b.conn, FrameType::Response, Cmd::Push, b.seq, b.log_id, |f| {
        wire::PushAccepted::create(f, &wire::PushAcceptedArgs { message_id, targets })
    });
}
