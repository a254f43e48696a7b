//! Frames shared by the vector, property and benchmark code: one of every (cmd, type) pair.
#![allow(dead_code)]

use schema::wire::{self, GpsPoint, Receipt, UidGpsPoint};
use schema::{Cmd, Encoder, FrameType};

/// A fixed GPS point used throughout the vectors.
pub fn point(i: u64) -> GpsPoint {
    GpsPoint::new(1_700_000_000_000 + i, 399_042_000 + i as i32, 1_164_074_000 - i as i32, 120, 9000, 50, 0)
}

/// One frame of every (cmd, type) pair in the registry, each with fixed field values.
pub fn all_frames() -> Vec<(&'static str, Vec<u8>)> {
    let mut e = Encoder::new();
    let mut v: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut f = |name: &'static str, build: &mut dyn FnMut(&mut Encoder, &mut Vec<u8>)| {
        let mut out = Vec::new();
        build(&mut e, &mut out);
        v.push((name, out));
    };
    use FrameType::*;
    f("login_request", &mut |e, o| {
        e.frame(o, Request, Cmd::Login, 1, 0x1111, |b| {
            let token = b.create_vector(&[7u8; 50]);
            let device = b.create_string("pixel-7");
            wire::Login::create(b, &wire::LoginArgs { token: Some(token), device: Some(device) })
        })
    });
    f("login_response", &mut |e, o| {
        e.frame(o, Response, Cmd::Login, 1, 0x1111, |b| {
            let resume_token = b.create_vector(&[9u8; 16]);
            let node = b.create_string("127.0.0.1:7100");
            wire::Session::create(
                b,
                &wire::SessionArgs {
                    uid: 42,
                    role: wire::Role::Driver,
                    heartbeat_ms: 30_000,
                    idle_timeout_ms: 90_000,
                    session_epoch: 3,
                    resume_token: Some(resume_token),
                    node: Some(node),
                    hold_ms: 60_000,
                },
            )
        })
    });
    f("resume_request", &mut |e, o| {
        e.frame(o, Request, Cmd::Resume, 2, 0x2222, |b| {
            let resume_token = b.create_vector(&[9u8; 16]);
            wire::Resume::create(b, &wire::ResumeArgs { resume_token: Some(resume_token) })
        })
    });
    f("keepalive_request", &mut |e, o| e.keepalive(o, Request, 3, 0x3333, 1_700_000_000_000));
    f("keepalive_response", &mut |e, o| e.keepalive(o, Response, 3, 0x3333, 1_700_000_000_001));
    f("logout_request", &mut |e, o| {
        e.frame(o, Request, Cmd::Logout, 4, 0x4444, |b| {
            let reason = b.create_string("user");
            wire::Logout::create(b, &wire::LogoutArgs { reason: Some(reason) })
        })
    });
    f("go_away_push", &mut |e, o| {
        e.go_away(o, 0x5555, wire::GoAwayReason::Displaced, "logged in elsewhere", "", 0)
    });
    f("error", &mut |e, o| {
        e.error(
            o,
            6,
            0x6666,
            wire::ErrorCode::NotLoggedIn,
            wire::Hop::App,
            Cmd::GpsReport as u16,
            "log in first",
            0,
        )
    });
    f("gps_report_event", &mut |e, o| e.gps_report(o, 0x7777, &point(0)));
    f("gps_batch_event", &mut |e, o| e.gps_batch(o, 0x8888, &[point(0), point(1), point(2)]));
    f("place_order_request", &mut |e, o| {
        e.frame(o, Request, Cmd::PlaceOrder, 9, 0x9999, |b| {
            let payload = b.create_vector(b"{\"seats\":2}");
            wire::PlaceOrder::create(
                b,
                &wire::PlaceOrderArgs {
                    from_lat_e7: 1,
                    from_lon_e7: 2,
                    to_lat_e7: 3,
                    to_lon_e7: 4,
                    payload: Some(payload),
                },
            )
        })
    });
    f("grab_order_request", &mut |e, o| {
        e.frame(o, Request, Cmd::GrabOrder, 10, 0xAAAA, |b| {
            wire::GrabOrder::create(b, &wire::GrabOrderArgs { order_id: 77, payload: None })
        })
    });
    f("order_status_request", &mut |e, o| {
        e.frame(o, Request, Cmd::OrderStatus, 11, 0xBBBB, |b| {
            wire::OrderStatusQuery::create(b, &wire::OrderStatusQueryArgs { order_id: 77 })
        })
    });
    f("business_request", &mut |e, o| {
        e.frame(o, Request, Cmd::BusinessRequest, 12, 0xCCCC, |b| {
            let kind = b.create_string("cancel_order");
            let payload = b.create_vector(&[1u8, 2, 3]);
            wire::BusinessRequest::create(
                b,
                &wire::BusinessRequestArgs { kind: Some(kind), payload: Some(payload) },
            )
        })
    });
    f("reply_response", &mut |e, o| {
        e.frame(o, Response, Cmd::PlaceOrder, 9, 0x9999, |b| {
            let message = b.create_string("ok");
            let payload = b.create_vector(&[5u8; 4]);
            wire::Reply::create(
                b,
                &wire::ReplyArgs { code: 0, message: Some(message), payload: Some(payload) },
            )
        })
    });
    f("push_delivery", &mut |e, o| {
        e.frame(o, Push, Cmd::PushDelivery, 100, 0xDDDD, |b| {
            let payload = b.create_vector(b"order 77");
            wire::PushDelivery::create(
                b,
                &wire::PushDeliveryArgs {
                    message_id: 5,
                    payload: Some(payload),
                    sent_at_us: 1_700_000_000_000_000,
                    kind: 1,
                    deadline_ms: 1_700_000_030_000,
                },
            )
        })
    });
    f("push_ack", &mut |e, o| {
        e.frame(o, Ack, Cmd::PushAck, 100, 0xDDDD, |b| {
            wire::PushAck::create(b, &wire::PushAckArgs { message_id: 5 })
        })
    });
    f("app_server_hello_request", &mut |e, o| {
        e.frame(o, Request, Cmd::AppServerHello, 1, 0xEEEE, |b| {
            let secret = b.create_vector(b"dev-secret");
            let name = b.create_string("dispatch-1");
            wire::AppServerHello::create(
                b,
                &wire::AppServerHelloArgs { secret: Some(secret), name: Some(name) },
            )
        })
    });
    f("app_server_hello_response", &mut |e, o| {
        e.frame(o, Response, Cmd::AppServerHello, 1, 0xEEEE, |b| {
            let node = b.create_string("127.0.0.1:7100");
            wire::AppServerWelcome::create(
                b,
                &wire::AppServerWelcomeArgs {
                    node: Some(node),
                    max_body: 8 << 20,
                    max_targets: 50_000,
                    incarnation: 0x0123_4567_89AB_CDEF,
                },
            )
        })
    });
    f("push_request", &mut |e, o| {
        e.frame(o, Request, Cmd::Push, 2, 0xFFFF, |b| {
            let uids = b.create_vector(&[42u64, 43, 44]);
            let payload = b.create_vector(b"order 77");
            wire::Push::create(
                b,
                &wire::PushArgs {
                    message_id: 5,
                    uids: Some(uids),
                    payload: Some(payload),
                    ttl_ms: 30_000,
                    broadcast: wire::Role::Unknown,
                    sent_at_us: 1_700_000_000_000_000,
                    kind: 1,
                },
            )
        })
    });
    f("push_response", &mut |e, o| {
        e.frame(o, Response, Cmd::Push, 2, 0xFFFF, |b| {
            wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id: 5, targets: 3 })
        })
    });
    f("receipts_push", &mut |e, o| {
        e.frame(o, Push, Cmd::Receipts, 3, 0, |b| {
            let receipts = b.create_vector(&[
                Receipt::new(5, 42, wire::Outcome::Delivered.0, 0, 0, 0),
                Receipt::new(5, 43, wire::Outcome::Offline.0, 0, 0, 0),
            ]);
            wire::Receipts::create(b, &wire::ReceiptsArgs { batch_id: 1, receipts: Some(receipts) })
        })
    });
    f("receipts_ack", &mut |e, o| {
        e.frame(o, Ack, Cmd::ReceiptsAck, 3, 0, |b| {
            wire::ReceiptsAck::create(b, &wire::ReceiptsAckArgs { batch_id: 1 })
        })
    });
    f("gps_forward_event", &mut |e, o| {
        e.frame(o, Event, Cmd::GpsForward, 0, 0, |b| {
            let points = b.create_vector(&[UidGpsPoint::new(42, &point(0)), UidGpsPoint::new(43, &point(1))]);
            wire::GpsForward::create(b, &wire::GpsForwardArgs { points: Some(points) })
        })
    });
    f("upstream_request", &mut |e, o| {
        e.frame(o, Request, Cmd::Upstream, 4, 0x9999, |b| {
            let body = b.create_vector(&[1u8, 2, 3, 4]);
            wire::Upstream::create(
                b,
                &wire::UpstreamArgs {
                    request_id: 9,
                    uid: 42,
                    role: wire::Role::Passenger,
                    cmd: Cmd::PlaceOrder as u16,
                    body: Some(body),
                },
            )
        })
    });
    f("upstream_response", &mut |e, o| {
        e.frame(o, Response, Cmd::Upstream, 4, 0x9999, |b| {
            let message = b.create_string("ok");
            let reply =
                wire::Reply::create(b, &wire::ReplyArgs { code: 0, message: Some(message), payload: None });
            wire::UpstreamReply::create(b, &wire::UpstreamReplyArgs { request_id: 9, reply: Some(reply) })
        })
    });
    f("unreachable_event", &mut |e, o| {
        e.frame(o, Event, Cmd::Unreachable, 0, 0, |b| {
            wire::Unreachable::create(
                b,
                &wire::UnreachableArgs { uid: 42, outcome: wire::Outcome::HoldExpired },
            )
        })
    });
    f("end_session_request", &mut |e, o| {
        e.frame(o, Request, Cmd::EndSession, 5, 0xABAB, |b| {
            let message = b.create_string("account closed");
            wire::EndSession::create(b, &wire::EndSessionArgs { uid: 42, message: Some(message) })
        })
    });
    f("end_session_response", &mut |e, o| {
        e.frame(o, Response, Cmd::EndSession, 5, 0xABAB, |b| {
            let node = b.create_string("gate-b");
            wire::SessionEnded::create(b, &wire::SessionEndedArgs { uid: 42, found: true, node: Some(node) })
        })
    });
    f("geo_push_request", &mut |e, o| {
        e.frame(o, Request, Cmd::GeoPush, 6, 0xCDCD, |b| {
            let payload = b.create_vector(b"order 77");
            wire::GeoPush::create(
                b,
                &wire::GeoPushArgs {
                    lat_e7: 525_200_000,
                    lon_e7: 134_050_000,
                    radius_m: 3_000,
                    k: 20,
                    max_age_ms: 10_000,
                    filter: wire::GeoFilter::OnlineOrHeld,
                    message_id: 77,
                    payload: Some(payload),
                    ttl_ms: 15_000,
                    sent_at_us: 1_700_000_000_000_000,
                    kind: 1,
                },
            )
        })
    });
    f("geo_push_response", &mut |e, o| {
        e.frame(o, Response, Cmd::GeoPush, 6, 0xCDCD, |b| {
            let hits = b.create_vector(&[
                wire::GeoHit::new(42, 525_201_000, 134_051_000, 131.5, 900),
                wire::GeoHit::new(43, 525_150_000, 134_000_000, 655.25, 2_100),
            ]);
            wire::GeoChosen::create(b, &wire::GeoChosenArgs { message_id: 77, hits: Some(hits) })
        })
    });
    f("geo_query_request", &mut |e, o| {
        e.frame(o, Request, Cmd::GeoQuery, 7, 0xCECE, |b| {
            wire::GeoQuery::create(
                b,
                &wire::GeoQueryArgs {
                    lat_e7: -338_688_000,
                    lon_e7: 1_512_093_000,
                    radius_m: 50_000,
                    k: 1_000,
                    max_age_ms: 0,
                    filter: wire::GeoFilter::Online,
                },
            )
        })
    });
    f("geo_query_response", &mut |e, o| {
        e.frame(o, Response, Cmd::GeoQuery, 7, 0xCECE, |b| {
            let hits = b.create_vector(&[wire::GeoHit::new(9, -338_690_000, 1_512_090_000, 40.0, 0)]);
            wire::GeoChosen::create(b, &wire::GeoChosenArgs { message_id: 0, hits: Some(hits) })
        })
    });
    v
}
