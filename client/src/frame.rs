//! Verified frames copied out of the read buffer, and a reader that yields them one at a time
//! from any `std::io::Read`.
//!
//! The schema decoder hands out views borrowing the read buffer; a blocking client wants to keep
//! frames around (queued pushes, pipelined answers) while it goes on reading, so each frame is
//! copied once into an [`OwnedFrame`] and re-verified cheaply whenever its body is looked at.

use crate::ClientError;
use schema::wire;
use schema::{
    body_kind, decode, Body, BodyKind, Decoded, FrameError, FrameType, Header, Limits, FLAG_REDELIVERY,
    HEADER_LEN,
};
use std::io::{ErrorKind, Read};

/// A FlatBuffers table with every field at its default: what a zero-length body means. Same
/// layout as the schema decoder's: root offset 8 | vtable (len 4, table len 4) | soffset 4.
static EMPTY_TABLE: [u8; 12] = [8, 0, 0, 0, 4, 0, 4, 0, 4, 0, 0, 0];

/// A verified frame, owning its body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    /// The decoded header (raw cmd and type, sequence-id, flags, log-id).
    pub header: schema::Header,
    /// The command, known since the frame verified.
    pub cmd: schema::Cmd,
    /// The frame type, known since the frame verified.
    pub ty: schema::FrameType,
    /// The body bytes as received; empty means an all-defaults table.
    pub body: Vec<u8>,
}

/// An Error frame's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorView<'a> {
    /// Why the frame failed.
    pub code: wire::ErrorCode,
    /// The hop where it failed.
    pub origin: wire::Hop,
    /// The cmd of the frame that failed (0 when it could not be read).
    pub failed_cmd: u16,
    /// Human-readable explanation.
    pub message: &'a str,
    /// For Overloaded and ShuttingDown: wait at least this long before retrying.
    pub retry_after_ms: u32,
}

/// A business Response's `Reply` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyView<'a> {
    /// 0 for success; otherwise the app-server's own code.
    pub code: u16,
    /// The app-server's message.
    pub message: &'a str,
    /// The app-server's opaque answer.
    pub payload: &'a [u8],
}

/// A PushDelivery's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryView<'a> {
    /// The app-server's id for the push; echoed in the PushAck.
    pub message_id: u64,
    /// The app-server's hint of what the payload is (1 = order offer, 2 = order status).
    pub kind: u16,
    /// The app-server's opaque content.
    pub payload: &'a [u8],
    /// The app-server's clock when it sent the push, µs since the epoch.
    pub sent_at_us: u64,
    /// True when the gate sent this push before on this session (a resume replays it).
    pub redelivery: bool,
    /// When the push stops counting, ms since the Unix epoch by the gate's clock: an app shows
    /// it only before this (docs/PROTOCOL.md §9.10). 0: the gate gave none.
    pub deadline_ms: u64,
}

impl<'a> ErrorView<'a> {
    /// The fields of an Error table.
    pub fn of(e: wire::Error<'a>) -> ErrorView<'a> {
        ErrorView {
            code: e.code(),
            origin: e.origin(),
            failed_cmd: e.failed_cmd(),
            message: e.message().unwrap_or(""),
            retry_after_ms: e.retry_after_ms(),
        }
    }
}

impl<'a> ReplyView<'a> {
    /// The fields of a Reply table.
    pub fn of(r: wire::Reply<'a>) -> ReplyView<'a> {
        ReplyView {
            code: r.code(),
            message: r.message().unwrap_or(""),
            payload: r.payload().map_or(&[][..], |p| p.bytes()),
        }
    }
}

impl<'a> DeliveryView<'a> {
    /// The fields of a PushDelivery table, with the header's `flags`.
    pub fn of(d: wire::PushDelivery<'a>, flags: u8) -> DeliveryView<'a> {
        DeliveryView {
            message_id: d.message_id(),
            kind: d.kind(),
            payload: d.payload().map_or(&[][..], |p| p.bytes()),
            sent_at_us: d.sent_at_us(),
            redelivery: flags & FLAG_REDELIVERY != 0,
            deadline_ms: d.deadline_ms(),
        }
    }
}

impl OwnedFrame {
    /// Copies a verified frame out of the read buffer.
    pub fn from_frame(f: &schema::Frame<'_>) -> OwnedFrame {
        OwnedFrame { header: f.header, cmd: f.cmd, ty: f.ty, body: f.raw_body.to_vec() }
    }

    /// The verified body, or why it does not verify. Frames from a [`FrameReader`] always
    /// verify; only a frame assembled by hand can fail here.
    pub fn try_body(&self) -> Result<Body<'_>, FrameError> {
        let kind =
            body_kind(self.cmd, self.ty).ok_or(FrameError::BadType { cmd: self.cmd, ty: self.ty as u8 })?;
        let bytes = if self.body.is_empty() { &EMPTY_TABLE[..] } else { &self.body[..] };
        Body::verify(kind, bytes).map_err(|source| FrameError::CorruptBody { kind, source })
    }

    /// The verified body. A hand-assembled frame that does not verify reads as all defaults
    /// (of an `Error` table when its (cmd, type) names none); use [`OwnedFrame::try_body`] to
    /// tell.
    pub fn body(&self) -> Body<'_> {
        match self.try_body() {
            Ok(body) => body,
            Err(_) => {
                let kind = body_kind(self.cmd, self.ty).unwrap_or(BodyKind::Error);
                // No table in the schema has a required field, so the empty table verifies as
                // every kind; this is a fixed constant, not input.
                Body::verify(kind, &EMPTY_TABLE).expect("the all-defaults table verifies as every kind")
            }
        }
    }

    /// The sequence-id: matches answers to requests and acks to pushes.
    pub fn seq(&self) -> u32 {
        self.header.seq
    }

    /// The log-id of the flow this frame belongs to.
    pub fn log_id(&self) -> u64 {
        self.header.log_id
    }

    /// True when the redelivery flag is set (a push replayed on resume).
    pub fn is_redelivery(&self) -> bool {
        self.header.flags & FLAG_REDELIVERY != 0
    }

    /// The Error table's fields, if this is an Error frame.
    pub fn error(&self) -> Option<ErrorView<'_>> {
        match self.body() {
            Body::Error(e) => Some(ErrorView::of(e)),
            _ => None,
        }
    }

    /// This Error frame as a [`ClientError::Server`]; `None` for other frames.
    pub fn server_error(&self) -> Option<ClientError> {
        self.error().map(|e| ClientError::Server {
            code: e.code,
            origin: e.origin,
            message: e.message.to_owned(),
            retry_after_ms: e.retry_after_ms,
            log_id: self.header.log_id,
        })
    }

    /// The Reply's fields, if this is a business Response (PlaceOrder, GrabOrder, OrderStatus,
    /// BusinessRequest).
    pub fn reply(&self) -> Option<ReplyView<'_>> {
        match self.body() {
            Body::Reply(r) => Some(ReplyView::of(r)),
            _ => None,
        }
    }

    /// The PushDelivery's fields, if this is one.
    pub fn delivery(&self) -> Option<DeliveryView<'_>> {
        match self.body() {
            Body::PushDelivery(d) => Some(DeliveryView::of(d, self.header.flags)),
            _ => None,
        }
    }

    /// The GoAway table, if this is a GoAway push.
    pub fn go_away(&self) -> Option<wire::GoAway<'_>> {
        match self.body() {
            Body::GoAway(g) => Some(g),
            _ => None,
        }
    }

    /// Appends the frame's wire bytes to `out` (a fake peer in tests can send it back as is).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.body.len());
        out.extend_from_slice(&self.header.to_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// Smallest read buffer; it grows (up to one largest frame) only when a frame needs more.
const MIN_BUF: usize = 16 * 1024;
/// Below this much free space at the end, leftover bytes are moved to the front before a read,
/// so reads stay large.
const MIN_READ: usize = 4 * 1024;

/// Reads frames one at a time from a byte stream, keeping leftover bytes between calls (one
/// read usually brings many frames, or part of one).
#[derive(Debug)]
pub struct FrameReader {
    /// Read buffer, zeroed once when allocated; `buf[start..end]` holds bytes not yet returned.
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// End of the bytes read so far in `buf`.
    end: usize,
    /// The decoder's limits (largest body accepted).
    limits: Limits,
    /// Frames skipped because this build does not know their cmd or type.
    skipped: u64,
}

impl FrameReader {
    /// A reader enforcing `limits` (`Limits::APP` for the app port).
    pub fn new(limits: Limits) -> FrameReader {
        FrameReader { buf: vec![0; MIN_BUF], start: 0, end: 0, limits, skipped: 0 }
    }

    /// Reads the next frame from `r`.
    ///
    /// Frames with an unknown cmd, or a type this build does not pair with their cmd, are
    /// skipped (a newer peer may send them). A body that does not verify is
    /// `ClientError::Rejected` (that frame is consumed; the next call goes on). Lost framing is
    /// `ClientError::Protocol` and stays so. End of stream between frames is
    /// `ClientError::Closed`; inside a frame it is `Protocol(Truncated)`. A read timeout is
    /// `ClientError::Timeout` and loses nothing: the next call resumes where this one stopped.
    pub fn read_frame(&mut self, r: &mut impl Read) -> Result<OwnedFrame, ClientError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(frame);
            }
            self.fill(r)?;
        }
    }

    /// The next frame among the bytes already read, without reading; `Ok(None)` when they hold
    /// no whole frame.
    pub fn next_buffered(&mut self) -> Result<Option<OwnedFrame>, ClientError> {
        loop {
            let (step, consumed) = match decode(&self.buf[self.start..self.end], &self.limits)? {
                None => return Ok(None),
                Some((Decoded::Frame(f), n)) => (Ok(Some(OwnedFrame::from_frame(&f))), n),
                Some((
                    Decoded::Rejected {
                        error: FrameError::UnknownCmd(_) | FrameError::BadType { .. }, ..
                    },
                    n,
                )) => {
                    // Forward compatibility: a newer peer's new cmds and types are not errors.
                    (Ok(None), n)
                }
                Some((Decoded::Rejected { header, error }, n)) => {
                    (Err(ClientError::Rejected { header, error }), n)
                }
            };
            self.start += consumed;
            match step {
                Ok(None) => self.skipped += 1,
                other => return other,
            }
        }
    }

    /// Bytes read but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Moves the bytes read but not yet returned as frames to `into` (another reader takes the
    /// stream over).
    pub(crate) fn take_buffered(&mut self, into: &mut Vec<u8>) {
        into.extend_from_slice(&self.buf[self.start..self.end]);
        self.start = 0;
        self.end = 0;
    }

    /// Adds bytes another reader took from the stream, as if read after the buffered ones.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < bytes.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < bytes.len() {
                self.buf.resize(self.end + bytes.len(), 0);
            }
        }
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Frames skipped so far because their cmd or type is unknown to this build.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// One read into the free space after the buffered bytes. Only called when the buffered
    /// bytes are less than one whole frame, so growing to one largest frame always suffices.
    fn fill(&mut self, r: &mut impl Read) -> Result<(), ClientError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MIN_READ && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let largest = HEADER_LEN + self.limits.max_body as usize;
            let want = (self.buf.len() * 2).min(largest).max(self.end + MIN_READ);
            self.buf.resize(want, 0);
        }
        loop {
            match r.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(match schema::decode::finish(&self.buf[self.start..self.end]) {
                        Ok(()) => ClientError::Closed,
                        Err(e) => ClientError::Protocol(e),
                    });
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Default for FrameReader {
    /// A reader with the app port's limits.
    fn default() -> FrameReader {
        FrameReader::new(Limits::APP)
    }
}

/// Appends a frame with an arbitrary header (any type byte, any cmd number) and `body` to `out`;
/// for hostile-input tests and fake peers. Fails only when `body` exceeds `u32::MAX` bytes.
pub fn write_raw_frame(
    out: &mut Vec<u8>,
    ty: u8,
    cmd: u16,
    seq: u32,
    log_id: u64,
    body: &[u8],
) -> Result<(), ClientError> {
    let body_len = u32::try_from(body.len())
        .map_err(|_| ClientError::Unexpected(format!("body of {} bytes does not fit a frame", body.len())))?;
    let header = Header { version: schema::VERSION, ty, flags: 0, cmd, seq, body_len, log_id };
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// True for the Response or Error that answers the request with sequence-id `seq`.
pub(crate) fn answers(f: &OwnedFrame, seq: u32) -> bool {
    f.header.seq == seq && matches!(f.ty, FrameType::Response | FrameType::Error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::{Cmd, Encoder, StreamError};
    use std::io::Cursor;

    /// Returns 1..=7 bytes per read, cycling, so frames and headers split at every offset.
    struct Dribble<R> {
        /// The wrapped reader.
        inner: R,
        /// Read counter that picks the next chunk size.
        n: usize,
    }

    impl<R: Read> Read for Dribble<R> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            self.n += 1;
            let k = (self.n % 7 + 1).min(out.len());
            self.inner.read(&mut out[..k])
        }
    }

    fn point(i: u64) -> wire::GpsPoint {
        wire::GpsPoint::new(1_700_000_000_000 + i, 399_042_000, 1_164_074_000, 120, 9000, 50, 0)
    }

    /// A keepalive (empty-ish), a GPS batch, an unknown cmd, an error and a push.
    fn stream() -> Vec<u8> {
        let mut e = Encoder::new();
        let mut out = Vec::new();
        e.keepalive(&mut out, FrameType::Response, 3, 0x33, 1_700_000_000_001);
        e.gps_batch(&mut out, 0x88, &[point(0), point(1), point(2)]);
        write_raw_frame(&mut out, FrameType::Push as u8, 0x7777, 9, 0x99, &[1, 2, 3]).expect("small body");
        // A type byte this version does not know, on a known cmd: skipped too.
        write_raw_frame(&mut out, 42, Cmd::Keepalive as u16, 9, 0x99, &[]).expect("small body");
        e.error(&mut out, 6, 0x66, wire::ErrorCode::NotLoggedIn, wire::Hop::Gate, 0x10, "log in first", 0);
        e.frame(&mut out, FrameType::Push, Cmd::PushDelivery, 100, 0xDD, |b| {
            let payload = b.create_vector(b"order 77");
            wire::PushDelivery::create(
                b,
                &wire::PushDeliveryArgs {
                    message_id: 5,
                    payload: Some(payload),
                    sent_at_us: 1,
                    kind: 1,
                    deadline_ms: 0,
                },
            )
        });
        out
    }

    fn check_stream(reader: &mut FrameReader, r: &mut impl Read) {
        let k = reader.read_frame(r).expect("keepalive");
        assert_eq!((k.cmd, k.ty, k.seq(), k.log_id()), (Cmd::Keepalive, FrameType::Response, 3, 0x33));
        assert!(matches!(k.body(), Body::Keepalive(b) if b.ts_ms() == 1_700_000_000_001));

        let g = reader.read_frame(r).expect("gps batch");
        let Body::GpsBatch(b) = g.body() else { panic!("not a batch: {g:?}") };
        let points = b.points().expect("points present");
        assert_eq!(points.len(), 3);
        assert_eq!(points.get(2).ts_ms(), 1_700_000_000_002);

        let e = reader.read_frame(r).expect("error, the two unknown frames skipped");
        let ev = e.error().expect("error view");
        assert_eq!(
            (ev.code, ev.origin, ev.failed_cmd, ev.message),
            (wire::ErrorCode::NotLoggedIn, wire::Hop::Gate, 0x10, "log in first")
        );
        assert!(matches!(
            e.server_error(),
            Some(ClientError::Server { code: wire::ErrorCode::NotLoggedIn, log_id: 0x66, .. })
        ));
        assert_eq!(reader.skipped(), 2);

        let p = reader.read_frame(r).expect("push");
        let d = p.delivery().expect("delivery view");
        assert_eq!((d.message_id, d.kind, d.payload, d.redelivery), (5, 1, &b"order 77"[..], false));
        assert!(p.reply().is_none() && p.error().is_none() && p.go_away().is_none());

        assert!(matches!(reader.read_frame(r), Err(ClientError::Closed)));
    }

    #[test]
    fn reads_many_frames_from_one_read() {
        let mut reader = FrameReader::default();
        check_stream(&mut reader, &mut Cursor::new(stream()));
    }

    #[test]
    fn reads_frames_split_at_every_offset() {
        let mut reader = FrameReader::default();
        check_stream(&mut reader, &mut Dribble { inner: Cursor::new(stream()), n: 0 });
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn grows_for_a_large_frame_and_keeps_leftovers() {
        let mut e = Encoder::new();
        let mut out = Vec::new();
        let big: Vec<_> = (0..2000).map(point).collect(); // ~48 KiB, over the initial buffer
        e.gps_batch(&mut out, 1, &big);
        e.keepalive(&mut out, FrameType::Request, 2, 2, 7);
        let mut reader = FrameReader::default();
        let mut r = Dribble { inner: Cursor::new(out), n: 0 };
        let f = reader.read_frame(&mut r).expect("big batch");
        let Body::GpsBatch(b) = f.body() else { panic!("not a batch") };
        assert_eq!(b.points().map(|p| p.len()), Some(2000));
        assert_eq!(reader.read_frame(&mut r).expect("keepalive").seq(), 2);
    }

    #[test]
    fn empty_body_reads_as_defaults() {
        let mut out = Vec::new();
        write_raw_frame(&mut out, FrameType::Response as u8, Cmd::Keepalive as u16, 1, 1, &[])
            .expect("empty");
        assert_eq!(out.len(), HEADER_LEN);
        let f = FrameReader::default().read_frame(&mut Cursor::new(out)).expect("frame");
        assert!(f.body.is_empty());
        assert!(matches!(f.try_body(), Ok(Body::Keepalive(k)) if k.ts_ms() == 0));
    }

    #[test]
    fn truncated_stream_and_bad_magic_are_protocol_errors() {
        let mut out = Vec::new();
        Encoder::new().keepalive(&mut out, FrameType::Request, 1, 1, 7);
        out.truncate(out.len() - 1);
        let err = FrameReader::default().read_frame(&mut Cursor::new(out));
        assert!(matches!(err, Err(ClientError::Protocol(StreamError::Truncated { .. }))), "{err:?}");

        let err = FrameReader::default().read_frame(&mut Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()));
        assert!(matches!(err, Err(ClientError::Protocol(StreamError::BadMagic(b'G')))), "{err:?}");
    }

    #[test]
    fn corrupt_body_is_rejected_and_reading_goes_on() {
        let mut out = Vec::new();
        write_raw_frame(&mut out, FrameType::Push as u8, Cmd::PushDelivery as u16, 4, 4, &[0xFF; 9])
            .expect("small");
        Encoder::new().keepalive(&mut out, FrameType::Response, 5, 5, 7);
        let mut reader = FrameReader::default();
        let mut r = Cursor::new(out);
        let err = reader.read_frame(&mut r);
        assert!(matches!(err, Err(ClientError::Rejected { header, .. }) if header.seq == 4), "{err:?}");
        assert_eq!(reader.read_frame(&mut r).expect("next frame").seq(), 5);
    }

    #[test]
    fn hand_made_frame_that_does_not_verify_reads_as_defaults() {
        let f = OwnedFrame {
            header: Header::new(FrameType::Push, Cmd::PushDelivery as u16, 1, 1, 3),
            cmd: Cmd::PushDelivery,
            ty: FrameType::Push,
            body: vec![1, 2, 3],
        };
        assert!(f.try_body().is_err());
        assert_eq!(f.delivery().map(|d| d.message_id), Some(0));
        let mut bytes = Vec::new();
        f.write_to(&mut bytes);
        assert_eq!(bytes.len(), HEADER_LEN + 3);
    }
}
