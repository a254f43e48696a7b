//! EndSession (docs/PROTOCOL.md §9.15): an app-server ends a uid's session wherever it is, e.g.
//! because the account was banned.
//!
//! The uid's logic shard ends the session if this node holds it (the app gets GoAway Ended, its
//! unacked pushes end Offline) and answers. In cluster mode a uid with no session here is looked
//! up in the directory and the end is forwarded, sealed, to the node holding it, whose answer
//! comes back (`crate::cluster::relay`); that node ends what it holds and never asks further, so
//! an end takes at most one hop. Each ask waits here, on the gate shard that received it, under a
//! tag that carries this shard in its top 16 bits (the logic shard's answer and the other node's
//! find their way back without a lookup), bounded in number and in time.

pub use super::waits::Asker;
use super::waits::{Deadline, Waits};
use crate::app::session::error;
use crate::state::Shard;
use logic::{ConnRef, Input, Origin};
use schema::wire::{self, ErrorCode, GoAwayReason, Hop};
use schema::{Cmd, FrameType, Header};
use std::sync::atomic::Ordering::Relaxed;

/// Most asks one gate shard keeps waiting; past it a new one is refused Overloaded (a bound on
/// memory when the directory or another node stops answering).
pub const MAX_WAITING: usize = 65_536;
/// How long an ask may wait in all (logic shard, directory, the other node) before the
/// app-server gets Error Timeout: the directory answers within its 500 ms command timeout and a
/// node within a hop, so this only fires when a node stopped answering.
pub const PATIENCE_MS: u64 = 5_000;
/// Characters of the app-server's message kept for the app's GoAway.
pub const MAX_MESSAGE_CHARS: usize = 256;
/// Tags count in the bits below this one; the bit itself marks the directory lookup made for
/// an ask (`crate::cluster::relay`), so the two never meet. The cluster's own lookups (a push's
/// targets) count up from 1 below it and would need 2^47 lookups to reach it.
pub const LOOKUP_BIT: u64 = 1 << 47;

/// Where an ask stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// This node's logic shard is asked.
    Logic,
    /// The directory is asked which node holds the uid.
    Directory,
    /// That node is asked.
    Node(Origin),
}

/// One ask waiting.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The user.
    pub uid: u64,
    /// Who asked.
    pub asker: Asker,
    /// The ask's log-id.
    pub log_id: u64,
    /// For the app's GoAway (kept to forward it to another node).
    pub message: String,
    /// Where it stands.
    pub stage: Stage,
    /// When it fails Timeout.
    deadline: u64,
}

/// How an ask ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Found and ended on the node of this name.
    Ended(String),
    /// No session anywhere the gate could see.
    NotFound,
    /// It could not be decided: the error for the app-server.
    Failed {
        /// The code.
        code: ErrorCode,
        /// The hop.
        origin: Hop,
        /// Why.
        message: String,
        /// For Overloaded: wait at least this long.
        retry_after_ms: u32,
    },
}

/// The asks one gate shard waits on; tags count below [`LOOKUP_BIT`].
pub type Ends = Waits<Waiting, MAX_WAITING, 47>;
const _: () = assert!(1 << 47 == LOOKUP_BIT);

impl Deadline for Waiting {
    fn deadline(&self) -> u64 {
        self.deadline
    }
}

impl Ends {
    /// Tags of asks waiting on another node.
    pub fn at_nodes(&self) -> Vec<(u64, Origin)> {
        self.iter()
            .filter_map(|(&tag, w)| match w.stage {
                Stage::Node(o) => Some((tag, o)),
                _ => None,
            })
            .collect()
    }
}

/// The name this node answers with: its cluster name, else `gate.node_name`, else the address
/// apps reach it at (the same rule that names a node in cluster mode).
pub fn node_name(shard: &Shard) -> String {
    match (&shard.cluster, shard.cfg.gate.node_name.as_str()) {
        (Some(c), _) => c.name.clone(),
        (None, "") => shard.node.clone(),
        (None, name) => name.to_owned(),
    }
}

/// An app-server's EndSession on connection `me`.
pub fn request(shard: &mut Shard, me: ConnRef, h: &Header, uid: u64, message: &str, now: u64) {
    if shard.shutting_down {
        return error(shard, me, h, ErrorCode::ShuttingDown, Hop::Gate, "gate shutting down");
    }
    let message: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    tracing::info!(log_id = h.log_id, uid, message, "end session: asked by the app-server");
    let asker = Asker::Sidecar { conn: me, seq: h.seq };
    if !ask_logic(shard, uid, asker, h.log_id, message, now) {
        shard.send_error(
            me,
            h.seq,
            h.log_id,
            ErrorCode::Overloaded,
            Hop::Gate,
            Cmd::EndSession as u16,
            "too many EndSession requests waiting on this gate shard",
            crate::state::jitter(1_000),
        );
    }
}

/// Another node asks this one to end `uid`'s session (the directory named this node).
pub fn from_node(
    shard: &mut Shard,
    origin: Origin,
    tag: u64,
    uid: u64,
    log_id: u64,
    message: String,
    now: u64,
) {
    tracing::info!(log_id, uid, origin, "end session: asked by another node");
    if !ask_logic(shard, uid, Asker::Node { origin, tag }, log_id, message, now) {
        // The asker's own deadline answers its app-server (Timeout).
        tracing::error!(log_id, uid, "end session from another node dropped: too many waiting on this shard");
    }
}

/// Registers the ask and hands it to the uid's logic shard; false when the bound is hit.
fn ask_logic(shard: &mut Shard, uid: u64, asker: Asker, log_id: u64, message: String, now: u64) -> bool {
    let w = Waiting {
        uid,
        asker,
        log_id,
        message: message.clone(),
        stage: Stage::Logic,
        deadline: now + PATIENCE_MS,
    };
    let Some(tag) = shard.ends.insert(shard.id, w) else { return false };
    shard.to_logic(uid, Input::End { uid, tag, log_id, message });
    true
}

/// The logic shard ended the session on connection `conn`: GoAway Ended, then close. Like a
/// logout, the connection no longer carries the session, so its close reports nothing more.
pub fn ended(shard: &mut Shard, conn: ConnRef, uid: u64, log_id: u64, message: &str) {
    let log_id = shard.log_id_or_new(log_id);
    let was_live = shard.life(conn).is_some_and(|l| {
        let live = matches!(l.phase, crate::lifecycle::Phase::Live { .. });
        l.session_ended();
        live
    });
    if was_live {
        shard.metrics().sessions_on_conns.fetch_sub(1, Relaxed);
    }
    tracing::info!(log_id, uid, shard = shard.id, "end session: ended here by the app-server");
    let message = if message.is_empty() { "session ended by the app-server" } else { message };
    shard.go_away(conn, log_id, GoAwayReason::Ended, message, 0);
}

/// The logic shard's answer to the ask of `tag` (on the shard that asked).
pub fn answered(shard: &mut Shard, tag: u64, uid: u64, found: bool, now: u64) {
    let Some(w) = shard.ends.get_mut(tag) else { return };
    if found {
        let name = node_name(shard);
        if let Some(w) = shard.ends.take(tag) {
            finish(shard, w, Answer::Ended(name));
        }
        return;
    }
    // Not here. An app-server's ask goes on to the directory in cluster mode; another node's
    // ask ends here (one hop at most).
    if matches!(w.asker, Asker::Sidecar { .. }) && shard.cluster.is_some() {
        w.stage = Stage::Directory;
        crate::cluster::relay::look_up_for_end(shard, tag, uid, now);
        return;
    }
    if let Some(w) = shard.ends.take(tag) {
        finish(shard, w, Answer::NotFound);
    }
}

/// Ends an ask: the frame for this node's app-server, or the node message for another node's.
pub fn finish(shard: &mut Shard, w: Waiting, answer: Answer) {
    match w.asker {
        Asker::Node { origin, tag } => {
            let found = matches!(answer, Answer::Ended(_));
            crate::cluster::relay::session_ended(shard, origin, tag, w.uid, found);
        }
        Asker::Sidecar { conn, seq } => match answer {
            Answer::Ended(node) => respond(shard, conn, seq, w.log_id, w.uid, true, &node),
            Answer::NotFound => respond(shard, conn, seq, w.log_id, w.uid, false, ""),
            Answer::Failed { code, origin, message, retry_after_ms } => {
                let cmd = Cmd::EndSession as u16;
                shard.send_error(conn, seq, w.log_id, code, origin, cmd, &message, retry_after_ms);
            }
        },
    }
}

/// The Response: found (and on which node) or not.
fn respond(shard: &mut Shard, conn: ConnRef, seq: u32, log_id: u64, uid: u64, found: bool, node: &str) {
    tracing::info!(log_id, uid, found, node, "end session: answered");
    shard.send_frame(conn, FrameType::Response, Cmd::EndSession, seq, log_id, |b| {
        let node = b.create_string(node);
        wire::SessionEnded::create(b, &wire::SessionEndedArgs { uid, found, node: Some(node) })
    });
}

/// Asks past their deadline end Timeout (at most 4,096 per call).
pub fn expire(shard: &mut Shard, now: u64) {
    for tag in shard.ends.due(now, 4096) {
        let Some(w) = shard.ends.take(tag) else { continue };
        let message = match w.stage {
            Stage::Logic => "the logic shard did not answer in time".to_owned(),
            Stage::Directory => "the directory did not answer in time".to_owned(),
            Stage::Node(o) => format!(
                "node {} holding the session did not answer in time",
                shard.cluster.as_ref().and_then(|c| c.origin_name(o)).unwrap_or_default()
            ),
        };
        tracing::warn!(log_id = w.log_id, uid = w.uid, message, "end session: no answer");
        let answer =
            Answer::Failed { code: ErrorCode::Timeout, origin: Hop::Gate, message, retry_after_ms: 0 };
        finish(shard, w, answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logic::shard::END_TAG_SHIFT;

    fn w(deadline: u64) -> Waiting {
        Waiting {
            uid: 1,
            asker: Asker::Node { origin: 1, tag: 2 },
            log_id: 3,
            message: String::new(),
            stage: Stage::Logic,
            deadline,
        }
    }

    #[test]
    fn tags_name_their_shard_stay_below_the_lookup_bit_and_are_bounded() {
        let mut e = Ends::default();
        let t = e.insert(5, w(10)).expect("room");
        assert_eq!(t >> END_TAG_SHIFT, 5);
        assert_eq!(t & LOOKUP_BIT, 0);
        e.next = LOOKUP_BIT - 1;
        let wrapped = e.insert(5, w(10)).expect("room");
        assert_eq!(wrapped & LOOKUP_BIT, 0, "the counter wraps below the lookup bit");
        assert_eq!(e.next_deadline(), Some(10));
        assert!(e.take(t).is_some() && e.take(t).is_none(), "taken once");
        for i in e.len()..MAX_WAITING {
            assert!(e.insert(0, w(i as u64)).is_some());
        }
        assert!(e.insert(0, w(1)).is_none(), "bounded");
    }
}
