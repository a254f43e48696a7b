//! The dispatch rules of the example app-server, without sockets: driver positions from GPS
//! batches, an order offered to the nearest K drivers, the first grab wins, the passenger told.
//!
//! Payloads: an offer (push kind 1) and an order status (push kind 2, and the payload of every
//! order Reply) are both `OrderStatus` tables, so apps read the order id the same way.

use schema::wire::{self, OrderState, UidGpsPoint};
use schema::Encoder;
use std::collections::{HashMap, VecDeque};

/// Push kind of an order offer to a driver.
pub const KIND_OFFER: u16 = 1;
/// Push kind of an order status to a passenger.
pub const KIND_STATUS: u16 = 2;
/// Reply code: no driver is known near the pickup.
pub const CODE_NO_DRIVER: u16 = 503;
/// Reply code: another driver took the order first.
pub const CODE_TAKEN: u16 = 409;
/// Reply code: no such order (or it was forgotten).
pub const CODE_NO_ORDER: u16 = 404;
/// Reply code: the caller's role may not do this (a driver placing an order).
pub const CODE_FORBIDDEN: u16 = 403;
/// Most orders remembered; the oldest are forgotten past it.
pub const MAX_ORDERS: usize = 200_000;
/// Most driver positions remembered (one per driver uid).
pub const MAX_POSITIONS: usize = 2_000_000;

/// An answer for the requesting app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 0 for success, else one of the `CODE_*`.
    pub code: u16,
    /// Text for logs.
    pub message: &'static str,
    /// An `OrderStatus` table (empty for none).
    pub payload: Vec<u8>,
}

/// A push the app-server should send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOut {
    /// Targets.
    pub uids: Vec<u64>,
    /// `KIND_OFFER` or `KIND_STATUS`.
    pub kind: u16,
    /// An `OrderStatus` table.
    pub payload: Vec<u8>,
}

/// One order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Order {
    /// Who placed it.
    passenger: u64,
    /// The winner, once taken.
    driver: Option<u64>,
    /// Its state.
    state: OrderState,
}

/// Counts for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DispatchStats {
    /// Orders placed and offered.
    pub placed: u64,
    /// Orders with no driver to offer them to.
    pub no_driver: u64,
    /// Offers pushed (pairs).
    pub offers: u64,
    /// Grabs that won.
    pub taken: u64,
    /// Grabs too late.
    pub too_late: u64,
    /// GPS points received.
    pub gps_points: u64,
}

/// The dispatch state.
#[derive(Debug)]
pub struct Dispatch {
    /// Drivers offered each order.
    k: usize,
    /// Last known position of each driver: (lat_e7, lon_e7).
    positions: HashMap<u64, (i32, i32)>,
    /// Orders by id.
    orders: HashMap<u64, Order>,
    /// Order ids, oldest first, to forget the oldest past `MAX_ORDERS`.
    order_age: VecDeque<u64>,
    /// Last order id handed out.
    next_order: u64,
    /// Builder for payloads.
    enc: Encoder,
    /// Counts.
    pub stats: DispatchStats,
}

impl Dispatch {
    /// A dispatcher offering each order to `k` drivers; order ids start after `first_order`.
    pub fn new(k: usize, first_order: u64) -> Dispatch {
        Dispatch {
            k: k.max(1),
            positions: HashMap::new(),
            orders: HashMap::new(),
            order_age: VecDeque::new(),
            next_order: first_order,
            enc: Encoder::new(),
            stats: DispatchStats::default(),
        }
    }

    /// Takes drivers' latest positions from a GPS batch.
    pub fn on_gps(&mut self, points: &[UidGpsPoint]) {
        self.stats.gps_points += points.len() as u64;
        for p in points {
            let pt = p.point();
            if self.positions.len() < MAX_POSITIONS || self.positions.contains_key(&p.uid()) {
                self.positions.insert(p.uid(), (pt.lat_e7(), pt.lon_e7()));
            }
        }
    }

    /// Drivers with a known position.
    pub fn drivers_known(&self) -> usize {
        self.positions.len()
    }

    /// The `k` drivers nearest to (lat, lon), nearest first.
    pub fn nearest(&self, lat_e7: i32, lon_e7: i32, k: usize) -> Vec<u64> {
        nearest(&self.positions, lat_e7, lon_e7, k)
    }

    /// A passenger places an order from (lat, lon): the answer, and the offer to push.
    pub fn place(&mut self, passenger: u64, lat_e7: i32, lon_e7: i32) -> (Answer, Option<PushOut>) {
        let drivers = self.nearest(lat_e7, lon_e7, self.k);
        self.next_order += 1;
        let id = self.next_order;
        if drivers.is_empty() {
            self.stats.no_driver += 1;
            let payload = self.status(id, OrderState::NoDriver, 0);
            return (Answer { code: CODE_NO_DRIVER, message: "no driver nearby", payload }, None);
        }
        self.remember(id, Order { passenger, driver: None, state: OrderState::Offered });
        self.stats.placed += 1;
        self.stats.offers += drivers.len() as u64;
        let payload = self.status(id, OrderState::Offered, 0);
        let offer = PushOut { uids: drivers, kind: KIND_OFFER, payload: payload.clone() };
        (Answer { code: 0, message: "order offered", payload }, Some(offer))
    }

    /// A passenger places an order the gate offers (`--dispatch geo`): its id and the offer's
    /// payload; `offered` tells, once the gate chose, whether any driver got it.
    pub fn place_by_gate(&mut self, passenger: u64) -> (u64, Vec<u8>) {
        self.next_order += 1;
        let id = self.next_order;
        self.remember(id, Order { passenger, driver: None, state: OrderState::Offered });
        (id, self.status(id, OrderState::Offered, 0))
    }

    /// The gate offered order `id` to `drivers` (`--dispatch geo`): the answer for the passenger.
    pub fn offered(&mut self, id: u64, drivers: usize) -> Answer {
        if drivers == 0 {
            self.stats.no_driver += 1;
            if let Some(o) = self.orders.get_mut(&id) {
                o.state = OrderState::NoDriver;
            }
            let payload = self.status(id, OrderState::NoDriver, 0);
            return Answer { code: CODE_NO_DRIVER, message: "no driver nearby", payload };
        }
        self.stats.placed += 1;
        self.stats.offers += drivers as u64;
        let payload = self.status(id, OrderState::Offered, 0);
        Answer { code: 0, message: "order offered", payload }
    }

    /// A driver grabs an order: the first wins and the passenger is told; later ones hear
    /// "order taken".
    pub fn grab(&mut self, driver: u64, order_id: u64) -> (Answer, Option<PushOut>) {
        let Some(o) = self.orders.get_mut(&order_id) else {
            return (Answer { code: CODE_NO_ORDER, message: "no such order", payload: Vec::new() }, None);
        };
        if o.driver.is_some() {
            self.stats.too_late += 1;
            return (Answer { code: CODE_TAKEN, message: "order taken", payload: Vec::new() }, None);
        }
        o.driver = Some(driver);
        o.state = OrderState::Taken;
        let passenger = o.passenger;
        self.stats.taken += 1;
        let payload = self.status(order_id, OrderState::Taken, driver);
        let told = PushOut { uids: vec![passenger], kind: KIND_STATUS, payload: payload.clone() };
        (Answer { code: 0, message: "order is yours", payload }, Some(told))
    }

    /// The status of an order, for an OrderStatus request.
    pub fn query(&mut self, order_id: u64) -> Answer {
        match self.orders.get(&order_id).copied() {
            Some(o) => {
                let payload = self.status(order_id, o.state, o.driver.unwrap_or(0));
                Answer { code: 0, message: "", payload }
            }
            None => Answer { code: CODE_NO_ORDER, message: "no such order", payload: Vec::new() },
        }
    }

    fn remember(&mut self, id: u64, o: Order) {
        if self.order_age.len() >= MAX_ORDERS {
            if let Some(old) = self.order_age.pop_front() {
                self.orders.remove(&old);
            }
        }
        self.orders.insert(id, o);
        self.order_age.push_back(id);
    }

    fn status(&mut self, order_id: u64, state: OrderState, driver_uid: u64) -> Vec<u8> {
        encode_status(&mut self.enc, order_id, state, driver_uid)
    }
}

/// Encodes an `OrderStatus` table.
pub fn encode_status(enc: &mut Encoder, order_id: u64, state: OrderState, driver_uid: u64) -> Vec<u8> {
    enc.body(|b| {
        wire::OrderStatus::create(b, &wire::OrderStatusArgs { order_id, state, driver_uid, message: None })
    })
    .to_vec()
}

/// Reads an `OrderStatus` payload: (order id, state, driver uid); an empty payload is all
/// defaults, a corrupt one `None`.
pub fn decode_status(payload: &[u8]) -> Option<(u64, OrderState, u64)> {
    if payload.is_empty() {
        return Some((0, OrderState::Unknown, 0));
    }
    let s = schema::flatbuffers::root::<wire::OrderStatus>(payload).ok()?;
    Some((s.order_id(), s.state(), s.driver_uid()))
}

/// The `k` uids of `positions` nearest to (lat, lon), nearest first (ties by uid). Distances
/// are equirectangular: exact enough within a city, and cheap.
pub fn nearest(positions: &HashMap<u64, (i32, i32)>, lat_e7: i32, lon_e7: i32, k: usize) -> Vec<u64> {
    if k == 0 || positions.is_empty() {
        return Vec::new();
    }
    let cos = (f64::from(lat_e7) * 1e-7).to_radians().cos();
    let mut all: Vec<(f64, u64)> = positions
        .iter()
        .map(|(&uid, &(la, lo))| {
            let dy = f64::from(la) - f64::from(lat_e7);
            let dx = (f64::from(lo) - f64::from(lon_e7)) * cos;
            (dx * dx + dy * dy, uid)
        })
        .collect();
    let by = |a: &(f64, u64), b: &(f64, u64)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    if all.len() > k {
        all.select_nth_unstable_by(k - 1, by);
        all.truncate(k);
    }
    all.sort_unstable_by(by);
    all.into_iter().map(|(_, uid)| uid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use schema::wire::GpsPoint;

    fn at(uid: u64, lat: i32, lon: i32) -> UidGpsPoint {
        UidGpsPoint::new(uid, &GpsPoint::new(1, lat, lon, 0, 0, 0, 0))
    }

    #[test]
    fn nearest_k_in_order() {
        let mut p = HashMap::new();
        p.insert(1, (399_000_000, 1_164_000_000));
        p.insert(2, (399_100_000, 1_164_000_000)); // 0.01° north
        p.insert(3, (399_000_000, 1_164_300_000)); // 0.03° east (≈0.023° at this latitude)
        p.insert(4, (400_000_000, 1_164_000_000)); // far
        assert_eq!(nearest(&p, 399_000_000, 1_164_000_000, 2), vec![1, 2]);
        assert_eq!(nearest(&p, 399_000_000, 1_164_000_000, 3), vec![1, 2, 3]);
        assert_eq!(nearest(&p, 399_000_000, 1_164_000_000, 10), vec![1, 2, 3, 4]);
        assert!(nearest(&p, 0, 0, 0).is_empty());
        assert!(nearest(&HashMap::new(), 0, 0, 3).is_empty());
    }

    #[test]
    fn first_grab_wins_and_the_passenger_is_told() {
        let mut d = Dispatch::new(2, 100);
        let (a, offer) = d.place(9, 0, 0);
        assert_eq!((a.code, offer), (CODE_NO_DRIVER, None), "no positions yet");
        d.on_gps(&[at(1, 10, 10), at(2, 20, 20), at(3, 1_000_000, 0)]);
        let (a, offer) = d.place(9, 0, 0);
        assert_eq!(a.code, 0);
        let offer = offer.expect("an offer");
        assert_eq!((offer.uids.as_slice(), offer.kind), (&[1, 2][..], KIND_OFFER));
        let (order, state, _) = decode_status(&offer.payload).expect("status payload");
        assert_eq!(state, OrderState::Offered);

        let (won, told) = d.grab(2, order);
        assert_eq!(won.code, 0);
        let told = told.expect("the passenger is told");
        assert_eq!((told.uids.as_slice(), told.kind), (&[9][..], KIND_STATUS));
        assert_eq!(decode_status(&told.payload), Some((order, OrderState::Taken, 2)));
        let (late, none) = d.grab(1, order);
        assert_eq!((late.code, none), (CODE_TAKEN, None));
        assert_eq!(d.grab(1, 12345).0.code, CODE_NO_ORDER);
        assert_eq!(decode_status(&d.query(order).payload), Some((order, OrderState::Taken, 2)));
        assert_eq!((d.stats.placed, d.stats.no_driver, d.stats.taken, d.stats.too_late), (1, 1, 1, 1));
    }
}
