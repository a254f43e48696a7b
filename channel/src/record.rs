//! Records: the framing of every app-port byte in secure mode (docs/PROTOCOL.md §14.2).
//!
//! ```text
//! record = type u8 ‖ len u16 big-endian ‖ body[len]
//! ```
//!
//! [`RecordReader`] delimits records in a byte stream that arrives in arbitrary pieces.
//! Whole records are handed out as slices of the caller's bytes, with no copy; only a record
//! cut by the end of a read is copied, into a buffer that exists while that one record is
//! incomplete and is freed on the first call after it was handed out. The buffer grows with the
//! bytes that arrived (at most twice them), not with the length a header claims. Between records
//! the reader holds nothing but its fixed state (`size_of::<RecordReader>()` is 48 bytes).

use thiserror::Error;

/// Bytes before a record's body: type and length.
pub const HEADER_LEN: usize = 3;

/// The largest record body either side accepts: 16,384 bytes of plaintext plus the 16-byte tag
/// of a Data record. Handshake records are bounded by it too.
pub const MAX_BODY: usize = 16_400;

/// What a record carries (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// app → gate: start a fresh session (Noise IK message 1).
    Hello = 0x01,
    /// app → gate: resume a held session (Noise NNpsk0 message 1).
    ResumeHello = 0x02,
    /// gate → app: the handshake's answer (message 2).
    Accept = 0x03,
    /// gate → app: the handshake was refused; plaintext, unauthenticated, a hint only.
    Reject = 0x04,
    /// both ways: a sealed chunk of the frame byte stream.
    Data = 0x05,
}

impl RecordType {
    /// The type with this wire value, if there is one.
    pub fn from_u8(b: u8) -> Option<RecordType> {
        Some(match b {
            0x01 => RecordType::Hello,
            0x02 => RecordType::ResumeHello,
            0x03 => RecordType::Accept,
            0x04 => RecordType::Reject,
            0x05 => RecordType::Data,
            _ => return None,
        })
    }
}

/// One delimited record. `body` borrows either the caller's input or the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordType,
    pub body: &'a [u8],
}

/// The stream is not a valid record stream. Framing is lost: the connection must close.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    #[error("unknown record type {0:#04x} (not a fleetgate secure-channel stream, or a newer one)")]
    UnknownType(u8),
    #[error("{kind:?} record of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { kind: RecordType, len: u32, max: u32 },
    #[error("stream ended inside a record ({have} of {need} bytes)")]
    Truncated { have: u32, need: u32 },
}

/// Delimits records in a byte stream. See the module documentation for the memory rule.
///
/// ```
/// use channel::record::{RecordReader, RecordType};
/// let mut reader = RecordReader::new();
/// let stream = [0x05, 0x00, 0x02, 0xaa, 0xbb, 0x05, 0x00];
/// let mut input = &stream[..];
/// let rec = reader.next(&mut input).unwrap().unwrap();
/// assert_eq!((rec.kind, rec.body), (RecordType::Data, &[0xaa, 0xbb][..]));
/// assert!(reader.next(&mut input).unwrap().is_none()); // the second record is incomplete
/// let mut input = &[0x01, 0xcc][..];
/// assert_eq!(reader.next(&mut input).unwrap().unwrap().body, &[0xcc]);
/// assert!(reader.next(&mut input).unwrap().is_none());
/// ```
#[derive(Debug)]
pub struct RecordReader {
    /// Body bytes of the incomplete record; empty (no allocation) between records.
    body: Vec<u8>,
    max_body: u16,
    hdr: [u8; HEADER_LEN],
    hdr_len: u8,
    /// The last record was handed out of `body`: free it on the next call.
    release: bool,
    failed: Option<RecordError>,
}

impl Default for RecordReader {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordReader {
    /// A reader that refuses bodies over [`MAX_BODY`].
    pub fn new() -> Self {
        Self::with_max_body(MAX_BODY as u16)
    }

    /// A reader that refuses bodies over `max_body` bytes (checked from the header, before any
    /// body byte is buffered).
    pub fn with_max_body(max_body: u16) -> Self {
        RecordReader {
            body: Vec::new(),
            max_body,
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            release: false,
            failed: None,
        }
    }

    /// Takes bytes from the front of `*input` until one record is complete and returns it;
    /// `Ok(None)` when `*input` is used up with no complete record (what was taken is kept).
    ///
    /// Call it in a loop until it returns `Ok(None)`, then read more:
    /// `while let Some(rec) = reader.next(&mut input)? { … }`. Stopping earlier is fine, but a
    /// record copied out of a split read is freed only on the next call.
    ///
    /// An error is final: the stream's framing is lost, and every later call returns it again.
    pub fn next<'s, 'i: 's>(&'s mut self, input: &mut &'i [u8]) -> Result<Option<Record<'s>>, RecordError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.release {
            self.body = Vec::new();
            self.hdr_len = 0;
            self.release = false;
        }
        if self.hdr_len == 0 {
            // The common case: a whole record in the caller's bytes, handed out without a copy.
            if let Some(hdr) = input.first_chunk::<HEADER_LEN>() {
                let (kind, len) = self.check_header(hdr)?;
                if input.len() >= HEADER_LEN + len {
                    let (rec, rest) = input.split_at(HEADER_LEN + len);
                    *input = rest;
                    return Ok(Some(Record { kind, body: &rec[HEADER_LEN..] }));
                }
            } else if let Some(&b) = input.first() {
                // Refuse garbage on its first byte, as the frame decoder refuses a bad magic.
                self.check_type(b)?;
            }
        }
        // Slow path: the record is split across reads; gather it.
        while (self.hdr_len as usize) < HEADER_LEN {
            let Some((&b, rest)) = input.split_first() else { return Ok(None) };
            *input = rest;
            self.hdr[self.hdr_len as usize] = b;
            self.hdr_len += 1;
            if self.hdr_len == 1 {
                self.check_type(b)?;
            }
        }
        let hdr = self.hdr;
        let (kind, len) = self.check_header(&hdr)?;
        let take = (len - self.body.len()).min(input.len());
        let (now, rest) = input.split_at(take);
        // Grow with what arrived (doubling, capped at the record's length), not to the length
        // the header claims: a peer that sends headers and trickles bodies pins only what it sent.
        let want = self.body.len() + take;
        if want > self.body.capacity() {
            let cap = want.max((2 * self.body.capacity()).min(len));
            self.body.reserve_exact(cap - self.body.len());
        }
        self.body.extend_from_slice(now);
        *input = rest;
        if self.body.len() == len {
            self.release = true;
            return Ok(Some(Record { kind, body: &self.body }));
        }
        Ok(None)
    }

    /// True while a record has started and not completed (for a read timeout, or to tell a
    /// clean end of stream from a truncated one).
    pub fn in_record(&self) -> bool {
        self.hdr_len > 0 && !self.release
    }

    /// Moves the bytes of the record in progress (its header and the body so far) to `into`
    /// and forgets them, for a caller that hands the rest of the stream to another reader: fed
    /// to that reader first, they give the same records. Nothing after an error.
    pub fn take_partial(&mut self, into: &mut Vec<u8>) {
        if self.failed.is_none() && self.in_record() {
            into.extend_from_slice(&self.hdr[..self.hdr_len as usize]);
            into.extend_from_slice(&self.body);
        }
        self.body = Vec::new();
        self.hdr_len = 0;
        self.release = false;
    }

    /// Call at end of stream: an error if it ended inside a record.
    pub fn finish(&self) -> Result<(), RecordError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if !self.in_record() {
            return Ok(());
        }
        let need = if (self.hdr_len as usize) < HEADER_LEN {
            HEADER_LEN
        } else {
            HEADER_LEN + u16::from_be_bytes([self.hdr[1], self.hdr[2]]) as usize
        };
        let have = self.hdr_len as usize + self.body.len();
        Err(RecordError::Truncated { have: have as u32, need: need as u32 })
    }

    fn check_type(&mut self, b: u8) -> Result<RecordType, RecordError> {
        RecordType::from_u8(b).ok_or_else(|| self.fail(RecordError::UnknownType(b)))
    }

    fn check_header(&mut self, hdr: &[u8; HEADER_LEN]) -> Result<(RecordType, usize), RecordError> {
        let kind = self.check_type(hdr[0])?;
        let len = u16::from_be_bytes([hdr[1], hdr[2]]);
        if len > self.max_body {
            let max = self.max_body as u32;
            return Err(self.fail(RecordError::TooLong { kind, len: len as u32, max }));
        }
        Ok((kind, len as usize))
    }

    fn fail(&mut self, e: RecordError) -> RecordError {
        self.failed = Some(e);
        self.body = Vec::new();
        e
    }
}

/// Appends one record. The body must fit the 16-bit length; every caller in this crate bounds
/// it by [`MAX_BODY`] first.
#[cfg(test)]
pub(crate) fn write_record(out: &mut Vec<u8>, kind: RecordType, body: &[u8]) {
    out.reserve(HEADER_LEN + body.len());
    write_header(out, kind, body.len());
    out.extend_from_slice(body);
}

/// Appends a record header for a body of `len` bytes that the caller appends next.
pub(crate) fn write_header(out: &mut Vec<u8>, kind: RecordType, len: usize) {
    debug_assert!(len <= MAX_BODY);
    out.push(kind as u8);
    out.extend_from_slice(&(len as u16).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Every record of `stream`, fed in pieces cut at `cuts`, as (type, body) pairs.
    fn read_in_pieces(stream: &[u8], cuts: &[usize]) -> Result<Vec<(RecordType, Vec<u8>)>, RecordError> {
        let mut reader = RecordReader::new();
        let mut out = Vec::new();
        let mut start = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        ends.push(stream.len());
        ends.sort_unstable();
        for end in ends {
            let mut input = &stream[start..end];
            start = end;
            while let Some(r) = reader.next(&mut input)? {
                out.push((r.kind, r.body.to_vec()));
            }
            assert!(input.is_empty());
        }
        reader.finish()?;
        Ok(out)
    }

    fn arb_record() -> impl Strategy<Value = (u8, Vec<u8>)> {
        (1u8..=5, prop::collection::vec(any::<u8>(), 0..300))
    }

    proptest! {
        #[test]
        fn any_split_equals_one_shot(
            recs in prop::collection::vec(arb_record(), 0..12),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let stream: Vec<u8> = recs.iter().flat_map(|(k, b)| rec(*k, b)).collect();
            let want: Vec<_> = recs.iter().map(|(k, b)| (RecordType::from_u8(*k).unwrap(), b.clone())).collect();
            prop_assert_eq!(&read_in_pieces(&stream, &[]).unwrap(), &want);
            prop_assert_eq!(&read_in_pieces(&stream, &cuts).unwrap(), &want);
        }

        #[test]
        fn byte_by_byte_equals_one_shot(recs in prop::collection::vec(arb_record(), 0..6)) {
            let stream: Vec<u8> = recs.iter().flat_map(|(k, b)| rec(*k, b)).collect();
            let cuts: Vec<usize> = (0..stream.len()).collect();
            prop_assert_eq!(read_in_pieces(&stream, &cuts).unwrap(), read_in_pieces(&stream, &[]).unwrap());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000),
                                       cuts in prop::collection::vec(any::<usize>(), 0..10)) {
            let _ = read_in_pieces(&bytes, &cuts);
        }

        #[test]
        fn a_partial_record_taken_out_continues_in_another_reader(
            recs in prop::collection::vec(arb_record(), 1..6),
            cut in any::<usize>(),
        ) {
            let stream: Vec<u8> = recs.iter().flat_map(|(k, b)| rec(*k, b)).collect();
            let cut = cut % (stream.len() + 1);
            let mut first = RecordReader::new();
            let mut got = Vec::new();
            let mut input = &stream[..cut];
            while let Some(r) = first.next(&mut input).unwrap() {
                got.push((r.kind, r.body.to_vec()));
            }
            let mut rest = Vec::new();
            first.take_partial(&mut rest);
            prop_assert!(!first.in_record());
            rest.extend_from_slice(&stream[cut..]);
            let mut second = RecordReader::new();
            let mut input = &rest[..];
            while let Some(r) = second.next(&mut input).unwrap() {
                got.push((r.kind, r.body.to_vec()));
            }
            second.finish().unwrap();
            let want: Vec<_> = recs.iter().map(|(k, b)| (RecordType::from_u8(*k).unwrap(), b.clone())).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn nothing_buffered_between_records(recs in prop::collection::vec(arb_record(), 1..6), cut in 1usize..3) {
            // Each record is split inside its header, so every one goes through the buffer.
            let mut reader = RecordReader::new();
            for (k, b) in &recs {
                let r = rec(*k, b);
                let mut first = &r[..cut];
                prop_assert!(reader.next(&mut first).unwrap().is_none());
                let mut second = &r[cut..];
                prop_assert_eq!(reader.next(&mut second).unwrap().unwrap().body, &b[..]);
                prop_assert!(reader.next(&mut second).unwrap().is_none());
                prop_assert_eq!(reader.body.capacity(), 0);
                prop_assert!(!reader.in_record());
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_from_the_header() {
        let mut reader = RecordReader::new();
        let mut input = &[0x05, 0x40, 0x11][..]; // 16,401
        assert_eq!(
            reader.next(&mut input),
            Err(RecordError::TooLong { kind: RecordType::Data, len: 16_401, max: MAX_BODY as u32 })
        );
        assert_eq!(reader.body.capacity(), 0, "nothing was buffered for it");
        // Split header: refused on its third byte, still before any body byte.
        let mut reader = RecordReader::new();
        for b in [0x05u8, 0xff] {
            assert!(reader.next(&mut &[b][..]).unwrap().is_none());
        }
        assert!(matches!(reader.next(&mut &[0xff][..]), Err(RecordError::TooLong { .. })));
        assert_eq!(reader.body.capacity(), 0);
        // The limit itself is fine.
        let mut reader = RecordReader::new();
        let big = rec(5, &vec![7; MAX_BODY]);
        assert_eq!(reader.next(&mut &big[..]).unwrap().unwrap().body.len(), MAX_BODY);
    }

    #[test]
    fn a_claimed_length_pins_no_memory_until_the_bytes_arrive() {
        let mut reader = RecordReader::new();
        assert!(reader.next(&mut &[0x05, 0x40, 0x10, 1][..]).unwrap().is_none()); // 16,400 claimed
        assert!(reader.body.capacity() < 16, "{}", reader.body.capacity());
        let mut fed = 1;
        while fed < MAX_BODY - 1000 {
            assert!(reader.next(&mut &[7; 1000][..]).unwrap().is_none());
            fed += 1000;
            assert!(reader.body.capacity() <= 2 * fed && reader.body.capacity() <= MAX_BODY);
        }
        let rest = vec![7; MAX_BODY - fed];
        assert_eq!(reader.next(&mut &rest[..]).unwrap().unwrap().body.len(), MAX_BODY);
        assert_eq!(reader.body.capacity(), MAX_BODY);
    }

    #[test]
    fn unknown_type_is_refused_on_its_first_byte_and_stays_refused() {
        let mut reader = RecordReader::new();
        assert_eq!(reader.next(&mut &[0x16][..]), Err(RecordError::UnknownType(0x16)));
        assert_eq!(reader.next(&mut &[0x05, 0, 0][..]), Err(RecordError::UnknownType(0x16)));
        assert_eq!(reader.finish(), Err(RecordError::UnknownType(0x16)));
        let mut reader = RecordReader::new();
        assert_eq!(reader.next(&mut &b"GET / HTTP/1.1\r\n"[..]), Err(RecordError::UnknownType(b'G')));
    }

    #[test]
    fn truncated_stream_is_reported_by_finish() {
        let mut reader = RecordReader::new();
        let mut input = &[0x05, 0x00, 0x04, 1, 2][..];
        assert!(reader.next(&mut input).unwrap().is_none());
        assert!(reader.in_record());
        assert_eq!(reader.finish(), Err(RecordError::Truncated { have: 5, need: 7 }));
        let mut reader = RecordReader::new();
        assert!(reader.next(&mut &[0x05][..]).unwrap().is_none());
        assert_eq!(reader.finish(), Err(RecordError::Truncated { have: 1, need: 3 }));
        assert_eq!(RecordReader::new().finish(), Ok(()));
    }

    #[test]
    fn reader_is_small() {
        assert_eq!(std::mem::size_of::<RecordReader>(), 48);
    }
}
