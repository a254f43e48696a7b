//! A hashed timing wheel of 1 ms ticks: when each connection of a loop is next due (a GPS
//! send, a keepalive, a reconnect, a timeout). Inserting and expiring are O(1) per entry,
//! whatever the number of connections, and nothing is kept per connection but its entry.
//!
//! A deadline more than one turn of the wheel away sits in its slot with its full tick and is
//! passed over (kept) until its turn comes. The wheel does not delete: a connection whose
//! deadline moved leaves its old entry behind, and the owner recognises a stale entry when it
//! fires by comparing the tick with the one it armed last ([`Wheel::expire`] hands back both).
//! Stale entries are dropped when their slot is visited; the owner keeps their number bounded
//! by arming only deadlines earlier than the one already armed (a later one is found when the
//! earlier entry fires and finds nothing due), and [`Wheel::len`] lets it rebuild if needed.

/// Slots in the wheel: 4.096 s of 1 ms ticks in one turn. Longer deadlines (keepalives,
/// session and request timeouts) wait in their slot for a later turn.
const SLOTS: usize = 4096;

/// One armed deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Its tick.
    tick: u64,
    /// Whose: the owner's index.
    key: u32,
}

/// The wheel. Ticks are counted by the owner (ms since its start).
#[derive(Debug)]
pub struct Wheel {
    /// `SLOTS` slots; entry `e` is in slot `e.tick % SLOTS`.
    slots: Vec<Vec<Entry>>,
    /// The first tick not yet expired: every entry has `tick >= next`.
    next: u64,
    /// Entries held, stale ones included.
    len: usize,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel::new()
    }
}

impl Wheel {
    /// An empty wheel at tick 0.
    pub fn new() -> Wheel {
        Wheel { slots: (0..SLOTS).map(|_| Vec::new()).collect(), next: 0, len: 0 }
    }

    /// Arms `key` at `tick`; a tick already expired is moved to the next one to expire, so an
    /// overdue deadline fires at the next [`Wheel::expire`], never in the middle of one. Returns
    /// the tick armed.
    pub fn insert(&mut self, tick: u64, key: u32) -> u64 {
        let tick = tick.max(self.next);
        self.slots[slot(tick)].push(Entry { tick, key });
        self.len += 1;
        tick
    }

    /// Takes every entry with `tick <= now` into `fired` as (key, tick), in no particular order;
    /// later entries stay. A wheel not expired for longer than a turn visits each slot once.
    pub fn expire(&mut self, now: u64, fired: &mut Vec<(u32, u64)>) {
        if now < self.next {
            return;
        }
        let visits = (now - self.next + 1).min(SLOTS as u64);
        for t in self.next..self.next + visits {
            let entries = &mut self.slots[slot(t)];
            let before = entries.len();
            entries.retain(|e| {
                let due = e.tick <= now;
                if due {
                    fired.push((e.key, e.tick));
                }
                !due
            });
            self.len -= before - entries.len();
        }
        self.next = now + 1;
    }

    /// The first tick from the next one to expire up to `horizon` ticks on whose slot holds an
    /// entry (possibly one for a later turn: an early wake-up costs only a look); `None` if
    /// those slots are empty.
    pub fn next_busy(&self, horizon: u64) -> Option<u64> {
        (self.next..self.next + horizon.min(SLOTS as u64)).find(|&t| !self.slots[slot(t)].is_empty())
    }

    /// Entries held, stale ones included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every entry (the owner re-arms what it still needs).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.clear();
        }
        self.len = 0;
    }
}

fn slot(tick: u64) -> usize {
    (tick % SLOTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expire(w: &mut Wheel, now: u64) -> Vec<(u32, u64)> {
        let mut fired = Vec::new();
        w.expire(now, &mut fired);
        fired.sort_unstable();
        fired
    }

    #[test]
    fn entries_fire_at_their_tick_and_not_before() {
        let mut w = Wheel::new();
        w.insert(5, 1);
        w.insert(3, 2);
        w.insert(5, 3);
        assert_eq!(expire(&mut w, 2), vec![]);
        assert_eq!(expire(&mut w, 3), vec![(2, 3)]);
        assert_eq!(expire(&mut w, 4), vec![]);
        assert_eq!(expire(&mut w, 9), vec![(1, 5), (3, 5)]);
        assert!(w.is_empty());
    }

    #[test]
    fn deadlines_past_one_turn_wait_for_their_own() {
        let mut w = Wheel::new();
        let far = SLOTS as u64 * 2 + 7;
        w.insert(far, 1);
        w.insert(7, 2);
        assert_eq!(expire(&mut w, 7), vec![(2, 7)]);
        assert_eq!(expire(&mut w, SLOTS as u64 + 7), vec![], "same slot, a turn too early");
        assert_eq!(w.len(), 1);
        assert_eq!(expire(&mut w, far), vec![(1, far)]);
    }

    #[test]
    fn an_overdue_insert_fires_at_the_next_expire() {
        let mut w = Wheel::new();
        assert_eq!(expire(&mut w, 100), vec![]);
        assert_eq!(w.insert(50, 9), 101, "moved to the first tick not expired");
        assert_eq!(expire(&mut w, 101), vec![(9, 101)]);
    }

    #[test]
    fn a_long_stall_visits_each_slot_once_and_loses_nothing() {
        let mut w = Wheel::new();
        for k in 0..10u32 {
            w.insert(u64::from(k) * 1000, k);
        }
        let fired = expire(&mut w, 5 * SLOTS as u64);
        assert_eq!(fired.len(), 10);
        assert!(w.is_empty());
        assert_eq!(w.insert(0, 1), 5 * SLOTS as u64 + 1);
    }

    #[test]
    fn next_busy_looks_ahead_within_the_horizon() {
        let mut w = Wheel::new();
        assert_eq!(w.next_busy(16), None);
        w.insert(12, 1);
        assert_eq!(w.next_busy(16), Some(12));
        assert_eq!(w.next_busy(10), None);
        let _ = expire(&mut w, 12);
        assert_eq!(w.next_busy(16), None);
    }
}
