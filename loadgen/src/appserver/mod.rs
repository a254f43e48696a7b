//! The app-server side of a run, over `client::AppServerConn` (blocking, its own threads):
//! several sidecar connections, one events thread that runs the dispatch rules and the audit
//! of receipts, and for push scenarios a pusher thread that pushes to random drivers at a rate.
//!
//! The same code runs alone as `loadgen appserver` ([`run_standalone`]).

pub mod dispatch;

use crate::audit::{Audit, AuditSummary};
use crate::plan::DispatchMode;
use client::{
    AppServerConn, AppServerEvent, AppServerEvents, ClientError, GeoPushSpec, GeoSpec, PushSpec,
    UpstreamRequest,
};
use dispatch::{Dispatch, DispatchStats, PushOut};
use rand::{Rng, SeedableRng};
use schema::wire::{ErrorCode, Role};
use schema::{Body, Cmd};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Connect, hello and write timeout of the sidecar connections.
const SIDECAR_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to keep trying to reach the sidecar port at start (the gate may be starting).
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// Kind of the benchmark pushes (not an order: drivers only ack and show them).
pub const KIND_BENCH: u16 = 100;
/// Largest batch of events handled under one audit lock.
const EVENT_BATCH: usize = 1024;

/// What the app-server does besides answering.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gate's sidecar port.
    pub sidecar: SocketAddr,
    /// The hello's secret.
    pub secret: Vec<u8>,
    /// Connections to open.
    pub conns: u32,
    /// Drivers offered each order.
    pub dispatch_k: u32,
    /// Who chooses them.
    pub dispatch: DispatchMode,
    /// TTL of every push, ms.
    pub ttl_ms: u32,
    /// Benchmark pushes per second (0: none).
    pub push_rate: f64,
    /// Drivers each benchmark push names.
    pub fanout: u32,
    /// Payload bytes of benchmark pushes.
    pub payload_bytes: u32,
    /// The driver uids benchmark pushes pick from: `first..first+count`.
    pub drivers: (u64, u32),
    /// Slow readers to push large payloads to (`bad`): uids `first..first+count`, payload bytes.
    pub slow_readers: (u64, u32, u32),
    /// `geo`: orders offered by GeoPush at random points, each answer checked.
    pub geo: Option<GeoLoad>,
}

/// The `geo` scenario's orders.
#[derive(Debug, Clone)]
pub struct GeoLoad {
    /// GeoPush requests per second.
    pub rate: f64,
    /// The area's centre (degrees) and half sides (degrees of latitude, longitude).
    pub area: ((f64, f64), (f64, f64)),
    /// Every position the drivers sent.
    pub track: Arc<crate::geo::Track>,
}

/// What the `geo` orders found.
#[derive(Debug, Clone)]
pub struct GeoStats {
    /// GeoPush requests answered.
    pub queries: u64,
    /// Drivers chosen, over every answer.
    pub chosen: u64,
    /// Chosen drivers that could not be chosen (`crate::geo::check`).
    pub wrong: u64,
    /// Drivers that had to be chosen and were left out.
    pub missed: u64,
    /// Answers to orders with more drivers surely in range than K.
    pub over_k: u64,
    /// Requests that failed (an error answer or no answer).
    pub failed: u64,
    /// Request to answer, µs.
    pub latency_us: hdrhistogram::Histogram<u64>,
}

impl Default for GeoStats {
    fn default() -> Self {
        GeoStats {
            queries: 0,
            chosen: 0,
            wrong: 0,
            missed: 0,
            over_k: 0,
            failed: 0,
            latency_us: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
                hdrhistogram::Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sig figures"))
            }),
        }
    }
}

/// Counters of the app-server side, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// GPS points received in GpsForward events.
    pub gps_points: AtomicU64,
    /// Upstream requests answered.
    pub upstream: AtomicU64,
    /// Pushes the gate refused.
    pub push_refused: AtomicU64,
    /// Pushes that could not be sent (connection gone, too many in flight).
    pub push_failed: AtomicU64,
    /// Replies that could not be sent.
    pub reply_failed: AtomicU64,
    /// Unreachable events.
    pub unreachable_events: AtomicU64,
    /// Sidecar connections lost.
    pub connections_lost: AtomicU64,
}

/// State shared by the events thread, the pusher and the caller.
struct Shared {
    /// Every pushed pair and its receipt.
    audit: Mutex<Audit>,
    /// Counters.
    counters: Counters,
    /// Last message id handed out.
    next_message: AtomicU64,
    /// Round-robin position over the connections.
    next_conn: AtomicUsize,
    /// Pushing may start (the measured window began).
    start_pushing: AtomicBool,
    /// Stop pushing (the drain before the final audit).
    stop_pushing: AtomicBool,
    /// The client declared the gate lost before `finish` closed the connections.
    gate_lost: AtomicBool,
    /// `finish` is closing the connections: their end is not the gate's doing.
    closing: AtomicBool,
    /// `geo`: what the orders found.
    geo: Mutex<GeoStats>,
}

/// What the app-server side found, at the end.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The audit's figures.
    pub audit: AuditSummary,
    /// Receipts by outcome name.
    pub outcomes: Vec<(&'static str, u64)>,
    /// Delivered pairs (message id, uid), for the cross-check with what apps showed.
    pub delivered_pairs: Vec<(u64, u64)>,
    /// Dispatch counts.
    pub dispatch: DispatchStats,
    /// GPS points received.
    pub gps_points: u64,
    /// Pushes the gate refused.
    pub push_refused: u64,
    /// Pushes that could not be sent.
    pub push_failed: u64,
    /// Replies that could not be sent.
    pub reply_failed: u64,
    /// Upstream requests answered.
    pub upstream: u64,
    /// Unreachable events.
    pub unreachable_events: u64,
    /// Sidecar connections lost.
    pub connections_lost: u64,
    /// The client declared the gate lost before the end.
    pub gate_lost: bool,
    /// `geo`: what the orders found.
    pub geo: GeoStats,
}

/// A running app-server.
pub struct AppServer {
    /// The sidecar connections; pushes go round-robin over them.
    conns: Arc<Vec<AppServerConn>>,
    /// Shared state.
    shared: Arc<Shared>,
    /// The events thread; returns the dispatch counts.
    events: Option<JoinHandle<DispatchStats>>,
    /// The pusher thread, for push scenarios.
    pusher: Option<JoinHandle<()>>,
}

/// Wall clock µs, the unit of `sent_at_us`; message ids start from it so consecutive runs
/// against one gate never reuse an id.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AppServer {
    /// Connects `cfg.conns` sidecar connections (retrying while the port refuses, up to 10 s)
    /// and starts the events thread, and the pusher if `cfg.push_rate` > 0.
    pub fn start(cfg: Config) -> Result<AppServer, ClientError> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        let (first, events) = loop {
            match AppServerConn::connect(cfg.sidecar, &cfg.secret, "loadgen-dispatch", SIDECAR_TIMEOUT) {
                Ok(c) => break c,
                Err(ClientError::Io(e))
                    if Instant::now() < deadline && e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        };
        let mut conns = vec![first];
        for _ in 1..cfg.conns.max(1) {
            conns.push(conns[0].connect_another()?);
        }
        let conns = Arc::new(conns);
        let shared = Arc::new(Shared {
            audit: Mutex::new(Audit::new()),
            counters: Counters::default(),
            next_message: AtomicU64::new(now_us()),
            next_conn: AtomicUsize::new(0),
            start_pushing: AtomicBool::new(false),
            stop_pushing: AtomicBool::new(false),
            gate_lost: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            geo: Mutex::new(GeoStats::default()),
        });
        let events = {
            let (conns, shared, cfg) = (conns.clone(), shared.clone(), cfg.clone());
            thread::Builder::new()
                .name("appserver-events".into())
                .spawn(move || events_loop(&conns, &shared, &cfg, &events))
                .map_err(ClientError::Io)?
        };
        let pusher = if let Some(g) = cfg.geo.clone().filter(|g| g.rate > 0.0) {
            let (conns, shared, cfg) = (conns.clone(), shared.clone(), cfg.clone());
            Some(
                thread::Builder::new()
                    .name("appserver-geo".into())
                    .spawn(move || geo_loop(&conns, &shared, &cfg, &g))
                    .map_err(ClientError::Io)?,
            )
        } else if cfg.push_rate > 0.0 && (cfg.fanout > 0 || cfg.slow_readers.1 > 0) {
            let (conns, shared) = (conns.clone(), shared.clone());
            Some(
                thread::Builder::new()
                    .name("appserver-pusher".into())
                    .spawn(move || pusher_loop(&conns, &shared, &cfg))
                    .map_err(ClientError::Io)?,
            )
        } else {
            None
        };
        Ok(AppServer { conns, shared, events: Some(events), pusher })
    }

    /// Pairs pushed and still waiting for their receipt.
    pub fn pending(&self) -> usize {
        self.conns.first().map_or(0, |c| c.pending_receipts())
    }

    /// Pushes sent and not answered yet, over every connection.
    pub fn in_flight(&self) -> usize {
        self.conns.iter().map(|c| c.pushes_in_flight()).sum()
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The audit's figures so far.
    pub fn audit(&self) -> AuditSummary {
        lock(&self.shared.audit).summary()
    }

    /// True once the client declared the gate lost (every connection gone and no reconnect to
    /// the same gate process within its bound).
    pub fn gate_lost(&self) -> bool {
        self.shared.gate_lost.load(Relaxed)
    }

    /// Lets the pusher begin (once every session is up, so pushes measure delivery, not
    /// logins).
    pub fn start_pushing(&self) {
        self.shared.start_pushing.store(true, Relaxed);
    }

    /// Stops the pusher (dispatch still answers and pushes order status).
    pub fn stop_pushing(&mut self) {
        self.shared.stop_pushing.store(true, Relaxed);
        if let Some(p) = self.pusher.take() {
            let _ = p.join();
        }
    }

    /// Closes every connection, waits for the events thread, and returns the figures. Pairs
    /// still pending now end as GateLost (lost).
    pub fn finish(mut self) -> Outcome {
        self.stop_pushing();
        self.shared.closing.store(true, Relaxed);
        for c in self.conns.iter() {
            let _ = c.close();
        }
        let dispatch = self.events.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let audit = lock(&self.shared.audit);
        let c = &self.shared.counters;
        Outcome {
            audit: audit.summary(),
            outcomes: audit.outcomes(),
            delivered_pairs: audit.delivered_pairs().to_vec(),
            dispatch,
            gps_points: c.gps_points.load(Relaxed),
            push_refused: c.push_refused.load(Relaxed),
            push_failed: c.push_failed.load(Relaxed),
            reply_failed: c.reply_failed.load(Relaxed),
            upstream: c.upstream.load(Relaxed),
            unreachable_events: c.unreachable_events.load(Relaxed),
            connections_lost: c.connections_lost.load(Relaxed),
            gate_lost: self.shared.gate_lost.load(Relaxed),
            geo: lock(&self.shared.geo).clone(),
        }
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.shared.stop_pushing.store(true, Relaxed);
        for c in self.conns.iter() {
            let _ = c.close();
        }
    }
}

/// Sends one push on the next live connection, recording it in the audit first (its receipts
/// may arrive before its acceptance). Returns false if it could not be sent.
fn push(
    conns: &[AppServerConn],
    shared: &Shared,
    uids: Vec<u64>,
    kind: u16,
    payload: Vec<u8>,
    ttl_ms: u32,
) -> bool {
    let message_id = shared.next_message.fetch_add(1, Relaxed) + 1;
    let targets = uids.len() as u32;
    if !lock(&shared.audit).pushed(message_id, targets) {
        shared.counters.push_failed.fetch_add(1, Relaxed);
        return false;
    }
    let spec = PushSpec { message_id, uids, payload, ttl_ms, broadcast: 0, kind, log_id: message_id };
    let start = shared.next_conn.fetch_add(1, Relaxed);
    for i in 0..conns.len() {
        let conn = &conns[(start + i) % conns.len()];
        match conn.push_async(&spec) {
            Ok(_) => return true,
            // That connection is gone, its pipeline is full, or the write failed before the
            // push's last byte (so the gate cannot have read it): the client registered nothing,
            // and another connection may carry the push.
            Err(ClientError::Closed | ClientError::QueueFull | ClientError::Io(_) | ClientError::Timeout) => {
                continue
            }
            Err(_) => break,
        }
    }
    lock(&shared.audit).unsent(message_id);
    shared.counters.push_failed.fetch_add(1, Relaxed);
    false
}

/// `geo`: GeoPush orders at random points of the area at `g.rate` a second (radius 1–5 km,
/// K = 20), each answer timed and checked against the positions the drivers sent.
fn geo_loop(conns: &[AppServerConn], shared: &Shared, cfg: &Config, g: &GeoLoad) {
    use crate::geo;
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let interval = Duration::from_secs_f64(1.0 / g.rate);
    while !shared.start_pushing.load(Relaxed) {
        if shared.stop_pushing.load(Relaxed) || shared.gate_lost.load(Relaxed) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let ((lat0, lon0), (half_lat, half_lon)) = g.area;
    let mut next = Instant::now();
    while !shared.stop_pushing.load(Relaxed) && !shared.gate_lost.load(Relaxed) {
        let lat_e7 = ((lat0 + rng.random_range(-half_lat..half_lat)) * 1e7) as i32;
        let lon_e7 = ((lon0 + rng.random_range(-half_lon..half_lon)) * 1e7) as i32;
        let radius_m = rng.random_range(geo::RADIUS_M.0..=geo::RADIUS_M.1);
        let message_id = shared.next_message.fetch_add(1, Relaxed) + 1;
        let q = GeoSpec { lat_e7, lon_e7, radius_m, k: geo::K, log_id: message_id, ..GeoSpec::default() };
        let p =
            GeoPushSpec { message_id, payload: b"geo order".to_vec(), ttl_ms: cfg.ttl_ms, kind: KIND_BENCH };
        lock(&shared.audit).pushed(message_id, 0);
        let conn = &conns[shared.next_conn.fetch_add(1, Relaxed) % conns.len()];
        let sent_ms = client::now_ms();
        let t = Instant::now();
        let answer = conn.geo_push(&q, &p);
        let latency_us = t.elapsed().as_micros() as u64;
        let answered_ms = client::now_ms();
        match answer {
            Ok(hits) => {
                let mut audit = lock(&shared.audit);
                audit.pushed(message_id, hits.len() as u32);
                audit.accepted(message_id, hits.len() as u32);
                drop(audit);
                let asked = geo::Asked { lat_e7, lon_e7, radius_m, k: geo::K, sent_ms, answered_ms };
                let chosen: Vec<geo::Chosen> = hits
                    .iter()
                    .map(|h| geo::Chosen { uid: h.uid, lat_e7: h.lat_e7, lon_e7: h.lon_e7 })
                    .collect();
                let v = g.track.with(|t| geo::check(t, &asked, &chosen));
                let mut s = lock(&shared.geo);
                s.queries += 1;
                s.chosen += hits.len() as u64;
                s.wrong += v.wrong;
                s.missed += v.missed;
                s.over_k += u64::from(v.candidates > u64::from(geo::K));
                let _ = s.latency_us.record(latency_us.max(1));
            }
            Err(e) => {
                tracing_free_note(&e);
                lock(&shared.audit).refused(message_id);
                lock(&shared.geo).failed += 1;
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now;
        }
    }
}

/// A failed geo request, on stderr (loadgen has no log): the first few only.
fn tracing_free_note(e: &ClientError) {
    static SHOWN: AtomicU64 = AtomicU64::new(0);
    if SHOWN.fetch_add(1, Relaxed) < 5 {
        eprintln!("loadgen geo: a GeoPush failed: {e}");
    }
}

/// Pushes at `cfg.push_rate` to `cfg.fanout` random drivers, and to every slow reader, until
/// told to stop.
fn pusher_loop(conns: &[AppServerConn], shared: &Shared, cfg: &Config) {
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let interval = Duration::from_secs_f64(1.0 / cfg.push_rate);
    let (first_driver, drivers) = cfg.drivers;
    let fanout = cfg.fanout.min(drivers) as usize;
    let payload = vec![0xA5u8; cfg.payload_bytes as usize];
    let (first_slow, slow, slow_bytes) = cfg.slow_readers;
    let slow_payload = vec![0x5Au8; slow_bytes as usize];
    while !shared.start_pushing.load(Relaxed) {
        if shared.stop_pushing.load(Relaxed) || shared.gate_lost.load(Relaxed) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut next = Instant::now();
    while !shared.stop_pushing.load(Relaxed) && !shared.gate_lost.load(Relaxed) {
        if fanout > 0 {
            let uids: Vec<u64> = rand::seq::index::sample(&mut rng, drivers as usize, fanout)
                .into_iter()
                .map(|i| first_driver + i as u64)
                .collect();
            push(conns, shared, uids, KIND_BENCH, payload.clone(), cfg.ttl_ms);
        }
        if slow > 0 {
            let uids = (0..u64::from(slow)).map(|k| first_slow + k).collect();
            push(conns, shared, uids, KIND_BENCH, slow_payload.clone(), cfg.ttl_ms);
        }
        // Pushes keep their rate on average; jitter spreads them like real dispatch.
        next += interval.mul_f64(rng.random_range(0.8..1.2));
        let now = Instant::now();
        if next > now {
            // Sleep in short steps so a stop is noticed quickly.
            while Instant::now() < next && !shared.stop_pushing.load(Relaxed) {
                thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
            }
        } else if now - next > Duration::from_secs(1) {
            next = now;
        }
    }
}

/// Handles every event until the group ends: receipts into the audit, upstream requests
/// through the dispatch rules, GPS into driver positions.
fn events_loop(
    conns: &[AppServerConn],
    shared: &Shared,
    cfg: &Config,
    events: &AppServerEvents,
) -> DispatchStats {
    let mut d = Dispatch::new(cfg.dispatch_k as usize, now_us());
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    // Ends when every reader thread is gone.
    while let Ok(first) = events.recv() {
        batch.push(first);
        batch.extend(events.try_iter().take(EVENT_BATCH - 1));
        for ev in batch.drain(..) {
            on_event(conns, shared, cfg, &mut d, ev);
        }
    }
    d.stats
}

fn on_event(conns: &[AppServerConn], shared: &Shared, cfg: &Config, d: &mut Dispatch, ev: AppServerEvent) {
    let c = &shared.counters;
    match ev {
        AppServerEvent::Receipt { message_id, uid, outcome } => {
            lock(&shared.audit).receipt(message_id, uid, outcome)
        }
        AppServerEvent::PushAnswer { message_id, result, .. } => match result {
            Ok(targets) => lock(&shared.audit).accepted(message_id, targets),
            Err(e) if e.refused => {
                c.push_refused.fetch_add(1, Relaxed);
                lock(&shared.audit).refused(message_id);
            }
            // No usable answer: the pairs stay pending in the client and end with receipts.
            Err(_) => {}
        },
        AppServerEvent::Gps(points) => {
            c.gps_points.fetch_add(points.len() as u64, Relaxed);
            d.on_gps(&points);
        }
        AppServerEvent::Upstream(req) => {
            c.upstream.fetch_add(1, Relaxed);
            answer(conns, shared, cfg, d, &req);
        }
        AppServerEvent::Unreachable { .. } => {
            c.unreachable_events.fetch_add(1, Relaxed);
        }
        AppServerEvent::ConnectionLost { .. } => {
            if !shared.closing.load(Relaxed) {
                c.connections_lost.fetch_add(1, Relaxed);
            }
        }
        // The client got back to the same gate: what is pending will still get its receipts.
        AppServerEvent::Reconnected { .. } => {}
        AppServerEvent::GateLost => {
            if !shared.closing.load(Relaxed) {
                shared.gate_lost.store(true, Relaxed);
            }
        }
    }
}

/// Answers one app request by the dispatch rules, then sends the push it calls for.
fn answer(conns: &[AppServerConn], shared: &Shared, cfg: &Config, d: &mut Dispatch, req: &UpstreamRequest) {
    let Some(conn) = conns.first() else { return };
    let role = Role(req.role);
    let result = match (req.app_cmd(), req.app_body()) {
        (Some(Cmd::PlaceOrder), Ok(Body::PlaceOrder(p)))
            if role == Role::Passenger && cfg.dispatch == DispatchMode::Geo =>
        {
            let a = offer_by_gate(conns, shared, cfg, d, req.uid, p.from_lat_e7(), p.from_lon_e7());
            conn.reply(req, a.code, a.message, &a.payload)
        }
        (Some(Cmd::PlaceOrder), Ok(Body::PlaceOrder(p))) if role == Role::Passenger => {
            let (a, push_out) = d.place(req.uid, p.from_lat_e7(), p.from_lon_e7());
            let r = conn.reply(req, a.code, a.message, &a.payload);
            send(conns, shared, cfg, push_out);
            r
        }
        (Some(Cmd::GrabOrder), Ok(Body::GrabOrder(g))) if role == Role::Driver => {
            let (a, push_out) = d.grab(req.uid, g.order_id());
            let r = conn.reply(req, a.code, a.message, &a.payload);
            send(conns, shared, cfg, push_out);
            r
        }
        (Some(Cmd::PlaceOrder | Cmd::GrabOrder), Ok(_)) => {
            conn.reply(req, dispatch::CODE_FORBIDDEN, "not allowed for this role", &[])
        }
        (Some(Cmd::OrderStatus), Ok(Body::OrderStatusQuery(q))) => {
            let a = d.query(q.order_id());
            conn.reply(req, a.code, a.message, &a.payload)
        }
        (Some(Cmd::BusinessRequest), Ok(_)) => conn.reply(req, 0, "ok", &[]),
        _ => conn.reply_error(req, ErrorCode::UnknownCmd, "this app-server does not handle that request"),
    };
    if result.is_err() {
        shared.counters.reply_failed.fetch_add(1, Relaxed);
    }
}

/// Radius of a GeoPush offer (`--dispatch geo`), metres: the reach the local search has in
/// effect over the fleet's city.
pub const GEO_OFFER_RADIUS_M: u32 = 5_000;

/// `--dispatch geo`: one GeoPush offers the order to the K nearest drivers the gate knows; the
/// answer for the passenger says whether any got it.
fn offer_by_gate(
    conns: &[AppServerConn],
    shared: &Shared,
    cfg: &Config,
    d: &mut Dispatch,
    passenger: u64,
    lat_e7: i32,
    lon_e7: i32,
) -> dispatch::Answer {
    let (order, payload) = d.place_by_gate(passenger);
    let message_id = shared.next_message.fetch_add(1, Relaxed) + 1;
    let q = GeoSpec {
        lat_e7,
        lon_e7,
        radius_m: GEO_OFFER_RADIUS_M,
        k: cfg.dispatch_k,
        log_id: message_id,
        ..GeoSpec::default()
    };
    let p = GeoPushSpec { message_id, payload, ttl_ms: cfg.ttl_ms, kind: dispatch::KIND_OFFER };
    // Registered before it goes, with its targets counted once the answer names them: a
    // receipt may beat the answer.
    if !lock(&shared.audit).pushed(message_id, 0) {
        shared.counters.push_failed.fetch_add(1, Relaxed);
        return d.offered(order, 0);
    }
    match conns.first().map(|c| c.geo_push(&q, &p)) {
        Some(Ok(hits)) => {
            let mut audit = lock(&shared.audit);
            audit.pushed(message_id, hits.len() as u32);
            audit.accepted(message_id, hits.len() as u32);
            drop(audit);
            d.offered(order, hits.len())
        }
        Some(Err(ClientError::Server { .. })) => {
            lock(&shared.audit).refused(message_id);
            shared.counters.push_refused.fetch_add(1, Relaxed);
            d.offered(order, 0)
        }
        _ => {
            shared.counters.push_failed.fetch_add(1, Relaxed);
            d.offered(order, 0)
        }
    }
}

fn send(conns: &[AppServerConn], shared: &Shared, cfg: &Config, p: Option<PushOut>) {
    if let Some(p) = p {
        push(conns, shared, p.uids, p.kind, p.payload, cfg.ttl_ms);
    }
}

/// `loadgen appserver`: the dispatch app-server alone.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// The gate's sidecar port.
    pub sidecar: SocketAddr,
    /// The hello's secret.
    pub secret: Vec<u8>,
    /// Connections to open.
    pub conns: u32,
    /// Drivers offered each order.
    pub dispatch_k: u32,
    /// Who chooses them.
    pub dispatch: DispatchMode,
    /// TTL of pushes, ms.
    pub ttl_ms: u32,
    /// How long to run; zero: until SIGINT or SIGTERM.
    pub duration: Duration,
    /// Print a JSON summary on stdout.
    pub json: bool,
    /// Print a live line each second.
    pub live: bool,
}

/// Runs the dispatch app-server until the duration passes, a signal comes, or the gate goes
/// away; returns the figures.
pub fn run_standalone(cfg: &StandaloneConfig) -> Result<Outcome, ClientError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(ClientError::Io)?;
    }
    let server = AppServer::start(Config {
        sidecar: cfg.sidecar,
        secret: cfg.secret.clone(),
        conns: cfg.conns,
        dispatch_k: cfg.dispatch_k,
        dispatch: cfg.dispatch,
        ttl_ms: cfg.ttl_ms,
        push_rate: 0.0,
        fanout: 0,
        payload_bytes: 0,
        drivers: (0, 0),
        slow_readers: (0, 0, 0),
        geo: None,
    })?;
    eprintln!(
        "loadgen appserver: connected to {} with {} connection(s); Ctrl-C to stop",
        cfg.sidecar, cfg.conns
    );
    let start = Instant::now();
    let mut last_gps = 0;
    let mut tick = start;
    while !stop.load(Relaxed)
        && !server.gate_lost()
        && (cfg.duration.is_zero() || start.elapsed() < cfg.duration)
    {
        thread::sleep(Duration::from_millis(100));
        if tick.elapsed() >= Duration::from_secs(1) {
            tick = Instant::now();
            let c = server.counters();
            let gps = c.gps_points.load(Relaxed);
            if cfg.live {
                let a = server.audit();
                eprintln!(
                    "[{:>4}s] gps {:>8} pts/s  requests {:>8}  pushes {:>6} pairs {:>8} delivered {:>8} pending {:>6}",
                    start.elapsed().as_secs(),
                    gps - last_gps,
                    c.upstream.load(Relaxed),
                    a.pushes,
                    a.sent,
                    a.delivered,
                    server.pending()
                );
            }
            last_gps = gps;
        }
    }
    Ok(server.finish())
}
