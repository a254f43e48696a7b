//! Where each online driver is: a spatial index over the newest point of every driver with a
//! session on this logic shard, updated on every GPS point, asked for the K nearest drivers
//! within a radius (docs/PROTOCOL.md §9.16).
//!
//! A fixed grid over the globe, not an R-tree or H3 cells: an update is one hash lookup, the
//! point's unit vector (two `sin_cos`) and, only when the driver crossed into another cell, a
//! swap-remove and a push (measured in `benches/geo.rs` against an R-tree; ARCHITECTURE.md
//! "Geo" has the figures). Rows are `CELL_E7` of latitude high (1.11 km); each row is cut into
//! as many columns as keep a cell at most about as wide as it is high at the row's edge nearest
//! the equator, so cells near the poles stay about 1 km wide too and a polar row is one cell.
//! A query walks the rows its circle spans and, in each, the columns its widest longitude
//! extent spans (every column when the circle holds a pole), and compares each candidate by
//! the chord between unit vectors, which orders points exactly as the great-circle distance
//! does at a few multiplications each; the distance itself (`2R·asin(chord/2)`, the haversine
//! distance in another form) is computed only for the K kept. The K nearest, ties by uid.

use crate::hash::UidHash;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// Mean Earth radius (IUGG), metres: what every distance here is measured with.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Height of a grid row in 1e-7 degrees of latitude: 0.01°, 1.11 km.
pub const CELL_E7: i64 = 100_000;
/// Rows from the south pole to the north pole (the north pole itself falls in the last).
const ROWS: usize = (1_800_000_000 / CELL_E7) as usize;
/// Columns of a row at the equator: 0.01° of longitude each.
const MAX_COLS: u32 = (3_600_000_000 / CELL_E7) as u32;
/// Degrees added around a query's box so a point on its edge, rounded the other way, is still
/// a candidate: the haversine distance decides, the box only has to hold every point in range.
const BOX_MARGIN_DEG: f64 = 1e-6;

/// The haversine distance in metres between two points given in degrees.
#[inline]
pub fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// The unit vector of a point given in 1e-7 degrees.
#[inline]
pub fn unit(lat_e7: i32, lon_e7: i32) -> [f64; 3] {
    let (sp, cp) = deg(lat_e7).to_radians().sin_cos();
    let (sl, cl) = deg(lon_e7).to_radians().sin_cos();
    [cp * cl, cp * sl, sp]
}

/// The squared chord between two unit vectors.
#[inline]
fn chord2(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    let (x, y, z) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    x * x + y * y + z * z
}

/// The great-circle distance, metres, of a squared chord.
#[inline]
fn chord2_to_m(c2: f64) -> f64 {
    2.0 * EARTH_RADIUS_M * (c2.sqrt() / 2.0).min(1.0).asin()
}

/// The squared chord of a great-circle distance in metres.
#[inline]
fn m_to_chord2(m: f64) -> f64 {
    let c = 2.0 * (m / EARTH_RADIUS_M / 2.0).sin();
    c * c
}

/// 1e-7 degrees to degrees.
#[inline]
pub fn deg(e7: i32) -> f64 {
    e7 as f64 * 1e-7
}

/// Which drivers a query may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Sessions with a connection now.
    Online,
    /// Connected sessions and sessions held after their connection dropped.
    OnlineOrHeld,
}

/// A selection: the K nearest drivers within `radius_m` of a point whose newest position is at
/// most `max_age_ms` old. The gate checks the bounds (§9.16) before it builds one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Query {
    /// Latitude of the centre, 1e-7 degrees.
    pub lat_e7: i32,
    /// Longitude of the centre, 1e-7 degrees.
    pub lon_e7: i32,
    /// Radius in metres, > 0.
    pub radius_m: f64,
    /// Drivers wanted at most, ≥ 1.
    pub k: usize,
    /// Ignore drivers whose newest point the gate took longer ago than this; `None`: any age.
    pub max_age_ms: Option<u64>,
    /// Which sessions count.
    pub filter: Filter,
}

/// One driver chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// The driver.
    pub uid: u64,
    /// Its newest point's latitude, 1e-7 degrees.
    pub lat_e7: i32,
    /// Its newest point's longitude, 1e-7 degrees.
    pub lon_e7: i32,
    /// Haversine distance from the query's centre, metres.
    pub distance_m: f64,
    /// How long ago the gate took the point, ms.
    pub age_ms: u64,
}

impl Hit {
    /// The order of "nearer": distance, then uid, so every shard and node picks the same K.
    pub fn cmp_near(&self, other: &Hit) -> Ordering {
        self.distance_m.total_cmp(&other.distance_m).then(self.uid.cmp(&other.uid))
    }
}

/// A candidate kept for now: ordered by squared chord, then uid (the order of `Hit::cmp_near`).
#[derive(Clone, Copy)]
struct Near {
    c2: f64,
    uid: u64,
    lat_e7: i32,
    lon_e7: i32,
    age_ms: u64,
}

impl Near {
    fn cmp_key(&self, c2: f64, uid: u64) -> Ordering {
        self.c2.total_cmp(&c2).then(self.uid.cmp(&uid))
    }
}

impl PartialEq for Near {
    fn eq(&self, o: &Near) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, o: &Near) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Near {
    fn cmp(&self, o: &Near) -> Ordering {
        self.cmp_key(o.c2, o.uid)
    }
}

/// Keeps the `k` nearest of the candidates offered to it.
pub struct Nearest {
    k: usize,
    heap: BinaryHeap<Near>,
}

impl Nearest {
    /// Keeps at most `k`.
    pub fn new(k: usize) -> Nearest {
        Nearest { k, heap: BinaryHeap::with_capacity(k.min(1024) + 1) }
    }

    /// True when a candidate at squared chord `c2` would be kept: asked before the dearer
    /// checks (the session's filter).
    #[inline]
    fn would_take(&self, c2: f64, uid: u64) -> bool {
        self.heap.len() < self.k || self.heap.peek().is_some_and(|w| w.cmp_key(c2, uid) == Ordering::Greater)
    }

    #[inline]
    fn offer(&mut self, n: Near) {
        if self.heap.len() >= self.k {
            self.heap.pop();
        }
        self.heap.push(n);
    }

    /// The kept hits, nearest first.
    pub fn into_sorted(self) -> Vec<Hit> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|n| Hit {
                uid: n.uid,
                lat_e7: n.lat_e7,
                lon_e7: n.lon_e7,
                distance_m: chord2_to_m(n.c2),
                age_ms: n.age_ms,
            })
            .collect()
    }
}

/// One driver's newest point.
#[derive(Clone, Copy, Debug)]
struct Entry {
    uid: u64,
    lat_e7: i32,
    lon_e7: i32,
    /// The fix's own time (device clock): only to keep an older point from replacing a newer.
    ts_ms: u64,
    /// When this shard took it (the gate's monotonic clock): ages count from here.
    taken_ms: u64,
    /// Its unit vector, for the distance.
    v: [f64; 3],
    /// Its cell's key and its place in that cell's list.
    cell: u64,
    at: u32,
}

/// The grid of one logic shard.
#[derive(Debug)]
pub struct GeoIndex {
    /// uid → slot in `entries`. Hashed by a multiply-shift of the uid, not SipHash: uids come
    /// from tokens the app-server signed, so no app can choose them to collide, and this lookup
    /// is on every GPS point.
    slots: HashMap<u64, u32, UidHash>,
    /// Every indexed driver; freed slots are reused.
    entries: Vec<Entry>,
    /// Free slots of `entries`.
    free: Vec<u32>,
    /// Cell key → the slots of the drivers in it (unordered).
    cells: HashMap<u64, Vec<u32>>,
    /// Columns of each row.
    cols: Box<[u32]>,
}

impl Default for GeoIndex {
    fn default() -> Self {
        GeoIndex::new()
    }
}

/// The row of a latitude; the north pole is in the last row.
#[inline]
fn row_of(lat_e7: i64) -> usize {
    (((lat_e7 + 900_000_000) / CELL_E7).max(0) as usize).min(ROWS - 1)
}

/// The column of a longitude in a row of `cols` columns; 180° is in the last.
#[inline]
fn col_of(lon_e7: i64, cols: u32) -> u32 {
    (((lon_e7 + 1_800_000_000) * cols as i64 / 3_600_000_000).max(0) as u32).min(cols - 1)
}

#[inline]
fn key(row: usize, col: u32) -> u64 {
    ((row as u64) << 32) | col as u64
}

impl GeoIndex {
    /// An empty index.
    pub fn new() -> GeoIndex {
        let cols = (0..ROWS)
            .map(|r| {
                // The row's edge nearest the equator is its widest: cells there are at most
                // CELL_E7 of the equator's degrees wide, and narrower toward the pole.
                let lo = r as f64 * CELL_E7 as f64 * 1e-7 - 90.0;
                let hi = lo + CELL_E7 as f64 * 1e-7;
                let widest = if lo <= 0.0 && hi >= 0.0 { 0.0 } else { lo.abs().min(hi.abs()) };
                ((MAX_COLS as f64 * widest.to_radians().cos()).ceil() as u32).clamp(1, MAX_COLS)
            })
            .collect();
        GeoIndex {
            slots: HashMap::default(),
            entries: Vec::new(),
            free: Vec::new(),
            cells: HashMap::new(),
            cols,
        }
    }

    /// Drivers indexed.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no driver is indexed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True when `uid` is indexed.
    pub fn contains(&self, uid: u64) -> bool {
        self.slots.contains_key(&uid)
    }

    /// The uids indexed (for checks).
    pub fn uids(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.keys().copied()
    }

    #[inline]
    fn cell_of(&self, lat_e7: i32, lon_e7: i32) -> u64 {
        let row = row_of(lat_e7 as i64);
        key(row, col_of(lon_e7 as i64, self.cols[row]))
    }

    /// Takes `uid`'s point (in range, §5.3), fixed at `ts_ms` by the device, taken at
    /// `now_ms`. A point older than the one indexed is ignored: a batch replayed after a
    /// reconnect must not move a driver back.
    #[inline]
    pub fn update(&mut self, uid: u64, lat_e7: i32, lon_e7: i32, ts_ms: u64, now_ms: u64) {
        if self.update_known(uid, lat_e7, lon_e7, ts_ms, now_ms) {
            return;
        }
        let cell = self.cell_of(lat_e7, lon_e7);
        let v = unit(lat_e7, lon_e7);
        let e = Entry { uid, lat_e7, lon_e7, ts_ms, taken_ms: now_ms, v, cell, at: 0 };
        let slot = match self.free.pop() {
            Some(s) => {
                self.entries[s as usize] = e;
                s
            }
            None => {
                self.entries.push(e);
                (self.entries.len() - 1) as u32
            }
        };
        self.slots.insert(uid, slot);
        self.link(slot, cell);
    }

    /// [`GeoIndex::update`] for a driver already indexed; false (and nothing done) for one
    /// that is not.
    #[inline]
    pub fn update_known(&mut self, uid: u64, lat_e7: i32, lon_e7: i32, ts_ms: u64, now_ms: u64) -> bool {
        let Some(&slot) = self.slots.get(&uid) else { return false };
        let e = &mut self.entries[slot as usize];
        if ts_ms < e.ts_ms {
            return true;
        }
        (e.lat_e7, e.lon_e7, e.ts_ms, e.taken_ms) = (lat_e7, lon_e7, ts_ms, now_ms);
        e.v = unit(lat_e7, lon_e7);
        let old = e.cell;
        let cell = self.cell_of(lat_e7, lon_e7);
        if old != cell {
            let at = self.entries[slot as usize].at;
            self.unlink(old, at);
            self.link(slot, cell);
        }
        true
    }

    /// Forgets `uid` (its session ended); true when it was indexed.
    pub fn remove(&mut self, uid: u64) -> bool {
        let Some(slot) = self.slots.remove(&uid) else { return false };
        let e = self.entries[slot as usize];
        self.unlink(e.cell, e.at);
        self.free.push(slot);
        true
    }

    /// Puts `slot` in `cell`'s list.
    fn link(&mut self, slot: u32, cell: u64) {
        let list = self.cells.entry(cell).or_default();
        self.entries[slot as usize].cell = cell;
        self.entries[slot as usize].at = list.len() as u32;
        list.push(slot);
    }

    /// Takes the slot at `at` out of `cell`'s list; the last one moves into its place.
    fn unlink(&mut self, cell: u64, at: u32) {
        let Some(list) = self.cells.get_mut(&cell) else { return };
        list.swap_remove(at as usize);
        if let Some(&moved) = list.get(at as usize) {
            self.entries[moved as usize].at = at;
        }
        if list.is_empty() {
            self.cells.remove(&cell);
        }
    }

    /// Offers every driver within `q`'s radius and age that `keep` accepts to `best`.
    pub fn search(&self, q: &Query, now_ms: u64, keep: impl Fn(u64) -> bool, best: &mut Nearest) {
        let (lat, lon) = (deg(q.lat_e7), deg(q.lon_e7));
        let delta = q.radius_m / EARTH_RADIUS_M;
        let delta_deg = delta.to_degrees() + BOX_MARGIN_DEG;
        let (lat_lo, lat_hi) = (lat - delta_deg, lat + delta_deg);
        // The circle's widest longitude extent, or every longitude when it holds a pole.
        let half_lon = if lat_lo <= -90.0 || lat_hi >= 90.0 || delta.sin() >= lat.to_radians().cos() {
            None
        } else {
            Some((delta.sin() / lat.to_radians().cos()).asin().to_degrees() + BOX_MARGIN_DEG)
        };
        let row_lo = row_of((lat_lo.max(-90.0) * 1e7).floor() as i64);
        let row_hi = row_of((lat_hi.min(90.0) * 1e7).ceil() as i64);
        let centre = unit(q.lat_e7, q.lon_e7);
        let max_c2 = m_to_chord2(q.radius_m);
        for row in row_lo..=row_hi {
            let n = self.cols[row];
            let (c_lo, c_hi) = match half_lon {
                Some(h) => {
                    let lo = ((lon - h + 180.0) / 360.0 * n as f64).floor() as i64;
                    let hi = ((lon + h + 180.0) / 360.0 * n as f64).floor() as i64;
                    if hi - lo + 1 >= n as i64 {
                        (0, n as i64 - 1)
                    } else {
                        (lo, hi)
                    }
                }
                None => (0, n as i64 - 1),
            };
            for c in c_lo..=c_hi {
                let col = c.rem_euclid(n as i64) as u32;
                let Some(list) = self.cells.get(&key(row, col)) else { continue };
                for &slot in list {
                    self.consider(&self.entries[slot as usize], &centre, max_c2, q, now_ms, &keep, best);
                }
            }
        }
    }

    /// One candidate: kept when in range, fresh enough, nearer than the K-th so far, and
    /// accepted by `keep`, asked last (it looks at the session).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn consider(
        &self,
        e: &Entry,
        centre: &[f64; 3],
        max_c2: f64,
        q: &Query,
        now_ms: u64,
        keep: &impl Fn(u64) -> bool,
        best: &mut Nearest,
    ) {
        let c2 = chord2(centre, &e.v);
        if c2 > max_c2 || !best.would_take(c2, e.uid) {
            return;
        }
        let age_ms = now_ms.saturating_sub(e.taken_ms);
        if q.max_age_ms.is_some_and(|max| age_ms > max) || !keep(e.uid) {
            return;
        }
        best.offer(Near { c2, uid: e.uid, lat_e7: e.lat_e7, lon_e7: e.lon_e7, age_ms });
    }

    /// The `q.k` nearest drivers within the radius and age that `keep` accepts, nearest first.
    pub fn nearest(&self, q: &Query, now_ms: u64, keep: impl Fn(u64) -> bool) -> Vec<Hit> {
        let mut best = Nearest::new(q.k);
        self.search(q, now_ms, keep, &mut best);
        best.into_sorted()
    }

    /// The same selection by looking at every driver (the benchmark's baseline).
    pub fn nearest_by_scan(&self, q: &Query, now_ms: u64, keep: impl Fn(u64) -> bool) -> Vec<Hit> {
        let mut best = Nearest::new(q.k);
        let (centre, max_c2) = (unit(q.lat_e7, q.lon_e7), m_to_chord2(q.radius_m));
        for &slot in self.slots.values() {
            self.consider(&self.entries[slot as usize], &centre, max_c2, q, now_ms, &keep, &mut best);
        }
        best.into_sorted()
    }

    /// Checks the index's own bookkeeping (for tests): every slot in exactly its cell's list at
    /// its recorded place.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = 0;
        for (&cell, list) in &self.cells {
            if list.is_empty() {
                return Err(format!("empty cell {cell:x} kept"));
            }
            for (i, &slot) in list.iter().enumerate() {
                let e = &self.entries[slot as usize];
                if e.cell != cell || e.at as usize != i || self.slots.get(&e.uid) != Some(&slot) {
                    return Err(format!("slot {slot} of uid {} misfiled", e.uid));
                }
                if self.cell_of(e.lat_e7, e.lon_e7) != cell {
                    return Err(format!("uid {} in the wrong cell", e.uid));
                }
                seen += 1;
            }
        }
        if seen != self.slots.len() {
            return Err(format!("{seen} filed, {} indexed", self.slots.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(lat: f64, lon: f64, radius_m: f64, k: usize) -> Query {
        Query {
            lat_e7: (lat * 1e7) as i32,
            lon_e7: (lon * 1e7) as i32,
            radius_m,
            k,
            max_age_ms: None,
            filter: Filter::Online,
        }
    }

    fn uids(h: &[Hit]) -> Vec<u64> {
        h.iter().map(|h| h.uid).collect()
    }

    #[test]
    fn haversine_knows_a_degree_and_the_antimeridian() {
        // One degree of a great circle: 2πR/360.
        let one = 2.0 * std::f64::consts::PI * EARTH_RADIUS_M / 360.0;
        assert!((distance_m(0.0, 0.0, 1.0, 0.0) - one).abs() < 1e-6);
        assert!((distance_m(0.0, 179.9995, 0.0, -179.9995) - one * 0.001).abs() < 1e-6);
        // Every meridian meets at the pole.
        assert!(distance_m(90.0, 10.0, 90.0, -170.0) < 1e-6);
    }

    #[test]
    fn nearest_first_ties_by_uid_and_k_bounds() {
        let mut g = GeoIndex::new();
        for uid in 1..=5u64 {
            // uids 1..5 at 100 m steps north of the centre; 6 at the same spot as 2.
            g.update(uid, (uid as i32) * 9_000, 0, 1, 0);
        }
        g.update(6, 2 * 9_000, 0, 1, 0);
        let h = g.nearest(&q(0.0, 0.0, 1_000.0, 3), 0, |_| true);
        assert_eq!(uids(&h), vec![1, 2, 6]);
        let h = g.nearest(&q(0.0, 0.0, 250.0, 10), 0, |_| true);
        assert_eq!(uids(&h), vec![1, 2, 6], "uid 3 is 300 m away");
        let h = g.nearest(&q(0.0, 0.0, 1_000.0, 10), 0, |u| u % 2 == 1);
        assert_eq!(uids(&h), vec![1, 3, 5]);
    }

    #[test]
    fn moves_removals_ages_and_older_points() {
        let mut g = GeoIndex::new();
        g.update(1, 0, 0, 10, 100);
        g.update(1, 500_000_000, 0, 20, 200); // far away, newer
        g.update(1, 0, 0, 15, 300); // older fix: ignored
        assert!(g.nearest(&q(0.0, 0.0, 1_000.0, 5), 300, |_| true).is_empty());
        let h = g.nearest(&q(50.0, 0.0, 1_000.0, 5), 1_200, |_| true);
        assert_eq!((h[0].uid, h[0].age_ms), (1, 1_000));
        let mut fresh = q(50.0, 0.0, 1_000.0, 5);
        fresh.max_age_ms = Some(999);
        assert!(g.nearest(&fresh, 1_200, |_| true).is_empty(), "too old");
        fresh.max_age_ms = Some(1_000);
        assert_eq!(g.nearest(&fresh, 1_200, |_| true).len(), 1);
        assert!(g.remove(1) && !g.remove(1));
        assert!(g.is_empty() && g.cells.is_empty());
        g.check().expect("consistent");
    }

    #[test]
    fn across_the_antimeridian_and_over_the_poles() {
        let mut g = GeoIndex::new();
        g.update(1, 0, 1_799_990_000, 1, 0); // 179.999° E
        g.update(2, 0, -1_799_990_000, 1, 0); // 179.999° W
        g.update(3, 899_995_000, 0, 1, 0); // 89.9995° N on the prime meridian
        g.update(4, 899_995_000, 1_800_000_000, 1, 0); // 89.9995° N on the antimeridian
        g.update(5, 900_000_000, 0, 1, 0); // the north pole
        g.update(6, -900_000_000, 0, 1, 0); // the south pole
                                            // Both 111 m from the antimeridian (which of the two is nearer is rounding).
        for lon in [180.0, -180.0] {
            let mut h = uids(&g.nearest(&q(0.0, lon, 500.0, 10), 0, |_| true));
            h.sort_unstable();
            assert_eq!(h, vec![1, 2]);
        }
        let h = g.nearest(&q(89.9995, 80.0, 200.0, 10), 0, |_| true);
        assert_eq!(uids(&h), vec![5, 3, 4]);
        let h = g.nearest(&q(-89.999, 123.0, 200.0, 10), 0, |_| true);
        assert_eq!(uids(&h), vec![6]);
        g.check().expect("consistent");
    }

    /// Latitudes weighted toward the poles and the equator, longitudes toward the antimeridian,
    /// so the edges of the grid are hit often.
    fn lat_e7() -> impl Strategy<Value = i32> {
        prop_oneof![
            -900_000_000..=900_000_000i32,
            899_000_000..=900_000_000i32,
            -900_000_000..=-899_000_000i32,
            -1_000_000..=1_000_000i32,
        ]
    }

    fn lon_e7() -> impl Strategy<Value = i32> {
        prop_oneof![
            -1_800_000_000..=1_800_000_000i32,
            1_799_000_000..=1_800_000_000i32,
            -1_800_000_000..=-1_799_000_000i32,
        ]
    }

    /// The selection by the haversine formula over every point, independent of the index:
    /// (distance, uid) of the K nearest in range, fresh enough and kept.
    fn brute(
        points: &HashMap<u64, (i32, i32, u64)>,
        q: &Query,
        now: u64,
        keep: impl Fn(u64) -> bool,
    ) -> Vec<(f64, u64)> {
        let mut all: Vec<(f64, u64)> = points
            .iter()
            .filter(|(&uid, &(_, _, t))| keep(uid) && q.max_age_ms.is_none_or(|m| now - t <= m))
            .map(|(&uid, &(la, lo, _))| (distance_m(deg(q.lat_e7), deg(q.lon_e7), deg(la), deg(lo)), uid))
            .filter(|&(d, _)| d <= q.radius_m)
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.truncate(q.k);
        all
    }

    /// Two computations of one distance agree within this (metres).
    const EPS_M: f64 = 1e-6;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any drivers, moved and removed at will, and any query: the index answers exactly what
        /// a scan of every driver answers.
        #[test]
        fn the_grid_answers_what_a_scan_answers(
            centre in (lat_e7(), lon_e7()),
            spread in prop_oneof![Just(1_000i32), Just(300_000), Just(1_000_000)],
            seed in any::<u64>(),
            ops in prop::collection::vec((0u64..300, 0usize..4, -1_000_000i32..=1_000_000, -3_000_000i32..=3_000_000, 0u64..1_000), 1..400),
            radius_m in prop_oneof![1.0f64..100.0, 100.0f64..5_000.0, 5_000.0f64..50_000.0],
            k in 1usize..40,
            max_age in prop::option::of(0u64..1_000),
            offset in (-1_000_000i32..=1_000_000, -3_000_000i32..=3_000_000),
        ) {
            let mut g = GeoIndex::new();
            let mut points = HashMap::new();
            // A point `d` (in millionths of the spread) from the centre, on the globe.
            let at = |dlat: i32, dlon: i32| {
                let scale = spread as i64;
                let la = (centre.0 as i64 + dlat as i64 * scale / 1_000_000).clamp(-900_000_000, 900_000_000);
                let lo = (centre.1 as i64 + dlon as i64 * scale / 1_000_000 + 1_800_000_000)
                    .rem_euclid(3_600_000_001) - 1_800_000_000;
                (la as i32, lo as i32)
            };
            for (uid, op, dlat, dlon, t) in ops {
                let (la, lo) = at(dlat, dlon);
                if op == 0 {
                    g.remove(uid);
                    points.remove(&uid);
                } else {
                    g.update(uid, la, lo, t, t);
                    if points.get(&uid).is_none_or(|p: &(i32, i32, u64)| p.2 <= t) {
                        points.insert(uid, (la, lo, t));
                    }
                }
            }
            g.check().map_err(TestCaseError::fail)?;
            let (lat_e7, lon_e7) = at(offset.0, offset.1);
            let query = Query {
                lat_e7,
                lon_e7,
                radius_m,
                k,
                max_age_ms: max_age,
                filter: Filter::Online,
            };
            let keep = |u: u64| !(u ^ seed).is_multiple_of(5);
            let got = g.nearest(&query, 1_000, keep);
            prop_assert_eq!(&got, &g.nearest_by_scan(&query, 1_000, keep));
            let want = brute(&points, &query, 1_000, keep);
            // The same distances in the same order (which of two drivers equally far comes
            // first, or whether one on the circle itself counts, may differ by rounding).
            for (h, w) in got.iter().zip(&want) {
                prop_assert!((h.distance_m - w.0).abs() <= EPS_M, "{:?} vs {:?}", h, w);
                let (la, lo, _) = points[&h.uid];
                prop_assert!((h.lat_e7, h.lon_e7) == (la, lo));
                let d = distance_m(deg(query.lat_e7), deg(query.lon_e7), deg(la), deg(lo));
                prop_assert!((d - h.distance_m).abs() <= EPS_M && d <= radius_m + EPS_M);
            }
            if got.len() != want.len() {
                let (short, long) = if got.len() < want.len() {
                    (got.len(), want.iter().map(|w| w.0).collect::<Vec<_>>())
                } else {
                    (want.len(), got.iter().map(|h| h.distance_m).collect())
                };
                prop_assert!(long[short..].iter().all(|d| (d - radius_m).abs() <= EPS_M), "{:?} vs {:?}", got, want);
            }
        }
    }
}
