//! Protocol state machines without I/O: no sockets, no threads, no locks, no clock reads. Each
//! takes bytes received, the time (`now: Instant`) and the caller's commands, and gives back bytes
//! to write, the next deadline, actions for its owner (open or close a connection) and events.
//! The blocking shells of the crate root drive them over `std::net` sockets; tests drive them
//! directly, without sockets and without waiting.

pub mod appserver;
