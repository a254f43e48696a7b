//! Write marks: when a connection's queued bytes reach the kernel, for the push-path histograms
//! (`fleetgate_push_delivery_us`, `fleetgate_push_receipt_us`).
//!
//! A delivery (or a Receipts frame) ends at some byte of its connection's out queue, and that
//! byte may leave in this turn's send, a later partial send, a task's blocked write or a ring
//! send. Rather than follow the bytes through every path, a connection counts the bytes handed
//! to the kernel (`sent`) and remembers, for each measured frame, the count its last byte ends
//! at; a write that moves `sent` past a mark observes it. Offsets count from the marks' creation,
//! so a connection that never carries a push pays one null pointer.

use crate::metrics::PushHistogram;
use std::collections::VecDeque;

/// Marks one connection keeps: past it the oldest is dropped unobserved (a connection whose
/// queue holds that many unsent deliveries is nearly a slow consumer; the bound keeps its cost
/// fixed).
pub const MAX_MARKS: usize = 256;

/// When a measured frame's clock started: one time (a delivery) or one per receipt in a
/// Receipts frame (boxed: the great majority of marks are deliveries).
#[derive(Debug)]
pub enum Started {
    /// A delivery: its push's sidecar read (monotonic µs).
    One(u64),
    /// A Receipts frame: the ack read of each receipt it carries that an ack caused.
    Many(Box<[u64]>),
}

/// A connection's write marks.
#[derive(Debug, Default)]
pub struct WriteMarks {
    /// Bytes handed to the kernel since these marks were created.
    sent: u64,
    /// (offset one past the frame's last byte, when its clock started), in queue order.
    marks: VecDeque<(u64, Started)>,
}

impl WriteMarks {
    /// Marks a frame that ends where the queue now ends: `queued` bytes are waiting (in flight
    /// to a writer and in the out queue).
    pub fn mark(&mut self, queued: usize, started: Started) {
        if self.marks.len() >= MAX_MARKS {
            self.marks.pop_front();
        }
        self.marks.push_back((self.sent + queued as u64, started));
    }

    /// The queue's unsealed tail (from `from` bytes of what waits) became records ending where
    /// `queued` bytes now wait: frames that ended in it end with the records.
    pub fn sealed(&mut self, from: usize, queued: usize) {
        let (from, end) = (self.sent + from as u64, self.sent + queued as u64);
        for (at, _) in self.marks.iter_mut().rev() {
            if *at <= from {
                break;
            }
            *at = end;
        }
    }

    /// `n` more bytes were handed to the kernel: marks they pass go into `h`, measured to
    /// `now_us()` (read only when a mark is passed: most writes pass none).
    pub fn wrote(&mut self, n: usize, now_us: impl FnOnce() -> u64, h: &PushHistogram) {
        self.sent += n as u64;
        if self.marks.front().is_none_or(|(at, _)| *at > self.sent) {
            return;
        }
        let now_us = now_us();
        while let Some((at, _)) = self.marks.front() {
            if *at > self.sent {
                break;
            }
            let Some((_, started)) = self.marks.pop_front() else { break };
            match started {
                Started::One(t) => h.observe_us(now_us.saturating_sub(t)),
                Started::Many(ts) => ts.iter().for_each(|&t| h.observe_us(now_us.saturating_sub(t))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(h: &PushHistogram) -> u64 {
        h.count()
    }

    #[test]
    fn a_mark_is_observed_when_its_last_byte_is_written() {
        let h = PushHistogram::default();
        let mut w = WriteMarks::default();
        w.mark(100, Started::One(10));
        w.mark(150, Started::Many(vec![5, 6].into_boxed_slice()));
        w.wrote(99, || 20, &h);
        assert_eq!(count(&h), 0);
        w.wrote(1, || 20, &h);
        assert_eq!(count(&h), 1);
        w.wrote(60, || 30, &h);
        assert_eq!(count(&h), 3);
        assert_eq!(h.sum(), 10 + 25 + 24);
    }

    #[test]
    fn sealing_moves_marks_to_the_records_end() {
        let h = PushHistogram::default();
        let mut w = WriteMarks::default();
        w.mark(40, Started::One(1));
        w.mark(80, Started::One(1));
        // 50 bytes were sealed already; the 30 after them became 60 bytes of records.
        w.sealed(50, 110);
        w.wrote(109, || 2, &h);
        assert_eq!(count(&h), 1);
        w.wrote(1, || 2, &h);
        assert_eq!(count(&h), 2);
    }

    #[test]
    fn marks_are_bounded() {
        let h = PushHistogram::default();
        let mut w = WriteMarks::default();
        for i in 0..(MAX_MARKS + 10) {
            w.mark(i + 1, Started::One(0));
        }
        assert_eq!(w.marks.len(), MAX_MARKS);
        w.wrote(usize::MAX / 2, || 1, &h);
        assert_eq!(count(&h), MAX_MARKS as u64);
    }
}
