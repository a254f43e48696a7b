//! App requests forwarded to the app-server (place order, grab order, order status, business
//! requests): the logic shard of the app's uid remembers each one until the app-server answers
//! or its deadline passes, so the answer reaches the session wherever its connection is now.

use crate::ConnRef;
use std::collections::{BTreeSet, HashMap};

/// A request waiting for the app-server.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// The app.
    pub uid: u64,
    /// The connection that sent it.
    pub conn: ConnRef,
    /// The app's sequence-id, echoed in the answer.
    pub seq: u32,
    /// The app's log-id.
    pub log_id: u64,
    /// The app's cmd, echoed in the answer.
    pub cmd: u16,
    /// When the app gets a Timeout error instead (ms).
    pub deadline_ms: u64,
}

/// Pending requests of one logic shard, bounded.
#[derive(Debug, Default)]
pub struct Requests {
    /// By request id.
    by_id: HashMap<u64, Pending>,
    /// (deadline, request id), for expiry.
    deadlines: BTreeSet<(u64, u64)>,
    /// Counter for request ids.
    next: u64,
}

/// Request ids carry their logic shard in the top 16 bits, so an answer arriving on any gate
/// shard is routed back to the shard that holds the request.
pub const SHARD_SHIFT: u32 = 48;

/// The logic shard a request id belongs to.
pub fn shard_of_request(request_id: u64) -> usize {
    (request_id >> SHARD_SHIFT) as usize
}

impl Requests {
    /// Registers a request; `None` when `max` are already pending.
    pub fn insert(&mut self, shard: u16, p: Pending, max: usize) -> Option<u64> {
        if self.by_id.len() >= max {
            return None;
        }
        self.next = (self.next + 1) & ((1 << SHARD_SHIFT) - 1);
        let id = ((shard as u64) << SHARD_SHIFT) | self.next;
        self.by_id.insert(id, p);
        self.deadlines.insert((p.deadline_ms, id));
        Some(id)
    }

    /// Removes and returns a request (answered, failed or expired).
    pub fn take(&mut self, id: u64) -> Option<Pending> {
        let p = self.by_id.remove(&id)?;
        self.deadlines.remove(&(p.deadline_ms, id));
        Some(p)
    }

    /// Earliest deadline.
    pub fn first_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|d| d.0)
    }

    /// Takes up to `max` requests due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64, max: usize, out: &mut Vec<(u64, Pending)>) {
        while out.len() < max {
            match self.deadlines.first() {
                Some(&(d, id)) if d <= now_ms => {
                    self.deadlines.pop_first();
                    if let Some(p) = self.by_id.remove(&id) {
                        out.push((id, p));
                    }
                }
                _ => break,
            }
        }
    }

    /// Every pending request id (for shutdown).
    pub fn ids(&self) -> Vec<u64> {
        self.by_id.keys().copied().collect()
    }

    /// Requests pending.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when none are pending.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
