//! Starting and stopping the servers a bench measures, each pinned to the server core, on free
//! loopback ports, as a child that dies with perf: `prctl(PR_SET_PDEATHSIG)` covers a perf that
//! is killed outright, and [`Server`]'s `Drop` (SIGTERM, a bounded wait, then SIGKILL) covers
//! every other way out, a panic included.

use super::plan::Target;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a server may take to listen.
const START_PATIENCE: Duration = Duration::from_secs(15);
/// Longest a server may take to exit after SIGTERM before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(10);
/// Poll step while waiting.
const POLL: Duration = Duration::from_millis(20);
/// Bytes of a server's log kept for an error message.
const LOG_TAIL: usize = 2000;

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// fleetgate's gate.
    pub gate: PathBuf,
    /// loadgen.
    pub loadgen: PathBuf,
    /// perf's ceiling.
    pub ceiling: PathBuf,
    /// mosquitto, if installed.
    pub mosquitto: Option<PathBuf>,
    /// rumqttd, if installed (`cargo install` puts it in cargo's own bin folder).
    pub rumqttd: Option<PathBuf>,
    /// nats-server, if installed.
    pub nats: Option<PathBuf>,
}

impl Bins {
    /// The project's binaries in `dir`, the peers from PATH (and /usr/sbin, where Debian puts
    /// mosquitto, which is not on every PATH; and cargo's bin folder, where `cargo install`
    /// puts rumqttd).
    pub fn find(dir: &Path) -> Result<Bins, String> {
        let own = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} is missing: build it first (cargo build --release -p gate -p loadgen -p perf)",
                    p.display()
                ))
            }
        };
        Ok(Bins {
            gate: own("gate")?,
            loadgen: own("loadgen")?,
            ceiling: own("ceiling")?,
            mosquitto: which("mosquitto"),
            rumqttd: which("rumqttd"),
            nats: which("nats-server"),
        })
    }

    /// The binary for `t`, or why there is none.
    pub fn server(&self, t: Target) -> Result<&Path, String> {
        match t {
            Target::Gate | Target::GateSecure => Ok(&self.gate),
            Target::Ceiling => Ok(&self.ceiling),
            Target::Mosquitto | Target::MosquittoTls => self
                .mosquitto
                .as_deref()
                .ok_or_else(|| "mosquitto is not installed (apt-get install -y mosquitto)".into()),
            Target::Rumqttd => self.rumqttd.as_deref().ok_or_else(|| {
                format!(
                    "rumqttd is not installed (cargo install rumqttd --version {RUMQTTD_VERSION} --locked)"
                )
            }),
            Target::NatsServer => self
                .nats
                .as_deref()
                .ok_or_else(|| "nats-server is not installed (apt-get install -y nats-server)".into()),
        }
    }
}

/// The rumqttd release the bench measures (`make bench-deps` installs it).
pub const RUMQTTD_VERSION: &str = "0.20.0";

/// `program` on PATH, /usr/sbin, /usr/bin or cargo's bin folder (`$CARGO_HOME/bin`, else
/// `~/.cargo/bin`).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .chain(cargo_bin)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether the commands [`pinned`] makes run at real-time priority (`--realtime`).
static REALTIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Real-time priority of the servers and loadgen under `--realtime`: above every ordinary
/// process, below the kernel's own real-time threads.
pub const REALTIME_PRIORITY: i32 = 10;

/// Makes the servers and loadgen started from now on run at real-time priority, or not.
pub fn set_realtime(on: bool) {
    REALTIME.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Set while a run that must not have real-time priority runs ([`NormalPriority`]).
static SUSPENDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when the commands started now run at real-time priority.
pub fn realtime() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    REALTIME.load(Relaxed) && !SUSPENDED.load(Relaxed)
}

/// While it lives (when made with `true`), servers and loadgen start at normal priority even
/// under `--realtime`.
pub struct NormalPriority(bool);

impl NormalPriority {
    /// Normal priority until the value is dropped, if `on`.
    pub fn during(on: bool) -> NormalPriority {
        if on {
            SUSPENDED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        NormalPriority(on)
    }
}

impl Drop for NormalPriority {
    fn drop(&mut self) {
        if self.0 {
            SUSPENDED.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A command pinned to `core` that dies with this process (at real-time priority under
/// `--realtime`: a start that may not have it fails, saying why).
pub fn pinned(program: &Path, core: usize) -> Command {
    let mut cmd = Command::new(program);
    let rt = realtime();
    // SAFETY: between fork and exec only async-signal-safe calls are made: sched_setaffinity,
    // sched_setscheduler and prctl are plain system calls on values on this stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let param = libc::sched_param { sched_priority: REALTIME_PRIORITY };
            if rt && libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// A free loopback port, for servers that cannot bind port 0 and report it. Another process
/// could take it before the server binds; the start then fails and is retried on a new port.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running server.
pub struct Server {
    /// Which.
    pub target: Target,
    /// Its process.
    child: Option<Child>,
    /// Its pid, for /proc.
    pub pid: u32,
    /// Where drivers connect.
    pub app: SocketAddr,
    /// The gate's sidecar port.
    pub sidecar: Option<SocketAddr>,
    /// The gate's admin port (`/metrics`, `/healthz`).
    pub admin: Option<SocketAddr>,
    /// The ceiling's stats file.
    pub stats_file: Option<PathBuf>,
    /// The CA certificate of a TLS server's certificate (PEM), for loadgen's `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// Its stderr.
    log: PathBuf,
    /// The settings it was started with, for the results.
    pub settings: String,
}

impl Server {
    /// Starts `target` pinned to `core`, its files in `dir`, and waits until it listens.
    /// `forward_all` is the gate's `--gps-forward all` (else `latest`).
    pub fn start(
        target: Target,
        bins: &Bins,
        core: usize,
        dir: &Path,
        forward_all: bool,
    ) -> Result<Server, String> {
        Server::start_with(target, bins, core, dir, forward_all, &[])
    }

    /// [`Server::start`] with `extra` flags after the bench's own, for a gate (a cluster
    /// node's `--redis` and `--node-name`); other targets take none.
    pub fn start_with(
        target: Target,
        bins: &Bins,
        core: usize,
        dir: &Path,
        forward_all: bool,
        extra: &[String],
    ) -> Result<Server, String> {
        if !extra.is_empty() && !matches!(target, Target::Gate | Target::GateSecure) {
            return Err(format!("{} takes no extra flags", target.name()));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let program = bins.server(target)?;
        let log = dir.join(format!("{}.log", target.name()));
        let log_file =
            || std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()));
        let ports = dir.join(format!("{}.ports", target.name()));
        let _ = std::fs::remove_file(&ports);
        let mut cmd = pinned(program, core);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file()?);
        let mut tls_ca = None;
        let (settings, fixed_port, stats_file) = match target {
            Target::Gate | Target::GateSecure => {
                let core = core.to_string();
                #[rustfmt::skip] // name-value pairs, one per line
                let mut args: Vec<&str> = vec![
                    "--cores", &core,
                    "--gps-forward", if forward_all { "all" } else { "latest" },
                    // One line per login would be the gate's main cost in a storm; the peers
                    // log errors only, so the gate does too.
                    "--log-level", "warn",
                    "--app-listen", "127.0.0.1:0",
                    "--sidecar-listen", "127.0.0.1:0",
                    "--admin-listen", "127.0.0.1:0",
                ];
                // The ratio rows measure the reactor: plaintext, as the peers run there.
                // gate-secure runs its default, the secure channel (the development key pair,
                // which loadgen knows too).
                if target == Target::Gate {
                    args.push("--plaintext");
                }
                args.extend(extra.iter().map(String::as_str));
                cmd.args(&args).arg("--ports-file").arg(&ports);
                (format!("gate {}", args.join(" ")), None, None)
            }
            Target::Ceiling => {
                let stats = dir.join("ceiling-stats.json");
                let _ = std::fs::remove_file(&stats);
                let args = ["--listen", "127.0.0.1:0", "--core", &core.to_string(), "--max-conns", "19000"]
                    .map(str::to_owned);
                cmd.args(&args).arg("--ports-file").arg(&ports).arg("--stats-file").arg(&stats);
                (format!("ceiling {}", args.join(" ")), None, Some(stats))
            }
            Target::Mosquitto => {
                let port = free_port().map_err(|e| format!("no free port: {e}"))?;
                let conf = dir.join("mosquitto.conf");
                let text = mosquitto_conf(port);
                std::fs::write(&conf, &text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                cmd.arg("-c").arg(&conf);
                (format!("mosquitto -c mosquitto.conf:\n{text}"), Some(port), None)
            }
            Target::MosquittoTls => {
                let port = free_port().map_err(|e| format!("no free port: {e}"))?;
                let certs = loadgen::peers::tls::write_test_certs(dir)
                    .map_err(|e| format!("cannot write TLS certificates: {e}"))?;
                let conf = dir.join("mosquitto-tls.conf");
                let text = mosquitto_tls_conf(port, &certs.ca, &certs.cert, &certs.key);
                std::fs::write(&conf, &text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                cmd.arg("-c").arg(&conf);
                tls_ca = Some(certs.ca);
                (format!("mosquitto -c mosquitto-tls.conf:\n{text}"), Some(port), None)
            }
            Target::Rumqttd => {
                let port = free_port().map_err(|e| format!("no free port: {e}"))?;
                // rumqttd reads its configuration by file name, the format from the extension.
                let conf = dir.join("rumqttd.toml");
                let text = rumqttd_conf(port);
                std::fs::write(&conf, &text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
                // -q: no banner; no -v: warnings and errors only in the log.
                cmd.arg("-q").arg("-c").arg(&conf);
                (format!("rumqttd -q -c rumqttd.toml:\n{text}"), Some(port), None)
            }
            Target::NatsServer => {
                let port = free_port().map_err(|e| format!("no free port: {e}"))?;
                // One core, as the other servers have: Go would size itself from the affinity
                // mask anyway; saying it keeps the setting visible in the results.
                cmd.env("GOMAXPROCS", "1").args(["-a", "127.0.0.1", "-p", &port.to_string()]);
                (format!("GOMAXPROCS=1 nats-server -a 127.0.0.1 -p {port}"), Some(port), None)
            }
        };
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id();
        let mut server = Server {
            target,
            child: Some(child),
            pid,
            app: SocketAddr::from(([127, 0, 0, 1], 0)),
            sidecar: None,
            admin: None,
            stats_file,
            tls_ca,
            log,
            settings,
        };
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if !server.alive() {
                return Err(format!("{} exited at start: {}", target.name(), server.log_tail()));
            }
            if let Some(port) = fixed_port {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                // Listening, and it is ours (not another process that took the port first).
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && loadgen::procstat::find_listener_pid(port) == Some(pid)
                {
                    server.app = addr;
                    return Ok(server);
                }
            } else if let Some((app, sidecar)) = read_ports(&ports) {
                server.app = SocketAddr::from(([127, 0, 0, 1], app));
                server.sidecar = sidecar.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
                server.admin = std::fs::read_to_string(&ports)
                    .ok()
                    .and_then(|t| named_port(&t, "admin"))
                    .map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen within {START_PATIENCE:?}: {}",
                    target.name(),
                    server.log_tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(LOG_TAIL);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        text[start..].trim().to_owned()
    }

    /// SIGTERM, wait (bounded), SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child, whose pid is not reaped yet (try_wait said so).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_PATIENCE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// mosquitto's configuration: loopback only, no persistence, errors only in the log, Nagle off
/// (the gate and nats-server write with TCP_NODELAY too, so latencies compare).
pub fn mosquitto_conf(port: u16) -> String {
    format!(
        "# written by perf's bench\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         set_tcp_nodelay true\n\
         max_connections -1\n"
    )
}

/// mosquitto's configuration with its listener on TLS 1.3 (the certificate a test CA's, for
/// 127.0.0.1 and localhost): the rest as [`mosquitto_conf`].
pub fn mosquitto_tls_conf(port: u16, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "{}cafile {}\n\
         certfile {}\n\
         keyfile {}\n\
         tls_version tlsv1.3\n",
        mosquitto_conf(port),
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// rumqttd's configuration (its own `rumqttd.toml` format): one MQTT 3.1.1 listener on
/// loopback, its router's defaults (commit log segments of 100 MiB, 10 kept) but for room for
/// every session the bench opens, and no pause between accepts asked for (its default is
/// 1 ms). rumqttd still sleeps between accepts (tokio's `sleep` of 0 ms waits for the timer's
/// next 1 ms tick), so it accepts about 900 connections a second, at 13 % of its core: loadgen's
/// ramp waits for it (at most 512 handshakes open), and 15,000 connections take 17 s idle, about
/// 30 s with GPS flowing. No console, no metrics, no websocket or v5 listener. rumqttd has no
/// TCP_NODELAY setting: it writes with Nagle on.
pub fn rumqttd_conf(port: u16) -> String {
    format!(
        "# written by perf's bench\n\
         id = 0\n\
         \n\
         [router]\n\
         max_connections = 20000\n\
         max_outgoing_packet_count = 200\n\
         max_segment_size = 104857600\n\
         max_segment_count = 10\n\
         \n\
         [v4.1]\n\
         name = \"v4-1\"\n\
         listen = \"127.0.0.1:{port}\"\n\
         next_connection_delay_ms = 0\n\
         \n\
         [v4.1.connections]\n\
         connection_timeout_ms = 60000\n\
         max_payload_size = 20480\n\
         max_inflight_count = 100\n\
         dynamic_filters = true\n"
    )
}

/// `app=` (and `sidecar=`) from a ports file, once it is whole.
fn read_ports(path: &Path) -> Option<(u16, Option<u16>)> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_ports(&text)
}

/// Parses `name=port` lines.
pub fn parse_ports(text: &str) -> Option<(u16, Option<u16>)> {
    if !text.ends_with('\n') {
        return None;
    }
    Some((named_port(text, "app")?, named_port(text, "sidecar")))
}

/// The port on the line `name=port` of a ports file.
fn named_port(text: &str, name: &str) -> Option<u16> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('=')?.trim().parse::<u16>().ok())
}

/// The ceiling's counters from its stats file.
pub fn ceiling_stats(path: &Path) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some((v.get("bytes")?.as_u64()?, v.get("recvs")?.as_u64()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_files() {
        assert_eq!(parse_ports("app=7100\nsidecar=7200\nadmin=7300\n"), Some((7100, Some(7200))));
        assert_eq!(named_port("app=7100\nsidecar=7200\nadmin=7300\n", "admin"), Some(7300));
        assert_eq!(parse_ports("app=5000\n"), Some((5000, None)));
        assert_eq!(parse_ports("app=5000"), None, "not written to its end yet");
        assert_eq!(parse_ports("sidecar=1\n"), None);
    }

    #[test]
    fn mosquitto_listens_on_loopback_only() {
        let c = mosquitto_conf(18831);
        assert!(c.contains("listener 18831 127.0.0.1\n") && c.contains("persistence false"));
    }

    #[test]
    fn mosquitto_tls_names_its_certificates() {
        let c = mosquitto_tls_conf(
            18833,
            Path::new("/d/ca.pem"),
            Path::new("/d/cert.pem"),
            Path::new("/d/key.pem"),
        );
        assert!(c.contains("listener 18833 127.0.0.1\n") && c.contains("cafile /d/ca.pem\n"), "{c}");
        assert!(c.contains("certfile /d/cert.pem\n") && c.contains("keyfile /d/key.pem\n"), "{c}");
        assert!(c.contains("tls_version tlsv1.3\n"), "{c}");
    }

    #[test]
    fn rumqttd_listens_on_loopback_only_with_room_for_every_session() {
        let c = rumqttd_conf(18832);
        assert!(c.contains("[v4.1]\n") && c.contains("listen = \"127.0.0.1:18832\"\n"), "{c}");
        assert!(c.contains("next_connection_delay_ms = 0\n") && c.contains("dynamic_filters = true"), "{c}");
        let max: u32 = c
            .lines()
            .find_map(|l| l.strip_prefix("max_connections = "))
            .and_then(|v| v.parse().ok())
            .expect("max_connections");
        assert!(max > super::super::plan::MAX_CONNS, "{max}");
        assert!(!c.contains("[v5") && !c.contains("[ws") && !c.contains("[console"), "{c}");
    }
}
