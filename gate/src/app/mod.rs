//! The app port: where drivers and passengers connect.
//!
//! - [`listener`]: accepting, with the per-shard connection limit and accept-rate limit.
//! - [`session`]: the login path and everything a frame asks for (keepalive, logout, errors).
//! - [`gps`]: the GPS path: points copied out of frames, to the driver's logic shard, flushed out.
//! - [`push`]: the push path's app side: deliveries written, acks taken.
//! - [`upstream`]: app requests for the app-server and their answers.
//!
//! The connection task itself (shared with the sidecar port) is `crate::conn`.

pub mod gps;
pub mod listener;
pub mod push;
pub mod session;
pub mod upstream;
