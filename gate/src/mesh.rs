//! Cross-shard messaging: one bounded lock-free inbox per executor, batches in, one wake-up per
//! batch.
//!
//! Every executor hosts a gate shard (connections) and a logic shard (uids with
//! `shard_of(uid) == id`). Messages between them travel in batches (`Vec<Msg>`) over a bounded
//! crossbeam channel; the receiving executor's processor task parks on an `AtomicWaker`, so an
//! idle shard sleeps in the kernel and a sender pays one eventfd wake-up per batch, not per
//! message. Messages produced while a task runs are gathered in a per-destination outbox and sent
//! together when the executor next yields (see `Shard::flush_outbox`).

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Batches an inbox holds before senders must wait. Each batch holds at most `MAX_BATCH`
/// messages, so an inbox bounds memory at `INBOX_BATCHES * MAX_BATCH` messages.
pub const INBOX_BATCHES: usize = 4096;
/// Messages per batch; an outbox reaching it is flushed at once.
pub const MAX_BATCH: usize = 1024;

/// A message between shards.
#[derive(Debug)]
pub enum Msg {
    /// For the logic shard of the receiving executor.
    Logic(logic::Input),
    /// A push (or broadcast) for the logic shard of the receiving executor, with the room a
    /// sidecar reserved for it there (`sidecar::room`), given back once the shard took it.
    Reserved(logic::Input, u32),
    /// For connections on the receiving executor's gate shard.
    Conn(logic::Output),
    /// For the app-server connections on the receiving executor.
    AppServer(crate::delivery::AppServerMsg),
    /// From the cluster's Redis thread (cluster mode).
    Cluster(crate::cluster::Note),
}

/// A batch with the time it was sent, for the hop-latency histogram.
#[derive(Debug)]
pub struct Batch {
    /// When the sender handed it to the channel.
    pub sent: Instant,
    /// The messages, in the order they were produced.
    pub msgs: Vec<Msg>,
}

/// One executor's inbox.
#[derive(Debug)]
pub struct Inbox {
    /// Senders on every executor (and the signal thread) clone this.
    tx: Sender<Batch>,
    /// Drained only by the owning executor's processor task.
    pub rx: Receiver<Batch>,
    /// The processor task's waker; `wake` crosses threads through glommio's eventfd.
    pub waker: AtomicWaker,
    /// Set by `Shutdown` senders that cannot allocate (signal thread): checked on every wake.
    pub shutdown: AtomicBool,
}

/// Every executor's inbox, shared by all executors.
#[derive(Debug)]
pub struct Mesh {
    /// Indexed by executor (shard) id.
    pub inboxes: Vec<Inbox>,
}

impl Mesh {
    /// A mesh for `shards` executors.
    pub fn new(shards: usize) -> Mesh {
        let inboxes = (0..shards)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::bounded(INBOX_BATCHES);
                Inbox { tx, rx, waker: AtomicWaker::new(), shutdown: AtomicBool::new(false) }
            })
            .collect();
        Mesh { inboxes }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    /// True for a mesh of no shards (never built by the gate).
    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    /// Sends a batch to `dest` and wakes it. A full inbox hands the batch back.
    pub fn try_send(&self, dest: usize, batch: Batch) -> Result<(), Batch> {
        let inbox = &self.inboxes[dest];
        match inbox.tx.try_send(batch) {
            Ok(()) => {
                inbox.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                inbox.waker.wake();
                Err(b)
            }
        }
    }

    /// Asks every shard to shut down (from any thread).
    pub fn shutdown_all(&self) {
        for inbox in &self.inboxes {
            inbox.shutdown.store(true, Ordering::Release);
            inbox.waker.wake();
        }
    }

    /// Batches waiting in `dest`'s inbox (a metrics gauge).
    pub fn depth(&self, dest: usize) -> usize {
        self.inboxes[dest].rx.len()
    }
}
