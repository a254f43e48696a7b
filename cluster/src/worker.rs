//! The directory's thread: one tokio current-thread runtime driving one fred client. It owns
//! the connection state (up or down, reconnect backoff), the lease, and the sink; the gate's
//! shards only queue batches and read a few atomics.
//!
//! One loop, one turn at a time: while up, a turn is the lease renewal when due, or a drain of
//! every queued batch run as one pipeline; while down, a turn answers queued commands at once
//! and waits for the next connect attempt. Turns are bounded by the command timeout, so the
//! loop never stalls for long on a slow Redis.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use fred::interfaces::{EventInterface, PubsubInterface};
use fred::prelude::{
    Client, ClientLike, Config as RedisConfig, Error as FredError, Expiration, HashesInterface,
    KeysInterface, ServerConfig, SetsInterface, TcpConfig, Value,
};
use fred::types::config::ClusterDiscoveryPolicy;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, ConnectHandle, CustomCommand};

use crate::layout::{self, epoch_text, lease_key, uid_key, NODES_KEY};
use crate::{Cmd, Config, Error, Event, NodeInfo, Owner, Shared, Sink, TlsRoots, STOP_RELEASE};

/// First reconnect delay after a loss, and the retry hint of a command that failed while up.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnect delays double up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bound on the Redis commands of one pipeline: a drain stops taking batches past it (the rest
/// go out in the next turn), and a single larger batch is split, so one pipeline stays well
/// inside the command timeout.
const DRAIN_OPS_MAX: usize = 8192;
/// Bound on failed releases kept for replay after a reconnect; past it the oldest are dropped
/// (their entries then point here until a newer session of the uid replaces them).
const RELEASES_KEPT_MAX: usize = 65_536;
/// Fields of a directory entry, in the order the scripts and lookups read them.
const ENTRY_FIELDS: [&str; 3] = ["node", "epoch", "shard"];

/// Parses and checks the URL, with TLS trusting `roots` when given; the error names the URL
/// with any password hidden.
pub(crate) fn redis_config(url: &str, roots: Option<&TlsRoots>) -> Result<RedisConfig, Error> {
    let bad = |why: &str| Error::Url { url: redacted(url), why: why.to_string() };
    let scheme = url.split_once("://").map(|(s, _)| s).ok_or_else(|| bad("no scheme"))?;
    if !matches!(scheme, "redis" | "rediss" | "redis-cluster" | "rediss-cluster") {
        return Err(bad("the scheme must be redis, rediss, redis-cluster or rediss-cluster"));
    }
    let cfg = match roots {
        None => RedisConfig::from_url(url),
        Some(_) if !scheme.starts_with("rediss") => {
            return Err(bad("a CA file is given, so the scheme must be rediss or rediss-cluster (TLS)"));
        }
        // Parsed as its plain twin (the rest of the URL reads the same): fred's `rediss` parse
        // loads the system's CA certificates, whose absence or a broken SSL_CERT_FILE would
        // then refuse a URL that does not need them. TLS is set on the result just below.
        Some(roots) => RedisConfig::from_url(&url.replacen("rediss", "redis", 1)).map(|mut c| {
            c.tls = Some(roots.fred_tls());
            c
        }),
    };
    let cfg = cfg.map_err(|e| bad(e.details()))?;
    match cfg.server {
        ServerConfig::Centralized { .. } | ServerConfig::Clustered { .. } => Ok(cfg),
        _ => Err(bad("only a single server or a Redis Cluster is supported (not sentinel)")),
    }
}

/// `url` with the user-info part (which may hold a password) masked, for messages.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The three scripts, with their SHA-1s computed once.
struct Scripts {
    claim: Script,
    moving: Script,
    release: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            claim: Script::from_lua(layout::claim_lua()),
            moving: Script::from_lua(layout::move_lua()),
            release: Script::from_lua(layout::release_lua()),
        }
    }

    /// `SCRIPT LOAD` of each on every primary: 3 commands.
    async fn load(&self, client: &Client) -> Result<(), FredError> {
        self.claim.load(client).await?;
        self.moving.load(client).await?;
        self.release.load(client).await
    }
}

/// A live fred client and its connection task. Dropping it aborts the task, which closes the
/// connections; without a reconnect policy nothing else keeps them.
struct Link {
    client: Client,
    task: ConnectHandle,
    /// A second connection, subscribed to this node's channel (a subscribed connection runs
    /// no other commands), its task, and what it hears.
    sub: Option<(Client, ConnectHandle, tokio::sync::broadcast::Receiver<fred::types::Message>)>,
    /// Where it is connected, for the status detail.
    detail: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((_, task, _)) = &self.sub {
            task.abort();
        }
    }
}

/// One Redis command of a pipeline.
#[derive(Clone)]
enum Op {
    Claim { uid: u64, epoch: u64, shard: u16 },
    Move { uid: u64, from: Owner, new_epoch: u64, shard: u16 },
    Release { uid: u64, epoch: u64 },
    Lookup { uid: u64 },
    Publish { channel: String, bytes: fred::bytes::Bytes },
}

/// What a loop turn does next.
enum Turn {
    Message(Vec<u8>),
    Lost(String),
    Renew,
    Serve,
}

pub(crate) struct Worker {
    /// The caller's settings.
    cfg: Config,
    /// fred's configuration from the URL; switched to cluster mode once a server says so.
    redis: RedisConfig,
    /// This node as advertised in its lease.
    me: NodeInfo,
    /// Where events go.
    sink: Sink,
    /// Batches from the gate.
    rx: Receiver<Vec<Cmd>>,
    /// Wake-ups, status, counters, stop flag.
    shared: Arc<Shared>,
    scripts: Scripts,
    /// The connection while up.
    link: Option<Link>,
    /// The last status sent (`None` before the first).
    announced: Option<bool>,
    /// A Down was sent: every later Up asks the gate to re-register.
    been_down: bool,
    /// The next reconnect delay.
    backoff: Duration,
    /// When the next connect attempt may start.
    retry_at: Instant,
    /// Releases that failed, replayed after the next connect (compare-and-set, so harmless late).
    releases: VecDeque<(u64, u64)>,
    /// The node list last sent.
    nodes: Option<Vec<NodeInfo>>,
    /// When the lease is renewed next.
    renew_at: Instant,
    /// When the lease was last written.
    lease_ok_at: Instant,
    /// This process has written its lease at least once (a foreign incarnation found after that
    /// is another process using our name).
    lease_written: bool,
}

impl Worker {
    pub(crate) fn new(
        cfg: Config,
        redis: RedisConfig,
        me: NodeInfo,
        sink: Sink,
        rx: Receiver<Vec<Cmd>>,
        shared: Arc<Shared>,
    ) -> Worker {
        let now = Instant::now();
        Worker {
            cfg,
            redis,
            me,
            sink,
            rx,
            shared,
            scripts: Scripts::new(),
            link: None,
            announced: None,
            been_down: false,
            backoff: BACKOFF_MIN,
            retry_at: now,
            releases: VecDeque::new(),
            nodes: None,
            renew_at: now,
            lease_ok_at: now,
            lease_written: false,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.command_timeout_ms)
    }

    fn renew_every(&self) -> Duration {
        Duration::from_millis(self.cfg.lease_ms / 3)
    }

    fn emit(&self, events: Vec<Event>) {
        if !events.is_empty() {
            (self.sink)(events);
        }
    }

    fn upkeep(&self, n: usize) {
        self.shared.upkeep_ops.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) async fn run(mut self) {
        let tls = match (&self.cfg.tls_roots, self.redis.uses_tls()) {
            (Some(roots), _) => format!("trusting the CA file {}", roots.path().display()),
            (None, true) => "trusting the system's CA certificates".to_string(),
            (None, false) => "none".to_string(),
        };
        tracing::info!(node = %self.me.name, url = %redacted(&self.cfg.url), %tls, "redis directory starting");
        loop {
            let stop = self.shared.stop.load(Ordering::Relaxed);
            if stop != crate::RUN {
                self.shutdown(stop == STOP_RELEASE).await;
                return;
            }
            if self.link.is_some() {
                self.up_turn().await;
            } else {
                self.down_turn().await;
            }
        }
    }

    // ---- while up ----

    async fn up_turn(&mut self) {
        let Some(link) = self.link.as_mut() else { return };
        let renew_at = tokio::time::Instant::from_std(self.renew_at);
        let lost = |r: Result<Result<(), FredError>, tokio::task::JoinError>| match r {
            Ok(Ok(())) => "connection closed".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("connection task: {e}"),
        };
        let Some((_, sub_task, messages)) = link.sub.as_mut() else {
            self.lose("no subscription".into());
            return;
        };
        let turn = tokio::select! {
            biased;
            r = &mut link.task => Turn::Lost(lost(r)),
            r = sub_task => Turn::Lost(format!("subscription: {}", lost(r))),
            m = messages.recv() => match m {
                Ok(m) => match m.value.as_bytes() {
                    Some(b) => Turn::Message(b.to_vec()),
                    None => Turn::Message(Vec::new()),
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(node = %self.me.name, missed = n, "messages from other nodes missed (this node fell behind)");
                    Turn::Serve
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => Turn::Lost("subscription closed".into()),
            },
            _ = tokio::time::sleep_until(renew_at) => Turn::Renew,
            _ = self.shared.wake.notified() => Turn::Serve,
        };
        match turn {
            Turn::Message(bytes) => {
                // Whatever else came meanwhile goes in the same sink call.
                let mut events = vec![Event::Message(bytes)];
                if let Some((_, _, messages)) = self.link.as_mut().and_then(|l| l.sub.as_mut()) {
                    while events.len() < 1024 {
                        match messages.try_recv() {
                            Ok(m) => events.push(Event::Message(
                                m.value.as_bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                            )),
                            Err(_) => break,
                        }
                    }
                }
                self.emit(events);
            }
            Turn::Lost(why) => self.lose(why),
            Turn::Renew => self.renew_turn().await,
            Turn::Serve => self.serve().await,
        }
    }

    async fn renew_turn(&mut self) {
        match self.renew().await {
            Ok(nodes) => {
                self.renew_at = Instant::now() + self.renew_every();
                if self.nodes.as_ref() != Some(&nodes) {
                    tracing::info!(node = %self.me.name, nodes = ?nodes.iter().map(|n| &n.name).collect::<Vec<_>>(), "live nodes changed");
                    self.nodes = Some(nodes.clone());
                    self.emit(vec![Event::Nodes(nodes)]);
                }
            }
            Err(why) => {
                let unrenewed = self.lease_ok_at.elapsed();
                tracing::warn!(node = %self.me.name, %why, unrenewed_ms = unrenewed.as_millis() as u64, "lease renewal failed");
                if unrenewed >= Duration::from_millis(self.cfg.lease_ms) {
                    self.lose(format!("lease not renewed for {} ms: {why}", unrenewed.as_millis()));
                } else {
                    self.renew_at = Instant::now() + self.renew_every();
                }
            }
        }
    }

    /// Takes queued batches up to [`DRAIN_OPS_MAX`] Redis commands.
    fn drain(&self) -> Vec<Cmd> {
        let mut out = Vec::new();
        let mut ops = 0;
        while ops < DRAIN_OPS_MAX {
            let Ok(batch) = self.rx.try_recv() else { break };
            ops += batch
                .iter()
                .map(|c| if let Cmd::Lookup { uids, .. } = c { uids.len() } else { 1 })
                .sum::<usize>();
            out.extend(batch);
        }
        out
    }

    /// One drain as one pipeline, its answers as one sink call.
    async fn serve(&mut self) {
        let mut cmds = self.drain();
        if !self.rx.is_empty() {
            // More than one pipeline's worth: come back for the rest after this one.
            self.shared.wake.notify_one();
        }
        let mut advertised = false;
        let mut ops = Vec::with_capacity(cmds.len());
        for c in cmds.iter_mut() {
            match c {
                Cmd::Claim { uid, epoch, shard } => {
                    ops.push(Op::Claim { uid: *uid, epoch: *epoch, shard: *shard })
                }
                Cmd::Move { uid, from, new_epoch, shard, .. } => {
                    ops.push(Op::Move { uid: *uid, from: from.clone(), new_epoch: *new_epoch, shard: *shard })
                }
                Cmd::Release { uid, epoch } => ops.push(Op::Release { uid: *uid, epoch: *epoch }),
                Cmd::Lookup { uids, .. } => ops.extend(uids.iter().map(|&uid| Op::Lookup { uid })),
                Cmd::Advertise(info) => advertised |= self.advertise(info),
                // The bytes move into the pipeline (the answer needs only the node).
                Cmd::Publish { node, bytes } => ops.push(Op::Publish {
                    channel: layout::node_channel(node),
                    bytes: std::mem::take(bytes).into(),
                }),
            }
        }
        if advertised {
            self.renew_at = Instant::now();
        }
        let results = match self.link.as_ref() {
            // Nothing for Redis (advertisements, empty lookups): answered all the same.
            _ if ops.is_empty() => Vec::new(),
            Some(link) => run_ops(link, &self.scripts, &self.me.name, &ops, &self.shared).await,
            None => vec![Err("not connected".to_string()); ops.len()],
        };
        let events = self.answers(cmds, results, BACKOFF_MIN);
        self.emit(events);
    }

    /// Takes the changeable facts of an advertisement; true when something changed.
    fn advertise(&mut self, info: &NodeInfo) -> bool {
        if info.name != self.me.name || info.incarnation != self.me.incarnation {
            tracing::warn!(node = %self.me.name, to = %info.name, "an advertisement cannot change the node's name or incarnation; kept them");
        }
        let changed = (&info.app_addr, &info.link_addr, info.has_appserver)
            != (&self.me.app_addr, &self.me.link_addr, self.me.has_appserver);
        self.me.app_addr.clone_from(&info.app_addr);
        self.me.link_addr.clone_from(&info.link_addr);
        self.me.has_appserver = info.has_appserver;
        changed
    }

    /// One event per command that expects one, from the results of its Redis commands (in op
    /// order). Failed releases are kept for replay.
    fn answers(
        &mut self,
        cmds: Vec<Cmd>,
        results: Vec<Result<Value, String>>,
        retry: Duration,
    ) -> Vec<Event> {
        let retry_after_ms = retry.as_millis() as u64;
        let unavailable =
            |tag, uid, epoch, why: String| Event::Unavailable { tag, uid, epoch, retry_after_ms, why };
        let mut results = results.into_iter();
        let mut next = || results.next().unwrap_or_else(|| Err("missing reply".to_string()));
        let mut events = Vec::with_capacity(cmds.len());
        for c in cmds {
            match c {
                Cmd::Claim { uid, epoch, .. } => {
                    match next()
                        .and_then(|v| layout::flag_and_owner(v).map_err(|e| format!("bad reply: {}", e.0)))
                    {
                        Ok((won, previous)) => events.push(Event::Claimed { uid, epoch, won, previous }),
                        Err(why) => events.push(unavailable(None, Some(uid), Some(epoch), why)),
                    }
                }
                Cmd::Move { uid, new_epoch, tag, .. } => {
                    match next()
                        .and_then(|v| layout::flag_and_owner(v).map_err(|e| format!("bad reply: {}", e.0)))
                    {
                        Ok((ok, current)) => events.push(Event::Moved { tag, uid, ok, current }),
                        Err(why) => events.push(unavailable(Some(tag), Some(uid), Some(new_epoch), why)),
                    }
                }
                Cmd::Release { uid, epoch } => match next() {
                    Ok(v) => tracing::debug!(uid, epoch, deleted = v.as_i64() == Some(1), "released"),
                    Err(why) => {
                        tracing::warn!(node = %self.me.name, uid, epoch, %why, "release failed; replayed after reconnect");
                        self.keep_release(uid, epoch);
                    }
                },
                Cmd::Lookup { uids, tag } => {
                    let mut owners = Vec::with_capacity(uids.len());
                    let mut failed = None;
                    for uid in uids {
                        let owner = next().and_then(|v| {
                            layout::owner_from(&v.into_array())
                                .map_err(|e| format!("bad entry of {uid}: {}", e.0))
                        });
                        match owner {
                            Ok(o) => owners.push((uid, o)),
                            Err(why) => failed = failed.or(Some(why)),
                        }
                    }
                    events.push(match failed {
                        None => Event::Looked { tag, owners },
                        Some(why) => unavailable(Some(tag), None, None, why),
                    });
                }
                Cmd::Advertise(_) => {}
                Cmd::Publish { node, .. } => {
                    if let Err(why) = next() {
                        tracing::warn!(node = %self.me.name, to = %node, %why, "message to another node not published");
                    }
                }
            }
        }
        events
    }

    fn keep_release(&mut self, uid: u64, epoch: u64) {
        if self.releases.len() >= RELEASES_KEPT_MAX {
            self.releases.pop_front();
        }
        self.releases.push_back((uid, epoch));
    }

    /// Writes the lease, reads the node list. Three commands, then one `GET` per other node
    /// (and one `SREM` when some lapsed).
    async fn renew(&mut self) -> Result<Vec<NodeInfo>, String> {
        let link = self.link.as_ref().ok_or("not connected")?;
        // serde_json cannot fail on a struct of strings, integers and a bool.
        let json = serde_json::to_string(&self.me).unwrap_or_default();
        let pipe = link.client.pipeline();
        let fail = |e: FredError| e.to_string();
        let expire = Some(Expiration::PX(self.cfg.lease_ms as i64));
        let _: () = pipe.set(lease_key(&self.me.name), json, expire, None, true).await.map_err(fail)?;
        let _: () = pipe.sadd(NODES_KEY, self.me.name.as_str()).await.map_err(fail)?;
        let _: () = pipe.smembers(NODES_KEY).await.map_err(fail)?;
        self.upkeep(3);
        let replies = pipe.try_all::<Value>().await;
        if replies.len() != 3 {
            // A timeout or a send failure answers the whole pipeline with one error.
            return Err(replies
                .into_iter()
                .find_map(Result::err)
                .map_or("short reply".into(), |e| e.to_string()));
        }
        let mut r = replies.into_iter();
        let (Some(old), Some(added), Some(members)) = (r.next(), r.next(), r.next()) else {
            return Err("short reply".into());
        };
        let (old, members) = (old.map_err(fail)?, members.map_err(fail)?);
        added.map_err(fail)?;
        self.lease_ok_at = Instant::now();
        if let Some(old) = old.as_str().and_then(|s| serde_json::from_str::<NodeInfo>(&s).ok()) {
            if old.incarnation != self.me.incarnation {
                if self.lease_written {
                    tracing::error!(node = %self.me.name, other = old.incarnation, mine = self.me.incarnation,
                        "another process renews a lease under this node's name");
                } else {
                    tracing::info!(node = %self.me.name, previous = old.incarnation, "took over the lease of a previous incarnation");
                }
            }
        }
        self.lease_written = true;

        let others: Vec<String> = members
            .into_array()
            .into_iter()
            .filter_map(|v| v.as_str().map(|s| s.into_owned()))
            .filter(|n| *n != self.me.name)
            .collect();
        let mut nodes = vec![self.me.clone()];
        if !others.is_empty() {
            let pipe = link.client.pipeline();
            for n in &others {
                let _: () = pipe.get(lease_key(n)).await.map_err(fail)?;
            }
            self.upkeep(others.len());
            let leases = pipe.try_all::<Value>().await;
            if leases.len() != others.len() {
                return Err(leases.into_iter().find_map(Result::err).map_or("short reply".into(), fail));
            }
            let mut lapsed = Vec::new();
            for (name, lease) in others.into_iter().zip(leases) {
                let lease = lease.map_err(fail)?;
                match lease.as_str() {
                    None => lapsed.push(name),
                    Some(json) => match serde_json::from_str::<NodeInfo>(&json) {
                        Ok(info) => nodes.push(info),
                        Err(e) => tracing::warn!(node = %name, error = %e, "unreadable lease; node left out"),
                    },
                }
            }
            if !lapsed.is_empty() {
                // A node that is only starting re-adds itself at its next renewal.
                tracing::debug!(lapsed = ?lapsed, "removing names whose lease lapsed");
                self.upkeep(1);
                let removed: Result<i64, _> = link.client.srem(NODES_KEY, lapsed).await;
                if let Err(e) = removed {
                    tracing::debug!(error = %e, "could not prune the node set");
                }
            }
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    // ---- while down ----

    async fn down_turn(&mut self) {
        let retry = self.retry_at.saturating_duration_since(Instant::now()).max(BACKOFF_MIN);
        self.fail_queued(retry, "redis unavailable");
        if Instant::now() >= self.retry_at {
            self.attempt().await;
            return;
        }
        let at = tokio::time::Instant::from_std(self.retry_at);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = self.shared.wake.notified() => {}
        }
    }

    /// Answers every queued command with Unavailable (releases kept, advertisements taken).
    fn fail_queued(&mut self, retry: Duration, why: &str) {
        loop {
            let cmds = self.drain();
            if cmds.is_empty() {
                return;
            }
            for c in &cmds {
                if let Cmd::Advertise(info) = c {
                    self.advertise(info);
                }
            }
            let n_ops =
                cmds.iter().map(|c| if let Cmd::Lookup { uids, .. } = c { uids.len() } else { 1 }).sum();
            let events = self.answers(cmds, vec![Err(why.to_string()); n_ops], retry);
            self.emit(events);
        }
    }

    async fn attempt(&mut self) {
        let t = self.timeout();
        match connect(&mut self.redis, t, &self.scripts, &self.me.name, &self.shared).await {
            Ok(link) => {
                self.link = Some(link);
                self.replay_releases().await;
                match self.renew().await {
                    Ok(nodes) => self.come_up(nodes),
                    Err(why) => self.attempt_failed(format!("lease: {why}")),
                }
            }
            Err(why) => self.attempt_failed(why),
        }
    }

    fn come_up(&mut self, nodes: Vec<NodeInfo>) {
        self.backoff = BACKOFF_MIN;
        self.renew_at = Instant::now() + self.renew_every();
        let detail = self.link.as_ref().map(|l| l.detail.clone()).unwrap_or_default();
        tracing::info!(node = %self.me.name, %detail, reregister = self.been_down, "redis directory up");
        let mut events: Vec<Event> = self.status(true, detail).into_iter().collect();
        self.nodes = Some(nodes.clone());
        events.push(Event::Nodes(nodes));
        self.emit(events);
    }

    fn attempt_failed(&mut self, why: String) {
        self.link = None;
        self.retry_at = Instant::now() + self.backoff;
        if self.announced != Some(false) {
            tracing::warn!(node = %self.me.name, %why, retry_ms = self.backoff.as_millis() as u64, "redis unreachable");
        } else {
            tracing::debug!(node = %self.me.name, %why, retry_ms = self.backoff.as_millis() as u64, "redis still unreachable");
        }
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        let events: Vec<Event> = self.status(false, why).into_iter().collect();
        self.emit(events);
    }

    fn lose(&mut self, why: String) {
        tracing::warn!(node = %self.me.name, %why, "redis connection lost");
        self.link = None;
        self.backoff = BACKOFF_MIN;
        self.retry_at = Instant::now() + self.backoff;
        let events: Vec<Event> = self.status(false, why).into_iter().collect();
        self.emit(events);
    }

    /// Records the status for [`crate::Handle::status`]; the event when it changed.
    fn status(&mut self, up: bool, detail: String) -> Option<Event> {
        self.shared.up.store(up, Ordering::Relaxed);
        if let Ok(mut d) = self.shared.detail.lock() {
            d.clone_from(&detail);
        }
        if self.announced == Some(up) {
            return None;
        }
        self.announced = Some(up);
        let reregister = up && self.been_down;
        if !up {
            self.been_down = true;
        }
        Some(Event::Status { up, reregister, detail })
    }

    async fn replay_releases(&mut self) {
        if self.releases.is_empty() {
            return;
        }
        let Some(link) = self.link.as_ref() else { return };
        let ops: Vec<Op> = self.releases.iter().map(|&(uid, epoch)| Op::Release { uid, epoch }).collect();
        let results = run_ops(link, &self.scripts, &self.me.name, &ops, &self.shared).await;
        let kept: VecDeque<(u64, u64)> =
            self.releases.iter().zip(&results).filter(|(_, r)| r.is_err()).map(|(k, _)| *k).collect();
        tracing::info!(node = %self.me.name, replayed = ops.len(), failed = kept.len(), "replayed releases");
        self.releases = kept;
    }

    // ---- stopping ----

    async fn shutdown(&mut self, release: bool) {
        if release {
            // What is queued still runs (bounded: a couple of drains), then the lease goes.
            for _ in 0..2 {
                if self.link.is_none() || self.rx.is_empty() {
                    break;
                }
                self.serve().await;
            }
        }
        self.fail_queued(BACKOFF_MIN, "directory stopping");
        if let (true, Some(link)) = (release, self.link.as_ref()) {
            let pipe = link.client.pipeline();
            let queued: Result<(), FredError> = async {
                let _: () = pipe.del(lease_key(&self.me.name)).await?;
                pipe.srem(NODES_KEY, self.me.name.as_str()).await
            }
            .await;
            self.upkeep(2);
            let done = match queued {
                Ok(()) => pipe.try_all::<Value>().await.into_iter().find_map(Result::err),
                Err(e) => Some(e),
            };
            match done {
                None => tracing::info!(node = %self.me.name, "lease released"),
                Some(e) => {
                    tracing::warn!(node = %self.me.name, error = %e, "lease not released; it lapses by itself")
                }
            }
        }
        if !release {
            tracing::info!(node = %self.me.name, "directory abandoned; the lease lapses by itself");
        }
        self.link = None;
    }
}

/// Messages from other nodes fred keeps for this thread to take.
const SUBSCRIBER_BACKLOG: usize = 4096;

/// Opens a client and waits for its connection (bounded by fred's connection and internal
/// command timeouts, set to `t`).
async fn open(redis: RedisConfig, t: Duration) -> Result<Link, String> {
    let (client, task) = open_client(redis, t).await?;
    Ok(Link { client, task, sub: None, detail: String::new() })
}

/// A connected client and its connection task.
async fn open_client(redis: RedisConfig, t: Duration) -> Result<(Client, ConnectHandle), String> {
    let mut b = fred::types::Builder::from_config(redis);
    b.with_connection_config(|c| {
        c.connection_timeout = t;
        c.internal_command_timeout = t;
        // Writes of a command: the first, and up to two more after cluster redirections
        // (MOVED/ASK count as attempts). A lost connection fails it: there is no reconnect.
        c.max_command_attempts = 3;
        c.tcp = TcpConfig { nodelay: Some(true), ..TcpConfig::default() };
    });
    b.with_performance_config(|p| {
        p.default_command_timeout = t;
        // Messages from other nodes wait here until this thread takes them; fred's default of
        // 32 lost messages (Lagged) in a resume storm before node messages were batched. With a
        // handful of batches per turn per node, this leaves room for bursts many times over.
        p.broadcast_channel_capacity = SUBSCRIBER_BACKLOG;
    });
    // No reconnect policy: the worker reconnects, so a loss ends fred's connection task.
    let client = b.build().map_err(|e| e.to_string())?;
    let task = client.init().await.map_err(|e| format!("connect: {e}"))?;
    Ok((client, task))
}

/// Connects, switches to cluster mode if the server is part of a Redis Cluster (remembered in
/// `redis` for later reconnects), and loads the scripts.
async fn connect(
    redis: &mut RedisConfig,
    t: Duration,
    scripts: &Scripts,
    me: &str,
    shared: &Shared,
) -> Result<Link, String> {
    let mut link = open(redis.clone(), t).await?;
    if let ServerConfig::Centralized { server } = &redis.server {
        let info: String = link
            .client
            .custom(CustomCommand::new_static("INFO", ClusterHash::FirstKey, false), vec!["cluster"])
            .await
            .map_err(|e| format!("INFO cluster: {e}"))?;
        shared.upkeep_ops.fetch_add(1, Ordering::Relaxed);
        if info.contains("cluster_enabled:1") {
            tracing::info!(server = %server, "the server is a Redis Cluster node: cluster mode");
            let hosts = vec![server.clone()];
            redis.server = ServerConfig::Clustered { hosts, policy: ClusterDiscoveryPolicy::default() };
            drop(link);
            link = open(redis.clone(), t).await?;
        }
    }
    scripts.load(&link.client).await.map_err(|e| format!("SCRIPT LOAD: {e}"))?;
    // This node's channel, on a connection of its own.
    let (sub_client, sub_task) = open_client(redis.clone(), t).await?;
    let messages = sub_client.message_rx();
    let subscribed = sub_client.ssubscribe(layout::node_channel(me)).await;
    link.sub = Some((sub_client, sub_task, messages));
    subscribed.map_err(|e| format!("SSUBSCRIBE: {e}"))?;
    shared.upkeep_ops.fetch_add(1, Ordering::Relaxed);
    shared.upkeep_ops.fetch_add(3, Ordering::Relaxed);
    link.detail = match &redis.server {
        ServerConfig::Clustered { .. } => {
            format!("redis cluster, {} primaries connected", link.client.active_connections().len())
        }
        ServerConfig::Centralized { server } => format!("redis {server}"),
        _ => "redis".to_string(),
    };
    // /healthz then tells an operator whether the directory's traffic is encrypted.
    if redis.uses_tls() {
        link.detail.push_str(", TLS");
    }
    Ok(link)
}

/// Runs `ops` as one pipeline (more only for a single batch past [`DRAIN_OPS_MAX`] commands):
/// one result per op.
async fn run_ops(
    link: &Link,
    scripts: &Scripts,
    me: &str,
    ops: &[Op],
    shared: &Shared,
) -> Vec<Result<Value, String>> {
    let mut results = Vec::with_capacity(ops.len());
    for chunk in ops.chunks(DRAIN_OPS_MAX) {
        results.extend(run_pipeline(link, scripts, me, chunk, shared).await);
    }
    results
}

/// One pipeline; commands that met `NOSCRIPT` (a server that lost its scripts) run once more
/// after a reload.
async fn run_pipeline(
    link: &Link,
    scripts: &Scripts,
    me: &str,
    ops: &[Op],
    shared: &Shared,
) -> Vec<Result<Value, String>> {
    let results = match pipeline(&link.client, scripts, me, ops, shared).await {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(%why, commands = ops.len(), "directory pipeline failed");
            return vec![Err(why); ops.len()];
        }
    };
    let missing: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Err(e) if e.details().starts_with("NOSCRIPT")))
        .map(|(i, _)| i)
        .collect();
    let mut results: Vec<Result<Value, String>> =
        results.into_iter().map(|r| r.map_err(|e| e.to_string())).collect();
    if !missing.is_empty() {
        tracing::info!(commands = missing.len(), "NOSCRIPT: loading the scripts again");
        shared.upkeep_ops.fetch_add(3, Ordering::Relaxed);
        if let Err(e) = scripts.load(&link.client).await {
            tracing::warn!(error = %e, "SCRIPT LOAD failed");
        } else {
            let again: Vec<Op> = missing.iter().map(|&i| ops[i].clone()).collect();
            let retried = match pipeline(&link.client, scripts, me, &again, shared).await {
                Ok(r) => r.into_iter().map(|r| r.map_err(|e| e.to_string())).collect(),
                Err(why) => vec![Err(why); again.len()],
            };
            for (i, r) in missing.into_iter().zip(retried) {
                results[i] = r;
            }
        }
    }
    results
}

/// Sends `ops` as one fred pipeline: one message to fred's router, all commands written back to
/// back without waiting for replies (fred 10.1 flushes after each script call, so each is its
/// own `writev`, pipeline or not), all replies back together. Measured against sending each op
/// as its own fred command and awaiting them all: that batches `HMGET` writes, but this
/// thread's CPU per batched claim was 1.1–1.8× Redis's own EVALSHA time that way against
/// 0.95× with the pipeline, and claims are the storm that matters. `Err` when the pipeline as a
/// whole failed (a timeout: one error for all).
async fn pipeline(
    client: &Client,
    scripts: &Scripts,
    me: &str,
    ops: &[Op],
    shared: &Shared,
) -> Result<Vec<Result<Value, FredError>>, String> {
    let pipe = client.pipeline();
    // fred 10.1's pipeline has no EVALSHA of its own: it goes as a custom command, routed to
    // its key's slot (fred would hash a custom command by its first string, the SHA, unless
    // given the slot).
    let evalsha = |script: &Script, uid: u64, args: Vec<String>| {
        let key = uid_key(uid);
        let slot = ClusterHash::from(key.as_str());
        let mut all: Vec<Value> = Vec::with_capacity(3 + args.len());
        all.push(Value::from(script.sha1().clone()));
        all.push(Value::Integer(1));
        all.push(Value::from(key));
        all.extend(args.into_iter().map(Value::from));
        pipe.custom::<(), Value>(CustomCommand::new_static("EVALSHA", slot, false), all)
    };
    let queued: Result<(), FredError> = async {
        for op in ops {
            match op {
                Op::Claim { uid, epoch, shard } => {
                    let args = vec![me.to_string(), epoch_text(*epoch), shard.to_string()];
                    evalsha(&scripts.claim, *uid, args).await?
                }
                Op::Move { uid, from, new_epoch, shard } => {
                    let args = vec![
                        from.node.clone(),
                        epoch_text(from.epoch),
                        me.to_string(),
                        epoch_text(*new_epoch),
                        shard.to_string(),
                    ];
                    evalsha(&scripts.moving, *uid, args).await?
                }
                Op::Release { uid, epoch } => {
                    let args = vec![me.to_string(), epoch_text(*epoch)];
                    evalsha(&scripts.release, *uid, args).await?
                }
                Op::Lookup { uid } => pipe.hmget(uid_key(*uid), ENTRY_FIELDS.to_vec()).await?,
                Op::Publish { channel, bytes } => {
                    let slot = ClusterHash::from(channel.as_str());
                    // A shared handle on the bytes, not a copy.
                    let args = vec![Value::from(channel.clone()), Value::Bytes(bytes.clone())];
                    pipe.custom::<(), Value>(CustomCommand::new_static("SPUBLISH", slot, false), args).await?
                }
            }
        }
        Ok(())
    }
    .await;
    queued.map_err(|e| e.to_string())?;
    shared.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
    let results = pipe.try_all::<Value>().await;
    if results.len() != ops.len() {
        // A timeout or a send failure answers the whole pipeline with one error.
        let e = results.into_iter().find_map(Result::err);
        return Err(e.map_or_else(|| "short pipeline reply".to_string(), |e| e.to_string()));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        assert!(redis_config("redis://127.0.0.1:6379", None).is_ok());
        assert!(redis_config("redis://:secret@127.0.0.1:6379", None).is_ok());
        assert!(redis_config("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001", None).is_ok());
        assert!(redis_config("rediss://127.0.0.1:6380", None).is_ok());
        for bad in ["127.0.0.1:6379", "http://127.0.0.1:6379", "redis://", "redis://[bad"] {
            assert!(redis_config(bad, None).is_err(), "{bad} accepted");
        }
        let Err(e) = redis_config("http://:secret@host:1", None) else { panic!("accepted") };
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(redacted("redis://u:p@h:1"), "redis://***@h:1");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }
}
