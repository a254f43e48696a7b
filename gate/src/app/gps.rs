//! The GPS path: a driver's points are copied out of the frame (24 bytes each, never the
//! frame), sent to the driver's logic shard in the shard's next batch, coalesced there, and
//! flushed toward the app-server side on the flush interval.

use crate::state::{Shard, GPS_RECENT_MAX};
use logic::{ConnRef, Input};
use schema::wire::{self, ErrorCode, Hop};
use schema::{Body, Frame};
use std::sync::atomic::Ordering::Relaxed;

/// Handles a GpsReport or GpsBatch from a logged-in app.
pub fn on_frame(shard: &mut Shard, me: ConnRef, uid: u64, role: u8, f: &Frame<'_>) {
    if role != wire::Role::Driver.0 {
        let message = "only drivers report GPS";
        return super::session::error(shard, me, &f.header, ErrorCode::NotAllowed, Hop::App, message);
    }
    let points = match f.body {
        Body::GpsReport(r) => match r.point() {
            Some(p) => check_point(p).map(|()| std::slice::from_ref(p).to_vec()),
            None => Err("GpsReport has no point"),
        },
        Body::GpsBatch(b) => {
            let points = b.points().unwrap_or_default();
            // A batch is taken whole or refused whole: the app resends it fixed, not a part.
            if points.is_empty() {
                Err("GpsBatch has no points")
            } else if points.len() > shard.cfg.gps.max_batch_points as usize {
                Err("GpsBatch has more points than the gate accepts")
            } else {
                match points.iter().find_map(|p| check_point(p).err()) {
                    Some(why) => Err(why),
                    None => Ok(points.iter().copied().collect()),
                }
            }
        }
        _ => return,
    };
    match points {
        Err(message) => {
            tracing::info!(log_id = f.header.log_id, uid, message, "gps refused");
            shard.metrics().gps_invalid.fetch_add(1, Relaxed);
            super::session::error(shard, me, &f.header, ErrorCode::InvalidField, Hop::App, message)
        }
        Ok(points) => {
            tracing::debug!(log_id = f.header.log_id, uid, points = points.len(), "gps points");
            shard.metrics().gps_in.fetch_add(points.len() as u64, Relaxed);
            for point in points {
                shard.to_logic(uid, Input::Gps { uid, point });
            }
        }
    }
}

/// Checks a point against the ranges of §5.3: latitude ±90°, longitude ±180°, heading
/// 0–360°.
pub fn check_point(p: &wire::GpsPoint) -> Result<(), &'static str> {
    if !(-900_000_000..=900_000_000).contains(&p.lat_e7()) {
        return Err("GPS point latitude out of range (-900000000..=900000000 in 1e-7 degrees)");
    }
    if !(-1_800_000_000..=1_800_000_000).contains(&p.lon_e7()) {
        return Err("GPS point longitude out of range (-1800000000..=1800000000 in 1e-7 degrees)");
    }
    if p.heading_cdeg() > 36_000 {
        return Err("GPS point heading out of range (0..=36000 centidegrees)");
    }
    Ok(())
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
