//! Cluster mode: several gate nodes sharing a session directory in Redis (`cluster.redis`).
//!
//! Redis is reached through the `cluster` crate: fred on one thread of its own with a small
//! tokio runtime (fred's glommio support panics when a timeout is set, and a shard must never
//! wait on Redis). Shards hand it commands in one batch per turn; what it hears comes back as
//! [`Note`]s in the shards' mesh inboxes, one batch and one wake-up per destination.
//!
//! - **Directory.** Every login is claimed (`uid → node, epoch, shard`, compare-and-set on the
//!   epoch in a script) and every ended session released; a claim that loses, or word from the
//!   node whose claim replaced ours, ends the local session as displaced. After a Redis outage
//!   the node claims all its sessions again.
//! - **Pushes across nodes.** A push for a uid with no session here is looked up in Redis and
//!   forwarded, sealed ([`link`]), over Redis sharded pub/sub to the node holding it; that node's
//!   receipts come back the same way. This node owes the receipt meanwhile: a node that is lost
//!   (its lease lapses) or never answers ends its pairs `NodeLost`, a directory that cannot be
//!   asked `DirectoryUnavailable`, so every pair still ends in exactly one receipt.
//!
//! Why pub/sub through the Redis the nodes already share rather than node-to-node connections:
//! one connection per node instead of a mesh of them, no second port to secure and open, and a
//! node's channel moves with it; it costs one more hop (about 0.1 ms on a LAN) and delivery is
//! not guaranteed, which the receipt deadline covers.

pub mod handoff;
pub mod link;
pub mod relay;

use crate::mesh::{Batch, Mesh, Msg};
use crate::state::Shard;
use logic::{Input, Origin, PushContent, Receipt, LOCAL};
use schema::node::{NodeMsg, NodeReceipt};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

pub use cluster::{Cmd, Event, NodeInfo, Owner};

/// What the Redis thread tells a shard.
#[derive(Debug)]
pub enum Note {
    /// A claim of this shard's logic came back.
    Claimed {
        /// The user.
        uid: u64,
        /// The claimed session.
        epoch: u64,
        /// The claim took the entry.
        won: bool,
        /// The owner it replaced (won) or the newer owner that stays (lost).
        previous: Option<Owner>,
    },
    /// Where the targets of a lookup are.
    Looked {
        /// The lookup.
        tag: u64,
        /// Each target and its owner, if any.
        owners: Vec<(u64, Option<Owner>)>,
    },
    /// A lookup could not be made (Redis unreachable or slow).
    LookupFailed {
        /// The lookup.
        tag: u64,
    },
    /// Redis is back after an outage: claim every session again.
    Reclaim,
    /// The live nodes changed: pairs forwarded to a node that left end `NodeLost`.
    NodesChanged,
    /// Another node forwards a push to sessions held here (all on this shard).
    Push {
        /// The push, its origin set to the sending node.
        push: Arc<PushContent>,
        /// The targets.
        uids: Vec<u64>,
    },
    /// Receipts of pushes this shard forwarded.
    Receipts(Vec<NodeReceipt>),
    /// A newer session of `uid` elsewhere replaced the local one of `epoch`.
    Superseded {
        /// The user.
        uid: u64,
        /// The local session's epoch.
        epoch: u64,
    },
    /// Node `from` asks for the session of `uid` of `epoch` (its app resumes there).
    Take {
        /// The asking node.
        from: String,
        /// The user.
        uid: u64,
        /// The session's epoch.
        epoch: u64,
    },
    /// Node `from` handed a session over.
    Handoff {
        /// The node it comes from.
        from: String,
        /// The session.
        session: Box<schema::node::HandedSession>,
    },
    /// The node asked for a session does not hold it.
    NotHere {
        /// The user.
        uid: u64,
        /// The epoch asked for.
        epoch: u64,
    },
    /// Node `from` now holds sessions this node's forwarded pairs wait on.
    Rehomed {
        /// The node.
        from: String,
        /// (message id, uid) pairs.
        pairs: Vec<(u64, u64)>,
    },
    /// The directory's move of a session taken over came back.
    Moved {
        /// The user.
        uid: u64,
        /// The move applied.
        ok: bool,
        /// The entry as it stands.
        current: Option<Owner>,
    },
    /// The relay's: GPS, requests, unreachable events and EndSession between nodes.
    Relay(relay::Note),
}

/// What every shard shares about the cluster.
pub struct Cluster {
    /// This node's name.
    pub name: String,
    /// The Redis thread.
    pub handle: cluster::Handle,
    /// Seals this node's messages.
    pub sealer: link::Sealer,
    /// The lease: how long a stopped node takes to be taken for lost.
    pub lease_ms: u64,
    /// Live nodes by name, from the Redis thread's `Nodes`.
    pub live: RwLock<HashMap<String, NodeInfo>>,
    /// Node names by origin id (id = index + 1) and back.
    origins: Mutex<(Vec<String>, HashMap<String, Origin>)>,
    /// Redis reachable (for /healthz).
    pub up: AtomicBool,
    /// Counters for /metrics.
    pub stats: Stats,
    /// What the relay shares: the advertisement and its counters.
    pub relay: relay::Shared,
}

/// Cluster counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Push targets forwarded to another node.
    pub forwarded: AtomicU64,
    /// Push targets received from other nodes.
    pub received: AtomicU64,
    /// Messages from other nodes refused (forged, replayed, malformed).
    pub refused: AtomicU64,
    /// Claims this node lost (a newer session elsewhere).
    pub claims_lost: AtomicU64,
    /// Commands that could not run (Redis down, queue full).
    pub unavailable: AtomicU64,
    /// Sessions taken over from other nodes (their apps resumed here).
    pub moved_in: AtomicU64,
    /// Sessions handed over to other nodes.
    pub moved_out: AtomicU64,
    /// Resumes of sessions not on this node that no node could hand over.
    pub takes_refused: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Cluster {
    /// The origin id of node `name` (interned; ids are never reused).
    pub fn origin(&self, name: &str) -> Origin {
        let mut o = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = o.1.get(name) {
            return id;
        }
        o.0.push(name.to_owned());
        let id = o.0.len() as Origin;
        o.1.insert(name.to_owned(), id);
        id
    }

    /// The node name of origin `id`.
    pub fn origin_name(&self, id: Origin) -> Option<String> {
        let o = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        o.0.get((id as usize).checked_sub(1)?).cloned()
    }

    /// True while `node` holds a lease.
    pub fn is_live(&self, node: &str) -> bool {
        self.live.read().unwrap_or_else(|p| p.into_inner()).contains_key(node)
    }

    /// Starts the Redis thread for node `me`; what it hears goes to the shards' inboxes.
    pub fn start(
        cfg: cluster::Config,
        me: NodeInfo,
        secret: &[u8],
        mesh: Arc<Mesh>,
    ) -> Result<Arc<Cluster>, cluster::Error> {
        let lease_ms = cfg.lease_ms;
        let name = me.name.clone();
        let relay = relay::Shared::new(&me);
        let sealer = link::Sealer::new(secret, &me.name, me.incarnation);
        // The sink runs on the Redis thread and needs the cluster it belongs to, which needs the
        // handle the sink is given to: it is set once, right after start.
        let slot: Arc<std::sync::OnceLock<Arc<Cluster>>> = Arc::new(std::sync::OnceLock::new());
        let router =
            Router { mesh, opener: link::Opener::new(secret), cluster: slot.clone(), early: Vec::new() };
        // Called on the Redis thread only: the lock is never contended.
        let router = Mutex::new(router);
        let sink: cluster::Sink =
            Box::new(move |events| router.lock().unwrap_or_else(|p| p.into_inner()).route(events));
        let handle = cluster::Handle::start(cfg, me, sink)?;
        let c = Arc::new(Cluster {
            name,
            handle,
            sealer,
            lease_ms,
            live: RwLock::new(HashMap::new()),
            origins: Mutex::new((Vec::new(), HashMap::new())),
            up: AtomicBool::new(false),
            stats: Stats::default(),
            relay,
        });
        let _ = slot.set(c.clone());
        Ok(c)
    }
}

/// Routes what the Redis thread hears to the shards (runs on that thread).
struct Router {
    mesh: Arc<Mesh>,
    opener: link::Opener,
    cluster: Arc<std::sync::OnceLock<Arc<Cluster>>>,
    /// Events that came before the cluster was set (the first status, at most a few).
    early: Vec<Event>,
}

/// Longest the Redis thread waits on a full shard inbox before giving up on a batch (it is
/// counted and logged; a shard that full is stuck anyway).
const INBOX_PATIENCE_MS: u64 = 1_000;

impl Router {
    fn route(&mut self, events: Vec<Event>) {
        let Some(c) = self.cluster.get().cloned() else {
            self.early.extend(events);
            return;
        };
        let mut events = events;
        if !self.early.is_empty() {
            let mut all = std::mem::take(&mut self.early);
            all.append(&mut events);
            events = all;
        }
        let shards = self.mesh.len();
        let mut per: Vec<Vec<Msg>> = (0..shards).map(|_| Vec::new()).collect();
        let by_uid = |uid: u64| logic::shard_of(uid, shards);
        for e in events {
            match e {
                Event::Claimed { uid, epoch, won, previous } => {
                    per[by_uid(uid)].push(Msg::Cluster(Note::Claimed { uid, epoch, won, previous }))
                }
                Event::Looked { tag, owners } => {
                    per[tag_shard(tag, shards)].push(Msg::Cluster(Note::Looked { tag, owners }))
                }
                Event::Unavailable { tag, uid, why, .. } => {
                    c.stats.unavailable.fetch_add(1, Relaxed);
                    match tag {
                        Some(tag) => {
                            per[tag_shard(tag, shards)].push(Msg::Cluster(Note::LookupFailed { tag }))
                        }
                        // A claim or release that could not run: the reclaim after the outage
                        // (or the session's end) sets the directory right.
                        None => tracing::warn!(uid, %why, "directory write failed"),
                    }
                }
                Event::Moved { uid, ok, current, .. } => {
                    per[by_uid(uid)].push(Msg::Cluster(Note::Moved { uid, ok, current }))
                }
                Event::Status { up, reregister, detail } => {
                    c.up.store(up, Relaxed);
                    if up {
                        tracing::info!(%detail, reregister, "directory (Redis) reachable");
                    } else {
                        tracing::warn!(%detail, "directory (Redis) unreachable: local sessions go on; cross-node pushes and resumes fail fast");
                    }
                    if reregister {
                        for p in per.iter_mut() {
                            p.push(Msg::Cluster(Note::Reclaim));
                        }
                    }
                }
                Event::Nodes(nodes) => {
                    let changed = {
                        let mut live = c.live.write().unwrap_or_else(|p| p.into_inner());
                        let before: BTreeSet<String> = live.keys().cloned().collect();
                        *live = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
                        before != live.keys().cloned().collect::<BTreeSet<String>>()
                    };
                    if changed {
                        for p in per.iter_mut() {
                            p.push(Msg::Cluster(Note::NodesChanged));
                        }
                    }
                }
                Event::Message(bytes) => match self.opener.open(&bytes) {
                    Err(e) => {
                        c.stats.refused.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, bytes = bytes.len(), "message from another node refused");
                    }
                    Ok((sender, _, NodeMsg::Batch(msgs))) => {
                        for msg in msgs {
                            self.split_node_msg(&c, &sender, msg, &mut per);
                        }
                    }
                    Ok((sender, _, msg)) => self.split_node_msg(&c, &sender, msg, &mut per),
                },
            }
        }
        for (dest, msgs) in per.into_iter().enumerate() {
            if !msgs.is_empty() {
                self.send(dest, msgs);
            }
        }
    }

    /// Splits a node's message by the shard owning each uid.
    fn split_node_msg(&self, c: &Cluster, sender: &str, msg: NodeMsg, per: &mut [Vec<Msg>]) {
        let shards = per.len();
        match msg {
            NodeMsg::Push { message_id, log_id, ttl_ms, body, uids } => {
                c.stats.received.fetch_add(uids.len() as u64, Relaxed);
                let origin = c.origin(sender);
                // The time it had left, from now on this node's clock (the wall-clock deadline
                // in the body stays the app's). Another node's read time is not on this gate's
                // clock: its pushes are not in this gate's delivery histogram.
                let deadline_ms = crate::state::mono_ms() + ttl_ms as u64;
                let push = Arc::new(PushContent {
                    message_id,
                    body: Arc::from(body),
                    log_id,
                    deadline_ms,
                    origin,
                    accepted_us: 0,
                });
                for (s, uids) in logic::split_by_shard(uids, shards, |&u| u).into_iter().enumerate() {
                    if !uids.is_empty() {
                        per[s].push(Msg::Cluster(Note::Push { push: push.clone(), uids }));
                    }
                }
            }
            NodeMsg::Receipts(rs) => {
                for (s, rs) in logic::split_by_shard(rs, shards, |r| r.uid).into_iter().enumerate() {
                    if !rs.is_empty() {
                        per[s].push(Msg::Cluster(Note::Receipts(rs)));
                    }
                }
            }
            NodeMsg::Superseded { uid, epoch } => {
                per[logic::shard_of(uid, shards)].push(Msg::Cluster(Note::Superseded { uid, epoch }))
            }
            NodeMsg::Take { uid, epoch } => per[logic::shard_of(uid, shards)]
                .push(Msg::Cluster(Note::Take { from: sender.to_owned(), uid, epoch })),
            NodeMsg::NotHere { uid, epoch } => {
                per[logic::shard_of(uid, shards)].push(Msg::Cluster(Note::NotHere { uid, epoch }))
            }
            NodeMsg::Handoff(session) => per[logic::shard_of(session.uid, shards)]
                .push(Msg::Cluster(Note::Handoff { from: sender.to_owned(), session })),
            // Opened one level up; the decoder refuses a batch inside a batch.
            NodeMsg::Batch(_) => {}
            NodeMsg::Rehomed(pairs) => {
                for (s, pairs) in logic::split_by_shard(pairs, shards, |p| p.1).into_iter().enumerate() {
                    if !pairs.is_empty() {
                        per[s].push(Msg::Cluster(Note::Rehomed { from: sender.to_owned(), pairs }));
                    }
                }
            }
            msg => relay::split(c, sender, msg, per),
        }
    }

    /// Hands a batch to a shard, waiting (bounded) while its inbox is full.
    fn send(&self, dest: usize, msgs: Vec<Msg>) {
        let mut batch = Batch { sent: Instant::now(), msgs };
        let start = Instant::now();
        loop {
            match self.mesh.try_send(dest, batch) {
                Ok(()) => return,
                Err(b) if start.elapsed().as_millis() < INBOX_PATIENCE_MS as u128 => {
                    batch = b;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(b) => {
                    tracing::error!(
                        shard = dest,
                        messages = b.msgs.len(),
                        "shard inbox full for 1 s: cluster messages dropped"
                    );
                    return;
                }
            }
        }
    }
}

/// `/healthz`'s words in cluster mode: `ok` while Redis answers, else what is degraded.
pub fn health(c: &Cluster) -> String {
    let (up, detail) = c.handle.status();
    let nodes = c.live.read().unwrap_or_else(|p| p.into_inner()).len();
    if up {
        format!("ok\ndirectory: up ({detail}); node {}; {nodes} live nodes\n", c.name)
    } else {
        format!(
            "degraded\ndirectory: down ({detail}); local sessions go on, cross-node pushes end DirectoryUnavailable and resumes of sessions not on this node are told to retry until it returns\n"
        )
    }
}

/// The cluster's lines for `/metrics`.
pub fn render_metrics(c: &Cluster) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let (up, _) = c.handle.status();
    let live = c.live.read().unwrap_or_else(|p| p.into_inner()).len();
    let mut line = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    line("fleetgate_cluster_directory_up", "1 while Redis answers.", "gauge", up as u64);
    line("fleetgate_cluster_live_nodes", "Nodes holding a lease, this one included.", "gauge", live as u64);
    line("fleetgate_cluster_redis_commands_total", "Redis commands issued.", "counter", c.handle.ops());
    let st = &c.stats;
    line(
        "fleetgate_cluster_forwarded_targets_total",
        "Push targets forwarded to the node holding them.",
        "counter",
        st.forwarded.load(Relaxed),
    );
    line(
        "fleetgate_cluster_received_targets_total",
        "Push targets other nodes forwarded here.",
        "counter",
        st.received.load(Relaxed),
    );
    line(
        "fleetgate_cluster_refused_messages_total",
        "Messages from other nodes refused (forged, replayed, malformed).",
        "counter",
        st.refused.load(Relaxed),
    );
    line(
        "fleetgate_cluster_claims_lost_total",
        "Sessions ended because a newer one exists on another node.",
        "counter",
        st.claims_lost.load(Relaxed),
    );
    line(
        "fleetgate_cluster_unavailable_total",
        "Directory commands that failed fast (Redis down or behind).",
        "counter",
        st.unavailable.load(Relaxed),
    );
    line(
        "fleetgate_cluster_sessions_moved_in_total",
        "Sessions taken over from other nodes, their apps resuming here.",
        "counter",
        st.moved_in.load(Relaxed),
    );
    line(
        "fleetgate_cluster_sessions_moved_out_total",
        "Sessions handed over to the nodes their apps resumed on.",
        "counter",
        st.moved_out.load(Relaxed),
    );
    line(
        "fleetgate_cluster_resumes_refused_total",
        "Resumes of sessions not on this node that no live node could hand over.",
        "counter",
        st.takes_refused.load(Relaxed),
    );
    relay::render_metrics(c, &mut s);
    s
}

/// Lookup tags carry the shard that made them in their top 16 bits.
fn tag_shard(tag: u64, shards: usize) -> usize {
    ((tag >> 48) as usize).min(shards.saturating_sub(1))
}

/// A pair (push, target) forwarded to another node, waiting for its receipt.
#[derive(Debug)]
struct Forward {
    /// The node it went to (as an origin id: no name kept per pair).
    node: Origin,
    /// Where its receipt goes: this node's app-server (`LOCAL`), or the node that accepted the
    /// push when this node passed it on (its session had moved).
    origin: Origin,
    deadline_ms: u64,
    log_id: u64,
}

/// How long after the push's deadline a forwarded pair waits for the other node's receipt
/// before it ends NodeLost. That node gets the time left to the deadline, so it expires the
/// pair one hop after the deadline plus the ack grace (`logic::push::ACK_GRACE_MS`, 500 ms),
/// within its timer's 50 ms, and its receipt takes one hop back: 550 ms and two hops, leaving
/// about 200 ms for the hops (a session passed on again adds two more). And the document's
/// promise holds: NodeLost by TTL + 750 + 50 + 2 ms, inside TTL + 1 s (docs/PROTOCOL.md §15).
pub(crate) const FORWARD_GRACE_MS: u64 = 750;

// The ack grace, the other node's timer (50 ms) and at least 100 ms for the two hops must fit
// in the forwarding node's wait, or pairs that other node ends would be reported NodeLost.
const _: () = assert!(logic::push::ACK_GRACE_MS + 50 + 100 <= FORWARD_GRACE_MS);

/// How long a lookup may wait for Redis before its targets end DirectoryUnavailable: the Redis
/// thread answers every lookup (its command timeout is 500 ms), so this only catches an answer
/// lost on the way to a stuck shard.
const LOOKUP_PATIENCE_MS: u64 = 5_000;

/// A shard's side of the cluster: what it owes and what it has to send.
#[derive(Debug, Default)]
pub struct ClusterShard {
    /// Commands for the Redis thread, sent at the end of the turn.
    cmds: Vec<Cmd>,
    /// Lookups waiting for Redis: the push, its targets, and when to give up on the answer.
    lookups: HashMap<u64, (Arc<PushContent>, Vec<u64>, u64)>,
    /// Targets of `lookups`, all together (they count as pushes in flight).
    lookup_pairs: usize,
    /// The same by deadline: (deadline ms, tag).
    lookups_by_deadline: BTreeSet<(u64, u64)>,
    next_tag: u64,
    /// Pairs forwarded, by (message id, uid).
    forwards: HashMap<(u64, u64), Forward>,
    /// The same by deadline.
    by_deadline: BTreeSet<(u64, u64, u64)>,
    /// Receipts for other nodes, by origin.
    receipts: HashMap<Origin, Vec<NodeReceipt>>,
    /// Messages for other nodes: (node, message).
    outgoing: Vec<(String, NodeMsg)>,
    /// Sessions being fetched from other nodes for resumes.
    takes: handoff::Takes,
    /// Sessions recently handed over, by uid: where to, until when. The directory names this
    /// node until the taker's move is written, so a push looked up meanwhile would otherwise
    /// find nobody here.
    moved: handoff::Moved,
}

/// Most pairs one shard keeps waiting on other nodes; past it new targets end `NodeLost` at once
/// (a bound on memory when another node stops answering).
const MAX_FORWARDS: usize = 1 << 20;

impl ClusterShard {
    /// The earliest deadline of a forwarded pair or a lookup.
    pub fn next_deadline(&self) -> Option<u64> {
        let forward = self.by_deadline.first().map(|d| d.0);
        let lookup = self.lookups_by_deadline.first().map(|d| d.0);
        forward.into_iter().chain(lookup).chain(self.takes.next_deadline()).min()
    }

    /// A new lookup tag: the shard that made it in the top 16 bits, so its answer comes back
    /// here.
    fn new_tag(&mut self, shard: u16) -> u64 {
        self.next_tag += 1;
        ((shard as u64) << 48) | (self.next_tag & ((1 << 48) - 1))
    }

    /// Takes a lookup's push and targets, once.
    fn take_lookup(&mut self, tag: u64) -> Option<(Arc<PushContent>, Vec<u64>)> {
        let (push, uids, deadline) = self.lookups.remove(&tag)?;
        self.lookups_by_deadline.remove(&(deadline, tag));
        self.lookup_pairs -= uids.len();
        Some((push, uids))
    }

    /// Pairs this shard owes a receipt for while it waits on the directory or another node.
    pub fn pairs_waiting(&self) -> usize {
        self.forwards.len() + self.lookup_pairs
    }
}

/// True while pairs this shard forwarded wait on other nodes' receipts (shutdown waits for
/// them, bounded, after a drain moved sessions away).
pub fn forwards_waiting(shard: &Shard) -> bool {
    shard.cluster_shard.as_ref().is_some_and(|cs| !cs.forwards.is_empty())
}

/// A logic shard's `Claim`.
pub fn claim(shard: &mut Shard, uid: u64, epoch: u64) {
    let id = shard.id;
    if let Some(cs) = shard.cluster_shard.as_mut() {
        cs.cmds.push(Cmd::Claim { uid, epoch, shard: id });
    }
}

/// A logic shard's `Release`.
pub fn release(shard: &mut Shard, uid: u64, epoch: u64) {
    if let Some(cs) = shard.cluster_shard.as_mut() {
        cs.cmds.push(Cmd::Release { uid, epoch });
    }
}

/// A logic shard's `Elsewhere`: ask Redis where these targets are. The push is this node's, or
/// one another node forwarded for a session that has moved on since: it is passed on, and its
/// receipts go back the way it came.
pub fn elsewhere(shard: &mut Shard, push: Arc<PushContent>, uids: Vec<u64>, now: u64) {
    let id = shard.id;
    let Some(cs) = shard.cluster_shard.as_mut() else {
        // Not clustered: nothing is elsewhere.
        for uid in uids {
            receipt(shard, Receipt::of(&push, uid, logic::push::outcome::OFFLINE), now);
        }
        return;
    };
    let tag = cs.new_tag(id);
    cs.cmds.push(Cmd::Lookup { uids: uids.clone(), tag });
    let deadline = now + LOOKUP_PATIENCE_MS;
    cs.lookup_pairs += uids.len();
    cs.lookups.insert(tag, (push, uids, deadline));
    cs.lookups_by_deadline.insert((deadline, tag));
}

/// A receipt the logic shard produced: this node's go to its app-server, another node's are
/// gathered and sent back to it at the end of the turn.
pub fn receipt(shard: &mut Shard, r: Receipt, now: u64) {
    if r.origin == LOCAL {
        return crate::sidecar::receipt(shard, r, now);
    }
    let Some(cs) = shard.cluster_shard.as_mut() else { return };
    let nr = NodeReceipt { message_id: r.message_id, uid: r.uid, outcome: r.outcome, log_id: r.log_id };
    cs.receipts.entry(r.origin).or_default().push(nr);
}

/// Ends the pair with `outcome` here: the receipt goes to the push's origin.
fn end_here(shard: &mut Shard, push: &PushContent, uid: u64, outcome: u8, now: u64) {
    receipt(shard, Receipt::of(push, uid, outcome), now);
}

/// A note from the Redis thread.
pub fn on_note(shard: &mut Shard, note: Note, now: u64) {
    use logic::push::outcome::{DIRECTORY_UNAVAILABLE, NODE_LOST, OFFLINE};
    let Some(c) = shard.cluster.clone() else { return };
    match note {
        Note::Claimed { uid, epoch, won, previous } => {
            if !won {
                c.stats.claims_lost.fetch_add(1, Relaxed);
                tracing::info!(uid, epoch, newer = ?previous, "session displaced: the directory holds a newer session elsewhere");
                crate::event_loop::logic_input(shard, Input::Superseded { uid, epoch }, now);
            } else if let Some(p) = previous.filter(|p| p.node != c.name && c.is_live(&p.node)) {
                // That node's session is older: tell it to let go.
                if let Some(cs) = shard.cluster_shard.as_mut() {
                    cs.outgoing.push((p.node, NodeMsg::Superseded { uid, epoch: p.epoch }));
                }
            }
        }
        Note::Looked { tag, owners } => {
            if handoff::on_looked(shard, tag, &owners, now) {
                return;
            }
            if relay::on_looked(shard, tag, &owners) {
                return;
            }
            let Some((push, _)) = shard.cluster_shard.as_mut().and_then(|cs| cs.take_lookup(tag)) else {
                return;
            };
            let mut to: HashMap<String, Vec<u64>> = HashMap::new();
            for (uid, owner) in owners {
                // Handed over a moment ago, before the directory says so: follow the session.
                let owner = match owner {
                    Some(o) if o.node != c.name => Some(o),
                    other => shard
                        .cluster_shard
                        .as_ref()
                        .and_then(|cs| cs.moved.get(uid, now))
                        .and_then(|to| c.origin_name(to))
                        .map(|node| Owner { node, epoch: 0, shard: 0 })
                        .or(other),
                };
                match owner {
                    Some(o) if o.node != c.name && c.is_live(&o.node) => {
                        to.entry(o.node).or_default().push(uid)
                    }
                    Some(o) if o.node != c.name => end_here(shard, &push, uid, NODE_LOST, now),
                    // Nowhere (or the directory names this node, which has no session for it).
                    _ => end_here(shard, &push, uid, OFFLINE, now),
                }
            }
            // Counted from the push's own deadline, however long the lookup took.
            let deadline_ms = push.deadline_ms + FORWARD_GRACE_MS;
            for (node, uids) in to {
                let origin = c.origin(&node);
                let Some(cs) = shard.cluster_shard.as_mut() else { return };
                let mut kept = Vec::with_capacity(uids.len());
                let mut over = Vec::new();
                for uid in uids {
                    if cs.forwards.len() >= MAX_FORWARDS {
                        over.push(uid);
                        continue;
                    }
                    let key = (push.message_id, uid);
                    if cs.forwards.contains_key(&key) {
                        // The same pair twice (a message id reused): one receipt, already owed.
                        continue;
                    }
                    cs.forwards.insert(
                        key,
                        Forward { node: origin, origin: push.origin, deadline_ms, log_id: push.log_id },
                    );
                    cs.by_deadline.insert((deadline_ms, push.message_id, uid));
                    kept.push(uid);
                }
                c.stats.forwarded.fetch_add(kept.len() as u64, Relaxed);
                tracing::debug!(log_id = push.log_id, message_id = push.message_id, node = %node, targets = kept.len(), "push forwarded to the node holding its targets");
                // Several messages when the targets would not fit one.
                for uids in kept.chunks(schema::node::MAX_PUSH_UIDS) {
                    let msg = NodeMsg::Push {
                        message_id: push.message_id,
                        log_id: push.log_id,
                        // The time left, not the TTL: the other node counts it from its arrival,
                        // so its expiry follows this one by a hop, not by the lookup's wait.
                        ttl_ms: push.deadline_ms.saturating_sub(now).min(u32::MAX as u64) as u32,
                        body: push.body.to_vec(),
                        uids: uids.to_vec(),
                    };
                    cs.outgoing.push((node.clone(), msg));
                }
                for uid in over {
                    end_here(shard, &push, uid, NODE_LOST, now);
                }
            }
        }
        Note::LookupFailed { tag } => {
            if handoff::on_lookup_failed(shard, tag, now) {
                return;
            }
            if relay::on_lookup_failed(shard, tag, now) {
                return;
            }
            if let Some((push, uids)) = shard.cluster_shard.as_mut().and_then(|cs| cs.take_lookup(tag)) {
                tracing::warn!(
                    log_id = push.log_id,
                    message_id = push.message_id,
                    targets = uids.len(),
                    "directory unreachable: push targets not on this node end DirectoryUnavailable"
                );
                for uid in uids {
                    end_here(shard, &push, uid, DIRECTORY_UNAVAILABLE, now);
                }
            }
        }
        Note::Reclaim => crate::event_loop::logic_input(shard, Input::Reclaim, now),
        Note::NodesChanged => {
            let lost: Vec<(u64, u64)> = match shard.cluster_shard.as_ref() {
                Some(cs) => {
                    // The nodes pairs wait on are few: look each up once.
                    let nodes: BTreeSet<Origin> = cs.forwards.values().map(|f| f.node).collect();
                    let gone: BTreeSet<Origin> = nodes
                        .into_iter()
                        .filter(|&o| c.origin_name(o).is_none_or(|name| !c.is_live(&name)))
                        .collect();
                    cs.forwards.iter().filter(|(_, f)| gone.contains(&f.node)).map(|(k, _)| *k).collect()
                }
                None => Vec::new(),
            };
            for (message_id, uid) in lost {
                end_forward(shard, message_id, uid, NODE_LOST, now);
            }
            relay::nodes_changed(shard, now);
        }
        Note::Push { push, uids } => crate::event_loop::logic_input(shard, Input::Push { push, uids }, now),
        Note::Receipts(rs) => {
            for r in rs {
                end_forward(shard, r.message_id, r.uid, r.outcome, now);
            }
        }
        Note::Superseded { uid, epoch } => {
            crate::event_loop::logic_input(shard, Input::Superseded { uid, epoch }, now)
        }
        Note::Take { from, uid, epoch } => handoff::on_take(shard, &from, uid, epoch, now),
        Note::Handoff { from, session } => handoff::on_handoff(shard, &from, *session, now),
        Note::NotHere { uid, epoch } => handoff::on_not_here(shard, uid, epoch, now),
        Note::Rehomed { from, pairs } => handoff::on_rehomed(shard, &from, pairs),
        Note::Moved { uid, ok, current } => handoff::on_moved(shard, uid, ok, current, now),
        Note::Relay(n) => relay::on_note(shard, n, now),
    }
}

/// Room kept in a batch for its own framing and the envelope.
const BATCH_ROOM: usize = schema::node::MAX_MESSAGE - 4096;

/// Groups messages for one node into batches that each fit one node message.
fn batches(msgs: Vec<NodeMsg>) -> Vec<Vec<NodeMsg>> {
    let mut out: Vec<Vec<NodeMsg>> = Vec::new();
    let mut size = 0;
    for m in msgs {
        let len = 4 + m.encoded_len();
        match out.last_mut() {
            Some(b) if size + len <= BATCH_ROOM => {
                size += len;
                b.push(m);
            }
            _ => {
                size = len;
                out.push(vec![m]);
            }
        }
    }
    out
}

/// A forwarded pair ends: its receipt goes to this node's app-server (or back to the node this
/// node passed the push on for), once.
fn end_forward(shard: &mut Shard, message_id: u64, uid: u64, outcome: u8, now: u64) {
    let Some(cs) = shard.cluster_shard.as_mut() else { return };
    let Some(f) = cs.forwards.remove(&(message_id, uid)) else {
        // Already ended (a receipt after the deadline, or twice): the app-server had its one.
        return;
    };
    cs.by_deadline.remove(&(f.deadline_ms, message_id, uid));
    receipt(
        shard,
        Receipt { message_id, uid, outcome, log_id: f.log_id, origin: f.origin, acked_us: 0 },
        now,
    );
}

/// Pairs whose other node never answered by their deadline end `NodeLost`, and lookups Redis
/// never answered end `DirectoryUnavailable` (at most 4,096 of each per call).
pub fn expire(shard: &mut Shard, now: u64) {
    let Some(cs) = shard.cluster_shard.as_ref() else { return };
    let due: Vec<(u64, u64)> =
        cs.by_deadline.iter().take_while(|d| d.0 <= now).take(4096).map(|d| (d.1, d.2)).collect();
    let lookups: Vec<u64> =
        cs.lookups_by_deadline.iter().take_while(|d| d.0 <= now).take(4096).map(|d| d.1).collect();
    for (message_id, uid) in due {
        end_forward(shard, message_id, uid, logic::push::outcome::NODE_LOST, now);
    }
    for tag in lookups {
        on_note(shard, Note::LookupFailed { tag }, now);
    }
    handoff::expire(shard, now);
}

/// End of a turn: seal and publish what goes to other nodes, and hand the Redis thread its
/// commands, all in one batch.
pub fn flush(shard: &mut Shard, now: u64) {
    relay::flush(shard);
    let Some(c) = shard.cluster.clone() else { return };
    let Some(cs) = shard.cluster_shard.as_mut() else { return };
    if cs.cmds.is_empty() && cs.outgoing.is_empty() && cs.receipts.is_empty() {
        return;
    }
    let mut cmds = std::mem::take(&mut cs.cmds);
    for (origin, rs) in cs.receipts.drain() {
        // Origins are interned when a node's push arrives and never forgotten, so this holds.
        let Some(node) = c.origin_name(origin) else {
            tracing::error!(origin, receipts = rs.len(), "receipts for an unknown node dropped");
            continue;
        };
        for rs in rs.chunks(schema::node::MAX_RECEIPTS) {
            cs.outgoing.push((node.clone(), NodeMsg::Receipts(rs.to_vec())));
        }
    }
    // Everything for one node this turn goes as one sealed message (or a few, under the size
    // limit): a login storm's takes and handoffs are a handful of publishes, not one each.
    let mut per_node: HashMap<String, Vec<NodeMsg>> = HashMap::new();
    for (node, msg) in cs.outgoing.drain(..) {
        per_node.entry(node).or_default().push(msg);
    }
    for (node, msgs) in per_node {
        for mut batch in batches(msgs) {
            let msg = if batch.len() == 1 { batch.pop().expect("one") } else { NodeMsg::Batch(batch) };
            cmds.push(Cmd::Publish { node: node.clone(), bytes: c.sealer.seal(&msg) });
        }
    }
    if let Err(cluster::Full(back)) = c.handle.send(cmds) {
        // The Redis thread is behind: fail fast rather than queue without bound.
        c.stats.unavailable.fetch_add(back.len() as u64, Relaxed);
        tracing::warn!(commands = back.len(), "directory queue full: commands failed fast");
        for cmd in back {
            if let Cmd::Lookup { tag, .. } = cmd {
                on_note(shard, Note::LookupFailed { tag }, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A turn's messages for one node go as few sealed messages as fit the size limit, in order.
    #[test]
    fn batches_fill_up_to_the_limit_and_keep_order() {
        let push = |id: u64| NodeMsg::Push {
            message_id: id,
            log_id: id,
            ttl_ms: 1,
            body: vec![0; 100_000],
            uids: vec![1, 2, 3],
        };
        let msgs: Vec<NodeMsg> = (0..25).map(push).chain([NodeMsg::Take { uid: 1, epoch: 2 }]).collect();
        let b = batches(msgs.clone());
        assert_eq!(b.len(), 3, "100 kB each: 10 fit under 1 MiB");
        for batch in &b {
            let bytes = NodeMsg::Batch(batch.clone()).to_bytes();
            assert!(bytes.len() <= schema::node::MAX_MESSAGE);
            assert_eq!(NodeMsg::decode(&bytes), Ok(NodeMsg::Batch(batch.clone())));
        }
        assert_eq!(b.concat(), msgs);
        assert_eq!(batches(vec![NodeMsg::Take { uid: 1, epoch: 2 }]).len(), 1);
    }
}
