//! fleetgate's logic shards: plain state plus a batched step, with no I/O and no clock.
//!
//! A logic shard owns the users whose `hash(uid) % shards` is its index: their session
//! directory entries and their GPS. The gate feeds it [`Input`]s with a `now_ms` and carries out
//! the [`Output`]s it returns (frames to connections, batches to the app-server side). Because
//! nothing here touches a socket or reads a clock, every rule is tested in microseconds with a
//! fake clock (see the tests at the bottom of each module).
//!
//! - [`directory`]: uid → the connection holding its session, with an epoch per new session.
//! - [`gps`]: GPS coalescing (latest point per driver per flush) or forwarding of every point.
//! - [`push`]: push fan-out, acks, time-to-live, exactly one receipt per (message id, uid).
//! - [`upstream`]: app requests waiting for the app-server's answer.
//! - [`shard`]: the step function tying them together.

pub mod directory;
pub mod geo;
pub mod gps;
pub mod hash;
pub mod push;
pub mod shard;
pub mod upstream;

pub use push::{Origin, PushContent, Receipt, LOCAL};
pub use shard::{CloseReason, Handed, HandedPush, Input, Output, RequestFailure, Shard, ShardConfig, Tally};

/// Identifies one connection on one gate shard. The generation makes a reused slot distinct, so
/// a late message for a closed connection can never reach its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// The gate shard (executor) the connection lives on.
    pub shard: u16,
    /// Slot in that shard's connection table.
    pub slot: u32,
    /// Generation of the slot when the connection was accepted.
    pub gen: u32,
}

/// The logic shard that owns `uid` among `shards`. A multiplicative hash spreads sequential
/// uids (the common case) evenly.
#[inline]
pub fn shard_of(uid: u64, shards: usize) -> usize {
    debug_assert!(shards > 0);
    let h = uid.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) as usize) % shards
}

/// `items` split by the logic shard owning each one's uid, in their order, one list per shard
/// (empty where none).
pub fn split_by_shard<T>(
    items: impl IntoIterator<Item = T>,
    shards: usize,
    uid: impl Fn(&T) -> u64,
) -> Vec<Vec<T>> {
    let mut per: Vec<Vec<T>> = (0..shards).map(|_| Vec::new()).collect();
    for item in items {
        per[shard_of(uid(&item), shards)].push(item);
    }
    per
}

#[cfg(test)]
mod tests {
    #[test]
    fn shard_of_spreads_sequential_uids() {
        let mut counts = [0usize; 4];
        for uid in 0..10_000u64 {
            counts[super::shard_of(uid, 4)] += 1;
        }
        for c in counts {
            assert!((2_000..3_000).contains(&c), "{counts:?}");
        }
    }
}
