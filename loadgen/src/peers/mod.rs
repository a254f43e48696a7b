//! The same fleet against other servers (`--target mqtt|nats|ceiling`), so the gate's figures
//! stand beside ones measured the same way, on the same machine, at the same rates.
//!
//! - Drivers connect at the plan's connect rate from the same pinned event loops as the gate
//!   fleet ([`fleet`]), and subscribe to their own push topic (`push/<uid>`, NATS
//!   `push.<uid>`): like a gate session, each one is addressable.
//! - GPS: every report is one publish to `gps/<uid>` (`gps.<uid>`) of [`GPS_POINT_BYTES`] per
//!   point, written at once with `TCP_NODELAY`, so one point is one TCP segment, as with the
//!   gate's 64-byte GPS frame. The ceiling gets the gate's own GPS frames.
//! - The app-server ([`appserver`]) is one subscriber to `gps/#` (`gps.>`) counting points,
//!   and one publisher: a push to N drivers is N publishes, one per driver topic, pipelined in
//!   one write, each carrying a message id and the send time ([`push_payload`]). Deliveries and
//!   latency are counted where the drivers receive them.
//! - [`mqtt`] and [`nats`] are the codecs (MQTT 3.1.1 at QoS 0; NATS core), [`wire`] the
//!   handshake both sides share.
//! - With `--tls-ca` (MQTT only) every connection, drivers and app-server alike, speaks TLS 1.3
//!   ([`tls`]): the same MQTT bytes inside it, the handshake part of connecting. The run starts
//!   with one handshake on its own, so a certificate the CA did not sign fails it at once with
//!   rustls's reason; the report says `"tls": true`.
//!
//! The report is loadgen's [`Report`]: its `gate` section describes the server at `--gate`,
//! whatever it is. Neither MQTT at QoS 0 nor NATS core gives receipts, so there is no audit:
//! `push.sent` (pairs published) against `push.received` (pairs that arrived) is what tells.

pub mod appserver;
pub mod fleet;
pub mod mqtt;
pub mod nats;
pub mod tls;
pub mod wire;

use crate::engine::stats::{ExecStats, Snapshot};
use crate::engine::{Control, Phase};
use crate::plan::{Plan, Target};
use crate::procstat;
use crate::report::{self, Latency, Report};
use crate::run::{Outcome, RunError};
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of one GPS point published to a peer: uid, time, position, speed, heading, accuracy,
/// flags, sequence (see [`gps_point`]). The gate's GPS frame is 64 bytes (24-byte header and
/// the FlatBuffers body); the ceiling gets that frame.
pub const GPS_POINT_BYTES: usize = 40;
/// Bytes at the start of every push payload: the message id and the send time in µs.
pub const PUSH_HEADER: usize = 16;
/// How often an otherwise silent connection pings: every 15 s, the same as loadgen's gate
/// sessions with the gate's default 30 s heartbeat, so idle figures compare like with like.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Main loop step.
const STEP: Duration = Duration::from_millis(50);
/// Longest the drain waits for pushes in flight once nothing more arrives.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// Longest the drain waits in all.
const DRAIN_MAX: Duration = Duration::from_secs(10);

/// The protocol of a peer target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// MQTT 3.1.1.
    Mqtt,
    /// NATS.
    Nats,
    /// perf's ceiling: write-only.
    Ceiling,
}

impl Proto {
    /// The protocol of `t`; `None` for the gate.
    pub fn of(t: Target) -> Option<Proto> {
        match t {
            Target::Gate => None,
            Target::Mqtt => Some(Proto::Mqtt),
            Target::Nats => Some(Proto::Nats),
            Target::Ceiling => Some(Proto::Ceiling),
        }
    }

    /// MQTT topics use `/`, NATS subjects `.`.
    fn sep(self) -> u8 {
        if self == Proto::Nats {
            b'.'
        } else {
            b'/'
        }
    }

    /// `gps/<uid>` or `gps.<uid>`.
    pub fn gps_topic(self, uid: u64) -> Vec<u8> {
        self.topic(b"gps", uid)
    }

    /// `push/<uid>` or `push.<uid>`.
    pub fn push_topic(self, uid: u64) -> Vec<u8> {
        self.topic(b"push", uid)
    }

    fn topic(self, prefix: &[u8], uid: u64) -> Vec<u8> {
        let mut t = Vec::with_capacity(prefix.len() + 21);
        t.extend_from_slice(prefix);
        t.push(self.sep());
        t.extend_from_slice(uid.to_string().as_bytes());
        t
    }

    /// The app-server's subscription to every driver's GPS: `gps/#` or `gps.>`.
    pub fn gps_filter(self) -> &'static [u8] {
        if self == Proto::Nats {
            b"gps.>"
        } else {
            b"gps/#"
        }
    }
}

/// True for a topic under `gps/` (`gps.`).
pub fn is_gps(topic: &[u8]) -> bool {
    topic.len() > 4 && topic.starts_with(b"gps") && (topic[3] == b'/' || topic[3] == b'.')
}

/// Appends one GPS point of [`GPS_POINT_BYTES`], little-endian.
pub fn gps_point(out: &mut Vec<u8>, uid: u64, ts_ms: u64, lat_e7: i32, lon_e7: i32, seq: u32) {
    out.extend_from_slice(&uid.to_le_bytes());
    out.extend_from_slice(&ts_ms.to_le_bytes());
    out.extend_from_slice(&lat_e7.to_le_bytes());
    out.extend_from_slice(&lon_e7.to_le_bytes());
    out.extend_from_slice(&[0x2C, 0x01]); // speed 30.0 m/s × 10
    out.extend_from_slice(&[0x10, 0x27]); // heading 100.00° × 100
    out.extend_from_slice(&[50, 0]); // accuracy, m
    out.extend_from_slice(&[0, 0]); // flags
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // reserved: keeps the point 8-byte aligned, as the gate's is
}

/// Points in a GPS message of `len` bytes (a batch is points back to back).
pub fn points_in(len: usize) -> u64 {
    (len / GPS_POINT_BYTES).max(1) as u64
}

/// Appends a push payload of `len` bytes (at least [`PUSH_HEADER`]): message id, send time.
pub fn push_payload(out: &mut Vec<u8>, message_id: u64, sent_at_us: u64, len: usize) {
    out.extend_from_slice(&message_id.to_le_bytes());
    out.extend_from_slice(&sent_at_us.to_le_bytes());
    out.resize(out.len() + len.saturating_sub(PUSH_HEADER), 0xA5);
}

/// Message id and send time of a push payload; `None` if it is too short to be one.
pub fn read_push(payload: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((id, sent))
}

/// What the main thread watches: counters, the server's memory, the live line.
struct Watch<'a> {
    plan: &'a Plan,
    stats: &'a [ExecStats],
    server: Option<&'a appserver::PeerAppServer>,
    server_pid: Option<u32>,
    rss_max: Option<u64>,
    start: Instant,
    last_print: Instant,
    last: Snapshot,
    last_gps_in: u64,
    label: &'static str,
}

impl Watch<'_> {
    fn counters(&self) -> Snapshot {
        self.stats.iter().fold(Snapshot::default(), |acc, s| acc.add(&s.c.snapshot()))
    }

    fn live(&self) -> u64 {
        self.stats.iter().map(|s| s.g.live.load(Relaxed).max(0) as u64).sum()
    }

    fn gps_in(&self) -> u64 {
        self.server.map_or(0, |s| s.counters().gps_points.load(Relaxed))
    }

    /// Samples the server's memory and prints the live line (the gate's format, so perf reads
    /// both the same way) once a second.
    fn tick(&mut self) {
        if self.last_print.elapsed() < Duration::from_secs(1) {
            return;
        }
        let dt = self.last_print.elapsed().as_secs_f64();
        self.last_print = Instant::now();
        if let Some(s) = self.server_pid.and_then(procstat::sample) {
            self.rss_max = Some(self.rss_max.unwrap_or(0).max(s.rss_bytes));
        }
        let now = self.counters();
        let d = now.since(&self.last);
        self.last = now;
        let gps_in = self.gps_in();
        let d_in = gps_in.saturating_sub(self.last_gps_in);
        self.last_gps_in = gps_in;
        if self.plan.live {
            let per_s = |n: u64| report::num((n as f64 / dt) as u64);
            eprintln!(
                "[{:>5.1}s {:<5}] {} connections {:>6}/{:<6} gps {:>9} pts/s  app-server in {:>9} pts/s  \
                 pushes in {:>8}/s  errors {}",
                self.start.elapsed().as_secs_f64(),
                self.label,
                self.plan.target.name(),
                self.live(),
                self.plan.drivers,
                per_s(d.gps_points),
                per_s(d_in),
                per_s(d.push_first),
                report::num(now.errors())
            );
        }
    }

    fn wait(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            std::thread::sleep(STEP.min(until.saturating_duration_since(Instant::now())));
            self.tick();
        }
    }
}

/// Runs `plan` against the peer at `plan.gate()` and reports in the gate's format.
pub fn run(plan: Plan) -> Result<Outcome, RunError> {
    plan.validate().map_err(RunError::Plan)?;
    let proto =
        Proto::of(plan.target).ok_or_else(|| RunError::Plan("the gate is not a peer target".into()))?;
    crate::run::pin_to(if plan.appserver_cores.is_empty() { &plan.cores } else { &plan.appserver_cores });
    let cpu_start = procstat::self_cpu_s();
    TcpStream::connect_timeout(&plan.gate(), Duration::from_secs(3))
        .map_err(|e| RunError::Engine(format!("no {} server at {}: {e}", plan.target.name(), plan.gate())))?;
    let tls = match &plan.tls_ca {
        None => None,
        Some(ca) => {
            let client = tls::TlsClient::new(ca, plan.gate()).map_err(RunError::Plan)?;
            tls::handshake(&client, plan.gate(), Duration::from_secs(10)).map_err(|e| {
                RunError::Engine(format!(
                    "TLS handshake with the {} server at {} failed: {e} (--tls-ca {} must be the CA \
                     that signed its certificate, issued for {})",
                    plan.target.name(),
                    plan.gate(),
                    ca.display(),
                    plan.gate().ip()
                ))
            })?;
            Some(client)
        }
    };
    let server_pid = plan.gate_pid.or_else(|| procstat::find_listener_pid(plan.gate().port()));
    let before = server_pid.and_then(procstat::sample);

    let plan = Arc::new(plan);
    let mut server = if plan.appserver && proto != Proto::Ceiling {
        let cfg = appserver::Config {
            addr: plan.gate(),
            proto,
            push_rate: plan.push_rate,
            fanout: plan.fanout.min(plan.drivers),
            payload_bytes: plan.payload_bytes as usize,
            drivers: (plan.uid_base, plan.drivers),
            tls: tls.clone(),
        };
        Some(appserver::PeerAppServer::start(cfg).map_err(|e| {
            RunError::Engine(format!(
                "the app-server cannot reach the {} server at {}: {e}",
                plan.target.name(),
                plan.gate()
            ))
        })?)
    } else {
        None
    };
    let control = Arc::new(Control::default());
    let stats: Arc<Vec<ExecStats>> = Arc::new((0..plan.cores.len()).map(|_| ExecStats::default()).collect());
    let fleet =
        fleet::start(plan.clone(), proto, tls, control.clone(), stats.clone()).map_err(RunError::Engine)?;

    let mut w = Watch {
        plan: &plan,
        stats: &stats,
        server: server.as_ref(),
        server_pid,
        rss_max: before.map(|s| s.rss_bytes),
        start: Instant::now(),
        last_print: Instant::now(),
        last: Snapshot::default(),
        last_gps_in: 0,
        label: "ramp",
    };

    let ramp_s = crate::run::ramp(u64::from(plan.drivers), "connections", || {
        w.wait(STEP);
        w.live()
    });

    // The measured window.
    control.set_phase(Phase::Run);
    if let Some(s) = &server {
        s.start_pushing();
    }
    w.label = "run";
    let live_at_start = w.live();
    let c0 = w.counters();
    let g0 = server_pid.and_then(procstat::sample);
    let own0 = (procstat::self_cpu_s(), crate::engine::stats::loops_cpu_s(&stats));
    let in0 = w.gps_in();
    let t0 = Instant::now();
    while t0.elapsed() < plan.duration {
        w.wait(STEP.min(plan.duration.saturating_sub(t0.elapsed())));
    }
    let window = t0.elapsed();
    let c1 = w.counters();
    let g1 = server_pid.and_then(procstat::sample);
    let own1 = (procstat::self_cpu_s(), crate::engine::stats::loops_cpu_s(&stats));
    let in1 = w.gps_in();
    let live_at_end = w.live();
    let own_rss = procstat::sample(std::process::id()).map(|s| s.rss_bytes);

    // Drain: no new GPS or pushes; wait (bounded) for pushes still on their way.
    control.set_phase(Phase::Drain);
    w.label = "drain";
    let rss_max = w.rss_max;
    if let Some(s) = server.as_mut() {
        s.stop_pushing();
        let pairs = s.counters().pairs.load(Relaxed);
        let received = || stats.iter().map(|e| e.c.push_first.load(Relaxed)).sum::<u64>();
        let (mut last, mut quiet_since) = (received(), Instant::now());
        let until = Instant::now() + DRAIN_MAX;
        while last < pairs && quiet_since.elapsed() < DRAIN_QUIET && Instant::now() < until {
            std::thread::sleep(STEP);
            let now = received();
            if now > last {
                (last, quiet_since) = (now, Instant::now());
            }
        }
    }

    // Stop: every connection ends; collect everything.
    control.set_phase(Phase::Stop);
    let hists = fleet.join();
    let server_out = server.map(appserver::PeerAppServer::finish);
    let total_counters = stats.iter().fold(Snapshot::default(), |acc, s| acc.add(&s.c.snapshot()));

    let mut rep = Report {
        scenario: plan.scenario,
        target: plan.target.name().to_owned(),
        tls: plan.tls_ca.is_some(),
        window_s: window.as_secs_f64(),
        ..Report::default()
    };
    let win = c1.since(&c0);
    let secs = window.as_secs_f64().max(1e-9);
    rep.connections = report::Connections {
        drivers: plan.drivers,
        passengers: 0,
        live_at_start,
        live_at_end,
        ramp_s,
        logins: total_counters.logins,
        login_latency_us: Latency::of(&hists.login),
    };
    // Connect → subscribed (with TLS its handshake included), as the gate's runs report it.
    rep.handshake = report::Handshake { secure: false, latency_us: Latency::of(&hists.login) };
    rep.gps = report::Gps {
        sent: win.gps_points,
        frames: win.gps_frames,
        rate_per_s: win.gps_points as f64 / secs,
        forwarded: in1 - in0,
        gate_cpu_us_per_point: None,
        behind: win.gps_behind,
        late: win.gps_late,
    };
    if let Some(o) = &server_out {
        rep.push.pushes = o.pushes;
        rep.push.sent = o.pairs;
        rep.appserver = report::AppServerReport {
            running: true,
            gps_points: o.gps_points,
            push_failed: o.push_failed,
            connections_lost: o.connections_lost,
            gate_lost: o.connections_lost > 0,
            ..report::AppServerReport::default()
        };
    }
    rep.push.received = total_counters.push_first;
    rep.push.latency_us = Latency::of(&hists.push);
    rep.push.arrival_us = (!hists.push_arrival.is_empty()).then(|| Latency::of(&hists.push_arrival));
    rep.push.loadgen_wait_us = (!hists.push_wait.is_empty()).then(|| Latency::of(&hists.push_wait));
    rep.push.deliveries_per_s = win.push_first as f64 / secs;
    rep.reconnect = report::Reconnect {
        count: total_counters.relogins,
        relogin: total_counters.relogins,
        drops_seen: total_counters.drops_seen,
        latency_us: Latency::of(&hists.reconnect),
        ..report::Reconnect::default()
    };
    rep.idle.sessions = live_at_end;
    if plan.scenario == crate::plan::Scenario::Idle && live_at_end > 0 {
        rep.idle.bytes_per_session = match (before, g1) {
            (Some(b), Some(a)) => Some((a.rss_bytes as f64 - b.rss_bytes as f64) / live_at_end as f64),
            _ => None,
        };
    }
    rep.set_gate(report::Gate::over_window(server_pid, before, g0, g1, rss_max, window));
    rep.loadgen = report::Loadgen {
        cpu_s: procstat::self_cpu_s() - cpu_start,
        rss_bytes: own_rss,
        cores: plan.cores.clone(),
        ..report::Loadgen::default()
    };
    rep.loadgen.set_window((own0.0, own1.0), (own0.1, own1.1), win.gps_frames);
    rep.set_errors(&total_counters);
    rep.counters = total_counters;
    // No receipts, so nothing to audit: a peer run is judged by sent against received.
    rep.ok = true;
    Ok(Outcome { report: rep, hists })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_per_protocol() {
        assert_eq!(Proto::Mqtt.gps_topic(42), b"gps/42");
        assert_eq!(Proto::Nats.gps_topic(42), b"gps.42");
        assert_eq!(Proto::Mqtt.push_topic(7), b"push/7");
        assert_eq!(Proto::Nats.push_topic(7), b"push.7");
        assert_eq!(Proto::Mqtt.gps_filter(), b"gps/#");
        assert_eq!(Proto::Nats.gps_filter(), b"gps.>");
        assert!(is_gps(b"gps/1") && is_gps(b"gps.1"));
        assert!(!is_gps(b"push/1") && !is_gps(b"gps") && !is_gps(b"gpsx1"));
    }

    #[test]
    fn gps_points_are_forty_bytes() {
        let mut out = Vec::new();
        gps_point(&mut out, 1, 2, 3, 4, 5);
        assert_eq!(out.len(), GPS_POINT_BYTES);
        gps_point(&mut out, 1, 2, 3, 4, 6);
        assert_eq!(points_in(out.len()), 2);
        assert_eq!(points_in(3), 1, "a short message still counts as one point");
    }

    #[test]
    fn push_payloads_carry_id_and_time() {
        let mut out = Vec::new();
        push_payload(&mut out, 9, 1_700_000_000_000_000, 64);
        assert_eq!(out.len(), 64);
        assert_eq!(read_push(&out), Some((9, 1_700_000_000_000_000)));
        assert_eq!(read_push(&out[..15]), None);
        out.clear();
        push_payload(&mut out, 1, 2, 4);
        assert_eq!(out.len(), PUSH_HEADER, "never shorter than its header");
    }
}
