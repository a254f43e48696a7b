//! Counters and histograms of one loop (one per loadgen core).
//!
//! Counters are atomics so the main thread can read them for the live line without stopping
//! anyone; each loop owns its own set (no cache line is shared between loops), and the
//! main thread sums them. Histograms stay inside their loop and are merged at the end.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Defines `Counters` (atomics), `Snapshot` (plain numbers) and the names used in reports, from
/// one list, so a counter cannot be added to one and forgotten in the others.
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// One loop's counters; every field only grows.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct Counters { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// The counters at one moment, summed over loops. A counter missing from a stored
        /// report (written before it existed) reads as 0.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct Snapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl Snapshot {
            /// Field-wise sum.
            pub fn add(&self, o: &Snapshot) -> Snapshot {
                Snapshot { $($name: self.$name + o.$name,)* }
            }

            /// Field-wise difference (`self` later than `earlier`).
            pub fn since(&self, earlier: &Snapshot) -> Snapshot {
                Snapshot { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }
    };
}

counters! {
    /// GPS points sent.
    gps_points,
    /// GPS frames sent.
    gps_frames,
    /// GPS sends skipped because the loop fell more than a second behind its schedule.
    gps_behind,
    /// GPS sends that left more than [`GPS_LATE`](crate::engine::driver::GPS_LATE) after their
    /// schedule (the ones over a second behind included).
    gps_late,
    /// Frames written by simulated apps.
    frames_out,
    /// Frames read by simulated apps.
    frames_in,
    /// PushAcks sent (every delivery, redeliveries included).
    acks,
    /// Pushes an app saw for the first time (by its own de-duplication).
    push_first,
    /// Deliveries an app recognised as seen before (redeliveries after a resume).
    push_again,
    /// Pushes an app showed although it had shown them before: its de-duplication failed.
    push_duplicates,
    /// Deliveries flagged as redeliveries by the gate.
    push_redelivery_flag,
    /// Business requests sent (PlaceOrder, GrabOrder).
    requests,
    /// Requests answered with a Reply.
    replies,
    /// Requests answered with an Error frame.
    request_errors,
    /// Requests still unanswered when their connection dropped (the protocol gives no answer).
    requests_cut,
    /// Requests not sent because the app had too many outstanding.
    requests_skipped,
    /// Orders placed (Reply code 0).
    orders_placed,
    /// Orders the app-server could not offer to anyone (Reply code 503).
    orders_no_driver,
    /// Order-status pushes saying "taken" that passengers received.
    orders_taken_seen,
    /// Grabs that won the order.
    grab_won,
    /// Grabs answered "order taken" (409).
    grab_lost,
    /// Sessions that came up by login the first time.
    logins,
    /// Sessions that came back after a drop, by resume.
    resumes,
    /// Sessions that came back after a drop by a fresh login (resume refused or no token).
    relogins,
    /// Of `resumes`, those the gate accepted on another node than the one that held the session.
    resumes_moved,
    /// Resumes the gate refused.
    resume_refused,
    /// Connections loadgen dropped on purpose (chaos and storms).
    drops_caused,
    /// Connections the gate or the network ended.
    drops_seen,
    /// GoAway frames received.
    go_aways,
    /// Refusals with Overloaded or ShuttingDown (honoured with retry-after).
    overloaded,
    /// TCP connects that failed.
    err_connect,
    /// Logins refused (bad or expired token) and displaced sessions.
    err_login,
    /// Sessions that did not come up in time after connecting.
    err_session_timeout,
    /// Frames that did not decode, and lost framing.
    err_protocol,
    /// Error frames that answered nothing loadgen sent.
    err_unexpected,
    /// Writes that could not complete in time.
    err_write,
}

impl Snapshot {
    /// Failures that mean something went wrong (not the chaos loadgen caused on purpose, not
    /// backpressure the gate asked for).
    pub fn errors(&self) -> u64 {
        self.request_errors
            + self.err_connect
            + self.err_login
            + self.err_session_timeout
            + self.err_protocol
            + self.err_unexpected
            + self.err_write
    }
}

/// Gauges of one loop, read by the live line.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Sessions up now.
    pub live: AtomicI64,
    /// Apps (and bad peers) not yet finished.
    pub tasks: AtomicI64,
    /// The thread id of this core's event loop (0 until it runs), for its CPU time in /proc.
    pub loop_tid: AtomicU64,
}

/// CPU seconds the event loops' threads used so far (`None` if one cannot be read).
pub fn loops_cpu_s(stats: &[ExecStats]) -> Option<f64> {
    stats.iter().map(|s| crate::procstat::thread_cpu_s(s.g.loop_tid.load(Relaxed) as u32)).sum()
}

/// One loop's shared numbers.
#[derive(Debug, Default)]
pub struct ExecStats {
    /// Counters.
    pub c: Counters,
    /// Gauges.
    pub g: Gauges,
}

/// Latencies in µs from 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One loop's latency histograms, in µs.
#[derive(Debug, Clone)]
pub struct Hists {
    /// App-server send → app receive, first arrivals without the redelivery flag.
    pub push: Histogram<u64>,
    /// Request sent → answer received.
    pub request: Histogram<u64>,
    /// Connection dropped → session back (resume or login).
    pub reconnect: Histogram<u64>,
    /// First connect → session up.
    pub login: Histogram<u64>,
    /// `push` again, split by the node holding the receiving app's session (an index in
    /// `Plan::gates`); empty with a single node.
    pub push_by_node: Vec<Histogram<u64>>,
    /// App-server send → the delivery's last segment in the app's socket (the kernel's receive
    /// stamp): `push` less loadgen's own wait.
    pub push_arrival: Histogram<u64>,
    /// The delivery's last segment in the app's socket → loadgen read and decoded it: loadgen's
    /// own part of `push`.
    pub push_wait: Histogram<u64>,
}

impl Default for Hists {
    fn default() -> Self {
        Hists {
            push: histogram(),
            request: histogram(),
            reconnect: histogram(),
            login: histogram(),
            push_by_node: Vec::new(),
            push_arrival: histogram(),
            push_wait: histogram(),
        }
    }
}

impl Hists {
    /// Adds `o`'s samples to these.
    pub fn merge(&mut self, o: &Hists) {
        // Same bounds everywhere, so adding cannot fail; a failure would only lose samples.
        let _ = self.push.add(&o.push);
        let _ = self.request.add(&o.request);
        let _ = self.reconnect.add(&o.reconnect);
        let _ = self.login.add(&o.login);
        let _ = self.push_arrival.add(&o.push_arrival);
        let _ = self.push_wait.add(&o.push_wait);
        for (i, h) in o.push_by_node.iter().enumerate() {
            let mine = self.node_push(i);
            let _ = mine.add(h);
        }
    }

    /// One delivery's first arrival, sent at `sent_at_us`, decoded at `now_us`, its bytes in the
    /// socket since `rx_us` when stamped (all wall-clock µs); returns its latency.
    pub fn record_push(&mut self, sent_at_us: u64, now_us: u64, rx_us: Option<u64>) -> u64 {
        let latency = now_us.saturating_sub(sent_at_us);
        self.push.saturating_record(latency);
        if let Some(rx) = rx_us {
            self.push_arrival.saturating_record(rx.saturating_sub(sent_at_us));
            self.push_wait.saturating_record(now_us.saturating_sub(rx));
        }
        latency
    }

    /// The push histogram of node `i`, made (with any before it) when first needed.
    pub fn node_push(&mut self, i: usize) -> &mut Histogram<u64> {
        while self.push_by_node.len() <= i {
            self.push_by_node.push(histogram());
        }
        &mut self.push_by_node[i]
    }
}
