//! The gate's configuration: one table of settings (the `settings!` block below) from which the
//! config structs, their defaults, `print-config`'s commented TOML, the flags, the environment
//! variables and the per-setting checks all come.
//!
//! Precedence, lowest first: defaults, the file given with `-c`, environment variables, flags.
//! Every setting `section.key` has the flag `--section-key` and the variable
//! `FLEETGATE_SECTION_KEY` (for example `app.hold_ms`: `--app-hold-ms`,
//! `FLEETGATE_APP_HOLD_MS`); settings that had a shorter flag before keep it as an alias
//! (`--hold-ms`). Values are parsed into their types (addresses, enums, core lists) where they
//! enter, and everything is checked before any port is bound, so a typo stops the gate at
//! startup with exit status 64 and a message naming the setting and where its value came from.

mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};

pub use values::{
    group_digits, toml_quote, AppIo, Cores, GpsForward, LogFormat, LogLevel, Secret, SettingValue,
};

/// The secret used for app tokens and the sidecar when none is configured. It is public, so a
/// gate running on it is fit for development only; [`Config::uses_dev_secret`] lets the gate
/// warn about it.
pub const DEV_SECRET: &str = "fleetgate-dev-secret-change-me";

/// What `gate --version` prints after the name: the release and the commit it was built from
/// (`gate/build.rs`; "unknown" when built outside a git checkout).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FLEETGATE_GIT_COMMIT"), ")");

/// Exit status for a configuration the gate refuses (sysexits' `EX_USAGE`), so scripts can tell
/// "fix the settings" from a crash.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Bytes one GPS point takes in a batch frame toward the app-server.
const GPS_POINT_BYTES: u32 = 24;

/// Most GPS points in one batch: what fits in a 64 KiB frame body, so a batch never needs a
/// larger buffer than an ordinary frame.
pub const MAX_GPS_BATCH_POINTS: u32 = (64 * 1024) / GPS_POINT_BYTES;

/// Frame body limits accepted: below the minimum even a login might not fit; beyond the maximum
/// one frame could pin a large buffer per connection.
const MIN_MAX_BODY: u32 = 1024;
const MAX_MAX_BODY: u32 = 64 * 1024 * 1024;

/// Smallest outgoing queue accepted: below it a single large push would mark a healthy
/// connection as a slow consumer.
const MIN_OUT_QUEUE_BYTES: u32 = 64 * 1024;

/// The listen backlog the kernel accepts; anything larger is cut to `net.core.somaxconn`
/// anyway, so larger values only hide a typo.
const MAX_BACKLOG: u32 = 65_535;

/// Shortest admin control token accepted: anything shorter could be guessed over the port.
const MIN_ADMIN_SECRET: usize = 16;

/// A per-setting check: `Ok`, or what would be accepted.
type Check<T> = fn(&T) -> Result<(), String>;

fn positive(v: &u32) -> Result<(), String> {
    if *v == 0 {
        Err("must be greater than 0".into())
    } else {
        Ok(())
    }
}

fn range(v: u32, min: u32, max: u32, unit: &str) -> Result<(), String> {
    if v < min || v > max {
        Err(format!("must be between {min} and {max} {unit}"))
    } else {
        Ok(())
    }
}

// `&String`: the check's signature is fixed by the setting's type (`Check<String>`).
#[allow(clippy::ptr_arg)]
fn node_name(name: &String) -> Result<(), String> {
    // Empty means "derive one"; a given name travels in frames and log lines.
    if name.len() > 255 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be at most 255 bytes without spaces or control characters".into());
    }
    Ok(())
}

#[allow(clippy::ptr_arg)]
fn advertise(a: &String) -> Result<(), String> {
    if a.is_empty() {
        return Ok(());
    }
    // A host name is allowed here (apps resolve it), so this is not a SocketAddr.
    let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.chars().any(|c| c.is_whitespace() || c.is_control())
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if ok {
        Ok(())
    } else {
        Err("must be host:port with a port from 1 to 65535 (e.g. gate1.example.com:7100)".into())
    }
}

#[allow(clippy::ptr_arg)]
fn redis_url(u: &String) -> Result<(), String> {
    if u.is_empty() || u.starts_with("redis://") || u.starts_with("rediss://") {
        Ok(())
    } else {
        Err("must start with redis:// or rediss:// (e.g. redis://127.0.0.1:6379)".into())
    }
}

/// Declares every setting once. Each row: the key, its type and default; `value` names the
/// value in `--help`; `alias` keeps an older flag working; `example` is a valid non-default
/// value (the tests set every setting to it by flag, variable and file); `check` bounds it; the
/// help sentence becomes the field's doc, its `--help` line and its `print-config` comment.
macro_rules! settings {
    ($(
        [$section:ident] $Section:ident $about:literal {
            $(
                $key:ident: $ty:ty = $default:expr, value $value:literal,
                $(alias $alias:literal,)* example $example:literal $(, check $check:expr)?;
                $help:literal
            )*
        }
    )*) => {
        /// The whole configuration of one gate process. Every section and key may be left out of
        /// the file; what is missing keeps its default, and unknown keys are refused so a
        /// misspelt key is caught instead of being silently ignored.
        #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Config {
            $(#[doc = $about] pub $section: $Section,)*
        }

        $(
            #[doc = $about]
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            #[serde(deny_unknown_fields, default)]
            pub struct $Section {
                $(#[doc = $help] pub $key: $ty,)*
            }

            impl Default for $Section {
                fn default() -> Self {
                    Self { $($key: $default,)* }
                }
            }
        )*

        /// Every setting, in the order `print-config` and `--help` show them.
        pub static SETTINGS: &[Setting] = &[
            $($(
                Setting {
                    section: stringify!($section),
                    section_about: $about,
                    key: stringify!($key),
                    help: $help,
                    value_name: $value,
                    aliases: &[$($alias),*],
                    example: $example,
                    get: |c| SettingValue::to_toml(&c.$section.$key),
                    help_default: |c| SettingValue::to_help(&c.$section.$key),
                    set: |c, text| {
                        c.$section.$key = <$ty as SettingValue>::parse_setting(text)?;
                        Ok(())
                    },
                    check: |c| {
                        let checks: &[Check<$ty>] = &[$($check)?];
                        checks.iter().try_for_each(|f| f(&c.$section.$key))
                    },
                },
            )*)*
        ];
    };
}

settings! {
    [gate] GateConfig "The process as a whole." {
        cores: Cores = Cores::All, value "CORES", alias "cores", example "0";
            "CPU cores to run shards on, one shard pinned per core: \"all\", a core \"0\", a range \"0-1\" or a list \"0,2\" (lists may hold ranges); only cores in the process's CPU affinity (taskset, systemd's CPUAffinity=), and \"all\" is every one of them."
        node_name: String = String::new(), value "NAME", alias "node-name", example "gate-a", check node_name;
            "Name of this gate among its peers and toward the app-server; empty: derived at startup."
        advertise: String = String::new(), value "HOST:PORT", alias "advertise", example "gate-a.example.com:7100", check advertise;
            "host:port apps are told to reconnect to, for gates behind NAT or a load balancer; empty: the app listen address as bound."
    }
    [app] AppConfig "The port driver and passenger apps connect to." {
        listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7100)), value "ADDR", example "127.0.0.1:0";
            "IP address and port apps connect to; port 0 picks a free port."
        backlog: u32 = 4096, value "N", alias "backlog", example "512", check |v| range(*v, 1, MAX_BACKLOG, "connections");
            "Listen backlog, in connections (the kernel caps it at net.core.somaxconn); large because a reconnect storm arrives all at once and an overflowing backlog costs each app a 1 s SYN retransmit."
        max_conns_per_shard: u32 = 19_000, value "N", alias "max-conns-per-shard", example "100", check positive;
            "Connections one shard holds at most; past it new ones are refused with a retry-after (the process's open-file limit caps the total across shards)."
        accept_rate_per_shard: u32 = 20_000, value "PER_SEC", alias "accept-rate-per-shard", example "50", check positive;
            "Connections one shard accepts per second; past it they wait in the accept queue, so a storm is spread out instead of starving the sessions already connected."
        accept_queue: u32 = 2_000, value "N", alias "accept-queue", example "7";
            "Connections that may wait for an accept token before being refused with a retry-after."
        max_body: u32 = 65_536, value "BYTES", example "4096", check |v| range(*v, MIN_MAX_BODY, MAX_MAX_BODY, "bytes");
            "Largest frame body an app may send, in bytes (1024 to 64 MiB); a larger one closes the connection."
        heartbeat_ms: u32 = 30_000, value "MS", alias "heartbeat-ms", example "1000", check positive;
            "Interval apps are told to send heartbeats at, in milliseconds."
        idle_timeout_ms: u32 = 90_000, value "MS", alias "idle-timeout-ms", example "3000", check positive;
            "Milliseconds without any frame after which a connection is closed; must be greater than heartbeat_ms, so one late heartbeat is forgiven."
        login_timeout_ms: u32 = 10_000, value "MS", alias "login-timeout-ms", example "500", check positive;
            "Milliseconds a new connection has to log in or resume before it is closed."
        read_timeout_ms: u32 = 10_000, value "MS", alias "read-timeout-ms", example "600", check positive;
            "Milliseconds a frame may take from its first byte to its last; a slower one closes the connection (slowloris)."
        out_queue_bytes: u32 = 1_048_576, value "BYTES", alias "out-queue-bytes", example "131072",
            check |v| range(*v, MIN_OUT_QUEUE_BYTES, u32::MAX, "bytes (at least 64 KiB)");
            "Bytes that may wait to be written to one connection (at least 64 KiB); past it the connection is closed as slow_consumer."
        retry_after_ms: u32 = 1_000, value "MS", alias "retry-after-ms", example "250", check positive;
            "Base delay refused apps are told to wait before retrying, in milliseconds; the gate adds jitter so they do not all come back at once."
        hold_ms: u32 = 60_000, value "MS", alias "hold-ms", example "5000";
            "Milliseconds a session is held after its connection drops; pushes queue meanwhile and are delivered on resume, and when the hold expires the app-server is told. 0: sessions end when their connection drops."
        io: AppIo = AppIo::Uring, value "IO", example "readiness";
            "How the app port does its I/O: \"uring\" (the shard's own io_uring with multishot receives into a provided-buffer ring; a connection is a table entry; where the kernel lacks it, readiness is used, with a warning) or \"readiness\" (a glommio task per connection)."
        ring_buffers: u32 = 4_096, value "N", example "64", check |v| if v.is_power_of_two() && *v <= 32_768 { Ok(()) } else { Err("must be a power of two from 1 to 32768".into()) };
            "Receive buffers of the app port's io_uring per shard (uring only): sized to a burst of completions, not to the connections; when they run out, receives wait and resume, nothing is lost."
        ring_buffer_size: u32 = 2_048, value "BYTES", example "1024", check |v| range(*v, 256, 65_536, "bytes");
            "Bytes per receive buffer of the app port's io_uring (uring only)."
        ring_cq_entries: u32 = 32_768, value "N", example "64", check |v| if v.is_power_of_two() && (16..=65_536).contains(v) { Ok(()) } else { Err("must be a power of two from 16 to 65536".into()) };
            "Completion queue entries of the app port's io_uring (uring only); past them completions wait on the kernel's overflow list and are taken on the next harvest, more slowly."
        plaintext: bool = false, value "BOOL", alias "plaintext", example "true";
            "Serve apps without the secure channel (docs/PROTOCOL.md §14), for trusted networks and capacity tests only: tokens and every frame cross the network readable by anyone on the path. `--plaintext` alone means true."
        ring_window_us: u32 = 1_000, value "US", example "250", check |v| range(*v, 0, 1_000, "microseconds");
            "While the shard is busy, it takes the app port's completions every this many microseconds instead of being woken for each batch (uring only; at most 1 ms, 0: woken every time); when a harvest finds fewer than two, it waits to be woken again."
    }
    [sidecar] SidecarConfig "The port the app-server connects to." {
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7200)), value "ADDR", example "127.0.0.1:0";
            "IP address and port the app-server connects to; loopback by default because the app-server normally runs beside the gate."
        secret: Secret = Secret::default(), value "SECRET", example "side-secret";
            "Shared secret the app-server authenticates with; prefer the variable or the file, since flags show in the process list. Empty: the built-in development secret, not fit for production."
        max_body: u32 = 8 * 1024 * 1024, value "BYTES", example "65536", check |v| range(*v, MIN_MAX_BODY, MAX_MAX_BODY, "bytes");
            "Largest frame body the app-server may send, in bytes (1024 to 64 MiB); a push carries its target list, hence more than an app frame."
        max_targets: u32 = 50_000, value "N", example "10", check positive;
            "Sessions one push may address."
        request_timeout_ms: u32 = 10_000, value "MS", alias "request-timeout-ms", example "2000", check positive;
            "Milliseconds the gate waits for the app-server to answer an app's request before answering the app with a timeout."
        default_ttl_ms: u32 = 30_000, value "MS", example "20000", check positive;
            "Lifetime of a push that names none, in milliseconds."
        max_ttl_ms: u32 = 300_000, value "MS", example "60000", check positive;
            "Longest lifetime a push may ask for, in milliseconds; at least default_ttl_ms. Bounds how long queued pushes pin memory."
    }
    [channel] ChannelConfig "The app port's secure channel (docs/PROTOCOL.md §14): the gate's static key pair, and the one it replaced." {
        key_file: String = String::new(), value "PATH", example "/etc/fleetgate/gate.key";
            "The gate's private key file, as `gate keygen` writes it; apps ship the matching public key. Empty: the built-in development key pair, public and not fit for production."
        previous_key_file: String = String::new(), value "PATH", example "/etc/fleetgate/gate-old.key";
            "The private key the current one replaced: apps that know only its public key still connect, and are told the new one, for previous_key_overlap_s after the gate starts. Empty: none."
        previous_key_overlap_s: u32 = 604_800, value "SECONDS", example "3600", check positive;
            "Seconds after start during which the previous key is still accepted."
    }
    [cluster] ClusterConfig "Several gate nodes sharing a session directory in Redis (docs/PROTOCOL.md §15); off by default: one node with its embedded directory." {
        redis: String = String::new(), value "URL", alias "redis", example "rediss://:pw@127.0.0.1:6379", check redis_url;
            "Redis (or any node of a Redis Cluster) the nodes share: redis://[:PASSWORD@]HOST:PORT, or rediss:// for TLS (see redis_ca). Prefer the variable FLEETGATE_CLUSTER_REDIS when it carries a password, since flags show in the process list. Empty: one node, no Redis."
        redis_ca: String = String::new(), value "PATH", alias "redis-ca", example "/etc/fleetgate/redis-ca.pem";
            "PEM file of the CA certificates a rediss:// connection trusts, and then only those (for a Redis whose certificate a private CA signed); the server's certificate must carry the URL's host in its subjectAltName (an IP address as an IP entry). Read at start: a file that cannot be used stops the gate, naming it. Only with a rediss:// URL. Empty: the system's CA certificates (the file SSL_CERT_FILE or the folders SSL_CERT_DIR when set, else the platform's store such as /etc/ssl/certs)."
        secret: Secret = Secret::default(), value "SECRET", example "cluster-secret";
            "Secret every node of the cluster shares: messages between nodes are sealed and authenticated under keys derived from it. Empty: the built-in development secret, not fit for production."
        lease_ms: u32 = 3_000, value "MS", example "1000", check |v| range(*v, 300, 60_000, "milliseconds");
            "This node's lease in Redis, renewed every third of it: a node that stops (killed) is taken for lost by the others within this long, and pushes waiting on it end NodeLost."
    }
    [auth] AuthConfig "Verification of the tokens apps log in with." {
        token_secret: Secret = Secret::default(), value "SECRET", alias "token-secret", example "tok-secret";
            "Secret app login tokens are signed with; prefer the variable or the file, since flags show in the process list. Empty: the built-in development secret, not fit for production."
    }
    [gps] GpsConfig "Batching of GPS reports toward the app-server." {
        flush_ms: u32 = 1_000, value "MS", example "250", check positive;
            "Milliseconds between GPS batches sent to the app-server; GPS tolerates the delay, and fewer, larger writes keep the backend from being crushed."
        forward: GpsForward = GpsForward::Latest, value "WHICH", example "all";
            "\"latest\": only each driver's newest point per flush; \"all\": every point received."
        max_batch_points: u32 = 1_000, value "N", example "10", check |v| range(*v, 1, MAX_GPS_BATCH_POINTS, "points");
            "Points one GpsBatch frame from an app may carry, 1 to 2730 (what fits 64 KiB); more is refused with InvalidField."
    }
    [admin] AdminConfig "The operators' HTTP port." {
        listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7300)), value "ADDR", example "127.0.0.1:0";
            "IP address and port of the admin HTTP endpoint; loopback by default because it is for operators, not apps."
        secret_file: String = String::new(), value "PATH", example "/etc/fleetgate/admin-secret";
            "File holding the bearer token the admin port's control commands (POST /log, POST /drain) require, at least 16 bytes, read at start (surrounding whitespace is ignored). Empty: those commands are refused with 403; /metrics, /healthz and /debug/gps need no token."
    }
    [log] LogConfig "What is logged and how." {
        level: LogLevel = LogLevel::Info, value "LEVEL", example "debug";
            "Least severe level logged: error, warn, info, debug or trace (-v and -vv raise it)."
        format: LogFormat = LogFormat::Text, value "FORMAT", example "json";
            "\"text\" for people and grep, \"json\" for log collectors."
    }
    [limits] LimitsConfig "Bounds on held state, so memory stays bounded whatever the apps and the app-server do." {
        max_held_sessions_per_shard: u32 = 100_000, value "N", example "50", check positive;
            "Sessions one shard holds at most while their apps are disconnected."
        max_pending_requests_per_shard: u32 = 10_000, value "N", example "20", check positive;
            "App requests one shard keeps waiting for an app-server answer; past it new ones are refused."
        push_queue_len: u32 = 256, value "N", example "16", check positive;
            "Pushes queued per session while it cannot take them (sent and unacked, or held)."
        push_queue_bytes: u32 = 262_144, value "BYTES", example "65536", check positive;
            "Bytes of pushes queued per session while it cannot take them."
        max_pushes_in_flight_per_shard: u32 = 1_000_000, value "N", example "100", check positive;
            "(message id, uid) pairs one shard holds until their receipt (in a session's queue, or waiting on another node); a push that would pass it on any shard is refused with Overloaded and a retry-after, rather than accepted to end unheld. At least sidecar.max_targets, so any one push fits an empty shard."
    }
}

/// One setting of the table: its names, its help, and how to read, write and check it.
#[derive(Debug)]
pub struct Setting {
    /// The TOML section.
    pub section: &'static str,
    /// What the section is for.
    pub section_about: &'static str,
    /// The TOML key.
    pub key: &'static str,
    /// One paragraph: the field's doc, `--help` and the `print-config` comment.
    pub help: &'static str,
    /// What `--help` calls the value.
    pub value_name: &'static str,
    /// Older flags that still work.
    pub aliases: &'static [&'static str],
    /// A valid value other than the default.
    pub example: &'static str,
    get: fn(&Config) -> String,
    help_default: fn(&Config) -> String,
    set: fn(&mut Config, &str) -> Result<(), String>,
    check: fn(&Config) -> Result<(), String>,
}

impl Setting {
    /// `section.key`, as the file and error messages name it.
    pub fn name(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }

    /// The flag, without its dashes: `section-key`.
    pub fn flag(&self) -> String {
        format!("{}-{}", self.section, self.key.replace('_', "-"))
    }

    /// The environment variable: `FLEETGATE_SECTION_KEY`.
    pub fn env(&self) -> String {
        format!("FLEETGATE_{}_{}", self.section.to_ascii_uppercase(), self.key.to_ascii_uppercase())
    }

    /// The value in `c`, as TOML writes it.
    pub fn get(&self, c: &Config) -> String {
        (self.get)(c)
    }

    /// Sets the value from the text of a flag or a variable.
    pub fn set(&self, c: &mut Config, text: &str) -> Result<(), String> {
        (self.set)(c, text)
    }

    fn is_secret(&self) -> bool {
        self.value_name == "SECRET"
    }
}

/// Where a refused value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file, or the defaults it left alone.
    File,
    /// An environment variable.
    Env(String),
    /// A flag.
    Flag(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File => Ok(()),
            Origin::Env(v) => write!(f, " (from {v})"),
            Origin::Flag(v) => write!(f, " (from --{v})"),
        }
    }
}

/// Why a configuration was refused. Every message names the file or the setting, the bad value
/// and where it came from, so the operator can fix it without reading the source.
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
    /// A setting's value is not usable.
    #[error("{key} = {value}{origin}: {reason}")]
    Invalid {
        /// The setting as `section.key` (or a subcommand's flag).
        key: String,
        /// The offending value as TOML writes it (never a secret's).
        value: String,
        /// Where it came from.
        origin: Origin,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

impl ConfigError {
    /// A refused value of `s`.
    fn invalid(s: &Setting, value: &str, origin: Origin, reason: impl Into<String>) -> ConfigError {
        let value = if s.is_secret() { "<secret>".into() } else { value.to_string() };
        ConfigError::Invalid { key: s.name(), value, origin, reason: reason.into() }
    }

    /// A refused value checked across settings, shown as TOML.
    fn checked(key: &str, value: impl SettingValue, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            value: value.to_toml(),
            origin: Origin::File,
            reason: reason.into(),
        }
    }
}

/// The setting named `section.key`.
pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name() == name)
}

impl Config {
    /// Reads and parses a TOML file. Missing keys keep their defaults; the result is not yet
    /// checked, because overrides may still fix it.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        toml::from_str(&text)
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

    /// Key material of messages between cluster nodes.
    pub fn cluster_secret(&self) -> &[u8] {
        secret_or_dev(&self.cluster.secret)
    }

    /// Cluster mode: `cluster.redis` is set.
    pub fn clustered(&self) -> bool {
        !self.cluster.redis.is_empty()
    }

    /// The CA certificates of `cluster.redis_ca`, read and checked now (so a bad file stops the
    /// gate before it binds a port); `None` when it is empty or cluster mode is off.
    pub fn redis_tls_roots(&self) -> Result<Option<cluster::TlsRoots>, ConfigError> {
        let path = self.cluster.redis_ca.as_str();
        if path.is_empty() || !self.clustered() {
            return Ok(None);
        }
        cluster::TlsRoots::from_pem_file(Path::new(path)).map(Some).map_err(|e| ConfigError::Invalid {
            key: "cluster.redis_ca".into(),
            value: toml_quote(path),
            origin: Origin::File,
            // The value already names the file.
            reason: match e {
                cluster::Error::Ca { why, .. } => why,
                other => other.to_string(),
            },
        })
    }

    /// True when either secret is the public development one, so the gate can warn that it is
    /// not fit for production.
    pub fn uses_dev_secret(&self) -> bool {
        self.token_secret() == DEV_SECRET.as_bytes() || self.sidecar_secret() == DEV_SECRET.as_bytes()
    }

    /// The secure channel's key ring: `channel.key_file` (or the development pair) and, for
    /// `channel.previous_key_overlap_s` from `now_ms`, `channel.previous_key_file`.
    pub fn key_ring(&self, now_ms: u64) -> Result<channel::KeyRing, ConfigError> {
        let load = |key: &str, path: &str| {
            channel::keys::load_private(Path::new(path)).map_err(|e| ConfigError::Invalid {
                key: key.into(),
                value: toml_quote(path),
                origin: Origin::File,
                reason: e.to_string(),
            })
        };
        let current = match self.channel.key_file.as_str() {
            "" => channel::Keypair::dev(),
            path => load("channel.key_file", path)?,
        };
        Ok(match self.channel.previous_key_file.as_str() {
            "" => channel::KeyRing::new(current),
            path => {
                let previous = load("channel.previous_key_file", path)?;
                let until = now_ms.saturating_add(self.channel.previous_key_overlap_s as u64 * 1000);
                channel::KeyRing::with_previous(current, previous, until)
            }
        })
    }

    /// The admin port's control token from `admin.secret_file`, read now (so a file that cannot
    /// be used stops the gate before it binds); `None` when the setting is empty, which turns the
    /// control commands off.
    pub fn admin_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let path = self.admin.secret_file.as_str();
        if path.is_empty() {
            return Ok(None);
        }
        let bad = |reason: String| ConfigError::Invalid {
            key: "admin.secret_file".into(),
            value: toml_quote(path),
            origin: Origin::File,
            reason,
        };
        let text = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let token = text.trim_ascii();
        if token.len() < MIN_ADMIN_SECRET {
            return Err(bad(format!(
                "holds {} bytes; the token must be at least {MIN_ADMIN_SECRET} (e.g. `head -c 32 /dev/urandom | base64`)",
                token.len()
            )));
        }
        Ok(Some(token.to_vec()))
    }

    /// The cores to run shards on, checked against the cores this process may use.
    pub fn resolved_cores(&self) -> Result<Vec<usize>, ConfigError> {
        resolve_cores(&self.gate.cores, &available_cores())
    }

    /// Checks every setting, before any port is bound, and names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for s in SETTINGS {
            (s.check)(self).map_err(|reason| ConfigError::invalid(s, &s.get(self), Origin::File, reason))?;
        }
        self.resolved_cores()?;
        let (app, sidecar) = (&self.app, &self.sidecar);
        if app.idle_timeout_ms <= app.heartbeat_ms {
            return Err(ConfigError::checked(
                "app.idle_timeout_ms",
                app.idle_timeout_ms,
                format!(
                    "must be greater than app.heartbeat_ms ({}), or healthy apps are closed between heartbeats",
                    app.heartbeat_ms
                ),
            ));
        }
        let cluster = &self.cluster;
        if !cluster.redis_ca.is_empty() && cluster.clustered_without_tls() {
            return Err(ConfigError::checked(
                "cluster.redis_ca",
                cluster.redis_ca.clone(),
                "is set but cluster.redis is not a rediss:// URL: the CA would protect nothing (use rediss://, or leave redis_ca empty)",
            ));
        }
        if self.limits.max_pushes_in_flight_per_shard < sidecar.max_targets {
            return Err(ConfigError::checked(
                "limits.max_pushes_in_flight_per_shard",
                self.limits.max_pushes_in_flight_per_shard,
                format!(
                    "must be at least sidecar.max_targets ({}): a push to that many uids on one shard could never be accepted",
                    sidecar.max_targets
                ),
            ));
        }
        if sidecar.max_ttl_ms < sidecar.default_ttl_ms {
            return Err(ConfigError::checked(
                "sidecar.max_ttl_ms",
                sidecar.max_ttl_ms,
                format!("must be at least sidecar.default_ttl_ms ({})", sidecar.default_ttl_ms),
            ));
        }
        // A listener bound with SO_REUSEPORT (one per shard) does not fail when another holds
        // its port: the two silently share connections. Refuse overlapping ports here instead.
        let listeners = [
            ("app.listen", app.listen),
            ("sidecar.listen", sidecar.listen),
            ("admin.listen", self.admin.listen),
        ];
        for (i, &(key, addr)) in listeners.iter().enumerate() {
            for &(other_key, other) in &listeners[..i] {
                if ports_overlap(addr, other) {
                    return Err(ConfigError::checked(
                        key,
                        addr,
                        format!("same port as {other_key} ({other}); with SO_REUSEPORT both would share it silently"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// Cluster mode over plain TCP (`redis://`).
    fn clustered_without_tls(&self) -> bool {
        !self.redis.is_empty() && !self.redis.starts_with("rediss://")
    }
}

fn secret_or_dev(secret: &Secret) -> &[u8] {
    if secret.0.is_empty() {
        DEV_SECRET.as_bytes()
    } else {
        secret.0.as_bytes()
    }
}

/// The cores (CPU ids) this process may run on: its affinity mask, which `taskset`, systemd's
/// `CPUAffinity=` or a container's cpuset narrow; where that cannot be read, the first
/// `available_parallelism` ids (core 0 alone when even that is unknown), so the gate still starts.
fn available_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most the
    // size given into it, and CPU_ISSET reads it with an index below CPU_SETSIZE.
    let from_mask = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
        } else {
            Vec::new()
        }
    };
    if !from_mask.is_empty() {
        return from_mask;
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// The cores of `cores` for a process that may run on `allowed` (CPU ids, ascending), or why
/// not: "all" is every allowed core, a list must name allowed cores only.
pub fn resolve_cores(cores: &Cores, allowed: &[usize]) -> Result<Vec<usize>, ConfigError> {
    let bad = |reason: String| ConfigError::checked("gate.cores", cores.clone(), reason);
    if allowed.is_empty() {
        return Err(bad("no cores are available to this process".into()));
    }
    match cores {
        Cores::All => Ok(allowed.to_vec()),
        Cores::List(list) => {
            if let Some(c) = list.iter().find(|c| !allowed.contains(c)) {
                return Err(bad(format!(
                    "core {c} is not available: this process may use {} core(s), {}",
                    allowed.len(),
                    core_ranges(allowed)
                )));
            }
            Ok(list.clone())
        }
    }
}

/// Ascending core ids as `gate.cores` writes them, runs as ranges: `[0, 1, 2, 5]` is "0-2,5".
fn core_ranges(cores: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &c in cores {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == c => *last = c,
            _ => runs.push((c, c)),
        }
    }
    let run = |&(a, b): &(usize, usize)| if a == b { a.to_string() } else { format!("{a}-{b}") };
    runs.iter().map(run).collect::<Vec<_>>().join(",")
}

/// True when two listeners would end up on the same port: same nonzero port and the same IP,
/// or either bound to every address.
fn ports_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The full default configuration as commented TOML: what `gate print-config` prints, written
/// from the settings table, so the text cannot drift from the defaults.
pub fn default_toml() -> String {
    let c = Config::default();
    let mut out = String::from(
        "# fleetgate gate configuration.\n\
         # Every key is optional: a missing key keeps the default shown here. Unknown keys are\n\
         # refused. Environment variables FLEETGATE_<SECTION>_<KEY> and flags --<section>-<key>\n\
         # override this file (see gate --help).\n",
    );
    let mut section = "";
    for s in SETTINGS {
        if s.section != section {
            section = s.section;
            out.push_str(&format!("\n# {}\n[{}]\n", s.section_about, s.section));
        }
        for line in wrap(s.help, 94) {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("{} = {}\n", s.key, s.get(&c)));
    }
    out
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("never empty");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
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

Settings come, lowest precedence first, from the built-in defaults, the config file (-c), the
environment and flags. Setting section.key has the flag --section-key and the variable
FLEETGATE_SECTION_KEY (app.hold_ms: --app-hold-ms, FLEETGATE_APP_HOLD_MS); older short flags
are kept as aliases (--hold-ms). All are checked before any port is bound; a bad one stops the
gate with exit status 64 and a message naming the setting.

Examples:
  gate                                          run with defaults, one shard per core
  gate --cores 0-1 --app-listen 0.0.0.0:7100    two shards, on cores 0 and 1
  gate print-config > gate.toml                 write the commented defaults to a file
  gate -c gate.toml                             run with that file
  gate -c gate.toml check-config                check the file and exit
  gate token --uid 42 --role driver             print a login token (hex) signed with the
                                                configured token secret";

/// Heading of the settings flags in `--help`.
const SETTINGS_HEADING: &str = "Settings (override the config file)";

/// The gate's command line: the flags that are not settings, the subcommands, and (added from
/// the table by [`Cli::command_with_settings`]) a flag per setting.
#[derive(Debug, Parser)]
#[command(name = "gate", version = VERSION, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// What to do; without one the gate runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Config file (TOML; `gate print-config` writes a commented one) [default: none, built-in
    /// defaults]
    #[arg(long, short = 'c', env = "FLEETGATE_CONFIG", value_name = "FILE")]
    #[arg(help_heading = SETTINGS_HEADING, global = true)]
    pub config: Option<PathBuf>,

    /// File the gate writes its bound ports to once listening, one `name=port` line each for
    /// app, sidecar and admin; lets callers use port 0 and read back the real ports [default:
    /// none]
    #[arg(long, value_name = "FILE")]
    #[arg(help_heading = SETTINGS_HEADING, global = true)]
    pub ports_file: Option<PathBuf>,

    /// Log more: -v for debug, -vv for trace (raises log.level, never lowers it)
    #[arg(short, long, action = ArgAction::Count)]
    #[arg(help_heading = SETTINGS_HEADING, global = true)]
    pub verbose: u8,

    /// Settings given by flag or environment variable, in the order they apply.
    #[arg(skip)]
    pub overrides: Vec<Override>,
}

/// A setting given by a variable or a flag.
#[derive(Debug, Clone)]
pub struct Override {
    /// The setting.
    pub setting: &'static Setting,
    /// Its text.
    pub text: String,
    /// Where it came from.
    pub origin: Origin,
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
    /// Write a new key pair for the app port's secure channel and exit
    ///
    /// Writes the private key to PATH (mode 0600) and the public key to PATH.pub, refusing to
    /// replace either, and prints the public key's hex on stdout. Name PATH in
    /// `channel.key_file`; ship PATH.pub (or the printed hex) with the apps. To rotate, move the
    /// old file to `channel.previous_key_file` and write a new one here.
    Keygen(KeygenArgs),
}

/// `gate keygen`: where to write the key pair.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct KeygenArgs {
    /// The private key file to write; the public key goes to the same path with `.pub` added
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

impl KeygenArgs {
    /// Writes a fresh key pair; returns it.
    pub fn run(&self) -> Result<channel::Keypair, channel::KeyError> {
        let kp = channel::Keypair::generate();
        let mut public = self.out.clone().into_os_string();
        public.push(".pub");
        // The public file first: a failure then leaves no private key without its public half.
        kp.save_public(Path::new(&public))?;
        kp.save_private(&self.out)?;
        Ok(kp)
    }
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
            _ => Err(ConfigError::Invalid {
                key: "--role".into(),
                value: toml_quote(&self.role),
                origin: Origin::File,
                reason: "must be driver, passenger, 1 or 2".into(),
            }),
        }
    }

    /// The signed 50-byte token (PROTOCOL.md §10), valid for `ttl_s` seconds from `now_ms`.
    pub fn issue(&self, secret: &[u8], now_ms: u64) -> Result<[u8; schema::token::TOKEN_LEN], ConfigError> {
        let role = self.role_value()?;
        if self.ttl_s == 0 {
            return Err(ConfigError::Invalid {
                key: "--ttl-s".into(),
                value: "0".into(),
                origin: Origin::File,
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
    /// The full command line: [`Cli`]'s own flags and subcommands plus a flag per setting.
    pub fn command_with_settings() -> clap::Command {
        let defaults = Config::default();
        let mut cmd = Cli::command();
        for s in SETTINGS {
            let default = (s.help_default)(&defaults);
            let default = if default.is_empty() { "empty".to_string() } else { default };
            let mut arg = clap::Arg::new(s.name())
                .long(s.flag())
                .value_name(s.value_name)
                .help(format!("{} [default: {default}] [env: {}]", s.help, s.env()))
                .help_heading(SETTINGS_HEADING)
                .global(true);
            for alias in s.aliases {
                arg = arg.visible_alias(*alias);
            }
            if s.value_name == "BOOL" {
                // A switch: `--plaintext` alone says true; `--plaintext false` still parses.
                arg = arg.num_args(0..=1).default_missing_value("true");
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    /// Parses the process's arguments and environment; exits as clap does on `--help`, a
    /// misspelt flag or a missing value (a bad value exits 64 later, at [`Cli::load`]).
    pub fn parse_process() -> Cli {
        let matches = Cli::command_with_settings().get_matches();
        Cli::from_matches(&matches, &|name| std::env::var(name).ok()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the program name first) with `env` as the environment.
    pub fn try_parse_with(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Cli, clap::Error> {
        let matches = Cli::command_with_settings().try_get_matches_from(args)?;
        Cli::from_matches(&matches, env)
    }

    fn from_matches(matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Result<Cli, clap::Error> {
        let mut cli = Cli::from_arg_matches(matches)?;
        // Variables first, then flags, so a flag wins over its variable.
        for s in SETTINGS {
            if let Some(text) = env(&s.env()) {
                cli.overrides.push(Override { setting: s, text, origin: Origin::Env(s.env()) });
            }
        }
        for s in SETTINGS {
            let flag = matches
                .get_one::<String>(&s.name())
                .or_else(|| matches.subcommand().and_then(|(_, sub)| sub.get_one::<String>(&s.name())));
            if let Some(text) = flag {
                cli.overrides.push(Override {
                    setting: s,
                    text: text.clone(),
                    origin: Origin::Flag(s.flag()),
                });
            }
        }
        Ok(cli)
    }

    /// The effective configuration: defaults, then the config file if one is given, then every
    /// variable and flag that is set, then [`Config::validate`].
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        for o in &self.overrides {
            o.setting.set(&mut config, &o.text).map_err(|reason| {
                ConfigError::invalid(o.setting, &toml_quote(&o.text), o.origin.clone(), reason)
            })?;
        }
        // -v only ever raises verbosity, so `-v` with a configured `trace` stays at trace.
        match self.verbose {
            0 => {}
            1 if config.log.level == LogLevel::Trace => {}
            1 => config.log.level = LogLevel::Debug,
            _ => config.log.level = LogLevel::Trace,
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests;
