//! What a driver does while its session is up: drive about the city, report GPS at its rate
//! (jittered, one point per frame or batches), and sometimes try to grab an order it is offered.

use super::Exec;
use schema::wire::GpsPoint;
use schema::Encoder;
use std::time::{Duration, Instant};

/// City centre the fleet drives around (Beijing), degrees.
pub const CENTER: (f64, f64) = (39.9042, 116.4074);
/// Half the side of the square the fleet stays in, degrees (~11 km).
pub const RADIUS_DEG: f64 = 0.1;
/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_320.0;
/// A GPS send that leaves more than this after its schedule is counted late (`gps.late` in
/// the report): the rate loadgen offered was not the one asked for, on time.
pub const GPS_LATE: Duration = Duration::from_millis(10);

/// True when a send due at `scheduled` and leaving at `now` is late (over [`GPS_LATE`]).
pub fn is_late(scheduled: Instant, now: Instant) -> bool {
    now.saturating_duration_since(scheduled) > GPS_LATE
}

/// A driver's position and GPS schedule.
#[derive(Debug, Clone)]
pub struct Driver {
    /// Latitude, degrees.
    lat: f64,
    /// Longitude, degrees.
    lon: f64,
    /// Heading, degrees clockwise from north.
    heading: f64,
    /// Speed, m/s.
    speed: f64,
    /// When the next GPS frame is due.
    pub next_gps: Instant,
}

/// Time between GPS frames of one driver, before jitter; `None` when GPS is off.
pub fn gps_interval(rate: f64, batch: u32) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(f64::from(batch.max(1)) / rate))
}

impl Driver {
    /// A driver somewhere in the city, its first report at a random moment within one interval
    /// (so the fleet does not report in lockstep).
    pub fn new(ex: &Exec) -> Driver {
        let plan = &ex.plan;
        let phase =
            gps_interval(plan.rate, plan.batch).map_or(Duration::ZERO, |i| i.mul_f64(ex.rand(0.0..1.0)));
        Driver {
            lat: CENTER.0 + ex.rand(-plan.area_half_deg.0..plan.area_half_deg.0),
            lon: CENTER.1 + ex.rand(-plan.area_half_deg.1..plan.area_half_deg.1),
            heading: ex.rand(0.0..360.0),
            speed: ex.rand(0.0..15.0),
            next_gps: Instant::now() + phase,
        }
    }

    /// Starts the GPS schedule at `now`: the first report at a random moment within one
    /// interval (the first session is up; until then the schedule waited).
    pub fn start(&mut self, ex: &Exec, now: Instant) {
        let phase = gps_interval(ex.plan.rate, ex.plan.batch)
            .map_or(Duration::ZERO, |i| i.mul_f64(ex.rand(0.0..1.0)));
        self.next_gps = now + phase;
    }

    /// Moves `dt` seconds along a wandering route, turning back at the city's edge.
    fn step(&mut self, ex: &Exec, dt: f64) {
        self.heading = (self.heading + ex.rand(-15.0..15.0)).rem_euclid(360.0);
        self.speed = (self.speed + ex.rand(-1.0..1.0)).clamp(0.0, 20.0);
        let h = self.heading.to_radians();
        self.lat += self.speed * dt * h.cos() / M_PER_DEG;
        self.lon += self.speed * dt * h.sin() / (M_PER_DEG * self.lat.to_radians().cos());
        let (half_lat, half_lon) = ex.plan.area_half_deg;
        if (self.lat - CENTER.0).abs() > half_lat || (self.lon - CENTER.1).abs() > half_lon {
            self.heading = (self.heading + 180.0).rem_euclid(360.0);
            self.lat = self.lat.clamp(CENTER.0 - half_lat, CENTER.0 + half_lat);
            self.lon = self.lon.clamp(CENTER.1 - half_lon, CENTER.1 + half_lon);
        }
    }

    fn point(&self, ts_ms: u64) -> GpsPoint {
        GpsPoint::new(
            ts_ms,
            (self.lat * 1e7) as i32,
            (self.lon * 1e7) as i32,
            (self.speed * 10.0) as u16,
            (self.heading * 100.0) as u16 % 36000,
            50,
            0,
        )
    }

    /// Appends this driver's next GPS frame (`batch` points, oldest first, spaced by the
    /// report interval) to `out`, and schedules the one after. Returns the points written.
    pub fn write_gps(
        &mut self,
        uid: u64,
        ex: &Exec,
        enc: &mut Encoder,
        out: &mut Vec<u8>,
        log_id: u64,
        now: Instant,
    ) -> u32 {
        let plan = &ex.plan;
        let Some(interval) = gps_interval(plan.rate, plan.batch) else { return 0 };
        let batch = plan.batch.max(1);
        let dt = 1.0 / plan.rate;
        let now_ms = client::now_ms();
        if batch == 1 {
            self.step(ex, dt);
            enc.gps_report(out, log_id, &self.point(now_ms));
        } else {
            let mut points = Vec::with_capacity(batch as usize);
            for i in 0..batch {
                self.step(ex, dt);
                let age_ms = (f64::from(batch - 1 - i) * dt * 1000.0) as u64;
                points.push(self.point(now_ms.saturating_sub(age_ms)));
            }
            enc.gps_batch(out, log_id, &points);
        }
        // `geo` checks the gate's answers against every position sent (the newest of a batch
        // is the one the gate keeps).
        if let Some(track) = &ex.control.track {
            let p = self.point(now_ms);
            track.record(uid, crate::geo::Sent { at_ms: now_ms, lat_e7: p.lat_e7(), lon_e7: p.lon_e7() });
        }
        let c = &ex.stats().c;
        if is_late(self.next_gps, now) {
            c.gps_late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Keep the rate on average with ±20 % jitter; more than a second behind (the loop
        // is saturated), start afresh rather than burst.
        self.next_gps += interval.mul_f64(ex.rand(0.8..1.2));
        if self.next_gps + Duration::from_secs(1) < now {
            self.next_gps = now + interval.mul_f64(ex.rand(0.0..1.0));
            c.gps_behind.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_is_late_past_ten_ms_after_its_schedule() {
        let t = Instant::now();
        assert!(!is_late(t, t));
        assert!(!is_late(t + Duration::from_millis(5), t), "early is not late");
        assert!(!is_late(t, t + Duration::from_millis(10)), "10 ms is the bound, not past it");
        assert!(is_late(t, t + Duration::from_millis(11)));
        assert!(is_late(t, t + Duration::from_secs(2)), "behind by a second is late too");
    }
}
