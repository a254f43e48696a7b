//! Per-shard metrics, written by the owning executor with relaxed atomics and read by the admin
//! endpoint on shard 0. Rendered in the Prometheus text format with a `shard` label on every
//! series, so one can see every shard serving.

use schema::wire::{self, ErrorCode};
use schema::Cmd;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Bucket upper bounds (µs) of the latency histograms.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A fixed-bucket histogram safe to share between threads.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of observations (µs).
    sum: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(us, Relaxed);
    }
}

/// Number of `PUSH_BUCKETS_US` bounds.
const PUSH_BUCKETS: usize = push_bounds().1;

/// Bucket upper bounds (µs) of the push-path histograms: the push path's figures sit well
/// under a millisecond, where `LATENCY_BUCKETS_US` cannot tell 300 µs from 500 µs. Below 2 ms
/// each bucket is at most 10 % wider than the one before (each bound is the previous times
/// 1.1, rounded down, at least one more), so a percentile read from them is within 10 %;
/// above, coarse bounds up to 10 s keep the whole set to under a hundred buckets.
pub const PUSH_BUCKETS_US: [u64; PUSH_BUCKETS] = {
    let (all, n) = push_bounds();
    let mut out = [0u64; PUSH_BUCKETS];
    let mut i = 0;
    while i < n {
        out[i] = all[i];
        i += 1;
    }
    out
};

/// The push bounds in a fixed-size array, and how many there are.
const fn push_bounds() -> ([u64; 128], usize) {
    const COARSE: [u64; 10] =
        [2_500, 3_000, 4_000, 5_000, 10_000, 25_000, 100_000, 500_000, 2_000_000, 10_000_000];
    let mut all = [0u64; 128];
    let mut n = 0;
    let mut b = 10u64;
    while b < 2_000 {
        all[n] = b;
        n += 1;
        let next = b * 11 / 10;
        b = if next > b { next } else { b + 1 };
    }
    all[n] = 2_000;
    n += 1;
    let mut i = 0;
    while i < COARSE.len() {
        all[n] = COARSE[i];
        n += 1;
        i += 1;
    }
    (all, n)
}

/// A histogram on `PUSH_BUCKETS_US`, safe to share between threads (about 700 bytes).
#[derive(Debug)]
pub struct PushHistogram {
    /// Counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; PUSH_BUCKETS + 1],
    /// Sum of observations (µs).
    sum: AtomicU64,
}

impl Default for PushHistogram {
    fn default() -> Self {
        PushHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum: AtomicU64::new(0) }
    }
}

impl PushHistogram {
    /// Records one observation.
    #[inline]
    pub fn observe_us(&self, us: u64) {
        let i = PUSH_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(us, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// Sum of observations so far (µs).
    pub fn sum(&self) -> u64 {
        self.sum.load(Relaxed)
    }
}

/// Counter array indexed by a small dense enum value.
#[derive(Debug)]
pub struct Counters<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Counters<N> {
    /// Adds `n` at `i` (ignored past the end: a value from a newer peer is not a crash).
    #[inline]
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(n, Relaxed);
        }
    }

    /// The value at `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.0.get(i).map_or(0, |c| c.load(Relaxed))
    }
}

/// Kinds of secure-channel failures, as the `kind` label of
/// `fleetgate_channel_errors_total` names them (see `app::secure::error_kind`).
pub const CHANNEL_ERRORS: [&str; 5] = [
    "malformed",      // not a record stream: unknown type, oversized length, truncated at close
    "unexpected",     // a record not allowed now (Data before the handshake, a second Hello)
    "refused",        // the handshake was refused: unknown key, bad handshake, unknown session
    "authentication", // a Data record failed authentication: tampered, replayed, reordered, truncated
    "other",          // nonces exhausted, or a state the gate could not continue from
];

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    /// The shard holds `max_conns_per_shard` connections.
    ConnLimit = 0,
    /// The accept rate limit's queue was full.
    AcceptRate = 1,
    /// The gate is shutting down.
    Shutdown = 2,
}

/// One shard's metrics.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open app connections.
    pub conns_open: AtomicI64,
    /// Logged-in sessions whose connection lives on this shard.
    pub sessions_on_conns: AtomicI64,
    /// Sessions owned by this shard's logic (directory size).
    pub directory_sessions: AtomicI64,
    /// Sessions held with no connection (owned by this shard's logic).
    pub held_sessions: AtomicI64,
    /// Pushes waiting for their ack (or queued for a held session) on this shard's logic.
    pub pushes_in_flight: AtomicI64,
    pub push_targets_waiting: AtomicI64,
    /// Upstream requests waiting for the app-server on this shard's logic.
    pub requests_pending: AtomicI64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused, by `Refusal`.
    pub refused: Counters<3>,
    /// Secure-channel handshakes answered with an Accept: [login (IK), resume (NNpsk0)].
    pub handshakes: Counters<2>,
    /// Secure channels that ended in an error, by `CHANNEL_ERRORS`.
    pub channel_errors: Counters<{ CHANNEL_ERRORS.len() }>,
    /// Connections closed, by `lifecycle::CloseReason::slot`.
    pub closed: Counters<16>,
    /// Frames read, by `Cmd::slot`.
    pub frames_in: Counters<{ Cmd::SLOTS }>,
    /// Frames written, by `Cmd::slot`.
    pub frames_out: Counters<{ Cmd::SLOTS }>,
    /// Bytes read from app connections.
    pub bytes_in: AtomicU64,
    /// Bytes written to app connections.
    pub bytes_out: AtomicU64,
    /// Sends handed to the kernel on the app port: the frames a turn queued for one connection
    /// leave in one send, so deliveries per send shows how well they were gathered.
    pub app_sends: AtomicU64,
    /// Error frames sent, by `ErrorCode` value.
    pub errors: Counters<32>,
    /// GPS points received from drivers.
    pub gps_in: AtomicU64,
    /// GPS frames refused as invalid (a point out of range or missing).
    pub gps_invalid: AtomicU64,
    /// GPS points flushed toward the app-server side.
    pub gps_forwarded: AtomicU64,
    /// GPS points replaced by a newer point before a flush.
    pub gps_coalesced: AtomicU64,
    /// GPS points dropped because a buffer was full.
    pub gps_dropped: AtomicU64,
    /// Mesh batches sent from this shard.
    pub mesh_batches: AtomicU64,
    /// Mesh sends that found the destination inbox full and were retried.
    pub mesh_full: AtomicU64,
    /// App ring receives re-armed after they ended (the buffer ring ran dry, or the kernel
    /// ended them after data).
    pub ring_rearms: AtomicU64,
    /// Time from a mesh batch's send to its processing here.
    pub mesh_hop_us: Histogram,
    /// A push's sidecar read to one of its deliveries handed to the kernel on an app connection.
    pub push_delivery_us: PushHistogram,
    /// An app's PushAck read to its receipt handed to the kernel on an app-server connection.
    pub push_receipt_us: PushHistogram,
    /// Time from a login frame's arrival to the session answer being queued.
    pub login_us: Histogram,
    /// A GeoQuery's or GeoPush's frame read to its answer queued on the sidecar connection
    /// (every logic shard, and in cluster mode every node, asked and merged; a GeoPush fanned
    /// out).
    pub geo_answer_us: PushHistogram,
    /// Sessions created by login (answered).
    pub logins: AtomicU64,
    /// Sessions resumed on a connection of this shard.
    pub resumes: AtomicU64,
    /// Of those, sessions whose previous connection was on another shard.
    pub resumes_moved: AtomicU64,
    /// Pushes accepted from app-servers.
    pub pushes: AtomicU64,
    /// (message id, uid) pairs accepted.
    pub push_targets: AtomicU64,
    /// PushDelivery frames written to apps.
    pub push_deliveries: AtomicU64,
    /// PushAck frames from apps.
    pub push_acks: AtomicU64,
    /// PushAcks refused because their message id was not the push's sent under their
    /// sequence-id.
    pub push_acks_mismatched: AtomicU64,
    /// Pushes refused Overloaded: no room for their pairs under the bound on pushes in flight.
    pub pushes_refused: AtomicU64,
    /// Receipts sent to app-servers.
    pub receipts_sent: AtomicU64,
    /// Receipts dropped from a full backlog while no app-server was connected.
    pub receipts_dropped: AtomicU64,
    /// Receipts sent to app-servers, by `wire::Outcome` value.
    pub receipts_by_outcome: Counters<16>,
    /// GPS points sent to app-servers.
    pub gps_to_app_server: AtomicU64,
    /// Bytes queued for writing on this shard's connections.
    pub out_queue_bytes: AtomicI64,
}

fn counter(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
}

fn gauge(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// Renders every shard's metrics; `mesh_depth(i)` gives shard i's inbox depth.
pub fn render(shards: &[ShardMetrics], mesh_depth: impl Fn(usize) -> usize) -> String {
    let mut o = String::with_capacity(16 * 1024);
    macro_rules! scalar {
        ($kind:ident, $name:literal, $help:literal, $field:ident) => {
            $kind(&mut o, concat!("fleetgate_", $name), $help);
            for (i, s) in shards.iter().enumerate() {
                let _ = writeln!(
                    o,
                    concat!("fleetgate_", $name, "{{shard=\"{}\"}} {}"),
                    i,
                    s.$field.load(Relaxed)
                );
            }
        };
    }
    scalar!(gauge, "connections", "Open app connections.", conns_open);
    scalar!(
        gauge,
        "sessions",
        "Logged-in sessions by the shard holding their connection.",
        sessions_on_conns
    );
    scalar!(gauge, "directory_sessions", "Sessions owned by the shard's logic.", directory_sessions);
    scalar!(gauge, "held_sessions", "Sessions held after their connection dropped.", held_sessions);
    scalar!(gauge, "pushes_in_flight", "Pushes waiting for an ack or a resume.", pushes_in_flight);
    scalar!(
        gauge,
        "push_targets_waiting",
        "Targets of accepted pushes not yet delivered: a large fan-out is delivered a bounded slice per turn.",
        push_targets_waiting
    );
    scalar!(gauge, "requests_pending", "App requests waiting for the app-server.", requests_pending);
    scalar!(counter, "connections_accepted_total", "Connections accepted.", accepted);
    scalar!(counter, "bytes_in_total", "Bytes read from apps.", bytes_in);
    scalar!(counter, "bytes_out_total", "Bytes written to apps.", bytes_out);
    scalar!(
        counter,
        "app_sends_total",
        "Sends handed to the kernel on the app port (a turn's frames for one connection leave in one send).",
        app_sends
    );
    scalar!(counter, "gps_points_in_total", "GPS points received.", gps_in);
    scalar!(
        counter,
        "gps_invalid_total",
        "GPS frames refused with InvalidField (a point out of range or missing).",
        gps_invalid
    );
    scalar!(
        counter,
        "gps_points_forwarded_total",
        "GPS points flushed to the app-server side.",
        gps_forwarded
    );
    scalar!(counter, "gps_points_coalesced_total", "GPS points replaced before a flush.", gps_coalesced);
    scalar!(counter, "gps_points_dropped_total", "GPS points dropped on a full buffer.", gps_dropped);
    scalar!(counter, "mesh_batches_total", "Cross-shard batches sent.", mesh_batches);
    scalar!(counter, "mesh_full_total", "Cross-shard sends retried on a full inbox.", mesh_full);
    scalar!(
        counter,
        "ring_rearms_total",
        "App ring receives re-armed after they ended (buffers ran dry, or the kernel ended them after data).",
        ring_rearms
    );
    scalar!(gauge, "out_queue_bytes", "Bytes waiting to be written to apps.", out_queue_bytes);
    scalar!(counter, "logins_total", "Sessions created by login.", logins);
    scalar!(counter, "resumes_total", "Sessions resumed on this shard.", resumes);
    scalar!(counter, "resumes_moved_total", "Resumed sessions that came from another shard.", resumes_moved);
    scalar!(counter, "pushes_total", "Pushes accepted from app-servers.", pushes);
    scalar!(counter, "push_targets_total", "(message id, uid) pairs accepted.", push_targets);
    scalar!(counter, "push_deliveries_total", "Push deliveries written to apps.", push_deliveries);
    scalar!(counter, "push_acks_total", "Push acks from apps.", push_acks);
    scalar!(
        counter,
        "push_acks_mismatched_total",
        "Push acks refused with InvalidField: their message id was not the push's sent under their sequence-id.",
        push_acks_mismatched
    );
    scalar!(counter, "receipts_sent_total", "Receipts sent to app-servers.", receipts_sent);
    scalar!(
        counter,
        "receipts_dropped_total",
        "Receipts dropped with no app-server connected.",
        receipts_dropped
    );
    scalar!(counter, "gps_points_to_app_server_total", "GPS points sent to app-servers.", gps_to_app_server);

    gauge(&mut o, "fleetgate_mesh_queue_depth", "Batches waiting in the shard's inbox.");
    for i in 0..shards.len() {
        let _ = writeln!(o, "fleetgate_mesh_queue_depth{{shard=\"{i}\"}} {}", mesh_depth(i));
    }
    counter(
        &mut o,
        "fleetgate_receipts_total",
        "Receipts sent to app-servers, by outcome (docs/PROTOCOL.md, Outcome).",
    );
    for (i, s) in shards.iter().enumerate() {
        // Every outcome a gate sends, zeros included, so a dashboard's series exist from the start
        // (Unknown and GateLost are never sent by a gate).
        for v in 0..16u8 {
            let outcome = wire::Outcome(v);
            if outcome == wire::Outcome::Unknown || outcome == wire::Outcome::GateLost {
                continue;
            }
            if let Some(name) = outcome.variant_name() {
                let n = s.receipts_by_outcome.get(v as usize);
                let _ = writeln!(o, "fleetgate_receipts_total{{shard=\"{i}\",outcome=\"{name}\"}} {n}");
            }
        }
    }
    counter(&mut o, "fleetgate_connections_refused_total", "Connections refused at accept, by reason.");
    for (i, s) in shards.iter().enumerate() {
        for (r, name) in [
            (Refusal::ConnLimit, "conn_limit"),
            (Refusal::AcceptRate, "accept_rate"),
            (Refusal::Shutdown, "shutdown"),
        ] {
            let _ = writeln!(
                o,
                "fleetgate_connections_refused_total{{shard=\"{i}\",reason=\"{name}\"}} {}",
                s.refused.get(r as usize)
            );
        }
    }
    counter(
        &mut o,
        "fleetgate_pushes_refused_total",
        "Pushes refused by the gate's bounds, by reason (overloaded: no room under limits.max_pushes_in_flight_per_shard).",
    );
    for (i, s) in shards.iter().enumerate() {
        let n = s.pushes_refused.load(Relaxed);
        let _ = writeln!(o, "fleetgate_pushes_refused_total{{shard=\"{i}\",reason=\"overloaded\"}} {n}");
    }
    counter(&mut o, "fleetgate_handshakes_total", "Secure-channel handshakes accepted, by kind.");
    for (i, s) in shards.iter().enumerate() {
        for (k, name) in ["login", "resume"].iter().enumerate() {
            let _ = writeln!(
                o,
                "fleetgate_handshakes_total{{shard=\"{i}\",kind=\"{name}\"}} {}",
                s.handshakes.get(k)
            );
        }
    }
    counter(
        &mut o,
        "fleetgate_channel_errors_total",
        "Secure channels closed for an error, by kind (each also logged with its reason).",
    );
    for (i, s) in shards.iter().enumerate() {
        for (k, name) in CHANNEL_ERRORS.iter().enumerate() {
            let _ = writeln!(
                o,
                "fleetgate_channel_errors_total{{shard=\"{i}\",kind=\"{name}\"}} {}",
                s.channel_errors.get(k)
            );
        }
    }
    counter(&mut o, "fleetgate_connections_closed_total", "Connections closed, by reason.");
    for (i, s) in shards.iter().enumerate() {
        for v in 0..16u8 {
            let n = s.closed.get(v as usize);
            if n > 0 {
                let name = crate::lifecycle::CloseReason::slot_label(v as usize);
                let _ =
                    writeln!(o, "fleetgate_connections_closed_total{{shard=\"{i}\",reason=\"{name}\"}} {n}");
            }
        }
    }
    for (metric, help, pick) in [
        ("fleetgate_frames_in_total", "Frames read, by cmd.", 0),
        ("fleetgate_frames_out_total", "Frames written, by cmd.", 1),
    ] {
        counter(&mut o, metric, help);
        for (i, s) in shards.iter().enumerate() {
            for cmd in Cmd::ALL {
                let c = if pick == 0 { &s.frames_in } else { &s.frames_out };
                let n = c.get(cmd.slot());
                if n > 0 {
                    let _ = writeln!(o, "{metric}{{shard=\"{i}\",cmd=\"{}\"}} {n}", cmd.name());
                }
            }
        }
    }
    counter(&mut o, "fleetgate_errors_total", "Error frames sent, by code.");
    for (i, s) in shards.iter().enumerate() {
        for v in 0..32u16 {
            let n = s.errors.get(v as usize);
            if n > 0 {
                let name = ErrorCode(v).variant_name().unwrap_or("other");
                let _ = writeln!(o, "fleetgate_errors_total{{shard=\"{i}\",code=\"{name}\"}} {n}");
            }
        }
    }
    for (metric, help, pick) in [
        ("fleetgate_mesh_hop_us", "Cross-shard batch latency, send to processing, µs.", 0),
        ("fleetgate_login_us", "Login frame to session answer, µs.", 1),
    ] {
        histogram(&mut o, metric, help, shards, &LATENCY_BUCKETS_US, |s| {
            let h = if pick == 0 { &s.mesh_hop_us } else { &s.login_us };
            (&h.buckets[..], &h.sum)
        });
    }
    for (metric, help, pick) in [
        (
            "fleetgate_push_delivery_us",
            "Push frame read from the app-server to a delivery's last byte written to the app, µs.",
            0,
        ),
        (
            "fleetgate_push_receipt_us",
            "Push ack read from the app to its receipt's last byte written to the app-server, µs.",
            1,
        ),
        (
            "fleetgate_geo_answer_us",
            "GeoQuery or GeoPush frame read from the app-server to its answer queued, µs.",
            2,
        ),
    ] {
        histogram(&mut o, metric, help, shards, &PUSH_BUCKETS_US, |s| {
            let h = match pick {
                0 => &s.push_delivery_us,
                1 => &s.push_receipt_us,
                _ => &s.geo_answer_us,
            };
            (&h.buckets[..], &h.sum)
        });
    }
    o
}

/// Renders one histogram per shard: `buckets(shard)` gives its counts (one per bound, then
/// +Inf) and its sum.
fn histogram(
    o: &mut String,
    metric: &str,
    help: &str,
    shards: &[ShardMetrics],
    bounds: &[u64],
    buckets: impl Fn(&ShardMetrics) -> (&[AtomicU64], &AtomicU64),
) {
    let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} histogram");
    for (i, s) in shards.iter().enumerate() {
        let (counts, sum) = buckets(s);
        let mut cum = 0;
        for (b, le) in bounds.iter().enumerate() {
            cum += counts[b].load(Relaxed);
            let _ = writeln!(o, "{metric}_bucket{{shard=\"{i}\",le=\"{le}\"}} {cum}");
        }
        cum += counts[bounds.len()].load(Relaxed);
        let _ = writeln!(o, "{metric}_bucket{{shard=\"{i}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(o, "{metric}_sum{{shard=\"{i}\"}} {}", sum.load(Relaxed));
        let _ = writeln!(o, "{metric}_count{{shard=\"{i}\"}} {cum}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_buckets_are_fine_below_2ms() {
        assert_eq!(PUSH_BUCKETS_US[0], 10);
        for w in PUSH_BUCKETS_US.windows(2) {
            assert!(w[0] < w[1], "{w:?}");
            if w[1] <= 2_000 {
                assert!(w[1] * 10 <= w[0] * 11, "bucket {w:?} wider than 10 %");
            }
        }
        assert!(PUSH_BUCKETS_US.contains(&2_000));
        const { assert!(PUSH_BUCKETS < 100) };
    }

    #[test]
    fn push_histogram_observes_into_its_bucket() {
        let h = PushHistogram::default();
        h.observe_us(10);
        h.observe_us(11);
        h.observe_us(u64::MAX / 2);
        assert_eq!(h.buckets[0].load(Relaxed), 1);
        assert_eq!(h.buckets[1].load(Relaxed), 1);
        assert_eq!(h.buckets[PUSH_BUCKETS].load(Relaxed), 1);
        let m = [ShardMetrics::default()];
        m[0].push_delivery_us.observe_us(300);
        let text = render(&m, |_| 0);
        assert!(text.contains("fleetgate_push_delivery_us_count{shard=\"0\"} 1"));
        assert!(text.contains("fleetgate_push_delivery_us_sum{shard=\"0\"} 300"));
        assert!(text.contains("fleetgate_push_receipt_us_count{shard=\"0\"} 0"));
    }

    #[test]
    fn receipts_are_counted_by_outcome_and_every_sent_outcome_has_a_series() {
        let m = [ShardMetrics::default()];
        m[0].receipts_by_outcome.add(wire::Outcome::Delivered.0 as usize, 2);
        let text = render(&m, |_| 0);
        assert!(text.contains("fleetgate_receipts_total{shard=\"0\",outcome=\"Delivered\"} 2"), "{text}");
        assert!(text.contains("fleetgate_receipts_total{shard=\"0\",outcome=\"TtlExpired\"} 0"));
        assert!(text.contains("outcome=\"DirectoryUnavailable\"} 0"));
        assert!(!text.contains("outcome=\"Unknown\"") && !text.contains("outcome=\"GateLost\""));
    }
}
