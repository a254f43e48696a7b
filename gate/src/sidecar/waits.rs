//! App-server requests waiting on one gate shard for answers from elsewhere (logic shards, the
//! directory, other nodes): EndSession asks (`super::end`) and geo requests (`super::geo`).
//!
//! Each waits under a tag that carries the gate shard in its top 16 bits, so an answer finds
//! its way back without a lookup; tags count up in the bits below `BITS` (the bits above are
//! the caller's to mark its own uses). Bounded in number (`MAX`), each with a deadline.

use logic::{ConnRef, Origin};
use std::collections::{BTreeSet, HashMap};

/// Where the tag's shard bits start: where the logic shard reads them to route its answers.
pub const SHARD_SHIFT: u32 = logic::shard::END_TAG_SHIFT;
const _: () = assert!(SHARD_SHIFT == logic::shard::GEO_TAG_SHIFT);

/// Who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// An app-server on this shard: the answer is a frame on its connection.
    Sidecar {
        /// The connection.
        conn: ConnRef,
        /// The request's sequence-id.
        seq: u32,
    },
    /// Another node, for its app-server: the answer is a node message.
    Node {
        /// The node.
        origin: Origin,
        /// Its tag.
        tag: u64,
    },
}

/// A waiting request's deadline (monotonic ms).
pub trait Deadline {
    /// When it fails for want of an answer.
    fn deadline(&self) -> u64;
}

/// The requests of one kind waiting on one gate shard: at most `MAX`, tags counting below bit
/// `BITS`.
#[derive(Debug)]
pub struct Waits<W, const MAX: usize, const BITS: u32> {
    /// The last tag's count.
    pub(super) next: u64,
    /// By tag.
    waiting: HashMap<u64, W>,
    /// (deadline, tag), earliest first.
    by_deadline: BTreeSet<(u64, u64)>,
}

impl<W, const MAX: usize, const BITS: u32> Default for Waits<W, MAX, BITS> {
    fn default() -> Self {
        Waits { next: 0, waiting: HashMap::new(), by_deadline: BTreeSet::new() }
    }
}

impl<W: Deadline, const MAX: usize, const BITS: u32> Waits<W, MAX, BITS> {
    /// Registers a request of gate shard `shard`; its tag, or `None` when `MAX` wait.
    pub fn insert(&mut self, shard: u16, w: W) -> Option<u64> {
        if self.waiting.len() >= MAX {
            return None;
        }
        self.next = (self.next + 1) & ((1 << BITS) - 1);
        let tag = ((shard as u64) << SHARD_SHIFT) | self.next;
        self.by_deadline.insert((w.deadline(), tag));
        self.waiting.insert(tag, w);
        Some(tag)
    }

    /// Takes a request, once.
    pub fn take(&mut self, tag: u64) -> Option<W> {
        let w = self.waiting.remove(&tag)?;
        self.by_deadline.remove(&(w.deadline(), tag));
        Some(w)
    }

    /// The request of `tag`.
    pub fn get(&self, tag: u64) -> Option<&W> {
        self.waiting.get(&tag)
    }

    /// The request of `tag`, to move it on.
    pub fn get_mut(&mut self, tag: u64) -> Option<&mut W> {
        self.waiting.get_mut(&tag)
    }

    /// Every request waiting, by tag.
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &W)> {
        self.waiting.iter()
    }

    /// Tags of at most `max` requests whose deadline is `now` or past, earliest first.
    pub fn due(&self, now: u64, max: usize) -> Vec<u64> {
        self.by_deadline.iter().take_while(|d| d.0 <= now).take(max).map(|d| d.1).collect()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        self.by_deadline.first().map(|d| d.0)
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when none wait.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}
