//! The command line: one subcommand per scenario, their flags, and the parsers for durations,
//! sizes, core lists and addresses. `Cli::plan` turns flags into a [`Plan`]; nothing here does
//! I/O except resolving host names.

use crate::plan::{BadPlan, DispatchMode, Plan, Scenario, Target, DEV_SECRET};
use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

const ABOUT: &str = "fleetgate loadgen: simulated fleets of drivers and passengers, a dispatch app-server, \
                     latency histograms and a push audit";

const LONG_ABOUT: &str = "\
fleetgate loadgen: simulated fleets of drivers and passengers against a running gate.

Each scenario connects its apps to the gate's app port (--gate) from pinned event loops, one per
core (--cores) owning all of its connections, and usually runs an app-server on the sidecar port
(--sidecar) that takes the GPS batches, pushes, and dispatches orders. Once every session is
up, the measured window lasts --duration; a live line goes to stderr each second; at the end a
table (or with --json one JSON object on stdout) gives throughput, latency percentiles, the
gate's CPU and memory from /proc, loadgen's own CPU per GPS send, and the push audit.

Audit: every (message id, uid) the app-server pushes is followed to its receipt. After the
window, pushing stops and loadgen waits (at most TTL + hold + 2 s) for the last receipts.
push.lost = accepted - delivered - unreachable; push.duplicates = pushes an app showed twice
after its own de-duplication. Either above zero makes loadgen exit with status 1.

Scenarios:
  gps        GPS ingest: as many points as asked, end to end to the app-server
  push       push fan-out latency, GPS underneath
  idle       logged-in sessions that only keep alive: the gate's memory per session
  storm      drop a share of the sessions at once; time until all are back (resume or login)
  mixed      the whole flow: orders, offers to the nearest drivers, grabs, order status
  appserver  the dispatch app-server alone (for a fleet driven from elsewhere)
  bad        slow readers, garbage senders and half-open connections beside a good fleet

Peers (gps, push, idle): --target mqtt|nats|ceiling drives another server at --gate with the
same drivers and rates, for side-by-side figures (perf's `bench` does this). Drivers publish a
40-byte point to gps/<uid> (NATS: gps.<uid>) and subscribe to push/<uid>; one subscriber to
gps/# (gps.>) plays the app-server; a push to N drivers is N pipelined publishes with a
timestamp in the payload. The ceiling only takes GPS frames. Peers give no receipts, so there
is no audit; the report's `gate` section describes the server at --gate, whatever it is.
With --tls-ca CA.pem, every MQTT connection speaks TLS 1.3 verified against that CA, for a
broker's TLS listener (mosquitto with cafile, certfile and keyfile).

Several gate nodes (cluster mode, docs/PROTOCOL.md §15): --gate A,B spreads the apps over the
nodes, round-robin by app index; an app reconnects first to the node that issued its session,
or with --move to the next node in the list, so every resume takes its session over from
another node (reconnect.moved counts the resumes the gate accepted on another node than the
session's last). --sidecar names one node's sidecar: the app-server pushes through it to
drivers wherever they are, and each receipt comes back there.

Examples:
  loadgen gps --cores 1 --drivers 1000 --rate 100 --duration 10 --json
  loadgen push --drivers 2000 --fanout 1000 --push-rate 5 --duration 10
  loadgen idle --drivers 5000 --duration 30
  loadgen gps --target nats --gate 127.0.0.1:4222 --drivers 1000 --rate 100 --duration 10
  loadgen gps --target mqtt --gate 127.0.0.1:8883 --tls-ca ca.pem --drivers 1000 --rate 3
  loadgen storm --drivers 15000 --storm-percent 100 --duration 20
  loadgen mixed --drivers 200 --passengers 50 --disconnect-rate 5 --duration 30
  loadgen storm --gate 127.0.0.1:7100,127.0.0.1:7101 --move --drivers 2000 --duration 10
  loadgen mixed --gate 127.0.0.1:7100 --sidecar 127.0.0.1:7201 --duration 30
  loadgen appserver --dispatch-k 5

Exit status: 0 when the audit is clean, 1 when pushes were lost or shown twice, 2 when the
run could not start (bad flags, no gate).";

const CONNECT: &str = "Connection";
const FLEET: &str = "Fleet";
const PUSHES: &str = "Pushes";
const ORDERS: &str = "Orders";
const REPORT: &str = "Report";
const BAD: &str = "Bad peers";

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub command: Command,
}

/// One subcommand per scenario.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// GPS ingest capacity: drivers report at --rate, an app-server takes the batches.
    ///
    /// Example: loadgen gps --cores 1 --drivers 1000 --rate 100 --duration 10 --json
    Gps(GpsArgs),
    /// Push fan-out latency (app-server send -> driver receive) with GPS running underneath.
    ///
    /// Example: loadgen push --drivers 2000 --fanout 1000 --push-rate 5 --duration 10
    Push(PushArgs),
    /// Log sessions in and hold them idle: the gate's memory per session.
    ///
    /// Example: loadgen idle --drivers 5000 --duration 30 --json
    Idle(IdleArgs),
    /// Drop a share of the connections at once and time how long until all are back.
    ///
    /// Example: loadgen storm --drivers 15000 --storm-percent 100 --duration 20
    Storm(StormArgs),
    /// The whole business flow: orders, offers to the nearest drivers, grabs, order status.
    ///
    /// Example: loadgen mixed --drivers 200 --passengers 50 --disconnect-rate 5 --duration 30
    Mixed(MixedArgs),
    /// The dispatch app-server alone: GPS positions, nearest-K offers, first grab wins.
    ///
    /// Example: loadgen appserver --sidecar 127.0.0.1:7200 --dispatch-k 5
    Appserver(AppServerArgs),
    /// Orders offered with GeoPush over drivers driving a 30 × 30 km area, every answer checked
    /// against the positions loadgen sent (docs/PROTOCOL.md §9.16).
    ///
    /// Example: loadgen geo --drivers 15000 --geo-rate 20 --duration 30
    Geo(GeoArgs),
    /// Misbehaving peers (slow readers, garbage, half-open) beside a well-behaved fleet.
    ///
    /// Example: loadgen bad --slow-readers 20 --garbage 20 --half-open 20 --drivers 200
    Bad(BadArgs),
}

/// Where the gate is, how to connect, and what to report; shared by every fleet scenario.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The gate's app port, or the app ports of several gate nodes sharing a session directory
    /// (cluster mode), comma-separated. Apps are spread over the nodes round-robin by app index,
    /// and every reconnect tries first the node its Session answer named (where a GoAway
    /// pointed, if one did), then the next ones in the list; the report's `gate` section
    /// describes the first node; e.g. `--gate 10.0.0.5:7100` or
    /// `--gate 127.0.0.1:7100,127.0.0.1:7101`
    #[arg(long, default_value = "127.0.0.1:7100", value_name = "HOST:PORT,...", help_heading = CONNECT)]
    pub gate: String,

    /// With several nodes in --gate: every reconnect (a storm's, a random drop's, any drop's)
    /// goes to the next node in the list after the one that held the session, so every resume
    /// has to move its session to another node; the report counts the resumes the gate accepted
    /// on another node in `reconnect.moved`; e.g. `loadgen storm --gate 127.0.0.1:7100,127.0.0.1:7101
    /// --move`
    #[arg(long = "move", help_heading = CONNECT)]
    pub move_nodes: bool,

    /// The gate's sidecar port, for the app-server, e.g. `--sidecar 127.0.0.1:7200`
    #[arg(long, default_value = "127.0.0.1:7200", value_name = "HOST:PORT", help_heading = CONNECT)]
    pub sidecar: String,

    /// Secret login tokens are signed with (the gate's auth.token_secret), e.g.
    /// `--token-secret s3cret` [default: the gate's built-in development secret]
    #[arg(long, env = "FLEETGATE_AUTH_TOKEN_SECRET", hide_env_values = true, value_name = "SECRET")]
    #[arg(help_heading = CONNECT)]
    pub token_secret: Option<String>,

    /// The sidecar hello's secret (the gate's sidecar.secret), e.g. `--sidecar-secret s3cret`
    /// [default: the gate's built-in development secret]
    #[arg(long, env = "FLEETGATE_SIDECAR_SECRET", hide_env_values = true, value_name = "SECRET")]
    #[arg(help_heading = CONNECT)]
    pub sidecar_secret: Option<String>,

    /// The gate's public key for the secure channel (docs/PROTOCOL.md §14): 64 hex digits or a
    /// key file written by `gate keygen`, e.g. `--server-key /etc/fleetgate/gate.key.pub`
    /// [default: the gate's built-in development key]
    #[arg(long, value_name = "HEX|PATH", help_heading = CONNECT)]
    pub server_key: Option<String>,

    /// Speak plaintext frames instead of the secure channel, to a gate run with `--plaintext`
    /// (app.plaintext), e.g. `loadgen gps --plaintext` for the capacity rows
    #[arg(long, help_heading = CONNECT)]
    pub plaintext: bool,

    /// CPU cores for loadgen's event loops, one pinned loop each: `last`, `all`, `1`, `0-1`
    /// or `0,2`; e.g. `--cores 1` beside a gate on `--cores 0`
    #[arg(long, default_value = "last", value_name = "LIST", help_heading = CONNECT)]
    pub cores: String,

    /// Local addresses to spread connections over (each address has its own ~28k ephemeral
    /// ports), e.g. `--source-ips 127.0.0.1,127.0.0.2` [default: the kernel picks]
    #[arg(long, value_delimiter = ',', value_name = "IP,...", help_heading = CONNECT)]
    pub source_ips: Vec<IpAddr>,

    /// New connections per second while ramping up, so the gate's listen backlog does not
    /// overflow, e.g. `--connect-rate 2000`
    #[arg(long, default_value_t = 5000, value_name = "PER_SEC", help_heading = CONNECT)]
    pub connect_rate: u32,

    /// First uid; drivers take the next --drivers uids, then passengers. Give each loadgen
    /// process its own range, e.g. `--uid-base 2000000`
    #[arg(long, default_value_t = 1_000_000, value_name = "UID", help_heading = CONNECT)]
    pub uid_base: u64,

    /// Length of the measured window once every session is up: `15`, `15s`, `500ms`, `2m`;
    /// e.g. `--duration 30s`
    #[arg(long, default_value = "15s", value_parser = parse_duration, value_name = "TIME")]
    #[arg(help_heading = REPORT)]
    pub duration: Duration,

    /// Print one JSON object with every figure on stdout at the end (the table goes to
    /// stderr), e.g. `--json > run.json`
    #[arg(long, help_heading = REPORT)]
    pub json: bool,

    /// Write each latency histogram's percentile distribution (.hgrm, for plotting) into this
    /// folder, e.g. `--hgrm results/`
    #[arg(long, value_name = "DIR", help_heading = REPORT)]
    pub hgrm: Option<PathBuf>,

    /// The gate's pid, for its CPU seconds and memory from /proc, e.g. `--gate-pid 4242`
    /// [default: found from the process listening on --gate's port]
    #[arg(long, value_name = "PID", help_heading = REPORT)]
    pub gate_pid: Option<u32>,

    /// The gate's admin address, scraped for its own push-path histograms at the window's start
    /// and end (`push.gate_latency_us`, `push.receipt_latency_us`); `none` to skip, e.g.
    /// `--gate-admin 127.0.0.1:7300` [default: port 7300 on --gate's host, for the gate target]
    #[arg(long, value_name = "HOST:PORT", help_heading = REPORT)]
    pub gate_admin: Option<String>,

    /// No live line on stderr each second, e.g. `--quiet` in scripts
    #[arg(long, short, help_heading = REPORT)]
    pub quiet: bool,
}

/// The simulated fleet and the chaos applied to it.
#[derive(Debug, Clone, Args)]
pub struct Fleet {
    /// Simulated drivers (log in, report GPS, ack pushes, grab orders), e.g. `--drivers 15000`
    /// [default: 1000; push: 2000; mixed: 200]
    #[arg(long, value_name = "N", help_heading = FLEET)]
    pub drivers: Option<u32>,

    /// Simulated passengers (place orders, receive their status), e.g. `--passengers 100`
    /// [default: 0; mixed: 50]
    #[arg(long, value_name = "N", help_heading = FLEET)]
    pub passengers: Option<u32>,

    /// GPS points per second per driver, jittered ±20 %, e.g. `--rate 0.2` (one every 5 s) or
    /// `--rate 100` [default: 1]
    #[arg(long, value_name = "PER_SEC", help_heading = FLEET)]
    pub rate: Option<f64>,

    /// GPS points per frame (1: one GpsReport each; more: GpsBatch frames), e.g. `--batch 10`
    #[arg(long, default_value_t = 1, value_name = "N", help_heading = FLEET)]
    pub batch: u32,

    /// Random connection drops per second across the fleet during the window; dropped apps
    /// reconnect and resume, e.g. `--disconnect-rate 5`
    #[arg(long, default_value_t = 0.0, value_name = "PER_SEC", help_heading = FLEET)]
    pub disconnect_rate: f64,

    /// Share of sessions dropped at once in a storm (0: none), e.g. `--storm-percent 50`
    /// [default: 0; storm: 100]
    #[arg(long, value_name = "PERCENT", help_heading = FLEET)]
    pub storm_percent: Option<f64>,

    /// When the storm comes, from the start of the window, e.g. `--storm-at 5s` [default: a
    /// third of --duration]
    #[arg(long, value_parser = parse_duration, value_name = "TIME", help_heading = FLEET)]
    pub storm_at: Option<Duration>,

    /// The gate's session hold (its --hold-ms), which bounds the final wait for receipts,
    /// e.g. `--hold-ms 2000`
    #[arg(long, default_value_t = 60_000, value_name = "MS", help_heading = FLEET)]
    pub hold_ms: u32,

    /// Run no app-server. With several loadgen processes against one gate only one may run
    /// it: the gate treats every sidecar connection as one app-server and spreads receipts
    /// and GPS over them (without any, the gate drops GPS); e.g. `--no-appserver`
    #[arg(long, help_heading = FLEET)]
    pub no_appserver: bool,

    /// Sidecar connections the app-server opens, e.g. `--sidecar-conns 4`
    #[arg(long, default_value_t = 2, value_name = "N", help_heading = FLEET)]
    pub sidecar_conns: u32,

    /// Cores for the app-server's threads, apart from the apps' loops (its receipt
    /// handling otherwise competes with the apps it measures), e.g. `--appserver-cores 2`
    /// [default: the --cores list]
    #[arg(long, value_name = "LIST", help_heading = FLEET)]
    pub appserver_cores: Option<String>,
}

/// Pushes from the app-server to random drivers.
#[derive(Debug, Clone, Args)]
pub struct Pushes {
    /// Pushes per second, each to --fanout random drivers, e.g. `--push-rate 5`
    /// [default: push 5; storm 2; mixed and bad 1]
    #[arg(long, value_name = "PER_SEC", help_heading = PUSHES)]
    pub push_rate: Option<f64>,

    /// Drivers each push names, picked at random, e.g. `--fanout 1000` [default: 1000, at most
    /// --drivers]
    #[arg(long, default_value_t = 1000, value_name = "N", help_heading = PUSHES)]
    pub fanout: u32,

    /// Payload of each push: bytes, or with a unit (`k`, `KiB`, `m`), e.g. `--payload-bytes 1k`
    #[arg(long, default_value = "64", value_parser = parse_size, value_name = "SIZE", help_heading = PUSHES)]
    pub payload_bytes: u32,

    /// Time-to-live of every push in ms; short, so the final wait for receipts is short,
    /// e.g. `--ttl-ms 3000`
    #[arg(long, default_value_t = 5000, value_name = "MS", help_heading = PUSHES)]
    pub ttl_ms: u32,
}

/// The order flow of the `mixed` scenario.
#[derive(Debug, Clone, Args)]
pub struct Orders {
    /// Orders per second per passenger, jittered, e.g. `--order-rate 0.5`
    #[arg(long, default_value_t = 0.2, value_name = "PER_SEC", help_heading = ORDERS)]
    pub order_rate: f64,

    /// Chance that a driver offered an order tries to grab it, e.g. `--grab-prob 0.3`
    #[arg(long, default_value_t = 0.5, value_name = "P", help_heading = ORDERS)]
    pub grab_prob: f64,

    /// Drivers each order is offered to, the nearest by their last GPS, e.g. `--dispatch-k 10`
    #[arg(long, default_value_t = 5, value_name = "K", help_heading = ORDERS)]
    pub dispatch_k: u32,

    /// Who chooses the drivers an order goes to: `local` (the app-server's own search over the
    /// forwarded GPS, then a Push) or `geo` (one GeoPush: the gate chooses and pushes), e.g.
    /// `--dispatch geo`
    #[arg(long, value_enum, default_value_t = DispatchMode::Local, value_name = "HOW", help_heading = ORDERS)]
    pub dispatch: DispatchMode,
}

/// Which server the scenario drives, for the scenarios a peer can carry (`gps`, `push`, `idle`).
#[derive(Debug, Clone, Args)]
pub struct TargetArg {
    /// The server at --gate: `gate` (fleetgate), `mqtt` (an MQTT 3.1.1 broker such as
    /// mosquitto), `nats` (nats-server) or `ceiling` (perf's read-and-discard server, `gps`
    /// only); peers get the same drivers, rates and pushes over their own protocol, with one
    /// subscriber as the app-server; e.g. `--target mqtt --gate 127.0.0.1:1883`
    #[arg(long, value_enum, default_value = "gate", value_name = "SERVER", help_heading = CONNECT)]
    pub target: Target,

    /// With `--target mqtt`: the PEM file of the CA that signed the broker's certificate.
    /// Every MQTT connection (drivers, and the app-server's subscriber and publisher) then
    /// speaks TLS 1.3 (rustls), the handshake counted as part of connecting; the certificate
    /// must be valid for --gate's IP address (an IP subjectAltName). The report says
    /// `"tls": true`; e.g. `--target mqtt --gate 127.0.0.1:8883 --tls-ca ca.pem`
    #[arg(long, value_name = "PATH", help_heading = CONNECT)]
    pub tls_ca: Option<PathBuf>,
}

/// `loadgen gps`.
#[derive(Debug, Clone, Args)]
pub struct GpsArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub target: TargetArg,
    #[command(flatten)]
    pub fleet: Fleet,
}

/// `loadgen geo`.
#[derive(Debug, Clone, Args)]
pub struct GeoArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub fleet: Fleet,
    /// GeoPush orders per second from the app-server, e.g. `--geo-rate 50`
    #[arg(long, default_value_t = 20.0, value_name = "PER_SEC", help_heading = ORDERS)]
    pub geo_rate: f64,
    /// Time-to-live of the offers in ms, e.g. `--ttl-ms 10000`
    #[arg(long, default_value_t = 5000, value_name = "MS", help_heading = ORDERS)]
    pub ttl_ms: u32,
}

/// `loadgen push`.
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub target: TargetArg,
    #[command(flatten)]
    pub fleet: Fleet,
    #[command(flatten)]
    pub pushes: Pushes,
}

/// `loadgen idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub target: TargetArg,

    /// Idle driver sessions, e.g. `--drivers 19000`
    #[arg(long, default_value_t = 1000, value_name = "N", help_heading = FLEET)]
    pub drivers: u32,

    /// Idle passenger sessions, e.g. `--passengers 100`
    #[arg(long, default_value_t = 0, value_name = "N", help_heading = FLEET)]
    pub passengers: u32,
}

/// `loadgen storm`.
#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub fleet: Fleet,
    #[command(flatten)]
    pub pushes: Pushes,
}

/// `loadgen mixed`.
#[derive(Debug, Clone, Args)]
pub struct MixedArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub fleet: Fleet,
    #[command(flatten)]
    pub pushes: Pushes,
    #[command(flatten)]
    pub orders: Orders,
}

/// `loadgen bad`.
#[derive(Debug, Clone, Args)]
pub struct BadArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub fleet: Fleet,
    #[command(flatten)]
    pub pushes: Pushes,

    /// Drivers that log in and never read; the app-server pushes them large payloads until
    /// the gate closes them as slow consumers, e.g. `--slow-readers 20`
    #[arg(long, default_value_t = 10, value_name = "N", help_heading = BAD)]
    pub slow_readers: u32,

    /// Payload of the pushes to slow readers, e.g. `--slow-push-bytes 16KiB`
    #[arg(long, default_value = "16KiB", value_parser = parse_size, value_name = "SIZE", help_heading = BAD)]
    pub slow_push_bytes: u32,

    /// How long a slow reader leaves its socket unread before it looks at what the gate did,
    /// e.g. `--slow-hold 20s`
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "TIME", help_heading = BAD)]
    pub slow_hold: Duration,

    /// Connections that send random bytes instead of frames, again and again, e.g.
    /// `--garbage 20`
    #[arg(long, default_value_t = 10, value_name = "N", help_heading = BAD)]
    pub garbage: u32,

    /// Connections that send half a frame and then nothing (the gate's read timeout must
    /// close them), e.g. `--half-open 20`
    #[arg(long, default_value_t = 10, value_name = "N", help_heading = BAD)]
    pub half_open: u32,
}

/// `loadgen appserver`.
#[derive(Debug, Clone, Args)]
pub struct AppServerArgs {
    /// The gate's sidecar port, e.g. `--sidecar 127.0.0.1:7200`
    #[arg(long, default_value = "127.0.0.1:7200", value_name = "HOST:PORT", help_heading = CONNECT)]
    pub sidecar: String,

    /// The sidecar hello's secret (the gate's sidecar.secret), e.g. `--sidecar-secret s3cret`
    /// [default: the gate's built-in development secret]
    #[arg(long, env = "FLEETGATE_SIDECAR_SECRET", hide_env_values = true, value_name = "SECRET")]
    #[arg(help_heading = CONNECT)]
    pub sidecar_secret: Option<String>,

    /// Sidecar connections to open, e.g. `--sidecar-conns 4`
    #[arg(long, default_value_t = 2, value_name = "N", help_heading = CONNECT)]
    pub sidecar_conns: u32,

    /// Drivers each order is offered to, the nearest by their last GPS, e.g. `--dispatch-k 10`
    #[arg(long, default_value_t = 5, value_name = "K", help_heading = ORDERS)]
    pub dispatch_k: u32,

    /// Who chooses the drivers an order goes to: `local` (the app-server's own search over the
    /// forwarded GPS, then a Push) or `geo` (one GeoPush: the gate chooses and pushes), e.g.
    /// `--dispatch geo`
    #[arg(long, value_enum, default_value_t = DispatchMode::Local, value_name = "HOW", help_heading = ORDERS)]
    pub dispatch: DispatchMode,

    /// Time-to-live of offers and order-status pushes in ms, e.g. `--ttl-ms 10000`
    #[arg(long, default_value_t = 5000, value_name = "MS", help_heading = ORDERS)]
    pub ttl_ms: u32,

    /// How long to run: `0` until Ctrl-C / SIGTERM, else e.g. `--duration 60s`
    #[arg(long, default_value = "0", value_parser = parse_duration, value_name = "TIME", help_heading = REPORT)]
    pub duration: Duration,

    /// Print one JSON summary on stdout at the end, e.g. `--json`
    #[arg(long, help_heading = REPORT)]
    pub json: bool,

    /// No live line on stderr each second, e.g. `--quiet`
    #[arg(long, short, help_heading = REPORT)]
    pub quiet: bool,
}

/// The gate's default admin port (its `admin.listen`), where `/metrics` is.
const GATE_ADMIN_PORT: u16 = 7300;

/// What `main` runs: a fleet plan, or the app-server alone.
#[derive(Debug)]
pub enum Job {
    /// A fleet scenario.
    Fleet {
        /// The plan.
        plan: Box<Plan>,
        /// Print JSON on stdout.
        json: bool,
        /// Where .hgrm files go.
        hgrm: Option<PathBuf>,
    },
    /// The dispatch app-server alone.
    AppServer(crate::appserver::StandaloneConfig),
}

impl Cli {
    /// Resolves the flags into what to run; `Err` names the bad flag.
    pub fn job(&self) -> Result<Job, String> {
        let (mut plan, common) = match &self.command {
            Command::Gps(a) => {
                let mut p = base(Scenario::Gps, &a.common)?;
                p.target = a.target.target;
                p.tls_ca = a.target.tls_ca.clone();
                fleet(&mut p, &a.fleet, 1000, 0)?;
                (p, &a.common)
            }
            Command::Push(a) => {
                let mut p = base(Scenario::Push, &a.common)?;
                p.target = a.target.target;
                p.tls_ca = a.target.tls_ca.clone();
                fleet(&mut p, &a.fleet, 2000, 0)?;
                pushes(&mut p, &a.pushes, 5.0);
                (p, &a.common)
            }
            Command::Idle(a) => {
                let mut p = base(Scenario::Idle, &a.common)?;
                p.target = a.target.target;
                p.tls_ca = a.target.tls_ca.clone();
                p.drivers = a.drivers;
                p.passengers = a.passengers;
                p.rate = 0.0;
                p.appserver = false;
                (p, &a.common)
            }
            Command::Storm(a) => {
                let mut p = base(Scenario::Storm, &a.common)?;
                fleet(&mut p, &a.fleet, 1000, 0)?;
                pushes(&mut p, &a.pushes, 2.0);
                p.storm_percent = a.fleet.storm_percent.unwrap_or(100.0);
                (p, &a.common)
            }
            Command::Mixed(a) => {
                let mut p = base(Scenario::Mixed, &a.common)?;
                fleet(&mut p, &a.fleet, 200, 50)?;
                pushes(&mut p, &a.pushes, 1.0);
                p.order_rate = a.orders.order_rate;
                p.grab_prob = a.orders.grab_prob;
                p.dispatch_k = a.orders.dispatch_k;
                p.dispatch = a.orders.dispatch;
                (p, &a.common)
            }
            Command::Geo(a) => {
                let mut p = base(Scenario::Geo, &a.common)?;
                fleet(&mut p, &a.fleet, 15_000, 0)?;
                // A report every 3 s unless asked otherwise, in a 30 × 30 km square.
                p.rate = a.fleet.rate.unwrap_or(1.0 / 3.0);
                let half_m = crate::geo::AREA_M / 2.0;
                let lat = crate::engine::driver::CENTER.0.to_radians().cos();
                p.area_half_deg = (half_m / 111_320.0, half_m / (111_320.0 * lat));
                if !(a.geo_rate > 0.0 && a.geo_rate.is_finite()) {
                    return Err("--geo-rate must be a number > 0".into());
                }
                p.geo_rate = a.geo_rate;
                p.ttl_ms = a.ttl_ms;
                p.grab_prob = 0.0;
                (p, &a.common)
            }
            Command::Bad(a) => {
                let mut p = base(Scenario::Bad, &a.common)?;
                fleet(&mut p, &a.fleet, 200, 0)?;
                pushes(&mut p, &a.pushes, 1.0);
                p.bad = BadPlan {
                    slow_readers: a.slow_readers,
                    slow_push_bytes: a.slow_push_bytes,
                    slow_hold: a.slow_hold,
                    garbage: a.garbage,
                    half_open: a.half_open,
                };
                (p, &a.common)
            }
            Command::Appserver(a) => {
                return Ok(Job::AppServer(crate::appserver::StandaloneConfig {
                    sidecar: resolve(&a.sidecar, "--sidecar")?,
                    secret: secret(&a.sidecar_secret),
                    conns: a.sidecar_conns.max(1),
                    dispatch_k: a.dispatch_k.max(1),
                    dispatch: a.dispatch,
                    ttl_ms: a.ttl_ms,
                    duration: a.duration,
                    json: a.json,
                    live: !a.quiet,
                }))
            }
        };
        if common.gate_admin.is_none() && plan.target == Target::Gate {
            plan.gate_admin = plan.gates.first().map(|g| SocketAddr::new(g.ip(), GATE_ADMIN_PORT));
        }
        plan.validate()?;
        Ok(Job::Fleet { plan: Box::new(plan), json: common.json, hgrm: common.hgrm.clone() })
    }
}

/// `--server-key`: 64 hex digits, or the path of a public key file; none: the development key.
fn server_key(arg: Option<&str>) -> Result<channel::PublicKey, String> {
    let Some(arg) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(*channel::Keypair::dev().public());
    };
    if arg.len() == 64 && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
        return channel::keys::parse_public(&format!("{} public {arg}", channel::keys::KEY_FILE_MAGIC))
            .map_err(|e| format!("--server-key: {e}"));
    }
    channel::keys::load_public(std::path::Path::new(arg)).map_err(|e| format!("--server-key: {e}"))
}

fn secret(s: &Option<String>) -> Vec<u8> {
    s.as_deref().filter(|s| !s.is_empty()).unwrap_or(DEV_SECRET).as_bytes().to_vec()
}

/// The plan fields every fleet scenario takes from `Common`.
fn base(scenario: Scenario, c: &Common) -> Result<Plan, String> {
    Ok(Plan {
        scenario,
        gates: c
            .gate
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| resolve(a, "--gate"))
            .collect::<Result<_, _>>()?,
        move_nodes: c.move_nodes,
        sidecar: resolve(&c.sidecar, "--sidecar")?,
        token_secret: secret(&c.token_secret),
        sidecar_secret: secret(&c.sidecar_secret),
        server_key: if c.plaintext { None } else { Some(server_key(c.server_key.as_deref())?) },
        cores: parse_cores(&c.cores, online_cpus())?,
        source_ips: c.source_ips.clone(),
        duration: c.duration,
        uid_base: c.uid_base,
        connect_rate: c.connect_rate,
        gate_pid: c.gate_pid,
        gate_admin: match c.gate_admin.as_deref().map(str::trim) {
            Some("none") => None,
            Some(a) => Some(resolve(a, "--gate-admin")?),
            // Defaulted once the target is known (`Cli::job`).
            None => None,
        },
        live: !c.quiet,
        push_rate: 0.0,
        order_rate: 0.0,
        ..Plan::default()
    })
}

fn fleet(p: &mut Plan, f: &Fleet, drivers: u32, passengers: u32) -> Result<(), String> {
    p.drivers = f.drivers.unwrap_or(drivers);
    p.passengers = f.passengers.unwrap_or(passengers);
    p.rate = f.rate.unwrap_or(1.0);
    p.batch = f.batch;
    p.disconnect_rate = f.disconnect_rate;
    if !(p.disconnect_rate >= 0.0 && p.disconnect_rate.is_finite()) {
        return Err("--disconnect-rate must be a number ≥ 0".into());
    }
    p.storm_percent = f.storm_percent.unwrap_or(0.0);
    p.storm_at = f.storm_at.unwrap_or(p.duration / 3);
    p.hold_ms = f.hold_ms;
    p.appserver = !f.no_appserver;
    p.sidecar_conns = f.sidecar_conns.max(1);
    if let Some(list) = &f.appserver_cores {
        p.appserver_cores =
            parse_cores(list, online_cpus()).map_err(|e| e.replace("--cores", "--appserver-cores"))?;
    }
    Ok(())
}

fn pushes(p: &mut Plan, a: &Pushes, push_rate: f64) {
    p.push_rate = a.push_rate.unwrap_or(if p.appserver { push_rate } else { 0.0 });
    p.fanout = a.fanout.min(p.drivers);
    p.payload_bytes = a.payload_bytes;
    p.ttl_ms = a.ttl_ms;
}

/// Resolves `HOST:PORT` to its first address.
pub fn resolve(s: &str, flag: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{flag} {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{flag} {s:?} resolves to no address"))
}

/// Parses a duration: a bare number is seconds (`15`, `0.5`); units `ms`, `s`, `m`, `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 15, 15s, 500ms)"))?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?}: use ms, s, m or h")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size in bytes: `4096`, `4k`/`4KiB` (1024), `1m`/`1MiB`; at most 4 GiB − 1.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 64, 1k, 16KiB)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        u => return Err(format!("unknown unit {u:?} in {s:?}: use k or m")),
    };
    v.checked_mul(mul).and_then(|b| u32::try_from(b).ok()).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a core list: `last`, `all`, `3`, `0-1`, `0,2`, `0-1,3`; cores must be below `ncpu`.
pub fn parse_cores(s: &str, ncpu: usize) -> Result<Vec<usize>, String> {
    let ncpu = ncpu.max(1);
    match s.trim() {
        "last" => return Ok(vec![ncpu - 1]),
        "all" => return Ok((0..ncpu).collect()),
        _ => {}
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| format!("--cores: {part:?} is not a core or range"))?;
        let b: usize = b.parse().map_err(|_| format!("--cores: {part:?} is not a core or range"))?;
        if a > b || b >= ncpu {
            return Err(format!("--cores: {part:?} is outside 0..{}", ncpu - 1));
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        return Err("--cores names no core".into());
    }
    Ok(out)
}

/// Cores online on this machine.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("15x").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("16KiB"), Ok(16 * 1024));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert!(parse_size("5g").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999m").is_err());
    }

    #[test]
    fn cores() {
        assert_eq!(parse_cores("last", 2), Ok(vec![1]));
        assert_eq!(parse_cores("all", 2), Ok(vec![0, 1]));
        assert_eq!(parse_cores("0-1,3", 4), Ok(vec![0, 1, 3]));
        assert_eq!(parse_cores("1", 2), Ok(vec![1]));
        assert!(parse_cores("2", 2).is_err());
        assert!(parse_cores("1-0", 2).is_err());
        assert!(parse_cores("x", 2).is_err());
    }

    #[test]
    fn every_flag_has_help_with_an_example() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(help.contains("e.g."), "{} --{id}: help has no example: {help:?}", sub.get_name());
            }
        }
        cmd.debug_assert();
    }

    #[test]
    fn scenario_defaults() {
        let cli =
            Cli::try_parse_from(["loadgen", "mixed", "--cores", "0", "--duration", "5"]).expect("parse");
        let Ok(Job::Fleet { plan, .. }) = cli.job() else { panic!("not a fleet job") };
        assert_eq!((plan.drivers, plan.passengers, plan.scenario), (200, 50, Scenario::Mixed));
        assert_eq!(plan.duration, Duration::from_secs(5));
        assert!(plan.appserver);
        let cli = Cli::try_parse_from(["loadgen", "idle", "--cores", "0", "--drivers", "20"]).expect("parse");
        let Ok(Job::Fleet { plan, .. }) = cli.job() else { panic!("not a fleet job") };
        assert_eq!((plan.drivers, plan.rate, plan.appserver), (20, 0.0, false));
        let cli = Cli::try_parse_from(["loadgen", "gps", "--cores", "0", "--batch", "0"]).expect("parse");
        assert!(cli.job().is_err(), "a batch of 0 points is refused");
    }

    #[test]
    fn several_nodes_and_move() {
        let job = |args: &[&str]| {
            let mut all = vec!["loadgen", "storm", "--cores", "0"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).expect("parse").job()
        };
        let Ok(Job::Fleet { plan, .. }) = job(&["--gate", "127.0.0.1:7100, 127.0.0.1:7101", "--move"]) else {
            panic!("two nodes and --move")
        };
        let want: Vec<SocketAddr> =
            vec!["127.0.0.1:7100".parse().unwrap(), "127.0.0.1:7101".parse().unwrap()];
        assert_eq!((plan.gates.clone(), plan.move_nodes, plan.gate()), (want.clone(), true, want[0]));
        let Ok(Job::Fleet { plan, .. }) = job(&[]) else { panic!("defaults") };
        assert_eq!((plan.gates, plan.move_nodes), (vec![want[0]], false), "one node, as before");
        let e = job(&["--move"]).expect_err("nowhere to move to");
        assert!(e.contains("--move needs at least two nodes"), "{e}");
        let e = job(&["--gate", "127.0.0.1:7100,127.0.0.1:7100"]).expect_err("a node twice");
        assert!(e.contains("twice"), "{e}");
        let e = job(&["--gate", ","]).expect_err("no node");
        assert!(e.contains("no node"), "{e}");
        let e = Cli::try_parse_from([
            "loadgen",
            "gps",
            "--cores",
            "0",
            "--target",
            "nats",
            "--gate",
            "127.0.0.1:1,127.0.0.1:2",
        ])
        .expect("parse")
        .job()
        .expect_err("a peer is one server");
        assert!(e.contains("takes one server"), "{e}");
    }

    #[test]
    fn tls_ca_is_for_the_mqtt_target_only() {
        let job = |args: &[&str]| {
            let mut all = vec!["loadgen"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).expect("parse").job()
        };
        let Ok(Job::Fleet { plan, .. }) =
            job(&["push", "--cores", "0", "--target", "mqtt", "--tls-ca", "ca.pem"])
        else {
            panic!("mqtt takes --tls-ca")
        };
        assert_eq!(plan.tls_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        for target in ["gate", "nats", "ceiling"] {
            let e =
                job(&["gps", "--cores", "0", "--target", target, "--tls-ca", "ca.pem"]).expect_err("refused");
            assert!(e.contains("--tls-ca is for --target mqtt only") && e.contains(target), "{e}");
        }
        let Ok(Job::Fleet { plan, .. }) = job(&["idle", "--cores", "0", "--target", "mqtt"]) else {
            panic!("idle on mqtt")
        };
        assert_eq!(plan.tls_ca, None, "plain TCP unless asked");
    }
}
