//! The push path's entry: an app-server's Push is validated, room for its pairs is reserved on
//! the logic shards it touches (or it is refused Overloaded, [`super::room`]), its
//! `PushDelivery` body is encoded once with the push's deadline, and its targets are split by
//! logic shard; each logic shard then delivers to the sessions it owns and answers with exactly
//! one receipt per target (logic::push). The app side of the path (writing deliveries, taking
//! acks) is in `app::push`.

use crate::app::session::error;
use crate::mesh::Msg;
use crate::state::{jitter, mono_ms, PendingBroadcast, Shard};
use logic::{Input, PushContent, Tally};
use schema::wire::{self, ErrorCode, Hop};
use schema::{Cmd, Frame, FrameType};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Largest payload a push may carry.
pub const MAX_PAYLOAD: usize = 16 * 1024;

/// Base of the retry-after of a push refused for want of room (jittered up to twice this): room
/// comes back as apps ack, within milliseconds, or as pushes expire, within their TTL; a second
/// keeps a refused app-server from asking in a tight loop without holding it back long.
pub const OVERLOADED_RETRY_MS: u32 = 1_000;

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
    let shards = shard.mesh.len();
    // The targets by logic shard (one receipt per (message id, uid): a uid named twice counts
    // once), and the room each shard must have for them. A broadcast's targets are counted on
    // each shard later: it reserves room for every session there (all roles: at most a turn
    // stale), and for no more than the bound, so a shard with more sessions than that still
    // takes a broadcast when it has nothing else in flight.
    let (per_shard, want): (Vec<Vec<u64>>, Vec<u32>) = if broadcast != wire::Role::Unknown {
        let bound = shard.push_room.bound() as i64;
        let want = (0..shards)
            .map(|s| shard.all_metrics[s].directory_sessions.load(Relaxed).clamp(0, bound) as u32)
            .collect();
        (Vec::new(), want)
    } else {
        let mut all: Vec<u64> = uids.map(|u| u.iter().collect()).unwrap_or_default();
        all.sort_unstable();
        all.dedup();
        let per_shard = logic::split_by_shard(all, shards, |&u| u);
        let want = per_shard.iter().map(|u| u.len() as u32).collect();
        (per_shard, want)
    };
    if super::fanout::behind(shard, &want) {
        // Targets already wait to be written: more would only be delivered later, then late.
        shard.metrics().pushes_refused.fetch_add(1, Relaxed);
        let message = "push targets waiting to be written past the gate's bound: retry later";
        let retry_after_ms = jitter(OVERLOADED_RETRY_MS);
        let code = ErrorCode::Overloaded;
        return shard.send_error(me, h.seq, h.log_id, code, Hop::Gate, h.cmd, message, retry_after_ms);
    }
    if !shard.push_room.reserve(&want) {
        // Every pair accepted must be held until its receipt: a gate past its bound would only
        // accept pushes that end unheld, so it says so and when to come back.
        shard.metrics().pushes_refused.fetch_add(1, Relaxed);
        let message =
            "pushes in flight at the gate's bound (limits.max_pushes_in_flight_per_shard): retry later";
        let retry_after_ms = jitter(OVERLOADED_RETRY_MS);
        let code = ErrorCode::Overloaded;
        return shard.send_error(me, h.seq, h.log_id, code, Hop::Gate, h.cmd, message, retry_after_ms);
    }
    let delivery = Delivery { message_id, payload, sent_at_us: p.sent_at_us(), kind: p.kind(), ttl_ms };
    let accepted_us = shard.read_us;
    let push = content(shard, &delivery, h.log_id, accepted_us);

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
        for (s, &reserved) in want.iter().enumerate() {
            let input = Input::Broadcast { push: push.clone(), role: broadcast.0, tally };
            shard.to_shard(s, Msg::Reserved(input, reserved));
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
    let targets = send_targets(shard, &push, per_shard);
    tracing::info!(log_id = h.log_id, message_id, targets, ttl_ms, "push accepted");
    shard.send_frame(me, FrameType::Response, Cmd::Push, h.seq, h.log_id, |b| {
        wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id, targets })
    });
}

/// What every delivery of a push carries.
pub struct Delivery<'a> {
    pub message_id: u64,
    pub payload: &'a [u8],
    pub sent_at_us: u64,
    pub kind: u16,
    pub ttl_ms: u32,
}

/// A push's content, its `PushDelivery` body encoded once for every target. The deadline is
/// read once: the app gets it by the wall clock (the body is shared by every target and may
/// move to another node with a session, so it is absolute), the logic shards by the monotonic
/// clock their expiry runs on. `accepted_us`: when the request was read, where the gate's
/// delivery clock starts.
pub fn content(shard: &mut Shard, d: &Delivery<'_>, log_id: u64, accepted_us: u64) -> Arc<PushContent> {
    let deadline_wall_ms = crate::net::now_ms() + d.ttl_ms as u64;
    let deadline_ms = mono_ms() + d.ttl_ms as u64;
    let body: Arc<[u8]> = Arc::from(shard.enc.body(|b| {
        let payload = b.create_vector(d.payload);
        wire::PushDelivery::create(
            b,
            &wire::PushDeliveryArgs {
                message_id: d.message_id,
                payload: Some(payload),
                sent_at_us: d.sent_at_us,
                kind: d.kind,
                deadline_ms: deadline_wall_ms,
            },
        )
    }));
    Arc::new(PushContent {
        message_id: d.message_id,
        body,
        log_id,
        deadline_ms,
        origin: logic::LOCAL,
        accepted_us,
    })
}

/// Hands each logic shard its targets of `push` (room for them reserved already); returns how
/// many targets there are, counted in `fleetgate_push_targets_total`.
pub fn send_targets(shard: &mut Shard, push: &Arc<PushContent>, per_shard: Vec<Vec<u64>>) -> u32 {
    let mut targets = 0;
    for (s, uids) in per_shard.into_iter().enumerate() {
        if !uids.is_empty() {
            targets += uids.len() as u32;
            let reserved = uids.len() as u32;
            shard.to_shard(s, Msg::Reserved(Input::Push { push: push.clone(), uids }, reserved));
        }
    }
    shard.metrics().push_targets.fetch_add(targets as u64, Relaxed);
    targets
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
