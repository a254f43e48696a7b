//! The push audit: what the app-server pushed, what the gate accepted, what came back as
//! receipts (app-server side, [`Audit`]), and what the apps showed ([`Shown`], one per executor).
//!
//! Arithmetic, per message and then summed: a message the gate accepted for `a` targets must
//! end with `a` real receipts (delivered or one of the unreachable outcomes). Receipts the
//! client library made up because the gate went away (GateLost) are not real: those pairs
//! count as lost. `lost = Σ max(0, accepted − real receipts)`, which is
//! `accepted − delivered − unreachable` when no message got more receipts than targets.
//! A duplicate is a push an app showed although it had shown it before: the app's own bounded
//! de-duplication let it through, and the executor's record caught it.

use schema::wire::Outcome;
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// Most messages the app-server audit tracks; pushes past it are not sent (counted).
pub const MAX_MESSAGES: usize = 2_000_000;
/// Most delivered (message id, uid) pairs kept for the cross-check against what apps showed.
pub const MAX_DELIVERED_PAIRS: usize = 8_000_000;
/// Most shown (uid, message id) pairs one executor remembers.
pub const MAX_SHOWN_PAIRS: usize = 8_000_000;

/// Outcome names by wire value, for the report.
pub const OUTCOME_NAMES: [&str; 12] = [
    "unknown",
    "delivered",
    "offline",
    "ttl_expired",
    "displaced",
    "queue_full",
    "slow_consumer",
    "shutdown",
    "hold_expired",
    "gate_lost",
    "node_lost",
    "directory_unavailable",
];

/// One pushed message.
#[derive(Debug, Default, Clone, Copy)]
struct Message {
    /// Targets named.
    pushed: u32,
    /// Targets the gate accepted; `None` until its answer came (or if it never did).
    accepted: Option<u32>,
    /// The gate refused the push (no receipts follow).
    refused: bool,
    /// Real receipts (not GateLost).
    receipts: u32,
}

/// The app-server side of the audit.
#[derive(Debug, Default)]
pub struct Audit {
    /// Every message pushed, by id.
    messages: HashMap<u64, Message>,
    /// Receipts by outcome value (unknown values under 0).
    outcomes: [u64; OUTCOME_NAMES.len()],
    /// Delivered pairs, for the cross-check with what apps showed.
    delivered_pairs: Vec<(u64, u64)>,
    /// Delivered pairs not kept because `delivered_pairs` was full.
    delivered_untracked: u64,
    /// Pushes not sent because `messages` was full.
    skipped: u64,
}

/// The audit's figures, every count per (message id, uid).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuditSummary {
    /// Push frames sent.
    pub pushes: u64,
    /// Pairs named by pushes.
    pub sent: u64,
    /// Pairs the gate accepted.
    pub accepted: u64,
    /// Pairs of pushes the gate refused.
    pub refused: u64,
    /// Pairs of pushes whose answer never came (connection lost): unknown whether accepted.
    pub unanswered: u64,
    /// Delivered receipts.
    pub delivered: u64,
    /// Receipts with any other real outcome.
    pub unreachable: u64,
    /// Pairs the client resolved as GateLost (no real receipt).
    pub gate_lost: u64,
    /// Accepted pairs without a real receipt.
    pub lost: u64,
    /// Real receipts beyond a message's accepted targets.
    pub extra_receipts: u64,
    /// Pushes not sent because the audit was full.
    pub skipped: u64,
}

/// Lost pairs of one message: accepted targets that got no real receipt.
pub fn lost(accepted: u64, delivered: u64, unreachable: u64) -> u64 {
    accepted.saturating_sub(delivered + unreachable)
}

impl Audit {
    /// An empty audit.
    pub fn new() -> Audit {
        Audit::default()
    }

    /// Records a push about to be sent; false when the audit is full (then do not send it).
    pub fn pushed(&mut self, message_id: u64, targets: u32) -> bool {
        if self.messages.len() >= MAX_MESSAGES {
            self.skipped += 1;
            return false;
        }
        self.messages.entry(message_id).or_default().pushed += targets;
        true
    }

    /// Forgets a push that was never written (the send failed before the gate read it).
    pub fn unsent(&mut self, message_id: u64) {
        self.messages.remove(&message_id);
    }

    /// The gate accepted the push for `targets` pairs.
    pub fn accepted(&mut self, message_id: u64, targets: u32) {
        if let Some(m) = self.messages.get_mut(&message_id) {
            m.accepted = Some(targets);
        }
    }

    /// The gate refused the push: no receipts follow.
    pub fn refused(&mut self, message_id: u64) {
        if let Some(m) = self.messages.get_mut(&message_id) {
            m.refused = true;
        }
    }

    /// A final receipt (each pair once: the client library drops resent ones).
    pub fn receipt(&mut self, message_id: u64, uid: u64, outcome: Outcome) {
        // Values this build does not know are final and not delivered: Unknown (§9.11).
        let slot = if usize::from(outcome.0) < OUTCOME_NAMES.len() { usize::from(outcome.0) } else { 0 };
        self.outcomes[slot] += 1;
        if outcome == Outcome::GateLost {
            return;
        }
        if let Some(m) = self.messages.get_mut(&message_id) {
            m.receipts += 1;
        }
        if outcome == Outcome::Delivered {
            if self.delivered_pairs.len() < MAX_DELIVERED_PAIRS {
                self.delivered_pairs.push((message_id, uid));
            } else {
                self.delivered_untracked += 1;
            }
        }
    }

    /// Receipts by outcome name.
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        OUTCOME_NAMES.iter().copied().zip(self.outcomes.iter().copied()).collect()
    }

    /// Delivered pairs, as (message id, uid).
    pub fn delivered_pairs(&self) -> &[(u64, u64)] {
        &self.delivered_pairs
    }

    /// The figures now.
    pub fn summary(&self) -> AuditSummary {
        let mut s = AuditSummary {
            pushes: self.messages.len() as u64,
            delivered: self.outcomes[Outcome::Delivered.0 as usize],
            gate_lost: self.outcomes[Outcome::GateLost.0 as usize],
            skipped: self.skipped,
            ..AuditSummary::default()
        };
        s.unreachable = self.outcomes.iter().sum::<u64>() - s.delivered - s.gate_lost;
        for m in self.messages.values() {
            s.sent += u64::from(m.pushed);
            if m.refused {
                s.refused += u64::from(m.pushed);
                continue;
            }
            match m.accepted {
                Some(a) => {
                    s.accepted += u64::from(a);
                    s.lost += u64::from(a).saturating_sub(u64::from(m.receipts));
                    s.extra_receipts += u64::from(m.receipts).saturating_sub(u64::from(a));
                }
                None => s.unanswered += u64::from(m.pushed),
            }
        }
        s
    }
}

/// What one executor's apps showed: (uid, message id) pairs, to catch an app showing a push
/// twice and to check every delivered receipt against a real arrival.
#[derive(Debug, Default)]
pub struct Shown {
    /// Pairs shown.
    pairs: HashSet<(u64, u64)>,
    /// Pairs not recorded because the set was full.
    pub untracked: u64,
}

/// What `Shown::show` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Showing {
    /// The first time this app shows this push.
    First,
    /// The app showed it before: a duplicate.
    Again,
    /// The record is full; not checked.
    Untracked,
}

impl Shown {
    /// Records that `uid` showed `message_id`.
    pub fn show(&mut self, uid: u64, message_id: u64) -> Showing {
        if self.pairs.contains(&(uid, message_id)) {
            return Showing::Again;
        }
        if self.pairs.len() >= MAX_SHOWN_PAIRS {
            self.untracked += 1;
            return Showing::Untracked;
        }
        self.pairs.insert((uid, message_id));
        Showing::First
    }

    /// True if `uid` showed `message_id`.
    pub fn contains(&self, uid: u64, message_id: u64) -> bool {
        self.pairs.contains(&(uid, message_id))
    }

    /// Pairs recorded.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// True when nothing was shown.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Delivered receipts whose app never showed the push: the gate said delivered, yet the app
/// did not receive it (only meaningful when every pushed uid is simulated by this process).
pub fn delivered_unseen(delivered: &[(u64, u64)], shown: &[Shown]) -> u64 {
    delivered.iter().filter(|&&(m, uid)| !shown.iter().any(|s| s.contains(uid, m))).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_is_accepted_minus_receipts() {
        assert_eq!(lost(10, 7, 3), 0);
        assert_eq!(lost(10, 7, 1), 2);
        assert_eq!(lost(3, 2, 5), 0, "never negative");
    }

    #[test]
    fn audit_counts_per_pair() {
        let mut a = Audit::new();
        // Push 1: 3 targets, all accepted: delivered, offline, and one never answered.
        assert!(a.pushed(1, 3));
        a.accepted(1, 3);
        a.receipt(1, 10, Outcome::Delivered);
        a.receipt(1, 11, Outcome::Offline);
        // Push 2: refused, no receipts.
        assert!(a.pushed(2, 5));
        a.refused(2);
        // Push 3: a receipt before the acceptance, then GateLost for the other target.
        assert!(a.pushed(3, 2));
        a.receipt(3, 10, Outcome::HoldExpired);
        a.accepted(3, 2);
        a.receipt(3, 11, Outcome::GateLost);
        // Push 4: the answer never came.
        assert!(a.pushed(4, 1));
        let s = a.summary();
        assert_eq!(
            s,
            AuditSummary {
                pushes: 4,
                sent: 11,
                accepted: 5,
                refused: 5,
                unanswered: 1,
                delivered: 1,
                unreachable: 2,
                gate_lost: 1,
                lost: 2,
                extra_receipts: 0,
                skipped: 0,
            }
        );
        assert_eq!(s.lost, lost(s.accepted, s.delivered, s.unreachable));
        assert_eq!(a.delivered_pairs(), &[(1, 10)]);
        let outcomes = a.outcomes();
        assert_eq!(outcomes[1], ("delivered", 1));
        assert_eq!(outcomes[9], ("gate_lost", 1));
    }

    #[test]
    fn extra_receipts_are_counted_not_subtracted() {
        let mut a = Audit::new();
        a.pushed(7, 1);
        a.accepted(7, 1);
        a.receipt(7, 1, Outcome::Delivered);
        a.receipt(7, 2, Outcome::Offline);
        let s = a.summary();
        assert_eq!((s.lost, s.extra_receipts), (0, 1));
    }

    #[test]
    fn shown_catches_the_second_showing() {
        let mut s = Shown::default();
        assert_eq!(s.show(5, 100), Showing::First);
        assert_eq!(s.show(6, 100), Showing::First);
        assert_eq!(s.show(5, 100), Showing::Again);
        assert_eq!(delivered_unseen(&[(100, 5), (100, 7)], &[s]), 1);
    }
}
