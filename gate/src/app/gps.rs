//! The GPS path: a driver's points are copied out of the frame (24 bytes each, never the
//! frame), sent to the driver's logic shard in the shard's next batch, coalesced there, and
//! flushed toward the app-server side on the flush interval.

use crate::shard::{Shard, GPS_RECENT_MAX};
use logic::{ConnRef, Input};
use schema::wire::{self, ErrorCode, Hop};
use schema::{Body, Frame};
use std::sync::atomic::Ordering::Relaxed;

/// Handles a GpsReport or GpsBatch from a logged-in app.
pub fn on_frame(shard: &Shard, me: ConnRef, uid: u64, role: u8, f: &Frame<'_>) {
    if role != wire::Role::Driver.0 {
        return super::session::error(
            shard,
            me,
            &f.header,
            ErrorCode::NotAllowed,
            Hop::App,
            "only drivers report GPS",
        );
    }
    let m = shard.metrics();
    match f.body {
        Body::GpsReport(r) => {
            if let Some(p) = r.point() {
                tracing::debug!(log_id = f.header.log_id, uid, "gps point");
                m.gps_in.fetch_add(1, Relaxed);
                shard.to_logic(uid, Input::Gps { uid, point: *p });
            }
        }
        Body::GpsBatch(b) => {
            let Some(points) = b.points() else { return };
            if points.len() > shard.cfg.gps.max_batch_points as usize {
                return super::session::error(
                    shard,
                    me,
                    &f.header,
                    ErrorCode::InvalidField,
                    Hop::App,
                    "GpsBatch has more points than the gate accepts",
                );
            }
            tracing::debug!(log_id = f.header.log_id, uid, points = points.len(), "gps batch");
            m.gps_in.fetch_add(points.len() as u64, Relaxed);
            for p in points.iter() {
                shard.to_logic(uid, Input::Gps { uid, point: *p });
            }
        }
        _ => {}
    }
}

/// Keeps the newest forwarded points for `/debug/gps` (bounded ring; one lock per flush).
pub fn remember(shard: &Shard, points: &[wire::UidGpsPoint]) {
    tracing::debug!(shard = shard.id, points = points.len(), "gps flush");
    let Ok(mut recent) = shard.gps_recent.lock() else { return };
    let keep = points.len().min(GPS_RECENT_MAX);
    while recent.len() + keep > GPS_RECENT_MAX {
        recent.pop_front();
    }
    recent.extend(points[points.len() - keep..].iter().copied());
}
