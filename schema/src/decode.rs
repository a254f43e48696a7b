//! Incremental, zero-copy frame decoding over a caller-owned read buffer.
//!
//! Two steps, like a parser that proves before it builds: the header says how long the frame is
//! (and is checked against the limit before any body byte is awaited), then the body is verified
//! as the FlatBuffers table its (cmd, type) names. Only verified bodies reach callers, as typed
//! views borrowing the read buffer. Nothing here allocates on success.
//!
//! Errors come in two kinds:
//! - `StreamError`: framing itself is lost (bad magic, unknown version, oversized length,
//!   truncated at end of stream). The connection cannot continue; answer with an error frame and
//!   close.
//! - `FrameError`, inside `Decoded::Rejected`: this one frame is bad (unknown cmd, a type not
//!   allowed for the cmd, corrupt body) but its length was sound, so decoding goes on with the
//!   next frame.

use crate::cmd::{body_kind, Cmd};
use crate::generated::fleetgate::wire;
use crate::header::{FrameType, Header, HEADER_LEN, MAGIC, VERSION};
use flatbuffers::{InvalidFlatbuffer, VerifierOptions};

/// Default body limit on the app port. A GPS batch of 500 points is ~12 KiB.
pub const MAX_APP_BODY: u32 = 64 * 1024;
/// Default body limit on the sidecar: a push to 50,000 uids is ~400 KiB plus payload.
pub const MAX_SIDECAR_BODY: u32 = 8 * 1024 * 1024;

/// A FlatBuffers table with every field at its default: what a zero-length body means.
/// Layout: root offset 8 | vtable (vtable len 4, table len 4) | table (soffset to vtable = 4).
static EMPTY_TABLE: [u8; 12] = [8, 0, 0, 0, 4, 0, 4, 0, 4, 0, 0, 0];

/// Options for the FlatBuffers verifier: tighter than the library defaults, since every body
/// comes from the network and our tables are shallow.
const VERIFIER: VerifierOptions = VerifierOptions {
    max_depth: 16,
    max_tables: 100_000,
    max_apparent_size: 1 << 24,
    ignore_missing_null_terminator: false,
};

/// Framing is lost; the stream must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The first byte of a frame was not `MAGIC`: this is not a fleetgate stream.
    #[error("bad magic byte 0x{0:02x}: not a fleetgate stream")]
    BadMagic(u8),
    /// The header version is not spoken by this build.
    #[error("unsupported header version {0} (this gate speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The header announced a body larger than the limit.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced body length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes buffered.
        have: usize,
        /// Bytes the frame needs (header only, if the header itself was incomplete).
        need: usize,
    },
}

/// One frame is bad; the stream goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// The cmd number is not in the registry.
    #[error("unknown cmd 0x{0:04x}")]
    UnknownCmd(u16),
    /// The cmd is known but the type is not allowed with it.
    #[error("type {ty} is not valid for cmd {cmd:?}")]
    BadType {
        /// The command.
        cmd: Cmd,
        /// The raw type byte.
        ty: u8,
    },
    /// The body is not a valid FlatBuffers table of the kind its (cmd, type) names.
    #[error("corrupt {kind:?} body: {source}")]
    CorruptBody {
        /// The table the body should have been.
        kind: BodyKind,
        /// What the verifier found.
        source: InvalidFlatbuffer,
    },
}

/// A verified frame: header fields plus a typed view of the body, borrowing the read buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The decoded header.
    pub header: Header,
    /// The command (known, since the frame verified).
    pub cmd: Cmd,
    /// The frame type (known, since the frame verified).
    pub ty: FrameType,
    /// The raw body bytes (empty for an all-defaults body).
    pub raw_body: &'a [u8],
    /// The verified body.
    pub body: Body<'a>,
}

/// One decoding step's result.
#[derive(Debug, Clone)]
pub enum Decoded<'a> {
    /// A verified frame.
    Frame(Frame<'a>),
    /// A frame whose length was sound but whose content was not; skip it and go on.
    Rejected {
        /// The frame's header (for its sequence-id and log-id in the error answer).
        header: Header,
        /// What was wrong.
        error: FrameError,
    },
}

/// Limits the decoder enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted; larger announced lengths are a `StreamError`.
    pub max_body: u32,
}

impl Limits {
    /// The app port's default limits.
    pub const APP: Limits = Limits { max_body: MAX_APP_BODY };
    /// The sidecar port's default limits.
    pub const SIDECAR: Limits = Limits { max_body: MAX_SIDECAR_BODY };
}

/// Checks the header at the start of `buf`. `Ok(None)`: fewer than `HEADER_LEN` bytes.
#[inline]
pub fn peek_header(buf: &[u8], limits: &Limits) -> Result<Option<Header>, StreamError> {
    // Magic is checked on the first byte alone so garbage is refused without waiting for 24.
    match buf.first() {
        None => return Ok(None),
        Some(&m) if m != MAGIC => return Err(StreamError::BadMagic(m)),
        Some(_) => {}
    }
    if buf.len() >= 2 && buf[1] != VERSION {
        return Err(StreamError::UnsupportedVersion(buf[1]));
    }
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::read(head);
    if header.body_len > limits.max_body {
        return Err(StreamError::FrameTooLarge { len: header.body_len, max: limits.max_body });
    }
    Ok(Some(header))
}

/// Decodes the frame at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((item, n)))` means the first `n` bytes were
/// one frame, good or rejected.
#[inline]
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<(Decoded<'a>, usize)>, StreamError> {
    let Some(header) = peek_header(buf, limits)? else {
        return Ok(None);
    };
    let len = header.frame_len();
    let Some(frame) = buf.get(..len) else {
        return Ok(None);
    };
    let raw_body = &frame[HEADER_LEN..];
    Ok(Some((verify(header, raw_body), len)))
}

/// Verifies a body against its header's (cmd, type).
pub fn verify(header: Header, raw_body: &[u8]) -> Decoded<'_> {
    let Some(cmd) = Cmd::from_u16(header.cmd) else {
        return Decoded::Rejected { header, error: FrameError::UnknownCmd(header.cmd) };
    };
    let Some((ty, kind)) = FrameType::from_u8(header.ty).and_then(|ty| Some((ty, body_kind(cmd, ty)?)))
    else {
        return Decoded::Rejected { header, error: FrameError::BadType { cmd, ty: header.ty } };
    };
    let bytes = if raw_body.is_empty() { &EMPTY_TABLE[..] } else { raw_body };
    // The hot path: a one-point GPS report, verified by a check specialised to its one layout.
    if kind == BodyKind::GpsReport && gps_report_is_valid(bytes) {
        // SAFETY: `gps_report_is_valid` checked every offset the generated accessors follow
        // (root offset, table, vtable, the point field and its 24 bytes), exactly as the
        // generic verifier would; see the property test that compares the two.
        let report = unsafe { flatbuffers::root_unchecked::<wire::GpsReport>(bytes) };
        return Decoded::Frame(Frame { header, cmd, ty, raw_body, body: Body::GpsReport(report) });
    }
    match Body::verify(kind, bytes) {
        Ok(body) => Decoded::Frame(Frame { header, cmd, ty, raw_body, body }),
        Err(source) => Decoded::Rejected { header, error: FrameError::CorruptBody { kind, source } },
    }
}

#[inline(always)]
fn u16_at(b: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_le_bytes(*b.get(pos..pos.checked_add(2)?)?.first_chunk::<2>()?))
}

#[inline(always)]
fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*b.get(pos..pos.checked_add(4)?)?.first_chunk::<4>()?))
}

/// The FlatBuffers verifier's checks for a `GpsReport`, specialised to its single struct field:
/// the same conditions `flatbuffers::root::<GpsReport>` enforces (offset alignment and bounds,
/// vtable alignment and bounds, the field's 24 bytes in bounds), without the generic machinery.
/// `false` sends the body through the generic verifier, which then names the error.
#[inline]
pub fn gps_report_is_valid(b: &[u8]) -> bool {
    (|| -> Option<()> {
        // Root: a uoffset at 0 to the table.
        let table = u32_at(b, 0)? as usize;
        // Table: 4-aligned soffset to its vtable, in bounds.
        if !table.is_multiple_of(4) {
            return None;
        }
        let soffset = u32_at(b, table)? as i32;
        let vtable = if soffset > 0 {
            table.checked_sub(soffset.unsigned_abs() as usize)?
        } else {
            table.checked_add(soffset.unsigned_abs() as usize)?
        };
        if vtable >= b.len() || !vtable.is_multiple_of(2) {
            return None;
        }
        // Vtable: its length, even, all in bounds.
        let vtable_len = u16_at(b, vtable)? as usize;
        if !(vtable + vtable_len).is_multiple_of(2) || vtable + vtable_len > b.len() {
            return None;
        }
        // Field `point` (voffset 4): absent, or 24 bytes in bounds.
        const VT_POINT: usize = 4;
        const POINT_LEN: usize = 24;
        if VT_POINT < vtable_len {
            let field = u16_at(b, vtable + VT_POINT)? as usize;
            if field > 0 && table.checked_add(field)?.checked_add(POINT_LEN)? > b.len() {
                return None;
            }
        }
        Some(())
    })()
    .is_some()
}

/// At end of stream: an error if a partial frame is left over.
pub fn finish(leftover: &[u8]) -> Result<(), StreamError> {
    if leftover.is_empty() {
        return Ok(());
    }
    let need = match leftover.first_chunk::<HEADER_LEN>() {
        Some(h) => Header::read(h).frame_len(),
        None => HEADER_LEN,
    };
    Err(StreamError::Truncated { have: leftover.len(), need })
}

/// Iterates the complete frames in a buffer; `consumed()` says how much to drop afterwards.
///
/// After a `StreamError` the iterator yields nothing more.
#[derive(Debug)]
pub struct Frames<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: Limits,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Iterates over `buf` with `limits`.
    pub fn new(buf: &'a [u8], limits: Limits) -> Frames<'a> {
        Frames { buf, pos: 0, limits, failed: false }
    }

    /// Bytes consumed by the frames yielded so far (whole frames only).
    pub fn consumed(&self) -> usize {
        self.pos
    }

    /// The bytes after the last whole frame.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Decoded<'a>, StreamError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match decode(&self.buf[self.pos..], &self.limits) {
            Ok(None) => None,
            Ok(Some((item, n))) => {
                self.pos += n;
                Some(Ok(item))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Defines `BodyKind` and `Body` from one list of every body table, with verification
/// dispatched by `BodyKind`: a table added to the list is known to both at once.
macro_rules! bodies {
    ($($name:ident),* $(,)?) => {
        /// Names one of the body tables. `body_kind` maps a (cmd, type) pair to one of these.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum BodyKind { $(
            #[doc = concat!("The `", stringify!($name), "` table.")]
            $name,
        )* }

        /// A verified body: a typed FlatBuffers view into the read buffer.
        #[derive(Debug, Clone, Copy)]
        pub enum Body<'a> { $(
            #[doc = concat!("A verified `", stringify!($name), "` table.")]
            $name(wire::$name<'a>),
        )* }

        impl<'a> Body<'a> {
            /// Verifies `bytes` as the table `kind` names.
            #[inline]
            pub fn verify(kind: BodyKind, bytes: &'a [u8]) -> Result<Body<'a>, InvalidFlatbuffer> {
                match kind { $(
                    BodyKind::$name => flatbuffers::root_with_opts::<wire::$name>(&VERIFIER, bytes).map(Body::$name),
                )* }
            }

            /// Which table this is.
            pub fn kind(&self) -> BodyKind {
                match self { $(Body::$name(_) => BodyKind::$name,)* }
            }
        }
    };
}

bodies!(
    Login,
    Session,
    Resume,
    Keepalive,
    Logout,
    GoAway,
    Error,
    GpsReport,
    GpsBatch,
    PlaceOrder,
    GrabOrder,
    OrderStatusQuery,
    BusinessRequest,
    Reply,
    PushDelivery,
    PushAck,
    AppServerHello,
    AppServerWelcome,
    Push,
    PushAccepted,
    Receipts,
    ReceiptsAck,
    GpsForward,
    Upstream,
    UpstreamReply,
    Unreachable,
    EndSession,
    SessionEnded,
    GeoPush,
    GeoQuery,
    GeoChosen,
);
