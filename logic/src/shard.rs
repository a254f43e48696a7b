//! One logic shard: the directory and GPS of its uids, stepped by inputs and a clock.

use crate::directory::Directory;
use crate::gps::{Coalescer, Forward, GpsStats};
use crate::ConnRef;
use schema::wire::{GpsPoint, UidGpsPoint};

/// Settings of a logic shard.
#[derive(Clone, Copy, Debug)]
pub struct ShardConfig {
    /// This shard's index.
    pub id: u16,
    /// How often waiting GPS points are flushed, in ms.
    pub gps_flush_ms: u64,
    /// Coalesce to the latest point, or forward all.
    pub gps_forward: Forward,
    /// Bound on points buffered between flushes in `Forward::All`.
    pub gps_max_buffered: usize,
}

/// What the gate tells a logic shard. Every input names the flow's log-id so the shard's
/// answers carry it on.
#[derive(Clone, Copy, Debug)]
pub enum Input {
    /// A connection presented a valid token for `uid` (the gate verified it).
    Login {
        /// The user.
        uid: u64,
        /// `wire::Role` value from the token.
        role: u8,
        /// The connection that logged in.
        conn: ConnRef,
        /// The login request's log-id.
        log_id: u64,
        /// The login request's sequence-id, echoed in the answer.
        seq: u32,
    },
    /// The app logged out.
    Logout {
        /// The user.
        uid: u64,
        /// Its connection.
        conn: ConnRef,
        /// The logout request's log-id.
        log_id: u64,
        /// The logout request's sequence-id.
        seq: u32,
    },
    /// The connection closed without logout (dropped, timed out, displaced, refused).
    Closed {
        /// The user.
        uid: u64,
        /// The connection that closed.
        conn: ConnRef,
    },
    /// One GPS point of a driver, copied out of its frame.
    Gps {
        /// The driver.
        uid: u64,
        /// The point.
        point: GpsPoint,
    },
}

/// What a logic shard asks the gate to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Answer the login: the session exists now.
    LoginOk {
        /// The connection to answer.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// `wire::Role` value.
        role: u8,
        /// The new session's epoch.
        epoch: u64,
        /// The login's log-id.
        log_id: u64,
        /// The login's sequence-id.
        seq: u32,
    },
    /// Tell a connection its session was taken by a newer login, then close it.
    Displaced {
        /// The displaced connection.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// The newer login's log-id, so both ends of the displacement share one trace.
        log_id: u64,
    },
    /// Answer the logout, then close.
    LogoutOk {
        /// The connection to answer.
        conn: ConnRef,
        /// The logout's log-id.
        log_id: u64,
        /// The logout's sequence-id.
        seq: u32,
    },
    /// A batch of GPS points for the app-server side.
    GpsBatch(Vec<UidGpsPoint>),
}

/// One logic shard.
#[derive(Debug)]
pub struct Shard {
    /// Settings.
    cfg: ShardConfig,
    /// Sessions of this shard's uids.
    pub directory: Directory,
    /// GPS waiting for the next flush.
    gps: Coalescer,
    /// When the next GPS flush is due, if points are waiting.
    gps_due_ms: Option<u64>,
}

impl Shard {
    /// A shard with no sessions.
    pub fn new(cfg: ShardConfig) -> Shard {
        Shard {
            cfg,
            directory: Directory::default(),
            gps: Coalescer::new(cfg.gps_forward, cfg.gps_max_buffered),
            gps_due_ms: None,
        }
    }

    /// Applies one input at `now_ms`, appending what to do to `out`.
    pub fn handle(&mut self, input: Input, now_ms: u64, out: &mut Vec<Output>) {
        match input {
            Input::Login { uid, role, conn, log_id, seq } => {
                let r = self.directory.login(uid, role, conn, now_ms);
                if let Some(old) = r.displaced {
                    out.push(Output::Displaced { conn: old, uid, log_id });
                }
                out.push(Output::LoginOk { conn, uid, role, epoch: r.epoch, log_id, seq });
            }
            Input::Logout { uid, conn, log_id, seq } => {
                self.directory.remove_if(uid, conn);
                out.push(Output::LogoutOk { conn, log_id, seq });
            }
            Input::Closed { uid, conn } => {
                self.directory.remove_if(uid, conn);
            }
            Input::Gps { uid, point } => {
                self.gps.push(uid, point);
                // The first point after a flush arms the next one; an idle shard arms nothing.
                if self.gps_due_ms.is_none() {
                    self.gps_due_ms = Some(now_ms + self.cfg.gps_flush_ms);
                }
            }
        }
    }

    /// Runs what is due at `now_ms` (the GPS flush).
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if let Some(due) = self.gps_due_ms {
            if now_ms >= due {
                self.flush_gps(out);
            }
        }
    }

    /// Flushes waiting GPS now (on shutdown, or when the gate wants a batch out early).
    pub fn flush_gps(&mut self, out: &mut Vec<Output>) {
        self.gps_due_ms = None;
        let mut batch = Vec::with_capacity(self.gps.pending());
        if self.gps.flush_into(&mut batch) > 0 {
            out.push(Output::GpsBatch(batch));
        }
    }

    /// When `tick` next has work, if ever: the gate sleeps until then.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.gps_due_ms
    }

    /// GPS counters.
    pub fn gps_stats(&self) -> GpsStats {
        self.gps.stats
    }

    /// This shard's index.
    pub fn id(&self) -> u16 {
        self.cfg.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> Shard {
        Shard::new(ShardConfig {
            id: 0,
            gps_flush_ms: 100,
            gps_forward: Forward::Latest,
            gps_max_buffered: 1000,
        })
    }

    fn c(slot: u32) -> ConnRef {
        ConnRef { shard: 1, slot, gen: 3 }
    }

    #[test]
    fn login_displace_logout() {
        let mut s = shard();
        let mut out = Vec::new();
        s.handle(Input::Login { uid: 5, role: 1, conn: c(1), log_id: 10, seq: 1 }, 0, &mut out);
        assert!(matches!(out[..], [Output::LoginOk { uid: 5, seq: 1, log_id: 10, .. }]));
        out.clear();
        s.handle(Input::Login { uid: 5, role: 1, conn: c(2), log_id: 11, seq: 1 }, 0, &mut out);
        assert_eq!(out[0], Output::Displaced { conn: c(1), uid: 5, log_id: 11 });
        assert!(matches!(out[1], Output::LoginOk { conn, .. } if conn == c(2)));
        out.clear();
        // The displaced connection closes late: the session stays with the new one.
        s.handle(Input::Closed { uid: 5, conn: c(1) }, 0, &mut out);
        assert_eq!(s.directory.get(5).map(|e| e.conn), Some(c(2)));
        s.handle(Input::Logout { uid: 5, conn: c(2), log_id: 12, seq: 2 }, 0, &mut out);
        assert_eq!(out, vec![Output::LogoutOk { conn: c(2), log_id: 12, seq: 2 }]);
        assert!(s.directory.is_empty());
    }

    #[test]
    fn gps_flushes_on_the_interval_and_idles_after() {
        let mut s = shard();
        let mut out = Vec::new();
        assert_eq!(s.next_deadline_ms(), None);
        for ts in 0..10 {
            s.handle(Input::Gps { uid: 1, point: GpsPoint::new(ts, 0, 0, 0, 0, 0, 0) }, 1_000 + ts, &mut out);
        }
        assert_eq!(s.next_deadline_ms(), Some(1_100));
        s.tick(1_099, &mut out);
        assert!(out.is_empty());
        s.tick(1_100, &mut out);
        match &out[..] {
            [Output::GpsBatch(b)] => {
                assert_eq!(b.len(), 1);
                assert_eq!(b[0].point().ts_ms(), 9);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.next_deadline_ms(), None);
        assert_eq!(s.gps_stats().coalesced, 9);
    }
}
