//! What a bench measures: the targets, the scenarios, the two profiles (`full` and `quick`),
//! and from them the list of runs, each one loadgen command against one freshly started
//! server. Pure: no processes, no clocks, so the rate math and the run list are tested as such.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// fleetgate's gate, app port in plaintext (`--plaintext`): the reactor, as the peers run.
    Gate,
    /// fleetgate's gate on its secure channel (its default; the development key pair).
    GateSecure,
    /// mosquitto (MQTT 3.1.1, QoS 0).
    Mosquitto,
    /// mosquitto with a TLS 1.3 listener: what a user would otherwise deploy on public networks.
    MosquittoTls,
    /// rumqttd 0.20 (MQTT 3.1.1, QoS 0), the same MQTT traffic as mosquitto.
    Rumqttd,
    /// nats-server.
    NatsServer,
    /// perf's io_uring read-and-discard server.
    Ceiling,
}

impl Target {
    /// Every target, in table order.
    pub const ALL: [Target; 7] = [
        Target::Gate,
        Target::GateSecure,
        Target::Mosquitto,
        Target::MosquittoTls,
        Target::Rumqttd,
        Target::NatsServer,
        Target::Ceiling,
    ];

    /// The plaintext targets: the reactor rows (GPS ratios, push, fan-out).
    pub const PLAIN: [Target; 5] =
        [Target::Gate, Target::Mosquitto, Target::Rumqttd, Target::NatsServer, Target::Ceiling];

    /// The peers: the other brokers the gate is compared with.
    pub const PEERS: [Target; 3] = [Target::Mosquitto, Target::Rumqttd, Target::NatsServer];

    /// It runs a secure channel (the gate's Noise channel, mosquitto's TLS).
    pub fn secure(self) -> bool {
        matches!(self, Target::GateSecure | Target::MosquittoTls)
    }

    /// Its name in tables, JSON and the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Gate => "gate",
            Target::GateSecure => "gate-secure",
            Target::Mosquitto => "mosquitto",
            Target::MosquittoTls => "mosquitto-tls",
            Target::Rumqttd => "rumqttd",
            Target::NatsServer => "nats-server",
            Target::Ceiling => "ceiling",
        }
    }

    /// loadgen's `--target` for it.
    pub fn loadgen_target(self) -> &'static str {
        match self {
            Target::Gate | Target::GateSecure => "gate",
            Target::Mosquitto | Target::MosquittoTls | Target::Rumqttd => "mqtt",
            Target::NatsServer => "nats",
            Target::Ceiling => "ceiling",
        }
    }

    /// Parses a name (`nats` is taken for nats-server, `mqtt` for mosquitto).
    pub fn parse(s: &str) -> Result<Target, String> {
        match s.trim() {
            "gate" => Ok(Target::Gate),
            "gate-secure" => Ok(Target::GateSecure),
            "mosquitto" | "mqtt" => Ok(Target::Mosquitto),
            "mosquitto-tls" => Ok(Target::MosquittoTls),
            "rumqttd" => Ok(Target::Rumqttd),
            "nats-server" | "nats" => Ok(Target::NatsServer),
            "ceiling" => Ok(Target::Ceiling),
            other => {
                Err(format!(
                    "unknown target {other:?}: gate, gate-secure, mosquitto, mosquitto-tls, rumqttd, nats-server or ceiling"
                ))
            }
        }
    }

    /// Bytes one GPS point puts on the wire to this target (application bytes, one point per
    /// TCP segment): the gate and the ceiling get the gate's 64-byte GPS frame; MQTT (mosquitto,
    /// rumqttd) a PUBLISH of a 40-byte point to `gps/<uid>` (2 + 2 + 11 + 40); NATS `PUB gps.<uid> 40` (20 + 40 + 2),
    /// for the 7-digit uids loadgen gives. On the secure channel the frame travels in a Data
    /// record (3-byte header, 16-byte tag); over TLS 1.3 the PUBLISH in a record (5-byte
    /// header, 1-byte inner content type, 16-byte tag).
    pub fn gps_wire_bytes(self) -> u32 {
        match self {
            Target::Gate | Target::Ceiling => GATE_GPS_FRAME_BYTES,
            Target::GateSecure => GATE_GPS_FRAME_BYTES + 3 + 16,
            Target::Mosquitto | Target::Rumqttd => 2 + 2 + 11 + PEER_POINT_BYTES,
            Target::MosquittoTls => 2 + 2 + 11 + PEER_POINT_BYTES + 5 + 1 + 16,
            Target::NatsServer => 20 + PEER_POINT_BYTES + 2,
        }
    }
}

/// The gate's GPS frame: 24-byte header and a 40-byte FlatBuffers body.
pub const GATE_GPS_FRAME_BYTES: u32 = 64;
/// The message of one GPS point sent to a peer.
pub const PEER_POINT_BYTES: u32 = loadgen::peers::GPS_POINT_BYTES as u32;

/// A group of runs and the figure it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// GPS ingest, one point per segment, over the profile's GPS connections at several rates.
    Gps,
    /// The same over many connections at a lower rate.
    GpsMany,
    /// GPS in batches of 10 points per frame, offered past what one gate core takes.
    Batch,
    /// Push latency, fan-out 5, with many drivers and GPS running.
    Push,
    /// Push deliveries per second for large fan-outs.
    Fanout,
    /// Memory per idle session.
    Idle,
    /// Sessions dropped at once and resumed.
    Storm,
}

impl Kind {
    /// Every scenario, in run order.
    pub const ALL: [Kind; 7] =
        [Kind::Gps, Kind::GpsMany, Kind::Batch, Kind::Push, Kind::Fanout, Kind::Idle, Kind::Storm];

    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gps => "gps",
            Kind::GpsMany => "gps-many",
            Kind::Batch => "batch",
            Kind::Push => "push",
            Kind::Fanout => "fanout",
            Kind::Idle => "idle",
            Kind::Storm => "storm",
        }
    }

    /// True when `--realtime` applies to its runs. Fan-out runs keep normal priority: each
    /// server is at its core's limit there, and under SCHED_FIFO a server of several threads on
    /// one core (nats-server's Go runtime) stops preempting itself between them, which cut its
    /// CPU per delivery threefold in a measurement here; that is not how it runs in production,
    /// so the comparison would not be either. The latency runs use a fraction of a core, where
    /// what real-time priority removes is other processes' preemption.
    pub fn realtime(self) -> bool {
        self != Kind::Fanout
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL.into_iter().find(|k| k.name() == s.trim()).ok_or_else(|| {
            format!("unknown scenario {s:?}: gps, gps-many, batch, push, fanout, idle or storm")
        })
    }

    /// The targets that can run it: batches and storms are the gate's own (peers have no batch
    /// frame and no sessions to resume); the ceiling only reads GPS. The secure targets (the
    /// gate's channel, mosquitto's TLS) run where the channel's cost shows: the real fleet's
    /// GPS, batches, idle sessions and the storm (handshakes over the ramp, resumes after the
    /// drop); the rate sweep, push and fan-out stay plaintext rows of the reactor.
    pub fn targets(self) -> &'static [Target] {
        match self {
            Kind::Gps => &Target::PLAIN,
            Kind::GpsMany => &Target::ALL,
            Kind::Push | Kind::Fanout => {
                &[Target::Gate, Target::Mosquitto, Target::Rumqttd, Target::NatsServer]
            }
            Kind::Idle => &[
                Target::Gate,
                Target::GateSecure,
                Target::Mosquitto,
                Target::MosquittoTls,
                Target::Rumqttd,
                Target::NatsServer,
            ],
            Kind::Batch | Kind::Storm => &[Target::Gate, Target::GateSecure],
        }
    }
}

/// The sizes of one bench.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// `full` or `quick`.
    pub name: String,
    /// Measured window of most runs, s.
    pub window_s: f64,
    /// Connections of the GPS runs.
    pub gps_conns: u32,
    /// Offered GPS rates, points/s over all connections.
    pub gps_rates: Vec<f64>,
    /// Connections of the many-connection GPS runs (the real fleet's size).
    pub many_conns: u32,
    /// Points/s each of those connections sends, one run per rate (one point per segment).
    /// Results written before this field have `many_rate` (the total) instead; it is ignored.
    #[serde(default)]
    pub many_rates_per_conn: Vec<f64>,
    /// Connections of the batch run, and the points/s offered (10 per frame).
    pub batch_conns: u32,
    /// See `batch_conns`.
    pub batch_rate: f64,
    /// Drivers connected during the push runs.
    pub push_drivers: u32,
    /// GPS points/s per driver during the latency run.
    pub push_gps_rate: f64,
    /// Pushes/s of the latency runs, each to 5 drivers.
    pub push_rate: f64,
    /// Drivers of the second latency run, idle (no GPS): the push path alone. 0: no such run.
    /// Results written before this field have none.
    #[serde(default)]
    pub push_idle_drivers: u32,
    /// Fan-outs measured for deliveries/s.
    pub fanouts: Vec<u32>,
    /// Deliveries/s offered in the fan-out runs (push rate = this / fan-out).
    pub fanout_offered: f64,
    /// Idle sessions of each idle run, smallest first: with two sizes the tables give the
    /// slope between them (bytes each added session costs) beside the average. Results written
    /// before this field have `idle_sessions` (one size) instead; it is ignored.
    #[serde(default)]
    pub idle_sizes: Vec<u32>,
    /// How long the idle sessions idle before memory is read.
    pub idle_window_s: f64,
    /// How long the server runs with no connection before idle CPU is read, s.
    pub idle_cpu_s: f64,
    /// Sessions dropped at once in the storm.
    pub storm_sessions: u32,
}

/// Fan-out of the latency run: a dispatch offers an order to the nearest few drivers.
pub const PUSH_FANOUT: u32 = 5;
/// Points per frame in the batch run.
pub const BATCH: u32 = 10;
/// Bound on the sessions of one loadgen process and one server (20,000 open files each).
pub const MAX_CONNS: u32 = 18_500;

impl Profile {
    /// The full bench: DESIGN's sizes, about 10 minutes on the 2-core machine.
    pub fn full() -> Profile {
        Profile {
            name: "full".into(),
            window_s: 10.0,
            gps_conns: 1000,
            // One loadgen core offers about 100k segments/s (the kernel's loopback path is
            // charged to the sender); 25k and 50k keep verdicts where loadgen is not bound.
            gps_rates: vec![25_000.0, 50_000.0, 100_000.0, 200_000.0],
            // The real fleet: 15,000 drivers at 3 points/s (45k/s) and at 1 point/s (15k/s).
            many_conns: 15_000,
            many_rates_per_conn: vec![3.0, 1.0],
            batch_conns: 1000,
            batch_rate: 2_000_000.0,
            push_drivers: 15_000,
            // Each driver reports every 3 s, as a real fleet does.
            push_gps_rate: 1.0 / 3.0,
            push_rate: 200.0,
            push_idle_drivers: 2000,
            fanouts: vec![1000, 10_000],
            fanout_offered: 200_000.0,
            // The slope between 9,250 and 18,500 sessions is what one more session costs,
            // whatever the server allocated up front.
            idle_sizes: vec![MAX_CONNS / 2, MAX_CONNS],
            idle_window_s: 30.0,
            idle_cpu_s: 3.0,
            storm_sessions: 15_000,
        }
    }

    /// The same scenarios smaller: under 3 minutes.
    pub fn quick() -> Profile {
        Profile {
            name: "quick".into(),
            window_s: 3.0,
            gps_conns: 1000,
            gps_rates: vec![25_000.0, 50_000.0, 100_000.0],
            many_conns: 5000,
            many_rates_per_conn: vec![3.0],
            batch_conns: 1000,
            batch_rate: 2_000_000.0,
            push_drivers: 5000,
            push_gps_rate: 1.0 / 3.0,
            push_rate: 200.0,
            push_idle_drivers: 2000,
            fanouts: vec![1000, 5000],
            fanout_offered: 200_000.0,
            idle_sizes: vec![5000],
            idle_window_s: 4.0,
            idle_cpu_s: 1.0,
            storm_sessions: 5000,
        }
    }

    /// Every connection count set to `n` (fan-outs capped at it), for small test benches.
    pub fn with_conns(mut self, n: u32) -> Profile {
        let n = n.clamp(1, MAX_CONNS);
        self.gps_conns = n;
        self.many_conns = n;
        self.batch_conns = n;
        self.push_drivers = n;
        self.push_idle_drivers = self.push_idle_drivers.min(n);
        self.idle_sizes = vec![n];
        self.storm_sessions = n;
        for f in &mut self.fanouts {
            *f = (*f).min(n);
        }
        self.fanouts.dedup();
        self
    }
}

/// One run: one scenario, one target, one freshly started server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The scenario group.
    pub kind: Kind,
    /// The server.
    pub target: Target,
    /// Connections (drivers).
    pub conns: u32,
    /// GPS points/s offered over all connections (0: none).
    pub offered_per_s: f64,
    /// Points per GPS frame.
    pub batch: u32,
    /// Drivers each push names (0: no pushes).
    pub fanout: u32,
    /// Pushes per second.
    pub push_rate: f64,
    /// Measured window, s.
    pub window_s: f64,
    /// The gate forwards every GPS point to the app-server (`--gps-forward all`, as the peers
    /// deliver every message), not just each driver's latest per flush (its default).
    pub forward_all: bool,
}

impl RunSpec {
    /// GPS points/s each connection sends so that all of them offer `offered_per_s`.
    pub fn per_conn_rate(&self) -> f64 {
        if self.conns == 0 {
            0.0
        } else {
            self.offered_per_s / f64::from(self.conns)
        }
    }

    /// When the storm comes, from the start of the window, s.
    pub fn storm_at_s(&self) -> f64 {
        (self.window_s / 3.0).max(0.5)
    }

    /// A short name for tables: `gps 1,000 conns @ 100k/s`.
    pub fn label(&self) -> String {
        let conns = loadgen::report::num(u64::from(self.conns));
        match self.kind {
            Kind::Gps | Kind::GpsMany => format!("gps {conns} conns @ {}/s", si(self.offered_per_s)),
            Kind::Batch => format!("gps batch {} {conns} conns @ {}/s", self.batch, si(self.offered_per_s)),
            Kind::Push => format!("push fan-out {} @ {}/s, {conns} drivers", self.fanout, si(self.push_rate)),
            Kind::Fanout => format!(
                "push fan-out {} @ {}/s, {conns} drivers",
                si(f64::from(self.fanout)),
                si(self.push_rate)
            ),
            Kind::Idle => format!("idle {conns} sessions"),
            Kind::Storm => format!("storm {conns} sessions"),
        }
    }

    /// The loadgen subcommand and flags for this run against a server at `app` (and the
    /// gate's `sidecar` and `admin` port; `tls_ca`, the CA of a TLS server's certificate), with
    /// loadgen on `core`, its figures about `server_pid`, latency histograms into `hgrm`.
    #[allow(clippy::too_many_arguments)]
    pub fn loadgen_args(
        &self,
        app: SocketAddr,
        sidecar: Option<SocketAddr>,
        admin: Option<SocketAddr>,
        tls_ca: Option<&Path>,
        server_pid: u32,
        core: usize,
        hgrm: &Path,
    ) -> Vec<String> {
        let sub = match self.kind {
            Kind::Gps | Kind::GpsMany | Kind::Batch => "gps",
            Kind::Push | Kind::Fanout => "push",
            Kind::Idle => "idle",
            Kind::Storm => "storm",
        };
        let mut a: Vec<String> = vec![sub.into()];
        let mut flag = |k: &str, v: String| {
            a.push(k.into());
            a.push(v);
        };
        if self.kind != Kind::Storm {
            flag("--target", self.target.loadgen_target().into());
        }
        flag("--gate", app.to_string());
        if let Some(s) = sidecar {
            flag("--sidecar", s.to_string());
        }
        flag("--cores", core.to_string());
        flag("--gate-pid", server_pid.to_string());
        // The gate's own push-path figures come from its admin port; with none known, nothing
        // is scraped (loadgen's default port could be another process's).
        flag("--gate-admin", admin.map_or_else(|| "none".to_owned(), |a| a.to_string()));
        flag("--duration", format!("{}s", self.window_s));
        flag("--drivers", self.conns.to_string());
        flag("--hgrm", hgrm.display().to_string());
        if self.kind != Kind::Idle {
            flag("--rate", format!("{}", self.per_conn_rate()));
            flag("--batch", self.batch.max(1).to_string());
        }
        match self.kind {
            Kind::Push | Kind::Fanout | Kind::Storm => {
                flag("--fanout", self.fanout.to_string());
                flag("--push-rate", format!("{}", self.push_rate));
            }
            _ => {}
        }
        if self.kind == Kind::Storm {
            flag("--storm-percent", "100".into());
            flag("--storm-at", format!("{}s", self.storm_at_s()));
        }
        if self.target == Target::Gate {
            // The plain gate runs in plaintext (servers.rs): these rows measure the reactor.
            // gate-secure gets loadgen's default, the secure channel with the development key.
            a.push("--plaintext".into());
        }
        if let Some(ca) = tls_ca {
            a.push("--tls-ca".into());
            a.push(ca.display().to_string());
        }
        a.push("--json".into());
        a
    }

    /// Longest the loadgen run may take: the window, the ramp at the pace of the slowest
    /// server (loadgen keeps at most 512 handshakes open and waits for the server; rumqttd
    /// answers 500–900 a second with GPS flowing, so 15,000 connections take about 30 s), the
    /// drain (at most a push's TTL and a storm's patience) and the stop.
    pub fn timeout(&self) -> Duration {
        let ramp = f64::from(self.conns) / 500.0 + 10.0;
        let drain = if self.fanout > 0 || self.kind == Kind::Storm { 30.0 } else { 5.0 };
        Duration::from_secs_f64(self.window_s + ramp + drain + 20.0)
    }
}

/// `200000` → `200k`, `2000000` → `2M`, `5` → `5`.
pub fn si(v: f64) -> String {
    let trim = |x: f64| {
        let s = format!("{x:.1}");
        s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
    };
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

/// The runs of `profile` for the chosen scenarios and targets, in order: each scenario for
/// every target before the next, so one scenario's figures are close in time.
pub fn runs(profile: &Profile, kinds: &[Kind], targets: &[Target]) -> Vec<RunSpec> {
    let mut out = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| kinds.contains(k)) {
        let mut specs: Vec<RunSpec> = Vec::new();
        let base = RunSpec {
            kind,
            target: Target::Gate,
            conns: 0,
            offered_per_s: 0.0,
            batch: 1,
            fanout: 0,
            push_rate: 0.0,
            window_s: profile.window_s,
            forward_all: true,
        };
        match kind {
            Kind::Gps => {
                for &r in &profile.gps_rates {
                    specs.push(RunSpec { conns: profile.gps_conns, offered_per_s: r, ..base.clone() });
                }
            }
            Kind::GpsMany => {
                for &per_conn in &profile.many_rates_per_conn {
                    specs.push(RunSpec {
                        conns: profile.many_conns,
                        offered_per_s: per_conn * f64::from(profile.many_conns),
                        ..base.clone()
                    });
                }
            }
            Kind::Batch => specs.push(RunSpec {
                conns: profile.batch_conns,
                offered_per_s: profile.batch_rate,
                batch: BATCH,
                // Over a million points a second back to an app-server on loadgen's core,
                // beside the drivers sending them, is more than one core does: the gate sends
                // each driver's latest point per flush (its default), and ingest is the figure.
                forward_all: false,
                ..base.clone()
            }),
            Kind::Push => {
                specs.push(RunSpec {
                    conns: profile.push_drivers,
                    offered_per_s: profile.push_gps_rate * f64::from(profile.push_drivers),
                    fanout: PUSH_FANOUT.min(profile.push_drivers),
                    push_rate: profile.push_rate,
                    ..base.clone()
                });
                if profile.push_idle_drivers > 0 {
                    specs.push(RunSpec {
                        conns: profile.push_idle_drivers,
                        offered_per_s: 0.0,
                        fanout: PUSH_FANOUT.min(profile.push_idle_drivers),
                        push_rate: profile.push_rate,
                        ..base.clone()
                    });
                }
            }
            Kind::Fanout => {
                for &f in &profile.fanouts {
                    let f = f.min(profile.push_drivers).max(1);
                    specs.push(RunSpec {
                        conns: profile.push_drivers,
                        fanout: f,
                        push_rate: (profile.fanout_offered / f64::from(f)).max(1.0),
                        ..base.clone()
                    });
                }
            }
            Kind::Idle => {
                for &n in &profile.idle_sizes {
                    specs.push(RunSpec { conns: n, window_s: profile.idle_window_s, ..base.clone() });
                }
            }
            Kind::Storm => specs.push(RunSpec {
                conns: profile.storm_sessions,
                // Pushes through the storm: every one must still end in one receipt.
                fanout: 100.min(profile.storm_sessions),
                push_rate: 5.0,
                ..base.clone()
            }),
        }
        for spec in specs {
            for &t in kind.targets().iter().filter(|t| targets.contains(t)) {
                out.push(RunSpec { target: t, ..spec.clone() });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_math() {
        let r = RunSpec {
            kind: Kind::Gps,
            target: Target::Gate,
            conns: 1000,
            offered_per_s: 100_000.0,
            batch: 1,
            fanout: 0,
            push_rate: 0.0,
            window_s: 10.0,
            forward_all: true,
        };
        assert_eq!(r.per_conn_rate(), 100.0);
        assert_eq!(RunSpec { conns: 0, ..r.clone() }.per_conn_rate(), 0.0);
        // A batch run offers points: frames per connection are rate / batch inside loadgen.
        let b = RunSpec { kind: Kind::Batch, batch: 10, offered_per_s: 2e6, ..r.clone() };
        assert_eq!(b.per_conn_rate(), 2000.0);
        assert_eq!(si(200_000.0), "200k");
        assert_eq!(si(2_000_000.0), "2M");
        assert_eq!(si(1_500.0), "1.5k");
        assert_eq!(si(5.0), "5");
        assert_eq!(r.label(), "gps 1,000 conns @ 100k/s");
    }

    #[test]
    fn loadgen_args_per_kind() {
        let app: SocketAddr = "127.0.0.1:7100".parse().expect("addr");
        let r = runs(&Profile::quick(), &[Kind::Gps], &[Target::NatsServer]);
        let a = r[0].loadgen_args(app, None, None, None, 42, 1, Path::new("/tmp/h"));
        let s = a.join(" ");
        assert!(s.starts_with("gps --target nats --gate 127.0.0.1:7100 --cores 1 --gate-pid 42"), "{s}");
        assert!(s.contains("--rate 25 --batch 1") && s.ends_with("--json"), "{s}");
        assert!(s.contains("--gate-admin none"), "no admin port known, nothing scraped: {s}");
        let admin: SocketAddr = "127.0.0.1:7301".parse().expect("addr");
        let s = r[0].loadgen_args(app, None, Some(admin), None, 42, 1, Path::new("/tmp/h")).join(" ");
        assert!(s.contains("--gate-admin 127.0.0.1:7301"), "{s}");
        let storm = runs(&Profile::quick(), &[Kind::Storm], &Target::ALL);
        let s = storm[0].loadgen_args(app, Some(app), None, None, 1, 1, Path::new("/tmp/h")).join(" ");
        assert!(s.starts_with("storm --gate") && s.contains("--storm-percent 100"), "{s}");
        assert!(!s.contains("--target"), "storm has no peer targets: {s}");
        let idle = runs(&Profile::quick(), &[Kind::Idle], &[Target::Mosquitto]);
        let s = idle[0].loadgen_args(app, None, None, None, 1, 1, Path::new("/tmp/h")).join(" ");
        assert!(s.starts_with("idle --target mqtt") && !s.contains("--rate"), "{s}");
    }

    #[test]
    fn run_lists_follow_the_scenarios_and_targets() {
        let full = runs(&Profile::full(), &Kind::ALL, &Target::ALL);
        let count = |k: Kind| full.iter().filter(|r| r.kind == k).count();
        assert_eq!(count(Kind::Gps), 4 * 5);
        assert_eq!(count(Kind::GpsMany), 2 * 7);
        assert_eq!(count(Kind::Batch), 2);
        // The loaded fleet and the idle one, each on four servers.
        assert_eq!(count(Kind::Push), 2 * 4);
        assert_eq!(count(Kind::Fanout), 2 * 4);
        assert_eq!(count(Kind::Idle), 2 * 6);
        assert_eq!(count(Kind::Storm), 2);
        // The rate sweep, push and fan-out are the reactor's rows: plaintext only.
        for k in [Kind::Gps, Kind::Push, Kind::Fanout] {
            assert!(
                full.iter()
                    .filter(|r| r.kind == k)
                    .all(|r| !matches!(r.target, Target::GateSecure | Target::MosquittoTls)),
                "{k:?} has a secure run"
            );
        }
        for t in Target::PEERS {
            for k in [Kind::Gps, Kind::GpsMany, Kind::Push, Kind::Fanout, Kind::Idle] {
                assert!(full.iter().any(|r| r.kind == k && r.target == t), "{t:?} has no {k:?} run");
            }
        }
        assert!(full.iter().all(|r| r.conns <= MAX_CONNS));
        let fan = full.iter().find(|r| r.kind == Kind::Fanout && r.fanout == 10_000).expect("10k fan-out");
        assert_eq!(fan.push_rate, 20.0);
        let only = runs(&Profile::quick().with_conns(50), &[Kind::Gps], &[Target::Gate]);
        assert_eq!(only.len(), 3);
        assert!(only.iter().all(|r| r.conns == 50 && r.target == Target::Gate));
        assert_eq!(Profile::quick().with_conns(50).fanouts, vec![50]);
    }

    #[test]
    fn the_real_fleet_rows() {
        let full = runs(&Profile::full(), &[Kind::GpsMany], &[Target::Gate]);
        let rows: Vec<(u32, f64, f64)> =
            full.iter().map(|r| (r.conns, r.offered_per_s, r.per_conn_rate())).collect();
        assert_eq!(rows, vec![(15_000, 45_000.0, 3.0), (15_000, 15_000.0, 1.0)]);
        assert!(full.iter().all(|r| r.batch == 1 && r.forward_all), "one point per segment, every point");
        let quick = runs(&Profile::quick(), &[Kind::GpsMany], &Target::ALL);
        assert!(!quick.is_empty() && quick.iter().all(|r| r.conns < 15_000), "the quick fleet is smaller");
        // A tiny bench keeps the rows' rates per connection.
        let tiny = runs(&Profile::full().with_conns(200), &[Kind::GpsMany], &[Target::Gate]);
        let offered: Vec<f64> = tiny.iter().map(|r| r.offered_per_s).collect();
        assert_eq!(offered, vec![600.0, 200.0]);

        let idle = runs(&Profile::full(), &[Kind::Idle], &[Target::Gate, Target::Rumqttd]);
        let sizes: Vec<(u32, Target)> = idle.iter().map(|r| (r.conns, r.target)).collect();
        assert_eq!(
            sizes,
            vec![
                (9_250, Target::Gate),
                (9_250, Target::Rumqttd),
                (18_500, Target::Gate),
                (18_500, Target::Rumqttd)
            ]
        );
        assert_eq!(runs(&Profile::quick(), &[Kind::Idle], &[Target::Gate]).len(), 1);
    }

    #[test]
    fn names_parse_back() {
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()), Ok(t));
        }
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Ok(k));
        }
        assert_eq!(Target::parse("nats"), Ok(Target::NatsServer));
        assert!(Target::parse("redis").is_err() && Kind::parse("x").is_err());
        assert_eq!(Target::parse("rumqttd"), Ok(Target::Rumqttd));
        assert_eq!(Target::Rumqttd.loadgen_target(), "mqtt");
        assert_eq!(Target::Mosquitto.gps_wire_bytes(), 55);
        assert_eq!(Target::Rumqttd.gps_wire_bytes(), 55);
        assert_eq!(Target::NatsServer.gps_wire_bytes(), 62);
    }
}
