//! A connection's life as the gate sees it, with no socket and no clock of its own: its phase
//! (awaiting login, logging in, live, closing with a reason), the pre-login error budget, and the
//! login, read, idle and write-stall timeouts. The shard's loop feeds it `now` (monotonic ms)
//! and carries out what it decides; the rules are tested here without sockets.

use schema::wire::GoAwayReason;

/// Error frames a connection may earn before login; one more closes it.
pub const MAX_PRE_LOGIN_ERRORS: u8 = 8;

/// Which port a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Drivers and passengers.
    App,
    /// App-servers.
    Sidecar,
}

/// A user's role, from the login token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reports GPS, takes order offers.
    Driver,
    /// Places orders.
    Passenger,
}

impl Role {
    /// The role a `wire::Role` value names, if any.
    pub fn from_wire(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Driver),
            2 => Some(Role::Passenger),
            _ => None,
        }
    }

    /// The `wire::Role` value.
    pub fn wire(self) -> u8 {
        match self {
            Role::Driver => 1,
            Role::Passenger => 2,
        }
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; only Login, Resume and Keepalive (apps) or the hello (app-servers) are allowed.
    AwaitingLogin,
    /// The token verified; the uid's logic shard is registering the session.
    LoggingIn {
        /// The user.
        uid: u64,
        /// From the token (for a resume, the session's, known once it is live).
        role: Option<Role>,
    },
    /// An app's session is live on this connection.
    Live {
        /// The user.
        uid: u64,
        /// From the token.
        role: Role,
    },
    /// An app-server passed its hello.
    AppServer,
}

/// Why a connection closed; labels `fleetgate_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Closed with a go-away of this reason (or the matching error frame).
    GoAway(GoAwayReason),
    /// Never logged in within the login timeout (Error NotLoggedIn).
    LoginTimeout,
    /// The peer closed, or the socket failed.
    PeerGone,
}

impl CloseReason {
    /// The label of `fleetgate_connections_closed_total`.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::GoAway(r) => r.variant_name().unwrap_or("other"),
            CloseReason::LoginTimeout => "LoginTimeout",
            CloseReason::PeerGone => "peer",
        }
    }

    /// Every label, for the metric's slots.
    pub const SLOTS: usize = 16;

    /// The metric slot of this reason.
    pub fn slot(self) -> usize {
        match self {
            CloseReason::PeerGone => 0,
            CloseReason::GoAway(r) => (r.0 as usize).min(13),
            CloseReason::LoginTimeout => 15,
        }
    }

    /// The label of a metric slot.
    pub fn slot_label(slot: usize) -> &'static str {
        match slot {
            0 => "peer",
            15 => "LoginTimeout",
            s => GoAwayReason(s as u8).variant_name().unwrap_or("other"),
        }
    }
}

/// A timeout that expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No login or resume (or hello) within the login timeout.
    Login,
    /// A frame started and not completed within the read timeout (slowloris).
    Read,
    /// Writes stalled longer than the read timeout: the peer reads nothing.
    WriteStall,
    /// Nothing read within the idle timeout (apps only).
    Idle,
}

/// The timeouts, in ms.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accept to a successful login, resume or hello.
    pub login_ms: u64,
    /// From a frame's first byte to its last; also the longest write stall.
    pub read_ms: u64,
    /// Without any input (apps only; app-servers have none).
    pub idle_ms: Option<u64>,
}

/// One connection's phase and clocks.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    /// Where it is.
    pub phase: Phase,
    /// Set once the connection is closing; the first reason wins.
    pub closing: Option<CloseReason>,
    accepted_ms: u64,
    last_rx_ms: u64,
    partial_since_ms: Option<u64>,
    write_stalled_ms: Option<u64>,
    pre_login_errors: u8,
}

impl Lifecycle {
    /// A connection accepted at `now`.
    pub fn new(now: u64) -> Lifecycle {
        Lifecycle {
            phase: Phase::AwaitingLogin,
            closing: None,
            accepted_ms: now,
            last_rx_ms: now,
            partial_since_ms: None,
            write_stalled_ms: None,
            pre_login_errors: 0,
        }
    }

    /// Bytes arrived at `now`; `partial` says an incomplete frame is left after them.
    pub fn on_input(&mut self, now: u64, partial: bool) {
        self.last_rx_ms = now;
        self.partial_since_ms = if partial { Some(self.partial_since_ms.unwrap_or(now)) } else { None };
    }

    /// The socket could not take everything queued (at `now`) or took it all again (`None`).
    pub fn set_write_stalled(&mut self, since: Option<u64>) {
        self.write_stalled_ms = since;
    }

    /// An error frame was sent before login; true when the budget is spent and the connection
    /// must close (a peer that only sends garbage frames does not hold a slot forever).
    pub fn pre_login_error(&mut self) -> bool {
        if self.phase != Phase::AwaitingLogin {
            return false;
        }
        self.pre_login_errors = self.pre_login_errors.saturating_add(1);
        self.pre_login_errors > MAX_PRE_LOGIN_ERRORS
    }

    /// A token verified: the logic shard is asked to register the session.
    pub fn begin_login(&mut self, uid: u64, role: Option<Role>) {
        if self.phase == Phase::AwaitingLogin {
            self.phase = Phase::LoggingIn { uid, role };
        }
    }

    /// The logic shard refused the resume: back to awaiting a login.
    pub fn login_refused(&mut self) {
        if matches!(self.phase, Phase::LoggingIn { .. }) {
            self.phase = Phase::AwaitingLogin;
        }
    }

    /// The logic shard registered `uid`'s session on this connection; false when the
    /// connection moved on meanwhile (closing, or another login), and the session must be told.
    pub fn go_live(&mut self, uid: u64, role: Role) -> bool {
        match self.phase {
            Phase::LoggingIn { uid: u, .. } if u == uid && self.closing.is_none() => {
                self.phase = Phase::Live { uid, role };
                true
            }
            _ => false,
        }
    }

    /// The session ended on purpose (logout): closing must not report it closed again.
    pub fn session_ended(&mut self) {
        if matches!(self.phase, Phase::Live { .. }) {
            self.phase = Phase::AwaitingLogin;
        }
    }

    /// An app-server passed its hello.
    pub fn app_server_ready(&mut self) {
        if self.phase == Phase::AwaitingLogin {
            self.phase = Phase::AppServer;
        }
    }

    /// Marks the connection closing; false when it already was (the first reason stands).
    pub fn close(&mut self, reason: CloseReason) -> bool {
        if self.closing.is_some() {
            return false;
        }
        self.closing = Some(reason);
        true
    }

    /// The uid whose session (or login in progress) this connection carries, if any.
    pub fn uid(&self) -> Option<u64> {
        match self.phase {
            Phase::LoggingIn { uid, .. } | Phase::Live { uid, .. } => Some(uid),
            Phase::AwaitingLogin | Phase::AppServer => None,
        }
    }

    /// The earliest time (monotonic ms) after which `expired` reports a timeout, given the
    /// connection stays as it is; none for a closing connection or one with no deadline. The
    /// sweep files each connection under it, so a deadline that moves earlier (a frame left
    /// half-read, a write stall, a refused login) must be filed again (`Shard::watch`).
    pub fn next_deadline(&self, t: &Timeouts) -> Option<u64> {
        if self.closing.is_some() {
            return None;
        }
        [
            (self.phase == Phase::AwaitingLogin).then_some(self.accepted_ms + t.login_ms),
            self.partial_since_ms.map(|s| s + t.read_ms),
            self.write_stalled_ms.map(|s| s + t.read_ms),
            t.idle_ms.map(|idle| self.last_rx_ms + idle),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The timeout that expired by `now`, if any (the first in the order login, read, write
    /// stall, idle). A closing connection has none.
    pub fn expired(&self, now: u64, t: &Timeouts) -> Option<Expiry> {
        if self.closing.is_some() {
            return None;
        }
        let past = |since: u64, limit: u64| now.saturating_sub(since) > limit;
        if self.phase == Phase::AwaitingLogin && past(self.accepted_ms, t.login_ms) {
            Some(Expiry::Login)
        } else if self.partial_since_ms.is_some_and(|s| past(s, t.read_ms)) {
            Some(Expiry::Read)
        } else if self.write_stalled_ms.is_some_and(|s| past(s, t.read_ms)) {
            Some(Expiry::WriteStall)
        } else if t.idle_ms.is_some_and(|idle| past(self.last_rx_ms, idle)) {
            Some(Expiry::Idle)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Timeouts = Timeouts { login_ms: 1_000, read_ms: 2_000, idle_ms: Some(5_000) };

    #[test]
    fn login_then_live_then_logout() {
        let mut l = Lifecycle::new(0);
        l.begin_login(7, Some(Role::Driver));
        assert_eq!(l.uid(), Some(7));
        assert!(!l.go_live(8, Role::Driver), "another uid's answer does not apply");
        assert!(l.go_live(7, Role::Driver));
        assert_eq!(l.phase, Phase::Live { uid: 7, role: Role::Driver });
        assert!(!l.pre_login_error(), "a live connection has no pre-login budget");
        l.session_ended();
        assert_eq!(l.phase, Phase::AwaitingLogin);
    }

    #[test]
    fn a_refused_resume_and_a_close_while_logging_in() {
        let mut l = Lifecycle::new(0);
        l.begin_login(7, None);
        l.login_refused();
        assert_eq!(l.phase, Phase::AwaitingLogin);
        l.begin_login(7, None);
        assert!(l.close(CloseReason::PeerGone));
        assert!(!l.close(CloseReason::LoginTimeout), "the first reason stands");
        assert!(!l.go_live(7, Role::Driver), "a closing connection does not go live");
        assert_eq!(l.expired(1_000_000, &T), None, "a closing connection has no timeouts");
    }

    #[test]
    fn the_pre_login_budget_closes_after_eight_errors() {
        let mut l = Lifecycle::new(0);
        for _ in 0..MAX_PRE_LOGIN_ERRORS {
            assert!(!l.pre_login_error());
        }
        assert!(l.pre_login_error());
    }

    #[test]
    fn timeouts_in_order() {
        let mut l = Lifecycle::new(0);
        assert_eq!(l.expired(1_000, &T), None);
        assert_eq!(l.expired(1_001, &T), Some(Expiry::Login));
        l.begin_login(1, Some(Role::Driver));
        l.go_live(1, Role::Driver);
        l.on_input(1_000, true);
        assert_eq!(l.expired(3_000, &T), None);
        assert_eq!(l.expired(3_001, &T), Some(Expiry::Read));
        l.on_input(3_000, false);
        l.set_write_stalled(Some(3_500));
        assert_eq!(l.expired(5_501, &T), Some(Expiry::WriteStall));
        l.set_write_stalled(None);
        assert_eq!(l.expired(8_000, &T), None);
        assert_eq!(l.expired(8_001, &T), Some(Expiry::Idle));
        let sidecar = Timeouts { idle_ms: None, ..T };
        assert_eq!(l.expired(1_000_000, &sidecar), None, "app-servers have no idle timeout");
    }

    proptest! {
        /// `next_deadline` is exactly where `expired` turns on: nothing expires at it, something
        /// does just after, whatever the state (the sweep relies on both halves).
        #[test]
        fn next_deadline_is_where_expiry_begins(
            accepted in 0u64..1_000,
            input in proptest::option::of((0u64..20_000, any::<bool>())),
            stalled in proptest::option::of(0u64..20_000),
            live in any::<bool>(),
            refused in any::<bool>(),
            idle in any::<bool>(),
            closing in any::<bool>(),
        ) {
            let t = Timeouts { idle_ms: idle.then_some(5_000), ..T };
            let mut l = Lifecycle::new(accepted);
            if let Some((at, partial)) = input {
                l.on_input(accepted + at, partial);
            }
            l.set_write_stalled(stalled.map(|s| accepted + s));
            if live {
                l.begin_login(1, Some(Role::Driver));
                if refused { l.login_refused() } else { l.go_live(1, Role::Driver); }
            }
            if closing {
                l.close(CloseReason::PeerGone);
            }
            match l.next_deadline(&t) {
                None => prop_assert_eq!(l.expired(u64::MAX / 2, &t), None),
                Some(d) => {
                    prop_assert_eq!(l.expired(d, &t), None);
                    prop_assert!(l.expired(d + 1, &t).is_some());
                }
            }
        }

        /// Checked on a sweep every `sweep` ms, every timeout is caught within one sweep of its
        /// deadline, and never before it.
        #[test]
        fn every_timeout_fires_within_one_sweep(
            inputs in proptest::collection::vec((0u64..20_000, any::<bool>()), 0..20),
            login_at in proptest::option::of(0u64..3_000),
            sweep in 1u64..500,
        ) {
            let mut l = Lifecycle::new(0);
            let mut inputs = inputs;
            inputs.sort();
            let mut events: Vec<(u64, Option<bool>)> = inputs.iter().map(|&(t, p)| (t, Some(p))).collect();
            if let Some(t) = login_at {
                events.push((t, None));
            }
            events.sort_by_key(|e| e.0);
            // The true deadline, recomputed after each event from the rules themselves.
            let mut now = 0;
            let mut ev = events.into_iter().peekable();
            loop {
                now += sweep;
                while let Some(&(t, what)) = ev.peek() {
                    if t > now { break; }
                    match what {
                        Some(partial) => l.on_input(t, partial),
                        None => { l.begin_login(1, Some(Role::Driver)); l.go_live(1, Role::Driver); }
                    }
                    ev.next();
                }
                if let Some(e) = l.expired(now, &T) {
                    // It expired since the previous sweep, and not before its deadline.
                    let deadline = match e {
                        Expiry::Login => T.login_ms,
                        Expiry::Read => l.partial_since_ms.unwrap() + T.read_ms,
                        Expiry::WriteStall => unreachable!(),
                        Expiry::Idle => l.last_rx_ms + T.idle_ms.unwrap(),
                    };
                    prop_assert!(now > deadline);
                    prop_assert!(now <= deadline + sweep + 1, "{e:?} caught {} ms late", now - deadline);
                    break;
                }
                prop_assert!(now < 100_000, "nothing ever expired");
            }
        }
    }
}
