//! A push's targets on this logic shard, taken in bounded slices: a push to thousands of uids
//! (or a broadcast to every driver) must not hold up the pushes, acks and GPS behind it for the
//! whole time its deliveries take to write. A push arriving here delivers at most
//! [`SLICE`] targets in the turn it arrives; the rest waits in [`Fanouts`], and every later turn
//! takes one slice of each waiting push in turn, at most [`TURN_BUDGET`] targets in all, with
//! the loop's reads, acks and writes between turns. A push to a few drivers therefore never
//! waits behind a large one for more than one slice of it.
//!
//! Pushes to one uid keep the order they were accepted in (docs/PROTOCOL.md §9.10): a push that
//! names a uid some waiting push has still to deliver to waits, whole, until every such push is
//! done. Only a push with no target in common with what waits goes ahead of it.
//!
//! The push's room (`sidecar::room`) was reserved for all its targets when it was accepted; each
//! slice settles its own share, so what waits here still counts against the gate's bound.

use crate::state::Shard;
use logic::{Input, Output, PushContent, Tally};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Targets of one push delivered in one turn. A slice of 256 deliveries is written in well
/// under a millisecond (each is one queued send), so a small push behind it waits at most that.
pub const SLICE: usize = 256;

/// Targets of waiting pushes delivered in one turn, over all of them.
pub const TURN_BUDGET: usize = 4 * SLICE;

/// One push's targets not yet delivered.
#[derive(Debug)]
struct Waiting {
    /// Its place in arrival order.
    id: u64,
    /// Waiting pushes that arrived before it with a target in common: it takes no slice until
    /// they are all done.
    after: Vec<u64>,
    push: Arc<PushContent>,
    /// Sorted, each uid once.
    uids: Vec<u64>,
    /// Targets delivered so far (`uids[..next]`).
    next: usize,
    /// Room reserved for the targets not yet delivered, settled slice by slice.
    reserved: u32,
}

/// Pushes with targets still to deliver, oldest first.
#[derive(Debug, Default)]
pub struct Fanouts {
    waiting: VecDeque<Waiting>,
    next_id: u64,
}

impl Fanouts {
    /// True when some push has targets left to deliver: the loop takes another turn at once.
    pub fn pending(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Targets waiting over all pushes.
    pub fn targets(&self) -> usize {
        self.waiting.iter().map(|w| w.uids.len() - w.next).sum()
    }
}

/// A push's targets on this shard arrived, with the room reserved for them: the first slice is
/// delivered now, the rest waits for the next turns.
pub fn push(shard: &mut Shard, push: Arc<PushContent>, mut uids: Vec<u64>, reserved: u32, now: u64) {
    // The sidecar sends each shard's targets sorted; a broadcast's come in the directory's order.
    if !uids.is_sorted() {
        uids.sort_unstable();
    }
    let f = &mut shard.fanouts;
    f.next_id += 1;
    let after: Vec<u64> = f.waiting.iter().filter(|w| shares_a_uid(w.left(), &uids)).map(|w| w.id).collect();
    let mut w = Waiting { id: f.next_id, after, push, uids, next: 0, reserved };
    if w.after.is_empty() {
        slice(shard, &mut w, now);
    }
    if w.next < w.uids.len() {
        shard.fanouts.waiting.push_back(w);
    }
}

impl Waiting {
    /// The targets not yet delivered.
    fn left(&self) -> &[u64] {
        &self.uids[self.next..]
    }
}

/// True when two sorted lists share a uid: each of the shorter looked up in the longer.
fn shares_a_uid(a: &[u64], b: &[u64]) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    short.iter().any(|u| long.binary_search(u).is_ok())
}

/// A broadcast arrived: its targets are the role's sessions here now (counted at once, so the
/// app-server's PushAccepted names them); a session that ends before its slice gets its receipt
/// as for any push to a uid gone.
pub fn broadcast(shard: &mut Shard, push: Arc<PushContent>, role: u8, tally: Tally, reserved: u32, now: u64) {
    let uids = shard.logic.uids_of_role(role);
    let targets = uids.len() as u32;
    crate::event_loop::apply(shard, Output::BroadcastCounted { tally, targets }, now);
    self::push(shard, push, uids, reserved, now);
}

/// One turn: a slice of each waiting push, oldest first, within the turn's budget; the push
/// whose slice the budget cut off goes first next turn.
pub fn turn(shard: &mut Shard, now: u64) {
    if shard.fanouts.waiting.is_empty() {
        return;
    }
    // Pushes done since a push began waiting no longer hold it back.
    let live: HashSet<u64> = shard.fanouts.waiting.iter().map(|w| w.id).collect();
    for w in &mut shard.fanouts.waiting {
        w.after.retain(|id| live.contains(id));
    }
    let mut budget = TURN_BUDGET;
    // Each waiting push at most once per turn, so the loop is bounded by the queue's length.
    for _ in 0..shard.fanouts.waiting.len() {
        if budget < SLICE {
            break;
        }
        let Some(mut w) = shard.fanouts.waiting.pop_front() else { break };
        if w.after.is_empty() {
            budget -= slice(shard, &mut w, now);
        }
        if w.next < w.uids.len() {
            shard.fanouts.waiting.push_back(w);
        }
    }
}

/// Every waiting target at once: shutdown ends what is in flight only after every accepted
/// target was taken (each then gets its receipt).
pub fn finish(shard: &mut Shard, now: u64) {
    // In arrival order: a push's targets in common with earlier ones go after theirs.
    shard.fanouts.waiting.make_contiguous().sort_unstable_by_key(|w| w.id);
    while let Some(mut w) = shard.fanouts.waiting.pop_front() {
        while w.next < w.uids.len() {
            slice(shard, &mut w, now);
        }
    }
}

/// Delivers the next slice of `w`; returns how many targets it took.
fn slice(shard: &mut Shard, w: &mut Waiting, now: u64) -> usize {
    let end = (w.next + SLICE).min(w.uids.len());
    let uids = w.uids[w.next..end].to_vec();
    w.next = end;
    // The last slice settles whatever is left of the reservation (a broadcast reserved for the
    // sessions it expected, which may differ from those it found).
    let share = if end == w.uids.len() { w.reserved } else { (uids.len() as u32).min(w.reserved) };
    w.reserved -= share;
    let n = uids.len();
    crate::event_loop::logic_input(shard, Input::Push { push: w.push.clone(), uids }, now);
    // What the slice became (pairs in flight, or receipts at once) replaces its share of the
    // reservation in the shard's count, in one step.
    shard.publish_in_flight(share);
    n
}

#[cfg(test)]
mod tests {
    use super::shares_a_uid;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shares_a_uid_is_a_nonempty_intersection(
            a in proptest::collection::btree_set(0u64..200, 0..40),
            b in proptest::collection::btree_set(0u64..200, 0..40),
        ) {
            let (a, b): (Vec<u64>, Vec<u64>) = (a.into_iter().collect(), b.into_iter().collect());
            prop_assert_eq!(shares_a_uid(&a, &b), a.iter().any(|u| b.contains(u)));
        }
    }
}
