//! Sealing the messages between nodes: ChaCha20-Poly1305 under a key per sending process,
//! derived from the cluster secret, so what crosses Redis (or whatever carries the bytes) is
//! neither readable nor forgeable without the secret, and a captured message cannot be played
//! again.
//!
//! - Key: HKDF-SHA256(secret, salt "fleetgate node link v1", info = sender name ‖ incarnation).
//!   A restarted node has a new incarnation, hence a new key: counters never repeat under one.
//! - Nonce: the sender's counter (4 zero bytes, then the counter, little-endian). Every shard of
//!   the sender takes counters from one atomic, so none is used twice.
//! - Replay: the receiver keeps, per sender process, the highest counter seen and which of the
//!   [`WINDOW`] below it arrived; anything older or seen is refused. Shards publish
//!   concurrently, so messages may overtake each other by a few; the window absorbs that.

use channel::transport::{less_safe_key, nonce};
use ring::aead::{Aad, LessSafeKey};
use ring::hkdf::{Salt, HKDF_SHA256};
use schema::node::{Envelope, NodeError, NodeMsg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters below the highest seen that are still accepted (once each).
pub const WINDOW: u64 = 4096;
/// Sender processes whose replay state is kept; past it the least recently heard is dropped
/// (its later messages are then refused as too old until it restarts with a new incarnation).
/// Only senders whose messages authenticated get a place, so a stranger cannot push one out.
const MAX_SENDERS: usize = 1024;

/// Why a sealed message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// The bytes are not an envelope or the message inside is malformed.
    #[error("malformed: {0}")]
    Malformed(#[from] NodeError),
    /// The tag does not verify: another secret, or tampered bytes.
    #[error("does not authenticate (another cluster secret, or altered in transit)")]
    Forged,
    /// The counter was seen already, or is too far behind.
    #[error("replayed or too old (counter {0})")]
    Replayed(u64),
}

/// The key of messages from `sender`'s process `incarnation`.
fn key(secret: &[u8], sender: &str, incarnation: u64) -> LessSafeKey {
    let inc = incarnation.to_le_bytes();
    let mut k = [0u8; 32];
    Salt::new(HKDF_SHA256, b"fleetgate node link v1")
        .extract(secret)
        .expand(&[sender.as_bytes(), &inc[..]], HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut k))
        .expect("32 bytes is within HKDF-SHA256's output limit");
    less_safe_key(&k)
}

/// Seals this process's messages (shared by every shard).
pub struct Sealer {
    name: String,
    incarnation: u64,
    counter: AtomicU64,
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("name", &self.name).field("incarnation", &self.incarnation).finish()
    }
}

impl Sealer {
    /// The sealer of node `name`'s process `incarnation`.
    pub fn new(secret: &[u8], name: &str, incarnation: u64) -> Sealer {
        Sealer {
            name: name.to_owned(),
            incarnation,
            counter: AtomicU64::new(1),
            key: key(secret, name, incarnation),
        }
    }

    /// `msg`, sealed for any node of the cluster.
    pub fn seal(&self, msg: &NodeMsg) -> Vec<u8> {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        Envelope::write_header(&self.name, self.incarnation, counter, &mut out);
        let header_len = out.len();
        msg.encode(&mut out);
        let (header, body) = out.split_at_mut(header_len);
        // Sealing in place only fails for messages past ChaCha20's 256 GiB limit.
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&header[..]), body)
            .unwrap_or_else(|_| unreachable!("message under the AEAD limit"));
        out.extend_from_slice(tag.as_ref());
        out
    }
}

/// Replay state of one sender process.
struct Seen {
    key: LessSafeKey,
    /// Highest counter accepted.
    top: u64,
    /// Bit i: counter `top - i` was accepted (bit 0 is `top`).
    bits: Vec<u64>,
    /// When it was last heard from, as an ever-growing count (for eviction).
    used: u64,
}

impl Seen {
    fn check_and_mark(&mut self, c: u64) -> bool {
        if c > self.top {
            let shift = c - self.top;
            self.shift(shift);
            self.top = c;
            self.bits[0] |= 1;
            return true;
        }
        let back = self.top - c;
        if back >= WINDOW {
            return false;
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if self.bits[w] & (1 << b) != 0 {
            return false;
        }
        self.bits[w] |= 1 << b;
        true
    }

    /// Moves the window up by `n` counters.
    fn shift(&mut self, n: u64) {
        if n >= WINDOW {
            self.bits.iter_mut().for_each(|w| *w = 0);
            return;
        }
        let (words, bits) = ((n / 64) as usize, (n % 64) as u32);
        let len = self.bits.len();
        for i in (0..len).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |s| self.bits[s] << bits);
            let lo = match (bits, src.and_then(|s| s.checked_sub(1))) {
                (0, _) | (_, None) => 0,
                (_, Some(s)) => self.bits[s] >> (64 - bits),
            };
            self.bits[i] = hi | lo;
        }
    }
}

/// Opens messages from every other node (one per process: the thread that receives them).
pub struct Opener {
    secret: Vec<u8>,
    senders: HashMap<(String, u64), Seen>,
    clock: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("senders", &self.senders.len()).finish()
    }
}

impl Opener {
    /// An opener for the cluster sharing `secret`.
    pub fn new(secret: &[u8]) -> Opener {
        Opener { secret: secret.to_vec(), senders: HashMap::new(), clock: 0 }
    }

    /// The sender, its incarnation and the message in `bytes`, if they authenticate and were
    /// not seen before.
    pub fn open(&mut self, bytes: &[u8]) -> Result<(String, u64, NodeMsg), OpenError> {
        let e = Envelope::parse(bytes)?;
        let id = (e.sender.to_owned(), e.incarnation);
        let mut body = e.sealed.to_vec();
        // A sender not heard from yet gets its key derived, but no place until it authenticates.
        let fresh = (!self.senders.contains_key(&id)).then(|| key(&self.secret, e.sender, e.incarnation));
        let k = match (&fresh, self.senders.get(&id)) {
            (Some(k), _) => k,
            (None, Some(seen)) => &seen.key,
            (None, None) => unreachable!("derived above when not held"),
        };
        let plain = k
            .open_in_place(nonce(e.counter), Aad::from(e.header), &mut body)
            .map_err(|_| OpenError::Forged)?;
        let msg = NodeMsg::decode(plain)?;
        self.clock += 1;
        if let Some(k) = fresh {
            if self.senders.len() >= MAX_SENDERS {
                if let Some(old) = self.senders.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| k.clone()) {
                    self.senders.remove(&old);
                }
            }
            let seen = Seen { key: k, top: 0, bits: vec![0; (WINDOW / 64) as usize], used: 0 };
            self.senders.insert(id.clone(), seen);
        }
        let Some(seen) = self.senders.get_mut(&id) else { unreachable!("held or inserted above") };
        if !seen.check_and_mark(e.counter) {
            return Err(OpenError::Replayed(e.counter));
        }
        seen.used = self.clock;
        Ok((id.0, id.1, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(uid: u64) -> NodeMsg {
        NodeMsg::Superseded { uid, epoch: 7 }
    }

    #[test]
    fn sealed_messages_open_once_and_only_with_the_secret() {
        let a = Sealer::new(b"s3cret", "gate-a", 11);
        let mut b = Opener::new(b"s3cret");
        let sealed = a.seal(&msg(1));
        assert_eq!(b.open(&sealed), Ok(("gate-a".into(), 11, msg(1))));
        assert_eq!(b.open(&sealed), Err(OpenError::Replayed(1)), "a captured message played again");
        let mut other = Opener::new(b"another");
        assert_eq!(other.open(&a.seal(&msg(2))), Err(OpenError::Forged));
        // Any flipped bit, header or body, is refused.
        let s = a.seal(&msg(3));
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0x10;
            assert!(b.open(&t).is_err(), "byte {i} flipped");
        }
        assert_eq!(b.open(&s).map(|m| m.2), Ok(msg(3)), "the untouched one still opens");
        // The plaintext is not in the sealed bytes.
        let secretive =
            NodeMsg::Push { message_id: 1, log_id: 2, ttl_ms: 3, body: b"PAYLOAD".to_vec(), uids: vec![] };
        let s = a.seal(&secretive);
        assert!(!s.windows(7).any(|w| w == b"PAYLOAD"));
    }

    #[test]
    fn forged_messages_keep_no_state() {
        let mut b = Opener::new(b"k");
        for i in 0..(MAX_SENDERS as u64 + 10) {
            let stranger = Sealer::new(b"not the secret", &format!("n{i}"), i);
            assert_eq!(b.open(&stranger.seal(&msg(i))), Err(OpenError::Forged));
        }
        assert!(b.senders.is_empty(), "strangers took {} places", b.senders.len());
    }

    #[test]
    fn a_restarted_sender_starts_a_new_sequence() {
        let mut b = Opener::new(b"k");
        let first = Sealer::new(b"k", "n", 1);
        for i in 0..5 {
            assert!(b.open(&first.seal(&msg(i))).is_ok());
        }
        let again = Sealer::new(b"k", "n", 2);
        assert!(b.open(&again.seal(&msg(9))).is_ok(), "new incarnation, new key, counters from 1");
    }

    proptest! {
        /// Messages overtaking each other within the window all open once; replays and those
        /// older than the window never do.
        #[test]
        fn the_window_takes_each_counter_once(order in proptest::collection::vec(0u64..6000, 1..300)) {
            let mut s = Seen { key: key(b"k", "n", 1), top: 0, bits: vec![0; (WINDOW / 64) as usize], used: 0 };
            let mut accepted = std::collections::BTreeSet::new();
            let mut top = 0u64;
            for c in order.into_iter().map(|c| c + 1) {
                let expect = !accepted.contains(&c) && (c > top || top - c < WINDOW);
                prop_assert_eq!(s.check_and_mark(c), expect, "counter {} top {}", c, top);
                if expect {
                    accepted.insert(c);
                    top = top.max(c);
                }
            }
        }
    }
}
