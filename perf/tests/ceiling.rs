//! The ceiling server really reads: every byte sent reaches its counters, and connections past
//! `--max-conns` are refused.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

struct Server {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Server {
    fn start(name: &str, extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("fleetgate-ceiling-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let ports = dir.join("ports");
        let child = Command::new(env!("CARGO_BIN_EXE_ceiling"))
            .args(["--listen", "127.0.0.1:0", "--buffers", "256"])
            .arg("--ports-file")
            .arg(&ports)
            .arg("--stats-file")
            .arg(dir.join("stats.json"))
            .args(extra)
            .spawn()
            .expect("start ceiling");
        let mut server = Server { child, dir, port: 0 };
        let text = server.wait_for(|_| fs::read_to_string(&ports).ok().filter(|t| t.ends_with('\n')));
        server.port = text.trim().strip_prefix("app=").and_then(|p| p.parse().ok()).expect("app=PORT");
        server
    }

    /// Polls `f` until it yields, failing the test after `WAIT` (or if the server died).
    fn wait_for<T>(&mut self, mut f: impl FnMut(&Server) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("ceiling exited early: {status}");
            }
            assert!(Instant::now() < deadline, "timed out waiting for the ceiling server");
            thread::sleep(POLL);
        }
    }

    fn stats(&self) -> Option<Stats> {
        Stats::parse(&fs::read_to_string(self.dir.join("stats.json")).ok()?)
    }

    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "ceiling did not exit on SIGTERM");
            thread::sleep(POLL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    bytes: u64,
    recvs: u64,
    conns: u64,
    open: u64,
    refused: u64,
    cpu_s: f64,
}

impl Stats {
    fn parse(json: &str) -> Option<Stats> {
        let field = |name: &str| -> Option<f64> {
            let key = format!("\"{name}\":");
            let rest = &json[json.find(&key)? + key.len()..];
            let end = rest.find([',', '}'])?;
            rest[..end].trim().parse().ok()
        };
        Some(Stats {
            bytes: field("bytes")? as u64,
            recvs: field("recvs")? as u64,
            conns: field("conns")? as u64,
            open: field("open")? as u64,
            refused: field("refused")? as u64,
            cpu_s: field("cpu_s")?,
        })
    }
}

fn final_stats(dir: &Path) -> Stats {
    Stats::parse(&fs::read_to_string(dir.join("stats.json")).expect("stats file")).expect("stats JSON")
}

#[test]
fn counts_every_byte_sent() {
    const CONNS: usize = 50;
    const MESSAGES: usize = 1_000;
    const MESSAGE: [u8; 40] = [0x5a; 40];

    let mut server = Server::start("bytes", &[]);
    let mut streams: Vec<TcpStream> = (0..CONNS)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s
        })
        .collect();
    for i in 0..MESSAGES {
        streams[i % CONNS].write_all(&MESSAGE).expect("send");
    }
    drop(streams);

    // The periodic stats show when everything has been drained; SIGTERM only then, so the test
    // checks the counting rather than racing it.
    let total = (MESSAGES * MESSAGE.len()) as u64;
    server.wait_for(|s| drained(s, total));
    let status = server.terminate();
    assert!(status.success(), "ceiling exited with {status}");

    let stats = final_stats(&server.dir);
    assert_eq!(stats.bytes, total, "{stats:?}");
    assert_eq!(stats.conns, CONNS as u64, "{stats:?}");
    assert_eq!(stats.open, 0, "{stats:?}");
    assert!(stats.recvs >= CONNS as u64 && stats.recvs <= MESSAGES as u64, "{stats:?}");
    assert!(stats.cpu_s > 0.0, "{stats:?}");
}

fn drained(server: &Server, bytes: u64) -> Option<()> {
    server.stats().filter(|s| s.bytes >= bytes && s.open == 0).map(drop)
}

#[test]
fn refuses_connections_beyond_max_conns() {
    let mut server = Server::start("refuse", &["--max-conns", "2"]);
    let kept: Vec<TcpStream> =
        (0..2).map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect")).collect();
    server.wait_for(|s| s.stats().filter(|s| s.open == 2).map(drop));

    // The third is accepted by the kernel, then closed by the server: its read sees the end.
    let mut extra = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    extra.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut byte = [0u8; 1];
    let n = extra.read(&mut byte).unwrap_or(0);
    assert_eq!(n, 0, "refused connection should be closed");
    let _ = extra.shutdown(Shutdown::Both);

    server.wait_for(|s| s.stats().filter(|s| s.refused == 1).map(drop));
    drop(kept);
    let status = server.terminate();
    assert!(status.success(), "ceiling exited with {status}");
    let stats = final_stats(&server.dir);
    assert_eq!((stats.conns, stats.refused), (2, 1), "{stats:?}");
}
