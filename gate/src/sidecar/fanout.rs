//! A push's targets on this logic shard, taken in bounded slices: a push to thousands of uids
//! (or a broadcast to every driver) must not hold up the pushes, acks and GPS behind it for the
//! whole time its deliveries take to write. A push arriving here delivers at most [`SLICE`]
//! targets in the turn it arrives; the rest waits in [`Fanouts`], and every later turn takes
//! up to [`TURN_BUDGET`] waiting targets, oldest push first, with the loop's reads, acks and
//! writes between turns. A push to a few drivers therefore never waits behind a large one for
//! more than a slice of it.
//!
//! Pushes to one uid keep the order they were accepted in (docs/PROTOCOL.md §9.10): a push that
//! names a uid some waiting push has still to reach joins the back of the queue, whole. Only a
//! push with no target among those waiting goes ahead. Which pushes wait for each uid is kept
//! per uid, oldest first, so the check costs a lookup per target, whatever the queue's length.
//!
//! A turn walks the oldest push's targets, and a target it reaches takes every waiting push's
//! delivery to that uid at once, in the order the pushes were accepted. That keeps each uid's
//! order and lets the deliveries to one driver leave in one send. It matters at the core's
//! limit, where the queue holds many pushes that name the same drivers: a send on loopback costs
//! about 12 µs of the gate's core, several deliveries' worth, and taking one push's slice at a
//! time had made every delivery a send of its own (measured: 65k sends/s for 65k deliveries/s,
//! against 39k sends/s for 167k deliveries/s when the deliveries to a driver left together).
//!
//! The push's room (`sidecar::room`) was reserved for all its targets when it was accepted; each
//! slice settles its own share, so what waits here still counts against the gate's bound.

use crate::state::Shard;
use logic::{Input, Output, PushContent, Tally};
use std::collections::{BTreeMap, HashMap, VecDeque};
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

/// Distinct positions of waiting pushes a turn may look at, taken or not: a push whose targets
/// were mostly taken with older pushes' is walked past in bounded steps.
const TURN_LOOKS: usize = 16 * TURN_BUDGET;

/// Deliveries of one push taken together: the push, the uids, and the share of its reserved
/// room they settle.
type Slice = (Arc<PushContent>, Vec<u64>, u32);

/// One push's targets not yet delivered.
#[derive(Debug)]
struct Waiting {
    push: Arc<PushContent>,
    uids: Vec<u64>,
    /// Targets before this position were all delivered; after it, some may have been, with an
    /// older push's delivery to the same uid.
    next: usize,
    /// Targets not yet delivered.
    left: usize,
    /// Room reserved for the targets not yet delivered, settled as they are.
    reserved: u32,
}

/// Pushes with targets still to deliver, in arrival order.
#[derive(Debug, Default)]
pub struct Fanouts {
    waiting: VecDeque<Waiting>,
    /// Sequence number of `waiting`'s front; `waiting[i]` is push `first + i`.
    first: u64,
    /// For each uid some waiting push has still to reach: those pushes, oldest first (a uid
    /// absent: none).
    uids: HashMap<u64, Vec<u64>, logic::hash::UidHash>,
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
    fn enqueue(&mut self, mut w: Waiting) {
        let seq = self.first + self.waiting.len() as u64;
        for &u in &w.uids[w.next..] {
            self.uids.entry(u).or_default().push(seq);
        }
        w.left = w.uids.len() - w.next;
        self.targets += w.left;
        self.waiting.push_back(w);
    }

    /// A push's targets here arrived, with the room reserved for them: returns its first slice
    /// (the push, its uids, the share of the reservation they settle) when no waiting push
    /// names any of its uids; what is not in it waits.
    fn arrive(&mut self, push: Arc<PushContent>, uids: Vec<u64>, reserved: u32) -> Option<Slice> {
        let mut w = Waiting { push, uids, next: 0, left: 0, reserved };
        let first = (!self.waits_for_any(&w.uids)).then(|| {
            let end = SLICE.min(w.uids.len());
            w.next = end;
            let share = if end == w.uids.len() { w.reserved } else { (end as u32).min(w.reserved) };
            w.reserved -= share;
            (w.push.clone(), w.uids[..end].to_vec(), share)
        });
        if w.next < w.uids.len() {
            self.enqueue(w);
        }
        first
    }

    /// Takes up to about `budget` waiting deliveries (one uid's deliveries are taken together,
    /// so the last uid may go over it by the pushes waiting for it): for each waiting push with
    /// deliveries taken, oldest first, the push, the uids taken and the share of its
    /// reservation they settle. Pushes with nothing left leave the queue.
    fn take(&mut self, budget: usize, looks: usize) -> Vec<Slice> {
        // By the push's place in the queue: a few pushes each turn, however long the queue.
        let mut taken: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        let (mut count, mut looked, mut k) = (0, 0, 0);
        // Each step looks at one position (bounded by `looks`) or passes a push with nothing
        // left (bounded by the queue's length).
        while count < budget && looked < looks && k < self.waiting.len() {
            let w = &mut self.waiting[k];
            if w.left == 0 || w.next == w.uids.len() {
                k += 1;
                continue;
            }
            let seq = self.first + k as u64;
            let u = w.uids[w.next];
            w.next += 1;
            looked += 1;
            // Every push before `k` has nothing left, so a uid `k` still has to reach has `k`
            // as its oldest waiting push; anything else was taken with an older push.
            if self.uids.get(&u).and_then(|s| s.first()) != Some(&seq) {
                continue;
            }
            for s in self.uids.remove(&u).expect("looked up") {
                let i = (s - self.first) as usize;
                taken.entry(i).or_default().push(u);
                self.waiting[i].left -= 1;
                count += 1;
            }
        }
        self.targets -= count;
        let mut out = Vec::new();
        for (i, uids) in taken {
            let w = &mut self.waiting[i];
            // The last delivery settles whatever is left of the reservation (a broadcast
            // reserved for the sessions it expected, which may differ from those it found).
            let share = if w.left == 0 { w.reserved } else { (uids.len() as u32).min(w.reserved) };
            w.reserved -= share;
            out.push((w.push.clone(), uids, share));
        }
        while self.waiting.front().is_some_and(|w| w.left == 0) {
            self.waiting.pop_front();
            self.first += 1;
        }
        out
    }
}

/// A push's targets on this shard arrived, with the room reserved for them: the first slice is
/// delivered now, the rest waits for the next turns; all of it waits when a waiting push has one
/// of its targets still to reach.
pub fn push(shard: &mut Shard, push: Arc<PushContent>, uids: Vec<u64>, reserved: u32, now: u64) {
    let first = shard.fanouts.arrive(push, uids, reserved);
    deliver(shard, first.into_iter().collect(), now);
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

/// One turn: about [`TURN_BUDGET`] waiting deliveries, walking the oldest push's targets (each
/// with every later push's delivery to the same uid, so a push queued behind one it shares a
/// uid with is reached after it there).
pub fn turn(shard: &mut Shard, now: u64) {
    let slices = shard.fanouts.take(TURN_BUDGET, TURN_LOOKS);
    deliver(shard, slices, now);
}

/// Every waiting target at once, in order: shutdown ends what is in flight only after every
/// accepted target was taken (each then gets its receipt).
pub fn finish(shard: &mut Shard, now: u64) {
    while shard.fanouts.pending() {
        let slices = shard.fanouts.take(usize::MAX, usize::MAX);
        deliver(shard, slices, now);
    }
}

/// Hands each push's taken uids to the logic shard, oldest push first.
fn deliver(shard: &mut Shard, slices: Vec<Slice>, now: u64) {
    for (push, uids, share) in slices {
        crate::event_loop::logic_input(shard, Input::Push { push, uids }, now);
        // What the slice became (pairs in flight, or receipts at once) replaces its share of
        // the reservation in the shard's count, in one step.
        shard.publish_in_flight(share);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn content(message_id: u64) -> Arc<PushContent> {
        Arc::new(PushContent {
            message_id,
            body: Arc::from(&[][..]),
            log_id: message_id,
            deadline_ms: 0,
            origin: logic::push::LOCAL,
            accepted_us: 0,
        })
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A push to these uids arrives.
        Arrive(Vec<u64>),
        /// A turn with this budget and this many looks.
        Turn(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            // Few distinct uids, so pushes overlap; long enough to pass a first slice.
            prop::collection::vec(0u64..40, 0..700).prop_map(Step::Arrive),
            (1usize..300, 1usize..400).prop_map(|(b, l)| Step::Turn(b, l)),
        ]
    }

    proptest! {
        /// Whatever arrives and however the turns are bounded: every target is delivered once,
        /// each uid gets its pushes in the order they arrived, each push's reservation is settled
        /// exactly, and the count of targets waiting is what waits.
        #[test]
        fn every_target_once_each_uid_in_order_reservations_settled(steps in prop::collection::vec(step(), 1..40)) {
            let mut f = Fanouts::default();
            let mut pushes: Vec<Vec<u64>> = Vec::new();
            let mut got: Vec<(u64, u64)> = Vec::new();
            let mut settled: HashMap<u64, u32> = HashMap::new();
            let mut record = |slices: Vec<Slice>, got: &mut Vec<(u64, u64)>| {
                for (p, uids, share) in slices {
                    *settled.entry(p.message_id).or_default() += share;
                    got.extend(uids.into_iter().map(|u| (p.message_id, u)));
                }
            };
            for s in steps {
                match s {
                    Step::Arrive(uids) => {
                        let id = pushes.len() as u64;
                        pushes.push(uids.clone());
                        let n = uids.len() as u32;
                        let first = f.arrive(content(id), uids, n);
                        record(first.into_iter().collect(), &mut got);
                    }
                    Step::Turn(budget, looks) => {
                        let before = f.targets();
                        let slices = f.take(budget, looks);
                        let n: usize = slices.iter().map(|s| s.1.len()).sum();
                        prop_assert_eq!(f.targets(), before - n);
                        record(slices, &mut got);
                    }
                }
                let waiting: usize = f.waiting.iter().map(|w| w.left).sum();
                prop_assert_eq!(f.targets(), waiting);
            }
            while f.pending() {
                let slices = f.take(usize::MAX, usize::MAX);
                record(slices, &mut got);
            }
            prop_assert_eq!(f.targets(), 0);
            prop_assert!(f.uids.is_empty());
            // Every target once.
            for (id, uids) in pushes.iter().enumerate() {
                let mut want = uids.clone();
                want.sort_unstable();
                let mut had: Vec<u64> = got.iter().filter(|g| g.0 == id as u64).map(|g| g.1).collect();
                had.sort_unstable();
                prop_assert_eq!(had, want, "push {}", id);
                prop_assert_eq!(settled.get(&(id as u64)).copied().unwrap_or(0), uids.len() as u32, "push {} settled", id);
            }
            // Each uid's pushes in the order they arrived.
            let mut last: HashMap<u64, u64> = HashMap::new();
            for &(id, u) in &got {
                if let Some(&prev) = last.get(&u) {
                    prop_assert!(prev <= id, "uid {} got push {} after {}", u, id, prev);
                }
                last.insert(u, id);
            }
        }
    }

    #[test]
    fn a_turn_takes_a_uids_deliveries_from_every_waiting_push_at_once() {
        let mut f = Fanouts::default();
        // The first push delivers 256 targets at once and leaves 300 waiting; the second names
        // uid 555, which the first has still to reach, so it waits whole.
        let first = f.arrive(content(0), (0..556).collect(), 556).expect("nothing waited");
        assert_eq!(first.1.len(), SLICE);
        assert!(f.arrive(content(1), vec![555, 1_000], 2).is_none());
        assert_eq!(f.targets(), 300 + 2);
        // A turn of 299 deliveries reaches up to uid 554 of the first push.
        let slices = f.take(299, usize::MAX);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].1.len(), 299);
        // The next reaches 555: the first push's delivery and the second's, in that order, and
        // goes on to the second push's 1,000.
        let slices = f.take(usize::MAX, usize::MAX);
        let got: Vec<(u64, Vec<u64>, u32)> =
            slices.into_iter().map(|(p, u, s)| (p.message_id, u, s)).collect();
        assert_eq!(got, vec![(0, vec![555], 1), (1, vec![555, 1_000], 2)]);
        assert!(!f.pending());
    }
}
