//! loadgen: fleets of simulated drivers and passengers against a fleetgate gate, a dispatch
//! app-server on its sidecar, latency histograms and a push audit.
//!
//! Where things are:
//! - [`cli`]: the command line (one subcommand per scenario) and its parsers.
//! - [`plan`]: [`Plan`], everything one run needs; benchmarks build one and call [`run`].
//! - [`run`](mod@run): one run from ramp to report.
//! - [`engine`]: the simulated apps, thread-per-core: one pinned event loop per core owning all
//!   its connections (a slot each, deadlines on a timing wheel, epoll), speaking raw frames.
//! - [`appserver`]: the app-server side (over `client::AppServerConn`): GPS sink, pushes,
//!   and the dispatch rules in [`appserver::dispatch`].
//! - [`audit`]: per (message id, uid): pushed, accepted, shown by apps, receipts.
//! - [`bad`]: peers that misbehave on purpose.
//! - [`geo`]: the `geo` scenario's record of every position sent, and its check of the gate's
//!   GeoPush answers.
//! - [`peers`]: the same fleet against mosquitto, nats-server or perf's ceiling (`--target`).
//! - [`report`]: the JSON object, the table, the live line, .hgrm files.
//! - [`procstat`]: CPU and memory of the gate (and of loadgen) from /proc.

pub mod appserver;
pub mod audit;
pub mod bad;
pub mod cli;
pub mod engine;
pub mod gatemetrics;
pub mod geo;
pub mod peers;
pub mod plan;
pub mod procstat;
pub mod report;
pub mod run;

pub use plan::{BadPlan, Plan, Scenario, Target, DEV_SECRET};
pub use report::Report;
pub use run::{run, Outcome, RunError};
