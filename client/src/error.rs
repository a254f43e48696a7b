//! The client's one error type.

use schema::wire::{ErrorCode, Hop};
use schema::{FrameError, Header, StreamError};
use std::io::ErrorKind;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket operation failed for a reason other than a timeout or the peer going away.
    #[error("i/o error: {0}")]
    Io(#[source] std::io::Error),
    /// The peer closed (or reset) the connection. Frames received before that stay readable.
    #[error("connection closed by the peer")]
    Closed,
    /// Framing is lost (bad magic, unknown version, oversized or truncated frame); the
    /// connection cannot go on.
    #[error("protocol error: {0}")]
    Protocol(#[from] StreamError),
    /// A frame whose length was sound but whose body did not verify as its (cmd, type) says.
    /// Decoding goes on with the next frame.
    #[error("rejected frame (cmd 0x{:04x}, seq {}): {error}", header.cmd, header.seq)]
    Rejected {
        /// The frame's header.
        header: Header,
        /// What was wrong with it.
        error: FrameError,
    },
    /// The peer answered with an Error frame.
    #[error("{code:?} at {origin:?}: {message} (retry after {retry_after_ms} ms, log-id {log_id:#018x})")]
    Server {
        /// Why the request failed.
        code: ErrorCode,
        /// The hop where it failed.
        origin: Hop,
        /// The peer's human-readable explanation.
        message: String,
        /// For Overloaded and ShuttingDown: wait at least this long before retrying.
        retry_after_ms: u32,
        /// The log-id the error frame echoed, to find the flow in the gate's logs.
        log_id: u64,
    },
    /// No frame (or no answer) arrived within the read timeout, or a write could not complete
    /// within the write timeout.
    #[error("timed out")]
    Timeout,
    /// Too many frames arrived that nobody has claimed yet (see `MAX_QUEUED`).
    #[error("too many unclaimed frames queued")]
    QueueFull,
    /// The secure channel failed: the gate refused the handshake (a Reject, for example an
    /// unknown key), or a record did not authenticate. The connection cannot go on.
    #[error("secure channel: {0}")]
    Channel(channel::ChannelError),
    /// The peer sent something valid on the wire but not what this call expects.
    #[error("unexpected: {0}")]
    Unexpected(String),
}

impl From<crate::proto::app::Fault> for ClientError {
    fn from(f: crate::proto::app::Fault) -> ClientError {
        match f {
            crate::proto::app::Fault::Frames(e) => ClientError::Protocol(e),
            crate::proto::app::Fault::Channel(e) => ClientError::Channel(e),
        }
    }
}

impl From<std::io::Error> for ClientError {
    /// Timeouts and a peer that went away get their own variants, since callers (and tests)
    /// act on them differently from other socket failures.
    fn from(e: std::io::Error) -> ClientError {
        // The secure stream reports channel failures through `Read` and `Write`.
        if let Some(c) = e.get_ref().and_then(|inner| inner.downcast_ref::<channel::ChannelError>()) {
            return ClientError::Channel(c.clone());
        }
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}
