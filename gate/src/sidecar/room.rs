//! The gate's bound on pushes in flight (`limits.max_pushes_in_flight_per_shard`): room per
//! logic shard, shared by every executor, so a sidecar on any shard can refuse a Push with
//! Overloaded before it accepts pairs that no logic shard could hold.
//!
//! A logic shard's count is its pairs in flight (waiting for their ack in a session, or, in
//! cluster mode, for another node's receipt) plus the room sidecars reserved for pushes still on
//! their way to it. A sidecar reserves for every shard a push touches, all or nothing, before it
//! answers PushAccepted; the logic shard, once it took the push, publishes its new count and
//! gives the reservation back in one atomic step, so two sidecars on two cores never both take
//! the last room. Pairs that arrive without a reservation (pushed from another node, or with a
//! session moving here) are counted when the shard publishes, at the end of its turn, and are
//! not refused: another node accepted them already.

use std::sync::atomic::{AtomicI64, Ordering::SeqCst};

/// Room for pushes in flight, one count per logic shard.
#[derive(Debug)]
pub struct PushRoom {
    /// Pairs one logic shard may hold in flight.
    bound: i64,
    /// Per logic shard: pairs in flight as it last published them, plus reservations.
    used: Vec<AtomicI64>,
}

impl PushRoom {
    /// Room for `shards` logic shards of `bound` pairs each.
    pub fn new(shards: usize, bound: u32) -> PushRoom {
        PushRoom { bound: bound as i64, used: (0..shards).map(|_| AtomicI64::new(0)).collect() }
    }

    /// Reserves `want[s]` pairs on every logic shard `s`, all or none: false (and nothing
    /// reserved) when one of them has not the room.
    pub fn reserve(&self, want: &[u32]) -> bool {
        for (s, &n) in want.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let n = n as i64;
            let bound = self.bound;
            let taken = self.used[s].fetch_update(SeqCst, SeqCst, |u| (u + n <= bound).then_some(u + n));
            if taken.is_err() {
                self.release(&want[..s]);
                return false;
            }
        }
        true
    }

    /// Gives back reservations (`want[s]` on shard `s`).
    pub fn release(&self, want: &[u32]) {
        for (s, &n) in want.iter().enumerate() {
            if n > 0 {
                self.used[s].fetch_sub(n as i64, SeqCst);
            }
        }
    }

    /// Logic shard `s` publishes a change of its count: pairs in flight it gained (or lost, when
    /// negative) since it last published, less the reservations its step used up.
    pub fn settle(&self, s: usize, delta: i64) {
        if delta != 0 {
            self.used[s].fetch_add(delta, SeqCst);
        }
    }

    /// Logic shard `s`'s count: its pairs in flight plus reservations.
    pub fn used(&self, s: usize) -> i64 {
        self.used[s].load(SeqCst)
    }

    /// Pairs one logic shard may hold.
    pub fn bound(&self) -> u32 {
        self.bound as u32
    }
}

#[cfg(test)]
mod tests {
    use super::PushRoom;

    #[test]
    fn reservations_are_all_or_none_and_settle_into_the_count() {
        let room = PushRoom::new(2, 10);
        assert!(room.reserve(&[4, 10]));
        assert!(!room.reserve(&[1, 1]), "shard 1 is full");
        assert_eq!((room.used(0), room.used(1)), (4, 10), "the refused one reserved nothing");
        // Shard 1 took its push: 6 of the 10 became pairs in flight, 4 ended at once.
        room.settle(1, 6 - 10);
        assert!(room.reserve(&[0, 4]));
        assert!(!room.reserve(&[0, 1]));
        // Pairs end (acked, expired): room again.
        room.settle(1, -3);
        assert!(room.reserve(&[6, 3]));
        assert_eq!((room.used(0), room.used(1)), (10, 10));
        room.release(&[6, 3]);
        assert_eq!((room.used(0), room.used(1)), (4, 7));
    }

    #[test]
    fn concurrent_reservations_never_pass_the_bound() {
        let room = std::sync::Arc::new(PushRoom::new(1, 1_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let room = room.clone();
                std::thread::spawn(move || (0..1_000).filter(|_| room.reserve(&[3])).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!(taken, 333, "exactly what fits");
        assert_eq!(room.used(0), 999);
    }
}
