//! What a run reports: the [`Report`] (one JSON object with `--json`), the table for people,
//! the live line each second, and .hgrm percentile files for plotting.
//!
//! The report's types read back from its JSON too (perf reads loadgen's output as a
//! [`Report`]). Reading is strict: every field must be there, the `Option` ones included (they
//! are written as `null` when loadgen could not measure them), so a report from a loadgen
//! whose fields were renamed fails to read, naming the missing field, instead of reading 0 or
//! nothing.

use crate::audit::AuditSummary;
use crate::bad::BadSummary;
use crate::engine::stats::{Hists, Snapshot};
use crate::plan::Scenario;
use crate::procstat::ProcSample;
use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

/// Reads an `Option` field that must be present, `null` or not: serde takes a missing
/// `Option` field for `None` unless told otherwise, which would read a renamed field as "not
/// measured" without a word.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::deserialize(d)
}

/// Percentiles of one latency histogram, µs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// The percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// The `geo` scenario: GeoPush orders and the check of every answer.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct GeoReport {
    /// GeoPush requests answered.
    pub queries: u64,
    /// Drivers chosen, over every answer.
    pub chosen: u64,
    /// Chosen drivers that could not be chosen (not a position they sent, or past the radius).
    pub wrong: u64,
    /// Drivers that had to be chosen and were left out.
    pub missed: u64,
    /// Answers whose order had more drivers surely in range than K.
    pub over_k: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Request to answer, µs.
    pub latency_us: Latency,
}

/// Apps and sessions.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Connections {
    /// Drivers simulated.
    pub drivers: u32,
    /// Passengers simulated.
    pub passengers: u32,
    /// Sessions up when the window started.
    pub live_at_start: u64,
    /// Sessions up when the window ended.
    pub live_at_end: u64,
    /// Seconds from the first connect until every session was up (or the ramp gave up).
    pub ramp_s: f64,
    /// First logins.
    pub logins: u64,
    /// Login latency (first connect → session up).
    pub login_latency_us: Latency,
}

/// GPS ingest.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Gps {
    /// Points sent in the window.
    pub sent: u64,
    /// Frames sent in the window.
    pub frames: u64,
    /// Points per second over the window.
    pub rate_per_s: f64,
    /// Points the app-server received (coalesced by the gate: latest per driver per flush).
    pub forwarded: u64,
    /// Gate CPU µs over the window per point sent in it: all of the gate's CPU, whatever it
    /// did. The cost of GPS alone only in the `gps` scenario, where GPS is the only traffic; in
    /// the others it also pays for pushes, requests, logins and resumes.
    #[serde(deserialize_with = "present")]
    pub gate_cpu_us_per_point: Option<f64>,
    /// Sends more than a second behind their schedule: the driver's schedule starts afresh
    /// rather than burst (these are in `late` too).
    pub behind: u64,
    /// Sends that left more than 10 ms after their schedule
    /// ([`GPS_LATE`](crate::engine::driver::GPS_LATE)): loadgen did not offer the rate it was
    /// asked for, on time.
    pub late: u64,
}

/// Pushes: the audit (per target uid) and the latency.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Push {
    /// Push frames sent.
    pub pushes: u64,
    /// Pairs named.
    pub sent: u64,
    /// Pairs the gate accepted.
    pub accepted: u64,
    /// Pairs of refused pushes.
    pub refused: u64,
    /// Pairs whose push answer was lost with its connection.
    pub unanswered: u64,
    /// Delivered receipts.
    pub delivered: u64,
    /// Other real receipts.
    pub unreachable: u64,
    /// Pairs the client resolved as GateLost.
    pub gate_lost: u64,
    /// Accepted pairs without a real receipt.
    pub lost: u64,
    /// Pushes an app showed twice after its own de-duplication.
    pub duplicates: u64,
    /// Pushes apps showed (first arrivals).
    pub received: u64,
    /// Deliveries apps had seen before (acked again, not shown).
    pub redelivered: u64,
    /// Delivered receipts whose app never showed the push.
    pub delivered_unseen: u64,
    /// Real receipts beyond a push's accepted targets.
    pub extra_receipts: u64,
    /// Receipts by outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// App-server send → app receive (first arrivals, no redelivery flag).
    pub latency_us: Latency,
    /// First arrivals per second over the window.
    pub deliveries_per_s: f64,
    /// With several gate nodes: `latency_us` split by the node holding each receiving app's
    /// session, in `--gate`'s order (the node of `--sidecar` gives same-node figures, the
    /// others cross-node); empty with one node.
    #[serde(default)]
    pub by_node: Vec<NodePush>,
    /// The gate's own part of each delivery over the window, from its
    /// `fleetgate_push_delivery_us` (sidecar read → delivery written to the app). Absent when
    /// the target has no such metric (a peer) or its admin port did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_latency_us: Option<GateLatency>,
    /// The gate's ack read → receipt written to the app-server over the window, from its
    /// `fleetgate_push_receipt_us`; absent as `gate_latency_us` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_latency_us: Option<ReceiptLatency>,
    /// `latency_us` split where the delivery reached the app's socket (the kernel's receive
    /// stamp of its last segment): app-server send → in the socket. Absent when no delivery
    /// was stamped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_us: Option<Latency>,
    /// The other part: in the socket → loadgen read and decoded it, loadgen's own wait (its
    /// loop busy with other connections, or not yet scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadgen_wait_us: Option<Latency>,
}

/// Percentiles of the gate's delivery histogram over the window, µs (read from buckets at
/// most 10 % wide below 2 ms, interpolated inside them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateLatency {
    /// Observations in the window.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
}

/// Percentiles of the gate's receipt histogram over the window, µs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReceiptLatency {
    /// Observations in the window.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

impl Push {
    /// Fills the gate-side figures from the gate's scrapes at the window's start and end.
    pub fn set_gate_side(&mut self, start: Option<&str>, end: Option<&str>) {
        use crate::gatemetrics::{buckets, count, difference, quantile, DELIVERY, RECEIPT};
        let window = |metric| difference(&buckets(start?, metric)?, &buckets(end?, metric)?);
        self.gate_latency_us = window(DELIVERY).and_then(|d| {
            Some(GateLatency {
                count: count(&d),
                p50: quantile(&d, 0.50)?,
                p99: quantile(&d, 0.99)?,
                p999: quantile(&d, 0.999)?,
            })
        });
        self.receipt_latency_us = window(RECEIPT).and_then(|d| {
            Some(ReceiptLatency { count: count(&d), p50: quantile(&d, 0.50)?, p99: quantile(&d, 0.99)? })
        });
    }
}

/// One gate node's share of the push latency.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NodePush {
    /// The node's app address, as given in `--gate`.
    pub gate: String,
    /// App-server send → app receive for apps whose session was on this node.
    pub latency_us: Latency,
}

/// Business requests (PlaceOrder, GrabOrder).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Sent.
    pub sent: u64,
    /// Answered with a Reply.
    pub answered: u64,
    /// Answered with an Error.
    pub errors: u64,
    /// Unanswered when their connection dropped.
    pub cut: u64,
    /// Sent → answered.
    pub latency_us: Latency,
}

/// The order flow.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Orders {
    /// Orders placed (passengers' view).
    pub placed: u64,
    /// Orders no driver could be offered.
    pub no_driver: u64,
    /// "Taken" statuses passengers received.
    pub taken_seen: u64,
    /// Grabs that won.
    pub grab_won: u64,
    /// Grabs too late.
    pub grab_lost: u64,
    /// The app-server's view.
    pub dispatch: crate::appserver::dispatch::DispatchStats,
}

/// Drops and how sessions came back.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Reconnect {
    /// Sessions back after a drop.
    pub count: u64,
    /// Back by resume.
    pub resumed: u64,
    /// Back by a fresh login.
    pub relogin: u64,
    /// Of `resumed`, the resumes the gate accepted on another node than the one that held the
    /// session (several nodes in `--gate`; every resume with `--move`).
    #[serde(default)]
    pub moved: u64,
    /// Resumes the gate refused.
    pub resume_refused: u64,
    /// Drops loadgen caused.
    pub drops_caused: u64,
    /// Drops the gate or network caused.
    pub drops_seen: u64,
    /// Drop → session back.
    pub latency_us: Latency,
}

/// The storm.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Storm {
    /// Sessions dropped at once.
    pub dropped: u64,
    /// Of those, back.
    pub back: u64,
    /// Storm → last one back, ms; `None` when not all came back (or no storm).
    #[serde(deserialize_with = "present")]
    pub all_back_ms: Option<f64>,
    /// Back by resume.
    pub resumed: u64,
    /// Back by login.
    pub relogin: u64,
    /// Of `resumed`, back on another node than the one that held the session.
    #[serde(default)]
    pub moved: u64,
}

/// Fresh sessions, the handshake's view of them.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Handshake {
    /// The apps spoke the secure channel (a Noise handshake per login).
    pub secure: bool,
    /// Connect → Session answer of each first login, µs (the same figures as
    /// `connections.login_latency_us`).
    pub latency_us: Latency,
}

/// Idle sessions.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Idle {
    /// Sessions up at the end of the window.
    pub sessions: u64,
    /// (gate RSS at the end of the window − before any connection) / sessions.
    #[serde(deserialize_with = "present")]
    pub bytes_per_session: Option<f64>,
}

/// The gate process.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Gate {
    /// Its pid, if found.
    #[serde(deserialize_with = "present")]
    pub pid: Option<u32>,
    /// CPU seconds over the window.
    #[serde(deserialize_with = "present")]
    pub cpu_s: Option<f64>,
    /// CPU over the window, % of one core.
    #[serde(deserialize_with = "present")]
    pub cpu_percent: Option<f64>,
    /// RSS at the end of the window.
    #[serde(deserialize_with = "present")]
    pub rss_bytes: Option<u64>,
    /// RSS before loadgen connected anything.
    #[serde(deserialize_with = "present")]
    pub rss_before_bytes: Option<u64>,
    /// Largest RSS seen during the run.
    #[serde(deserialize_with = "present")]
    pub rss_max_bytes: Option<u64>,
    /// Gate CPU over the ramp (scheduler ns) ÷ sessions logged in by it: a handshake (on the
    /// secure channel) and a login each, TCP setup included.
    #[serde(default)]
    pub cpu_us_per_handshake: Option<f64>,
    /// Gate CPU from a storm's drop until every dropped session is back (scheduler ns, looked
    /// at every 50 ms) ÷ sessions back: a resume each, TCP setup included.
    #[serde(default)]
    pub cpu_us_per_resume: Option<f64>,
}

impl Gate {
    /// The process `pid` over the window: `before` any connection, `g0` and `g1` at the
    /// window's ends, `rss_max` the largest RSS seen so far; CPU rounded to the ms.
    pub fn over_window(
        pid: Option<u32>,
        before: Option<ProcSample>,
        g0: Option<ProcSample>,
        g1: Option<ProcSample>,
        rss_max: Option<u64>,
        window: Duration,
    ) -> Gate {
        let cpu_s = match (g0, g1) {
            (Some(a), Some(b)) => Some(((b.cpu_s - a.cpu_s) * 1000.0).round() / 1000.0),
            _ => None,
        };
        Gate {
            pid,
            cpu_s,
            cpu_percent: cpu_s.map(|c| (c / window.as_secs_f64().max(1e-9) * 1000.0).round() / 10.0),
            rss_bytes: g1.map(|s| s.rss_bytes),
            rss_before_bytes: before.map(|s| s.rss_bytes),
            rss_max_bytes: rss_max.max(g1.map(|s| s.rss_bytes)),
            cpu_us_per_handshake: None,
            cpu_us_per_resume: None,
        }
    }
}

/// loadgen itself.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Loadgen {
    /// CPU seconds over the whole run.
    pub cpu_s: f64,
    /// Its own RSS at the end of the window.
    #[serde(deserialize_with = "present")]
    pub rss_bytes: Option<u64>,
    /// Cores its event loops ran on.
    pub cores: Vec<usize>,
    /// CPU seconds of the whole process in the window (the app-server side included).
    #[serde(deserialize_with = "present")]
    pub window_cpu_s: Option<f64>,
    /// CPU seconds of the event loops' threads in the window: the simulated apps alone.
    #[serde(deserialize_with = "present")]
    pub loops_window_cpu_s: Option<f64>,
    /// `loops_window_cpu_s` per GPS frame sent in the window, µs: what one send cost loadgen's
    /// loops (the kernel's loopback work for the receiver included, see `perf/examples/send_floor.rs`).
    #[serde(deserialize_with = "present")]
    pub loops_us_per_send: Option<f64>,
}

impl Loadgen {
    /// The window's figures from the CPU read at its ends (`None` where one was not read).
    pub fn set_window(&mut self, cpu: (f64, f64), loops: (Option<f64>, Option<f64>), frames: u64) {
        self.window_cpu_s = Some(cpu.1 - cpu.0);
        self.loops_window_cpu_s = match loops {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        self.loops_us_per_send =
            self.loops_window_cpu_s.filter(|_| frames > 0).map(|s| s * 1e6 / frames as f64);
    }
}

/// The app-server side's own counts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AppServerReport {
    /// It ran.
    pub running: bool,
    /// GPS points received.
    pub gps_points: u64,
    /// Upstream requests answered.
    pub upstream: u64,
    /// Pushes refused by the gate.
    pub push_refused: u64,
    /// Pushes that could not be sent.
    pub push_failed: u64,
    /// Replies that could not be sent.
    pub reply_failed: u64,
    /// Unreachable events.
    pub unreachable_events: u64,
    /// Sidecar connections lost.
    pub connections_lost: u64,
    /// Every sidecar connection was lost before the end.
    pub gate_lost: bool,
}

/// Everything a run found.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The scenario.
    pub scenario: Scenario,
    /// The server driven (`--target`): `gate`, `mqtt`, `nats` or `ceiling` (empty in a report
    /// written before loadgen said it).
    #[serde(default)]
    pub target: String,
    /// The target's connections spoke TLS (`--tls-ca`, MQTT only). The gate's own secure
    /// channel is `handshake.secure`.
    #[serde(default)]
    pub tls: bool,
    /// The audit is clean: no push lost or shown twice.
    pub ok: bool,
    /// Length of the measured window, s.
    pub window_s: f64,
    /// Apps and sessions.
    pub connections: Connections,
    /// GPS.
    pub gps: Gps,
    /// Pushes.
    pub push: Push,
    /// Business requests.
    pub request: Request,
    /// Orders.
    pub orders: Orders,
    /// Reconnects.
    pub reconnect: Reconnect,
    /// The storm.
    pub storm: Storm,
    /// Fresh sessions: connect → Session answer (on the secure channel a handshake each).
    #[serde(default)]
    pub handshake: Handshake,
    /// Idle memory.
    pub idle: Idle,
    /// The gate process.
    pub gate: Gate,
    /// loadgen itself.
    pub loadgen: Loadgen,
    /// The app-server side.
    pub appserver: AppServerReport,
    /// The `geo` scenario (zeros in the others).
    #[serde(default)]
    pub geo: GeoReport,
    /// Bad peers: `None` but in the `bad` scenario, the one that has them. Every report still
    /// writes it (`null`), so reading requires it like the other fields.
    #[serde(deserialize_with = "present")]
    pub bad: Option<BadSummary>,
    /// Failures (not chaos loadgen caused, not backpressure the gate asked for).
    pub errors: u64,
    /// Failures and other notable events by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// Every app counter over the whole run.
    pub counters: Snapshot,
}

impl Report {
    /// Fills the push section from the audit.
    pub fn set_audit(&mut self, a: &AuditSummary) {
        let p = &mut self.push;
        p.pushes = a.pushes;
        p.sent = a.sent;
        p.accepted = a.accepted;
        p.refused = a.refused;
        p.unanswered = a.unanswered;
        p.delivered = a.delivered;
        p.unreachable = a.unreachable;
        p.gate_lost = a.gate_lost;
        p.lost = a.lost;
        p.extra_receipts = a.extra_receipts;
    }

    /// Sets the gate section, and from its CPU the gate CPU per GPS point.
    pub fn set_gate(&mut self, gate: Gate) {
        if let (Some(cpu), true) = (gate.cpu_s, self.gps.sent > 0) {
            self.gps.gate_cpu_us_per_point = Some(cpu * 1e6 / self.gps.sent as f64);
        }
        self.gate = gate;
    }

    /// Fills the error kinds and total from the counters.
    pub fn set_errors(&mut self, c: &Snapshot) {
        let k = &mut self.error_kinds;
        for (kind, n) in [
            ("connect", c.err_connect),
            ("login", c.err_login),
            ("session_timeout", c.err_session_timeout),
            ("protocol", c.err_protocol),
            ("unexpected", c.err_unexpected),
            ("write", c.err_write),
            ("request", c.request_errors),
            ("overloaded_retried", c.overloaded),
            ("resume_refused", c.resume_refused),
            ("go_aways", c.go_aways),
        ] {
            k.insert(kind.to_owned(), n);
        }
        self.errors = c.errors();
    }

    /// The table for people.
    pub fn table(&self, h: &Hists) -> String {
        let mut s = String::new();
        let r = self;
        let against = match (r.target.as_str(), r.tls) {
            ("" | "gate", _) => String::new(),
            (t, false) => format!(" against {t}"),
            (t, true) => format!(" against {t} over TLS"),
        };
        let _ = writeln!(
            s,
            "loadgen {}{against}: {:.1} s window, {} drivers, {} passengers, cores {:?}, ramp {:.1} s",
            r.scenario.name(),
            r.window_s,
            r.connections.drivers,
            r.connections.passengers,
            r.loadgen.cores,
            r.connections.ramp_s
        );
        let _ = writeln!(
            s,
            "sessions     {} up at start, {} at end; {} first logins",
            r.connections.live_at_start, r.connections.live_at_end, r.connections.logins
        );
        if r.gps.sent > 0 || r.gps.forwarded > 0 {
            let _ = writeln!(
                s,
                "gps          {} pts/s ({} points in {} frames), forwarded to the app-server {}; \
             {} sends over 10 ms late{}",
                num(r.gps.rate_per_s as u64),
                num(r.gps.sent),
                num(r.gps.frames),
                num(r.gps.forwarded),
                num(r.gps.late),
                if r.gps.behind > 0 {
                    format!(" ({} over 1 s behind, rescheduled)", num(r.gps.behind))
                } else {
                    String::new()
                }
            );
        }
        let p = &r.push;
        if p.pushes > 0 || p.received > 0 {
            let _ = writeln!(
                s,
                "push         {} pushes: sent {} accepted {} delivered {} unreachable {} lost {} duplicates {}; \
                 received {} ({:.0}/s), redelivered {}",
                num(p.pushes),
                num(p.sent),
                num(p.accepted),
                num(p.delivered),
                num(p.unreachable),
                num(p.lost),
                num(p.duplicates),
                num(p.received),
                p.deliveries_per_s,
                num(p.redelivered)
            );
        }
        if p.gate_latency_us.is_some() || p.receipt_latency_us.is_some() {
            let mut line = "push (gate)  ".to_owned();
            if let Some(g) = p.gate_latency_us {
                let _ = write!(
                    line,
                    "read to delivery written p50 {} p99 {} p99.9 {} µs ({})",
                    g.p50,
                    g.p99,
                    g.p999,
                    num(g.count)
                );
            }
            if let Some(r) = p.receipt_latency_us {
                if p.gate_latency_us.is_some() {
                    line.push_str("; ");
                }
                let _ =
                    write!(line, "ack to receipt written p50 {} p99 {} µs ({})", r.p50, r.p99, num(r.count));
            }
            let _ = writeln!(s, "{line}");
        }
        if let (Some(a), Some(w)) = (p.arrival_us, p.loadgen_wait_us) {
            let _ = writeln!(
                s,
                "push (split) send to the app's socket p50 {} p99 {} µs; in the socket to decoded (loadgen) p50 {} p99 {} µs",
                a.p50, a.p99, w.p50, w.p99
            );
        }
        let outcomes: Vec<String> =
            p.outcomes.iter().filter(|(_, &n)| n > 0).map(|(k, n)| format!("{k} {}", num(*n))).collect();
        if !outcomes.is_empty() {
            let _ = writeln!(s, "receipts     {}", outcomes.join(", "));
        }
        if r.request.sent > 0 {
            let o = &r.orders;
            let _ = writeln!(
                s,
                "orders       placed {} no-driver {} taken-seen {}; grabs won {} lost {}; requests {} answered {} errors {} cut {}",
                num(o.placed),
                num(o.no_driver),
                num(o.taken_seen),
                num(o.grab_won),
                num(o.grab_lost),
                num(r.request.sent),
                num(r.request.answered),
                num(r.request.errors),
                num(r.request.cut)
            );
        }
        let rc = &r.reconnect;
        if rc.count > 0 || rc.drops_caused > 0 || rc.drops_seen > 0 {
            let _ = writeln!(
                s,
                "reconnects   {} back ({} resumed, {} of them on another node, {} by login, {} resumes refused); drops: {} caused, {} by the gate",
                num(rc.count),
                num(rc.resumed),
                num(rc.moved),
                num(rc.relogin),
                num(rc.resume_refused),
                num(rc.drops_caused),
                num(rc.drops_seen)
            );
        }
        if r.storm.dropped > 0 {
            let _ = writeln!(
                s,
                "storm        {} dropped, {} back ({} resumed, {} of them on another node, {} by login), all back in {}",
                num(r.storm.dropped),
                num(r.storm.back),
                num(r.storm.resumed),
                num(r.storm.moved),
                num(r.storm.relogin),
                r.storm.all_back_ms.map_or("— (not all back)".to_owned(), |ms| format!("{ms:.0} ms"))
            );
        }
        if r.gate.cpu_us_per_handshake.is_some() || r.gate.cpu_us_per_resume.is_some() {
            let us = |v: Option<f64>| v.map_or("—".to_owned(), |u| format!("{u:.1} µs"));
            let _ = writeln!(
                s,
                "gate cost    {} per {} over the ramp, {} per resume over the storm (scheduler ns, TCP setup included)",
                us(r.gate.cpu_us_per_handshake),
                if r.handshake.secure { "handshake + login" } else { "login" },
                us(r.gate.cpu_us_per_resume),
            );
        }
        let _ = writeln!(s, "latency µs        count       p50       p90       p99      p999       max");
        // With several nodes, push latency again per node of the receiving app ("push n1": the
        // second node in --gate).
        let by_node = h.push_by_node.iter().enumerate().map(|(i, hist)| (format!("push n{i}"), hist));
        let rows =
            [("push", &h.push)].into_iter().map(|(n, hist)| (n.to_owned(), hist)).chain(by_node).chain(
                [("request", &h.request), ("reconnect", &h.reconnect), ("login", &h.login)]
                    .map(|(n, hist)| (n.to_owned(), hist)),
            );
        for (name, hist) in rows {
            let l = Latency::of(hist);
            if l.count > 0 {
                let _ = writeln!(
                    s,
                    "  {name:<10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    num(l.count),
                    num(l.p50),
                    num(l.p90),
                    num(l.p99),
                    num(l.p999),
                    num(l.max)
                );
            }
        }
        let g = &r.gate;
        match (g.pid, g.cpu_s) {
            (Some(pid), Some(cpu)) => {
                let _ = writeln!(
                    s,
                    "gate         pid {pid}: cpu {cpu:.2} s ({:.0} % of a core), rss {} (before {}, max {}){}",
                    g.cpu_percent.unwrap_or(0.0),
                    mib(g.rss_bytes),
                    mib(g.rss_before_bytes),
                    mib(g.rss_max_bytes),
                    r.gps.gate_cpu_us_per_point.map_or(String::new(), |u| gate_cpu_per_point(r.scenario, u))
                );
            }
            _ => {
                let _ = writeln!(s, "gate         pid not found: pass --gate-pid for CPU and memory figures");
            }
        }
        if let Some(b) = r.idle.bytes_per_session {
            let _ = writeln!(
                s,
                "idle         {} sessions, {:.0} bytes of gate memory each",
                num(r.idle.sessions),
                b
            );
        }
        if let Some(b) = &r.bad {
            let _ = writeln!(
                s,
                "bad peers    slow readers: {} logins, {} closed ({} with GoAway SlowConsumer), {} survived; \
                 garbage: {} sent, {} refused, {} closed, {} left open; half-open: {} sent, {} closed (max {} ms), {} stuck",
                b.slow_logins,
                b.slow_closed,
                b.slow_goaway,
                b.slow_survived,
                b.garbage_sent,
                b.garbage_refused,
                b.garbage_closed,
                b.garbage_open,
                b.half_open_sent,
                b.half_open_closed,
                b.half_open_close_ms_max,
                b.half_open_stuck
            );
        }
        let _ = writeln!(s, "loadgen      cpu {:.2} s, rss {}", r.loadgen.cpu_s, mib(r.loadgen.rss_bytes));
        if let (Some(all), Some(loops)) = (r.loadgen.window_cpu_s, r.loadgen.loops_window_cpu_s) {
            let per_send =
                r.loadgen.loops_us_per_send.map_or(String::new(), |u| format!(", {u:.2} µs per GPS send"));
            let _ =
                writeln!(s, "             window: cpu {all:.2} s, of which its loops {loops:.2} s{per_send}");
        }
        let kinds: Vec<String> =
            r.error_kinds.iter().filter(|(_, &n)| n > 0).map(|(k, n)| format!("{k} {}", num(*n))).collect();
        let _ = writeln!(
            s,
            "errors       {}{}",
            num(r.errors),
            if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
        );
        let _ = writeln!(
            s,
            "audit        {}",
            if r.ok {
                "OK: every accepted push has its receipt, none shown twice".to_owned()
            } else {
                format!(
                    "FAILED: lost {}, duplicates {}, delivered but never seen {}",
                    p.lost, p.duplicates, p.delivered_unseen
                )
            }
        );
        s
    }
}

/// The gate's CPU per GPS point for the table: GPS's own cost in the `gps` scenario; in the
/// others the gate also served pushes, requests, logins or resumes, which the label says.
fn gate_cpu_per_point(scenario: Scenario, us: f64) -> String {
    if scenario == Scenario::Gps {
        format!(", {us:.2} µs CPU per GPS point")
    } else {
        format!(", {us:.2} µs gate CPU per GPS point, all traffic included")
    }
}

/// 1234567 → "1,234,567".
pub fn num(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::with_capacity(d.len() + d.len() / 3);
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".to_owned(), |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
}

/// Writes each non-empty histogram as `<dir>/<name>.hgrm` (HdrHistogram's percentile
/// distribution text, values in µs).
pub fn write_hgrm(dir: &Path, h: &Hists) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, hist) in [
        ("push_latency", &h.push),
        ("request_rtt", &h.request),
        ("reconnect", &h.reconnect),
        ("login", &h.login),
    ] {
        if hist.is_empty() {
            continue;
        }
        let path = dir.join(format!("{name}.hgrm"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        f.write_all(hgrm(hist).as_bytes())?;
        f.flush()?;
        written.push(path);
    }
    Ok(written)
}

/// HdrHistogram's percentile distribution text for `h` (values in µs).
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ =
        writeln!(s, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                s,
                "{:>12.3} {:>14.12} {:>10} {:>14.2}",
                v.value_iterated_to() as f64,
                q,
                total,
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(s, "{:>12.3} {:>14.12} {:>10}", v.value_iterated_to() as f64, q, total);
        }
    }
    let _ = writeln!(s, "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]", h.mean(), h.stdev());
    let _ = writeln!(s, "#[Max     = {:>12.3}, Total count    = {:>12}]", h.max() as f64, h.len());
    let _ = writeln!(s, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", h.buckets(), h.distinct_values());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stats::histogram;

    #[test]
    fn numbers_get_separators() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(1000), "1,000");
        assert_eq!(num(1_234_567), "1,234,567");
    }

    #[test]
    fn latency_and_hgrm() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.saturating_record(v);
        }
        let l = Latency::of(&h);
        assert_eq!((l.count, l.max), (1000, 1000));
        assert!((495..=505).contains(&l.p50), "{l:?}");
        assert!((985..=1000).contains(&l.p99), "{l:?}");
        let text = hgrm(&h);
        assert!(text.contains("Percentile") && text.contains("Total count"));
        assert_eq!(Latency::of(&histogram()), Latency::default());
    }

    #[test]
    fn report_serialises_with_the_documented_keys() {
        let r = Report { scenario: Scenario::Gps, ..Report::default() };
        let v = serde_json::to_value(&r).expect("json");
        for path in [
            "/gps/sent",
            "/gps/rate_per_s",
            "/gps/behind",
            "/gps/late",
            "/push/sent",
            "/push/accepted",
            "/push/delivered",
            "/push/unreachable",
            "/push/lost",
            "/push/duplicates",
            "/push/latency_us/p50",
            "/push/latency_us/p99",
            "/push/latency_us/p999",
            "/push/latency_us/max",
            "/request/latency_us/p50",
            "/request/latency_us/p99",
            "/reconnect/latency_us/p50",
            "/reconnect/latency_us/p99",
            "/storm/all_back_ms",
            "/storm/resumed",
            "/storm/relogin",
            "/storm/moved",
            "/reconnect/moved",
            "/idle/bytes_per_session",
            "/gate/cpu_s",
            "/gate/rss_bytes",
            "/loadgen/cpu_s",
            "/errors",
            "/target",
            "/tls",
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
    }

    #[test]
    fn gate_side_figures_are_written_only_when_scraped() {
        let mut r = Report { scenario: Scenario::Push, ..Report::default() };
        r.push.set_gate_side(None, None);
        let v = serde_json::to_value(&r).expect("json");
        assert!(v.pointer("/push/gate_latency_us").is_none(), "a peer target has no gate figures");
        assert!(v.pointer("/push/receipt_latency_us").is_none());
        let scrape = |n: u64| {
            let mut t = String::new();
            for m in [crate::gatemetrics::DELIVERY, crate::gatemetrics::RECEIPT] {
                t.push_str(&format!("{m}_bucket{{shard=\"0\",le=\"300\"}} {n}\n"));
                t.push_str(&format!("{m}_bucket{{shard=\"0\",le=\"+Inf\"}} {n}\n"));
            }
            t
        };
        r.push.set_gate_side(Some(&scrape(3)), Some(&scrape(13)));
        let v = serde_json::to_value(&r).expect("json");
        for path in [
            "/push/gate_latency_us/p50",
            "/push/gate_latency_us/p99",
            "/push/gate_latency_us/p999",
            "/push/receipt_latency_us/p50",
            "/push/receipt_latency_us/p99",
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
        assert_eq!(r.push.gate_latency_us.map(|g| (g.count, g.p50)), Some((10, 150)));
        let back: Report = serde_json::from_value(v).expect("reads back");
        assert_eq!(back.push.receipt_latency_us, r.push.receipt_latency_us);
        assert!(r.table(&Hists::default()).contains("push (gate)"));
    }

    #[test]
    fn the_scenario_is_written_by_its_name() {
        for sc in Scenario::ALL {
            let v = serde_json::to_value(Report { scenario: sc, ..Report::default() }).expect("json");
            assert_eq!(v["scenario"], sc.name());
        }
    }

    #[test]
    fn a_report_reads_back_and_a_missing_field_is_an_error() {
        let mut r = Report { scenario: Scenario::Mixed, window_s: 2.5, ..Report::default() };
        r.push.latency_us.p99 = 1234;
        r.gate.cpu_s = Some(0.25);
        r.push.outcomes.insert("delivered".into(), 7);
        r.set_errors(&Snapshot { err_login: 3, ..Snapshot::default() });
        let v = serde_json::to_value(&r).expect("json");
        let back: Report = serde_json::from_value(v.clone()).expect("reads back");
        assert_eq!(serde_json::to_value(&back).expect("json"), v);
        assert_eq!(
            (back.scenario, back.push.latency_us.p99, back.gate.cpu_s),
            (Scenario::Mixed, 1234, Some(0.25))
        );

        // A missing field, an `Option` one included, is named; `null` is not missing.
        for (section, field) in [("push", "sent"), ("gate", "cpu_s"), ("storm", "all_back_ms"), ("", "bad")] {
            let mut w = v.clone();
            let obj = if section.is_empty() { &mut w } else { &mut w[section] };
            obj.as_object_mut().expect("object").remove(field);
            let e = serde_json::from_value::<Report>(w).expect_err("a field is missing").to_string();
            assert!(e.contains(&format!("missing field `{field}`")), "{e}");
        }
        let mut w = v;
        w["gate"]["cpu_s"] = serde_json::Value::Null;
        assert_eq!(serde_json::from_value::<Report>(w).expect("null is a value").gate.cpu_s, None);
    }

    #[test]
    fn gate_figures_over_the_window() {
        let at = |cpu_s, rss_bytes| Some(ProcSample { cpu_s, rss_bytes });
        let g = Gate::over_window(
            Some(9),
            at(0.5, 100),
            at(1.0, 150),
            at(1.5004, 300),
            Some(200),
            Duration::from_secs(2),
        );
        assert_eq!((g.pid, g.cpu_s, g.cpu_percent), (Some(9), Some(0.5), Some(25.0)));
        assert_eq!((g.rss_before_bytes, g.rss_bytes, g.rss_max_bytes), (Some(100), Some(300), Some(300)));
        let none = Gate::over_window(None, None, None, at(1.0, 1), None, Duration::from_secs(2));
        assert_eq!((none.cpu_s, none.cpu_percent, none.rss_max_bytes), (None, None, Some(1)));

        let mut r = Report::default();
        r.gps.sent = 1000;
        r.set_gate(g);
        assert_eq!(r.gps.gate_cpu_us_per_point, Some(500.0));
        let mut quiet = Report::default();
        quiet.set_gate(Gate { cpu_s: Some(1.0), ..Gate::default() });
        assert_eq!(quiet.gps.gate_cpu_us_per_point, None, "no GPS point, no figure per point");
    }

    #[test]
    fn the_gps_line_counts_late_sends() {
        let gps = Gps { sent: 100, frames: 100, late: 3, behind: 1, ..Gps::default() };
        let t = Report { scenario: Scenario::Gps, gps, ..Report::default() }.table(&Hists::default());
        assert!(t.contains("; 3 sends over 10 ms late (1 over 1 s behind, rescheduled)\n"), "{t}");
        let gps = Gps { sent: 100, frames: 100, ..Gps::default() };
        let t = Report { scenario: Scenario::Gps, gps, ..Report::default() }.table(&Hists::default());
        assert!(t.contains("; 0 sends over 10 ms late\n"), "{t}");
    }

    #[test]
    fn gate_cpu_per_gps_point_says_what_it_includes() {
        let gate = Gate { pid: Some(1), cpu_s: Some(1.0), ..Gate::default() };
        let gps = Gps { sent: 1000, gate_cpu_us_per_point: Some(1000.0), ..Gps::default() };
        let table = |scenario| {
            Report { scenario, gate: gate.clone(), gps: gps.clone(), ..Report::default() }
                .table(&Hists::default())
        };
        let t = table(Scenario::Gps);
        assert!(t.contains("1000.00 µs CPU per GPS point") && !t.contains("all traffic"), "{t}");
        for sc in [Scenario::Mixed, Scenario::Push, Scenario::Storm] {
            let t = table(sc);
            assert!(t.contains("1000.00 µs gate CPU per GPS point, all traffic included"), "{t}");
        }
    }
}
