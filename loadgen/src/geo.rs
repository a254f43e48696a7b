//! `loadgen geo`: drivers drive about a 30 × 30 km area reporting GPS, and the app-server offers
//! orders at random points of it with GeoPush (radius 1–5 km, K = 20). loadgen remembers every
//! position each driver sent ([`Track`]) and checks every answer against them ([`check`]):
//!
//! - **wrong**: a chosen driver whose reported point is not one it could be at in the gate's
//!   view (a point it sent, newer than the last one sure to have arrived before the request), or
//!   is farther than the radius;
//! - **missed**: a driver left out although, whichever of its possible points the gate held, it
//!   was within the radius and nearer than the farthest driver chosen (or than the radius, when
//!   fewer than K were chosen).
//!
//! A point counts as "sure to have arrived" [`ARRIVAL_SLACK_MS`] after loadgen sent it; points
//! sent later may or may not have reached the gate when it chose, so each is allowed.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Points remembered per driver: at one report every 3 s, 12 s of history, more than any
/// answer's uncertainty spans.
pub const TRAIL: usize = 4;
/// How long after loadgen sends a point the gate has surely taken it (the GPS path is a socket
/// read, a decode and one hop between shards; this leaves room for a busy machine).
pub const ARRIVAL_SLACK_MS: u64 = 250;
/// Metres of rounding allowed between the gate's distances and loadgen's.
pub const EPS_M: f64 = 1.0;
/// Radius of the orders' circles: drawn from this range, metres.
pub const RADIUS_M: (u32, u32) = (1_000, 5_000);
/// Drivers chosen per order.
pub const K: u32 = 20;
/// The side of the area the fleet drives in, metres.
pub const AREA_M: f64 = 30_000.0;

/// One point a driver sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Wall clock ms when it was written.
    pub at_ms: u64,
    /// 1e-7 degrees.
    pub lat_e7: i32,
    /// 1e-7 degrees.
    pub lon_e7: i32,
}

/// The newest points every driver sent.
#[derive(Debug, Default)]
pub struct Track {
    trails: Mutex<HashMap<u64, VecDeque<Sent>>>,
}

impl Track {
    /// Remembers that `uid` sent this point.
    pub fn record(&self, uid: u64, s: Sent) {
        let mut t = self.trails.lock().unwrap_or_else(|p| p.into_inner());
        let trail = t.entry(uid).or_default();
        if trail.len() >= TRAIL {
            trail.pop_front();
        }
        trail.push_back(s);
    }

    /// Runs `f` over every driver's trail, oldest point first.
    pub fn with<R>(&self, f: impl FnOnce(&HashMap<u64, VecDeque<Sent>>) -> R) -> R {
        f(&self.trails.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The haversine distance in metres between two points in 1e-7 degrees, on the sphere the gate
/// measures with.
pub fn distance_m(lat1_e7: i32, lon1_e7: i32, lat2_e7: i32, lon2_e7: i32) -> f64 {
    let d = |e7: i32| (e7 as f64 * 1e-7).to_radians();
    let (p1, p2) = (d(lat1_e7), d(lat2_e7));
    let (dp, dl) = (p2 - p1, d(lon2_e7) - d(lon1_e7));
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6_371_008.8 * a.sqrt().min(1.0).asin()
}

/// One order's question.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// Centre, 1e-7 degrees.
    pub lat_e7: i32,
    /// Centre, 1e-7 degrees.
    pub lon_e7: i32,
    /// Metres.
    pub radius_m: u32,
    /// Drivers wanted.
    pub k: u32,
    /// Wall ms when the request left.
    pub sent_ms: u64,
    /// Wall ms when the answer came.
    pub answered_ms: u64,
}

/// One chosen driver as the gate reported it.
#[derive(Debug, Clone, Copy)]
pub struct Chosen {
    /// The driver.
    pub uid: u64,
    /// Its point, 1e-7 degrees.
    pub lat_e7: i32,
    /// 1e-7 degrees.
    pub lon_e7: i32,
}

/// What one answer's check found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Chosen drivers that could not be chosen.
    pub wrong: u64,
    /// Drivers that had to be chosen and were not.
    pub missed: u64,
    /// Drivers surely within the radius (the last point sure to have arrived).
    pub candidates: u64,
}

/// The points the gate may have held for a driver when it chose: the newest one sure to have
/// arrived, and every later one sent before the answer came.
fn possible(trail: &VecDeque<Sent>, a: &Asked) -> (Option<Sent>, Vec<Sent>) {
    let sure_by = a.sent_ms.saturating_sub(ARRIVAL_SLACK_MS);
    let sure = trail.iter().rev().find(|s| s.at_ms <= sure_by).copied();
    let maybe = trail.iter().filter(|s| s.at_ms > sure_by && s.at_ms <= a.answered_ms).copied().collect();
    (sure, maybe)
}

/// Checks one answer against every driver's trail.
pub fn check(trails: &HashMap<u64, VecDeque<Sent>>, a: &Asked, chosen: &[Chosen]) -> Verdict {
    let mut v = Verdict::default();
    let dist = |s: &Sent| distance_m(a.lat_e7, a.lon_e7, s.lat_e7, s.lon_e7);
    let radius = a.radius_m as f64;
    let mut picked = std::collections::HashSet::with_capacity(chosen.len());
    let mut farthest: f64 = 0.0;
    for c in chosen {
        picked.insert(c.uid);
        let at = Sent { at_ms: 0, lat_e7: c.lat_e7, lon_e7: c.lon_e7 };
        let d = dist(&at);
        farthest = farthest.max(d);
        let could = trails.get(&c.uid).is_some_and(|t| {
            let (sure, maybe) = possible(t, a);
            sure.iter().chain(&maybe).any(|s| (s.lat_e7, s.lon_e7) == (c.lat_e7, c.lon_e7))
        });
        if !could || d > radius + EPS_M {
            v.wrong += 1;
        }
    }
    // Left out: every point the gate may have held was in range and nearer than the bound.
    let bound = if chosen.len() as u32 >= a.k { farthest - EPS_M } else { radius - EPS_M };
    for (uid, t) in trails {
        let (sure, maybe) = possible(t, a);
        let Some(sure) = sure else { continue };
        if dist(&sure) <= radius {
            v.candidates += 1;
        }
        if picked.contains(uid) {
            continue;
        }
        if std::iter::once(&sure).chain(&maybe).all(|s| dist(s) < bound) {
            v.missed += 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(points: &[(u64, i32)]) -> VecDeque<Sent> {
        points.iter().map(|&(at_ms, lat)| Sent { at_ms, lat_e7: lat, lon_e7: 0 }).collect()
    }

    fn asked(k: u32) -> Asked {
        Asked { lat_e7: 0, lon_e7: 0, radius_m: 1_000, k, sent_ms: 10_000, answered_ms: 10_010 }
    }

    #[test]
    fn right_answers_pass_and_wrong_or_missing_drivers_are_counted() {
        // 1e-7° of latitude is 0.0111 m: 9,000 is 100 m.
        let mut t = HashMap::new();
        t.insert(1, trail(&[(1_000, 9_000)]));
        t.insert(2, trail(&[(1_000, 18_000), (9_900, 90_000)])); // moved away, maybe seen yet
        t.insert(3, trail(&[(1_000, 27_000)]));
        t.insert(4, trail(&[(1_000, 900_000)])); // 10 km away
        let c = |uid, lat| Chosen { uid, lat_e7: lat, lon_e7: 0 };
        // K = 2: 1 and 3 (2 may already be 1 km off): right.
        assert_eq!(check(&t, &asked(2), &[c(1, 9_000), c(3, 27_000)]).missed, 0);
        assert_eq!(check(&t, &asked(2), &[c(1, 9_000), c(3, 27_000)]).wrong, 0);
        // 1 and 2 at its older point: right too.
        assert_eq!(
            check(&t, &asked(2), &[c(1, 9_000), c(2, 18_000)]),
            Verdict { wrong: 0, missed: 0, candidates: 3 }
        );
        // 3 and 2: 1 (surely at 100 m) was left out.
        assert_eq!(check(&t, &asked(2), &[c(3, 27_000), c(2, 18_000)]).missed, 1);
        // A point 3 never sent, or a driver past the radius: wrong.
        assert_eq!(check(&t, &asked(2), &[c(1, 9_000), c(3, 28_000)]).wrong, 1);
        assert_eq!(check(&t, &asked(5), &[c(4, 900_000)]).wrong, 1);
        // Fewer than K: everyone surely in range must be there.
        let v = check(&t, &asked(5), &[c(1, 9_000)]);
        assert_eq!(v.missed, 1, "3 is surely in range; 2 may be away");
    }
}
