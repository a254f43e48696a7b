//! Test support, a dev-dependency of the crates' tests only: a local gate process on free
//! loopback ports: starts the `gate` binary with `--ports-file`, waits for the ports it bound (so nothing
//! pre-picks a port that a stale gate could share through `SO_REUSEPORT`), and kills it on drop.
//! [`redis`]: real `redis-server` processes (one server, plain or TLS only, or a Redis Cluster) for
//! the cluster tests.

pub mod certs;
pub mod redis;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running gate; killed (and its folder removed) when dropped.
#[derive(Debug)]
pub struct GateProcess {
    /// The process; `None` once taken (to signal it yourself).
    pub child: Option<Child>,
    /// Bound app port.
    pub app: SocketAddr,
    /// Bound sidecar port.
    pub sidecar: SocketAddr,
    /// Bound admin port.
    pub admin: SocketAddr,
    /// The gate's stderr.
    pub log: PathBuf,
    /// Temporary folder holding the ports file and the log.
    dir: PathBuf,
}

impl GateProcess {
    /// Starts `bin` on 127.0.0.1 port 0 for every port, plus `args`, and waits at most
    /// `patience` for its ports file.
    pub fn start(bin: &Path, args: &[&str], patience: Duration) -> Result<GateProcess, String> {
        GateProcess::start_at(bin, 0, 0, args, patience)
    }

    /// Like [`GateProcess::start`], with the app and sidecar ports given (0: a free one), e.g. to
    /// restart a gate on the ports a previous one had. The admin port is always a free one.
    pub fn start_at(
        bin: &Path,
        app_port: u16,
        sidecar_port: u16,
        args: &[&str],
        patience: Duration,
    ) -> Result<GateProcess, String> {
        let app_listen = format!("127.0.0.1:{app_port}");
        let sidecar_listen = format!("127.0.0.1:{sidecar_port}");
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("fleetgate-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let ports = dir.join("ports");
        let log = dir.join("gate.log");
        let stderr = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let child = Command::new(bin)
            .arg("--ports-file")
            .arg(&ports)
            .args(["--app-listen", &app_listen, "--sidecar-listen", &sidecar_listen])
            .args(["--admin-listen", "127.0.0.1:0"])
            // Plaintext unless the test says otherwise (`--app-plaintext false`).
            .args(if args.iter().any(|a| a.contains("plaintext")) { &[][..] } else { &["--plaintext"][..] })
            .args(args)
            .env("FLEETGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut gate = GateProcess {
            child: Some(child),
            app: SocketAddr::from(([127, 0, 0, 1], 0)),
            sidecar: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            dir,
        };
        let deadline = Instant::now() + patience;
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ports) {
                break t;
            }
            if Instant::now() > deadline {
                return Err(format!("gate wrote no ports file; log:\n{}", gate.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let port = |name: &str| -> Result<SocketAddr, String> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .and_then(|p| p.trim().parse::<u16>().ok())
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                .ok_or_else(|| format!("no {name} port in {text:?}"))
        };
        gate.app = port("app")?;
        gate.sidecar = port("sidecar")?;
        gate.admin = port("admin")?;
        Ok(gate)
    }

    /// The gate's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// GET `path` on the admin port; the body of a 200 answer.
    pub fn http_get(&self, path: &str, timeout: Duration) -> Result<String, String> {
        let mut s = TcpStream::connect(self.admin).map_err(|e| format!("admin connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        match resp.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(format!("bad admin answer: {resp}")),
        }
    }

    /// Sum of a metric's samples whose labels contain `labels` (`""` for all).
    pub fn metric(&self, name: &str, labels: &str, timeout: Duration) -> Result<f64, String> {
        Ok(sum_metric(&self.http_get("/metrics", timeout)?, name, labels))
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // A failing test's gate log is what explains it: print its tail.
            if let Ok(log) = std::fs::read_to_string(self.dir.join("gate.log")) {
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- last lines of the gate's log ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sum of the samples of `name` in Prometheus text whose label set contains `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = series.split_once('{').unwrap_or((series, ""));
            (n == name && lbl.contains(labels)).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The workspace's debug `gate` binary under `CARGO_TARGET_DIR` (or `<workspace_root>/target`).
/// It must be built already: `make test` builds every target before it runs the tests (by hand:
/// `cargo build --workspace`); a test that ran cargo itself would spend half a minute building.
pub fn workspace_gate_bin(workspace_root: &Path) -> Result<PathBuf, String> {
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(t) if t.is_relative() => workspace_root.join(t),
        Some(t) => t,
        None => workspace_root.join("target"),
    };
    let bin = target.join("debug").join("gate");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "no gate binary at {}: build the workspace first (cargo build --workspace, or make test)",
            bin.display()
        ))
    }
}
