//! The gate's own push-path histograms: `fleetgate_push_delivery_us` counts one observation per
//! first delivery written to an app, `fleetgate_push_receipt_us` one per receipt an ack caused,
//! written to the app-server; both are in /metrics, empty, from start-up. Run on the task-driven
//! app port and on the app ring.

mod common;

use common::{next_push, push_spec, receipts, Gate};
use schema::wire::Outcome;

const DELIVERY: &str = "fleetgate_push_delivery_us";
const RECEIPT: &str = "fleetgate_push_receipt_us";

fn pushes_are_measured(gate: Gate) {
    let metrics = gate.http_get("/metrics");
    for h in [DELIVERY, RECEIPT] {
        assert!(metrics.contains(&format!("# TYPE {h} histogram")), "{h} missing at start-up");
        assert_eq!(common::sum_metric(&metrics, &format!("{h}_count"), ""), 0.0);
    }
    let (srv, ev) = gate.appserver();
    let mut drivers: Vec<_> = (1..=3).map(|u| gate.login(u, 1)).collect();
    // Three online targets and one offline: three deliveries written.
    srv.push(&push_spec(100, &[1, 2, 3, 4], 500)).expect("push accepted");
    let mut frames: Vec<_> = drivers.iter_mut().map(next_push).collect();
    // Two acked (two receipts caused by acks), one left to expire (its receipt is not).
    for (d, f) in drivers.iter_mut().zip(frames.iter_mut()).take(2) {
        d.ack_push(f).expect("ack");
    }
    let r = receipts(&ev, 4);
    assert_eq!(r[&(100, 1)], vec![Outcome::Delivered]);
    assert_eq!(r[&(100, 2)], vec![Outcome::Delivered]);
    assert_eq!(r[&(100, 3)], vec![Outcome::TtlExpired]);
    assert_eq!(r[&(100, 4)], vec![Outcome::Offline]);
    // The gate observes a write right after the kernel took it: the peer may read it first.
    gate.eventually("both histograms counted", || {
        gate.metric(&format!("{DELIVERY}_count"), "") >= 3.0
            && gate.metric(&format!("{RECEIPT}_count"), "") >= 2.0
    });
    let metrics = gate.http_get("/metrics");
    let count = |h: &str| common::sum_metric(&metrics, &format!("{h}_count"), "");
    let sum = |h: &str| common::sum_metric(&metrics, &format!("{h}_sum"), "");
    let inf = |h: &str| common::sum_metric(&metrics, &format!("{h}_bucket"), "le=\"+Inf\"");
    assert_eq!(count(DELIVERY), 3.0, "one per delivery written:\n{metrics}");
    assert_eq!(count(RECEIPT), 2.0, "one per acked receipt written:\n{metrics}");
    for h in [DELIVERY, RECEIPT] {
        assert_eq!(inf(h), count(h));
        // Some time passed on every path, and less than the test took.
        assert!(sum(h) > 0.0 && sum(h) < count(h) * 60e6, "{h} sum {}", sum(h));
    }
}

#[test]
fn push_path_histograms_count_deliveries_and_acked_receipts() {
    pushes_are_measured(Gate::start(&[]));
}

#[test]
fn push_path_histograms_on_the_app_ring() {
    pushes_are_measured(Gate::start(&["--app-io", "uring"]));
}
