//! perf holds fleetgate's benchmark scenarios (`bench`, in [`bench`]), the peers they are measured against (mosquitto,
//! nats-server, and the machine's ceiling server), and the results they produce.
//!
//! It never ships inside the gate and nothing in the product depends on it; it never tunes the
//! machine it measures (no sysctls, no limits raised); and it never reports a CPU figure without
//! the offered rate it was measured at, since the cost per message falls as the rate rises.

pub mod bench;
pub mod ceiling;
