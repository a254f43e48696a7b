//! GeoQuery and GeoPush (docs/PROTOCOL.md §9.16): the K nearest drivers within a radius of a
//! point, over every logic shard of the node; GeoPush then pushes to them.
//!
//! The gate shard that read the request checks its arguments, registers it under a tag that
//! carries this shard in its top 16 bits (so the answers find their way back without a lookup),
//! and asks every logic shard (`Input::Geo`) for its own K nearest. Each answers once
//! (`Output::GeoAnswered`); the last answer completes the request: the K nearest of the
//! shards' K nearest are the node's K nearest. A GeoQuery is answered with them; a GeoPush
//! reserves room for them and goes down the push path exactly as a Push naming those uids
//! would (one receipt per chosen driver), then is answered with them. Requests wait bounded in
//! number and in time.
//!
//! In cluster mode the request also goes to every other live node (`NodeMsg::GeoAsk`), whose
//! gate gathers its own K nearest the same way and answers (`NodeMsg::GeoFound`); they are
//! merged with this node's. A node that has not answered by the deadline (lost, or slow) is left
//! out: its drivers' sessions come back on the live nodes. A GeoPush's drivers on other nodes
//! are reached as a Push's are (the directory names their node).

pub use super::waits::Asker;
use super::waits::{Deadline, Waits};
use crate::app::session::error;
use crate::mesh::Msg;
use crate::state::{jitter, mono_ms, Shard};
use logic::geo::{Filter, Hit, Query};
use logic::shard::GEO_TAG_SHIFT;
use logic::{ConnRef, Input, Origin};
use schema::node::NodeMsg;
use schema::wire::{self, ErrorCode, Hop};
use schema::{Cmd, FrameType, Header};
use std::sync::atomic::Ordering::Relaxed;

/// Largest radius, metres: a city's reach; a wider circle holds more drivers than an offer
/// can sensibly go to and costs every logic shard a longer walk.
pub const MAX_RADIUS_M: u32 = 50_000;
/// Most drivers one request may choose (each chosen driver is a hit in the answer and, for a
/// GeoPush, a pair in flight).
pub const MAX_K: u32 = 1_000;
/// Most requests one gate shard keeps waiting for its logic shards; past it a new one is
/// refused Overloaded.
pub const MAX_WAITING: usize = 4_096;
/// How long a request may wait for every logic shard before the app-server gets Error
/// Timeout: the shards of one node answer within a turn each, so this fires only when a shard
/// is stuck.
pub const PATIENCE_MS: u64 = 5_000;
/// Cluster mode: how long a request waits for the other nodes' answers; past it, it is
/// answered with the drivers of the nodes that answered. Two crossings of Redis take about
/// 0.2–2 ms (PROTOCOL.md §15), so this is only reached by a node that is gone or stuck.
pub const NODE_PATIENCE_MS: u64 = 1_000;

/// A GeoPush's push, kept while its drivers are chosen.
#[derive(Debug, Clone)]
pub struct PushArgs {
    /// The push's id.
    pub message_id: u64,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its TTL, ms (0 already replaced by the default).
    pub ttl_ms: u32,
    /// The app-server's clock, passed to the app.
    pub sent_at_us: u64,
    /// Passed to the app.
    pub kind: u16,
}

/// One request waiting for the logic shards (and, in cluster mode, the other nodes).
#[derive(Debug)]
pub struct Waiting {
    /// Who asked.
    asker: Asker,
    /// Its log-id.
    log_id: u64,
    /// GeoQuery or GeoPush.
    cmd: Cmd,
    /// Drivers wanted.
    k: usize,
    /// Logic shards still to answer.
    left: usize,
    /// Other nodes still to answer.
    nodes_left: usize,
    /// Their answers so far.
    hits: Vec<Hit>,
    /// GeoPush: what to push.
    push: Option<PushArgs>,
    /// When it fails Timeout.
    deadline: u64,
    /// When the gate read its frame (monotonic µs; 0: unknown), for `fleetgate_geo_answer_us`.
    read_us: u64,
}

/// The geo requests one gate shard waits on.
pub type Geos = Waits<Waiting, MAX_WAITING, GEO_TAG_SHIFT>;

impl Deadline for Waiting {
    fn deadline(&self) -> u64 {
        self.deadline
    }
}

/// A selection's fields as they came, before they are checked: the node message's own type, so
/// a selection crosses nodes as it came.
pub use schema::node::GeoSelection as Asked;

/// Checks a selection against §9.16's bounds: the query, or the error code and its message.
pub fn check(a: Asked) -> Result<Query, (ErrorCode, &'static str)> {
    let bad = ErrorCode::InvalidField;
    if !(-900_000_000..=900_000_000).contains(&a.lat_e7) {
        return Err((bad, "lat_e7 out of range (-900000000..=900000000 in 1e-7 degrees)"));
    }
    if !(-1_800_000_000..=1_800_000_000).contains(&a.lon_e7) {
        return Err((bad, "lon_e7 out of range (-1800000000..=1800000000 in 1e-7 degrees)"));
    }
    if a.radius_m == 0 {
        return Err((bad, "radius_m must be at least 1"));
    }
    if a.radius_m > MAX_RADIUS_M {
        return Err((ErrorCode::LimitExceeded, "radius_m over the gate's limit of 50000"));
    }
    if a.k == 0 {
        return Err((bad, "k must be at least 1"));
    }
    if a.k > MAX_K {
        return Err((ErrorCode::LimitExceeded, "k over the gate's limit of 1000"));
    }
    let filter = match wire::GeoFilter(a.filter) {
        wire::GeoFilter::Online => Filter::Online,
        wire::GeoFilter::OnlineOrHeld => Filter::OnlineOrHeld,
        _ => return Err((bad, "filter must be 0 (Online) or 1 (OnlineOrHeld)")),
    };
    Ok(Query {
        lat_e7: a.lat_e7,
        lon_e7: a.lon_e7,
        radius_m: a.radius_m as f64,
        k: a.k as usize,
        max_age_ms: (a.max_age_ms > 0).then_some(a.max_age_ms as u64),
        filter,
    })
}

/// An app-server's GeoQuery on connection `me`.
pub fn query(shard: &mut Shard, me: ConnRef, h: &Header, g: wire::GeoQuery<'_>) {
    start(shard, me, h, Cmd::GeoQuery, Asked::of_query(&g), None);
}

/// An app-server's GeoPush on connection `me`: its push fields are checked as a Push's.
pub fn push(shard: &mut Shard, me: ConnRef, h: &Header, g: wire::GeoPush<'_>) {
    let payload = g.payload().map(|b| b.bytes()).unwrap_or(&[]);
    if payload.len() > super::push::MAX_PAYLOAD {
        return error(shard, me, h, ErrorCode::LimitExceeded, Hop::App, "payload over 16 KiB");
    }
    let cfg = &shard.cfg.sidecar;
    if g.ttl_ms() > cfg.max_ttl_ms {
        return error(shard, me, h, ErrorCode::InvalidField, Hop::App, "ttl_ms over sidecar.max_ttl_ms");
    }
    let args = PushArgs {
        message_id: g.message_id(),
        payload: payload.to_vec(),
        ttl_ms: if g.ttl_ms() == 0 { cfg.default_ttl_ms } else { g.ttl_ms() },
        sent_at_us: g.sent_at_us(),
        kind: g.kind(),
    };
    start(shard, me, h, Cmd::GeoPush, Asked::of_push(&g), Some(args));
}

/// Checks the selection and asks every logic shard, and in cluster mode every other live node.
fn start(shard: &mut Shard, me: ConnRef, h: &Header, cmd: Cmd, a: Asked, push: Option<PushArgs>) {
    if shard.shutting_down {
        return error(shard, me, h, ErrorCode::ShuttingDown, Hop::Gate, "gate shutting down");
    }
    let q = match check(a) {
        Ok(q) => q,
        Err((code, message)) => {
            tracing::info!(log_id = h.log_id, ?cmd, message, "geo request refused");
            return error(shard, me, h, code, Hop::App, message);
        }
    };
    let nodes = shard.cluster.as_deref().map(crate::cluster::relay::other_live_nodes).unwrap_or_default();
    let patience = if nodes.is_empty() { PATIENCE_MS } else { NODE_PATIENCE_MS };
    let asker = Asker::Sidecar { conn: me, seq: h.seq };
    let Some(tag) = ask_shards(shard, asker, h.log_id, cmd, q, push, nodes.len(), patience) else {
        let message = "too many geo requests waiting on this gate shard";
        let retry = jitter(1_000);
        return shard.send_error(
            me,
            h.seq,
            h.log_id,
            ErrorCode::Overloaded,
            Hop::Gate,
            h.cmd,
            message,
            retry,
        );
    };
    tracing::debug!(
        log_id = h.log_id,
        ?cmd,
        tag,
        radius_m = a.radius_m,
        k = a.k,
        nodes = nodes.len(),
        "geo request"
    );
    for node in nodes {
        crate::cluster::relay::to_node(shard, &node, NodeMsg::GeoAsk { tag, log_id: h.log_id, sel: a });
    }
}

/// Registers a request and asks every logic shard of this node; its tag, or `None` when
/// `MAX_WAITING` wait.
#[allow(clippy::too_many_arguments)]
fn ask_shards(
    shard: &mut Shard,
    asker: Asker,
    log_id: u64,
    cmd: Cmd,
    q: Query,
    push: Option<PushArgs>,
    nodes: usize,
    patience_ms: u64,
) -> Option<u64> {
    let shards = shard.mesh.len();
    let w = Waiting {
        asker,
        log_id,
        cmd,
        k: q.k,
        left: shards,
        nodes_left: nodes,
        hits: Vec::new(),
        push,
        deadline: mono_ms() + patience_ms,
        read_us: shard.read_us,
    };
    let tag = shard.geos.insert(shard.id, w)?;
    for s in 0..shards {
        shard.to_shard(s, Msg::Logic(Input::Geo { tag, query: q }));
    }
    Some(tag)
}

/// Another node asks for this node's nearest drivers (its app-server's request). An answer
/// that cannot be given (arguments out of bounds, too many waiting) is not sent: the asking
/// node's deadline answers its app-server.
pub fn from_node(shard: &mut Shard, origin: Origin, tag: u64, log_id: u64, asked: Asked) {
    let q = match check(asked) {
        Ok(q) => q,
        Err((_, message)) => {
            return tracing::warn!(log_id, origin, message, "geo request from another node refused");
        }
    };
    let asker = Asker::Node { origin, tag };
    if ask_shards(shard, asker, log_id, Cmd::GeoQuery, q, None, 0, PATIENCE_MS).is_none() {
        tracing::error!(
            log_id,
            origin,
            "geo request from another node dropped: too many waiting on this shard"
        );
    }
}

/// Another node's nearest drivers for the request of `tag`.
pub fn found_at_node(shard: &mut Shard, tag: u64, hits: &[wire::GeoHit]) {
    let Some(w) = shard.geos.get_mut(tag) else { return };
    if w.nodes_left == 0 {
        return;
    }
    w.nodes_left -= 1;
    w.hits.extend(hits.iter().map(|h| Hit {
        uid: h.uid(),
        lat_e7: h.lat_e7(),
        lon_e7: h.lon_e7(),
        distance_m: h.distance_m() as f64,
        age_ms: h.age_ms() as u64,
    }));
    complete_if_done(shard, tag);
}

/// One logic shard's nearest drivers for the request of `tag`; the last answer completes it.
pub fn answered(shard: &mut Shard, tag: u64, hits: Vec<Hit>) {
    let Some(w) = shard.geos.get_mut(tag) else { return };
    w.hits.extend(hits);
    w.left = w.left.saturating_sub(1);
    complete_if_done(shard, tag);
}

/// Completes the request of `tag` once every logic shard and node answered.
fn complete_if_done(shard: &mut Shard, tag: u64) {
    if shard.geos.get(tag).is_some_and(|w| w.left == 0 && w.nodes_left == 0) {
        if let Some(w) = shard.geos.take(tag) {
            finish(shard, w);
        }
    }
}

/// Answers a complete request (the K nearest of every answer); a GeoPush pushes first.
fn finish(shard: &mut Shard, mut w: Waiting) {
    w.hits.sort_by(Hit::cmp_near);
    // One driver may be reported twice while its session moves between nodes: keep the nearer.
    let mut seen = std::collections::HashSet::with_capacity(w.hits.len());
    w.hits.retain(|h| seen.insert(h.uid));
    w.hits.truncate(w.k);
    let (conn, seq) = match w.asker {
        Asker::Sidecar { conn, seq } => (conn, seq),
        Asker::Node { origin, tag } => {
            let hits = wire_hits(&w.hits);
            if let Some(node) = shard.cluster.as_ref().and_then(|c| c.origin_name(origin)) {
                tracing::debug!(
                    log_id = w.log_id,
                    node,
                    chosen = hits.len(),
                    "geo request: answered to its node"
                );
                crate::cluster::relay::to_node(shard, &node, NodeMsg::GeoFound { tag, hits });
            }
            return;
        }
    };
    let mut message_id = 0;
    if let Some(p) = &w.push {
        message_id = p.message_id;
        let uids: Vec<u64> = w.hits.iter().map(|h| h.uid).collect();
        if !push_to(shard, w.log_id, w.read_us, p, uids) {
            shard.metrics().pushes_refused.fetch_add(1, Relaxed);
            let message =
                "pushes in flight at the gate's bound (limits.max_pushes_in_flight_per_shard): retry later";
            let retry = jitter(super::push::OVERLOADED_RETRY_MS);
            let (code, hop) = (ErrorCode::Overloaded, Hop::Gate);
            return shard.send_error(conn, seq, w.log_id, code, hop, w.cmd as u16, message, retry);
        }
    }
    tracing::info!(log_id = w.log_id, cmd = ?w.cmd, chosen = w.hits.len(), "geo request answered");
    let hits = wire_hits(&w.hits);
    if w.read_us > 0 {
        shard.metrics().geo_answer_us.observe_us(crate::state::mono_us().saturating_sub(w.read_us));
    }
    shard.send_frame(conn, FrameType::Response, w.cmd, seq, w.log_id, |b| {
        let hits = b.create_vector(&hits);
        wire::GeoChosen::create(b, &wire::GeoChosenArgs { message_id, hits: Some(hits) })
    });
}

/// The hits as the wire carries them.
fn wire_hits(hits: &[Hit]) -> Vec<wire::GeoHit> {
    hits.iter()
        .map(|h| {
            let age = h.age_ms.min(u32::MAX as u64) as u32;
            wire::GeoHit::new(h.uid, h.lat_e7, h.lon_e7, h.distance_m as f32, age)
        })
        .collect()
}

/// Pushes `p` to `uids` as a Push naming them would be (docs/PROTOCOL.md §9.9): room reserved
/// on each logic shard, all or none, the body encoded once with the push's deadline, one
/// receipt per uid. False when the room is not there (nothing was pushed).
fn push_to(shard: &mut Shard, log_id: u64, read_us: u64, p: &PushArgs, uids: Vec<u64>) -> bool {
    if uids.is_empty() {
        return true;
    }
    let per_shard = logic::split_by_shard(uids, shard.mesh.len(), |&u| u);
    let want: Vec<u32> = per_shard.iter().map(|u| u.len() as u32).collect();
    if super::fanout::behind(shard, &want) || !shard.push_room.reserve(&want) {
        return false;
    }
    let delivery = super::push::Delivery {
        message_id: p.message_id,
        payload: &p.payload,
        sent_at_us: p.sent_at_us,
        kind: p.kind,
        ttl_ms: p.ttl_ms,
    };
    let content = super::push::content(shard, &delivery, log_id, read_us);
    let targets = super::push::send_targets(shard, &content, per_shard);
    shard.metrics().pushes.fetch_add(1, Relaxed);
    tracing::info!(log_id, message_id = p.message_id, targets, ttl_ms = p.ttl_ms, "geo push accepted");
    true
}

/// Requests past their deadline end Timeout (at most 4,096 per call).
pub fn expire(shard: &mut Shard, now: u64) {
    for tag in shard.geos.due(now, 4096) {
        let Some(w) = shard.geos.take(tag) else { continue };
        if w.left == 0 {
            // Only other nodes are missing: this node's answer and theirs that came.
            tracing::warn!(
                log_id = w.log_id,
                missing = w.nodes_left,
                "geo request: nodes did not answer in time"
            );
            finish(shard, w);
            continue;
        }
        tracing::warn!(log_id = w.log_id, left = w.left, "geo request: logic shards did not answer in time");
        let Asker::Sidecar { conn, seq } = w.asker else { continue };
        let message = "the gate's logic shards did not answer in time";
        let (code, hop) = (ErrorCode::Timeout, Hop::Gate);
        shard.send_error(conn, seq, w.log_id, code, hop, w.cmd as u16, message, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn asked() -> Asked {
        Asked { lat_e7: 0, lon_e7: 0, radius_m: 1_000, k: 20, max_age_ms: 0, filter: 0 }
    }

    #[test]
    fn bounds_are_checked_with_their_codes() {
        let q = check(asked()).expect("valid");
        assert_eq!((q.radius_m, q.k, q.max_age_ms, q.filter), (1_000.0, 20, None, Filter::Online));
        let cases = [
            (Asked { lat_e7: 900_000_001, ..asked() }, ErrorCode::InvalidField),
            (Asked { lat_e7: -900_000_001, ..asked() }, ErrorCode::InvalidField),
            (Asked { lon_e7: 1_800_000_001, ..asked() }, ErrorCode::InvalidField),
            (Asked { lon_e7: i32::MIN, ..asked() }, ErrorCode::InvalidField),
            (Asked { radius_m: 0, ..asked() }, ErrorCode::InvalidField),
            (Asked { radius_m: MAX_RADIUS_M + 1, ..asked() }, ErrorCode::LimitExceeded),
            (Asked { k: 0, ..asked() }, ErrorCode::InvalidField),
            (Asked { k: MAX_K + 1, ..asked() }, ErrorCode::LimitExceeded),
            (Asked { filter: 2, ..asked() }, ErrorCode::InvalidField),
        ];
        for (a, code) in cases {
            assert_eq!(check(a).map_err(|e| e.0), Err(code), "{a:?}");
        }
        let edge = Asked {
            lat_e7: -900_000_000,
            lon_e7: 1_800_000_000,
            radius_m: MAX_RADIUS_M,
            k: MAX_K,
            max_age_ms: 5,
            filter: 1,
        };
        let q = check(edge).expect("the bounds themselves are valid");
        assert_eq!((q.max_age_ms, q.filter), (Some(5), Filter::OnlineOrHeld));
    }

    proptest! {
        /// Any field values: a query exactly when every one is in bounds.
        #[test]
        fn check_accepts_exactly_the_bounds(
            lat_e7 in any::<i32>(), lon_e7 in any::<i32>(), radius_m in prop_oneof![any::<u32>(), 0u32..60_000],
            k in prop_oneof![any::<u32>(), 0u32..1_100], max_age_ms in any::<u32>(), filter in any::<u8>(),
        ) {
            let a = Asked { lat_e7, lon_e7, radius_m, k, max_age_ms, filter };
            let ok = lat_e7.abs() <= 900_000_000
                && (-1_800_000_000..=1_800_000_000).contains(&lon_e7)
                && (1..=MAX_RADIUS_M).contains(&radius_m)
                && (1..=MAX_K).contains(&k)
                && filter <= 1;
            prop_assert_eq!(check(a).is_ok(), ok);
        }
    }

    #[test]
    fn tags_name_their_shard_and_waiting_is_bounded() {
        let w = || Waiting {
            asker: Asker::Sidecar { conn: ConnRef { shard: 0, slot: 1, gen: 1 }, seq: 1 },
            log_id: 1,
            cmd: Cmd::GeoQuery,
            k: 1,
            left: 1,
            nodes_left: 0,
            hits: Vec::new(),
            push: None,
            deadline: 10,
            read_us: 0,
        };
        let mut g = Geos::default();
        let t = g.insert(3, w()).expect("room");
        assert_eq!(t >> GEO_TAG_SHIFT, 3);
        assert_eq!(g.next_deadline(), Some(10));
        assert!(g.take(t).is_some() && g.take(t).is_none());
        for _ in 0..MAX_WAITING {
            assert!(g.insert(0, w()).is_some());
        }
        assert!(g.insert(0, w()).is_none(), "bounded");
        assert_eq!(g.len(), MAX_WAITING);
    }
}
