//! What one run does: the scenario and every number it needs, resolved from the command line
//! (`cli`) or built directly by a benchmark (`perf` calls `loadgen::run` with a `Plan`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The gate's built-in development secret, for tokens and the sidecar hello alike.
pub const DEV_SECRET: &str = "fleetgate-dev-secret-change-me";

/// Most gate nodes one run spreads its apps over (each app keeps its node as a 16-bit index).
pub const MAX_NODES: usize = 1024;

/// Which traffic a run produces and what its report stresses. In the report's JSON it is its
/// [`name`](Scenario::name) (`"gps"`, `"mixed"`, ...); `Default` is `Gps`, as [`Plan`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// GPS ingest: drivers report as fast as asked, an app-server takes the batches.
    #[default]
    Gps,
    /// Push fan-out latency with GPS running underneath.
    Push,
    /// Logged-in sessions that only keep alive: the gate's memory per session.
    Idle,
    /// Drop a share of the connections at once and time how long until all are back.
    Storm,
    /// The whole business flow: orders, offers to the nearest drivers, grabs, order status.
    Mixed,
    /// Misbehaving peers beside a well-behaved fleet.
    Bad,
    /// Orders offered by GeoPush over a fleet driving a 30 × 30 km area, every answer checked
    /// against the positions loadgen sent.
    Geo,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 7] = [
        Scenario::Gps,
        Scenario::Push,
        Scenario::Idle,
        Scenario::Storm,
        Scenario::Mixed,
        Scenario::Bad,
        Scenario::Geo,
    ];

    /// The subcommand's name, as the report prints it.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Gps => "gps",
            Scenario::Push => "push",
            Scenario::Idle => "idle",
            Scenario::Storm => "storm",
            Scenario::Mixed => "mixed",
            Scenario::Bad => "bad",
            Scenario::Geo => "geo",
        }
    }
}

/// How the dispatch app-server chooses the drivers an order is offered to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DispatchMode {
    /// Its own nearest-driver search over the GPS the gate forwards, then a Push.
    #[default]
    Local,
    /// One GeoPush: the gate chooses the nearest drivers from the points it holds and pushes.
    Geo,
}

/// Which server a run drives. The peers (`mqtt`, `nats`) and the `ceiling` carry the same fleet,
/// rates and connection counts over their own protocols (see [`crate::peers`]), so the gate's
/// cost per point can be set beside theirs measured in the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Target {
    /// A fleetgate gate: login, GPS frames, pushes with receipts, the app-server on the sidecar.
    #[default]
    Gate,
    /// An MQTT 3.1.1 broker (mosquitto): QoS 0 publishes to `gps/<uid>`, `push/<uid>`.
    Mqtt,
    /// A NATS server: `PUB gps.<uid>`, `push.<uid>`.
    Nats,
    /// perf's read-and-discard server: drivers only write GPS frames; nothing comes back.
    Ceiling,
}

impl Target {
    /// The name the command line and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            Target::Gate => "gate",
            Target::Mqtt => "mqtt",
            Target::Nats => "nats",
            Target::Ceiling => "ceiling",
        }
    }
}

/// Counts of misbehaving peers (`bad` scenario).
#[derive(Debug, Clone, PartialEq)]
pub struct BadPlan {
    /// Drivers that log in and then never read.
    pub slow_readers: u32,
    /// Bytes of each push the app-server sends to every slow reader.
    pub slow_push_bytes: u32,
    /// How long a slow reader leaves its socket unread before looking at what happened.
    pub slow_hold: Duration,
    /// Connections that send bytes that are not fleetgate frames.
    pub garbage: u32,
    /// Connections that send half a frame and then nothing.
    pub half_open: u32,
}

impl Default for BadPlan {
    fn default() -> Self {
        BadPlan {
            slow_readers: 0,
            slow_push_bytes: 16 * 1024,
            slow_hold: Duration::from_secs(10),
            garbage: 0,
            half_open: 0,
        }
    }
}

/// Everything one run needs. `Plan::default()` is a small GPS run against the default ports.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What the run does.
    pub scenario: Scenario,
    /// Which server it drives (the gate unless a peer is named).
    pub target: Target,
    /// The gate nodes' app ports, never empty: one gate, or the nodes of a cluster sharing a
    /// session directory (docs/PROTOCOL.md §15). Apps are spread over them by index; the first
    /// one is the gate the report's `gate` section describes (its pid, CPU and memory).
    pub gates: Vec<SocketAddr>,
    /// Every reconnect goes to the next node in `gates` after the one that held the session,
    /// so each resume must move the session to another node (`--move`).
    pub move_nodes: bool,
    /// The gate's sidecar port (the app-server side).
    pub sidecar: SocketAddr,
    /// Secret login tokens are signed with (the gate's `auth.token_secret`).
    pub token_secret: Vec<u8>,
    /// The sidecar hello's secret (the gate's `sidecar.secret`).
    pub sidecar_secret: Vec<u8>,
    /// The gate's public key: apps speak the secure channel (docs/PROTOCOL.md §14); none:
    /// plaintext frames.
    pub server_key: Option<channel::PublicKey>,
    /// With `Target::Mqtt`: the PEM file of the CA that signed the broker's certificate, and
    /// every MQTT connection speaks TLS 1.3 (see [`crate::peers::tls`]); none: plain TCP.
    pub tls_ca: Option<PathBuf>,
    /// CPU cores, one pinned executor each; simulated apps are spread over them.
    pub cores: Vec<usize>,
    /// Local addresses connections are spread over (empty: the kernel picks).
    pub source_ips: Vec<IpAddr>,
    /// Length of the measured window, after every session is up.
    pub duration: Duration,
    /// First uid; drivers take `uid_base..uid_base+drivers`, passengers the next ones.
    pub uid_base: u64,
    /// Simulated drivers.
    pub drivers: u32,
    /// Simulated passengers.
    pub passengers: u32,
    /// GPS points per second per driver (0: none).
    pub rate: f64,
    /// GPS points per frame.
    pub batch: u32,
    /// New connections per second while ramping up, so the gate's backlog is not overflowed.
    pub connect_rate: u32,
    /// Random connection drops per second across the fleet, during the window.
    pub disconnect_rate: f64,
    /// Share of sessions (percent) dropped at once in a storm; 0: no storm.
    pub storm_percent: f64,
    /// When the storm comes, from the start of the window.
    pub storm_at: Duration,
    /// The gate's session hold, for bounding the final wait for receipts.
    pub hold_ms: u32,
    /// Run an app-server on the sidecar (GPS sink, pushes, dispatch).
    pub appserver: bool,
    /// Sidecar connections the app-server opens.
    pub sidecar_conns: u32,
    /// Cores for the app-server's threads (and the main thread); empty: `cores`.
    pub appserver_cores: Vec<usize>,
    /// Pushes per second from the app-server to random drivers (0: none).
    pub push_rate: f64,
    /// Drivers each of those pushes names.
    pub fanout: u32,
    /// Payload bytes of each push.
    pub payload_bytes: u32,
    /// Time-to-live of every push, ms.
    pub ttl_ms: u32,
    /// Orders per second per passenger.
    pub order_rate: f64,
    /// Chance that a driver offered an order tries to grab it.
    pub grab_prob: f64,
    /// Drivers each order is offered to (the nearest ones).
    pub dispatch_k: u32,
    /// Who chooses them.
    pub dispatch: DispatchMode,
    /// GeoPush orders per second from the app-server (`geo`; 0: none).
    pub geo_rate: f64,
    /// Half the sides of the square the drivers drive in, degrees of (latitude, longitude).
    pub area_half_deg: (f64, f64),
    /// Misbehaving peers.
    pub bad: BadPlan,
    /// The gate's pid for CPU and memory figures; `None`: found from the app port.
    pub gate_pid: Option<u32>,
    /// The gate's admin address, for its push-path histograms over the window (`None`: not
    /// scraped).
    pub gate_admin: Option<SocketAddr>,
    /// Print a live line each second on stderr.
    pub live: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            scenario: Scenario::Gps,
            target: Target::Gate,
            gates: vec![SocketAddr::from(([127, 0, 0, 1], 7100))],
            move_nodes: false,
            sidecar: SocketAddr::from(([127, 0, 0, 1], 7200)),
            token_secret: DEV_SECRET.as_bytes().to_vec(),
            sidecar_secret: DEV_SECRET.as_bytes().to_vec(),
            server_key: Some(*channel::Keypair::dev().public()),
            tls_ca: None,
            cores: vec![0],
            source_ips: Vec::new(),
            duration: Duration::from_secs(15),
            uid_base: 1_000_000,
            drivers: 1000,
            passengers: 0,
            rate: 1.0,
            batch: 1,
            connect_rate: 5000,
            disconnect_rate: 0.0,
            storm_percent: 0.0,
            storm_at: Duration::from_secs(5),
            hold_ms: 60_000,
            appserver: true,
            sidecar_conns: 2,
            appserver_cores: Vec::new(),
            push_rate: 0.0,
            fanout: 1000,
            payload_bytes: 64,
            ttl_ms: 5000,
            order_rate: 0.0,
            grab_prob: 0.5,
            dispatch_k: 5,
            dispatch: DispatchMode::Local,
            geo_rate: 0.0,
            area_half_deg: (crate::engine::driver::RADIUS_DEG, crate::engine::driver::RADIUS_DEG),
            bad: BadPlan::default(),
            gate_pid: None,
            gate_admin: None,
            live: true,
        }
    }
}

impl Plan {
    /// The first node: the gate a single-node run drives, and the one whose process the
    /// report describes.
    pub fn gate(&self) -> SocketAddr {
        self.gates[0]
    }

    /// Simulated apps in all (drivers and passengers, not bad peers).
    pub fn apps(&self) -> u32 {
        self.drivers + self.passengers
    }

    /// The uid of driver `i`.
    pub fn driver_uid(&self, i: u32) -> u64 {
        self.uid_base + u64::from(i)
    }

    /// The uid of passenger `j`.
    pub fn passenger_uid(&self, j: u32) -> u64 {
        self.uid_base + u64::from(self.drivers) + u64::from(j)
    }

    /// The uid of slow reader `k` (after every driver and passenger).
    pub fn slow_reader_uid(&self, k: u32) -> u64 {
        self.uid_base + u64::from(self.apps()) + u64::from(k)
    }

    /// Longest the final wait for receipts may take: a push's TTL, the hold, and 2 s for the
    /// gate's last receipt batch to travel.
    pub fn receipt_wait(&self) -> Duration {
        Duration::from_millis(u64::from(self.ttl_ms) + u64::from(self.hold_ms) + 2000)
    }

    /// What a peer target cannot do: only drivers (GPS, pushes, idle), no chaos, and the
    /// ceiling takes GPS and nothing else.
    fn validate_peer(&self) -> Result<(), String> {
        let t = self.target.name();
        let ok = match self.target {
            Target::Gate => true,
            Target::Mqtt | Target::Nats => {
                matches!(self.scenario, Scenario::Gps | Scenario::Push | Scenario::Idle)
            }
            Target::Ceiling => self.scenario == Scenario::Gps,
        };
        if !ok {
            return Err(format!("--target {t} does not run the {} scenario", self.scenario.name()));
        }
        if self.passengers > 0 || self.order_rate > 0.0 {
            return Err(format!("--target {t} simulates drivers only (no passengers, no orders)"));
        }
        if self.disconnect_rate > 0.0 || self.storm_percent > 0.0 {
            return Err(format!("--target {t} has no sessions to resume: no --disconnect-rate or storm"));
        }
        if !self.source_ips.is_empty() {
            return Err(format!("--target {t} connects from the default address: drop --source-ips"));
        }
        if self.push_rate > 0.0 && self.payload_bytes < crate::peers::PUSH_HEADER as u32 {
            return Err(format!(
                "--target {t}: push payloads carry a {}-byte id and timestamp: --payload-bytes must be at least that",
                crate::peers::PUSH_HEADER
            ));
        }
        Ok(())
    }

    /// Checks the node list: at least one, each once, few enough for an index of 16 bits, and
    /// `--move` only with somewhere to move to.
    fn validate_nodes(&self) -> Result<(), String> {
        if self.gates.is_empty() {
            return Err("--gate names no node".into());
        }
        if self.gates.len() > MAX_NODES {
            return Err(format!("--gate names {} nodes; at most {MAX_NODES}", self.gates.len()));
        }
        for (i, a) in self.gates.iter().enumerate() {
            if self.gates[..i].contains(a) {
                return Err(format!("--gate names {a} twice"));
            }
        }
        if self.move_nodes && self.gates.len() < 2 {
            return Err("--move needs at least two nodes in --gate (e.g. --gate A,B)".into());
        }
        if self.target != Target::Gate && self.gates.len() > 1 {
            return Err(format!("--target {} takes one server in --gate", self.target.name()));
        }
        Ok(())
    }

    /// Checks what clap cannot: numbers that only make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.cores.is_empty() {
            return Err("--cores names no core".into());
        }
        self.validate_nodes()?;
        if self.scenario == Scenario::Bad && self.server_key.is_some() {
            // Its peers write raw frames (half headers, garbage, a login then silence) on
            // purpose, below any channel.
            return Err(
                "the bad scenario speaks plaintext frames: run the gate with --plaintext and add --plaintext"
                    .into(),
            );
        }
        if self.batch == 0 || self.batch > 1000 {
            return Err("--batch must be 1..=1000 (the gate refuses larger GpsBatch frames)".into());
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err("--rate must be a number ≥ 0".into());
        }
        if !(0.0..=100.0).contains(&self.storm_percent) {
            return Err("--storm-percent must be 0..=100".into());
        }
        if !(0.0..=1.0).contains(&self.grab_prob) {
            return Err("--grab-prob must be 0..=1".into());
        }
        if self.ttl_ms == 0 || self.ttl_ms > 300_000 {
            return Err("--ttl-ms must be 1..=300000 (the protocol's longest TTL)".into());
        }
        if self.payload_bytes > 16 * 1024 || self.bad.slow_push_bytes > 16 * 1024 {
            return Err("push payloads are at most 16 KiB".into());
        }
        if self.connect_rate == 0 {
            return Err("--connect-rate must be at least 1".into());
        }
        let conns = u64::from(self.apps())
            + u64::from(self.bad.slow_readers + self.bad.garbage + self.bad.half_open)
            + u64::from(self.sidecar_conns);
        if conns > 19_500 {
            return Err(format!(
                "{conns} connections do not fit one process (20,000 open files here); \
                 run several loadgen processes with disjoint --uid-base"
            ));
        }
        if self.push_rate > 0.0 && !self.appserver {
            return Err("pushes need the app-server; drop --no-appserver".into());
        }
        if self.tls_ca.is_some() && self.target != Target::Mqtt {
            return Err(format!(
                "--tls-ca is for --target mqtt only, not --target {} (the gate's apps speak its own \
                 secure channel: --server-key)",
                self.target.name()
            ));
        }
        if self.target != Target::Gate {
            self.validate_peer()?;
        }
        Ok(())
    }
}
