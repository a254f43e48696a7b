//! Writing frames into caller-owned buffers.
//!
//! `Encoder` owns one reusable FlatBuffers builder, so building a body allocates only while the
//! builder grows to its working size; frames are appended to the caller's `Vec<u8>`, which is
//! typically the connection's outgoing batch.

use crate::cmd::{body_kind, Cmd};
use crate::generated::fleetgate::wire;
use crate::header::{FrameType, Header, HEADER_LEN};
use flatbuffers::{FlatBufferBuilder, WIPOffset};

/// Appends one frame (header + body) to `out`.
#[inline]
pub fn write_frame(out: &mut Vec<u8>, ty: FrameType, cmd: Cmd, seq: u32, log_id: u64, body: &[u8]) {
    debug_assert!(body_kind(cmd, ty).is_some(), "{cmd:?} has no body for {ty:?}");
    let header = Header::new(ty, cmd as u16, seq, log_id, body.len() as u32);
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(body);
}

/// Builds FlatBuffers bodies and writes whole frames.
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// A new encoder with a small builder; it grows to the largest body built and stays there.
    pub fn new() -> Encoder {
        Encoder { fbb: FlatBufferBuilder::with_capacity(256) }
    }

    /// Builds a body with `build` and returns its bytes (valid until the next call).
    pub fn body<T>(&mut self, build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<T>) -> &[u8] {
        self.fbb.reset();
        let root = build(&mut self.fbb);
        self.fbb.finish_minimal(root);
        self.fbb.finished_data()
    }

    /// Builds a body with `build` and appends the whole frame to `out`.
    pub fn frame<T>(
        &mut self,
        out: &mut Vec<u8>,
        ty: FrameType,
        cmd: Cmd,
        seq: u32,
        log_id: u64,
        build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<T>,
    ) {
        let body = self.body(build);
        write_frame(out, ty, cmd, seq, log_id, body);
    }

    /// An error frame answering the frame with `seq` and `log_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn error(
        &mut self,
        out: &mut Vec<u8>,
        seq: u32,
        log_id: u64,
        code: wire::ErrorCode,
        origin: wire::Hop,
        failed_cmd: u16,
        message: &str,
        retry_after_ms: u32,
    ) {
        self.frame(out, FrameType::Error, Cmd::Error, seq, log_id, |b| {
            let message = b.create_string(message);
            wire::Error::create(
                b,
                &wire::ErrorArgs { code, origin, failed_cmd, message: Some(message), retry_after_ms },
            )
        });
    }

    /// A one-point GPS report.
    pub fn gps_report(&mut self, out: &mut Vec<u8>, log_id: u64, point: &wire::GpsPoint) {
        self.frame(out, FrameType::Event, Cmd::GpsReport, 0, log_id, |b| {
            wire::GpsReport::create(b, &wire::GpsReportArgs { point: Some(point) })
        });
    }

    /// A batch of GPS points, oldest first.
    pub fn gps_batch(&mut self, out: &mut Vec<u8>, log_id: u64, points: &[wire::GpsPoint]) {
        self.frame(out, FrameType::Event, Cmd::GpsBatch, 0, log_id, |b| {
            let points = b.create_vector(points);
            wire::GpsBatch::create(b, &wire::GpsBatchArgs { points: Some(points) })
        });
    }

    /// A keepalive request or response.
    pub fn keepalive(&mut self, out: &mut Vec<u8>, ty: FrameType, seq: u32, log_id: u64, ts_ms: u64) {
        self.frame(out, ty, Cmd::Keepalive, seq, log_id, |b| {
            wire::Keepalive::create(b, &wire::KeepaliveArgs { ts_ms })
        });
    }

    /// A go-away push; the gate closes the connection after it.
    pub fn go_away(
        &mut self,
        out: &mut Vec<u8>,
        log_id: u64,
        reason: wire::GoAwayReason,
        message: &str,
        reconnect: &str,
        retry_after_ms: u32,
    ) {
        self.frame(out, FrameType::Push, Cmd::GoAway, 0, log_id, |b| {
            let message = b.create_string(message);
            let reconnect = b.create_string(reconnect);
            wire::GoAway::create(
                b,
                &wire::GoAwayArgs {
                    reason,
                    message: Some(message),
                    reconnect: Some(reconnect),
                    retry_after_ms,
                },
            )
        });
    }
}
