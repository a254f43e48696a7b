//! The app port: where drivers and passengers connect.
//!
//! - [`session`]: the login path and everything a frame asks for (keepalive, logout, errors).
//! - [`gps`]: the GPS path: points copied out of frames, to the driver's logic shard, flushed out.
//! - [`push`]: the push path's app side: deliveries written, acks taken.
//! - [`upstream`]: app requests for the app-server and their answers.
//! - [`secure`]: the secure channel: records in and out, the handshake, the commit rule.
//!
//! Accepting (with the per-shard limits) is in the shard's loop (`crate::event_loop`); the
//! connection tasks, which only move bytes, are in `crate::io`.

pub mod gps;
pub mod push;
pub mod secure;
pub mod session;
pub mod upstream;
