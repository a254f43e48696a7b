//! The fleetgate server.
//!
//! A gate runs one glommio executor per configured core. Each executor is a **gate shard**
//! (its own `SO_REUSEPORT` listener and the connections it accepted) and a **logic shard** (the
//! uids with `logic::shard_of(uid) == id`); they talk through the [`mesh`] in batches.
//!
//! Where to look:
//! - the login path: [`app::session`]; the GPS path: [`app::gps`]; the push path:
//!   [`sidecar::push`] (accept, fan out), `logic::push` (receipts), [`app::push`] (deliver, ack),
//!   [`delivery`] and [`sidecar`] (receipts to the app-server); app requests: [`app::upstream`];
//! - the shard's one loop: [`event_loop`], over its state [`state`]; the sans-I/O machines beside
//!   the logic shard: [`lifecycle`] (a connection's phases and timeouts) and [`delivery`];
//! - the tasks that only move bytes (accepting, reading, blocked writes): [`io`]; the app port's
//!   own io_uring (`app.io = "uring"`, every `unsafe` of the app port): [`uring`];
//! - cluster mode (several nodes sharing a directory in Redis): [`cluster`];
//! - starting and stopping: [`server`]; configuration and flags: [`config`]; `/metrics`:
//!   [`metrics`], [`admin`].

pub mod admin;
pub mod app;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod event_loop;
pub mod io;
pub mod lifecycle;
pub mod marks;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod server;
pub mod sidecar;
pub mod state;
pub mod uring;
