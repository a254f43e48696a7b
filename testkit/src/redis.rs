//! Real `redis-server` processes for tests, on free loopback ports, killed when dropped: a
//! single server (optionally with a password, optionally TLS only) or a Redis Cluster of
//! primaries. Plus a tiny RESP client ([`RedisServer::command`], over TLS too) so tests can look
//! at what was stored.
//!
//! Needs `redis-server` and `redis-cli` (`apt-get install redis-server`; Debian's is built with
//! TLS); without them every start fails saying so: a cluster test must not pass by skipping.

pub use crate::certs::{write_test_certs, TestCerts};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING, and a cluster to say `cluster_state:ok`.
const READY_WAIT: Duration = Duration::from_secs(15);

/// A reply to [`RedisServer::command`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other simple strings.
    Status(String),
    /// `-ERR …`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// A bulk string (lossy UTF-8).
    Bulk(String),
    /// A nil bulk or nil array.
    Nil,
    /// An array.
    Array(Vec<Reply>),
}

impl Reply {
    /// The text of a bulk or status reply.
    pub fn text(&self) -> Option<&str> {
        match self {
            Reply::Bulk(s) | Reply::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// One running `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    /// The process; `None` while killed.
    child: Option<Child>,
    /// Its loopback port (kept across [`RedisServer::kill`] and [`RedisServer::restart`]).
    pub port: u16,
    /// `requirepass`, if any.
    password: Option<String>,
    /// Arguments beyond the common ones (cluster mode).
    extra: Vec<String>,
    /// TLS only (`--port 0`, TLS on `port`) with these certificates; `None`: plain TCP.
    tls: Option<TestCerts>,
    /// Working folder (cluster config, log); removed on drop when this server made it.
    dir: PathBuf,
    /// This server created `dir` (a cluster's servers share the cluster's).
    owns_dir: bool,
}

fn temp_dir(what: &str) -> Result<PathBuf, String> {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("fleetgate-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Fails with the install hint when `redis-server` is missing.
fn check_installed() -> Result<(), String> {
    match Command::new("redis-server").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "redis-server is not available ({e}): the cluster tests need a real Redis; apt-get install redis-server"
        )),
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A port `p` with `p` and `p + 10000` (the cluster bus) both free, below the ephemeral range.
fn free_cluster_port() -> Result<u16, String> {
    let mut h = RandomState::new().build_hasher();
    for i in 0..200u64 {
        h.write_u64(i);
        let p = 20_000 + (h.finish() % 10_000) as u16;
        let both = TcpListener::bind(("127.0.0.1", p))
            .and_then(|a| TcpListener::bind(("127.0.0.1", p + 10_000)).map(|b| (a, b)));
        if both.is_ok() {
            return Ok(p);
        }
    }
    Err("no free port pair for a cluster node".into())
}

impl RedisServer {
    /// A server on a free port, no password, nothing persisted.
    pub fn start() -> Result<RedisServer, String> {
        RedisServer::start_on(free_port()?, None)
    }

    /// A server on a free port that requires `password`.
    pub fn start_with_password(password: &str) -> Result<RedisServer, String> {
        RedisServer::start_on(free_port()?, Some(password))
    }

    /// A server on `port` (e.g. one a client already points at).
    pub fn start_on(port: u16, password: Option<&str>) -> Result<RedisServer, String> {
        check_installed()?;
        let mut s = RedisServer {
            child: None,
            port,
            password: password.map(str::to_string),
            extra: Vec::new(),
            tls: None,
            dir: temp_dir("redis")?,
            owns_dir: true,
        };
        s.restart()?;
        Ok(s)
    }

    /// A server on a free port speaking TLS only (no plain port), optionally requiring
    /// `password`, with a fresh test CA and a certificate for 127.0.0.1 it signed
    /// ([`write_test_certs`], in the server's folder: [`RedisServer::tls_ca`] is the CA file
    /// for clients). Clients need no certificate of their own (`--tls-auth-clients no`).
    pub fn start_tls(password: Option<&str>) -> Result<RedisServer, String> {
        check_installed()?;
        let dir = temp_dir("redis-tls")?;
        let certs = write_test_certs(&dir.join("tls"))?;
        let mut s = RedisServer {
            child: None,
            port: free_port()?,
            password: password.map(str::to_string),
            extra: Vec::new(),
            tls: Some(certs),
            dir,
            owns_dir: true,
        };
        s.restart()?;
        Ok(s)
    }

    /// `redis://[:password@]127.0.0.1:port`, `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// The CA file a client of a TLS server must trust (`None` for a plain server).
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls.as_ref().map(|c| c.ca.as_path())
    }

    /// The process id, while running (to stop and continue it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("redis-{}.log", self.port))
    }

    /// Kills the process (SIGKILL) and waits for it; the port stays this server's.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process (again) on the same port, empty, and waits until it answers PING.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let log = self.log_path();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            // Port 0 closes the plain port: a client that skips TLS finds nothing to talk to.
            Some(certs) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&certs.cert)
                .arg("--tls-key-file")
                .arg(&certs.key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca)
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--daemonize", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.spawn().map_err(|e| format!("redis-server: {e}; apt-get install redis-server"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_WAIT;
        loop {
            match self.command(&["PING"]) {
                Ok(Reply::Status(s)) if s == "PONG" => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "redis-server on {} did not answer PING; log:\n{}",
                        self.port,
                        self.log_tail()
                    ));
                }
                _ => {}
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "redis-server on {} exited ({status}); log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Sends one command (authenticating first when there is a password) and reads the reply;
    /// over TLS, trusting the server's test CA, for a TLS server.
    pub fn command(&self, args: &[&str]) -> Result<Reply, String> {
        let s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        match &self.tls {
            None => self.exchange(&mut BufReader::new(s), args),
            Some(certs) => {
                let conn = rustls::ClientConnection::new(tls_client(&certs.ca)?, localhost_ip())
                    .map_err(|e| format!("TLS: {e}"))?;
                self.exchange(&mut BufReader::new(rustls::StreamOwned::new(conn, s)), args)
            }
        }
    }

    /// AUTH when there is a password, then `args`, over `stream`: one request, then its whole
    /// reply, so the reader's buffer is empty whenever the next request is written.
    fn exchange<S: Read + Write>(&self, stream: &mut BufReader<S>, args: &[&str]) -> Result<Reply, String> {
        if let Some(p) = &self.password {
            write_command(stream.get_mut(), &["AUTH", p])?;
            if let Reply::Error(e) = read_reply(stream)? {
                return Err(format!("AUTH: {e}"));
            }
        }
        write_command(stream.get_mut(), args)?;
        read_reply(stream)
    }
}

/// The name a TLS server's certificate is checked against: the address connected to.
fn localhost_ip() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// A rustls client (ring provider) trusting only the CA in the PEM file `ca`.
fn tls_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn write_command(s: &mut impl Write, args: &[&str]) -> Result<(), String> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    s.write_all(&out).and_then(|()| s.flush()).map_err(|e| format!("write: {e}"))
}

fn read_reply(r: &mut impl BufRead) -> Result<Reply, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).ok_or("connection closed")?;
    let int = |s: &str| s.parse::<i64>().map_err(|_| format!("bad length {s:?}"));
    Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(int(rest)?),
        "$" => match int(rest)? {
            n if n < 0 => Reply::Nil,
            n => {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
                buf.truncate(n as usize);
                Reply::Bulk(String::from_utf8_lossy(&buf).into_owned())
            }
        },
        "*" => match int(rest)? {
            n if n < 0 => Reply::Nil,
            n => Reply::Array((0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?),
        },
        _ => return Err(format!("unexpected reply line {line:?}")),
    })
}

/// A Redis Cluster of primaries only, every slot covered, on free loopback ports.
#[derive(Debug)]
pub struct RedisCluster {
    /// The primaries (dropped before `dir`'s removal).
    pub nodes: Vec<RedisServer>,
    /// Shared working folder (one `nodes-<port>.conf` per node).
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts `primaries` servers in cluster mode, joins them with `redis-cli --cluster create`,
    /// and waits until every node reports `cluster_state:ok`.
    pub fn start(primaries: usize) -> Result<RedisCluster, String> {
        check_installed()?;
        let dir = temp_dir("redis-cluster")?;
        let mut cluster = RedisCluster { nodes: Vec::new(), dir: dir.clone() };
        for _ in 0..primaries {
            let port = free_cluster_port()?;
            let mut s = RedisServer {
                child: None,
                port,
                password: None,
                tls: None,
                extra: vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    format!("nodes-{port}.conf"),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                ],
                dir: dir.clone(),
                owns_dir: false,
            };
            s.restart()?;
            cluster.nodes.push(s);
        }
        let addrs: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli: {e}; apt-get install redis-server"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let deadline = Instant::now() + READY_WAIT;
        while !cluster.nodes.iter().all(|n| {
            matches!(n.command(&["CLUSTER", "INFO"]), Ok(Reply::Bulk(info)) if info.contains("cluster_state:ok"))
        }) {
            if Instant::now() > deadline {
                return Err("the cluster did not reach cluster_state:ok".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cluster)
    }

    /// `redis://127.0.0.1:<first node's port>`: any node will do, the client finds the rest.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Sends a command to the first node, and again to the node a `MOVED` answer names.
    pub fn routed_command(&self, args: &[&str]) -> Result<Reply, String> {
        let first = self.nodes[0].command(args)?;
        if let Reply::Error(e) = &first {
            if let Some(addr) = e.strip_prefix("MOVED ").and_then(|r| r.split_whitespace().nth(1)) {
                let port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).ok_or("bad MOVED")?;
                let node = self.nodes.iter().find(|n| n.port == port).ok_or("MOVED to an unknown node")?;
                return node.command(args);
            }
        }
        Ok(first)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_replies_parse() {
        let mut input: &[u8] = b"*4\r\n+OK\r\n:-3\r\n$5\r\nhe\r\no\r\n*2\r\n$-1\r\n-ERR no\r\n";
        let want = Reply::Array(vec![
            Reply::Status("OK".into()),
            Reply::Int(-3),
            Reply::Bulk("he\r\no".into()),
            Reply::Array(vec![Reply::Nil, Reply::Error("ERR no".into())]),
        ]);
        assert_eq!(read_reply(&mut input).unwrap(), want);
        assert!(read_reply(&mut &b""[..]).is_err(), "a closed connection is an error");
        assert!(read_reply(&mut &b"?x\r\n"[..]).is_err());
    }

    #[test]
    fn a_tls_server_speaks_tls_only_and_its_certificate_names_127_0_0_1() {
        let s = RedisServer::start_tls(Some("pw")).unwrap();
        assert_eq!(s.url(), format!("rediss://:pw@127.0.0.1:{}", s.port));
        assert_eq!(s.command(&["PING"]).unwrap(), Reply::Status("PONG".into()));
        // Plain RESP on the port gets no answer: the server waits for a TLS hello, then closes.
        let mut plain = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        plain.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write_command(&mut plain, &["PING"]).unwrap();
        let mut buf = [0u8; 64];
        let n = plain.read(&mut buf).unwrap_or(0);
        assert!(!buf[..n].starts_with(b"+PONG"), "a plain PING was answered");
        // Another test CA's client is refused (the tiny client checks the server too).
        let dir = temp_dir("tls-other-ca").unwrap();
        let other = write_test_certs(&dir).unwrap();
        let conn = rustls::ClientConnection::new(tls_client(&other.ca).unwrap(), localhost_ip()).unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
        let refused = write_command(tls.get_mut(), &["PING"]).and_then(|()| read_reply(&mut tls));
        assert!(refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")), "{refused:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
