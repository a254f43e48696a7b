//! The protocol's rules as state machines, sans I/O: no sockets, no threads, no locks, no clock
//! reads, no async runtime. Each takes bytes received, the time (`now: Instant`) and its owner's
//! commands, and gives back bytes to write, the next deadline, actions (open or close a
//! connection) and events. A shell (blocking, glommio, io_uring, a test harness) moves bytes, time
//! and events between a machine and the world, and does nothing else the protocol asks for.
//!
//! - [`app`]: [`app::AppProto`], the app's session (drivers, passengers) across connections; its
//!   shells are [`crate::AppSession`] and loadgen's per-app task.
//! - [`appserver`]: [`appserver::Session`], the app-server's session over one or more sidecar
//!   connections; its shell is [`crate::AppServerConn`].

pub mod app;
pub mod appserver;
