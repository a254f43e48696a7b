//! Starting a real gate process on free ports for integration tests.
#![allow(dead_code)]

use client::{dev_token, AppConn};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The development secret the gate uses when none is configured.
pub const SECRET: &[u8] = b"test-token-secret";

/// The sidecar secret the test gates use.
pub const SIDECAR_SECRET: &[u8] = b"test-sidecar-secret";

/// "Eventually" bound for anything the tests wait for.
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// A gate process; killed (SIGTERM, then SIGKILL) when dropped.
pub struct Gate {
    /// The process.
    pub child: Option<Child>,
    /// Bound app port.
    pub app: SocketAddr,
    /// Bound admin port.
    pub admin: SocketAddr,
    /// Bound sidecar port.
    pub sidecar: SocketAddr,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Temporary folder of this gate.
    dir: PathBuf,
}

impl Gate {
    /// Starts a gate with test-friendly timeouts plus `extra` flags.
    pub fn start(extra: &[&str]) -> Gate {
        let dir = std::env::temp_dir().join(format!(
            "fleetgate-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ports = dir.join("ports");
        let log = dir.join("gate.log");
        let mut args: Vec<String> = vec![
            "--ports-file".into(),
            ports.display().to_string(),
            "--app-listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--sidecar-listen".into(),
            "127.0.0.1:0".into(),
            "--token-secret".into(),
            String::from_utf8_lossy(SECRET).into_owned(),
            "--sidecar-secret".into(),
            String::from_utf8_lossy(SIDECAR_SECRET).into_owned(),
            "--gps-flush-ms".into(),
            "100".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_gate"))
            .args(&args)
            .env("FLEETGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("gate starts");
        let deadline = Instant::now() + EVENTUALLY;
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ports) {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "gate wrote no ports file; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let port = |name: &str| -> u16 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} port in {text:?}"))
        };
        let app = SocketAddr::from(([127, 0, 0, 1], port("app")));
        let admin = SocketAddr::from(([127, 0, 0, 1], port("admin")));
        let sidecar = SocketAddr::from(([127, 0, 0, 1], port("sidecar")));
        Gate { child: Some(child), app, admin, sidecar, log, dir }
    }

    /// A connected app client.
    pub fn connect(&self) -> AppConn {
        let mut c = AppConn::connect(self.app, Duration::from_secs(5)).expect("connect");
        c.set_read_timeout(EVENTUALLY).expect("timeout");
        c
    }

    /// A connected, logged-in app client for `uid` (1 driver, 2 passenger).
    pub fn login(&self, uid: u64, role: u8) -> AppConn {
        let mut c = self.connect();
        let s = c.login(&token(uid, role), "test").expect("login");
        assert_eq!(s.uid, uid);
        c
    }

    /// A connected app-server.
    pub fn appserver(&self) -> (client::AppServerConn, client::AppServerEvents) {
        client::AppServerConn::connect(self.sidecar, SIDECAR_SECRET, "test-appserver", Duration::from_secs(5))
            .expect("app-server connects")
    }

    /// GET on the admin port; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).expect("admin connect");
        s.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        let (head, body) = resp.split_once("\r\n\r\n").expect("http response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// Sum of a metric's samples whose labels contain `labels` (e.g. `shard="0"`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        sum_metric(&self.http_get("/metrics"), name, labels)
    }

    /// Waits until `f` is true or fails with `what`.
    pub fn eventually(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + EVENTUALLY;
        while !f() {
            assert!(Instant::now() < deadline, "never happened: {what}; gate log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The gate's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(child.id() as i32, 15) };
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gate did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A valid token for `uid`.
pub fn token(uid: u64, role: u8) -> Vec<u8> {
    dev_token(SECRET, uid, role, Duration::from_secs(3600))
}

/// Sum of samples of `name` whose label set contains `labels`.
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

/// Receives app-server events until `f` says stop (true) or the bound passes.
pub fn collect_events(ev: &client::AppServerEvents, mut f: impl FnMut(&client::AppServerEvent) -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "app-server events never completed");
        if let Ok(e) = ev.recv_timeout(left) {
            if f(&e) {
                return;
            }
        }
    }
}

/// A push of `payload` to `uids` with a given message id and ttl.
pub fn push_spec(message_id: u64, uids: &[u64], ttl_ms: u32) -> client::PushSpec {
    client::PushSpec {
        message_id,
        uids: uids.to_vec(),
        payload: format!("order {message_id}").into_bytes(),
        ttl_ms,
        broadcast: 0,
        kind: 1,
        log_id: 0xABC0_0000 + message_id,
    }
}

/// A GPS point at time `ts`.
pub fn point(ts: u64, lat: i32) -> schema::wire::GpsPoint {
    schema::wire::GpsPoint::new(ts, lat, 1_164_074_000, 100, 9000, 30, 0)
}
