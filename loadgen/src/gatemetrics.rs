//! The gate's own account of the push path, read from its `/metrics`: the histograms
//! `fleetgate_push_delivery_us` (sidecar read → delivery written to the app) and
//! `fleetgate_push_receipt_us` (app ack read → receipt written to the app-server), scraped at
//! the window's start and end and subtracted, so the report shows the gate's part beside the
//! end-to-end figure loadgen measures itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The delivery histogram's name.
pub const DELIVERY: &str = "fleetgate_push_delivery_us";
/// The receipt histogram's name.
pub const RECEIPT: &str = "fleetgate_push_receipt_us";
/// Bound on one scrape: it runs on the loop that paces the window.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a scrape's body (a gate of 64 shards writes well under this).
const MAX_BODY: u64 = 16 << 20;

/// One histogram summed over the gate's shards: (upper bound, cumulative count), ascending, the
/// last bound `f64::INFINITY`.
pub type Cumulative = Vec<(f64, u64)>;

/// GET /metrics from the gate's admin address; `None` when it does not answer (a peer target,
/// an admin port elsewhere).
pub fn scrape(admin: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&admin, SCRAPE_TIMEOUT).ok()?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.take(MAX_BODY).read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// `metric`'s buckets in a Prometheus text scrape, summed over every series (shards); `None`
/// when the scrape has none.
pub fn buckets(text: &str, metric: &str) -> Option<Cumulative> {
    let name = format!("{metric}_bucket{{");
    let mut by_le: Vec<(f64, u64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&name)) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Some(le) = series.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        let n = value.parse::<f64>().ok()? as u64;
        match by_le.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += n,
            None => by_le.push((le, n)),
        }
    }
    if by_le.is_empty() {
        return None;
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(by_le)
}

/// What `after` counted that `before` had not (same bounds: one gate between two scrapes);
/// `None` when the bounds differ (the gate restarted with others).
pub fn difference(before: &Cumulative, after: &Cumulative) -> Option<Cumulative> {
    if before.len() != after.len() || before.iter().zip(after).any(|(b, a)| b.0 != a.0) {
        return None;
    }
    Some(before.iter().zip(after).map(|(b, a)| (a.0, a.1.saturating_sub(b.1))).collect())
}

/// The `q` quantile (0..=1) of cumulative buckets, µs, interpolated linearly inside its bucket
/// as Prometheus's `histogram_quantile` does (a value past the last finite bound reads as that
/// bound); `None` with no observation.
pub fn quantile(c: &Cumulative, q: f64) -> Option<u64> {
    let total = c.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).max(1.0);
    let (mut lo, mut below) = (0.0, 0u64);
    for &(le, cum) in c {
        if cum as f64 >= rank {
            if le.is_infinite() {
                return Some(lo as u64);
            }
            let share = (rank - below as f64) / (cum - below).max(1) as f64;
            return Some((lo + (le - lo) * share).round() as u64);
        }
        (lo, below) = (le, cum);
    }
    Some(lo as u64)
}

/// Observations in cumulative buckets.
pub fn count(c: &Cumulative) -> u64 {
    c.last().map_or(0, |b| b.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE_0: &str = "\
# TYPE fleetgate_push_delivery_us histogram
fleetgate_push_delivery_us_bucket{shard=\"0\",le=\"100\"} 5
fleetgate_push_delivery_us_bucket{shard=\"0\",le=\"200\"} 5
fleetgate_push_delivery_us_bucket{shard=\"0\",le=\"400\"} 5
fleetgate_push_delivery_us_bucket{shard=\"0\",le=\"+Inf\"} 5
fleetgate_push_delivery_us_bucket{shard=\"1\",le=\"100\"} 0
fleetgate_push_delivery_us_bucket{shard=\"1\",le=\"200\"} 0
fleetgate_push_delivery_us_bucket{shard=\"1\",le=\"400\"} 0
fleetgate_push_delivery_us_bucket{shard=\"1\",le=\"+Inf\"} 0
fleetgate_push_delivery_us_sum{shard=\"0\"} 250
";

    fn scrape_1() -> String {
        // Between the scrapes: 100 more observations, 50 of them in (100, 200], 49 in (200, 400]
        // and one past 400, over both shards.
        SCRAPE_0
            .replace("shard=\"0\",le=\"200\"} 5", "shard=\"0\",le=\"200\"} 30")
            .replace("shard=\"0\",le=\"400\"} 5", "shard=\"0\",le=\"400\"} 60")
            .replace("shard=\"0\",le=\"+Inf\"} 5", "shard=\"0\",le=\"+Inf\"} 61")
            .replace("shard=\"1\",le=\"200\"} 0", "shard=\"1\",le=\"200\"} 25")
            .replace("shard=\"1\",le=\"400\"} 0", "shard=\"1\",le=\"400\"} 44")
            .replace("shard=\"1\",le=\"+Inf\"} 0", "shard=\"1\",le=\"+Inf\"} 44")
    }

    #[test]
    fn percentiles_come_from_the_difference_of_two_scrapes() {
        let a = buckets(SCRAPE_0, DELIVERY).expect("buckets");
        let b = buckets(&scrape_1(), DELIVERY).expect("buckets");
        assert_eq!(count(&a), 5);
        let d = difference(&a, &b).expect("same bounds");
        assert_eq!(d, vec![(100.0, 0), (200.0, 50), (400.0, 99), (f64::INFINITY, 100)]);
        // The median is the top of (100, 200]; the 5 observations before the window are not in.
        assert_eq!(quantile(&d, 0.50), Some(200));
        // p99 (rank 99) is the top of (200, 400]; p99.9 is past the last bound: read as it.
        assert_eq!(quantile(&d, 0.99), Some(400));
        assert_eq!(quantile(&d, 0.999), Some(400));
        // Interpolated inside the bucket: rank 25 is half-way through (100, 200].
        assert_eq!(quantile(&d, 0.25), Some(150));
    }

    #[test]
    fn nothing_measured_is_none() {
        let a = buckets(SCRAPE_0, DELIVERY).expect("buckets");
        let d = difference(&a, &a).expect("same bounds");
        assert_eq!(quantile(&d, 0.5), None);
        assert_eq!(buckets(SCRAPE_0, RECEIPT), None, "absent from the scrape");
        assert_eq!(buckets("", DELIVERY), None);
        let other = vec![(50.0, 0), (f64::INFINITY, 0)];
        assert_eq!(difference(&a, &other), None, "different bounds");
    }
}
