//! The app port: where drivers and passengers connect.
//!
//! - [`listener`]: accepting, with the per-shard connection limit and accept-rate limit.
//! - [`conn`]: one connection's task: the read loop (drain, decode in place) and blocked writes.
//! - [`session`]: the login path and everything a frame asks for (keepalive, logout, errors).
//! - [`gps`]: the GPS path: points copied out of frames, to the driver's logic shard, flushed out.

pub mod conn;
pub mod gps;
pub mod listener;
pub mod session;
