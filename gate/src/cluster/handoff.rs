//! Cross-node resume: a session moves to the node its app resumes on.
//!
//! ```text
//! app ── Resume ──▶ node B                    node A (holds the session)
//!                   logic: no session here
//!                   Missing ─▶ Redis HMGET fg:u:{uid} ─▶ (A, epoch)
//!                   Take{uid, epoch} ──────────────────▶ logic: HandOver
//!                                                        session removed, its pushes'
//!                                                        TTLs kept; A's own pushes now
//!                                                        wait on B for their receipts
//!                   ◀──────────────── Handoff{session, pushes, resume secret}
//!                   logic: Install (held), then the parked Resume
//!                   Redis: move fg:u:{uid} from (A, epoch) to (B, epoch)
//! app ◀── Session, redeliveries, queued pushes
//! ```
//!
//! The session keeps its epoch, resume count, sequence numbering and resumption secret, so the
//! app's resume token and secret work on B exactly as on A, and every unacked push is
//! redelivered once with its sequence-id. Every pair still ends in exactly one receipt at the
//! node that accepted it: A's own pushes become pairs A forwarded to B; pushes a third node
//! forwarded to A are rehomed to B (that node is told); pushes B itself had forwarded to A
//! come home and B stops waiting on A for them.
//!
//! Each step is bounded: a take that gets no answer by `TAKE_PATIENCE_MS` (Redis slow, the
//! other node gone) is refused as an unknown session, and the app logs in afresh, which is
//! what a resume on one node does when its session is gone.

use super::{Cluster, ClusterShard, Forward, FORWARD_GRACE_MS};
use crate::state::Shard;
use logic::{Handed, HandedPush, Input, Output, PushContent, LOCAL};
use schema::node::{self, HandedSession, NodeMsg};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// How long a resume waits for its session to come from another node before it is refused.
const TAKE_PATIENCE_MS: u64 = 3_000;

/// Most takes one shard has in progress; past it a resume needing one is refused at once.
const MAX_TAKES: usize = 16_384;

/// Most inputs parked on one take (an app retrying while the first attempt waits).
const MAX_PARKED: usize = 8;

/// A session being fetched from another node for a resume.
#[derive(Debug)]
struct Take {
    epoch: u64,
    /// The inputs to feed again once the session is here (`Resume`, `ResumeSecret`).
    parked: Vec<Input>,
    deadline_ms: u64,
}

/// How long a node remembers where a session it handed over went: the taker's move of the
/// directory entry lands within a round trip; this covers a slow Redis too.
const MOVED_MEMORY_MS: u64 = 10_000;

/// Most sessions remembered as handed over per shard (the oldest go first).
const MAX_MOVED: usize = 65_536;

/// Sessions this shard handed over lately: uid → (node, until).
#[derive(Debug, Default)]
pub struct Moved {
    by_uid: HashMap<u64, (logic::Origin, u64)>,
    order: std::collections::VecDeque<(u64, u64)>,
}

impl Moved {
    fn insert(&mut self, uid: u64, to: logic::Origin, now: u64) {
        while self.order.len() >= MAX_MOVED || self.order.front().is_some_and(|f| f.1 <= now) {
            let Some((old, until)) = self.order.pop_front() else { break };
            if self.by_uid.get(&old).is_some_and(|e| e.1 == until) {
                self.by_uid.remove(&old);
            }
        }
        let until = now + MOVED_MEMORY_MS;
        self.by_uid.insert(uid, (to, until));
        self.order.push_back((uid, until));
    }

    /// Where `uid`'s session went, if it left lately.
    pub fn get(&self, uid: u64, now: u64) -> Option<logic::Origin> {
        self.by_uid.get(&uid).filter(|e| e.1 > now).map(|e| e.0)
    }

    fn forget(&mut self, uid: u64) {
        self.by_uid.remove(&uid);
    }
}

/// A shard's takes in progress.
#[derive(Debug, Default)]
pub struct Takes {
    by_uid: HashMap<u64, Take>,
    /// Directory lookups of takes: tag → uid.
    by_tag: HashMap<u64, u64>,
    by_deadline: BTreeSet<(u64, u64)>,
}

impl Takes {
    /// The earliest deadline of a take.
    pub fn next_deadline(&self) -> Option<u64> {
        self.by_deadline.first().map(|d| d.0)
    }

    fn remove(&mut self, uid: u64) -> Option<Take> {
        let t = self.by_uid.remove(&uid)?;
        self.by_deadline.remove(&(t.deadline_ms, uid));
        Some(t)
    }
}

fn parts(shard: &mut Shard) -> Option<(Arc<Cluster>, &mut ClusterShard)> {
    let c = shard.cluster.clone()?;
    Some((c, shard.cluster_shard.as_mut()?))
}

/// The logic shard has no session for a resume: ask the node the directory names for it.
pub fn missing(shard: &mut Shard, uid: u64, epoch: u64, retry: Input, now: u64) {
    let id = shard.id;
    let Some((c, cs)) = parts(shard) else { return refuse(shard, retry, now, Refusal::NoSession) };
    if let Some(t) = cs.takes.by_uid.get_mut(&uid) {
        if t.epoch == epoch && t.parked.len() < MAX_PARKED {
            t.parked.push(retry);
            return;
        }
        return refuse(shard, retry, now, Refusal::NoSession);
    }
    if !c.up.load(Relaxed) || cs.takes.by_uid.len() >= MAX_TAKES {
        c.stats.takes_refused.fetch_add(1, Relaxed);
        tracing::info!(
            uid,
            epoch,
            "resume of a session not on this node refused: directory unavailable or busy"
        );
        return refuse(shard, retry, now, Refusal::DirectoryUnavailable);
    }
    let tag = cs.new_tag(id);
    cs.cmds.push(super::Cmd::Lookup { uids: vec![uid], tag });
    let deadline_ms = now + TAKE_PATIENCE_MS;
    cs.takes.by_tag.insert(tag, uid);
    cs.takes.by_deadline.insert((deadline_ms, uid));
    cs.takes.by_uid.insert(uid, Take { epoch, parked: vec![retry], deadline_ms });
}

/// A directory lookup came back; true when it was a take's.
pub fn on_looked(shard: &mut Shard, tag: u64, owners: &[(u64, Option<super::Owner>)], now: u64) -> bool {
    let Some((c, cs)) = parts(shard) else { return false };
    let Some(uid) = cs.takes.by_tag.remove(&tag) else { return false };
    let Some(epoch) = cs.takes.by_uid.get(&uid).map(|t| t.epoch) else { return true };
    let owner = owners.iter().find(|(u, _)| *u == uid).and_then(|(_, o)| o.clone());
    match owner {
        Some(o) if o.node != c.name && o.epoch == epoch && c.is_live(&o.node) => {
            tracing::debug!(uid, epoch, node = %o.node, "resume: asking the node holding the session for it");
            cs.outgoing.push((o.node, NodeMsg::Take { uid, epoch }));
        }
        other => {
            tracing::info!(uid, epoch, directory = ?other, "resume: no live node holds this session");
            finish(shard, uid, now, Refusal::NoSession);
        }
    }
    true
}

/// A take's lookup could not be made; true when the tag was a take's.
pub fn on_lookup_failed(shard: &mut Shard, tag: u64, now: u64) -> bool {
    let Some((_, cs)) = parts(shard) else { return false };
    let Some(uid) = cs.takes.by_tag.remove(&tag) else { return false };
    finish(shard, uid, now, Refusal::DirectoryUnavailable);
    true
}

/// How a take that found no session answers its parked inputs.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// No node has it (or none answered in time): the app logs in afresh.
    NoSession,
    /// The directory could not be asked: the app may retry later.
    DirectoryUnavailable,
}

/// Ends a take: the parked inputs run again if the session is here now, else are refused.
fn finish(shard: &mut Shard, uid: u64, now: u64, why: Refusal) {
    let Some(t) = shard.cluster_shard.as_mut().and_then(|cs| cs.takes.remove(uid)) else { return };
    let here = shard.logic.holds(uid, t.epoch);
    if !here {
        if let Some(c) = &shard.cluster {
            c.stats.takes_refused.fetch_add(1, Relaxed);
        }
    }
    for input in t.parked {
        if here {
            crate::event_loop::logic_input(shard, input, now);
        } else {
            refuse(shard, input, now, why);
        }
    }
}

/// Answers a parked input when no node handed the session over: a resume is refused (the app
/// logs in afresh, or retries later when the directory was unreachable), a secure channel's
/// question gets no secret (its ResumeHello is rejected as an unknown session).
fn refuse(shard: &mut Shard, input: Input, now: u64, why: Refusal) {
    let why = match why {
        Refusal::NoSession => logic::directory::ResumeRefused::NoSession,
        Refusal::DirectoryUnavailable => logic::directory::ResumeRefused::DirectoryUnavailable,
    };
    let o = match input {
        Input::Resume { conn, log_id, seq, .. } => Output::ResumeRefused { conn, log_id, seq, why },
        Input::ResumeSecret { conn, .. } => Output::ResumeSecret { conn, secret: None },
        other => {
            debug_assert!(false, "only resumes are parked: {other:?}");
            return;
        }
    };
    crate::event_loop::apply(shard, o, now);
}

/// Another node asks for a session of this node.
pub fn on_take(shard: &mut Shard, from: &str, uid: u64, epoch: u64, now: u64) {
    let Some(c) = shard.cluster.clone() else { return };
    let to = c.origin(from);
    crate::event_loop::logic_input(shard, Input::HandOver { uid, epoch, to }, now);
}

/// The logic shard gave up a session for node `to`: send it there, and keep owing the receipts
/// of this node's own pushes in it, now as pairs forwarded to `to`.
pub fn handed_over(shard: &mut Shard, uid: u64, to: logic::Origin, h: Handed, now: u64) {
    let Some((c, cs)) = parts(shard) else { return };
    let Some(node) = c.origin_name(to) else { return };
    let mut pushes = Vec::with_capacity(h.pushes.len());
    let mut size = 256;
    let mut over = Vec::new();
    for p in h.pushes {
        let origin = if p.push.origin == LOCAL {
            c.name.clone()
        } else {
            c.origin_name(p.push.origin).unwrap_or_default()
        };
        // A session's queue is bounded by its push queue bytes; the message bound is larger
        // still, but a configuration could make them meet: what does not fit ends here.
        size += 40 + origin.len() + p.push.body.len();
        if size > node::MAX_MESSAGE {
            over.push(p);
            continue;
        }
        if p.push.origin == LOCAL {
            let deadline_ms = now + p.ttl_left_ms + FORWARD_GRACE_MS;
            let key = (p.push.message_id, uid);
            cs.forwards.insert(key, Forward { node: to, origin: LOCAL, deadline_ms, log_id: p.push.log_id });
            cs.by_deadline.insert((deadline_ms, key.0, key.1));
        }
        pushes.push(node::HandedPush {
            seq: p.seq,
            message_id: p.push.message_id,
            log_id: p.push.log_id,
            ttl_left_ms: p.ttl_left_ms.min(u32::MAX as u64) as u32,
            sent: p.sent,
            origin,
            body: p.push.body.to_vec(),
        });
    }
    cs.moved.insert(uid, to, now);
    c.stats.moved_out.fetch_add(1, Relaxed);
    tracing::info!(uid, epoch = h.epoch, node = %node, pushes = pushes.len(), "session handed over to the node its app resumed on");
    let msg = HandedSession {
        uid,
        epoch: h.epoch,
        role: h.role,
        resumes: h.resumes,
        resume_secret: h.resume_secret,
        hold_left_ms: h.hold_left_ms.min(u32::MAX as u64) as u32,
        last_seq: h.last_seq,
        pushes,
    };
    cs.outgoing.push((node, NodeMsg::Handoff(Box::new(msg))));
    for p in over {
        let r = logic::Receipt::of(&p.push, uid, logic::push::outcome::QUEUE_FULL);
        super::receipt(shard, r, now);
    }
}

/// The logic shard does not hold what node `to` asked for.
pub fn not_here(shard: &mut Shard, uid: u64, epoch: u64, to: logic::Origin) {
    let Some((c, cs)) = parts(shard) else { return };
    if let Some(node) = c.origin_name(to) {
        cs.outgoing.push((node, NodeMsg::NotHere { uid, epoch }));
    }
}

/// A session came from node `from` (asked for by a resume here, or sent by a draining node).
pub fn on_handoff(shard: &mut Shard, from: &str, h: HandedSession, now: u64) {
    let id = shard.id;
    let Some((c, cs)) = parts(shard) else { return };
    let uid = h.uid;
    let mut pushes = Vec::with_capacity(h.pushes.len());
    let mut rehomed: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for p in h.pushes {
        let origin = if p.origin == c.name {
            // A push this node forwarded comes home: stop waiting on the other node for it.
            if let Some(f) = cs.forwards.remove(&(p.message_id, uid)) {
                cs.by_deadline.remove(&(f.deadline_ms, p.message_id, uid));
            }
            LOCAL
        } else {
            if p.origin != from {
                // A third node forwarded it to `from`: its receipt now comes from here.
                rehomed.entry(p.origin.clone()).or_default().push((p.message_id, uid));
            }
            c.origin(&p.origin)
        };
        // The time it had left to its deadline, from now on this node's clock.
        let deadline_ms = now + p.ttl_left_ms as u64;
        let push = Arc::new(PushContent {
            message_id: p.message_id,
            body: Arc::from(p.body),
            log_id: p.log_id,
            deadline_ms,
            origin,
            accepted_us: 0,
        });
        pushes.push(HandedPush { seq: p.seq, push, ttl_left_ms: p.ttl_left_ms as u64, sent: p.sent });
    }
    for (node, pairs) in rehomed {
        for pairs in pairs.chunks(node::MAX_RECEIPTS) {
            cs.outgoing.push((node.clone(), NodeMsg::Rehomed(pairs.to_vec())));
        }
    }
    cs.moved.forget(uid);
    let tag = cs.new_tag(id);
    let from_owner = super::Owner { node: from.to_owned(), epoch: h.epoch, shard: 0 };
    cs.cmds.push(super::Cmd::Move { uid, from: from_owner, new_epoch: h.epoch, shard: id, tag });
    c.stats.moved_in.fetch_add(1, Relaxed);
    tracing::info!(uid, epoch = h.epoch, node = %from, pushes = pushes.len(), "session taken over from another node");
    let session = Box::new(Handed {
        role: h.role,
        epoch: h.epoch,
        resumes: h.resumes,
        resume_secret: h.resume_secret,
        hold_left_ms: h.hold_left_ms as u64,
        last_seq: h.last_seq,
        pushes,
    });
    crate::event_loop::logic_input(shard, Input::Install { uid, session }, now);
    finish(shard, uid, now, Refusal::NoSession);
}

/// The node asked has no such session.
pub fn on_not_here(shard: &mut Shard, uid: u64, epoch: u64, now: u64) {
    let ours = shard
        .cluster_shard
        .as_ref()
        .and_then(|cs| cs.takes.by_uid.get(&uid))
        .is_some_and(|t| t.epoch == epoch);
    if ours {
        finish(shard, uid, now, Refusal::NoSession);
    }
}

/// Node `from` now holds sessions this node had forwarded pushes to elsewhere.
pub fn on_rehomed(shard: &mut Shard, from: &str, pairs: Vec<(u64, u64)>) {
    let Some((c, cs)) = parts(shard) else { return };
    let node = c.origin(from);
    for key in pairs {
        if let Some(f) = cs.forwards.get_mut(&key) {
            f.node = node;
        }
    }
}

/// The directory's move of a taken-over session came back. Lost: a newer session exists
/// elsewhere (this one ends as displaced), or the entry went away (claimed again).
pub fn on_moved(shard: &mut Shard, uid: u64, ok: bool, current: Option<super::Owner>, now: u64) {
    if ok {
        return;
    }
    let Some(c) = shard.cluster.clone() else { return };
    let Some(epoch) = shard.logic.directory.get(uid).map(|e| e.epoch) else { return };
    match current {
        Some(o) if o.epoch > epoch || (o.epoch == epoch && o.node != c.name) => {
            c.stats.claims_lost.fetch_add(1, Relaxed);
            tracing::info!(uid, epoch, newer = ?o, "session taken over, but the directory holds a newer one");
            crate::event_loop::logic_input(shard, Input::Superseded { uid, epoch }, now);
        }
        _ => super::claim(shard, uid, epoch),
    }
}

/// Takes past their deadline are refused (at most 4,096 per call).
pub fn expire(shard: &mut Shard, now: u64) {
    let Some(cs) = shard.cluster_shard.as_ref() else { return };
    let due: Vec<u64> =
        cs.takes.by_deadline.iter().take_while(|d| d.0 <= now).take(4096).map(|d| d.1).collect();
    for uid in due {
        tracing::info!(uid, "resume: the session did not come from the other node in time");
        finish(shard, uid, now, Refusal::NoSession);
    }
}

/// The live nodes sessions move to when this node drains, sorted by name: (name, app address).
pub fn drain_targets(shard: &Shard) -> Vec<(String, String)> {
    let Some(c) = &shard.cluster else { return Vec::new() };
    if !c.up.load(Relaxed) {
        // No directory: the other nodes could not take the sessions over.
        return Vec::new();
    }
    let live = c.live.read().unwrap_or_else(|p| p.into_inner());
    let mut to: Vec<(String, String)> =
        live.values().filter(|n| n.name != c.name).map(|n| (n.name.clone(), n.app_addr.clone())).collect();
    to.sort();
    to
}

/// Draining: hands every session of this shard to the node its app was told to resume on (the
/// same choice by uid as the go-away's), held there until the app comes back.
pub fn drain(shard: &mut Shard, now: u64) {
    let Some(c) = shard.cluster.clone() else { return };
    if shard.drain_to.is_empty() {
        return;
    }
    let sessions = shard.logic.sessions();
    tracing::info!(
        shard = shard.id,
        sessions = sessions.len(),
        nodes = shard.drain_to.len(),
        "draining: sessions move to the other nodes"
    );
    for (uid, epoch) in sessions {
        let n = shard.drain_to.len() as u64;
        let to = c.origin(&shard.drain_to[(uid % n) as usize].0);
        crate::event_loop::logic_input(shard, Input::HandOver { uid, epoch, to }, now);
    }
}
