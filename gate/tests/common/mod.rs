//! Starting a real gate process on free ports for integration tests.
#![allow(dead_code)]

use client::{dev_token, AppConn};
use std::path::Path;
use std::time::{Duration, Instant};
pub use testkit::sum_metric;
use testkit::GateProcess;

/// A fresh folder under the system's temporary one, named for the test and this process.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleetgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Starts the gate on free loopback ports with `setting`'s flag set to `path`, expecting it to
/// refuse the file and exit with 64 naming the setting; its stderr.
pub fn refused_file(setting: &str, path: &Path) -> String {
    let flag = format!("--{}", setting.replace(['.', '_'], "-"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gate"))
        .args([
            "--app-listen",
            "127.0.0.1:0",
            "--sidecar-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg(&flag)
        .arg(path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64), "{setting}: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains(setting), "{setting} named: {stderr}");
    stderr
}

/// The token secret the test gates use.
pub const SECRET: &[u8] = b"test-token-secret";

/// The sidecar secret the test gates use.
pub const SIDECAR_SECRET: &[u8] = b"test-sidecar-secret";

/// "Eventually" bound for anything the tests wait for.
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// A gate process (the shared test launcher) with the helpers these tests use. Its app port
/// speaks the secure channel (the gate's default) with the development key, and [`Gate::connect`]
/// does too; `FLEETGATE_APP_PLAINTEXT=true` runs the same tests in plaintext (`make test` does
/// both), and a test that passes a `plaintext` flag itself gets what it asked for.
pub struct Gate(GateProcess, bool);

impl std::ops::Deref for Gate {
    type Target = GateProcess;
    fn deref(&self) -> &GateProcess {
        &self.0
    }
}

/// True when this test run asks for plaintext gates.
pub fn plaintext_run() -> bool {
    std::env::var("FLEETGATE_APP_PLAINTEXT").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
}

impl Gate {
    /// Starts a gate with test-friendly settings plus `extra` flags.
    pub fn start(extra: &[&str]) -> Gate {
        Gate::start_at(0, 0, extra)
    }

    /// [`Gate::start`] on given app and sidecar ports (0: a free one), e.g. the ports of a gate
    /// that was killed, to restart it where its clients look for it.
    pub fn start_at(app_port: u16, sidecar_port: u16, extra: &[&str]) -> Gate {
        let token_secret = String::from_utf8_lossy(SECRET).into_owned();
        let sidecar_secret = String::from_utf8_lossy(SIDECAR_SECRET).into_owned();
        let mut args = vec!["--token-secret", &token_secret, "--sidecar-secret", &sidecar_secret];
        if !extra.contains(&"--gps-flush-ms") {
            args.extend_from_slice(&["--gps-flush-ms", "100"]);
        }
        let asked = extra.iter().position(|a| a.contains("plaintext"));
        let secure = match asked {
            Some(i) => extra.get(i + 1).is_some_and(|v| *v == "false"),
            None => !plaintext_run(),
        };
        if asked.is_none() && secure {
            args.extend_from_slice(&["--app-plaintext", "false"]);
        }
        args.extend_from_slice(extra);
        Gate(
            GateProcess::start_at(
                Path::new(env!("CARGO_BIN_EXE_gate")),
                app_port,
                sidecar_port,
                &args,
                EVENTUALLY,
            )
            .expect("gate starts"),
            secure,
        )
    }

    /// A connected app client.
    pub fn connect(&self) -> AppConn {
        let mut c = if self.1 {
            let key = *channel::Keypair::dev().public();
            AppConn::connect_secure(self.app, Duration::from_secs(5), key).expect("connect")
        } else {
            AppConn::connect(self.app, Duration::from_secs(5)).expect("connect")
        };
        c.set_read_timeout(EVENTUALLY).expect("timeout");
        c
    }

    /// True when the app port speaks the secure channel.
    pub fn secure(&self) -> bool {
        self.1
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

    /// A connected app-server with the given options (timeout, reconnect bound).
    pub fn appserver_with(
        &self,
        options: client::ConnectOptions,
    ) -> (client::AppServerConn, client::AppServerEvents) {
        client::AppServerConn::connect_with(self.sidecar, SIDECAR_SECRET, "test-appserver", options)
            .expect("app-server connects")
    }

    /// Kills the process with SIGKILL (no drain, no receipts) and waits for it.
    pub fn kill(&mut self) {
        let mut child = self.0.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
    }

    /// GET on the admin port; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        self.0.http_get(path, EVENTUALLY).expect("admin answers")
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

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.0.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGTERM and returns at once (the gate drains meanwhile).
    pub fn sigterm(&self) {
        let pid = self.0.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(pid as i32, 15) };
    }

    /// Waits (at most `EVENTUALLY`) for the process to exit on its own; its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.child.take().expect("running");
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("gate did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit()
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// The next `n` receipts, sorted, and the wall-clock ms when the (last) TtlExpired one arrived
/// (0: none did).
pub fn receipts_with_expiry(
    ev: &client::AppServerEvents,
    n: usize,
) -> (Vec<(u64, u64, schema::wire::Outcome)>, u64) {
    let (mut got, mut expired_at) = (Vec::new(), 0);
    collect_events(ev, |e| {
        if let client::AppServerEvent::Receipt { message_id, uid, outcome } = e {
            if *outcome == schema::wire::Outcome::TtlExpired {
                expired_at = client::now_ms();
            }
            got.push((*message_id, *uid, *outcome));
        }
        got.len() == n
    });
    got.sort();
    (got, expired_at)
}

/// A valid token for `uid`.
pub fn token(uid: u64, role: u8) -> Vec<u8> {
    dev_token(SECRET, uid, role, Duration::from_secs(3600))
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

/// Collects receipts until `n` arrived; returns (message id, uid) → outcomes.
pub fn receipts(
    ev: &client::AppServerEvents,
    n: usize,
) -> std::collections::HashMap<(u64, u64), Vec<schema::wire::Outcome>> {
    let mut got: std::collections::HashMap<(u64, u64), Vec<schema::wire::Outcome>> = Default::default();
    let mut count = 0;
    collect_events(ev, |e| {
        if let client::AppServerEvent::Receipt { message_id, uid, outcome } = e {
            got.entry((*message_id, *uid)).or_default().push(*outcome);
            count += 1;
        }
        count >= n
    });
    got
}

/// Reads app frames until a push delivery arrives.
pub fn next_push(c: &mut AppConn) -> client::OwnedFrame {
    loop {
        let f = c.recv().expect("a push");
        if f.cmd == schema::Cmd::PushDelivery {
            return f;
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

/// Reads the gate's answer to a connection it ends before any login and checks it stands for
/// `code`: in plaintext the Error frame itself; on the secure channel, where nothing can be
/// sealed before a handshake, the Reject that says the same (Overloaded for Overloaded and
/// ShuttingDown, BadHandshake for NotLoggedIn). Returns the retry-after it carried, in ms.
pub fn expect_refusal(c: &mut AppConn, code: schema::wire::ErrorCode) -> u32 {
    refusal(c.recv(), code)
}

/// [`expect_refusal`] on what a `recv` returned.
pub fn refusal(got: Result<client::OwnedFrame, client::ClientError>, code: schema::wire::ErrorCode) -> u32 {
    use schema::wire::ErrorCode;
    match got {
        Ok(f) => {
            let e = f.error().expect("an error frame");
            assert_eq!(e.code, code);
            e.retry_after_ms
        }
        Err(client::ClientError::Channel(channel::ChannelError::RejectedByGate { reason, message })) => {
            let want = match code {
                ErrorCode::Overloaded | ErrorCode::ShuttingDown => channel::RejectReason::Overloaded,
                _ => channel::RejectReason::BadHandshake,
            };
            assert_eq!(reason, want, "{message}");
            message
                .split("retry after ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        }
        Err(e) => panic!("expected {code:?} (or its Reject): {e}"),
    }
}

/// Sleeps until the wall clock reads `ms` (ms since the Unix epoch): push deadlines are
/// wall-clock times.
pub fn sleep_until_wall(ms: u64) {
    let now = client::now_ms();
    if ms > now {
        std::thread::sleep(Duration::from_millis(ms - now));
    }
}
