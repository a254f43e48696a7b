//! The relay (docs/PROTOCOL.md §15): what a node with no app-server connected has for one goes
//! to a node that has one, and an app-server's EndSession reaches the node holding the session.
//!
//! - **Advertising.** Each node says in its lease whether an app-server (a sidecar connection
//!   that passed its hello) is connected (`NodeInfo::has_appserver`, sent with `Cmd::Advertise`
//!   when that changes); the others read it with the live nodes (`Cluster::live`), at their next
//!   lease renewal (within a third of the lease).
//! - **What relays.** On a node with none: the coalesced GPS batches (`Gps`), app requests
//!   (`Requests`, whose answers come back as `Answers`) and unreachable events (`Unreachable`).
//!   Receipts never relay: a push was accepted by a node its app-server is connected to, and its
//!   receipts go back there (`super`). What arrives from another node is never relayed again:
//!   a node that lost its app-server meanwhile answers NoAppServer (requests), drops GPS and
//!   keeps unreachable events as it does its own, so nothing circles between nodes.
//! - **Which node.** Each uid goes to the live node with an app-server that scores highest for
//!   it (rendezvous hashing of node name and uid): deterministic, so a driver's GPS and a user's
//!   requests keep one path and one order while the set of nodes stays the same; spread, so
//!   several nodes with app-servers share the load; and a node that comes or goes moves only the
//!   uids that scored highest on it.
//! - **Requests keep the asking node's rules.** The asking node's logic shard keeps the request
//!   and its deadline (Timeout, a late answer dropped) exactly as on one node; the carrying node
//!   sends it to its app-server under an id of its own (bit 47 set: [`RELAYED`]) and sends back
//!   the Reply, the app-server's error, or NoAppServer when none took it or its connection
//!   dropped. A carrying node that is lost (its lease lapses) fails the requests it carried with
//!   NoAppServer at once, as a dropped sidecar connection does on one node.
//!
//! Everything relayed is sealed like every node message, gathered per destination node for a
//! turn of the shard's loop and published at its end (`super::flush`), split to stay under the
//! message size limit. Tables are bounded: past [`MAX_ASKED`] requests waiting on other nodes a
//! request is not relayed (NoAppServer), past [`MAX_SERVED`] requests carried for other nodes one
//! is answered NoAppServer, each with an error logged and counted.

use super::{tag_shard, Cluster, Cmd, NodeInfo, Note as ClusterNote, Owner};
use crate::delivery::UpstreamOut;
use crate::mesh::Msg;
use crate::sidecar::end::{self, Answer, Stage, LOOKUP_BIT};
use crate::state::Shard;
use logic::{Input, Origin};
use schema::node::{
    failure, NodeAnswer, NodeMsg, NodeRequest, MAX_GPS_POINTS, MAX_RELAY_BYTES, MAX_UNREACHABLE,
};
use schema::wire::{ErrorCode, Hop, UidGpsPoint};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Request ids a node gives the requests it carries for other nodes: its gate shard in the top
/// 16 bits (as every request id), this bit set, a counter below it. A logic shard's own ids
/// count up from 1 below bit 48 and would need 2^47 requests (44 years at 100,000 a second) to
/// reach it.
pub const RELAYED: u64 = 1 << 47;
/// Most requests one shard keeps relayed to other nodes and not answered.
pub const MAX_ASKED: usize = 1 << 17;
/// Most requests one shard carries for other nodes at once.
pub const MAX_SERVED: usize = 1 << 17;
/// A carried request is forgotten this long after the asking node's deadline (an answer after
/// that finds nothing and is dropped, as it would be there).
const SERVED_GRACE_MS: u64 = 1_000;
/// A request relayed from here is forgotten this long after its deadline (the logic shard has
/// answered Timeout by then).
const ASKED_GRACE_MS: u64 = 1_000;
/// Bytes of a request besides its body in a `Requests` message.
const REQUEST_OVERHEAD: usize = 35;

/// What the cluster shares for the relay.
#[derive(Debug)]
pub struct Shared {
    /// This node's facts as first advertised (the name and incarnation never change).
    me: NodeInfo,
    /// Whether the lease says an app-server is connected, as last sent.
    advertised: Mutex<bool>,
    /// The same, read without the lock on every turn.
    advertised_fast: AtomicBool,
    /// Counters for /metrics.
    pub stats: Stats,
}

impl Shared {
    /// The relay of node `me`.
    pub fn new(me: &NodeInfo) -> Shared {
        Shared {
            me: me.clone(),
            advertised: Mutex::new(me.has_appserver),
            advertised_fast: AtomicBool::new(me.has_appserver),
            stats: Stats::default(),
        }
    }
}

/// Relay counters: `_sent` from this node (it had no app-server), `_received` for this node's
/// app-server.
#[derive(Debug, Default)]
pub struct Stats {
    /// GPS points relayed to another node.
    pub gps_sent: AtomicU64,
    /// GPS points relayed here.
    pub gps_received: AtomicU64,
    /// App requests relayed to another node.
    pub requests_sent: AtomicU64,
    /// App requests relayed here.
    pub requests_received: AtomicU64,
    /// Unreachable events relayed to another node.
    pub unreachable_sent: AtomicU64,
    /// Unreachable events relayed here.
    pub unreachable_received: AtomicU64,
    /// EndSession asks forwarded to the node holding the session.
    pub ends_sent: AtomicU64,
    /// EndSession asks other nodes forwarded here.
    pub ends_received: AtomicU64,
    /// Geo requests asked of other nodes (one per node asked).
    pub geo_sent: AtomicU64,
    /// Geo requests other nodes asked of this one.
    pub geo_received: AtomicU64,
    /// Requests refused by a bound of the relay (each also logged).
    pub refused: AtomicU64,
}

/// What a shard is told about the relay (through `super::Note::Relay`).
#[derive(Debug)]
pub enum Note {
    /// GPS another node relayed here.
    Gps(Vec<UidGpsPoint>),
    /// Requests another node relayed here.
    Requests {
        /// The asking node.
        origin: Origin,
        /// The requests.
        requests: Vec<NodeRequest>,
    },
    /// How requests this shard relayed ended.
    Answers(Vec<NodeAnswer>),
    /// Unreachable events another node relayed here.
    Unreachable(Vec<(u64, u8)>),
    /// Another node asks to end a session held here.
    EndSession {
        /// The asking node.
        origin: Origin,
        /// Its tag.
        tag: u64,
        /// The user.
        uid: u64,
        /// The ask's log-id.
        log_id: u64,
        /// For the app's GoAway.
        message: String,
    },
    /// The answer of the node an EndSession was forwarded to.
    SessionEnded {
        /// The node that answered.
        node: String,
        /// This shard's tag.
        tag: u64,
        /// Found and ended there.
        found: bool,
    },
    /// This node's app-server answered (or failed) a request carried for another node; sent by
    /// the shard that got the answer to the shard that holds the request.
    Answered(Input),
    /// Another node asks for this node's nearest drivers (its app-server's GeoQuery or
    /// GeoPush).
    GeoAsk {
        /// The asking node.
        origin: Origin,
        /// Its tag.
        tag: u64,
        /// The request's log-id.
        log_id: u64,
        /// The selection as the asking node's app-server sent it.
        asked: crate::sidecar::geo::Asked,
    },
    /// Another node's nearest drivers for a geo request of this shard.
    GeoFound {
        /// This shard's tag.
        tag: u64,
        /// The drivers, nearest first.
        hits: Vec<schema::wire::GeoHit>,
    },
}

/// A request carried here for another node.
#[derive(Debug, Clone, Copy)]
struct Served {
    origin: Origin,
    request_id: u64,
    deadline: u64,
}

/// What goes to one node at the end of the turn.
#[derive(Debug, Default)]
struct Outgoing {
    gps: Vec<UidGpsPoint>,
    requests: Vec<NodeRequest>,
    answers: Vec<NodeAnswer>,
    unreachable: Vec<(u64, u8)>,
    other: Vec<NodeMsg>,
}

/// A shard's side of the relay.
#[derive(Debug, Default)]
pub struct RelayShard {
    /// By destination node name.
    out: HashMap<String, Outgoing>,
    /// Requests relayed from here, waiting for their answer: request id → (node, deadline).
    asked: HashMap<u64, (Origin, u64)>,
    asked_by_deadline: BTreeSet<(u64, u64)>,
    /// Requests carried here for other nodes, by the id this node's app-server sees.
    served: HashMap<u64, Served>,
    served_by_deadline: BTreeSet<(u64, u64)>,
    next_served: u64,
}

impl RelayShard {
    /// The earliest time something here must be forgotten.
    pub fn next_deadline(&self) -> Option<u64> {
        let a = self.asked_by_deadline.first().map(|d| d.0);
        let s = self.served_by_deadline.first().map(|d| d.0);
        a.into_iter().chain(s).min()
    }

    fn to(&mut self, node: &str) -> &mut Outgoing {
        if !self.out.contains_key(node) {
            self.out.insert(node.to_owned(), Outgoing::default());
        }
        self.out.get_mut(node).unwrap_or_else(|| unreachable!("inserted above"))
    }
}

/// Live nodes other than this one with an app-server, sorted by name.
fn with_appserver(c: &Cluster) -> Vec<String> {
    let live = c.live.read().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<String> =
        live.values().filter(|n| n.has_appserver && n.name != c.name).map(|n| n.name.clone()).collect();
    v.sort_unstable();
    v
}

/// FNV-1a of a name: the node's part of its score.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64's finaliser: a well-mixed score from node and uid.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The node `uid` goes to among `nodes` (their name hashes), by rendezvous hashing.
fn pick(hashes: &[u64], uid: u64) -> usize {
    let mut best = (0, 0u64);
    for (i, &h) in hashes.iter().enumerate() {
        let score = mix(h ^ uid.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if i == 0 || score > best.1 {
            best = (i, score);
        }
    }
    best.0
}

/// The nodes to relay to now, with their name hashes; empty when this node has an app-server
/// (or is not clustered, or no other node has one).
fn targets(shard: &Shard) -> Vec<(String, u64)> {
    match &shard.cluster {
        Some(c) if !shard.sidecars.any() => {
            with_appserver(c).into_iter().map(|n| (n.clone(), name_hash(&n))).collect()
        }
        _ => Vec::new(),
    }
}

/// True when a request from an app here can be answered through another node: this node has
/// no app-server and some live node has one.
pub fn available(shard: &Shard) -> bool {
    !targets(shard).is_empty()
}

/// An app request for an app-server: relayed when this node has none and another node has one,
/// else for this node's delivery (which fails it NoAppServer when there is none at all).
pub fn upstream(shard: &mut Shard, u: UpstreamOut, now: u64) {
    let nodes = targets(shard);
    let Some(c) = shard.cluster.clone().filter(|_| !nodes.is_empty()) else {
        return shard.delivery.upstream(u);
    };
    let dest = logic::upstream::shard_of_request(u.request_id);
    if u.body.len() + REQUEST_OVERHEAD > MAX_RELAY_BYTES {
        let message = format!(
            "the request ({} bytes) is too large to relay to the node with the app-server ({} bytes at most)",
            u.body.len(),
            MAX_RELAY_BYTES - REQUEST_OVERHEAD
        );
        tracing::warn!(log_id = u.log_id, request_id = u.request_id, message, "request: not relayed");
        return shard.to_shard(dest, Msg::Logic(Input::UpstreamFailed { request_id: u.request_id, message }));
    }
    if shard.relay.asked.len() >= MAX_ASKED {
        c.relay.stats.refused.fetch_add(1, Relaxed);
        tracing::error!(
            log_id = u.log_id,
            request_id = u.request_id,
            bound = MAX_ASKED,
            "request: relay table full, not relayed (NoAppServer)"
        );
        return shard.delivery.upstream(u);
    }
    let hashes: Vec<u64> = nodes.iter().map(|n| n.1).collect();
    let node = &nodes[pick(&hashes, u.uid)].0;
    let origin = c.origin(node);
    let timeout_ms = shard.cfg.sidecar.request_timeout_ms;
    let deadline = now + timeout_ms as u64 + ASKED_GRACE_MS;
    let r = &mut shard.relay;
    r.asked.insert(u.request_id, (origin, deadline));
    r.asked_by_deadline.insert((deadline, u.request_id));
    tracing::info!(log_id = u.log_id, uid = u.uid, request_id = u.request_id, node = %node, "request: relayed to the node with an app-server");
    c.relay.stats.requests_sent.fetch_add(1, Relaxed);
    let UpstreamOut { request_id, uid, role, cmd, body, log_id } = u;
    r.to(node).requests.push(NodeRequest { request_id, log_id, uid, role, cmd, timeout_ms, body });
}

/// A coalesced GPS batch for an app-server: relayed (each driver to its node) when this node
/// has none and another node has one.
pub fn gps(shard: &mut Shard, points: &[UidGpsPoint]) {
    let nodes = targets(shard);
    let Some(c) = shard.cluster.clone().filter(|_| !nodes.is_empty()) else {
        return shard.delivery.gps(points);
    };
    let hashes: Vec<u64> = nodes.iter().map(|n| n.1).collect();
    for p in points {
        let node = &nodes[pick(&hashes, p.uid())].0;
        shard.relay.to(node).gps.push(*p);
    }
    c.relay.stats.gps_sent.fetch_add(points.len() as u64, Relaxed);
    tracing::debug!(points = points.len(), "gps: relayed to the nodes with an app-server");
}

/// A session ended without logout: relayed when this node has no app-server and another has.
pub fn unreachable(shard: &mut Shard, uid: u64, outcome: u8) {
    let nodes = targets(shard);
    let Some(c) = shard.cluster.clone().filter(|_| !nodes.is_empty()) else {
        return shard.delivery.unreachable(uid, outcome);
    };
    let hashes: Vec<u64> = nodes.iter().map(|n| n.1).collect();
    let node = &nodes[pick(&hashes, uid)].0;
    shard.relay.to(node).unreachable.push((uid, outcome));
    c.relay.stats.unreachable_sent.fetch_add(1, Relaxed);
}

/// An answer (or failure) of this node's app-server for request `input` names, from the gate
/// shard that got it: a request carried for another node goes back there, any other to its
/// logic shard `dest`.
pub fn answer(shard: &mut Shard, dest: usize, input: Input) {
    let id = match &input {
        Input::UpstreamReply { request_id, .. }
        | Input::UpstreamFailed { request_id, .. }
        | Input::UpstreamUndeliverable { request_id } => *request_id,
        _ => 0,
    };
    if shard.cluster.is_some() && id & RELAYED != 0 {
        shard.to_shard(dest, Msg::Cluster(ClusterNote::Relay(Note::Answered(input))));
    } else {
        shard.to_shard(dest, Msg::Logic(input));
    }
}

/// The answer to an EndSession another node asked (for `super::super::sidecar::end`).
pub fn session_ended(shard: &mut Shard, origin: Origin, tag: u64, uid: u64, found: bool) {
    let Some(node) = shard.cluster.as_ref().and_then(|c| c.origin_name(origin)) else { return };
    shard.relay.to(&node).other.push(NodeMsg::SessionEnded { tag, uid, found });
}

/// Sends node message `msg` to node `node` with this turn's others.
pub fn to_node(shard: &mut Shard, node: &str, msg: NodeMsg) {
    if let (NodeMsg::GeoAsk { .. }, Some(c)) = (&msg, shard.cluster.as_ref()) {
        c.relay.stats.geo_sent.fetch_add(1, Relaxed);
    }
    shard.relay.to(node).other.push(msg);
}

/// Live nodes other than this one, sorted by name.
pub fn other_live_nodes(c: &Cluster) -> Vec<String> {
    let live = c.live.read().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<String> = live.keys().filter(|n| **n != c.name).cloned().collect();
    v.sort_unstable();
    v
}

/// Asks the directory which node holds `uid` for the EndSession of `tag`.
pub fn look_up_for_end(shard: &mut Shard, tag: u64, uid: u64, now: u64) {
    match shard.cluster_shard.as_mut() {
        Some(cs) => cs.cmds.push(Cmd::Lookup { uids: vec![uid], tag: tag | LOOKUP_BIT }),
        None => {
            on_lookup_failed(shard, tag | LOOKUP_BIT, now);
        }
    }
}

/// The directory's answer to a lookup; false when it is not one of the relay's.
pub fn on_looked(shard: &mut Shard, tag: u64, owners: &[(u64, Option<Owner>)]) -> bool {
    if tag & LOOKUP_BIT == 0 {
        return false;
    }
    let Some(c) = shard.cluster.clone() else { return true };
    let tag = tag & !LOOKUP_BIT;
    let Some(w) = shard.ends.get_mut(tag) else { return true };
    let owner = owners.first().and_then(|(_, o)| o.clone());
    match owner {
        Some(o) if o.node != c.name && c.is_live(&o.node) => {
            let origin = c.origin(&o.node);
            w.stage = Stage::Node(origin);
            let msg = NodeMsg::EndSession { tag, uid: w.uid, log_id: w.log_id, message: w.message.clone() };
            tracing::info!(log_id = w.log_id, uid = w.uid, node = %o.node, "end session: forwarded to the node holding it");
            c.relay.stats.ends_sent.fetch_add(1, Relaxed);
            shard.relay.to(&o.node).other.push(msg);
        }
        Some(o) if o.node != c.name => {
            if let Some(w) = shard.ends.take(tag) {
                end::finish(shard, w, node_lost(&o.node));
            }
        }
        // Nowhere, or the directory names this node, which has no session for it.
        _ => {
            if let Some(w) = shard.ends.take(tag) {
                end::finish(shard, w, Answer::NotFound);
            }
        }
    }
    true
}

/// The error of an EndSession whose session is on a lost node: its apps come back elsewhere, so
/// the app-server must ask again.
fn node_lost(node: &str) -> Answer {
    Answer::Failed {
        code: ErrorCode::Timeout,
        origin: Hop::Gate,
        message: format!(
            "node {node} holding the session is lost; ask again (its apps come back on other nodes)"
        ),
        retry_after_ms: 0,
    }
}

/// A lookup that could not be made; false when it is not one of the relay's.
pub fn on_lookup_failed(shard: &mut Shard, tag: u64, _now: u64) -> bool {
    if tag & LOOKUP_BIT == 0 {
        return false;
    }
    if let Some(w) = shard.ends.take(tag & !LOOKUP_BIT) {
        tracing::warn!(log_id = w.log_id, uid = w.uid, "end session: the directory could not be asked");
        let answer = Answer::Failed {
            code: ErrorCode::Overloaded,
            origin: Hop::Directory,
            message: "the directory (Redis) could not be asked which node holds the session".to_owned(),
            retry_after_ms: crate::state::jitter(1_000),
        };
        end::finish(shard, w, answer);
    }
    true
}

/// The live nodes changed: requests relayed to a node that left fail NoAppServer now, and
/// EndSession asks waiting on one fail (the app-server asks again).
pub fn nodes_changed(shard: &mut Shard, now: u64) {
    let Some(c) = shard.cluster.clone() else { return };
    let gone = |o: Origin| c.origin_name(o).is_none_or(|n| !c.is_live(&n));
    let lost: Vec<u64> = shard.relay.asked.iter().filter(|(_, (o, _))| gone(*o)).map(|(&id, _)| id).collect();
    for request_id in lost {
        if let Some((_, deadline)) = shard.relay.asked.remove(&request_id) {
            shard.relay.asked_by_deadline.remove(&(deadline, request_id));
        }
        tracing::info!(request_id, "request: the node it was relayed to is lost (NoAppServer)");
        crate::event_loop::logic_input(shard, Input::UpstreamUndeliverable { request_id }, now);
    }
    for (tag, o) in shard.ends.at_nodes() {
        if gone(o) {
            let name = c.origin_name(o).unwrap_or_default();
            if let Some(w) = shard.ends.take(tag) {
                end::finish(shard, w, node_lost(&name));
            }
        }
    }
}

/// Forgets what waited past its deadline (at most 4,096 of each per call).
pub fn expire(shard: &mut Shard, now: u64) {
    let r = &mut shard.relay;
    let asked: Vec<(u64, u64)> =
        r.asked_by_deadline.iter().take_while(|d| d.0 <= now).take(4096).copied().collect();
    for (d, id) in asked {
        r.asked_by_deadline.remove(&(d, id));
        r.asked.remove(&id);
    }
    let served: Vec<(u64, u64)> =
        r.served_by_deadline.iter().take_while(|d| d.0 <= now).take(4096).copied().collect();
    for (d, id) in served {
        r.served_by_deadline.remove(&(d, id));
        if let Some(s) = r.served.remove(&id) {
            tracing::debug!(
                request_id = s.request_id,
                "relayed request forgotten: no answer by the asking node's deadline"
            );
        }
    }
}

/// What the Redis thread or another shard tells this one.
pub fn on_note(shard: &mut Shard, note: Note, now: u64) {
    let Some(c) = shard.cluster.clone() else { return };
    match note {
        Note::Gps(points) => shard.delivery.gps(&points),
        Note::Unreachable(list) => list.into_iter().for_each(|(uid, o)| shard.delivery.unreachable(uid, o)),
        Note::Requests { origin, requests } => {
            for q in requests {
                serve(shard, &c, origin, q, now);
            }
        }
        Note::Answers(answers) => {
            let limit = shard.cfg.app.max_body as usize;
            for a in answers {
                let request_id = a.request_id();
                if let Some((_, deadline)) = shard.relay.asked.remove(&request_id) {
                    shard.relay.asked_by_deadline.remove(&(deadline, request_id));
                }
                let input = match a {
                    // This node's own body limit holds for its apps, whatever the other node's.
                    NodeAnswer::Reply { reply, .. } if reply.len() > limit => Input::UpstreamFailed {
                        request_id,
                        message: format!(
                            "the app-server's reply ({} bytes) exceeds the app port's body limit ({limit} bytes)",
                            reply.len()
                        ),
                    },
                    NodeAnswer::Reply { reply, .. } => Input::UpstreamReply { request_id, reply },
                    NodeAnswer::Failed { failure: failure::APP_SERVER_ERROR, message, .. } => {
                        Input::UpstreamFailed { request_id, message }
                    }
                    NodeAnswer::Failed { .. } => Input::UpstreamUndeliverable { request_id },
                };
                crate::event_loop::logic_input(shard, input, now);
            }
        }
        Note::EndSession { origin, tag, uid, log_id, message } => {
            end::from_node(shard, origin, tag, uid, log_id, message, now)
        }
        Note::SessionEnded { node, tag, found } => {
            let waiting = shard.ends.get_mut(tag).is_some_and(|w| matches!(w.stage, Stage::Node(_)));
            if let Some(w) = shard.ends.take(tag).filter(|_| waiting) {
                end::finish(shard, w, if found { Answer::Ended(node) } else { Answer::NotFound });
            }
        }
        Note::Answered(input) => answered(shard, input),
        Note::GeoAsk { origin, tag, log_id, asked } => {
            crate::sidecar::geo::from_node(shard, origin, tag, log_id, asked)
        }
        Note::GeoFound { tag, hits } => crate::sidecar::geo::found_at_node(shard, tag, &hits),
    }
}

/// A request another node relayed here: to this node's app-server under an id of this node.
fn serve(shard: &mut Shard, c: &Cluster, origin: Origin, q: NodeRequest, now: u64) {
    let r = &mut shard.relay;
    if r.served.len() >= MAX_SERVED {
        c.relay.stats.refused.fetch_add(1, Relaxed);
        tracing::error!(
            log_id = q.log_id,
            bound = MAX_SERVED,
            "request from another node refused: relay table full (NoAppServer)"
        );
        let a = NodeAnswer::Failed {
            request_id: q.request_id,
            failure: failure::NO_APP_SERVER,
            message: String::new(),
        };
        if let Some(node) = c.origin_name(origin) {
            r.to(&node).answers.push(a);
        }
        return;
    }
    r.next_served = (r.next_served + 1) & (RELAYED - 1);
    let id = ((shard.id as u64) << logic::upstream::SHARD_SHIFT) | RELAYED | r.next_served;
    let deadline = now + q.timeout_ms as u64 + SERVED_GRACE_MS;
    r.served.insert(id, Served { origin, request_id: q.request_id, deadline });
    r.served_by_deadline.insert((deadline, id));
    c.relay.stats.requests_received.fetch_add(1, Relaxed);
    tracing::info!(
        log_id = q.log_id,
        uid = q.uid,
        request_id = id,
        origin_request_id = q.request_id,
        "request: relayed here from another node"
    );
    let NodeRequest { log_id, uid, role, cmd, body, .. } = q;
    shard.delivery.upstream(UpstreamOut { request_id: id, uid, role, cmd, body, log_id });
}

/// This node's app-server answered a request carried for another node: the answer goes back.
fn answered(shard: &mut Shard, input: Input) {
    let (id, a) = match input {
        Input::UpstreamReply { request_id, reply } if reply.len() + 13 > MAX_RELAY_BYTES => (
            request_id,
            NodeAnswer::Failed {
                request_id: 0,
                failure: failure::APP_SERVER_ERROR,
                message: format!(
                    "the app-server's reply ({} bytes) is too large to relay to the asking node ({} bytes at most)",
                    reply.len(),
                    MAX_RELAY_BYTES - 13
                ),
            },
        ),
        Input::UpstreamReply { request_id, reply } => (request_id, NodeAnswer::Reply { request_id: 0, reply }),
        Input::UpstreamFailed { request_id, message } => (
            request_id,
            NodeAnswer::Failed { request_id: 0, failure: failure::APP_SERVER_ERROR, message },
        ),
        Input::UpstreamUndeliverable { request_id } => (
            request_id,
            NodeAnswer::Failed { request_id: 0, failure: failure::NO_APP_SERVER, message: String::new() },
        ),
        _ => return,
    };
    let r = &mut shard.relay;
    let Some(s) = r.served.remove(&id) else {
        // Answered after the asking node's deadline: it answered Timeout, this is dropped.
        tracing::debug!(request_id = id, "late answer to a relayed request dropped");
        return;
    };
    r.served_by_deadline.remove(&(s.deadline, id));
    let a = match a {
        NodeAnswer::Reply { reply, .. } => NodeAnswer::Reply { request_id: s.request_id, reply },
        NodeAnswer::Failed { failure, message, .. } => {
            NodeAnswer::Failed { request_id: s.request_id, failure, message }
        }
    };
    let Some(node) = shard.cluster.as_ref().and_then(|c| c.origin_name(s.origin)) else { return };
    r.to(&node).answers.push(a);
}

/// End of a turn: the advertisement when this node's app-server presence changed, and what
/// goes to other nodes as sealed messages (into `super::ClusterShard::outgoing`).
pub fn flush(shard: &mut Shard) {
    let Some(c) = shard.cluster.clone() else { return };
    advertise(&c, shard.sidecars.any());
    let Some(cs) = shard.cluster_shard.as_mut() else { return };
    for (node, o) in shard.relay.out.drain() {
        for chunk in o.gps.chunks(MAX_GPS_POINTS) {
            cs.outgoing.push((node.clone(), NodeMsg::Gps(chunk.to_vec())));
        }
        for chunk in o.unreachable.chunks(MAX_UNREACHABLE) {
            cs.outgoing.push((node.clone(), NodeMsg::Unreachable(chunk.to_vec())));
        }
        for part in pack(o.requests, NodeRequest::wire_len) {
            cs.outgoing.push((node.clone(), NodeMsg::Requests(part)));
        }
        for part in pack(o.answers, NodeAnswer::wire_len) {
            cs.outgoing.push((node.clone(), NodeMsg::Answers(part)));
        }
        cs.outgoing.extend(o.other.into_iter().map(|m| (node.clone(), m)));
    }
}

/// `items` in runs of at most `MAX_RELAY_BYTES` (an item is never larger: senders check).
fn pack<T>(items: Vec<T>, len: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = Vec::new();
    let mut size = 0;
    for item in items {
        let n = len(&item);
        match parts.last_mut() {
            Some(part) if size + n <= MAX_RELAY_BYTES => part.push(item),
            _ => {
                parts.push(vec![item]);
                size = 0;
            }
        }
        size += n;
    }
    parts
}

/// Tells the directory when this node gains its first app-server or loses its last. Sent at
/// once, under the lock, so two shards' changes reach the Redis thread in the order they were
/// decided; a full queue leaves the old value, and a later turn tries again.
fn advertise(c: &Cluster, has_appserver: bool) {
    if c.relay.advertised_fast.load(Relaxed) == has_appserver {
        return;
    }
    let mut adv = c.relay.advertised.lock().unwrap_or_else(|p| p.into_inner());
    if *adv == has_appserver {
        return;
    }
    let mut me = c.relay.me.clone();
    me.has_appserver = has_appserver;
    if c.handle.send(vec![Cmd::Advertise(me)]).is_ok() {
        *adv = has_appserver;
        c.relay.advertised_fast.store(has_appserver, Relaxed);
        tracing::info!(node = %c.name, has_appserver, "advertised: app-server connected here");
    }
}

/// Splits a relay message from node `sender` by the shard that takes each part (on the Redis
/// thread); messages that are not the relay's are left to the caller.
pub fn split(c: &Cluster, sender: &str, msg: NodeMsg, per: &mut [Vec<Msg>]) {
    let shards = per.len();
    let note = |n: Note| Msg::Cluster(ClusterNote::Relay(n));
    let st = &c.relay.stats;
    match msg {
        NodeMsg::Gps(points) => {
            st.gps_received.fetch_add(points.len() as u64, Relaxed);
            for (s, pts) in logic::split_by_shard(points, shards, |p| p.uid()).into_iter().enumerate() {
                if !pts.is_empty() {
                    per[s].push(note(Note::Gps(pts)));
                }
            }
        }
        NodeMsg::Requests(requests) => {
            let origin = c.origin(sender);
            for (s, rs) in logic::split_by_shard(requests, shards, |r| r.uid).into_iter().enumerate() {
                if !rs.is_empty() {
                    per[s].push(note(Note::Requests { origin, requests: rs }));
                }
            }
        }
        NodeMsg::Answers(answers) => {
            let mut by: Vec<Vec<NodeAnswer>> = (0..shards).map(|_| Vec::new()).collect();
            for a in answers {
                match by.get_mut(logic::upstream::shard_of_request(a.request_id())) {
                    Some(v) => v.push(a),
                    None => tracing::warn!(
                        node = sender,
                        request_id = a.request_id(),
                        "answer for no request of this node"
                    ),
                }
            }
            for (s, v) in by.into_iter().enumerate() {
                if !v.is_empty() {
                    per[s].push(note(Note::Answers(v)));
                }
            }
        }
        NodeMsg::Unreachable(list) => {
            st.unreachable_received.fetch_add(list.len() as u64, Relaxed);
            for (s, l) in logic::split_by_shard(list, shards, |e| e.0).into_iter().enumerate() {
                if !l.is_empty() {
                    per[s].push(note(Note::Unreachable(l)));
                }
            }
        }
        NodeMsg::EndSession { tag, uid, log_id, message } => {
            st.ends_received.fetch_add(1, Relaxed);
            let origin = c.origin(sender);
            per[logic::shard_of(uid, shards)].push(note(Note::EndSession {
                origin,
                tag,
                uid,
                log_id,
                message,
            }));
        }
        NodeMsg::SessionEnded { tag, found, .. } => {
            per[tag_shard(tag, shards)].push(note(Note::SessionEnded {
                node: sender.to_owned(),
                tag,
                found,
            }));
        }
        // Any shard can gather a node's answer (it asks every logic shard): spread by the tag.
        NodeMsg::GeoAsk { tag, log_id, sel: asked } => {
            let origin = c.origin(sender);
            st.geo_received.fetch_add(1, Relaxed);
            per[(tag as usize) % shards].push(note(Note::GeoAsk { origin, tag, log_id, asked }));
        }
        NodeMsg::GeoFound { tag, hits } => {
            per[tag_shard(tag, shards)].push(note(Note::GeoFound { tag, hits }));
        }
        other => {
            tracing::error!(node = sender, message = ?std::mem::discriminant(&other), "node message with no route")
        }
    }
}

/// The relay's lines for `/metrics`.
pub fn render_metrics(c: &Cluster, s: &mut String) {
    use std::fmt::Write as _;
    let st = &c.relay.stats;
    let mut pair = |name: &str, help: &str, sent: &AtomicU64, received: &AtomicU64| {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{direction=\"sent\"}} {}\n{name}{{direction=\"received\"}} {}",
            sent.load(Relaxed),
            received.load(Relaxed)
        );
    };
    pair(
        "fleetgate_cluster_relayed_gps_points_total",
        "GPS points relayed between nodes for an app-server: sent (this node had none), received (for this node's).",
        &st.gps_sent,
        &st.gps_received,
    );
    pair(
        "fleetgate_cluster_relayed_requests_total",
        "App requests relayed between nodes for an app-server: sent (this node had none), received (for this node's).",
        &st.requests_sent,
        &st.requests_received,
    );
    pair(
        "fleetgate_cluster_relayed_unreachable_total",
        "Unreachable events relayed between nodes for an app-server.",
        &st.unreachable_sent,
        &st.unreachable_received,
    );
    pair(
        "fleetgate_cluster_end_sessions_forwarded_total",
        "EndSession asks forwarded to the node holding the session (sent) or from another node (received).",
        &st.ends_sent,
        &st.ends_received,
    );
    pair(
        "fleetgate_cluster_geo_asks_total",
        "GeoQuery and GeoPush requests asked of other nodes (sent, one per node) or by them (received).",
        &st.geo_sent,
        &st.geo_received,
    );
    let with = c.live.read().unwrap_or_else(|p| p.into_inner()).values().filter(|n| n.has_appserver).count();
    let _ = writeln!(
        s,
        "# HELP fleetgate_cluster_nodes_with_appserver Live nodes whose lease says an app-server is connected, this one included.\n# TYPE fleetgate_cluster_nodes_with_appserver gauge\nfleetgate_cluster_nodes_with_appserver {with}"
    );
    let _ = writeln!(
        s,
        "# HELP fleetgate_cluster_relay_refused_total Requests refused by a bound of the relay (each logged).\n# TYPE fleetgate_cluster_relay_refused_total counter\nfleetgate_cluster_relay_refused_total {}",
        st.refused.load(Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_uid_keeps_one_node_and_the_nodes_share_the_uids() {
        let names = ["gate-a", "gate-b", "gate-c"];
        let hashes: Vec<u64> = names.iter().map(|n| name_hash(n)).collect();
        let mut counts = [0usize; 3];
        for uid in 0..30_000u64 {
            let i = pick(&hashes, uid);
            assert_eq!(pick(&hashes, uid), i, "deterministic");
            counts[i] += 1;
        }
        for n in counts {
            assert!((8_000..12_000).contains(&n), "{counts:?}");
        }
        // A node leaving moves only the uids that were on it.
        let two: Vec<u64> = hashes[..2].to_vec();
        for uid in 0..30_000u64 {
            let before = pick(&hashes, uid);
            if before < 2 {
                assert_eq!(pick(&two, uid), before, "uid {uid} moved though its node stayed");
            }
        }
    }

    #[test]
    fn packing_keeps_order_and_stays_under_the_message_limit() {
        let sizes = [100usize, MAX_RELAY_BYTES - 50, 60, 40, MAX_RELAY_BYTES, 1, 2];
        let parts = pack(sizes.to_vec(), |&n| n);
        let flat: Vec<usize> = parts.iter().flatten().copied().collect();
        assert_eq!(flat, sizes.to_vec(), "every item once, in order");
        for p in &parts {
            assert!(p.iter().sum::<usize>() <= MAX_RELAY_BYTES, "{p:?}");
        }
        assert_eq!(parts.len(), 5);
        assert!(pack(Vec::<usize>::new(), |&n| n).is_empty());
    }
}
