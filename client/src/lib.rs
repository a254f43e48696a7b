//! Rust client for fleetgate, over blocking `std::net` sockets (no async runtime), so tests,
//! examples and the load generator can drive it from plain threads.
//!
//! - [`frame`]: [`OwnedFrame`] (a verified frame copied out of the read buffer) and
//!   [`FrameReader`] (yields frames one at a time from any `Read`).
//! - [`app`]: [`AppConn`], the app side (drivers, passengers): login, resume, keepalive, GPS,
//!   pipelined business requests, pushes and their acks.
//! - [`appserver`]: [`AppServerConn`], the app-server side (the sidecar port): hello, pushes
//!   with one final receipt per (message id, uid), upstream requests and their replies, GPS
//!   forwards; reconnects to the same gate process (compared by its incarnation) or reports the
//!   gate lost.
//! - [`session`]: [`AppSession`], an app session across dropped connections: resume on the
//!   node that holds it, fall back to login, back off across gates, ack every push and return
//!   each message id once; over the secure channel by default ([`SessionConfig::server_key`]).
//! - [`proto`]: the protocol's rules as sans-I/O state machines; [`AppSession`] and loadgen
//!   are shells over [`proto::app::AppProto`], which speaks the secure channel inside (its
//!   shells move bytes only).
//! - [`secure`]: [`secure::SecureStream`], the app side of the secure channel over a blocking
//!   socket ([`AppConn::connect_secure`]), which can also carry an [`AppSession`]'s channel
//!   while [`AppSession::conn`] lends the connection out.
//! - [`ClientError`]: every failure, with the server's own error frames as
//!   [`ClientError::Server`].

pub mod app;
pub mod appserver;
mod error;
pub mod frame;
pub mod proto;
pub mod secure;
pub mod session;

pub use app::{AppConn, Reply, SessionInfo, MAX_QUEUED};
pub use appserver::{
    Accepted, AppServerConn, AppServerEvents, Chosen, ConnectOptions, Event as AppServerEvent, GeoPushSpec,
    GeoSpec, PushSpec, ServerErrorInfo, SessionEnd, UpstreamRequest, Welcome,
};
pub use error::ClientError;
pub use frame::{write_raw_frame, DeliveryView, ErrorView, FrameReader, OwnedFrame, ReplyView};
pub use session::{AppEvent, AppSession, DedupSet, Outcome as SessionOutcome, SessionConfig};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it), the unit of
/// token expiries and keepalive timestamps.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A login token for `uid` and `role` (`wire::Role` value: 1 driver, 2 passenger) valid for
/// `ttl` from now, signed with `secret`: what an app-server would issue, for tests and loadgen.
pub fn dev_token(secret: &[u8], uid: u64, role: u8, ttl: Duration) -> Vec<u8> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let claims = schema::token::Claims { uid, role, expires_ms: now_ms().saturating_add(ttl_ms) };
    schema::token::issue(secret, claims).to_vec()
}

/// The bytes of a token written as hex, as `gate token` prints it (surrounding whitespace
/// ignored, either case), ready for [`AppConn::login`]; `None` for an odd length or a non-hex
/// digit.
pub fn token_from_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim().as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    text.chunks_exact(2).map(|p| Some((digit(p[0])? << 4) | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_token_verifies_with_its_secret() {
        let t = dev_token(b"s3cret", 42, 1, Duration::from_secs(60));
        let claims = schema::token::verify(b"s3cret", &t, now_ms()).expect("fresh token verifies");
        assert_eq!((claims.uid, claims.role), (42, 1));
        assert!(schema::token::verify(b"other", &t, now_ms()).is_err());
    }

    #[test]
    fn token_from_hex_reads_what_gate_token_prints() {
        assert_eq!(token_from_hex("00ab7F\n"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(token_from_hex(""), Some(Vec::new()));
        assert_eq!(token_from_hex("abc"), None);
        assert_eq!(token_from_hex("zz"), None);
        assert_eq!(token_from_hex("+1"), None);
    }
}
