//! Messages between gate nodes in cluster mode (docs/PROTOCOL.md §15), sans I/O.
//!
//! A node sends another node a push for the sessions it holds, the receipts of such pushes
//! back, and word that a newer session of a uid replaced one it holds. For a resume that lands
//! on another node, that node asks for the session (`Take`) and gets it with its unacked
//! pushes and resumption secret (`Handoff`), or hears it is gone (`NotHere`). A node with no
//! app-server connected relays what is meant for one (GPS, app requests and their answers,
//! unreachable events) to a node that has one, and an app-server's EndSession reaches the node
//! holding the session (kinds from `0x40` up: the relay's). The bytes here are the plaintext of one sealed message: the gate seals them (ChaCha20-Poly1305 under a key derived
//! from the cluster secret, see `gate::cluster::link`) before they leave the process, so the
//! transport between nodes sees neither push payloads nor who is logged in.
//!
//! Layout, little-endian: `kind: u8`, then the kind's fields. Vectors are a `u32` count then
//! the items; byte strings a `u32` length then the bytes. Decoding checks every length against
//! the bytes present and [`MAX_MESSAGE`], so hostile input ends in a [`NodeError`], never a
//! panic or an allocation larger than the message itself.

use crate::wire;
use thiserror::Error;

/// Largest message accepted, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most targets a sender puts in one `Push` (more go in several): 64 KiB payload room left.
pub const MAX_PUSH_UIDS: usize = 65_536;
/// Most receipts a sender puts in one `Receipts` message (more go in several).
pub const MAX_RECEIPTS: usize = 32_768;
const _: () = assert!(1 + 8 + 8 + 4 + 4 + 65_536 + 4 + 8 * MAX_PUSH_UIDS <= MAX_MESSAGE);
const _: () = assert!(1 + 4 + RECEIPT_LEN * MAX_RECEIPTS <= MAX_MESSAGE);
/// Most GPS points a sender puts in one `Gps` message (more go in several): 512 KiB.
pub const MAX_GPS_POINTS: usize = 16_384;
const _: () = assert!(1 + 4 + GPS_POINT_LEN * MAX_GPS_POINTS <= MAX_MESSAGE);
/// Most unreachable events a sender puts in one `Unreachable` message.
pub const MAX_UNREACHABLE: usize = 65_536;
const _: () = assert!(1 + 4 + 9 * MAX_UNREACHABLE <= MAX_MESSAGE);
/// Most bytes a sender puts in one `Requests` or `Answers` message, items' bodies and texts
/// included (more go in several). One item larger than this cannot travel: the sender answers
/// it itself.
pub const MAX_RELAY_BYTES: usize = 768 * 1024;
/// Most drivers one `GeoFound` carries (a geo request's `k` is at most 1,000).
pub const MAX_GEO_HITS: usize = 1_000;
const _: () = assert!(1 + 8 + 4 + GEO_HIT_LEN * MAX_GEO_HITS <= MAX_MESSAGE);
const _: () = assert!(MAX_RELAY_BYTES + 1024 <= MAX_MESSAGE);

/// One receipt of a forwarded push, on its way back to the node that accepted the push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeReceipt {
    /// The push.
    pub message_id: u64,
    /// The target.
    pub uid: u64,
    /// `wire::Outcome` value.
    pub outcome: u8,
    /// The push's log-id.
    pub log_id: u64,
}

/// An app request relayed to a node with an app-server, which sends it to its app-server as
/// an `Upstream` request and sends the answer back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRequest {
    /// The asking node's id for it (its logic shard in the top 16 bits); echoed in the answer.
    pub request_id: u64,
    /// The app's log-id.
    pub log_id: u64,
    /// The app.
    pub uid: u64,
    /// Its `wire::Role` value.
    pub role: u8,
    /// The app's cmd.
    pub cmd: u16,
    /// How long the asking node waits for the answer, ms: the carrying node forgets the
    /// request a little after that.
    pub timeout_ms: u32,
    /// The app's verified body.
    pub body: Vec<u8>,
}

impl NodeRequest {
    /// Bytes it takes in a `Requests` message.
    pub fn wire_len(&self) -> usize {
        8 + 8 + 8 + 1 + 2 + 4 + 4 + self.body.len()
    }
}

/// How a relayed request ended on the node that carried it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeAnswer {
    /// The app-server answered: the encoded `Reply` body for the app.
    Reply {
        /// The asking node's request id.
        request_id: u64,
        /// The `Reply` body.
        reply: Vec<u8>,
    },
    /// It failed there.
    Failed {
        /// The asking node's request id.
        request_id: u64,
        /// One of [`failure`]'s values (an unknown one reads as [`failure::NO_APP_SERVER`]).
        failure: u8,
        /// The app-server's own message (for [`failure::APP_SERVER_ERROR`]), else empty.
        message: String,
    },
}

/// Why a relayed request failed on the node that carried it.
pub mod failure {
    /// No app-server took it there, or its connection dropped before answering.
    pub const NO_APP_SERVER: u8 = 1;
    /// The app-server answered with an Error frame, or its reply would not fit.
    pub const APP_SERVER_ERROR: u8 = 2;
}

impl NodeAnswer {
    /// The asking node's request id.
    pub fn request_id(&self) -> u64 {
        match self {
            NodeAnswer::Reply { request_id, .. } | NodeAnswer::Failed { request_id, .. } => *request_id,
        }
    }

    /// Bytes it takes in an `Answers` message.
    pub fn wire_len(&self) -> usize {
        match self {
            NodeAnswer::Reply { reply, .. } => 1 + 8 + 4 + reply.len(),
            NodeAnswer::Failed { message, .. } => 1 + 8 + 1 + 4 + message.len(),
        }
    }
}

/// A geo request's selection as an app-server sent it, before its bounds are checked
/// (docs/PROTOCOL.md §9.16): the `k` nearest drivers within `radius_m` of a point. Carried
/// between nodes in `NodeMsg::GeoAsk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeoSelection {
    /// 1e-7 degrees.
    pub lat_e7: i32,
    /// 1e-7 degrees.
    pub lon_e7: i32,
    /// Metres.
    pub radius_m: u32,
    /// Drivers wanted.
    pub k: u32,
    /// 0: any age.
    pub max_age_ms: u32,
    /// `wire::GeoFilter` value.
    pub filter: u8,
}

impl GeoSelection {
    /// A GeoQuery's selection.
    pub fn of_query(g: &wire::GeoQuery<'_>) -> GeoSelection {
        let (lat_e7, lon_e7, radius_m, k) = (g.lat_e7(), g.lon_e7(), g.radius_m(), g.k());
        GeoSelection { lat_e7, lon_e7, radius_m, k, max_age_ms: g.max_age_ms(), filter: g.filter().0 }
    }

    /// A GeoPush's selection.
    pub fn of_push(g: &wire::GeoPush<'_>) -> GeoSelection {
        let (lat_e7, lon_e7, radius_m, k) = (g.lat_e7(), g.lon_e7(), g.radius_m(), g.k());
        GeoSelection { lat_e7, lon_e7, radius_m, k, max_age_ms: g.max_age_ms(), filter: g.filter().0 }
    }
}

/// A message from one node to another. (`PartialEq` only: GPS points are generated structs.)
#[derive(Clone, Debug, PartialEq)]
pub enum NodeMsg {
    /// A push accepted by the sender for sessions the receiver holds.
    Push {
        /// The app-server's id for the push.
        message_id: u64,
        /// The push's log-id.
        log_id: u64,
        /// Time-to-live left when it was sent, ms.
        ttl_ms: u32,
        /// The encoded `PushDelivery` body.
        body: Vec<u8>,
        /// The targets.
        uids: Vec<u64>,
    },
    /// Final receipts of pushes the receiver forwarded to the sender.
    Receipts(Vec<NodeReceipt>),
    /// The directory now names a newer session of `uid` than the receiver's session of
    /// `epoch`: the receiver ends it as displaced.
    Superseded {
        /// The user.
        uid: u64,
        /// The receiver's session that lost.
        epoch: u64,
    },
    /// An app resumes on the sender with a token for `uid`'s session of `epoch`, which the
    /// directory says the receiver holds: hand it over (answered by `Handoff` or `NotHere`).
    Take {
        /// The user.
        uid: u64,
        /// The session's epoch.
        epoch: u64,
    },
    /// A session handed over to the receiver, with its unacked pushes: the receiver holds it
    /// from now on.
    Handoff(Box<HandedSession>),
    /// The sender was asked for a session it does not hold (ended, or another epoch).
    NotHere {
        /// The user.
        uid: u64,
        /// The epoch asked for.
        epoch: u64,
    },
    /// Pairs (message id, uid) of pushes the receiver accepted and forwarded to a third node,
    /// whose sessions moved to the sender: the receipts now come from the sender.
    Rehomed(Vec<(u64, u64)>),
    /// Several messages for the same node sealed as one (what one turn of the sender had for
    /// it): one publish and one seal instead of many. Never nested.
    Batch(Vec<NodeMsg>),
    /// Relay: coalesced GPS for the receiver's app-server (the sender has none).
    Gps(Vec<wire::UidGpsPoint>),
    /// Relay: app requests for the receiver's app-server.
    Requests(Vec<NodeRequest>),
    /// Relay: how requests the receiver relayed to the sender ended.
    Answers(Vec<NodeAnswer>),
    /// Relay: sessions that ended without logout, (uid, `wire::Outcome` value), for the
    /// receiver's app-server.
    Unreachable(Vec<(u64, u8)>),
    /// An app-server asked the sender to end `uid`'s session, which the directory says the
    /// receiver holds.
    EndSession {
        /// The sender's id for the ask; echoed in `SessionEnded`.
        tag: u64,
        /// The user.
        uid: u64,
        /// The ask's log-id.
        log_id: u64,
        /// For the app's GoAway.
        message: String,
    },
    /// The answer to `EndSession`.
    SessionEnded {
        /// The asker's tag.
        tag: u64,
        /// The user.
        uid: u64,
        /// A session was found and ended.
        found: bool,
    },
    /// An app-server's GeoQuery or GeoPush on the sender: the receiver's own nearest drivers
    /// for this selection (docs/PROTOCOL.md §9.16), answered with `GeoFound`.
    GeoAsk {
        /// The sender's id for the request; echoed in `GeoFound`.
        tag: u64,
        /// The request's log-id.
        log_id: u64,
        /// The selection, as the app-server sent it (the sender checked its bounds; the
        /// receiver checks them again).
        sel: GeoSelection,
    },
    /// The answer to `GeoAsk`: the receiver's nearest drivers, nearest first.
    GeoFound {
        /// The asker's tag.
        tag: u64,
        /// At most `MAX_GEO_HITS`.
        hits: Vec<wire::GeoHit>,
    },
}

/// A session on its way between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedSession {
    /// The user.
    pub uid: u64,
    /// The session's epoch.
    pub epoch: u64,
    /// `wire::Role` value.
    pub role: u8,
    /// Resumes so far.
    pub resumes: u32,
    /// The secure channel's resumption secret (none for a plaintext session). Sealed like every
    /// node message, so it never crosses Redis in the clear.
    pub resume_secret: Option<[u8; 32]>,
    /// How long the session may still be held, ms.
    pub hold_left_ms: u32,
    /// The last sequence-id the session used.
    pub last_seq: u32,
    /// Unacked pushes, in sequence order.
    pub pushes: Vec<HandedPush>,
}

/// One unacked push of a handed-over session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedPush {
    /// Its sequence-id in the session.
    pub seq: u32,
    /// The app-server's id for the push.
    pub message_id: u64,
    /// The push's log-id.
    pub log_id: u64,
    /// Time-to-live left, ms.
    pub ttl_left_ms: u32,
    /// Written to a connection before.
    pub sent: bool,
    /// The node whose app-server gets its receipt (0 to 255 bytes of UTF-8).
    pub origin: String,
    /// The encoded `PushDelivery` body.
    pub body: Vec<u8>,
}

/// Why bytes are not a node message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum NodeError {
    /// No bytes.
    #[error("empty node message")]
    Empty,
    /// Larger than [`MAX_MESSAGE`].
    #[error("node message of {0} bytes is over the 1 MiB limit")]
    TooLarge(usize),
    /// The kind byte names no message.
    #[error("unknown node message kind {0}")]
    UnknownKind(u8),
    /// The message ends before a field it announces.
    #[error("node message truncated")]
    Truncated,
    /// Bytes left after the last field.
    #[error("{0} bytes after the end of a node message")]
    Trailing(usize),
    /// The envelope's sender name is empty or not UTF-8.
    #[error("node message sender is empty or not UTF-8")]
    BadSender,
    /// A field holds a value it may not (a flag other than 0 or 1, a name or text not UTF-8,
    /// an unknown answer kind).
    #[error("node message field {0} is invalid")]
    Invalid(&'static str),
}

const PUSH: u8 = 1;
const RECEIPTS: u8 = 2;
const SUPERSEDED: u8 = 3;
const TAKE: u8 = 4;
const HANDOFF: u8 = 5;
const NOT_HERE: u8 = 6;
const REHOMED: u8 = 7;
const BATCH: u8 = 8;
// The relay's kinds start well apart from the others, so kinds added on either side never meet.
const GPS: u8 = 0x40;
const REQUESTS: u8 = 0x41;
const ANSWERS: u8 = 0x42;
const UNREACHABLE: u8 = 0x43;
const END_SESSION: u8 = 0x44;
const SESSION_ENDED: u8 = 0x45;
const GEO_ASK: u8 = 0x46;
const GEO_FOUND: u8 = 0x47;
/// `NodeAnswer` kinds.
const ANSWER_REPLY: u8 = 1;
const ANSWER_FAILED: u8 = 2;
/// Bytes of one receipt on the wire.
const RECEIPT_LEN: usize = 8 + 8 + 1 + 8;
/// Bytes of one GPS point on the wire: a `wire::UidGpsPoint` as it is.
const GPS_POINT_LEN: usize = 32;
/// A `wire::GeoHit`'s bytes.
const GEO_HIT_LEN: usize = 24;

impl NodeMsg {
    /// Appends the message's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            NodeMsg::Push { message_id, log_id, ttl_ms, body, uids } => {
                out.push(PUSH);
                out.extend_from_slice(&message_id.to_le_bytes());
                out.extend_from_slice(&log_id.to_le_bytes());
                out.extend_from_slice(&ttl_ms.to_le_bytes());
                out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                out.extend_from_slice(body);
                out.extend_from_slice(&(uids.len() as u32).to_le_bytes());
                for uid in uids {
                    out.extend_from_slice(&uid.to_le_bytes());
                }
            }
            NodeMsg::Receipts(rs) => {
                out.push(RECEIPTS);
                out.extend_from_slice(&(rs.len() as u32).to_le_bytes());
                for r in rs {
                    out.extend_from_slice(&r.message_id.to_le_bytes());
                    out.extend_from_slice(&r.uid.to_le_bytes());
                    out.push(r.outcome);
                    out.extend_from_slice(&r.log_id.to_le_bytes());
                }
            }
            NodeMsg::Superseded { uid, epoch } => {
                out.push(SUPERSEDED);
                out.extend_from_slice(&uid.to_le_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            NodeMsg::Take { uid, epoch } | NodeMsg::NotHere { uid, epoch } => {
                out.push(if matches!(self, NodeMsg::Take { .. }) { TAKE } else { NOT_HERE });
                out.extend_from_slice(&uid.to_le_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            NodeMsg::Handoff(h) => {
                out.push(HANDOFF);
                out.extend_from_slice(&h.uid.to_le_bytes());
                out.extend_from_slice(&h.epoch.to_le_bytes());
                out.push(h.role);
                out.extend_from_slice(&h.resumes.to_le_bytes());
                match &h.resume_secret {
                    Some(k) => {
                        out.push(1);
                        out.extend_from_slice(k);
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&h.hold_left_ms.to_le_bytes());
                out.extend_from_slice(&h.last_seq.to_le_bytes());
                out.extend_from_slice(&(h.pushes.len() as u32).to_le_bytes());
                for p in &h.pushes {
                    out.extend_from_slice(&p.seq.to_le_bytes());
                    out.extend_from_slice(&p.message_id.to_le_bytes());
                    out.extend_from_slice(&p.log_id.to_le_bytes());
                    out.extend_from_slice(&p.ttl_left_ms.to_le_bytes());
                    out.push(p.sent as u8);
                    let name = &p.origin.as_bytes()[..p.origin.len().min(255)];
                    out.push(name.len() as u8);
                    out.extend_from_slice(name);
                    out.extend_from_slice(&(p.body.len() as u32).to_le_bytes());
                    out.extend_from_slice(&p.body);
                }
            }
            NodeMsg::Batch(msgs) => {
                out.push(BATCH);
                out.extend_from_slice(&(msgs.len() as u32).to_le_bytes());
                for m in msgs {
                    let at = out.len();
                    out.extend_from_slice(&[0; 4]);
                    m.encode(out);
                    let len = (out.len() - at - 4) as u32;
                    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
                }
            }
            NodeMsg::Rehomed(pairs) => {
                out.push(REHOMED);
                out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
                for (message_id, uid) in pairs {
                    out.extend_from_slice(&message_id.to_le_bytes());
                    out.extend_from_slice(&uid.to_le_bytes());
                }
            }
            NodeMsg::Gps(points) => {
                out.push(GPS);
                out.extend_from_slice(&(points.len() as u32).to_le_bytes());
                for p in points {
                    out.extend_from_slice(&p.0);
                }
            }
            NodeMsg::Requests(rs) => {
                out.push(REQUESTS);
                out.extend_from_slice(&(rs.len() as u32).to_le_bytes());
                for r in rs {
                    out.extend_from_slice(&r.request_id.to_le_bytes());
                    out.extend_from_slice(&r.log_id.to_le_bytes());
                    out.extend_from_slice(&r.uid.to_le_bytes());
                    out.push(r.role);
                    out.extend_from_slice(&r.cmd.to_le_bytes());
                    out.extend_from_slice(&r.timeout_ms.to_le_bytes());
                    put_bytes(out, &r.body);
                }
            }
            NodeMsg::Answers(answers) => {
                out.push(ANSWERS);
                out.extend_from_slice(&(answers.len() as u32).to_le_bytes());
                for a in answers {
                    match a {
                        NodeAnswer::Reply { request_id, reply } => {
                            out.push(ANSWER_REPLY);
                            out.extend_from_slice(&request_id.to_le_bytes());
                            put_bytes(out, reply);
                        }
                        NodeAnswer::Failed { request_id, failure, message } => {
                            out.push(ANSWER_FAILED);
                            out.extend_from_slice(&request_id.to_le_bytes());
                            out.push(*failure);
                            put_bytes(out, message.as_bytes());
                        }
                    }
                }
            }
            NodeMsg::Unreachable(list) => {
                out.push(UNREACHABLE);
                out.extend_from_slice(&(list.len() as u32).to_le_bytes());
                for (uid, outcome) in list {
                    out.extend_from_slice(&uid.to_le_bytes());
                    out.push(*outcome);
                }
            }
            NodeMsg::EndSession { tag, uid, log_id, message } => {
                out.push(END_SESSION);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&uid.to_le_bytes());
                out.extend_from_slice(&log_id.to_le_bytes());
                put_bytes(out, message.as_bytes());
            }
            NodeMsg::SessionEnded { tag, uid, found } => {
                out.push(SESSION_ENDED);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&uid.to_le_bytes());
                out.push(u8::from(*found));
            }
            NodeMsg::GeoAsk { tag, log_id, sel } => {
                out.push(GEO_ASK);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&log_id.to_le_bytes());
                out.extend_from_slice(&sel.lat_e7.to_le_bytes());
                out.extend_from_slice(&sel.lon_e7.to_le_bytes());
                out.extend_from_slice(&sel.radius_m.to_le_bytes());
                out.extend_from_slice(&sel.k.to_le_bytes());
                out.extend_from_slice(&sel.max_age_ms.to_le_bytes());
                out.push(sel.filter);
            }
            NodeMsg::GeoFound { tag, hits } => {
                out.push(GEO_FOUND);
                out.extend_from_slice(&tag.to_le_bytes());
                out.extend_from_slice(&(hits.len() as u32).to_le_bytes());
                for h in hits {
                    out.extend_from_slice(&h.0);
                }
            }
        }
    }

    /// How many bytes `encode` writes, without writing them (to fill batches up to the limit).
    pub fn encoded_len(&self) -> usize {
        match self {
            NodeMsg::Push { body, uids, .. } => 1 + 8 + 8 + 4 + 4 + body.len() + 4 + 8 * uids.len(),
            NodeMsg::Receipts(rs) => 1 + 4 + RECEIPT_LEN * rs.len(),
            NodeMsg::Superseded { .. } | NodeMsg::Take { .. } | NodeMsg::NotHere { .. } => 1 + 16,
            NodeMsg::Handoff(h) => {
                let secret = if h.resume_secret.is_some() { 32 } else { 0 };
                let pushes: usize = h
                    .pushes
                    .iter()
                    .map(|p| 4 + 8 + 8 + 4 + 1 + 1 + p.origin.len().min(255) + 4 + p.body.len())
                    .sum();
                1 + 8 + 8 + 1 + 4 + 1 + secret + 4 + 4 + 4 + pushes
            }
            NodeMsg::Rehomed(pairs) => 1 + 4 + 16 * pairs.len(),
            NodeMsg::Batch(msgs) => 1 + 4 + msgs.iter().map(|m| 4 + m.encoded_len()).sum::<usize>(),
            NodeMsg::Gps(points) => 1 + 4 + GPS_POINT_LEN * points.len(),
            NodeMsg::Requests(rs) => 1 + 4 + rs.iter().map(NodeRequest::wire_len).sum::<usize>(),
            NodeMsg::Answers(answers) => 1 + 4 + answers.iter().map(NodeAnswer::wire_len).sum::<usize>(),
            NodeMsg::Unreachable(list) => 1 + 4 + 9 * list.len(),
            NodeMsg::EndSession { message, .. } => 1 + 8 + 8 + 8 + 4 + message.len(),
            NodeMsg::SessionEnded { .. } => 1 + 8 + 8 + 1,
            NodeMsg::GeoAsk { .. } => 1 + 8 + 8 + 4 * 5 + 1,
            NodeMsg::GeoFound { hits, .. } => 1 + 8 + 4 + GEO_HIT_LEN * hits.len(),
        }
    }

    /// The message's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Reads one whole message.
    pub fn decode(bytes: &[u8]) -> Result<NodeMsg, NodeError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(NodeError::TooLarge(bytes.len()));
        }
        let (&kind, rest) = bytes.split_first().ok_or(NodeError::Empty)?;
        let mut r = Reader(rest);
        let msg = match kind {
            PUSH => {
                let message_id = r.u64()?;
                let log_id = r.u64()?;
                let ttl_ms = r.u32()?;
                let body_len = r.u32()? as usize;
                let body = r.take(body_len)?.to_vec();
                let n = r.u32()? as usize;
                let raw = r.take(n.checked_mul(8).ok_or(NodeError::Truncated)?)?;
                let uids = raw.chunks_exact(8).map(le_u64).collect();
                NodeMsg::Push { message_id, log_id, ttl_ms, body, uids }
            }
            RECEIPTS => {
                let n = r.u32()? as usize;
                let raw = r.take(n.checked_mul(RECEIPT_LEN).ok_or(NodeError::Truncated)?)?;
                let rs = raw
                    .chunks_exact(RECEIPT_LEN)
                    .map(|c| NodeReceipt {
                        message_id: le_u64(&c[0..8]),
                        uid: le_u64(&c[8..16]),
                        outcome: c[16],
                        log_id: le_u64(&c[17..25]),
                    })
                    .collect();
                NodeMsg::Receipts(rs)
            }
            SUPERSEDED => NodeMsg::Superseded { uid: r.u64()?, epoch: r.u64()? },
            TAKE => NodeMsg::Take { uid: r.u64()?, epoch: r.u64()? },
            NOT_HERE => NodeMsg::NotHere { uid: r.u64()?, epoch: r.u64()? },
            HANDOFF => {
                let uid = r.u64()?;
                let epoch = r.u64()?;
                let role = r.u8()?;
                let resumes = r.u32()?;
                let resume_secret = match r.flag("resume_secret")? {
                    true => Some(r.take(32)?.try_into().expect("32 bytes")),
                    false => None,
                };
                let hold_left_ms = r.u32()?;
                let last_seq = r.u32()?;
                let n = r.u32()?;
                // No capacity from the count: each push reads its bytes before it is kept, so a
                // hostile count ends in Truncated, never a large allocation.
                let mut pushes = Vec::new();
                for _ in 0..n {
                    let seq = r.u32()?;
                    let message_id = r.u64()?;
                    let log_id = r.u64()?;
                    let ttl_left_ms = r.u32()?;
                    let sent = r.flag("sent")?;
                    let name_len = r.u8()? as usize;
                    let origin = std::str::from_utf8(r.take(name_len)?)
                        .map_err(|_| NodeError::Invalid("origin"))?
                        .to_owned();
                    let body_len = r.u32()? as usize;
                    let body = r.take(body_len)?.to_vec();
                    pushes.push(HandedPush { seq, message_id, log_id, ttl_left_ms, sent, origin, body });
                }
                NodeMsg::Handoff(Box::new(HandedSession {
                    uid,
                    epoch,
                    role,
                    resumes,
                    resume_secret,
                    hold_left_ms,
                    last_seq,
                    pushes,
                }))
            }
            BATCH => {
                let n = r.u32()?;
                let mut msgs = Vec::new();
                for _ in 0..n {
                    let len = r.u32()? as usize;
                    let part = r.take(len)?;
                    if part.first() == Some(&BATCH) {
                        return Err(NodeError::Invalid("nested batch"));
                    }
                    msgs.push(NodeMsg::decode(part)?);
                }
                NodeMsg::Batch(msgs)
            }
            REHOMED => {
                let n = r.u32()? as usize;
                let raw = r.take(n.checked_mul(16).ok_or(NodeError::Truncated)?)?;
                NodeMsg::Rehomed(raw.chunks_exact(16).map(|c| (le_u64(&c[..8]), le_u64(&c[8..]))).collect())
            }
            GPS => {
                let n = r.u32()? as usize;
                let raw = r.take(n.checked_mul(GPS_POINT_LEN).ok_or(NodeError::Truncated)?)?;
                let points = raw
                    .chunks_exact(GPS_POINT_LEN)
                    .map(|c| {
                        let mut p = wire::UidGpsPoint::default();
                        p.0.copy_from_slice(c);
                        p
                    })
                    .collect();
                NodeMsg::Gps(points)
            }
            REQUESTS => {
                let n = r.u32()? as usize;
                // Every request takes at least 35 bytes: a count larger than the bytes left
                // allow is refused before anything is allocated for it.
                let mut rs = Vec::with_capacity(n.min(r.0.len() / 35));
                for _ in 0..n {
                    let request_id = r.u64()?;
                    let log_id = r.u64()?;
                    let uid = r.u64()?;
                    let role = r.u8()?;
                    let cmd = r.u16()?;
                    let timeout_ms = r.u32()?;
                    let body = r.bytes()?.to_vec();
                    rs.push(NodeRequest { request_id, log_id, uid, role, cmd, timeout_ms, body });
                }
                NodeMsg::Requests(rs)
            }
            ANSWERS => {
                let n = r.u32()? as usize;
                let mut answers = Vec::with_capacity(n.min(r.0.len() / 13));
                for _ in 0..n {
                    let kind = r.u8()?;
                    let request_id = r.u64()?;
                    answers.push(match kind {
                        ANSWER_REPLY => NodeAnswer::Reply { request_id, reply: r.bytes()?.to_vec() },
                        ANSWER_FAILED => {
                            let failure = r.u8()?;
                            NodeAnswer::Failed { request_id, failure, message: r.text()? }
                        }
                        _ => return Err(NodeError::Invalid("answer kind")),
                    });
                }
                NodeMsg::Answers(answers)
            }
            UNREACHABLE => {
                let n = r.u32()? as usize;
                let raw = r.take(n.checked_mul(9).ok_or(NodeError::Truncated)?)?;
                NodeMsg::Unreachable(raw.chunks_exact(9).map(|c| (le_u64(&c[..8]), c[8])).collect())
            }
            END_SESSION => {
                NodeMsg::EndSession { tag: r.u64()?, uid: r.u64()?, log_id: r.u64()?, message: r.text()? }
            }
            SESSION_ENDED => {
                let (tag, uid) = (r.u64()?, r.u64()?);
                NodeMsg::SessionEnded { tag, uid, found: r.flag("found")? }
            }
            GEO_ASK => {
                let (tag, log_id) = (r.u64()?, r.u64()?);
                let (lat_e7, lon_e7) = (r.u32()? as i32, r.u32()? as i32);
                let (radius_m, k, max_age_ms) = (r.u32()?, r.u32()?, r.u32()?);
                let sel = GeoSelection { lat_e7, lon_e7, radius_m, k, max_age_ms, filter: r.u8()? };
                NodeMsg::GeoAsk { tag, log_id, sel }
            }
            GEO_FOUND => {
                let tag = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_GEO_HITS {
                    return Err(NodeError::Invalid("more geo hits than MAX_GEO_HITS"));
                }
                let raw = r.take(n * GEO_HIT_LEN)?;
                let hits = raw
                    .chunks_exact(GEO_HIT_LEN)
                    .map(|c| wire::GeoHit(c.try_into().unwrap_or([0; GEO_HIT_LEN])))
                    .collect();
                NodeMsg::GeoFound { tag, hits }
            }
            k => return Err(NodeError::UnknownKind(k)),
        };
        if !r.0.is_empty() {
            return Err(NodeError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
}

/// The clear header of a sealed node message: who sent it and its place in the sender's
/// sequence. Layout: `name_len: u8`, the sender's node name (1 to 255 bytes of UTF-8), its
/// `incarnation: u64`, `counter: u64`, then the sealed message (ciphertext and 16-byte tag),
/// which is at least [`TAG_LEN`] bytes. The header is the seal's associated data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The sending node's name.
    pub sender: &'a str,
    /// The sending process's incarnation.
    pub incarnation: u64,
    /// Grows by one with every message the sending process seals: the nonce, and replay's
    /// guard.
    pub counter: u64,
    /// The header's bytes (the associated data of the seal).
    pub header: &'a [u8],
    /// Ciphertext and tag.
    pub sealed: &'a [u8],
}

/// Bytes of the seal's tag.
pub const TAG_LEN: usize = 16;

impl<'a> Envelope<'a> {
    /// Writes the header of a message from `sender` into `out` (then the caller appends the
    /// sealed bytes).
    pub fn write_header(sender: &str, incarnation: u64, counter: u64, out: &mut Vec<u8>) {
        let name = &sender.as_bytes()[..sender.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&incarnation.to_le_bytes());
        out.extend_from_slice(&counter.to_le_bytes());
    }

    /// Splits a received message into its header and sealed part.
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, NodeError> {
        if bytes.len() > MAX_MESSAGE + 512 {
            return Err(NodeError::TooLarge(bytes.len()));
        }
        let (&n, rest) = bytes.split_first().ok_or(NodeError::Empty)?;
        let mut r = Reader(rest);
        let name = r.take(n as usize)?;
        let sender = std::str::from_utf8(name).map_err(|_| NodeError::BadSender)?;
        if sender.is_empty() {
            return Err(NodeError::BadSender);
        }
        let incarnation = r.u64()?;
        let counter = r.u64()?;
        let header_len = 1 + n as usize + 16;
        if r.0.len() < TAG_LEN {
            return Err(NodeError::Truncated);
        }
        Ok(Envelope { sender, incarnation, counter, header: &bytes[..header_len], sealed: r.0 })
    }
}

/// Appends a byte string: its `u32` length, then the bytes.
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// `b` (8 bytes) as a little-endian u64.
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// A cursor over a message's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NodeError> {
        if n > self.0.len() {
            return Err(NodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, NodeError> {
        Ok(self.take(1)?[0])
    }

    /// A byte that must be 0 or 1 (one reading per message).
    fn flag(&mut self, field: &'static str) -> Result<bool, NodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(NodeError::Invalid(field)),
        }
    }

    fn u32(&mut self) -> Result<u32, NodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, NodeError> {
        Ok(le_u64(self.take(8)?))
    }

    fn u16(&mut self) -> Result<u16, NodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A byte string: a `u32` length, then that many bytes.
    fn bytes(&mut self) -> Result<&'a [u8], NodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A UTF-8 text, stored as a byte string.
    fn text(&mut self) -> Result<String, NodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| NodeError::Invalid("text"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg() -> impl Strategy<Value = NodeMsg> {
        let receipt = (any::<u64>(), any::<u64>(), any::<u8>(), any::<u64>())
            .prop_map(|(message_id, uid, outcome, log_id)| NodeReceipt { message_id, uid, outcome, log_id });
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec(any::<u64>(), 0..50)
            )
                .prop_map(|(message_id, log_id, ttl_ms, body, uids)| NodeMsg::Push {
                    message_id,
                    log_id,
                    ttl_ms,
                    body,
                    uids
                }),
            proptest::collection::vec(receipt, 0..50).prop_map(NodeMsg::Receipts),
            (any::<u64>(), any::<u64>()).prop_map(|(uid, epoch)| NodeMsg::Superseded { uid, epoch }),
            (any::<u64>(), any::<u64>()).prop_map(|(uid, epoch)| NodeMsg::Take { uid, epoch }),
            (any::<u64>(), any::<u64>()).prop_map(|(uid, epoch)| NodeMsg::NotHere { uid, epoch }),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50).prop_map(NodeMsg::Rehomed),
            handoff(),
            relay(),
        ]
    }

    fn msg_or_batch() -> impl Strategy<Value = NodeMsg> {
        prop_oneof![msg(), proptest::collection::vec(msg(), 0..5).prop_map(NodeMsg::Batch)]
    }

    /// The relay's messages (kinds from 0x40).
    fn relay() -> impl Strategy<Value = NodeMsg> {
        let point = any::<[u8; 32]>().prop_map(wire::UidGpsPoint);
        let request = (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..100),
        )
            .prop_map(|(request_id, log_id, uid, role, cmd, timeout_ms, body)| NodeRequest {
                request_id,
                log_id,
                uid,
                role,
                cmd,
                timeout_ms,
                body,
            });
        let answer = prop_oneof![
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..100))
                .prop_map(|(request_id, reply)| NodeAnswer::Reply { request_id, reply }),
            (any::<u64>(), any::<u8>(), ".{0,40}").prop_map(|(request_id, failure, message)| {
                NodeAnswer::Failed { request_id, failure, message }
            }),
        ];
        prop_oneof![
            proptest::collection::vec(point, 0..40).prop_map(NodeMsg::Gps),
            proptest::collection::vec(request, 0..10).prop_map(NodeMsg::Requests),
            proptest::collection::vec(answer, 0..10).prop_map(NodeMsg::Answers),
            proptest::collection::vec((any::<u64>(), any::<u8>()), 0..40).prop_map(NodeMsg::Unreachable),
            (any::<u64>(), any::<u64>(), any::<u64>(), ".{0,40}")
                .prop_map(|(tag, uid, log_id, message)| NodeMsg::EndSession { tag, uid, log_id, message }),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(tag, uid, found)| NodeMsg::SessionEnded {
                tag,
                uid,
                found
            }),
            (any::<(u64, u64, i32, i32)>(), any::<(u32, u32, u32, u8)>()).prop_map(
                |((tag, log_id, lat_e7, lon_e7), (radius_m, k, max_age_ms, filter))| NodeMsg::GeoAsk {
                    tag,
                    log_id,
                    sel: GeoSelection { lat_e7, lon_e7, radius_m, k, max_age_ms, filter },
                }
            ),
            (any::<u64>(), proptest::collection::vec(any::<[u8; 24]>().prop_map(wire::GeoHit), 0..40))
                .prop_map(|(tag, hits)| NodeMsg::GeoFound { tag, hits }),
        ]
    }

    fn handoff() -> impl Strategy<Value = NodeMsg> {
        let push =
            (
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<bool>(),
                "[a-z0-9.:-]{0,20}",
                proptest::collection::vec(any::<u8>(), 0..100),
            )
                .prop_map(|(seq, message_id, log_id, ttl_left_ms, sent, origin, body)| {
                    HandedPush { seq, message_id, log_id, ttl_left_ms, sent, origin, body }
                });
        (
            (any::<u64>(), any::<u64>(), any::<u8>(), any::<u32>()),
            proptest::option::of(any::<[u8; 32]>()),
            (any::<u32>(), any::<u32>()),
            proptest::collection::vec(push, 0..8),
        )
            .prop_map(
                |((uid, epoch, role, resumes), resume_secret, (hold_left_ms, last_seq), pushes)| {
                    NodeMsg::Handoff(Box::new(HandedSession {
                        uid,
                        epoch,
                        role,
                        resumes,
                        resume_secret,
                        hold_left_ms,
                        last_seq,
                        pushes,
                    }))
                },
            )
    }

    proptest! {
        #[test]
        fn every_message_reads_back(m in msg_or_batch()) {
            prop_assert_eq!(m.encoded_len(), m.to_bytes().len());
            prop_assert_eq!(NodeMsg::decode(&m.to_bytes()), Ok(m));
        }

        #[test]
        fn every_cut_short_message_is_truncated(m in msg_or_batch(), cut in any::<prop::sample::Index>()) {
            let bytes = m.to_bytes();
            let at = cut.index(bytes.len());
            let r = NodeMsg::decode(&bytes[..at]);
            prop_assert!(matches!(r, Err(NodeError::Truncated) | Err(NodeError::Empty)), "{:?}", r);
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(m) = NodeMsg::decode(&bytes) {
                // What decodes encodes back to the same bytes: one reading per message.
                prop_assert_eq!(m.to_bytes(), bytes);
            }
        }

        /// A valid message with one byte changed, the kind byte kept: decodes to something
        /// that encodes back to those very bytes, or fails cleanly (random bytes rarely get
        /// past a relay message's first length).
        #[test]
        fn a_changed_byte_decodes_or_fails_cleanly(m in relay(), at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let mut bytes = m.to_bytes();
            if bytes.len() > 1 {
                let i = 1 + at.index(bytes.len() - 1);
                bytes[i] = to;
                if let Ok(m) = NodeMsg::decode(&bytes) {
                    prop_assert_eq!(m.to_bytes(), bytes);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn envelopes_read_back(name in "[a-z0-9.:-]{1,40}", inc in any::<u64>(), counter in any::<u64>(),
                               sealed in proptest::collection::vec(any::<u8>(), TAG_LEN..100)) {
            let mut b = Vec::new();
            Envelope::write_header(&name, inc, counter, &mut b);
            let header_len = b.len();
            b.extend_from_slice(&sealed);
            let e = Envelope::parse(&b).expect("parses");
            prop_assert_eq!(e.sender, name.as_str());
            prop_assert_eq!((e.incarnation, e.counter), (inc, counter));
            prop_assert_eq!(e.header, &b[..header_len]);
            prop_assert_eq!(e.sealed, &sealed[..]);
            // Cut anywhere before a whole tag: never parses.
            for at in 0..header_len + TAG_LEN {
                prop_assert!(Envelope::parse(&b[..at]).is_err());
            }
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(e) = Envelope::parse(&bytes) {
                prop_assert_eq!(e.header.len() + e.sealed.len(), bytes.len());
            }
        }
    }

    #[test]
    fn hostile_lengths_and_leftovers() {
        // A push announcing 2^32-1 targets in a few bytes.
        let mut b = vec![PUSH];
        b.extend_from_slice(&[0; 20]);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(NodeMsg::decode(&b), Err(NodeError::Truncated));
        assert_eq!(NodeMsg::decode(&[9]), Err(NodeError::UnknownKind(9)));
        // A handoff announcing 2^32-1 pushes in a few bytes, and one with a flag that is not 0/1.
        let mut h = vec![HANDOFF];
        h.extend_from_slice(&[0; 8 + 8 + 1 + 4]);
        h.push(0);
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(NodeMsg::decode(&h), Err(NodeError::Truncated));
        let mut bad = vec![HANDOFF];
        bad.extend_from_slice(&[0; 8 + 8 + 1 + 4]);
        bad.push(2);
        assert_eq!(NodeMsg::decode(&bad), Err(NodeError::Invalid("resume_secret")));
        // A batch inside a batch.
        let inner = NodeMsg::Batch(vec![]).to_bytes();
        let mut nested = vec![BATCH, 1, 0, 0, 0];
        nested.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        nested.extend_from_slice(&inner);
        assert_eq!(NodeMsg::decode(&nested), Err(NodeError::Invalid("nested batch")));
        assert_eq!(NodeMsg::decode(&[]), Err(NodeError::Empty));
        let mut extra = NodeMsg::Superseded { uid: 1, epoch: 2 }.to_bytes();
        extra.push(0);
        assert_eq!(NodeMsg::decode(&extra), Err(NodeError::Trailing(1)));
        assert_eq!(
            NodeMsg::decode(&vec![SUPERSEDED; MAX_MESSAGE + 1]),
            Err(NodeError::TooLarge(MAX_MESSAGE + 1))
        );
        // Relay messages announcing 2^32-1 items in a few bytes allocate nothing for them.
        for kind in [GPS, REQUESTS, ANSWERS, UNREACHABLE] {
            let mut b = vec![kind];
            b.extend_from_slice(&u32::MAX.to_le_bytes());
            b.extend_from_slice(&[0; 40]);
            assert!(NodeMsg::decode(&b).is_err(), "kind {kind:#x}");
        }
        // A text that is not UTF-8, a flag that is not 0 or 1, an answer of no known kind.
        let mut b = NodeMsg::EndSession { tag: 1, uid: 2, log_id: 3, message: "ab".into() }.to_bytes();
        let n = b.len();
        b[n - 1] = 0xFF;
        assert_eq!(NodeMsg::decode(&b), Err(NodeError::Invalid("text")));
        let mut b = NodeMsg::SessionEnded { tag: 1, uid: 2, found: true }.to_bytes();
        let n = b.len();
        b[n - 1] = 2;
        assert_eq!(NodeMsg::decode(&b), Err(NodeError::Invalid("found")));
        let mut b = NodeMsg::Answers(vec![NodeAnswer::Reply { request_id: 1, reply: vec![] }]).to_bytes();
        b[5] = 9;
        assert_eq!(NodeMsg::decode(&b), Err(NodeError::Invalid("answer kind")));
    }

    #[test]
    fn wire_lengths_are_what_the_items_take() {
        let r = NodeRequest {
            request_id: 1,
            log_id: 2,
            uid: 3,
            role: 1,
            cmd: 0x20,
            timeout_ms: 9,
            body: vec![7; 10],
        };
        assert_eq!(NodeMsg::Requests(vec![r.clone()]).to_bytes().len(), 1 + 4 + r.wire_len());
        for a in [
            NodeAnswer::Reply { request_id: 1, reply: vec![1; 5] },
            NodeAnswer::Failed { request_id: 1, failure: failure::APP_SERVER_ERROR, message: "no".into() },
        ] {
            assert_eq!(NodeMsg::Answers(vec![a.clone()]).to_bytes().len(), 1 + 4 + a.wire_len());
        }
    }
}
