//! The gate's configuration: built-in defaults, the TOML file, the command line and its
//! environment variables, and the checks that run before any port is bound.
//!
//! Precedence, lowest first: defaults, the file given with `-c`, `FLEETGATE_<SECTION>_<KEY>`
//! environment variables, flags. Everything is validated once, up front, so a typo stops the
//! gate at startup with a message naming the key, instead of surfacing later as a bind error,
//! a failed core pin or a limit that silently never triggers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// The secret used for app tokens and the sidecar when none is configured. It is public, so a
/// gate running on it is fit for development only; [`Config::uses_dev_secret`] lets the gate
/// warn about it.
pub const DEV_SECRET: &str = "fleetgate-dev-secret-change-me";

/// Exit status for a configuration the gate refuses (sysexits' `EX_USAGE`), so scripts can tell
/// "fix the settings" from a crash.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Bytes one GPS point takes in a batch frame toward the app-server.
const GPS_POINT_BYTES: u32 = 24;

/// Most GPS points in one batch: what fits in a 64 KiB frame body, so a batch never needs a
/// larger buffer than an ordinary frame.
pub const MAX_GPS_BATCH_POINTS: u32 = (64 * 1024) / GPS_POINT_BYTES;

/// Smallest frame body limit accepted: below it even a login frame might not fit.
const MIN_MAX_BODY: u32 = 1024;

/// Largest frame body limit accepted: beyond it one frame could pin a large buffer per
/// connection.
const MAX_MAX_BODY: u32 = 64 * 1024 * 1024;

/// Smallest outgoing queue accepted: below it a single large push would mark a healthy
/// connection as a slow consumer.
const MIN_OUT_QUEUE_BYTES: u32 = 64 * 1024;

/// The listen backlog the kernel accepts as an `int`; anything larger is cut to
/// `net.core.somaxconn` anyway, so larger values only hide a typo.
const MAX_BACKLOG: u32 = 65_535;

/// Log levels the gate understands, least verbose first.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Log line formats the gate understands.
pub const LOG_FORMATS: [&str; 2] = ["text", "json"];

/// Why a configuration was refused. Every message names the file or the key and the bad value,
/// so the operator can fix it without reading the source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file named with `-c` or `FLEETGATE_CONFIG`.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The config file is not valid TOML or does not match the expected keys and types.
    #[error("config file {}: {error}", path.display())]
    Parse {
        /// The file named with `-c` or `FLEETGATE_CONFIG`.
        path: PathBuf,
        /// The TOML error, which names the line and the key (boxed: it is large and rare).
        error: Box<toml::de::Error>,
    },
    /// A setting parsed but its value is not usable.
    #[error("{key} = {value}: {reason}")]
    Invalid {
        /// The setting as `section.key`, the same name the TOML file uses.
        key: &'static str,
        /// The offending value as TOML writes it: strings quoted, numbers bare (never a secret).
        value: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

/// A refused string setting.
fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, value: toml_quote(value), reason: reason.into() }
}

/// A refused number setting.
fn invalid_number(key: &'static str, value: u32, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, value: value.to_string(), reason: reason.into() }
}

/// The whole configuration of one gate process. Every section and key may be left out of the
/// file; what is missing keeps its default, and unknown keys are refused so a misspelt key is
/// caught instead of being silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[gate]`: the process as a whole.
    pub gate: GateConfig,
    /// `[app]`: the port driver and passenger apps connect to.
    pub app: AppConfig,
    /// `[sidecar]`: the port the app-server connects to.
    pub sidecar: SidecarConfig,
    /// `[auth]`: verification of app login tokens.
    pub auth: AuthConfig,
    /// `[gps]`: batching of GPS reports toward the app-server.
    pub gps: GpsConfig,
    /// `[admin]`: the operators' HTTP port.
    pub admin: AdminConfig,
    /// `[log]`: what is logged and how.
    pub log: LogConfig,
    /// `[limits]`: per-shard and per-session bounds on held state.
    pub limits: LimitsConfig,
}

/// `[gate]`: the process as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// CPU cores to run shards on, one shard pinned per core: `"all"`, a core `"0"`, a range
    /// `"0-1"` or a list `"0,2"` (lists may hold ranges).
    pub cores: String,
    /// Name of this gate among its peers and toward the app-server. Empty: the gate derives
    /// one at startup.
    pub node_name: String,
    /// `host:port` apps are told to reconnect to, for gates behind NAT or a load balancer.
    /// Empty: the app listen address as bound.
    pub advertise: String,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self { cores: "all".into(), node_name: String::new(), advertise: String::new() }
    }
}

/// `[app]`: the port driver and passenger apps connect to, and the bounds that keep one
/// misbehaving app or a reconnect storm from hurting the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// IP address and port apps connect to; port 0 picks a free port.
    pub listen: String,
    /// Listen backlog, in connections; large because a reconnect storm arrives all at once
    /// and an overflowing backlog costs each app a 1 s SYN retransmit.
    pub backlog: u32,
    /// Connections one shard holds at most; past it new connections are refused with a
    /// retry-after.
    pub max_conns_per_shard: u32,
    /// Connections one shard accepts per second; past it they wait in the accept queue, so a
    /// storm is spread out instead of starving the sessions already connected.
    pub accept_rate_per_shard: u32,
    /// Connections that may wait for an accept token before being refused with a retry-after.
    pub accept_queue: u32,
    /// Largest frame body an app may send, in bytes; a larger one closes the connection.
    pub max_body: u32,
    /// Interval apps are told to send heartbeats at, in milliseconds.
    pub heartbeat_ms: u32,
    /// Milliseconds without any frame after which a connection is closed; longer than the
    /// heartbeat so one late heartbeat is forgiven.
    pub idle_timeout_ms: u32,
    /// Milliseconds a new connection has to log in or resume before it is closed.
    pub login_timeout_ms: u32,
    /// Milliseconds a frame may take from its first byte to its last; a slower one closes
    /// the connection (slowloris).
    pub read_timeout_ms: u32,
    /// Bytes that may wait to be written to one connection; past it the connection is closed
    /// as `slow_consumer` and its session is held.
    pub out_queue_bytes: u32,
    /// Base delay, in milliseconds, refused apps are told to wait before retrying; the gate
    /// adds jitter so they do not all come back at once.
    pub retry_after_ms: u32,
    /// Milliseconds a session is held after its connection drops; pushes queue meanwhile and
    /// are delivered on resume, and when the hold expires the app-server is told. 0: sessions
    /// end when their connection drops.
    pub hold_ms: u32,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7100".into(),
            backlog: 4096,
            max_conns_per_shard: 19_000,
            accept_rate_per_shard: 20_000,
            accept_queue: 2_000,
            max_body: 65_536,
            heartbeat_ms: 30_000,
            idle_timeout_ms: 90_000,
            login_timeout_ms: 10_000,
            read_timeout_ms: 10_000,
            out_queue_bytes: 1_048_576,
            retry_after_ms: 1_000,
            hold_ms: 60_000,
        }
    }
}

/// `[sidecar]`: the port the app-server connects to for pushes, requests and receipts.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarConfig {
    /// IP address and port the app-server connects to; loopback by default because the
    /// app-server normally runs beside the gate.
    pub listen: String,
    /// Shared secret the app-server authenticates with. Empty: [`DEV_SECRET`].
    pub secret: String,
    /// Largest frame body the app-server may send, in bytes (a push carries its target list,
    /// hence more than an app frame).
    pub max_body: u32,
    /// Sessions one push may address.
    pub max_targets: u32,
    /// Milliseconds the gate waits for the app-server to answer an app's request before
    /// answering the app with a timeout.
    pub request_timeout_ms: u32,
    /// Lifetime, in milliseconds, of a push that names none: how long it may wait for a held
    /// session before an unreachable receipt.
    pub default_ttl_ms: u32,
    /// Longest lifetime a push may ask for, in milliseconds; bounds how long queued pushes
    /// pin memory.
    pub max_ttl_ms: u32,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7200".into(),
            secret: String::new(),
            max_body: 8 * 1024 * 1024,
            max_targets: 50_000,
            request_timeout_ms: 10_000,
            default_ttl_ms: 30_000,
            max_ttl_ms: 300_000,
        }
    }
}

// Hand-written so a logged or printed configuration never shows the secret.
impl std::fmt::Debug for SidecarConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarConfig")
            .field("listen", &self.listen)
            .field("secret", &redacted(&self.secret))
            .field("max_body", &self.max_body)
            .field("max_targets", &self.max_targets)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("default_ttl_ms", &self.default_ttl_ms)
            .field("max_ttl_ms", &self.max_ttl_ms)
            .finish()
    }
}

/// `[auth]`: verification of the tokens apps log in with.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Secret app login tokens are signed with. Empty: [`DEV_SECRET`].
    pub token_secret: String,
}

// Hand-written so a logged or printed configuration never shows the secret.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig").field("token_secret", &redacted(&self.token_secret)).finish()
    }
}

fn redacted(secret: &str) -> &'static str {
    match secret {
        "" | DEV_SECRET => "<development secret>",
        _ => "<set>",
    }
}

/// What the gate forwards of the GPS points it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpsForward {
    /// Only each driver's newest point per flush: the app-server sees current positions at a
    /// fraction of the traffic.
    #[default]
    Latest,
    /// Every point received, in arrival order, for app-servers that record tracks.
    All,
}

impl GpsForward {
    /// The name used in the TOML file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            GpsForward::Latest => "latest",
            GpsForward::All => "all",
        }
    }
}

/// `[gps]`: batching of GPS reports, the heaviest stream, toward the app-server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpsConfig {
    /// Milliseconds between GPS batches sent to the app-server; GPS tolerates the delay, and
    /// fewer, larger writes are what keep the backend from being crushed.
    pub flush_ms: u32,
    /// `latest`: one point per driver per flush; `all`: every point.
    pub forward: GpsForward,
    /// GPS points per batch frame, at most [`MAX_GPS_BATCH_POINTS`]; a flush with more points
    /// sends several frames.
    pub max_batch_points: u32,
}

impl Default for GpsConfig {
    fn default() -> Self {
        Self { flush_ms: 1_000, forward: GpsForward::Latest, max_batch_points: 1_000 }
    }
}

/// `[admin]`: the operators' HTTP port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// IP address and port of the admin HTTP endpoint; loopback by default because it is for
    /// operators, not apps.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:7300".into() }
    }
}

/// `[log]`: what is logged and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Least severe level logged: one of [`LOG_LEVELS`].
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: "text".into() }
    }
}

/// `[limits]`: bounds on the state the gate holds, so memory stays bounded whatever the apps
/// and the app-server do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sessions one shard holds at most while their apps are disconnected.
    pub max_held_sessions_per_shard: u32,
    /// App requests one shard keeps waiting for an app-server answer; past it new requests
    /// are refused.
    pub max_pending_requests_per_shard: u32,
    /// Pushes queued per session while it cannot take them.
    pub push_queue_len: u32,
    /// Bytes of pushes queued per session while it cannot take them.
    pub push_queue_bytes: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_held_sessions_per_shard: 100_000,
            max_pending_requests_per_shard: 10_000,
            push_queue_len: 256,
            push_queue_bytes: 262_144,
        }
    }
}

impl Config {
    /// Reads and parses a TOML file. Missing keys keep their defaults; the result is not yet
    /// validated, because overrides may still fix it.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        Self::from_toml(&text, path)
    }

    fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|error| ConfigError::Parse { path: path.to_owned(), error: Box::new(error) })
    }

    /// Key app login tokens are verified with.
    pub fn token_secret(&self) -> &[u8] {
        secret_or_dev(&self.auth.token_secret)
    }

    /// Key the app-server authenticates with on the sidecar port.
    pub fn sidecar_secret(&self) -> &[u8] {
        secret_or_dev(&self.sidecar.secret)
    }

    /// True when either secret is the public development one, so the gate can warn that it is
    /// not fit for production.
    pub fn uses_dev_secret(&self) -> bool {
        self.token_secret() == DEV_SECRET.as_bytes() || self.sidecar_secret() == DEV_SECRET.as_bytes()
    }

    /// The cores to run shards on, checked against the cores this process may use.
    pub fn resolved_cores(&self) -> Result<Vec<usize>, ConfigError> {
        parse_cores(&self.gate.cores, available_cores())
    }

    /// Checks every setting, before any port is bound, and names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Config { gate, app, sidecar, auth: _, gps, admin, log, limits } = self;

        self.resolved_cores()?;
        check_node_name(&gate.node_name)?;
        check_advertise(&gate.advertise)?;

        let app_addr = socket_addr("app.listen", &app.listen)?;
        in_range("app.backlog", app.backlog, 1, MAX_BACKLOG, "connections")?;
        positive("app.max_conns_per_shard", app.max_conns_per_shard)?;
        positive("app.accept_rate_per_shard", app.accept_rate_per_shard)?;
        in_range("app.max_body", app.max_body, MIN_MAX_BODY, MAX_MAX_BODY, "bytes")?;
        positive("app.heartbeat_ms", app.heartbeat_ms)?;
        positive("app.idle_timeout_ms", app.idle_timeout_ms)?;
        if app.idle_timeout_ms <= app.heartbeat_ms {
            return Err(invalid_number(
                "app.idle_timeout_ms",
                app.idle_timeout_ms,
                format!(
                    "must be greater than app.heartbeat_ms ({}), or healthy apps are closed \
                     between heartbeats",
                    app.heartbeat_ms
                ),
            ));
        }
        positive("app.login_timeout_ms", app.login_timeout_ms)?;
        positive("app.read_timeout_ms", app.read_timeout_ms)?;
        if app.out_queue_bytes < MIN_OUT_QUEUE_BYTES {
            return Err(invalid_number(
                "app.out_queue_bytes",
                app.out_queue_bytes,
                format!("must be at least {MIN_OUT_QUEUE_BYTES} bytes (64 KiB)"),
            ));
        }
        positive("app.retry_after_ms", app.retry_after_ms)?;

        let sidecar_addr = socket_addr("sidecar.listen", &sidecar.listen)?;
        in_range("sidecar.max_body", sidecar.max_body, MIN_MAX_BODY, MAX_MAX_BODY, "bytes")?;
        positive("sidecar.max_targets", sidecar.max_targets)?;
        positive("sidecar.request_timeout_ms", sidecar.request_timeout_ms)?;
        positive("sidecar.default_ttl_ms", sidecar.default_ttl_ms)?;
        positive("sidecar.max_ttl_ms", sidecar.max_ttl_ms)?;
        if sidecar.max_ttl_ms < sidecar.default_ttl_ms {
            return Err(invalid_number(
                "sidecar.max_ttl_ms",
                sidecar.max_ttl_ms,
                format!("must be at least sidecar.default_ttl_ms ({})", sidecar.default_ttl_ms),
            ));
        }

        positive("gps.flush_ms", gps.flush_ms)?;
        in_range("gps.max_batch_points", gps.max_batch_points, 1, MAX_GPS_BATCH_POINTS, "points")?;

        let admin_addr = socket_addr("admin.listen", &admin.listen)?;

        if !LOG_LEVELS.contains(&log.level.as_str()) {
            return Err(invalid("log.level", &log.level, format!("must be one of {}", LOG_LEVELS.join("|"))));
        }
        if !LOG_FORMATS.contains(&log.format.as_str()) {
            return Err(invalid(
                "log.format",
                &log.format,
                format!("must be one of {}", LOG_FORMATS.join("|")),
            ));
        }

        positive("limits.max_held_sessions_per_shard", limits.max_held_sessions_per_shard)?;
        positive("limits.max_pending_requests_per_shard", limits.max_pending_requests_per_shard)?;
        positive("limits.push_queue_len", limits.push_queue_len)?;
        positive("limits.push_queue_bytes", limits.push_queue_bytes)?;

        // A listener bound with SO_REUSEPORT (one per shard) does not fail when another holds
        // its port: the two silently share connections. Refuse overlapping ports here instead.
        let listeners = [
            ("app.listen", &app.listen, app_addr),
            ("sidecar.listen", &sidecar.listen, sidecar_addr),
            ("admin.listen", &admin.listen, admin_addr),
        ];
        for (i, &(key, text, addr)) in listeners.iter().enumerate() {
            for &(other_key, other_text, other) in &listeners[..i] {
                if ports_overlap(addr, other) {
                    return Err(invalid(
                        key,
                        text,
                        format!(
                            "same port as {other_key} ({other_text}); with SO_REUSEPORT both would \
                             share it silently"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn secret_or_dev(secret: &str) -> &[u8] {
    if secret.is_empty() {
        DEV_SECRET.as_bytes()
    } else {
        secret.as_bytes()
    }
}

/// Cores this process may use; 1 when the platform cannot tell, so the gate still starts.
fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Parses a core list: `"all"` (every core, `0..available`), a core `"0"`, a range `"0-1"` or a
/// comma-separated list of either (`"0,2-3"`), returned in the order written.
/// Refuses cores that do not exist, backwards ranges, duplicates and an empty list, each with
/// a message naming `gate.cores`.
pub fn parse_cores(s: &str, available: usize) -> Result<Vec<usize>, ConfigError> {
    let bad = |reason: String| invalid("gate.cores", s, reason);
    let spec = s.trim();
    if available == 0 {
        return Err(bad("no cores are available to this process".into()));
    }
    if spec.eq_ignore_ascii_case("all") {
        return Ok((0..available).collect());
    }
    if spec.is_empty() {
        return Err(bad("empty; use \"all\", a core \"0\", a range \"0-1\" or a list \"0,2\"".into()));
    }
    let number = |text: &str, part: &str| {
        text.trim().parse::<usize>().map_err(|_| bad(format!("{part:?} is not a core number or a range")))
    };
    let mut cores = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (number(first, part)?, number(last, part)?),
            None => {
                let core = number(part, part)?;
                (core, core)
            }
        };
        if first > last {
            return Err(bad(format!("range {part} runs backwards; write {last}-{first}")));
        }
        // Each core is checked against `available` before the next, so a huge range stops at
        // the first core that does not exist instead of allocating.
        for core in first..=last {
            if core >= available {
                return Err(bad(format!(
                    "core {core} is not available: this process may use {available} core(s), 0-{}",
                    available - 1
                )));
            }
            if cores.contains(&core) {
                return Err(bad(format!("core {core} is listed twice")));
            }
            cores.push(core);
        }
    }
    Ok(cores)
}

fn socket_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(key, value, "not an IP address and port (e.g. 0.0.0.0:7100, [::]:7100, 127.0.0.1:0)")
    })
}

fn positive(key: &'static str, value: u32) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid_number(key, value, "must be greater than 0"));
    }
    Ok(())
}

fn in_range(key: &'static str, value: u32, min: u32, max: u32, unit: &str) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid_number(key, value, format!("must be between {min} and {max} {unit}")));
    }
    Ok(())
}

fn check_node_name(name: &str) -> Result<(), ConfigError> {
    // Empty means "derive one"; a given name travels in frames and log lines, so it must be
    // printable and short.
    if name.len() > 255 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "gate.node_name",
            name,
            "must be at most 255 bytes without spaces or control characters",
        ));
    }
    Ok(())
}

fn check_advertise(advertise: &str) -> Result<(), ConfigError> {
    if advertise.is_empty() {
        return Ok(());
    }
    // A host name is allowed here (apps resolve it), so this is not a SocketAddr.
    let ok = match advertise.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.chars().any(|c| c.is_whitespace() || c.is_control())
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    };
    if !ok {
        return Err(invalid(
            "gate.advertise",
            advertise,
            "must be host:port with a port from 1 to 65535 (e.g. gate1.example.com:7100)",
        ));
    }
    Ok(())
}

/// True when two listeners would end up on the same port: same nonzero port and the same IP,
/// or either bound to every address.
fn ports_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The full default configuration as commented TOML: what `gate print-config` prints. Values
/// come from [`Config::default`], so the text cannot drift from the defaults.
pub fn default_toml() -> String {
    let Config { gate, app, sidecar, auth, gps, admin, log, limits } = Config::default();
    let mut w = TomlWriter(String::new());
    w.0.push_str(
        "# fleetgate gate configuration.\n\
         # Every key is optional: a missing key keeps the default shown here. Unknown keys are\n\
         # refused. Environment variables FLEETGATE_<SECTION>_<KEY> and command-line flags\n\
         # override this file (see gate --help).\n",
    );

    w.section("gate", "The process as a whole.");
    w.string(
        "cores",
        "CPU cores to run shards on, one shard pinned per core: \"all\", a core \"0\",\n\
         a range \"0-1\" or a list \"0,2\" (lists may hold ranges).",
        &gate.cores,
    );
    w.string(
        "node_name",
        "Name of this gate among its peers and toward the app-server.\n\
         Empty: derived at startup.",
        &gate.node_name,
    );
    w.string(
        "advertise",
        "host:port apps are told to reconnect to (for gates behind NAT or a load balancer).\n\
         Empty: the app listen address as bound.",
        &gate.advertise,
    );

    w.section("app", "The port driver and passenger apps connect to.");
    w.string("listen", "IP address and port apps connect to; port 0 picks a free port.", &app.listen);
    w.number(
        "backlog",
        "Listen backlog, in connections (the kernel caps it at net.core.somaxconn).\n\
         Large because a reconnect storm arrives all at once.",
        app.backlog,
    );
    w.number(
        "max_conns_per_shard",
        "Connections one shard holds at most; past it new ones are refused with a retry-after.\n\
         The process's open-file limit caps the total across shards.",
        app.max_conns_per_shard,
    );
    w.number(
        "accept_rate_per_shard",
        "Connections one shard accepts per second; past it they wait in the accept queue.",
        app.accept_rate_per_shard,
    );
    w.number(
        "accept_queue",
        "Connections that may wait for an accept token before being refused with a retry-after.",
        app.accept_queue,
    );
    w.number(
        "max_body",
        "Largest frame body an app may send, in bytes (1024 to 64 MiB); larger closes the\n\
         connection.",
        app.max_body,
    );
    w.number(
        "heartbeat_ms",
        "Interval apps are told to send heartbeats at, in milliseconds.",
        app.heartbeat_ms,
    );
    w.number(
        "idle_timeout_ms",
        "Milliseconds without any frame after which a connection is closed; must be greater\n\
         than heartbeat_ms.",
        app.idle_timeout_ms,
    );
    w.number(
        "login_timeout_ms",
        "Milliseconds a new connection has to log in or resume before it is closed.",
        app.login_timeout_ms,
    );
    w.number(
        "read_timeout_ms",
        "Milliseconds a frame may take from its first byte to its last; slower closes the\n\
         connection (slowloris).",
        app.read_timeout_ms,
    );
    w.number(
        "out_queue_bytes",
        "Bytes that may wait to be written to one connection (at least 64 KiB); past it the\n\
         connection is closed as slow_consumer and its session is held.",
        app.out_queue_bytes,
    );
    w.number(
        "retry_after_ms",
        "Base delay refused apps are told to wait before retrying, in milliseconds; the gate\n\
         adds jitter so they do not all come back at once.",
        app.retry_after_ms,
    );
    w.number(
        "hold_ms",
        "Milliseconds a session is held after its connection drops; pushes queue meanwhile and\n\
         are delivered on resume. 0: sessions end when their connection drops.",
        app.hold_ms,
    );

    w.section("sidecar", "The port the app-server connects to.");
    w.string(
        "listen",
        "IP address and port the app-server connects to; port 0 picks a free port.",
        &sidecar.listen,
    );
    w.string(
        "secret",
        "Shared secret the app-server authenticates with.\n\
         Empty: the built-in development secret, not fit for production.",
        &sidecar.secret,
    );
    w.number(
        "max_body",
        "Largest frame body the app-server may send, in bytes (1024 to 64 MiB).",
        sidecar.max_body,
    );
    w.number("max_targets", "Sessions one push may address.", sidecar.max_targets);
    w.number(
        "request_timeout_ms",
        "Milliseconds the gate waits for the app-server to answer an app's request before\n\
         answering the app with a timeout.",
        sidecar.request_timeout_ms,
    );
    w.number(
        "default_ttl_ms",
        "Lifetime of a push that names none, in milliseconds: how long it may wait for a held\n\
         session before an unreachable receipt.",
        sidecar.default_ttl_ms,
    );
    w.number(
        "max_ttl_ms",
        "Longest lifetime a push may ask for, in milliseconds; at least default_ttl_ms.",
        sidecar.max_ttl_ms,
    );

    w.section("auth", "Verification of the tokens apps log in with.");
    w.string(
        "token_secret",
        "Secret app login tokens are signed with.\n\
         Empty: the built-in development secret, not fit for production.",
        &auth.token_secret,
    );

    w.section("gps", "Batching of GPS reports toward the app-server.");
    w.number("flush_ms", "Milliseconds between GPS batches sent to the app-server.", gps.flush_ms);
    w.string(
        "forward",
        "\"latest\": only each driver's newest point per flush; \"all\": every point received.",
        gps.forward.as_str(),
    );
    w.number(
        "max_batch_points",
        &format!("GPS points per batch frame, 1 to {MAX_GPS_BATCH_POINTS} (what fits 64 KiB)."),
        gps.max_batch_points,
    );

    w.section("admin", "The operators' HTTP port.");
    w.string(
        "listen",
        "IP address and port of the admin HTTP endpoint; port 0 picks a free port.",
        &admin.listen,
    );

    w.section("log", "What is logged and how.");
    w.string("level", "Least severe level logged: error, warn, info, debug or trace.", &log.level);
    w.string("format", "\"text\" for people, \"json\" for log collectors.", &log.format);

    w.section("limits", "Bounds on held state, so memory stays bounded.");
    w.number(
        "max_held_sessions_per_shard",
        "Sessions one shard holds at most while their apps are disconnected.",
        limits.max_held_sessions_per_shard,
    );
    w.number(
        "max_pending_requests_per_shard",
        "App requests one shard keeps waiting for an app-server answer; past it new ones are\n\
         refused.",
        limits.max_pending_requests_per_shard,
    );
    w.number("push_queue_len", "Pushes queued per session while it cannot take them.", limits.push_queue_len);
    w.number(
        "push_queue_bytes",
        "Bytes of pushes queued per session while it cannot take them.",
        limits.push_queue_bytes,
    );
    w.0
}

/// Writes `# comment` lines followed by `key = value`, so every key in the printed
/// configuration explains itself.
struct TomlWriter(String);

impl TomlWriter {
    fn section(&mut self, name: &str, about: &str) {
        let _ = write!(self.0, "\n# {about}\n[{name}]\n");
    }

    fn comment(&mut self, comment: &str) {
        for line in comment.lines() {
            let _ = writeln!(self.0, "# {line}");
        }
    }

    fn string(&mut self, key: &str, comment: &str, value: &str) {
        self.comment(comment);
        let _ = writeln!(self.0, "{key} = {}", toml_quote(value));
    }

    fn number(&mut self, key: &str, comment: &str, value: u32) {
        self.comment(comment);
        let _ = writeln!(self.0, "{key} = {}", group_digits(value));
    }
}

/// A TOML basic string.
fn toml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `1048576` as `1_048_576`, which TOML accepts and people read at a glance.
fn group_digits(value: u32) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

const ABOUT: &str =
    "fleetgate gate: the long-connection message gateway between ride-hailing apps and the app-server";

const LONG_ABOUT: &str = "\
fleetgate gate: the long-connection message gateway between ride-hailing apps and the app-server.

The gate holds one long-lived TCP connection per driver and passenger app, one shard per core.
It batches the apps' GPS reports toward the app-server, forwards their requests, fans the
app-server's pushes out to them with a receipt for each, and holds a session for a while after
its connection drops so a reconnecting app gets its queued pushes.

It listens on three ports:
  app      driver and passenger apps connect here   (default 0.0.0.0:7100)
  sidecar  the app-server connects here             (default 127.0.0.1:7200)
  admin    HTTP for operators                       (default 127.0.0.1:7300)
A port of 0 picks a free port; --ports-file records the ports actually bound.

Settings come, lowest precedence first, from the built-in defaults, the config file (-c),
FLEETGATE_<SECTION>_<KEY> environment variables and flags. All are checked before any port is
bound; a bad one stops the gate with exit status 64 and a message naming the key.

Examples:
  gate                                          run with defaults, one shard per core
  gate --cores 0-1 --app-listen 0.0.0.0:7100    two shards, on cores 0 and 1
  gate print-config > gate.toml                 write the commented defaults to a file
  gate -c gate.toml                             run with that file
  gate -c gate.toml check-config                check the file and exit
  gate token --uid 42 --role driver             print a login token (hex) signed with the
                                                configured token secret";

const SETTINGS: &str = "Settings (override the config file)";

/// The gate's command line. Settings flags are all optional: a flag left out keeps the value
/// from its environment variable, else the config file, else the default.
#[derive(Parser)]
#[command(name = "gate", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// What to do; without one the gate runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Config file (TOML; `gate print-config` writes a commented one) [default: none, built-in
    /// defaults]
    #[arg(long, short = 'c', env = "FLEETGATE_CONFIG", value_name = "FILE")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub config: Option<PathBuf>,

    /// File the gate writes its bound ports to once listening, one `name=port` line each for
    /// app, sidecar and admin; lets callers use port 0 and read back the real ports [default:
    /// none]
    #[arg(long, value_name = "FILE")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub ports_file: Option<PathBuf>,

    /// Log more: -v for debug, -vv for trace (raises log.level, never lowers it)
    #[arg(short, long, action = ArgAction::Count)]
    #[arg(help_heading = SETTINGS, global = true)]
    pub verbose: u8,

    /// CPU cores to run shards on, one per core: "all", "0", "0-1" or "0,2" [default: all]
    #[arg(long, env = "FLEETGATE_GATE_CORES", value_name = "CORES")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub cores: Option<String>,

    /// Name of this gate among its peers [default: empty, derived at startup]
    #[arg(long, env = "FLEETGATE_GATE_NODE_NAME", value_name = "NAME")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub node_name: Option<String>,

    /// host:port apps are told to reconnect to [default: empty, the app listen address]
    #[arg(long, env = "FLEETGATE_GATE_ADVERTISE", value_name = "HOST:PORT")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub advertise: Option<String>,

    /// IP address and port apps connect to; port 0 picks a free one [default: 0.0.0.0:7100]
    #[arg(long, env = "FLEETGATE_APP_LISTEN", value_name = "ADDR")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub app_listen: Option<String>,

    /// IP address and port the app-server connects to [default: 127.0.0.1:7200]
    #[arg(long, env = "FLEETGATE_SIDECAR_LISTEN", value_name = "ADDR")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub sidecar_listen: Option<String>,

    /// IP address and port of the admin HTTP endpoint [default: 127.0.0.1:7300]
    #[arg(long, env = "FLEETGATE_ADMIN_LISTEN", value_name = "ADDR")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub admin_listen: Option<String>,

    /// Secret app login tokens are signed with; prefer the environment variable or the config
    /// file, since flags show in the process list [default: the built-in development secret]
    #[arg(long, env = "FLEETGATE_AUTH_TOKEN_SECRET", value_name = "SECRET", hide_env_values = true)]
    #[arg(help_heading = SETTINGS, global = true)]
    pub token_secret: Option<String>,

    /// Shared secret the app-server authenticates with; prefer the environment variable or the
    /// config file, since flags show in the process list [default: the built-in development
    /// secret]
    #[arg(long, env = "FLEETGATE_SIDECAR_SECRET", value_name = "SECRET", hide_env_values = true)]
    #[arg(help_heading = SETTINGS, global = true)]
    pub sidecar_secret: Option<String>,

    /// Interval apps are told to send heartbeats at, in milliseconds [default: 30000]
    #[arg(long, env = "FLEETGATE_APP_HEARTBEAT_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub heartbeat_ms: Option<u32>,

    /// Milliseconds without any frame before a connection is closed; must exceed the heartbeat
    /// [default: 90000]
    #[arg(long, env = "FLEETGATE_APP_IDLE_TIMEOUT_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub idle_timeout_ms: Option<u32>,

    /// Milliseconds a new connection has to log in or resume [default: 10000]
    #[arg(long, env = "FLEETGATE_APP_LOGIN_TIMEOUT_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub login_timeout_ms: Option<u32>,

    /// Milliseconds a frame may take from first to last byte before the connection is closed
    /// [default: 10000]
    #[arg(long, env = "FLEETGATE_APP_READ_TIMEOUT_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub read_timeout_ms: Option<u32>,

    /// Connections one shard holds at most; past it new ones are refused [default: 19000]
    #[arg(long, env = "FLEETGATE_APP_MAX_CONNS_PER_SHARD", value_name = "N")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub max_conns_per_shard: Option<u32>,

    /// Connections one shard accepts per second; past it they queue [default: 20000]
    #[arg(long, env = "FLEETGATE_APP_ACCEPT_RATE_PER_SHARD", value_name = "PER_SEC")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub accept_rate_per_shard: Option<u32>,

    /// Connections that may wait for an accept token before being refused [default: 2000]
    #[arg(long, env = "FLEETGATE_APP_ACCEPT_QUEUE", value_name = "N")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub accept_queue: Option<u32>,

    /// Bytes that may wait to be written to one connection before it is closed as
    /// slow_consumer; at least 65536 [default: 1048576]
    #[arg(long, env = "FLEETGATE_APP_OUT_QUEUE_BYTES", value_name = "BYTES")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub out_queue_bytes: Option<u32>,

    /// Base delay refused apps are told to wait, in milliseconds, before jitter [default: 1000]
    #[arg(long, env = "FLEETGATE_APP_RETRY_AFTER_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub retry_after_ms: Option<u32>,

    /// Milliseconds a session is held after its connection drops [default: 60000]
    #[arg(long, env = "FLEETGATE_APP_HOLD_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub hold_ms: Option<u32>,

    /// Listen backlog of the app port, in connections [default: 4096]
    #[arg(long, env = "FLEETGATE_APP_BACKLOG", value_name = "N")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub backlog: Option<u32>,

    /// Milliseconds to wait for the app-server to answer an app's request [default: 10000]
    #[arg(long, env = "FLEETGATE_SIDECAR_REQUEST_TIMEOUT_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub request_timeout_ms: Option<u32>,

    /// Milliseconds between GPS batches sent to the app-server [default: 1000]
    #[arg(long, env = "FLEETGATE_GPS_FLUSH_MS", value_name = "MS")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub gps_flush_ms: Option<u32>,

    /// Which GPS points to forward each flush [default: latest]
    #[arg(long, env = "FLEETGATE_GPS_FORWARD", value_name = "WHICH")]
    #[arg(help_heading = SETTINGS, global = true)]
    pub gps_forward: Option<GpsForward>,

    /// Least severe level logged [default: info]
    #[arg(long, env = "FLEETGATE_LOG_LEVEL", value_name = "LEVEL", value_parser = LOG_LEVELS)]
    #[arg(help_heading = SETTINGS, global = true)]
    pub log_level: Option<String>,

    /// Log line format: text for people, json for log collectors [default: text]
    #[arg(long, env = "FLEETGATE_LOG_FORMAT", value_name = "FORMAT", value_parser = LOG_FORMATS)]
    #[arg(help_heading = SETTINGS, global = true)]
    pub log_format: Option<String>,
}

/// What the gate does instead of running.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Print the default configuration, commented, and exit
    PrintConfig,
    /// Validate the configuration and exit 0, or 64 with the reason
    CheckConfig,
    /// Print an app login token signed with the configured token secret, as hex, and exit
    ///
    /// The secret comes from the same places as the server's: -c, --token-secret or
    /// FLEETGATE_AUTH_TOKEN_SECRET; with none, the built-in development secret (with a warning on
    /// stderr). Stdout gets the 50-byte token as one line of lowercase hex, nothing else. A bad
    /// flag exits 64 with the flag named.
    Token(TokenArgs),
}

/// `gate token`: the claims of the token to print.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct TokenArgs {
    /// User id the token names
    #[arg(long, value_name = "UID")]
    pub uid: u64,
    /// Role the token names: driver or passenger (or 1 / 2)
    #[arg(long, value_name = "ROLE")]
    pub role: String,
    /// Seconds from now until the token expires
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TOKEN_TTL_S)]
    pub ttl_s: u64,
}

/// Lifetime of a token printed by `gate token` when `--ttl-s` is not given: one day.
pub const DEFAULT_TOKEN_TTL_S: u64 = 86_400;

impl TokenArgs {
    /// The role as its `wire::Role` value (1 driver, 2 passenger); anything else is refused with
    /// a message naming `--role`.
    pub fn role_value(&self) -> Result<u8, ConfigError> {
        match self.role.trim().to_ascii_lowercase().as_str() {
            "driver" | "1" => Ok(1),
            "passenger" | "2" => Ok(2),
            _ => Err(invalid("--role", &self.role, "must be driver, passenger, 1 or 2")),
        }
    }

    /// The signed 50-byte token (PROTOCOL.md §10), valid for `ttl_s` seconds from `now_ms`.
    pub fn issue(&self, secret: &[u8], now_ms: u64) -> Result<[u8; schema::token::TOKEN_LEN], ConfigError> {
        let role = self.role_value()?;
        if self.ttl_s == 0 {
            return Err(ConfigError::Invalid {
                key: "--ttl-s",
                value: "0".into(),
                reason: "must be greater than 0, or the token is expired when issued".into(),
            });
        }
        let expires_ms = now_ms.saturating_add(self.ttl_s.saturating_mul(1000));
        Ok(schema::token::issue(secret, schema::token::Claims { uid: self.uid, role, expires_ms }))
    }
}

/// Lowercase hex of `bytes`, as `gate token` prints a token.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cli {
    /// The effective configuration: defaults, then the config file if one is given, then every
    /// flag or environment variable that is set, then [`Config::validate`].
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.apply_overrides(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply_overrides(&self, c: &mut Config) {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(value) = value {
                *slot = value.clone();
            }
        }
        set(&mut c.gate.cores, &self.cores);
        set(&mut c.gate.node_name, &self.node_name);
        set(&mut c.gate.advertise, &self.advertise);
        set(&mut c.app.listen, &self.app_listen);
        set(&mut c.app.heartbeat_ms, &self.heartbeat_ms);
        set(&mut c.app.idle_timeout_ms, &self.idle_timeout_ms);
        set(&mut c.app.login_timeout_ms, &self.login_timeout_ms);
        set(&mut c.app.read_timeout_ms, &self.read_timeout_ms);
        set(&mut c.app.max_conns_per_shard, &self.max_conns_per_shard);
        set(&mut c.app.accept_rate_per_shard, &self.accept_rate_per_shard);
        set(&mut c.app.accept_queue, &self.accept_queue);
        set(&mut c.app.out_queue_bytes, &self.out_queue_bytes);
        set(&mut c.app.retry_after_ms, &self.retry_after_ms);
        set(&mut c.app.hold_ms, &self.hold_ms);
        set(&mut c.app.backlog, &self.backlog);
        set(&mut c.sidecar.listen, &self.sidecar_listen);
        set(&mut c.sidecar.secret, &self.sidecar_secret);
        set(&mut c.sidecar.request_timeout_ms, &self.request_timeout_ms);
        set(&mut c.auth.token_secret, &self.token_secret);
        set(&mut c.gps.flush_ms, &self.gps_flush_ms);
        set(&mut c.gps.forward, &self.gps_forward);
        set(&mut c.admin.listen, &self.admin_listen);
        set(&mut c.log.level, &self.log_level);
        set(&mut c.log.format, &self.log_format);
        // -v only ever raises verbosity, so `-v` with a configured `trace` stays at trace.
        match self.verbose {
            0 => {}
            1 if c.log.level == "trace" => {}
            1 => c.log.level = "debug".into(),
            _ => c.log.level = "trace".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::sync::Mutex;

    /// Tests that parse the command line read the process environment, and one test sets a
    /// variable: they take this lock so they never see each other's environment.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("gate").chain(args.iter().copied())).unwrap()
    }

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let _env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        cli(args).load()
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("fleetgate-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Asserts a validation error names `key` and carries `value`.
    fn assert_invalid(result: Result<impl std::fmt::Debug, ConfigError>, key: &str, value: &str) {
        match result {
            Err(e @ ConfigError::Invalid { .. }) => {
                let message = e.to_string();
                let ConfigError::Invalid { key: k, value: v, .. } = e else { unreachable!() };
                assert_eq!(k, key, "{message}");
                assert_eq!(v, value, "{message}");
                assert!(message.starts_with(key), "{message}");
            }
            other => panic!("expected an error for {key}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(MAX_GPS_BATCH_POINTS, 2_730);
    }

    #[test]
    fn default_toml_round_trips() {
        let parsed: Config = toml::from_str(&default_toml()).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn default_toml_has_every_key_with_a_comment() {
        let text = default_toml();
        let printed: toml::Table = toml::from_str(&text).unwrap();
        let all: toml::Table = toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
        for (section, keys) in &all {
            let printed_keys = printed[section].as_table().unwrap();
            for key in keys.as_table().unwrap().keys() {
                assert!(printed_keys.contains_key(key), "default_toml lacks {section}.{key}");
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains(" = ") && !line.starts_with('#') {
                assert!(lines[i - 1].starts_with("# "), "no comment above {line:?}");
            }
        }
    }

    #[test]
    fn group_digits_groups_by_three() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1_000), "1_000");
        assert_eq!(group_digits(1_048_576), "1_048_576");
        assert_eq!(group_digits(u32::MAX), "4_294_967_295");
    }

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_states_each_default() {
        let d = Config::default();
        let expected: &[(&str, String)] = &[
            ("cores", d.gate.cores.clone()),
            ("app_listen", d.app.listen.clone()),
            ("sidecar_listen", d.sidecar.listen.clone()),
            ("admin_listen", d.admin.listen.clone()),
            ("heartbeat_ms", d.app.heartbeat_ms.to_string()),
            ("idle_timeout_ms", d.app.idle_timeout_ms.to_string()),
            ("login_timeout_ms", d.app.login_timeout_ms.to_string()),
            ("read_timeout_ms", d.app.read_timeout_ms.to_string()),
            ("max_conns_per_shard", d.app.max_conns_per_shard.to_string()),
            ("accept_rate_per_shard", d.app.accept_rate_per_shard.to_string()),
            ("accept_queue", d.app.accept_queue.to_string()),
            ("out_queue_bytes", d.app.out_queue_bytes.to_string()),
            ("retry_after_ms", d.app.retry_after_ms.to_string()),
            ("hold_ms", d.app.hold_ms.to_string()),
            ("backlog", d.app.backlog.to_string()),
            ("request_timeout_ms", d.sidecar.request_timeout_ms.to_string()),
            ("gps_flush_ms", d.gps.flush_ms.to_string()),
            ("gps_forward", d.gps.forward.as_str().to_string()),
            ("log_level", d.log.level.clone()),
            ("log_format", d.log.format.clone()),
        ];
        let command = Cli::command();
        for (id, default) in expected {
            let arg = command.get_arguments().find(|a| a.get_id() == *id).unwrap();
            let help = arg.get_help().unwrap().to_string();
            assert!(help.contains(&format!("[default: {default}]")), "--{id} help: {help}");
        }
        // The settings flags are the ones read from the environment, bar the config file.
        let settings: Vec<_> =
            command.get_arguments().filter(|a| a.get_env().is_some() && a.get_id() != "config").collect();
        // Every settings flag above, plus the four whose default is not a plain value.
        assert_eq!(settings.len(), expected.len() + 4);
        for arg in settings {
            let help = arg.get_help().unwrap().to_string();
            assert!(help.contains("[default: "), "--{} help lacks its default: {help}", arg.get_id());
        }
    }

    #[test]
    fn no_flags_give_the_defaults() {
        assert_eq!(load(&[]).unwrap(), Config::default());
    }

    #[test]
    fn each_override_applies() {
        let c = load(&[
            "--cores",
            "0",
            "--node-name",
            "gate-a",
            "--advertise",
            "gate-a.example.com:7100",
            "--app-listen",
            "127.0.0.1:0",
            "--sidecar-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--token-secret",
            "tok",
            "--sidecar-secret",
            "side",
            "--heartbeat-ms",
            "1000",
            "--idle-timeout-ms",
            "3000",
            "--login-timeout-ms",
            "500",
            "--read-timeout-ms",
            "600",
            "--max-conns-per-shard",
            "100",
            "--accept-rate-per-shard",
            "50",
            "--accept-queue",
            "7",
            "--out-queue-bytes",
            "131072",
            "--retry-after-ms",
            "250",
            "--hold-ms",
            "5000",
            "--backlog",
            "128",
            "--request-timeout-ms",
            "700",
            "--gps-flush-ms",
            "20",
            "--gps-forward",
            "all",
            "--log-level",
            "warn",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(c.gate.cores, "0");
        assert_eq!(c.gate.node_name, "gate-a");
        assert_eq!(c.gate.advertise, "gate-a.example.com:7100");
        assert_eq!(c.app.listen, "127.0.0.1:0");
        assert_eq!(c.sidecar.listen, "127.0.0.1:0");
        assert_eq!(c.admin.listen, "127.0.0.1:0");
        assert_eq!(c.token_secret(), b"tok");
        assert_eq!(c.sidecar_secret(), b"side");
        assert!(!c.uses_dev_secret());
        assert_eq!(c.app.heartbeat_ms, 1000);
        assert_eq!(c.app.idle_timeout_ms, 3000);
        assert_eq!(c.app.login_timeout_ms, 500);
        assert_eq!(c.app.read_timeout_ms, 600);
        assert_eq!(c.app.max_conns_per_shard, 100);
        assert_eq!(c.app.accept_rate_per_shard, 50);
        assert_eq!(c.app.accept_queue, 7);
        assert_eq!(c.app.out_queue_bytes, 131_072);
        assert_eq!(c.app.retry_after_ms, 250);
        assert_eq!(c.app.hold_ms, 5000);
        assert_eq!(c.app.backlog, 128);
        assert_eq!(c.sidecar.request_timeout_ms, 700);
        assert_eq!(c.gps.flush_ms, 20);
        assert_eq!(c.gps.forward, GpsForward::All);
        assert_eq!(c.log.level, "warn");
        assert_eq!(c.log.format, "json");
        // Untouched settings keep their defaults.
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.app.max_body, AppConfig::default().max_body);
    }

    #[test]
    fn env_overrides_apply_and_flags_beat_them() {
        let _env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("FLEETGATE_APP_HOLD_MS", "4321");
        std::env::set_var("FLEETGATE_GPS_FORWARD", "all");
        let from_env = cli(&[]).load();
        let flag_wins = cli(&["--hold-ms", "1234"]).load();
        std::env::remove_var("FLEETGATE_APP_HOLD_MS");
        std::env::remove_var("FLEETGATE_GPS_FORWARD");

        let from_env = from_env.unwrap();
        assert_eq!(from_env.app.hold_ms, 4321);
        assert_eq!(from_env.gps.forward, GpsForward::All);
        assert_eq!(flag_wins.unwrap().app.hold_ms, 1234);
    }

    #[test]
    fn file_then_flags() {
        let path = temp_file(
            "layers",
            "[app]\nheartbeat_ms = 5_000\nidle_timeout_ms = 20_000\n[gps]\nforward = \"all\"\n",
        );
        let file_only = load(&["-c", path.to_str().unwrap()]).unwrap();
        assert_eq!(file_only.app.heartbeat_ms, 5000);
        assert_eq!(file_only.app.idle_timeout_ms, 20_000);
        assert_eq!(file_only.gps.forward, GpsForward::All);
        assert_eq!(file_only.app.listen, AppConfig::default().listen);

        // Global flags are accepted after the subcommand too.
        let c = load(&["check-config", "-c", path.to_str().unwrap(), "--idle-timeout-ms", "25000"]).unwrap();
        assert_eq!(c.app.heartbeat_ms, 5000);
        assert_eq!(c.app.idle_timeout_ms, 25_000);

        // A flag can make the file's values invalid, and validation sees the merged result.
        assert_invalid(
            load(&["-c", path.to_str().unwrap(), "--heartbeat-ms", "20000"]),
            "app.idle_timeout_ms",
            "20000",
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn subcommands_parse() {
        let _env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(cli(&["print-config"]).command, Some(Command::PrintConfig));
        assert_eq!(cli(&["check-config"]).command, Some(Command::CheckConfig));
        assert_eq!(cli(&[]).command, None);
        let p = cli(&["--ports-file", "/tmp/ports"]);
        assert_eq!(p.ports_file.as_deref(), Some(Path::new("/tmp/ports")));
        let t = cli(&["token", "--uid", "42", "--role", "driver"]);
        assert_eq!(
            t.command,
            Some(Command::Token(TokenArgs { uid: 42, role: "driver".into(), ttl_s: DEFAULT_TOKEN_TTL_S }))
        );
        // The server's secret flag works after the subcommand too.
        let t = cli(&["token", "--uid", "7", "--role", "2", "--ttl-s", "60", "--token-secret", "s"]);
        assert_eq!(t.load().unwrap().token_secret(), b"s");
        assert!(Cli::try_parse_from(["gate", "token", "--role", "driver"]).is_err(), "--uid is required");
    }

    #[test]
    fn token_args_issue_a_verifiable_token() {
        let args = |role: &str, ttl_s: u64| TokenArgs { uid: 42, role: role.into(), ttl_s };
        for (role, value) in [("driver", 1), ("Passenger", 2), ("1", 1), ("2", 2)] {
            assert_eq!(args(role, 60).role_value().unwrap(), value, "{role}");
        }
        let now = 1_700_000_000_000;
        let token = args("driver", 60).issue(b"sekrit", now).unwrap();
        let claims = schema::token::verify(b"sekrit", &token, now + 59_000).unwrap();
        assert_eq!((claims.uid, claims.role, claims.expires_ms), (42, 1, now + 60_000));
        assert!(schema::token::verify(b"other", &token, now).is_err());
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(hex(&token).len(), 100);
        assert_invalid(args("pilot", 60).issue(b"s", now), "--role", "\"pilot\"");
        assert_invalid(args("0", 60).issue(b"s", now), "--role", "\"0\"");
        assert_invalid(args("driver", 0).issue(b"s", now), "--ttl-s", "0");
    }

    #[test]
    fn verbose_raises_the_level() {
        assert_eq!(load(&["-v"]).unwrap().log.level, "debug");
        assert_eq!(load(&["-vv"]).unwrap().log.level, "trace");
        assert_eq!(load(&["-v", "--log-level", "trace"]).unwrap().log.level, "trace");
        assert_eq!(load(&["-v", "--log-level", "error"]).unwrap().log.level, "debug");
    }

    #[test]
    fn bad_flag_values_are_refused_by_the_parser() {
        let _env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for args in [
            &["gate", "--gps-forward", "some"][..],
            &["gate", "--log-level", "loud"],
            &["gate", "--log-format", "xml"],
            &["gate", "--heartbeat-ms", "-1"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn secrets_default_to_the_dev_secret_and_stay_out_of_debug() {
        let mut c = Config::default();
        assert_eq!(c.token_secret(), DEV_SECRET.as_bytes());
        assert_eq!(c.sidecar_secret(), DEV_SECRET.as_bytes());
        assert!(c.uses_dev_secret());
        c.auth.token_secret = "token-secret-value".into();
        assert!(c.uses_dev_secret(), "the sidecar still uses it");
        c.sidecar.secret = DEV_SECRET.into();
        assert!(c.uses_dev_secret(), "naming the dev secret explicitly is still the dev secret");
        c.sidecar.secret = "sidecar-secret-value".into();
        assert!(!c.uses_dev_secret());
        let debug = format!("{c:?}");
        assert!(!debug.contains("token-secret-value") && !debug.contains("sidecar-secret-value"), "{debug}");
    }

    #[test]
    fn parse_cores_accepts_all_forms() {
        assert_eq!(parse_cores("all", 4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cores("0", 4).unwrap(), vec![0]);
        assert_eq!(parse_cores("0-1", 4).unwrap(), vec![0, 1]);
        assert_eq!(parse_cores("0,2", 4).unwrap(), vec![0, 2]);
        assert_eq!(parse_cores(" 3 , 0-1 ", 4).unwrap(), vec![3, 0, 1]);
        assert_eq!(parse_cores("1-1", 2).unwrap(), vec![1]);
    }

    #[test]
    fn parse_cores_refuses_bad_lists() {
        for (spec, available) in [
            ("5", 2),
            ("1-0", 4),
            ("0,0", 4),
            ("0-2,1", 4),
            ("", 4),
            ("x", 4),
            ("-1", 4),
            ("0,", 4),
            ("0-99999999999", 4),
            ("all", 0),
        ] {
            assert_invalid(parse_cores(spec, available), "gate.cores", &toml_quote(spec));
        }
        let message = parse_cores("5", 2).unwrap_err().to_string();
        assert!(message.contains("core 5") && message.contains("0-1"), "{message}");
        let message = parse_cores("1-0", 4).unwrap_err().to_string();
        assert!(message.contains("backwards"), "{message}");
        let message = parse_cores("0,2,0", 4).unwrap_err().to_string();
        assert!(message.contains("twice"), "{message}");
    }

    #[test]
    fn bad_address_names_the_key() {
        assert_invalid(load(&["--app-listen", "nowhere"]), "app.listen", "\"nowhere\"");
        assert_invalid(load(&["--sidecar-listen", "localhost:7200"]), "sidecar.listen", "\"localhost:7200\"");
        assert_invalid(load(&["--admin-listen", "127.0.0.1"]), "admin.listen", "\"127.0.0.1\"");
        assert_invalid(load(&["--advertise", "gate-a"]), "gate.advertise", "\"gate-a\"");
        assert_invalid(load(&["--advertise", "gate-a:0"]), "gate.advertise", "\"gate-a:0\"");
        assert!(load(&["--advertise", "[::1]:7100"]).is_ok());
    }

    #[test]
    fn idle_must_exceed_heartbeat() {
        assert_invalid(load(&["--idle-timeout-ms", "30000"]), "app.idle_timeout_ms", "30000");
        assert_invalid(load(&["--heartbeat-ms", "95000"]), "app.idle_timeout_ms", "90000");
    }

    #[test]
    fn listeners_may_not_share_a_port() {
        assert_invalid(load(&["--sidecar-listen", "127.0.0.1:7100"]), "sidecar.listen", "\"127.0.0.1:7100\"");
        assert_invalid(load(&["--admin-listen", "127.0.0.1:7200"]), "admin.listen", "\"127.0.0.1:7200\"");
        // Port 0 is always distinct, and distinct IPs may share a port number.
        assert!(load(&["--app-listen", "127.0.0.1:0", "--sidecar-listen", "127.0.0.1:0"]).is_ok());
        assert!(load(&["--app-listen", "127.0.0.2:7200"]).is_ok());
    }

    #[test]
    fn bad_values_name_the_key() {
        type Case = (fn(&mut Config), &'static str, &'static str);
        let cases: &[Case] = &[
            (|c| c.gate.cores = "5-2".into(), "gate.cores", "\"5-2\""),
            (|c| c.gate.node_name = "a b".into(), "gate.node_name", "\"a b\""),
            (|c| c.app.heartbeat_ms = 0, "app.heartbeat_ms", "0"),
            (|c| c.app.login_timeout_ms = 0, "app.login_timeout_ms", "0"),
            (|c| c.app.read_timeout_ms = 0, "app.read_timeout_ms", "0"),
            (|c| c.app.backlog = 0, "app.backlog", "0"),
            (|c| c.app.max_body = 1023, "app.max_body", "1023"),
            (|c| c.app.max_body = 64 * 1024 * 1024 + 1, "app.max_body", "67108865"),
            (|c| c.sidecar.max_body = 100, "sidecar.max_body", "100"),
            (|c| c.app.out_queue_bytes = 65_535, "app.out_queue_bytes", "65535"),
            (|c| c.sidecar.request_timeout_ms = 0, "sidecar.request_timeout_ms", "0"),
            (|c| c.sidecar.max_ttl_ms = 1_000, "sidecar.max_ttl_ms", "1000"),
            (|c| c.gps.flush_ms = 0, "gps.flush_ms", "0"),
            (|c| c.gps.max_batch_points = 0, "gps.max_batch_points", "0"),
            (|c| c.gps.max_batch_points = 2_731, "gps.max_batch_points", "2731"),
            (|c| c.log.level = "loud".into(), "log.level", "\"loud\""),
            (|c| c.log.format = "xml".into(), "log.format", "\"xml\""),
            (|c| c.limits.push_queue_len = 0, "limits.push_queue_len", "0"),
        ];
        for (mutate, key, value) in cases {
            let mut c = Config::default();
            mutate(&mut c);
            assert_invalid(c.validate(), key, value);
        }
        let mut c = Config::default();
        c.gps.max_batch_points = MAX_GPS_BATCH_POINTS;
        c.app.max_body = 1024;
        c.app.out_queue_bytes = 65_536;
        c.sidecar.max_ttl_ms = c.sidecar.default_ttl_ms;
        c.validate().unwrap();
    }

    #[test]
    fn unknown_toml_keys_are_refused() {
        let path = temp_file("unknown", "[app]\nheartbeat_ms = 1000\nlisten_port = 7100\n");
        let err = load(&["-c", path.to_str().unwrap()]).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("listen_port") && message.contains(path.to_str().unwrap()), "{message}");

        let err = Config::from_toml("[apps]\nlisten = \"0.0.0.0:1\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("apps"), "{err}");
        let err = Config::from_toml("[app]\nheartbeat_ms = \"soon\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("heartbeat_ms"), "{err}");
        let err = Config::from_toml("[gps]\nforward = \"some\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("forward"), "{err}");
    }

    #[test]
    fn missing_file_names_the_file() {
        let err = load(&["-c", "/nonexistent/fleetgate.toml"]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/fleetgate.toml"), "{err}");
    }

    #[test]
    fn resolved_cores_uses_this_machine() {
        let cores = Config::default().resolved_cores().unwrap();
        assert_eq!(cores, (0..available_cores()).collect::<Vec<_>>());
    }
}
