//! The sidecar port: where app-servers connect to push, answer requests and take receipts and
//! GPS.
//!
//! - this file: the hello (shared secret), the app-server's frames, and writing what the
//!   delivery machine (`crate::delivery`) decides: receipt batches, upstream requests, GPS
//!   forwards and unreachable events;
//! - [`push`]: the push path's entry: validating a push and fanning it out to logic shards.
//! - [`fanout`]: a push's targets on one logic shard, delivered in bounded slices.
//! - [`room`]: the gate's bound on pushes in flight, which a push must find room under.
//! - [`end`]: EndSession, an app-server ending a uid's session wherever it is.
//! - [`geo`]: GeoQuery and GeoPush, the nearest drivers to a point (and a push to them).
//! - [`waits`]: the requests of those two waiting for answers from elsewhere.
//!
//! Any shard may hold app-server connections (the sidecar listener uses `SO_REUSEPORT` too).
//! What a logic shard produces for the app-server goes to a connection on the same executor
//! when there is one, else to a shard that has one, else waits here (receipts, bounded) or
//! fails fast (requests) or is dropped (GPS, which is soon stale); in cluster mode a node with
//! none relays requests, GPS and unreachable events to a node that has one (`cluster::relay`).

pub mod end;
pub mod fanout;
pub mod geo;
pub mod push;
pub mod room;
pub mod waits;

use crate::app::session::error;
use crate::delivery::{AppServerMsg, Out};
use crate::lifecycle::{CloseReason, Phase};
use crate::mesh::Msg;
use crate::state::{Conn, Shard};
use logic::{ConnRef, Receipt};
use schema::wire::{self, ErrorCode, GoAwayReason, Hop};
use schema::{Body, Cmd, Frame, FrameType};
use std::sync::atomic::Ordering::Relaxed;

/// A final receipt from this executor's logic shard: logged under its push's log-id, then it
/// waits in the receipt window.
pub fn receipt(shard: &mut Shard, r: Receipt, now: u64) {
    tracing::debug!(
        log_id = r.log_id,
        message_id = r.message_id,
        uid = r.uid,
        outcome = ?wire::Outcome(r.outcome),
        "push: receipt"
    );
    shard.delivery.receipt(now, r);
}

/// Takes what another executor sent for app-servers.
pub fn on_mesh(shard: &mut Shard, m: AppServerMsg, now: u64) {
    let d = &mut shard.delivery;
    match m {
        AppServerMsg::Receipts(r) => d.receipts_from_elsewhere(now, r),
        AppServerMsg::Upstream(u) => d.upstream(u),
        AppServerMsg::Gps(g) => d.gps(&g),
        AppServerMsg::Unreachable(u) => u.into_iter().for_each(|(uid, o)| d.unreachable(uid, o)),
        AppServerMsg::Available => {}
    }
}

/// Writes what the delivery machine decides now: frames on this shard's app-server
/// connections, or batches for a shard that has one, or (with none anywhere) failed requests.
pub fn flush(shard: &mut Shard, now: u64) {
    let (me, sidecars) = (shard.id as usize, shard.sidecars.clone());
    let (polled, dest) = shard.delivery.poll(now, shard.shutting_down, || sidecars.pick_other(me));
    for o in polled.out {
        write_out(shard, o);
    }
    if let Some(dest) = dest {
        let e = polled.elsewhere;
        if !e.unreachable.is_empty() {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Unreachable(e.unreachable)));
        }
        if !e.receipts.is_empty() {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Receipts(e.receipts)));
        }
        if !e.gps.is_empty() {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Gps(e.gps)));
        }
        for u in e.upstream {
            shard.to_shard(dest, Msg::AppServer(AppServerMsg::Upstream(u)));
        }
    }
    for request_id in polled.failed {
        tracing::info!(request_id, "request: no app-server connected");
        let dest = logic::upstream::shard_of_request(request_id);
        crate::cluster::relay::answer(shard, dest, logic::Input::UpstreamUndeliverable { request_id });
    }
    let m = shard.metrics();
    m.gps_dropped.fetch_add(polled.gps_dropped as u64, Relaxed);
    if polled.receipts_dropped > 0 {
        tracing::error!(
            dropped = polled.receipts_dropped,
            "receipt backlog full with no app-server connected: dropping the oldest"
        );
        m.receipts_dropped.fetch_add(polled.receipts_dropped as u64, Relaxed);
    }
}

/// Writes one frame the delivery machine decided.
fn write_out(shard: &mut Shard, o: Out) {
    match o {
        Out::Unreachable { conn, uid, outcome } => {
            let log_id = shard.new_log_id();
            tracing::info!(log_id, uid, outcome = ?wire::Outcome(outcome), "unreachable: to app-server");
            shard.send_frame(conn, FrameType::Event, Cmd::Unreachable, 0, log_id, |b| {
                wire::Unreachable::create(b, &wire::UnreachableArgs { uid, outcome: wire::Outcome(outcome) })
            });
        }
        Out::Upstream { conn, seq, request: u } => {
            tracing::info!(
                log_id = u.log_id,
                uid = u.uid,
                request_id = u.request_id,
                "request: to app-server"
            );
            shard.send_frame(conn, FrameType::Request, Cmd::Upstream, seq, u.log_id, |b| {
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
        Out::Gps { conn, points } => {
            shard.metrics().gps_to_app_server.fetch_add(points.len() as u64, Relaxed);
            let log_id = shard.new_log_id();
            tracing::debug!(log_id, points = points.len(), "gps: forward to app-server");
            shard.send_frame(conn, FrameType::Event, Cmd::GpsForward, 0, log_id, |b| {
                let points = b.create_vector(&points);
                wire::GpsForward::create(b, &wire::GpsForwardArgs { points: Some(points) })
            });
        }
        Out::Receipts { conn, seq, batch_id, receipts } => {
            let batch: Vec<wire::Receipt> = receipts
                .iter()
                .map(|r| wire::Receipt::new(r.message_id, r.uid, r.outcome, 0, 0, 0))
                .collect();
            let log_id = shard.new_log_id();
            tracing::debug!(log_id, batch_id, seq, receipts = batch.len(), "push: receipts to app-server");
            shard.send_frame(conn, FrameType::Push, Cmd::Receipts, seq, log_id, |b| {
                let receipts = b.create_vector(&batch);
                wire::Receipts::create(b, &wire::ReceiptsArgs { batch_id, receipts: Some(receipts) })
            });
            let acked: Box<[u64]> = receipts.iter().map(|r| r.acked_us).filter(|&t| t != 0).collect();
            if !acked.is_empty() {
                shard.mark_written(conn, crate::marks::Started::Many(acked));
            }
            shard.metrics().receipts_sent.fetch_add(batch.len() as u64, Relaxed);
            receipts.iter().for_each(|r| shard.metrics().receipts_by_outcome.add(r.outcome as usize, 1));
        }
    }
}

/// Handles one verified frame from an app-server connection.
pub fn on_frame(shard: &mut Shard, me: ConnRef, f: &Frame<'_>) {
    shard.metrics().frames_in.add(f.cmd.slot(), 1);
    let Some(phase) = shard.life(me).map(|l| l.phase) else { return };
    let h = &f.header;
    let ready = phase == Phase::AppServer;
    // Errors caused by the app-server's own frames name origin App (§8.1): App always means
    // "the frame you sent", on either port.
    match f.body {
        Body::Error(e) if ready => on_error(shard, me, f, e),
        // Never answered with an Error (§8.2), whatever the state.
        Body::Error(e) => crate::app::session::log_peer_error(shard, me, h, e, "app-server"),
        Body::AppServerHello(hello) if phase == Phase::AwaitingLogin => {
            let secret = hello.secret().map(|s| s.bytes()).unwrap_or(&[]);
            let name = hello.name().unwrap_or("").chars().take(64).collect::<String>();
            if !constant_time_eq(secret, shard.cfg.sidecar_secret()) {
                tracing::warn!(log_id = h.log_id, name, shard = shard.id, "app-server refused: wrong secret");
                error(shard, me, h, ErrorCode::BadSecret, Hop::App, "wrong sidecar secret");
                shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
                return;
            }
            if let Some(c) = shard.conn(me) {
                c.life.app_server_ready();
                c.peer_name = Some(Box::new(name.clone().into_boxed_str()));
            }
            shard.sidecars.count(shard.id as usize, true);
            shard.delivery.link_up(me);
            tracing::info!(log_id = h.log_id, name, shard = shard.id, "app-server connected");
            let (node, max_body, max_targets, incarnation) = (
                shard.node.clone(),
                shard.cfg.sidecar.max_body,
                shard.cfg.sidecar.max_targets,
                shard.incarnation,
            );
            shard.send_frame(me, FrameType::Response, Cmd::AppServerHello, h.seq, h.log_id, |b| {
                let node = b.create_string(&node);
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
        Body::Keepalive(k) if f.ty == FrameType::Request => {
            let ts = k.ts_ms();
            shard.send_frame(me, FrameType::Response, Cmd::Keepalive, h.seq, h.log_id, |b| {
                wire::Keepalive::create(b, &wire::KeepaliveArgs { ts_ms: ts })
            });
        }
        _ if !ready => {
            let close = shard.life(me).is_none_or(|l| l.pre_login_error());
            error(shard, me, h, ErrorCode::NotLoggedIn, Hop::App, "send AppServerHello first");
            if close {
                shard.close(me, CloseReason::GoAway(GoAwayReason::ProtocolError));
            }
        }
        Body::Push(p) => push::accept(shard, me, f, p),
        Body::EndSession(e) if f.ty == FrameType::Request => {
            end::request(shard, me, h, e.uid(), e.message().unwrap_or(""), crate::state::mono_ms())
        }
        Body::GeoQuery(g) if f.ty == FrameType::Request => geo::query(shard, me, h, g),
        Body::GeoPush(g) if f.ty == FrameType::Request => geo::push(shard, me, h, g),
        Body::ReceiptsAck(a) => shard.delivery.acked(me, a.batch_id()),
        Body::UpstreamReply(r) if f.ty == FrameType::Response => {
            let request_id = r.request_id();
            shard.delivery.answered(me, h.seq);
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
            crate::cluster::relay::answer(shard, dest, input);
        }
        _ => {
            error(shard, me, h, ErrorCode::NotAllowed, Hop::App, "this frame is not accepted on the sidecar")
        }
    }
}

/// An Error frame from a ready app-server: the answer to an Upstream request it cannot process
/// (the app gets AppServerError with its message), or informational (logged, never answered).
fn on_error(shard: &mut Shard, me: ConnRef, f: &Frame<'_>, e: wire::Error<'_>) {
    let h = &f.header;
    let Some(request_id) = shard.delivery.answered(me, h.seq) else {
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
        crate::cluster::relay::answer(shard, dest, logic::Input::UpstreamFailed { request_id, message });
    }
}

/// Copies the app-server's `Reply` into a body of its own for the app.
fn encode_reply(shard: &mut Shard, r: Option<wire::Reply<'_>>) -> Vec<u8> {
    let (code, message, payload) = r.map_or((0, "", &[][..]), |r| {
        (r.code(), r.message().unwrap_or(""), r.payload().map(|p| p.bytes()).unwrap_or(&[]))
    });
    shard
        .enc
        .body(|b| {
            let message = b.create_string(message);
            let payload = b.create_vector(payload);
            wire::Reply::create(b, &wire::ReplyArgs { code, message: Some(message), payload: Some(payload) })
        })
        .to_vec()
}

/// An app-server connection ended: its unacked receipts go back to the queue for another one,
/// and the requests it carried fail at once (NoAppServer), not at their deadline.
pub fn closed(shard: &mut Shard, c: ConnRef, conn: &Conn, now: u64) {
    if conn.life.phase != Phase::AppServer {
        return;
    }
    shard.sidecars.count(shard.id as usize, false);
    let dropped = shard.delivery.link_down(now, c);
    for request_id in dropped.failed_requests {
        let dest = logic::upstream::shard_of_request(request_id);
        if dest < shard.mesh.len() {
            crate::cluster::relay::answer(shard, dest, logic::Input::UpstreamUndeliverable { request_id });
        }
    }
    tracing::warn!(
        name = conn.peer_name.as_deref().map_or("", |n| &**n),
        slot = c.slot,
        shard = shard.id,
        unacked_receipts = dropped.unacked_receipts,
        "app-server disconnected"
    );
}

/// Equality whose time does not depend on where the inputs differ (secrets; admin.rs too).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
