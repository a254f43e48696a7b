//! What a passenger does while its session is up: place orders at its rate (jittered) from
//! somewhere in the city; the order's status arrives as a push (kind 2) once a driver took it.

use super::driver::{CENTER, RADIUS_DEG};
use super::Exec;
use schema::wire;
use std::time::{Duration, Instant};

/// A passenger's order schedule.
#[derive(Debug, Clone)]
pub struct Passenger {
    /// When the next order is due.
    pub next_order: Instant,
}

/// Time between orders of one passenger, before jitter; `None` when orders are off.
pub fn order_interval(rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate))
}

impl Passenger {
    /// A passenger whose first order comes at a random moment within one interval.
    pub fn new(ex: &Exec) -> Passenger {
        let phase =
            order_interval(ex.plan.order_rate).map_or(Duration::ZERO, |i| i.mul_f64(ex.rand(0.0..1.0)));
        Passenger { next_order: Instant::now() + phase }
    }

    /// The next order's body (pickup and destination anywhere in the city); schedules the one
    /// after.
    pub fn next_order(&mut self, ex: &Exec) -> wire::PlaceOrderArgs<'static> {
        let e7 = |deg: f64| (deg * 1e7) as i32;
        let from = (CENTER.0 + ex.rand(-RADIUS_DEG..RADIUS_DEG), CENTER.1 + ex.rand(-RADIUS_DEG..RADIUS_DEG));
        let to = (CENTER.0 + ex.rand(-RADIUS_DEG..RADIUS_DEG), CENTER.1 + ex.rand(-RADIUS_DEG..RADIUS_DEG));
        self.schedule(ex);
        wire::PlaceOrderArgs {
            from_lat_e7: e7(from.0),
            from_lon_e7: e7(from.1),
            to_lat_e7: e7(to.0),
            to_lon_e7: e7(to.1),
            payload: None,
        }
    }

    /// Moves the next order one jittered interval on (also when an order was skipped).
    pub fn schedule(&mut self, ex: &Exec) {
        if let Some(i) = order_interval(ex.plan.order_rate) {
            self.next_order = Instant::now() + i.mul_f64(ex.rand(0.5..1.5));
        }
    }
}
