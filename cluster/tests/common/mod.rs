//! A directory node for tests: a [`Handle`] whose events land in a channel, and helpers that
//! send one command and wait for its answer.

#![allow(dead_code)] // each test binary uses its own part

use std::time::{Duration, Instant};

use cluster::{Cmd, Config, Event, Handle, NodeInfo, Owner};
use crossbeam_channel::{Receiver, RecvTimeoutError};

/// Lease in tests: short, so lapses are seen quickly.
pub const LEASE_MS: u64 = 600;
/// How long a helper waits for an answer before failing the test.
pub const PATIENCE: Duration = Duration::from_secs(5);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

pub fn config(url: &str) -> Config {
    Config { lease_ms: LEASE_MS, command_timeout_ms: 500, max_queue: 256, ..Config::new(url) }
}

pub fn info(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.to_string(),
        app_addr: format!("{name}.app:7100"),
        link_addr: format!("{name}.link:7400"),
        has_appserver: false,
        incarnation: NodeInfo::new_incarnation(),
    }
}

pub struct Node {
    pub handle: Option<Handle>,
    pub info: NodeInfo,
    /// Event batches as the sink received them.
    batches: Receiver<Vec<Event>>,
    /// Events received but not yet taken by a wait.
    backlog: Vec<Event>,
    next_tag: u64,
}

impl Node {
    pub fn start(url: &str, name: &str) -> Node {
        Node::start_with(config(url), info(name))
    }

    pub fn start_with(cfg: Config, info: NodeInfo) -> Node {
        init_tracing();
        let (tx, batches) = crossbeam_channel::unbounded();
        let sink = Box::new(move |evs: Vec<Event>| {
            let _ = tx.send(evs);
        });
        let handle = Handle::start(cfg, info.clone(), sink).expect("start");
        Node { handle: Some(handle), info, batches, backlog: Vec::new(), next_tag: 1 }
    }

    pub fn handle(&self) -> &Handle {
        self.handle.as_ref().expect("running")
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn send(&self, cmds: Vec<Cmd>) {
        self.handle().send(cmds).expect("queue has room");
    }

    pub fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// The next batch as delivered by the sink (the backlog must be empty).
    pub fn next_batch(&mut self, patience: Duration) -> Vec<Event> {
        assert!(self.backlog.is_empty(), "events left over: {:?}", self.backlog);
        self.batches.recv_timeout(patience).expect("a batch of events")
    }

    /// The first event (in arrival order) matching `want`; the others stay for later waits.
    pub fn try_wait(&mut self, patience: Duration, mut want: impl FnMut(&Event) -> bool) -> Option<Event> {
        if let Some(i) = self.backlog.iter().position(&mut want) {
            return Some(self.backlog.remove(i));
        }
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.batches.recv_timeout(left) {
                Ok(batch) => {
                    let mut found = None;
                    for e in batch {
                        if found.is_none() && want(&e) {
                            found = Some(e);
                        } else {
                            self.backlog.push(e);
                        }
                    }
                    if found.is_some() {
                        return found;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    pub fn wait(&mut self, what: &str, want: impl FnMut(&Event) -> bool) -> Event {
        let name = self.info.name.clone();
        match self.try_wait(PATIENCE, want) {
            Some(e) => e,
            None => panic!(
                "{name}: no {what} within {PATIENCE:?}; {} other events, the first: {:?}",
                self.backlog.len(),
                &self.backlog[..self.backlog.len().min(4)]
            ),
        }
    }

    /// Waits for `Status { up: true }`; returns `reregister`.
    pub fn wait_up(&mut self) -> bool {
        match self.wait("status up", |e| matches!(e, Event::Status { up: true, .. })) {
            Event::Status { reregister, .. } => reregister,
            _ => unreachable!(),
        }
    }

    /// Waits for `Status { up: false }`; returns the detail.
    pub fn wait_down(&mut self) -> String {
        match self.wait("status down", |e| matches!(e, Event::Status { up: false, .. })) {
            Event::Status { detail, .. } => detail,
            _ => unreachable!(),
        }
    }

    /// Waits until the newest node list satisfies `want` (older lists still queued are
    /// superseded and skipped).
    pub fn wait_nodes(
        &mut self,
        patience: Duration,
        mut want: impl FnMut(&[NodeInfo]) -> bool,
    ) -> Option<Vec<NodeInfo>> {
        let is_nodes = |e: &Event| matches!(e, Event::Nodes(_));
        let mut newest = self.backlog.iter().rposition(is_nodes).map(|i| self.backlog.remove(i));
        self.backlog.retain(|e| !is_nodes(e));
        let deadline = Instant::now() + patience;
        loop {
            if let Some(Event::Nodes(n)) = newest {
                if want(&n) {
                    self.backlog.retain(|e| !is_nodes(e));
                    return Some(n);
                }
            }
            newest = self.try_wait(deadline.saturating_duration_since(Instant::now()), is_nodes);
            newest.as_ref()?;
        }
    }

    /// Claims and waits for the answer: `(won, previous)`.
    pub fn claim(&mut self, uid: u64, epoch: u64, shard: u16) -> (bool, Option<Owner>) {
        self.send(vec![Cmd::Claim { uid, epoch, shard }]);
        match self.wait("claim answer", |e| {
            matches!(e, Event::Claimed { uid: u, epoch: p, .. } | Event::Unavailable { uid: Some(u), epoch: Some(p), .. }
                if *u == uid && *p == epoch)
        }) {
            Event::Claimed { won, previous, .. } => (won, previous),
            other => panic!("claim of {uid} unavailable: {other:?}"),
        }
    }

    /// Moves and waits for the answer: `(ok, current)`.
    pub fn move_from(&mut self, uid: u64, from: Owner, new_epoch: u64, shard: u16) -> (bool, Option<Owner>) {
        let tag = self.tag();
        self.send(vec![Cmd::Move { uid, from, new_epoch, shard, tag }]);
        match self.wait("move answer", |e| {
            matches!(e, Event::Moved { tag: t, .. } | Event::Unavailable { tag: Some(t), .. } if *t == tag)
        }) {
            Event::Moved { ok, current, .. } => (ok, current),
            other => panic!("move of {uid} unavailable: {other:?}"),
        }
    }

    pub fn lookup(&mut self, uids: Vec<u64>) -> Vec<(u64, Option<Owner>)> {
        let tag = self.tag();
        self.send(vec![Cmd::Lookup { uids, tag }]);
        match self.wait("lookup answer", |e| {
            matches!(e, Event::Looked { tag: t, .. } | Event::Unavailable { tag: Some(t), .. } if *t == tag)
        }) {
            Event::Looked { owners, .. } => owners,
            other => panic!("lookup unavailable: {other:?}"),
        }
    }

    pub fn owner_of(&mut self, uid: u64) -> Option<Owner> {
        self.lookup(vec![uid]).pop().and_then(|(_, o)| o)
    }

    pub fn owner(&self, epoch: u64, shard: u16) -> Owner {
        Owner { node: self.info.name.clone(), epoch, shard }
    }

    /// Stops with lease release.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }

    /// Drops the handle without stop, as a crash would.
    pub fn crash(&mut self) {
        self.handle.take();
    }
}

/// Median and 99th percentile of `samples`, in µs.
pub fn median_p99_us(samples: &mut [Duration]) -> (u128, u128) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_micros();
    (at(0.5), at(0.99))
}
