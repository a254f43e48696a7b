//! MQTT over TLS end to end: a real mosquitto (Debian's package) on a free loopback port with a
//! TLS listener, its CA and certificate made here (`loadgen::peers::tls::write_test_certs`),
//! and loadgen's binary against it with `--target mqtt --tls-ca`. Small fleets, short windows;
//! no timing is asserted.
//!
//! mosquitto must be installed (`make test` installs it): without it these tests fail and say
//! so, rather than pass without having run.

use loadgen::peers::tls::{write_test_certs, TestCerts};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest mosquitto may take to listen, and a loadgen run to finish.
const PATIENCE: Duration = Duration::from_secs(60);

/// A folder of this test's own, emptied.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loadgen-mqtt-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// mosquitto's binary: Debian puts it in /usr/sbin, which is not on every PATH.
fn mosquitto_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("mosquitto")).collect::<Vec<_>>())
        .unwrap_or_default();
    [PathBuf::from("/usr/sbin/mosquitto")].into_iter().chain(on_path).find(|p| p.is_file()).unwrap_or_else(
        || {
            panic!(
                "mosquitto is not installed, and these tests run a real broker: apt-get install mosquitto \
                 (make test installs it)"
            )
        },
    )
}

/// A mosquitto process with one TLS listener on loopback; killed when dropped.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto in `dir` with a TLS listener on a free port, serving `certs`.
    fn start_tls(dir: &Path, certs: &TestCerts) -> Mosquitto {
        let bin = mosquitto_bin();
        let mut last = String::new();
        // A free port may be taken between finding it and mosquitto binding it: try again.
        for attempt in 0..3 {
            let port =
                TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let conf = dir.join(format!("mosquitto-{attempt}.conf"));
            let log = dir.join(format!("mosquitto-{attempt}.log"));
            let text = format!(
                "listener {port} 127.0.0.1\n\
                 cafile {}\n\
                 certfile {}\n\
                 keyfile {}\n\
                 tls_version tlsv1.3\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n\
                 log_type notice\n\
                 set_tcp_nodelay true\n",
                certs.ca.display(),
                certs.cert.display(),
                certs.key.display()
            );
            std::fs::write(&conf, text).expect("mosquitto.conf");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut m = Mosquitto { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), log };
            let deadline = Instant::now() + PATIENCE;
            loop {
                if TcpStream::connect_timeout(&m.addr, Duration::from_millis(200)).is_ok() {
                    return m;
                }
                if m.child.try_wait().expect("wait").is_some() || Instant::now() > deadline {
                    last = m.log_text();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("mosquitto did not start with a TLS listener; its log:\n{last}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one loadgen run gave: exit code, stdout (its JSON, if any) and stderr.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self, broker: &Mosquitto) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "no JSON on stdout ({e}): {}\nstderr:\n{}\nmosquitto log:\n{}",
                self.stdout,
                self.stderr,
                broker.log_text()
            )
        })
    }
}

/// Runs `loadgen <args> --target mqtt --gate <broker> --tls-ca <ca> --json --quiet`.
fn loadgen(broker: &Mosquitto, ca: &Path, args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .args(["--target", "mqtt", "--gate", &broker.addr.to_string(), "--cores", "0", "--json", "--quiet"])
        .arg("--tls-ca")
        .arg(ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadgen did not finish in {PATIENCE:?}; mosquitto log:\n{}", broker.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("{}", run.stderr);
    run
}

fn n(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {v:#}"))
}

#[test]
fn gps_over_tls_reaches_the_subscriber_through_mosquitto() {
    let dir = temp_dir("gps");
    let certs = write_test_certs(&dir.join("certs")).expect("certificates");
    let broker = Mosquitto::start_tls(&dir, &certs);
    let run = loadgen(&broker, &certs.ca, &["gps", "--drivers", "40", "--rate", "5", "--duration", "3"]);
    let v = run.json(&broker);
    let ctx = || format!("{v:#}\nmosquitto log:\n{}", broker.log_text());
    assert_eq!(run.code, 0, "{}", ctx());
    assert_eq!(v.pointer("/tls"), Some(&Value::Bool(true)), "{}", ctx());
    assert_eq!(v.pointer("/target").and_then(Value::as_str), Some("mqtt"), "{}", ctx());
    assert_eq!(n(&v, "/connections/logins"), 40.0, "every driver up once: {}", ctx());
    assert_eq!(n(&v, "/connections/live_at_end"), 40.0, "{}", ctx());
    assert!(n(&v, "/handshake/latency_us/count") >= 40.0, "{}", ctx());
    let sent = n(&v, "/gps/sent");
    assert!(sent > 0.0, "{}", ctx());
    // The app-server's subscriber (over TLS too) got the points, give or take the ones in
    // flight at the window's edges.
    let forwarded = n(&v, "/gps/forwarded");
    assert!(forwarded > 0.0 && forwarded >= sent / 2.0, "sent {sent}, forwarded {forwarded}: {}", ctx());
    assert!(n(&v, "/appserver/gps_points") >= forwarded, "{}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "{}", ctx());
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pushes_over_tls_reach_the_drivers() {
    let dir = temp_dir("push");
    let certs = write_test_certs(&dir.join("certs")).expect("certificates");
    let broker = Mosquitto::start_tls(&dir, &certs);
    let run = loadgen(
        &broker,
        &certs.ca,
        &["push", "--drivers", "30", "--rate", "1", "--push-rate", "10", "--fanout", "5", "--duration", "2"],
    );
    let v = run.json(&broker);
    let ctx = || format!("{v:#}\nmosquitto log:\n{}", broker.log_text());
    assert_eq!(run.code, 0, "{}", ctx());
    assert_eq!(v.pointer("/tls"), Some(&Value::Bool(true)), "{}", ctx());
    assert!(n(&v, "/push/sent") > 0.0, "{}", ctx());
    assert!(n(&v, "/push/received") > 0.0, "pushes arrived through TLS: {}", ctx());
    assert!(n(&v, "/push/latency_us/p50") > 0.0, "{}", ctx());
    assert_eq!(n(&v, "/errors"), 0.0, "{}", ctx());
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_ca_fails_the_run_at_once_and_says_why() {
    let dir = temp_dir("wrong-ca");
    let certs = write_test_certs(&dir.join("certs")).expect("certificates");
    let other = write_test_certs(&dir.join("other")).expect("another CA");
    let broker = Mosquitto::start_tls(&dir, &certs);
    let started = Instant::now();
    let run = loadgen(&broker, &other.ca, &["gps", "--drivers", "20", "--rate", "1", "--duration", "2"]);
    assert_eq!(run.code, 2, "the run could not start: {}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.trim().is_empty(), "no report: {}", run.stdout);
    for words in ["TLS handshake", "invalid peer certificate", "UnknownIssuer", "--tls-ca"] {
        assert!(run.stderr.contains(words), "stderr says {words:?}: {}", run.stderr);
    }
    assert!(started.elapsed() < Duration::from_secs(20), "it failed at once, not after retries");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
