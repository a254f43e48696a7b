//! The protocol's rules as state machines, sans I/O: no sockets, no threads, no clock reads,
//! no async runtime. A shell (blocking, glommio, io_uring, a test harness) moves bytes, time and
//! events between a machine and the world, and does nothing else the protocol asks for.
//!
//! - [`app`]: [`app::AppProto`], the app's session (drivers, passengers) across connections.

pub mod app;
