//! The embedded session directory: which connection holds each uid's session.
//!
//! Every new session (a login) takes the next epoch for its uid, so a message about an older
//! session (a late `Closed` from a displaced connection) is recognised and ignored.

use crate::push::PushState;
use crate::ConnRef;
use std::collections::HashMap;

/// One uid's session.
#[derive(Debug)]
pub struct Entry {
    /// The connection holding the session.
    pub conn: ConnRef,
    /// `wire::Role` value of the session.
    pub role: u8,
    /// Grows with every new session of this uid.
    pub epoch: u64,
    /// Pushes sent and not yet acked.
    pub pushes: PushState,
}

/// What a login did to the directory.
#[derive(Debug)]
pub struct LoginResult {
    /// The new session's epoch.
    pub epoch: u64,
    /// The session the uid had before, now ended: its connection must go away and its pushes
    /// end as displaced.
    pub displaced: Option<Entry>,
}

/// uid → session, for the uids of one logic shard.
#[derive(Debug, Default)]
pub struct Directory {
    /// Live sessions.
    entries: HashMap<u64, Entry>,
    /// Last epoch handed out per uid that has no live session, so epochs never go back after a
    /// logout. Bounded: pruned when it exceeds `MAX_RETIRED`.
    retired: HashMap<u64, u64>,
}

/// Bound on remembered epochs of ended sessions; past it the oldest knowledge is dropped (an
/// epoch then restarts from a time-based floor, which still only grows).
const MAX_RETIRED: usize = 1 << 20;

impl Directory {
    /// Registers a new session of `uid` on `conn` at `now_ms`.
    pub fn login(&mut self, uid: u64, role: u8, conn: ConnRef, now_ms: u64) -> LoginResult {
        let prev = self.entries.remove(&uid);
        let last_epoch = prev.as_ref().map(|e| e.epoch).or_else(|| self.retired.remove(&uid)).unwrap_or(0);
        // A time floor keeps epochs growing even when the retired map was pruned or the
        // process restarted: ms since the epoch, shifted to leave room for many logins per ms.
        let epoch = (last_epoch + 1).max(now_ms << 8);
        self.entries.insert(uid, Entry { conn, role, epoch, pushes: PushState::default() });
        LoginResult { epoch, displaced: prev }
    }

    /// Ends the session of `uid` if `conn` still holds it; returns the ended entry.
    pub fn remove_if(&mut self, uid: u64, conn: ConnRef) -> Option<Entry> {
        match self.entries.get(&uid) {
            Some(e) if e.conn == conn => {
                let e = self.entries.remove(&uid)?;
                if self.retired.len() >= MAX_RETIRED {
                    self.retired.clear();
                }
                self.retired.insert(uid, e.epoch);
                Some(e)
            }
            _ => None,
        }
    }

    /// The session of `uid`, if any.
    pub fn get(&self, uid: u64) -> Option<&Entry> {
        self.entries.get(&uid)
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The session of `uid`, mutable.
    pub fn get_mut(&mut self, uid: u64) -> Option<&mut Entry> {
        self.entries.get_mut(&uid)
    }

    /// Every live session (for broadcast).
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Entry)> {
        self.entries.iter()
    }

    /// Every live session, mutable (for shutdown).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Entry)> {
        self.entries.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(slot: u32) -> ConnRef {
        ConnRef { shard: 0, slot, gen: 1 }
    }

    #[test]
    fn second_login_displaces_and_grows_the_epoch() {
        let mut d = Directory::default();
        let a = d.login(7, 1, c(1), 0);
        assert!(a.displaced.is_none());
        let b = d.login(7, 1, c(2), 0);
        assert_eq!(b.displaced.map(|e| e.conn), Some(c(1)));
        assert!(b.epoch > a.epoch);
        // The displaced connection's late close does not end the new session.
        assert!(d.remove_if(7, c(1)).is_none());
        assert_eq!(d.get(7).map(|e| e.conn), Some(c(2)));
    }

    #[test]
    fn epochs_keep_growing_across_logout() {
        let mut d = Directory::default();
        let a = d.login(7, 1, c(1), 0);
        assert!(d.remove_if(7, c(1)).is_some());
        assert!(d.is_empty());
        let b = d.login(7, 1, c(2), 0);
        assert!(b.epoch > a.epoch);
        assert!(b.displaced.is_none());
    }
}
