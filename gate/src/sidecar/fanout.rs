//! A push's targets on this logic shard, taken in bounded slices: a push to thousands of uids
//! (or a broadcast to every driver) must not hold up the pushes, acks and GPS behind it for the
//! whole time its deliveries take to write. A push arriving here delivers at most [`SLICE`]
//! targets in the turn it arrives; the rest waits in [`Fanouts`], and every later turn takes
//! up to [`TURN_BUDGET`] waiting targets, oldest push first, with the loop's reads, acks and
//! writes between turns. A push to a few drivers therefore never waits behind a large one for
//! more than a slice of it.
//!
//! Pushes to one uid keep the order they were accepted in (docs/PROTOCOL.md §9.10): a push that
//! names a uid some waiting push has still to reach joins the back of the queue, whole, and the
//! queue is taken in order. Only a push with no target among those waiting goes ahead. Which
//! uids wait is kept as a count per uid, so the check costs a lookup per target, whatever the
//! queue's length.
//!
//! The push's room (`sidecar::room`) was reserved for all its targets when it was accepted; each
//! slice settles its own share, so what waits here still counts against the gate's bound.

use crate::state::Shard;
use logic::{Input, Output, PushContent, Tally};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Targets of one push delivered in one turn. A slice of 256 deliveries is written in well
/// under a millisecond (each is one queued send), so a small push behind it waits at most that.
pub const SLICE: usize = 256;

/// Waiting targets delivered in one turn, over all waiting pushes.
pub const TURN_BUDGET: usize = 4 * SLICE;

/// Targets one logic shard may have waiting for their slice before pushes that name it are
/// refused Overloaded: about half a second of writes on one core. Past it the shard is behind
/// what the app-server offers, and what it accepted more would be delivered ever later, then
/// after its deadline: refused, the app-server hears so at once and may come back.
pub const MAX_WAITING: usize = 65_536;

/// True when a push reserving `want[s]` targets on each logic shard `s` names a shard with more
/// than [`MAX_WAITING`] targets waiting (as the shards last published it, a turn ago at most).
pub fn behind(shard: &Shard, want: &[u32]) -> bool {
    want.iter().enumerate().any(|(s, &n)| {
        n > 0
            && shard.all_metrics[s].push_targets_waiting.load(std::sync::atomic::Ordering::Relaxed)
                > MAX_WAITING as i64
    })
}

/// One push's targets not yet delivered.
#[derive(Debug)]
struct Waiting {
    push: Arc<PushContent>,
    uids: Vec<u64>,
    /// Targets delivered so far (`uids[..next]`).
    next: usize,
    /// Room reserved for the targets not yet delivered, settled slice by slice.
    reserved: u32,
}

/// Pushes with targets still to deliver, in arrival order.
#[derive(Debug, Default)]
pub struct Fanouts {
    waiting: VecDeque<Waiting>,
    /// How many waiting pushes have each uid still to reach (a uid absent: none).
    uids: HashMap<u64, u32>,
    /// Targets waiting over all pushes.
    targets: usize,
}

impl Fanouts {
    /// True when some push has targets left to deliver: the loop takes another turn at once.
    pub fn pending(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Targets waiting over all pushes.
    pub fn targets(&self) -> usize {
        self.targets
    }

    /// True when a waiting push has one of `uids` still to reach.
    fn waits_for_any(&self, uids: &[u64]) -> bool {
        !self.uids.is_empty() && uids.iter().any(|u| self.uids.contains_key(u))
    }

    /// `w`'s targets not yet delivered join the queue's back.
    fn enqueue(&mut self, w: Waiting) {
        for &u in &w.uids[w.next..] {
            *self.uids.entry(u).or_default() += 1;
        }
        self.targets += w.uids.len() - w.next;
        self.waiting.push_back(w);
    }

    /// `uids` of a waiting push were delivered.
    fn delivered(&mut self, uids: &[u64]) {
        for u in uids {
            if let Some(n) = self.uids.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    self.uids.remove(u);
                }
            }
        }
        self.targets -= uids.len();
    }
}

/// A push's targets on this shard arrived, with the room reserved for them: the first slice is
/// delivered now, the rest waits for the next turns; all of it waits when a waiting push has one
/// of its targets still to reach.
pub fn push(shard: &mut Shard, push: Arc<PushContent>, uids: Vec<u64>, reserved: u32, now: u64) {
    let mut w = Waiting { push, uids, next: 0, reserved };
    if !shard.fanouts.waits_for_any(&w.uids) {
        slice(shard, &mut w, now);
    }
    if w.next < w.uids.len() {
        shard.fanouts.enqueue(w);
    }
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

/// One turn: up to [`TURN_BUDGET`] waiting targets, oldest push first (in order, so a push
/// queued behind one it shares a uid with is reached after it).
pub fn turn(shard: &mut Shard, now: u64) {
    let mut budget = TURN_BUDGET;
    // Each slice takes at least one target or ends a push, so this ends within the budget plus
    // the queue's length.
    while budget > 0 {
        let Some(mut w) = shard.fanouts.waiting.pop_front() else { break };
        let taken = queued_slice(shard, &mut w, budget.min(SLICE), now);
        budget = budget.saturating_sub(taken.max(1));
        if w.next < w.uids.len() {
            shard.fanouts.waiting.push_front(w);
        }
    }
}

/// Every waiting target at once, in order: shutdown ends what is in flight only after every
/// accepted target was taken (each then gets its receipt).
pub fn finish(shard: &mut Shard, now: u64) {
    while let Some(mut w) = shard.fanouts.waiting.pop_front() {
        while w.next < w.uids.len() {
            queued_slice(shard, &mut w, SLICE, now);
        }
    }
}

/// The next slice (at most `max` targets) of a push that was queued: the uids it delivers no
/// longer wait.
fn queued_slice(shard: &mut Shard, w: &mut Waiting, max: usize, now: u64) -> usize {
    let from = w.next;
    let n = slice_of(shard, w, max, now);
    shard.fanouts.delivered(&w.uids[from..from + n]);
    n
}

/// Delivers the first slice of a push not queued; returns how many targets it took.
fn slice(shard: &mut Shard, w: &mut Waiting, now: u64) -> usize {
    slice_of(shard, w, SLICE, now)
}

/// Delivers the next slice of `w`, at most `max` targets; returns how many it took.
fn slice_of(shard: &mut Shard, w: &mut Waiting, max: usize, now: u64) -> usize {
    let end = (w.next + max).min(w.uids.len());
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
