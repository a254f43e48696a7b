//! The sidecar port: where app-servers connect to push, answer requests and take receipts and
//! GPS.
//!
//! - this file: the hello (shared secret), routing of everything bound for an app-server, and
//!   receipt batches with their acks;
//! - [`push`]: the push path's entry: validating a push and fanning it out to logic shards.
//!
//! Any shard may hold app-server connections (the sidecar listener uses `SO_REUSEPORT` too).
//! What a logic shard produces for the app-server (receipts, upstream requests, GPS) goes to a
//! connection on the same executor when there is one, else to a shard that has one, else waits
//! here (receipts, bounded) or fails fast (requests) or is dropped (GPS, which is soon stale).

pub mod push;

use crate::app::session::error;
use crate::mesh::Msg;
use crate::shard::{pre_login_error_budget_exhausted, ConnState, Port, Shard};
use logic::{ConnRef, Output, Receipt};
use schema::wire::{self, ErrorCode, GoAwayReason, Hop, UidGpsPoint};
use schema::{Body, Cmd, Frame, FrameType};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// Receipts per Receipts frame.
const RECEIPTS_PER_FRAME: usize = 4096;
/// How long a receipt may wait for others to share its frame: acks arrive one by one, and a
/// frame (and an app-server ack) per receipt would cost a syscall pair per delivery.
const RECEIPT_BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);
/// GPS points per GpsForward frame (32 bytes each: 128 KiB).
const GPS_PER_FRAME: usize = 4096;
/// Receipt batches a connection may have unacked before the shard stops sending it more.
const MAX_UNACKED_BATCHES: usize = 1024;
/// Receipts kept per shard while no app-server is connected anywhere; past it the oldest are
/// dropped and counted (`fleetgate_receipts_dropped_total`).
const MAX_RECEIPT_BACKLOG: usize = 1 << 20;
/// App-server connections per shard.
const MAX_SIDECAR_CONNS_PER_SHARD: usize = 64;
/// Upstream requests one app-server connection may have unanswered as far as its table goes;
/// past it the oldest entries are forgotten (their requests still end by the logic shard's
/// deadline). Well above the logic shards' own bound on pending requests.
const MAX_UPSTREAM_PER_CONN: usize = 1 << 17;

/// Which shards hold ready app-server connections, shared by all executors.
#[derive(Debug)]
pub struct Registry {
    /// Ready app-server connections per shard.
    per_shard: Vec<AtomicU32>,
    /// Round-robin cursor for picking another shard.
    next: AtomicUsize,
}

impl Registry {
    /// A registry for `shards` shards.
    pub fn new(shards: usize) -> Registry {
        Registry { per_shard: (0..shards).map(|_| AtomicU32::new(0)).collect(), next: AtomicUsize::new(0) }
    }

    /// True when any shard holds an app-server connection.
    pub fn any(&self) -> bool {
        self.per_shard.iter().any(|c| c.load(Relaxed) > 0)
    }

    /// Ready connections on `shard`.
    pub fn on(&self, shard: usize) -> u32 {
        self.per_shard[shard].load(Relaxed)
    }

    /// Another shard with a connection, round robin.
    fn pick_other(&self, me: usize) -> Option<usize> {
        let n = self.per_shard.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n).map(|i| (start + i) % n).find(|&s| s != me && self.per_shard[s].load(Relaxed) > 0)
    }
}

/// What one executor sends another for its app-server connections.
#[derive(Debug)]
pub enum AppServerMsg {
    /// Final receipts.
    Receipts(Vec<Receipt>),
    /// A request from an app.
    Upstream(UpstreamOut),
    /// Coalesced GPS.
    Gps(Vec<UidGpsPoint>),
    /// Sessions that ended without logout: (uid, outcome).
    Unreachable(Vec<(u64, u8)>),
    /// An app-server connected somewhere: send what waited.
    Available,
}

/// An app request on its way to an app-server.
#[derive(Debug, Clone)]
pub struct UpstreamOut {
    /// The gate's id for it.
    pub request_id: u64,
    /// The app.
    pub uid: u64,
    /// Its role.
    pub role: u8,
    /// The app's cmd.
    pub cmd: u16,
    /// The app's body.
    pub body: Vec<u8>,
    /// The app's log-id.
    pub log_id: u64,
}

/// An app-server connection's own state.
#[derive(Debug, Default)]
pub struct SidecarState {
    /// The name it gave in its hello, for logs.
    pub name: String,
    /// Receipt batches sent and not acked, by batch id; resent elsewhere if the connection drops.
    pub unacked: BTreeMap<u64, Vec<Receipt>>,
    /// Sequence-ids for the gate's requests and pushes on this connection (never 0).
    pub next_seq: u32,
    /// Upstream requests sent on this connection and not answered: sequence-id → request id.
    /// An Error answer finds its request here, and a drop fails them at once (NoAppServer).
    pub upstream: BTreeMap<u32, u64>,
}

impl SidecarState {
    /// The next sequence-id for a frame the gate starts on this connection.
    fn take_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        self.next_seq
    }
}

/// Per-shard queues of what waits for an app-server connection.
#[derive(Debug, Default)]
pub struct Outbound {
    /// Receipts to send.
    receipts: Vec<Receipt>,
    /// Requests to send.
    upstream: Vec<UpstreamOut>,
    /// GPS to send.
    gps: Vec<UidGpsPoint>,
    /// Unreachable callbacks to send: (uid, outcome).
    unreachable: Vec<(u64, u8)>,
    /// Next receipt batch id (the shard's id is in the top bits, so ids are unique per gate).
    next_batch: u64,
    /// Round-robin cursor over this shard's app-server connections.
    rr: usize,
    /// This shard's ready app-server connections (few: bounded by the per-shard limit).
    conns: Vec<ConnRef>,
    /// When the oldest waiting receipt must leave (set when the queue becomes non-empty).
    receipts_due: Option<std::time::Instant>,
    /// A timer task will flush at `receipts_due`.
    receipt_timer: bool,
    /// Broadcasts accepted here, waiting for every logic shard's count of their targets.
    pub broadcasts: std::collections::HashMap<u64, push::PendingBroadcast>,
    /// Id of the last broadcast tally.
    pub next_tally: u64,
}

impl Outbound {
    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.receipts.is_empty()
            && self.upstream.is_empty()
            && self.gps.is_empty()
            && self.unreachable.is_empty()
    }

    /// Receipts waiting.
    pub fn receipts_waiting(&self) -> usize {
        self.receipts.len()
    }
}

/// Takes an app-server-bound output from a logic shard on this executor.
pub fn route(shard: &Shard, o: Output) {
    {
        let mut ob = shard.outbound.borrow_mut();
        match o {
            Output::Receipt(r) => {
                tracing::debug!(
                    log_id = r.log_id,
                    message_id = r.message_id,
                    uid = r.uid,
                    outcome = ?wire::Outcome(r.outcome),
                    "push: receipt"
                );
                if ob.receipts.is_empty() {
                    ob.receipts_due = Some(std::time::Instant::now() + RECEIPT_BATCH_WINDOW);
                }
                ob.receipts.push(r)
            }
            Output::Upstream { request_id, uid, role, cmd, body, log_id } => {
                ob.upstream.push(UpstreamOut { request_id, uid, role, cmd, body, log_id })
            }
            Output::GpsBatch(points) => {
                crate::app::gps::remember(shard, &points);
                ob.gps.extend_from_slice(&points);
            }
            Output::Unreachable { uid, outcome } => {
                tracing::info!(uid, outcome, "session ended without logout: unreachable");
                ob.unreachable.push((uid, outcome));
            }
            _ => {}
        }
    }
    shard.flush_soon();
}

/// Takes what another executor sent for app-servers.
pub fn on_mesh(shard: &Shard, m: AppServerMsg) {
    {
        let mut ob = shard.outbound.borrow_mut();
        match m {
            AppServerMsg::Receipts(r) => ob.receipts.extend(r),
            AppServerMsg::Upstream(u) => ob.upstream.push(u),
            AppServerMsg::Gps(g) => ob.gps.extend(g),
            AppServerMsg::Unreachable(u) => ob.unreachable.extend(u),
            AppServerMsg::Available => {}
        }
    }
    shard.flush_soon();
}

/// Ready app-server connections on this shard.
/// (Kept as a list beside the connection table: scanning the table of every app connection on
/// each flush would cost O(connections) per receipt batch.)
fn local_conns(shard: &Shard) -> Vec<ConnRef> {
    let ob = shard.outbound.borrow();
    ob.conns
        .iter()
        .copied()
        .filter(|c| shard.with_conn(*c, |conn| conn.close.is_none()).unwrap_or(false))
        .collect()
}

/// Sends what waits: framed onto this shard's app-server connections, or handed to a shard that
/// has one, or (with none anywhere) kept, failed or dropped as the module doc says.
pub fn flush(shard: &Shard) {
    let (receipts, upstream, gps, unreachable) = {
        let mut ob = shard.outbound.borrow_mut();
        if ob.is_empty() {
            return;
        }
        // Receipts wait out their batching window unless the batch is full or we are stopping.
        let now = std::time::Instant::now();
        let receipts_ready = ob.receipts.len() >= RECEIPTS_PER_FRAME
            || shard.shutting_down.get()
            || ob.receipts_due.is_none_or(|due| due <= now);
        if !receipts_ready && !ob.receipt_timer {
            ob.receipt_timer = true;
            let wait = ob.receipts_due.map_or(RECEIPT_BATCH_WINDOW, |due| due.saturating_duration_since(now));
            if let Some(me) = crate::shard::SHARD.with(|s| s.borrow().clone()) {
                glommio::spawn_local(async move {
                    glommio::timer::sleep(wait).await;
                    me.outbound.borrow_mut().receipt_timer = false;
                    me.flush_all();
                })
                .detach();
            }
        }
        if receipts_ready {
            ob.receipts_due = None;
        }
        (
            if receipts_ready { std::mem::take(&mut ob.receipts) } else { Vec::new() },
            std::mem::take(&mut ob.upstream),
            std::mem::take(&mut ob.gps),
            std::mem::take(&mut ob.unreachable),
        )
    };
    let conns = local_conns(shard);
    if !conns.is_empty() {
        send_local(shard, &conns, receipts, upstream, gps, unreachable);
    } else if let Some(dest) = shard.sidecars.pick_other(shard.id as usize) {
        if !unreachable.is_empty() {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Unreachable(unreachable)));
        }
        if !receipts.is_empty() {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Receipts(receipts)));
        }
        if !gps.is_empty() {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Gps(gps)));
        }
        for u in upstream {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Upstream(u)));
        }
    } else {
        for u in upstream {
            tracing::info!(log_id = u.log_id, uid = u.uid, "request: no app-server connected");
            let dest = logic::upstream::shard_of_request(u.request_id);
            shard
                .to_shard(dest, Msg::Logic(logic::Input::UpstreamUndeliverable { request_id: u.request_id }));
        }
        let m = shard.metrics();
        m.gps_dropped.fetch_add(gps.len() as u64, Relaxed);
        // Callbacks wait like receipts (bounded by the same backlog, they are few).
        if unreachable.len() < MAX_RECEIPT_BACKLOG {
            shard.outbound.borrow_mut().unreachable.splice(0..0, unreachable);
        }
        keep_receipts(shard, receipts);
    }
}

/// Puts receipts back at the front of the queue, bounded by `MAX_RECEIPT_BACKLOG`.
fn keep_receipts(shard: &Shard, mut receipts: Vec<Receipt>) {
    let mut ob = shard.outbound.borrow_mut();
    receipts.append(&mut ob.receipts);
    if !receipts.is_empty() && ob.receipts_due.is_none() {
        // Kept back (no app-server, or windows full): retry on the next flush.
        ob.receipts_due = Some(std::time::Instant::now());
    }
    if receipts.len() > MAX_RECEIPT_BACKLOG {
        let excess = receipts.len() - MAX_RECEIPT_BACKLOG;
        tracing::error!(
            dropped = excess,
            "receipt backlog full with no app-server connected: dropping the oldest"
        );
        shard.metrics().receipts_dropped.fetch_add(excess as u64, Relaxed);
        receipts.drain(..excess);
    }
    ob.receipts = receipts;
}

/// The next of this shard's app-server connections, round robin.
fn next_conn(shard: &Shard, conns: &[ConnRef]) -> ConnRef {
    let mut ob = shard.outbound.borrow_mut();
    ob.rr = ob.rr.wrapping_add(1);
    conns[ob.rr % conns.len()]
}

fn send_local(
    shard: &Shard,
    conns: &[ConnRef],
    receipts: Vec<Receipt>,
    upstream: Vec<UpstreamOut>,
    gps: Vec<UidGpsPoint>,
    unreachable: Vec<(u64, u8)>,
) {
    let m = shard.metrics();
    for (uid, outcome) in unreachable {
        let c = next_conn(shard, conns);
        let log_id = shard.new_log_id();
        tracing::info!(log_id, uid, outcome = ?wire::Outcome(outcome), "unreachable: to app-server");
        shard.send_frame(c, FrameType::Event, Cmd::Unreachable, 0, log_id, |b| {
            wire::Unreachable::create(b, &wire::UnreachableArgs { uid, outcome: wire::Outcome(outcome) })
        });
    }
    // Requests: spread over the connections.
    for u in upstream {
        let c = next_conn(shard, conns);
        let seq = shard
            .with_conn(c, |conn| {
                let st = conn.sidecar.get_or_insert_with(Default::default);
                let seq = st.take_seq();
                st.upstream.insert(seq, u.request_id);
                if st.upstream.len() > MAX_UPSTREAM_PER_CONN {
                    st.upstream.pop_first();
                }
                seq
            })
            .unwrap_or(1);
        tracing::info!(log_id = u.log_id, uid = u.uid, request_id = u.request_id, "request: to app-server");
        shard.send_frame(c, FrameType::Request, Cmd::Upstream, seq, u.log_id, |b| {
            let body = b.create_vector(&u.body);
            wire::Upstream::create(
                b,
                &wire::UpstreamArgs {
                    request_id: u.request_id,
                    uid: u.uid,
                    role: wire::Role(u.role),
                    cmd: u.cmd,
                    body: Some(body),
                },
            )
        });
    }
    // GPS: in frames that fit any app-server's limit.
    for chunk in gps.chunks(GPS_PER_FRAME) {
        let c = next_conn(shard, conns);
        m.gps_to_app_server.fetch_add(chunk.len() as u64, Relaxed);
        let log_id = shard.new_log_id();
        tracing::debug!(log_id, points = chunk.len(), "gps: forward to app-server");
        shard.send_frame(c, FrameType::Event, Cmd::GpsForward, 0, log_id, |b| {
            let points = b.create_vector(chunk);
            wire::GpsForward::create(b, &wire::GpsForwardArgs { points: Some(points) })
        });
    }
    // Receipts: in batches the app-server acks; a connection with too many unacked batches gets
    // no more until it catches up, and what no connection takes waits here.
    let mut start = 0;
    let mut refusals = 0;
    while start < receipts.len() && refusals < conns.len() {
        let c = next_conn(shard, conns);
        let end = (start + RECEIPTS_PER_FRAME).min(receipts.len());
        let batch_id = {
            let mut ob = shard.outbound.borrow_mut();
            ob.next_batch += 1;
            ((shard.id as u64) << 48) | (ob.next_batch & ((1 << 48) - 1))
        };
        let taken = shard
            .with_conn(c, |conn| {
                let st = conn.sidecar.get_or_insert_with(Default::default);
                if st.unacked.len() >= MAX_UNACKED_BATCHES {
                    return None;
                }
                st.unacked.insert(batch_id, receipts[start..end].to_vec());
                Some(st.take_seq())
            })
            .flatten();
        let Some(seq) = taken else {
            refusals += 1;
            continue;
        };
        let batch: Vec<wire::Receipt> = receipts[start..end]
            .iter()
            .map(|r| wire::Receipt::new(r.message_id, r.uid, r.outcome, 0, 0, 0))
            .collect();
        let log_id = shard.new_log_id();
        tracing::debug!(log_id, batch_id, seq, receipts = end - start, "push: receipts to app-server");
        shard.send_frame(c, FrameType::Push, Cmd::Receipts, seq, log_id, |b| {
            let receipts = b.create_vector(&batch);
            wire::Receipts::create(b, &wire::ReceiptsArgs { batch_id, receipts: Some(receipts) })
        });
        m.receipts_sent.fetch_add((end - start) as u64, Relaxed);
        start = end;
    }
    if start < receipts.len() {
        keep_receipts(shard, receipts[start..].to_vec());
    }
}

/// Handles one verified frame from an app-server connection.
pub fn on_frame(shard: &Shard, me: ConnRef, f: &Frame<'_>) {
    shard.metrics().frames_in.add(f.cmd.slot(), 1);
    let Some(state) = shard.with_conn(me, |c| c.state) else { return };
    let h = &f.header;
    // Errors caused by the app-server's own frames name origin App (§8.1): App always means
    // "the frame you sent", on either port.
    match (f.body, state) {
        (Body::Error(e), ConnState::LoggedIn) => on_error(shard, me, f, e),
        // Never answered with an Error (§8.2), whatever the state.
        (Body::Error(e), _) => crate::app::session::log_peer_error(shard, me, h, e, "app-server"),
        (Body::AppServerHello(hello), ConnState::AwaitingLogin) => {
            let secret = hello.secret().map(|s| s.bytes()).unwrap_or(&[]);
            let name = hello.name().unwrap_or("").chars().take(64).collect::<String>();
            if !constant_time_eq(secret, shard.cfg.sidecar_secret()) {
                tracing::warn!(log_id = h.log_id, name, shard = shard.id, "app-server refused: wrong secret");
                error(shard, me, h, ErrorCode::BadSecret, Hop::App, "wrong sidecar secret");
                shard.close(me, GoAwayReason::ProtocolError);
                return;
            }
            shard.with_conn(me, |c| {
                c.state = ConnState::LoggedIn;
                c.sidecar = Some(Box::new(SidecarState { name: name.clone(), ..Default::default() }));
            });
            shard.sidecars.per_shard[shard.id as usize].fetch_add(1, Relaxed);
            shard.outbound.borrow_mut().conns.push(me);
            tracing::info!(log_id = h.log_id, name, shard = shard.id, "app-server connected");
            let (node, max_body, max_targets, incarnation) = (
                shard.node.as_str(),
                shard.cfg.sidecar.max_body,
                shard.cfg.sidecar.max_targets,
                shard.incarnation,
            );
            shard.send_frame(me, FrameType::Response, Cmd::AppServerHello, h.seq, h.log_id, |b| {
                let node = b.create_string(node);
                wire::AppServerWelcome::create(
                    b,
                    &wire::AppServerWelcomeArgs { node: Some(node), max_body, max_targets, incarnation },
                )
            });
            // Whatever waited for an app-server anywhere can come now.
            for s in 0..shard.mesh.len() {
                shard.to_shard(s, Msg::AppServer(AppServerMsg::Available));
            }
        }
        (_, ConnState::AwaitingLogin | ConnState::LoggingIn) => {
            let close = shard.with_conn(me, pre_login_error_budget_exhausted).unwrap_or(true);
            error(shard, me, h, ErrorCode::NotLoggedIn, Hop::App, "send AppServerHello first");
            if close {
                shard.close(me, GoAwayReason::ProtocolError);
            }
        }
        (Body::Push(p), ConnState::LoggedIn) => push::accept(shard, me, f, p),
        (Body::ReceiptsAck(a), ConnState::LoggedIn) => {
            let id = a.batch_id();
            shard.with_conn(me, |c| c.sidecar.as_mut().map(|s| s.unacked.remove(&id)));
            // Receipts held back for a full window may go now.
            shard.flush_soon();
        }
        (Body::UpstreamReply(r), ConnState::LoggedIn) if f.ty == FrameType::Response => {
            let request_id = r.request_id();
            shard.with_conn(me, |c| c.sidecar.as_mut().map(|s| s.upstream.remove(&h.seq)));
            let reply = encode_reply(shard, r.reply());
            let dest = logic::upstream::shard_of_request(request_id);
            if dest >= shard.mesh.len() {
                tracing::info!(log_id = h.log_id, request_id, "request: answer for no request of this gate");
                return;
            }
            let limit = shard.cfg.app.max_body as usize;
            let input = if reply.len() > limit {
                let message = format!(
                    "the app-server's reply ({} bytes) exceeds the app port's body limit ({limit} bytes)",
                    reply.len()
                );
                tracing::warn!(log_id = h.log_id, request_id, message, "request: reply too large");
                logic::Input::UpstreamFailed { request_id, message }
            } else {
                tracing::info!(log_id = h.log_id, request_id, "request: app-server answered");
                logic::Input::UpstreamReply { request_id, reply }
            };
            shard.to_shard(dest, Msg::Logic(input));
        }
        (Body::Keepalive(k), _) if f.ty == FrameType::Request => {
            let ts = k.ts_ms();
            shard.send_frame(me, FrameType::Response, Cmd::Keepalive, h.seq, h.log_id, |b| {
                wire::Keepalive::create(b, &wire::KeepaliveArgs { ts_ms: ts })
            });
        }
        _ => {
            error(shard, me, h, ErrorCode::NotAllowed, Hop::App, "this frame is not accepted on the sidecar")
        }
    }
}

/// An Error frame from a ready app-server: the answer to an Upstream request it cannot process
/// (the app gets AppServerError with its message), or informational (logged, never answered).
fn on_error(shard: &Shard, me: ConnRef, f: &Frame<'_>, e: wire::Error<'_>) {
    let h = &f.header;
    let request_id =
        shard.with_conn(me, |c| c.sidecar.as_mut().and_then(|s| s.upstream.remove(&h.seq))).flatten();
    let Some(request_id) = request_id else {
        return crate::app::session::log_peer_error(shard, me, h, e, "app-server");
    };
    let detail = e.message().unwrap_or("");
    tracing::info!(log_id = h.log_id, request_id, code = ?e.code(), message = detail, "request: app-server answered with an error");
    let message = if detail.is_empty() {
        "the app-server could not process the request".to_string()
    } else {
        detail.chars().take(1024).collect()
    };
    let dest = logic::upstream::shard_of_request(request_id);
    if dest < shard.mesh.len() {
        shard.to_shard(dest, Msg::Logic(logic::Input::UpstreamFailed { request_id, message }));
    }
}

/// Copies the app-server's `Reply` into a body of its own for the app.
fn encode_reply(shard: &Shard, r: Option<wire::Reply<'_>>) -> Vec<u8> {
    let (code, message, payload) = r.map_or((0, "", &[][..]), |r| {
        (r.code(), r.message().unwrap_or(""), r.payload().map(|p| p.bytes()).unwrap_or(&[]))
    });
    shard
        .enc
        .borrow_mut()
        .body(|b| {
            let message = b.create_string(message);
            let payload = b.create_vector(payload);
            wire::Reply::create(b, &wire::ReplyArgs { code, message: Some(message), payload: Some(payload) })
        })
        .to_vec()
}

/// An app-server connection ended: its unacked receipts go back to the queue for another one.
pub fn on_closed(shard: &Shard, c: ConnRef, conn: crate::shard::Conn) {
    let Some(st) = conn.sidecar else { return };
    if conn.state == ConnState::LoggedIn {
        shard.sidecars.per_shard[shard.id as usize].fetch_sub(1, Relaxed);
        shard.outbound.borrow_mut().conns.retain(|x| *x != c);
    }
    // Requests this connection had not answered fail at once: the app gets NoAppServer now,
    // not Timeout at the deadline.
    for (_, request_id) in st.upstream {
        let dest = logic::upstream::shard_of_request(request_id);
        if dest < shard.mesh.len() {
            shard.to_shard(dest, Msg::Logic(logic::Input::UpstreamUndeliverable { request_id }));
        }
    }
    let unacked: usize = st.unacked.values().map(Vec::len).sum();
    tracing::warn!(
        name = st.name,
        slot = c.slot,
        shard = shard.id,
        unacked_receipts = unacked,
        "app-server disconnected"
    );
    {
        let mut ob = shard.outbound.borrow_mut();
        let mut back: Vec<Receipt> = st.unacked.into_values().flatten().collect();
        back.append(&mut ob.receipts);
        ob.receipts = back;
    }
    shard.flush_soon();
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Accept loop of the sidecar port on one shard.
pub async fn run_listener(shard: std::rc::Rc<Shard>, listener: glommio::net::TcpListener) {
    use std::os::fd::AsRawFd;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown_begun().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let n = shard.conns.borrow().len() - shard.app_conns();
                if n >= MAX_SIDECAR_CONNS_PER_SHARD {
                    tracing::warn!(shard = shard.id, "sidecar connection refused: limit reached");
                    continue;
                }
                let me = shard.add_conn(stream.as_raw_fd(), Port::Sidecar, crate::net::now_ms());
                glommio::spawn_local(crate::conn::serve(shard.clone(), stream, me, Duration::ZERO)).detach();
            }
            Some(Err(e)) => {
                tracing::warn!(shard = shard.id, error = %e, "sidecar accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
