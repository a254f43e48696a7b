//! The fixed 24-byte frame header. Little-endian, like the FlatBuffers bodies behind it.
//!
//! ```text
//! offset size field
//!      0    1 magic        0xF7: rejects streams that are not fleetgate before anything else
//!      1    1 version      1
//!      2    1 type         FrameType
//!      3    1 flags        bit 0 = FLAG_REDELIVERY; unknown bits are ignored
//!      4    2 cmd          Cmd
//!      6    2 reserved     0 (ignored on read, so a later version may use it)
//!      8    4 sequence_id  matches responses to requests, acks to pushes
//!     12    4 body_len     bytes of body after the header
//!     16    8 log_id       set by whoever starts a flow, carried through every hop
//!     24      body         FlatBuffers table chosen by (cmd, type)
//! ```

/// First byte of every frame.
pub const MAGIC: u8 = 0xF7;
/// The only header version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 24;
/// Header flag: this push was sent before on this session (a resume replays it).
pub const FLAG_REDELIVERY: u8 = 0x01;

/// What a frame is for; together with `cmd` it picks the body table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Expects exactly one Response or Error with the same sequence-id.
    Request = 1,
    /// Answers the Request with the same sequence-id.
    Response = 2,
    /// One-way; no answer (GPS).
    Event = 3,
    /// Sent by the gate unasked; acked with an Ack of the same sequence-id where the cmd says so.
    Push = 4,
    /// Acknowledges a Push.
    Ack = 5,
    /// A failure; the body is an `Error` table naming the hop where it happened.
    Error = 6,
}

impl FrameType {
    /// Parses the type byte; `None` for values this version does not know.
    pub const fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Request,
            2 => FrameType::Response,
            3 => FrameType::Event,
            4 => FrameType::Push,
            5 => FrameType::Ack,
            6 => FrameType::Error,
            _ => return None,
        })
    }
}

/// A decoded header. `ty` is kept raw so an unknown type is reported, not guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of the header (always `VERSION` once decoded).
    pub version: u8,
    /// Raw frame type byte; see `FrameType`.
    pub ty: u8,
    /// Flag bits (`FLAG_*`).
    pub flags: u8,
    /// Raw command number; see `Cmd`.
    pub cmd: u16,
    /// Request/response and push/ack matching.
    pub seq: u32,
    /// Bytes of body following the header.
    pub body_len: u32,
    /// Trace id of the flow this frame belongs to.
    pub log_id: u64,
}

impl Header {
    /// A version-1 header for a body of `body_len` bytes.
    pub const fn new(ty: FrameType, cmd: u16, seq: u32, log_id: u64, body_len: u32) -> Header {
        Header { version: VERSION, ty: ty as u8, flags: 0, cmd, seq, body_len, log_id }
    }

    /// Reads a header from the first `HEADER_LEN` bytes. The caller checks magic and version.
    #[inline]
    pub fn read(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            version: b[1],
            ty: b[2],
            flags: b[3],
            cmd: u16::from_le_bytes([b[4], b[5]]),
            seq: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            body_len: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            log_id: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        }
    }

    /// The header's wire bytes.
    #[inline]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        b[1] = self.version;
        b[2] = self.ty;
        b[3] = self.flags;
        b[4..6].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.log_id.to_le_bytes());
        b
    }

    /// The frame type, if this version knows it.
    pub fn frame_type(&self) -> Option<FrameType> {
        FrameType::from_u8(self.ty)
    }

    /// The command, if this build knows it.
    pub fn command(&self) -> Option<crate::Cmd> {
        crate::Cmd::from_u16(self.cmd)
    }

    /// Total frame length on the wire.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }
}
