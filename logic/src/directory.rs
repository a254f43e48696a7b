//! The embedded session directory: which connection holds each uid's session.
//!
//! Every new session (a login) takes the next epoch for its uid, so a message about an older
//! session (a late `Closed` from a displaced connection) is recognised and ignored.

use crate::hash::UidHash;
use crate::push::PushState;
use crate::ConnRef;
use std::collections::{BTreeSet, HashMap};

/// One uid's session.
#[derive(Debug)]
pub struct Entry {
    /// The connection holding the session.
    pub conn: ConnRef,
    /// `wire::Role` value of the session.
    pub role: u8,
    /// Grows with every new session of this uid.
    pub epoch: u64,
    /// Pushes sent and not yet acked, or queued while held.
    pub pushes: PushState,
    /// Set while the connection is gone and the session is held: when the hold ends (ms).
    pub held_until_ms: Option<u64>,
    /// Resumes so far; a resume token is valid only for the current count (rotation).
    pub resumes: u32,
    /// The secure channel's resumption secret: the psk the next resume must prove (none for a
    /// session that came over plaintext). It lives here, with the session, so it moves with it.
    pub resume_secret: Option<ResumeSecret>,
}

/// A secure channel's resumption secret (`channel::ResumeSecret`'s bytes).
pub type ResumeSecret = [u8; 32];

/// What a resume found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The connection that held the session before.
    pub previous: ConnRef,
    /// That connection was still attached (not yet seen closed): it must go away.
    pub was_attached: bool,
}

/// Why a resume was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeRefused {
    /// No session for the uid (never, logged out, or expired).
    NoSession,
    /// The token names an older session of the uid.
    StaleEpoch,
    /// The token was already used (or an older one of this session).
    Replayed,
    /// Cluster mode: the session is not on this node and the shared directory cannot be asked
    /// now (Redis down or behind); the app may retry the resume after a while. The gate decides
    /// this, never the logic shard.
    DirectoryUnavailable,
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
    entries: HashMap<u64, Entry, UidHash>,
    /// Last epoch handed out per uid that has no live session, so epochs never go back after a
    /// logout. Bounded: pruned when it exceeds `MAX_RETIRED`.
    retired: HashMap<u64, u64, UidHash>,
    /// Held sessions by hold deadline: (deadline ms, uid).
    held: BTreeSet<(u64, u64)>,
}

/// Bound on remembered epochs of ended sessions; past it the oldest knowledge is dropped (an
/// epoch then restarts from a time-based floor, which still only grows).
const MAX_RETIRED: usize = 1 << 20;

impl Directory {
    /// Registers a new session of `uid` on `conn` at `now_ms`.
    pub fn login(
        &mut self,
        uid: u64,
        role: u8,
        conn: ConnRef,
        now_ms: u64,
        resume_secret: Option<ResumeSecret>,
    ) -> LoginResult {
        let prev = self.entries.remove(&uid);
        let last_epoch = prev.as_ref().map(|e| e.epoch).or_else(|| self.retired.remove(&uid)).unwrap_or(0);
        // A time floor keeps epochs growing even when the retired map was pruned or the
        // process restarted: ms since the epoch, shifted to leave room for many logins per ms.
        let epoch = (last_epoch + 1).max(now_ms << 8);
        let entry = Entry {
            conn,
            role,
            epoch,
            pushes: PushState::default(),
            held_until_ms: None,
            resumes: 0,
            resume_secret,
        };
        self.entries.insert(uid, entry);
        if let Some(until) = prev.as_ref().and_then(|p| p.held_until_ms) {
            self.held.remove(&(until, uid));
        }
        LoginResult { epoch, displaced: prev }
    }

    /// Ends the session of `uid` if `conn` still holds it; returns the ended entry.
    pub fn remove_if(&mut self, uid: u64, conn: ConnRef) -> Option<Entry> {
        match self.entries.get(&uid) {
            Some(e) if e.conn == conn => {
                let e = self.entries.remove(&uid)?;
                if let Some(until) = e.held_until_ms {
                    self.held.remove(&(until, uid));
                }
                if self.retired.len() >= MAX_RETIRED {
                    self.retired.clear();
                }
                self.retired.insert(uid, e.epoch);
                Some(e)
            }
            _ => None,
        }
    }

    /// Holds the session of `uid` (its connection `conn` dropped) until `until_ms`; false when
    /// `conn` no longer holds it or it is already held.
    pub fn hold(&mut self, uid: u64, conn: ConnRef, until_ms: u64) -> bool {
        match self.entries.get_mut(&uid) {
            Some(e) if e.conn == conn && e.held_until_ms.is_none() => {
                e.held_until_ms = Some(until_ms);
                self.held.insert((until_ms, uid));
                true
            }
            _ => false,
        }
    }

    /// Attaches the session of `uid` to `conn` if the token's epoch and resume count are current
    /// (`resumes: None`: the secure channel proved it current), and gives it `resume_secret`.
    pub fn resume(
        &mut self,
        uid: u64,
        epoch: u64,
        resumes: Option<u32>,
        conn: ConnRef,
        resume_secret: Option<ResumeSecret>,
    ) -> Result<Resumed, ResumeRefused> {
        let e = self.entries.get_mut(&uid).ok_or(ResumeRefused::NoSession)?;
        if e.epoch != epoch {
            return Err(ResumeRefused::StaleEpoch);
        }
        if resumes.is_some_and(|r| r != e.resumes) {
            return Err(ResumeRefused::Replayed);
        }
        e.resumes = e.resumes.wrapping_add(1);
        if resume_secret.is_some() {
            e.resume_secret = resume_secret;
        }
        let previous = std::mem::replace(&mut e.conn, conn);
        let held = e.held_until_ms.take();
        if let Some(until) = held {
            self.held.remove(&(until, uid));
        }
        Ok(Resumed { previous, was_attached: held.is_none() && previous != conn })
    }

    /// Removes the session of `uid` of `epoch` to hand it to another node (cluster mode); its
    /// epoch is remembered as ended here.
    pub fn take(&mut self, uid: u64, epoch: u64) -> Option<Entry> {
        let conn = self.entries.get(&uid).filter(|e| e.epoch == epoch)?.conn;
        self.remove_if(uid, conn)
    }

    /// Installs a session handed over from another node, held until `until_ms` (its app is
    /// resuming, or will). Returns the session it replaced, if any (an older one: the caller
    /// checked the epochs).
    pub fn install(&mut self, uid: u64, mut entry: Entry, until_ms: u64) -> Option<Entry> {
        let prev = self.entries.remove(&uid);
        if let Some(until) = prev.as_ref().and_then(|p| p.held_until_ms) {
            self.held.remove(&(until, uid));
        }
        entry.held_until_ms = Some(until_ms);
        self.held.insert((until_ms, uid));
        self.entries.insert(uid, entry);
        prev
    }

    /// Removes and returns up to `max` held sessions whose hold ended by `now_ms`.
    pub fn pop_expired_holds(&mut self, now_ms: u64, max: usize, out: &mut Vec<(u64, Entry)>) {
        while out.len() < max {
            match self.held.first() {
                Some(&(until, uid)) if until <= now_ms => {
                    self.held.pop_first();
                    if let Some(e) = self.entries.remove(&uid) {
                        if self.retired.len() >= MAX_RETIRED {
                            self.retired.clear();
                        }
                        self.retired.insert(uid, e.epoch);
                        out.push((uid, e));
                    }
                }
                _ => break,
            }
        }
    }

    /// Sessions held (connection gone).
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// The earliest hold deadline.
    pub fn first_hold_deadline(&self) -> Option<u64> {
        self.held.first().map(|h| h.0)
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
        let a = d.login(7, 1, c(1), 0, None);
        assert!(a.displaced.is_none());
        let b = d.login(7, 1, c(2), 0, None);
        assert_eq!(b.displaced.map(|e| e.conn), Some(c(1)));
        assert!(b.epoch > a.epoch);
        // The displaced connection's late close does not end the new session.
        assert!(d.remove_if(7, c(1)).is_none());
        assert_eq!(d.get(7).map(|e| e.conn), Some(c(2)));
    }

    #[test]
    fn epochs_keep_growing_across_logout() {
        let mut d = Directory::default();
        let a = d.login(7, 1, c(1), 0, None);
        assert!(d.remove_if(7, c(1)).is_some());
        assert!(d.is_empty());
        let b = d.login(7, 1, c(2), 0, None);
        assert!(b.epoch > a.epoch);
        assert!(b.displaced.is_none());
    }
}
