//! Property: whatever happens to sessions (logins, displacement, drops, logouts, acks, time),
//! every (message id, uid) of every push gets exactly one receipt, and `Delivered` only when the
//! app acked it before the push's deadline plus the grace; a pair still in flight at that moment
//! ends `TtlExpired` then; an ack naming another message id ends nothing and is answered with
//! `AckMismatch`.

use logic::gps::Forward;
use logic::push::{outcome, ACK_GRACE_MS};
use logic::{CloseReason, ConnRef, Input, Output, PushContent, Shard, ShardConfig};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    Login(u64),
    Close(u64, u8),
    Logout(u64),
    Push(Vec<u64>, u32),
    /// The k-th unacked delivery of a uid, with its own message id or (true) another one.
    Ack(u64, usize, bool),
    Advance(u64),
    Resume(u64, bool),
}

fn op() -> impl Strategy<Value = Op> {
    let uid = 0u64..6;
    prop_oneof![
        uid.clone().prop_map(Op::Login),
        (uid.clone(), 0u8..3).prop_map(|(u, r)| Op::Close(u, r)),
        uid.clone().prop_map(Op::Logout),
        (prop::collection::vec(0u64..8, 0..6), 1u32..2_000).prop_map(|(u, t)| Op::Push(u, t)),
        (uid, 0usize..4, prop::bool::weighted(0.2)).prop_map(|(u, k, wrong)| Op::Ack(u, k, wrong)),
        (0u64..1_500).prop_map(Op::Advance),
        (0u64..6, any::<bool>()).prop_map(|(u, stale)| Op::Resume(u, stale)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn exactly_one_receipt_per_target(ops in prop::collection::vec(op(), 1..80)) {
        let mut s = Shard::new(ShardConfig {
            id: 0,
            gps_flush_ms: 100,
            gps_forward: Forward::Latest,
            gps_max_buffered: 100,
            push_queue_len: 3,
            max_pending_requests: 10,
            request_timeout_ms: 100,
            hold_ms: 700,
            max_held: 3,
            push_queue_bytes: 1 << 20,
            clustered: false,
            geo_index: true,
        });
        // The resume token's content per uid: (epoch, resumes) from the last answer.
        let mut tokens: HashMap<u64, (u64, u32)> = HashMap::new();
        let mut uid_of_slot: HashMap<u32, u64> = HashMap::new();
        let mut now = 0u64;
        let mut next_slot = 0u32;
        let mut conn_of: HashMap<u64, ConnRef> = HashMap::new();
        // Deliveries not yet acked, per uid: (conn, seq, message id).
        let mut delivered: HashMap<u64, Vec<(ConnRef, u32, u64)>> = HashMap::new();
        let mut acked: Vec<(u64, u64)> = Vec::new();
        let mut expected: HashMap<(u64, u64), u32> = HashMap::new();
        let mut receipts: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        let mut next_msg = 0u64;
        // Each push's deadline (acceptance + TTL) by message id.
        let mut deadline: HashMap<u64, u64> = HashMap::new();
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Login(uid) => {
                    next_slot += 1;
                    let c = ConnRef { shard: 0, slot: next_slot, gen: 1 };
                    uid_of_slot.insert(next_slot, uid);
                    conn_of.insert(uid, c);
                    s.handle(Input::Login { uid, role: 1, conn: c, log_id: 0, seq: 1, wall_ms: now, resume_secret: None }, now, &mut out);
                }
                Op::Close(uid, r) => {
                    if let Some(c) = conn_of.remove(&uid) {
                        let reason = [CloseReason::Dropped, CloseReason::SlowConsumer, CloseReason::Shutdown][r as usize];
                        s.handle(Input::Closed { uid, conn: c, reason }, now, &mut out);
                    }
                }
                Op::Logout(uid) => {
                    if let Some(c) = conn_of.remove(&uid) {
                        s.handle(Input::Logout { uid, conn: c, log_id: 0, seq: 2 }, now, &mut out);
                    }
                }
                Op::Push(mut uids, ttl_ms) => {
                    uids.sort_unstable();
                    uids.dedup();
                    next_msg += 1;
                    for &u in &uids {
                        *expected.entry((next_msg, u)).or_default() += 1;
                    }
                    let deadline_ms = now + ttl_ms as u64;
                    deadline.insert(next_msg, deadline_ms);
                    let push = Arc::new(PushContent { message_id: next_msg, body: Arc::from(&b"p"[..]), log_id: 0, deadline_ms, origin: logic::LOCAL, accepted_us: 0 });
                    s.handle(Input::Push { push, uids }, now, &mut out);
                }
                Op::Ack(uid, k, wrong) => {
                    if let Some(list) = delivered.get_mut(&uid) {
                        if k < list.len() {
                            let (c, seq, msg) = list[k];
                            let ended = receipts.contains_key(&(msg, uid));
                            if wrong {
                                // Another push's id: refused while the pair is in flight, and it
                                // ends nothing either way.
                                s.handle(Input::PushAck { uid, conn: c, seq, message_id: msg + 1_000, log_id: 7, read_us: 0 }, now, &mut out);
                                prop_assert!(!out.iter().any(|o| matches!(o, Output::Receipt(_))), "{:?}", out);
                                let refused = out.iter().filter(|o| matches!(o, Output::AckMismatch { .. })).count();
                                prop_assert!(refused <= 1 && (refused == 0 || !ended), "{:?}", out);
                            } else {
                                list.remove(k);
                                acked.push((msg, uid));
                                s.handle(Input::PushAck { uid, conn: c, seq, message_id: msg, log_id: 7, read_us: 0 }, now, &mut out);
                                // Taken before deadline + grace: Delivered; from then on the
                                // pair has ended TtlExpired.
                                let late = now >= deadline[&msg] + ACK_GRACE_MS;
                                for o in &out {
                                    if let Output::Receipt(r) = o {
                                        prop_assert_eq!((r.message_id, r.uid), (msg, uid));
                                        let want = if late { outcome::TTL_EXPIRED } else { outcome::DELIVERED };
                                        prop_assert_eq!(r.outcome, want, "ack at {} of a push due {}", now, deadline[&msg]);
                                    }
                                }
                            }
                        }
                    }
                }
                Op::Resume(uid, stale) => {
                    if let Some(&(epoch, resumes)) = tokens.get(&uid) {
                        next_slot += 1;
                        let c = ConnRef { shard: 0, slot: next_slot, gen: 1 };
                        uid_of_slot.insert(next_slot, uid);
                        let resumes = if stale { resumes.wrapping_sub(1) } else { resumes };
                        s.handle(Input::Resume { uid, epoch, resumes: Some(resumes), conn: c, log_id: 0, seq: 1, resume_secret: None }, now, &mut out);
                        if out.iter().any(|o| matches!(o, Output::ResumeOk { .. })) {
                            conn_of.insert(uid, c);
                            // Deliveries on the old connection can no longer be acked there.
                            delivered.remove(&uid);
                        }
                    }
                }
                Op::Advance(ms) => {
                    now += ms;
                    s.tick(now, &mut out);
                    for o in &out {
                        if let Output::Receipt(r) = o {
                            if r.outcome == outcome::TTL_EXPIRED {
                                prop_assert!(now >= deadline[&r.message_id] + ACK_GRACE_MS, "expired early: {:?}", r);
                            }
                        }
                    }
                    // Nothing stays in flight past its deadline + grace.
                    prop_assert!(s.next_deadline_ms().is_none_or(|d| d > now));
                }
            }
            for o in out.drain(..) {
                match o {
                    Output::Deliver { conn, seq, push, .. } => {
                        let uid = uid_of_slot[&conn.slot];
                        delivered.entry(uid).or_default().push((conn, seq, push.message_id))
                    }
                    Output::Receipt(r) => receipts.entry((r.message_id, r.uid)).or_default().push(r.outcome),
                    Output::LoginOk { uid, epoch, .. } => {
                        tokens.insert(uid, (epoch, 0));
                    }
                    Output::ResumeOk { uid, epoch, resumes, .. } => {
                        tokens.insert(uid, (epoch, resumes));
                    }
                    _ => {}
                }
            }
        }
        s.handle(Input::Shutdown, now, &mut out);
        s.tick(now + 1_000_000, &mut out);
        for o in out.drain(..) {
            if let Output::Receipt(r) = o {
                receipts.entry((r.message_id, r.uid)).or_default().push(r.outcome);
            }
        }
        for (key, n) in &expected {
            let got = receipts.get(key).map_or(0, Vec::len);
            prop_assert_eq!(got, *n as usize, "receipts for {:?}: {:?}", key, receipts.get(key));
        }
        for (key, outcomes) in &receipts {
            prop_assert!(expected.contains_key(key), "receipt for a push never made: {:?}", key);
            if outcomes == &[logic::push::outcome::DELIVERED] {
                prop_assert!(acked.contains(key), "delivered without an ack: {:?}", key);
            }
        }
        prop_assert_eq!(s.pushes_in_flight(), 0);
    }
}
