//! The fleetgate server.
//!
//! A gate runs one glommio executor per configured core. Each executor is a **gate shard**
//! (its own `SO_REUSEPORT` listener and the connections it accepted) and a **logic shard** (the
//! uids with `logic::shard_of(uid) == id`); they talk through the [`mesh`] in batches.
//!
//! Where to look:
//! - the login path: [`app::session`]; the GPS path: [`app::gps`]; the push path:
//!   [`sidecar::push`] (accept, fan out), `logic::push` (receipts), [`app::push`] (deliver, ack);
//!   app requests: [`app::upstream`]; the app-server port: [`sidecar`];
//! - reading and writing a connection (both ports): [`conn`]; accepting apps: [`app::listener`];
//! - shard state and its tasks: [`shard`]; starting and stopping: [`server`];
//! - configuration and flags: [`config`]; `/metrics`: [`metrics`], [`admin`].

pub mod admin;
pub mod app;
pub mod config;
pub mod conn;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod server;
pub mod shard;
pub mod sidecar;
