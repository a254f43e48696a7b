//! GPS ingest on a logic shard: the heaviest stream by far, so the app-server gets at most one
//! point per driver per flush interval (coalescing), unless every point is asked for.

use crate::hash::UidHash;
use schema::wire::{GpsPoint, UidGpsPoint};
use std::collections::HashMap;

/// How points are kept between flushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Keep the newest point per driver (by fix time); older ones are counted as coalesced.
    Latest,
    /// Keep every point, up to the buffer bound (for capacity comparisons with brokers).
    All,
}

/// Counters the gate exports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpsStats {
    /// Points received.
    pub points_in: u64,
    /// Points handed to a flush.
    pub points_out: u64,
    /// Points replaced by a newer point of the same driver before a flush.
    pub coalesced: u64,
    /// Points dropped because the `All` buffer was full.
    pub dropped: u64,
    /// Flushes that produced a batch.
    pub flushes: u64,
}

/// Points waiting for the next flush.
#[derive(Debug)]
pub struct Coalescer {
    /// Forwarding mode.
    mode: Forward,
    /// Latest point per driver (mode `Latest`).
    latest: HashMap<u64, GpsPoint, UidHash>,
    /// Every point in arrival order (mode `All`), at most `max_buffered`.
    all: Vec<UidGpsPoint>,
    /// Bound on `all`.
    max_buffered: usize,
    /// Counters.
    pub stats: GpsStats,
}

impl Coalescer {
    /// A coalescer in `mode`, buffering at most `max_buffered` points in mode `All`.
    pub fn new(mode: Forward, max_buffered: usize) -> Coalescer {
        Coalescer {
            mode,
            latest: HashMap::default(),
            all: Vec::new(),
            max_buffered,
            stats: GpsStats::default(),
        }
    }

    /// Takes one point of `uid`.
    #[inline]
    pub fn push(&mut self, uid: u64, point: GpsPoint) {
        self.stats.points_in += 1;
        match self.mode {
            Forward::Latest => match self.latest.entry(uid) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    self.stats.coalesced += 1;
                    // Out-of-order arrival (a batch replayed after a reconnect) must not move a
                    // driver back in time.
                    if point.ts_ms() >= e.get().ts_ms() {
                        e.insert(point);
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(point);
                }
            },
            Forward::All => {
                if self.all.len() >= self.max_buffered {
                    self.stats.dropped += 1;
                } else {
                    self.all.push(UidGpsPoint::new(uid, &point));
                }
            }
        }
    }

    /// Points waiting.
    pub fn pending(&self) -> usize {
        self.latest.len() + self.all.len()
    }

    /// Moves every waiting point into `out` (appended), leaving the coalescer empty.
    pub fn flush_into(&mut self, out: &mut Vec<UidGpsPoint>) -> usize {
        let before = out.len();
        out.extend(self.latest.drain().map(|(uid, p)| UidGpsPoint::new(uid, &p)));
        out.append(&mut self.all);
        let n = out.len() - before;
        if n > 0 {
            self.stats.points_out += n as u64;
            self.stats.flushes += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ts: u64) -> GpsPoint {
        GpsPoint::new(ts, 1, 2, 0, 0, 0, 0)
    }

    #[test]
    fn latest_keeps_one_point_per_driver() {
        let mut c = Coalescer::new(Forward::Latest, 10);
        for ts in 1..=5 {
            c.push(1, p(ts));
        }
        c.push(1, p(3)); // late, older: must not win
        c.push(2, p(9));
        let mut out = Vec::new();
        assert_eq!(c.flush_into(&mut out), 2);
        out.sort_by_key(|x| x.uid());
        assert_eq!(out[0].point().ts_ms(), 5);
        assert_eq!(out[1].point().ts_ms(), 9);
        assert_eq!(c.stats, GpsStats { points_in: 7, points_out: 2, coalesced: 5, dropped: 0, flushes: 1 });
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn all_keeps_every_point_up_to_the_bound() {
        let mut c = Coalescer::new(Forward::All, 3);
        for ts in 1..=5 {
            c.push(1, p(ts));
        }
        let mut out = Vec::new();
        assert_eq!(c.flush_into(&mut out), 3);
        assert_eq!(c.stats.dropped, 2);
        assert_eq!(out.iter().map(|x| x.point().ts_ms()).collect::<Vec<_>>(), vec![1, 2, 3]);
    }
}
