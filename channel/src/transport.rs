//! The record layer after a handshake: ChaCha20-Poly1305 exactly as Noise's transport phase
//! uses it (docs/PROTOCOL.md §14.4), over the raw keys of the handshake's split.
//!
//! Why not snow's `TransportState`: it keeps the handshake's boxed cipher objects and the
//! remote static key for the connection's life, several hundred bytes per connection. A
//! [`Transport`] is the two 32-byte keys and the two 64-bit counters, 80 bytes, which keeps an
//! idle encrypted session within the gate's 1 KiB budget. The ChaCha20 key schedule is just the
//! key, so building ring's key object per record costs nothing worth keeping it for.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use thiserror::Error;

use crate::record::{write_header, RecordType, HEADER_LEN};

/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;

/// The most plaintext one Data record carries; larger writes are split.
pub const MAX_PLAINTEXT: usize = 16_384;

/// A transport key (one direction).
pub type TransportKey = [u8; 32];

/// A record could not be sealed or opened. Either way the connection must close.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    /// The record did not authenticate. A tampered record, one replayed, reordered or dropped
    /// before it (each moves the expected nonce), a truncated one, or one sealed under another
    /// key all look the same here: the tag does not match the expected nonce and key.
    #[error("record failed authentication (tampered, replayed, reordered, truncated or under another key)")]
    Authentication,
    /// 2^64 − 1 records went one way: Noise reserves the last nonce, and the keys must not be
    /// used again. No connection gets near it; it is checked so nonces can never repeat.
    #[error("nonce space exhausted: this direction sealed or opened 2^64 - 1 records")]
    NonceExhausted,
}

/// One connection's transport keys and counters, one per direction.
#[derive(Clone, PartialEq, Eq)]
pub struct Transport {
    send_key: TransportKey,
    recv_key: TransportKey,
    send_n: u64,
    recv_n: u64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("sent", &self.send_n).field("received", &self.recv_n).finish()
    }
}

impl Transport {
    /// A transport from a handshake's split: `send_key` seals what this side sends, `recv_key`
    /// opens what it receives; both counters at 0. The handshakes in this crate build it; it is
    /// public for tests and benchmarks.
    pub fn from_keys(send_key: TransportKey, recv_key: TransportKey) -> Transport {
        Transport { send_key, recv_key, send_n: 0, recv_n: 0 }
    }

    /// Records sealed so far (the next send nonce).
    pub fn sent(&self) -> u64 {
        self.send_n
    }

    /// Records opened so far (the next receive nonce).
    pub fn received(&self) -> u64 {
        self.recv_n
    }

    /// Wire bytes [`seal_into`](Self::seal_into) appends for `plaintext_len` bytes.
    pub fn sealed_len(plaintext_len: usize) -> usize {
        let records = plaintext_len.div_ceil(MAX_PLAINTEXT).max(1);
        plaintext_len + records * (HEADER_LEN + TAG_LEN)
    }

    /// Seals `plaintext` (a chunk of the frame byte stream; frames may span records) and appends
    /// complete Data records to `out`: as few as fit, each at most [`MAX_PLAINTEXT`] bytes of
    /// plaintext. Empty plaintext gives one record with an empty body before its tag (the
    /// app's commit record, §14.3). Returns the number of records appended.
    pub fn seal_into(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<usize, TransportError> {
        let records = plaintext.len().div_ceil(MAX_PLAINTEXT).max(1);
        // Nonces send_n .. send_n + records must all be below 2^64 − 1.
        if self.send_n.checked_add(records as u64).is_none() {
            return Err(TransportError::NonceExhausted);
        }
        out.reserve(Self::sealed_len(plaintext.len()));
        let key = less_safe_key(&self.send_key);
        let mut chunks = plaintext.chunks(MAX_PLAINTEXT);
        let first: &[u8] = chunks.next().unwrap_or(&[]);
        for chunk in std::iter::once(first).chain(chunks) {
            write_header(out, RecordType::Data, chunk.len() + TAG_LEN);
            let start = out.len();
            out.extend_from_slice(chunk);
            let tag = key
                .seal_in_place_separate_tag(nonce(self.send_n), Aad::empty(), &mut out[start..])
                // ring refuses only inputs beyond ChaCha20's 256 GiB block counter.
                .expect("a record is far below ChaCha20-Poly1305's length limit");
            out.extend_from_slice(tag.as_ref());
            self.send_n += 1;
        }
        Ok(records)
    }

    /// Seals `buf[from..]` (plaintext) in place into Data records, as [`seal_into`](Self::seal_into)
    /// would append them: `buf[..from]` is kept, and `buf[from..]` becomes the records. For a
    /// caller whose frames are already in its output buffer (no second buffer, no allocation
    /// once the buffer has room for the headers and tags). Returns the number of records.
    /// On error `buf` is unchanged.
    pub fn seal_in_place(&mut self, buf: &mut Vec<u8>, from: usize) -> Result<usize, TransportError> {
        let from = from.min(buf.len());
        let plain_len = buf.len() - from;
        let records = plain_len.div_ceil(MAX_PLAINTEXT).max(1);
        if self.send_n.checked_add(records as u64).is_none() {
            return Err(TransportError::NonceExhausted);
        }
        buf.resize(from + Self::sealed_len(plain_len), 0);
        const RECORD: usize = HEADER_LEN + MAX_PLAINTEXT + TAG_LEN;
        // Move each chunk to its place, last first (every chunk moves right, by 19 bytes per
        // record before it, so going backwards never overwrites a chunk not yet moved).
        for i in (0..records).rev() {
            let src = from + i * MAX_PLAINTEXT;
            let len = (plain_len - i * MAX_PLAINTEXT).min(MAX_PLAINTEXT);
            let dst = from + i * RECORD + HEADER_LEN;
            buf.copy_within(src..src + len, dst);
        }
        let key = less_safe_key(&self.send_key);
        for i in 0..records {
            let at = from + i * RECORD;
            let len = (plain_len - i * MAX_PLAINTEXT).min(MAX_PLAINTEXT);
            buf[at] = RecordType::Data as u8;
            buf[at + 1..at + HEADER_LEN].copy_from_slice(&((len + TAG_LEN) as u16).to_be_bytes());
            let body = at + HEADER_LEN;
            let tag = key
                .seal_in_place_separate_tag(nonce(self.send_n), Aad::empty(), &mut buf[body..body + len])
                .expect("a record is far below ChaCha20-Poly1305's length limit");
            buf[body + len..body + len + TAG_LEN].copy_from_slice(tag.as_ref());
            self.send_n += 1;
        }
        Ok(records)
    }

    /// Opens a Data record's body in place and returns its plaintext (the body's first
    /// `len − 16` bytes). On error nothing is counted and `body` is garbage.
    pub fn open_in_place<'b>(&mut self, body: &'b mut [u8]) -> Result<&'b mut [u8], TransportError> {
        if self.recv_n == u64::MAX {
            return Err(TransportError::NonceExhausted);
        }
        let key = less_safe_key(&self.recv_key);
        let plain = key
            .open_in_place(nonce(self.recv_n), Aad::empty(), body)
            .map_err(|_| TransportError::Authentication)?;
        self.recv_n += 1;
        Ok(plain)
    }

    /// Opens a Data record's body and appends its plaintext to `out`; returns the plaintext
    /// length. On error `out` is left as it was.
    pub fn open_into(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<usize, TransportError> {
        let start = out.len();
        out.extend_from_slice(body);
        match self.open_in_place(&mut out[start..]) {
            Ok(plain) => {
                let n = plain.len();
                out.truncate(start + n);
                Ok(n)
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

/// A ChaCha20-Poly1305 key (also for the gate's messages between cluster nodes, which seal
/// with the same AEAD and nonce layout).
pub fn less_safe_key(key: &TransportKey) -> LessSafeKey {
    LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, key).expect("32 bytes is ChaCha20-Poly1305's key length"),
    )
}

/// Noise's ChaChaPoly nonce: 32 zero bits, then the counter as 64-bit little-endian.
pub fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_le_bytes());
    Nonce::assume_unique_for_key(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordReader, MAX_BODY};
    use proptest::prelude::*;

    fn pair() -> (Transport, Transport) {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        (Transport::from_keys(a, b), Transport::from_keys(b, a))
    }

    fn bodies(wire: &[u8]) -> Vec<Vec<u8>> {
        let mut reader = RecordReader::new();
        let mut input = wire;
        let mut out = Vec::new();
        while let Some(r) = reader.next(&mut input).unwrap() {
            assert_eq!(r.kind, RecordType::Data);
            out.push(r.body.to_vec());
        }
        assert!(input.is_empty() && !reader.in_record());
        out
    }

    #[test]
    fn transport_is_two_keys_and_two_counters() {
        assert_eq!(std::mem::size_of::<Transport>(), 80);
    }

    #[test]
    fn empty_plaintext_is_one_tag_only_record() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        assert_eq!(a.seal_into(&[], &mut wire).unwrap(), 1);
        assert_eq!(wire.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(&wire[..3], &[0x05, 0x00, 0x10]);
        let mut plain = Vec::new();
        assert_eq!(b.open_into(&wire[3..], &mut plain), Ok(0));
        assert_eq!((a.sent(), b.received()), (1, 1));
    }

    #[test]
    fn large_writes_split_at_16384() {
        let (mut a, mut b) = pair();
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        assert_eq!(a.seal_into(&data, &mut wire).unwrap(), 3);
        assert_eq!(wire.len(), Transport::sealed_len(data.len()));
        let bs = bodies(&wire);
        assert_eq!(
            bs.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_BODY, MAX_BODY, 40_000 - 2 * 16_384 + 16]
        );
        let mut plain = Vec::new();
        for body in &bs {
            b.open_into(body, &mut plain).unwrap();
        }
        assert_eq!(plain, data);
        let mut wire = Vec::new();
        assert_eq!(a.seal_into(&data[..MAX_PLAINTEXT], &mut wire).unwrap(), 1);
    }

    #[test]
    fn replayed_reordered_and_cross_direction_records_fail() {
        let (mut a, mut b) = pair();
        let mut w1 = Vec::new();
        let mut w2 = Vec::new();
        a.seal_into(b"one", &mut w1).unwrap();
        a.seal_into(b"two", &mut w2).unwrap();
        let mut plain = Vec::new();
        // Reordered: the second record first.
        assert_eq!(b.clone().open_into(&w2[3..], &mut plain), Err(TransportError::Authentication));
        assert!(plain.is_empty(), "a failed open appends nothing");
        b.open_into(&w1[3..], &mut plain).unwrap();
        // Replayed: the first record again.
        assert_eq!(b.clone().open_into(&w1[3..], &mut plain), Err(TransportError::Authentication));
        b.open_into(&w2[3..], &mut plain).unwrap();
        assert_eq!(plain, b"onetwo");
        // Reflected back to its sender: the other direction's key.
        assert_eq!(a.open_into(&w1[3..], &mut plain), Err(TransportError::Authentication));
        // Too short to hold a tag.
        assert_eq!(b.open_into(&[0; 15], &mut plain), Err(TransportError::Authentication));
    }

    #[test]
    fn nonce_exhaustion_is_an_error_not_a_repeat() {
        let (mut a, mut b) = pair();
        a.send_n = u64::MAX - 2;
        let mut wire = Vec::new();
        assert_eq!(a.seal_into(b"x", &mut wire), Ok(1)); // nonce 2^64 - 3
        assert_eq!(a.seal_into(b"x", &mut wire), Ok(1)); // nonce 2^64 - 2, the last usable
        let len = wire.len();
        assert_eq!(a.seal_into(b"x", &mut wire), Err(TransportError::NonceExhausted));
        assert_eq!(wire.len(), len, "nothing appended");
        b.recv_n = u64::MAX;
        assert_eq!(b.open_into(&wire[3..20], &mut Vec::new()), Err(TransportError::NonceExhausted));
        // A multi-record write that would cross the end is refused whole.
        let (mut c, _) = pair();
        c.send_n = u64::MAX - 1;
        assert_eq!(c.seal_into(&vec![0; MAX_PLAINTEXT + 1], &mut wire), Err(TransportError::NonceExhausted));
    }

    #[test]
    fn sealing_in_place_empty_and_at_the_record_limit() {
        for len in [0, 1, MAX_PLAINTEXT - 1, MAX_PLAINTEXT, MAX_PLAINTEXT + 1, 2 * MAX_PLAINTEXT] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let (mut a, _) = pair();
            let mut want = b"kept".to_vec();
            let want_records = a.clone().seal_into(&data, &mut want).unwrap();
            let mut buf = b"kept".to_vec();
            buf.extend_from_slice(&data);
            assert_eq!(a.seal_in_place(&mut buf, 4).unwrap(), want_records);
            assert_eq!(buf, want, "{len} bytes");
        }
        let (mut a, _) = pair();
        a.send_n = u64::MAX - 1;
        let mut buf = vec![1; MAX_PLAINTEXT + 1];
        assert_eq!(a.seal_in_place(&mut buf, 0), Err(TransportError::NonceExhausted));
        assert_eq!(buf, vec![1; MAX_PLAINTEXT + 1], "unchanged");
    }

    proptest! {
        #[test]
        fn seal_open_round_trip_and_nonces_never_repeat(writes in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 0..40_000), 1..6)) {
            let (mut a, mut b) = pair();
            let mut wire = Vec::new();
            let mut counted = 0;
            for w in &writes {
                counted += a.seal_into(w, &mut wire).unwrap();
            }
            let bs = bodies(&wire);
            prop_assert_eq!(bs.len(), counted);
            prop_assert_eq!(a.sent(), counted as u64);
            // Every record has its own nonce: the same plaintext never gives the same bytes,
            // and each opens only at its own position.
            let mut seen = std::collections::HashSet::new();
            for body in &bs {
                prop_assert!(seen.insert(body.clone()));
            }
            let mut plain = Vec::new();
            for body in &bs {
                b.open_into(body, &mut plain).unwrap();
            }
            prop_assert_eq!(plain, writes.concat());
        }

        #[test]
        fn sealing_in_place_equals_sealing_into(
            head in prop::collection::vec(any::<u8>(), 0..40),
            writes in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40_000), 1..4),
        ) {
            let (mut a, _) = pair();
            let mut b = a.clone();
            let (mut into, mut in_place) = (head.clone(), head.clone());
            for w in &writes {
                let n = a.seal_into(w, &mut into).unwrap();
                let from = in_place.len();
                in_place.extend_from_slice(w);
                prop_assert_eq!(b.seal_in_place(&mut in_place, from).unwrap(), n);
            }
            prop_assert_eq!(into, in_place);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn any_flipped_bit_fails(data in prop::collection::vec(any::<u8>(), 0..200), at in any::<usize>(), bit in 0u8..8) {
            let (mut a, mut b) = pair();
            let mut wire = Vec::new();
            a.seal_into(&data, &mut wire).unwrap();
            let mut body = wire[3..].to_vec();
            let i = at % body.len();
            body[i] ^= 1 << bit;
            prop_assert_eq!(b.open_into(&body, &mut Vec::new()), Err(TransportError::Authentication));
            // Truncated anywhere fails too.
            let cut = at % wire[3..].len();
            prop_assert_eq!(b.open_into(&wire[3..3 + cut], &mut Vec::new()), Err(TransportError::Authentication));
        }
    }
}
