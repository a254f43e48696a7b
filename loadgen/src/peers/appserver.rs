//! The app-server's side against a peer, on blocking sockets and threads of its own (like the
//! gate's app-server in [`crate::appserver`]): one subscriber to every driver's GPS that counts
//! points, and for push scenarios one publisher that pushes to random drivers at the plan's
//! rate, one publish per driver topic, all of a push pipelined in one write. With TLS
//! (`--tls-ca`) both connections speak it as the drivers do (see [`super::tls`]).

use super::tls::{Tls, TlsClient};
use super::wire::PeerConn;
use super::{mqtt, nats, Proto, KEEPALIVE};
use rand::{Rng, SeedableRng};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Connect, handshake and write timeout.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits before the reader looks at its stop flag and keepalive.
const READ_TICK: Duration = Duration::from_millis(200);
/// Read buffer: NATS messages may be up to 1 MiB (see [`nats::MAX_PAYLOAD`]), plus the line.
const READ_BUF: usize = nats::MAX_PAYLOAD + nats::MAX_CONTROL_LINE + 2;
/// Longest a push buffer may grow (10,000 publishes of a 16 KiB payload would be 160 MiB): past
/// it a push is written in parts.
const MAX_WRITE: usize = 4 << 20;

/// What the app-server does.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server.
    pub addr: SocketAddr,
    /// Its protocol.
    pub proto: Proto,
    /// Pushes per second (0: none).
    pub push_rate: f64,
    /// Drivers each push names.
    pub fanout: u32,
    /// Payload bytes of each publish of a push.
    pub payload_bytes: usize,
    /// The driver uids pushes pick from: `first..first+count`.
    pub drivers: (u64, u32),
    /// TLS for both connections (`--tls-ca`), or none.
    pub tls: Option<TlsClient>,
}

/// Counters, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// GPS points received.
    pub gps_points: AtomicU64,
    /// Pushes made.
    pub pushes: AtomicU64,
    /// Publishes made for them (pairs of push and driver).
    pub pairs: AtomicU64,
    /// Pushes that could not be written.
    pub push_failed: AtomicU64,
    /// Connections that ended before the run did.
    pub connections_lost: AtomicU64,
}

/// State the threads share.
#[derive(Debug, Default)]
struct Shared {
    counters: Counters,
    start_pushing: AtomicBool,
    stop_pushing: AtomicBool,
    stop: AtomicBool,
}

/// What the app-server side found, at the end.
#[derive(Debug, Clone, Default)]
pub struct PeerOutcome {
    /// GPS points received.
    pub gps_points: u64,
    /// Pushes made.
    pub pushes: u64,
    /// Publishes made for them.
    pub pairs: u64,
    /// Pushes that could not be written.
    pub push_failed: u64,
    /// Connections that ended early.
    pub connections_lost: u64,
}

/// A running app-server.
pub struct PeerAppServer {
    shared: Arc<Shared>,
    subscriber: Option<JoinHandle<()>>,
    pusher: Option<JoinHandle<()>>,
}

/// A blocking connection and its protocol state.
struct Link {
    stream: TcpStream,
    peer: PeerConn,
    /// Plaintext read and not yet used (an incomplete packet), in `buf[..filled]`.
    buf: Vec<u8>,
    filled: usize,
    /// Plaintext to send.
    out: Vec<u8>,
    /// With TLS: the connection's TLS, ciphertext just read, and records to send.
    tls: Option<TlsLink>,
}

/// The TLS side of a [`Link`].
struct TlsLink {
    tls: Tls,
    /// Ciphertext of one read.
    read: Vec<u8>,
    /// Plaintext decrypted from it.
    plain: Vec<u8>,
    /// Records to send.
    wire: Vec<u8>,
}

/// A TLS failure as an I/O error that says so.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl Link {
    /// Connects and completes the handshake (TLS first, with `tls`; subscribing to
    /// `subscribe`).
    fn open(
        addr: SocketAddr,
        proto: Proto,
        name: String,
        subscribe: Option<Vec<u8>>,
        tls: Option<&TlsClient>,
    ) -> io::Result<Link> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_TICK))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let tls = match tls {
            None => None,
            Some(client) => {
                let mut wire = Vec::new();
                let tls = client.start(&mut wire).map_err(tls_error)?;
                Some(TlsLink { tls, read: vec![0; 16 * 1024], plain: Vec::new(), wire })
            }
        };
        let mut link = Link {
            stream,
            peer: PeerConn::new(proto, name, subscribe),
            buf: vec![0; READ_BUF],
            filled: 0,
            out: Vec::new(),
            tls,
        };
        link.peer.start(&mut link.out);
        link.flush()?;
        let deadline = Instant::now() + TIMEOUT;
        while !link.peer.ready() {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer to the handshake"));
            }
            link.pump(false, |_, _| {})?;
        }
        Ok(link)
    }

    /// Sends `out` (with TLS: encrypted, with whatever TLS itself has to send).
    fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let r = self.send(&out);
        self.out = out;
        self.out.clear();
        r
    }

    /// Sends `bytes` of the protocol (with TLS: encrypted).
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(t) = &mut self.tls else {
            return if bytes.is_empty() { Ok(()) } else { self.stream.write_all(bytes) };
        };
        t.tls.write(bytes, &mut t.wire);
        let r = if t.wire.is_empty() { Ok(()) } else { self.stream.write_all(&t.wire) };
        t.wire.clear();
        r
    }

    /// One read (waiting at most `READ_TICK`, or not at all if `nonblocking`), every whole
    /// packet handled, answers written.
    fn pump(&mut self, nonblocking: bool, on_msg: impl FnMut(&[u8], &[u8])) -> io::Result<()> {
        let Some(t) = &mut self.tls else {
            let n = Self::recv(&self.stream, &mut self.buf[self.filled..], nonblocking)?;
            return self.take(n, on_msg);
        };
        let n = Self::recv(&self.stream, &mut t.read, nonblocking)?;
        if n == 0 {
            return Ok(());
        }
        t.plain.clear();
        let r = t.tls.read(&t.read[..n], &mut t.plain, &mut t.wire);
        if !t.wire.is_empty() {
            // The handshake's next flight, or the alert that tells the server why (best
            // effort: the TLS failure is the error to report).
            let w = self.stream.write_all(&t.wire);
            t.wire.clear();
            if r.is_ok() {
                w?;
            }
        }
        r.map_err(tls_error)?;
        let n = t.plain.len();
        let free = &mut self.buf[self.filled..];
        if n > free.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "packet larger than the read buffer"));
        }
        free[..n].copy_from_slice(&t.plain);
        self.take(n, on_msg)
    }

    /// One read from the socket into `free`: the bytes read, 0 if none came in time (or at
    /// once, if `nonblocking`); the end of the stream is an error.
    fn recv(stream: &TcpStream, free: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        let n = if nonblocking {
            // SAFETY: `free` is valid for writes of its length; the fd is this link's socket.
            let n = unsafe {
                libc::recv(stream.as_raw_fd(), free.as_mut_ptr().cast(), free.len(), libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                    _ => Err(e),
                };
            }
            n as usize
        } else {
            match (&*stream).read(free) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    return Ok(0)
                }
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
        }
        Ok(n)
    }

    /// `n` more plaintext bytes are in `buf[filled..]`: handles every whole packet, keeps the
    /// rest, writes the answers.
    fn take(&mut self, n: usize, mut on_msg: impl FnMut(&[u8], &[u8])) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.filled += n;
        let used = self
            .peer
            .feed(&self.buf[..self.filled], &mut self.out, &mut on_msg)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.buf.copy_within(used..self.filled, 0);
        self.filled -= used;
        // The parsers bound a packet below the buffer's size, so a full buffer cannot happen;
        // if it did, nothing more could ever be read.
        if self.filled == self.buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "packet larger than the read buffer"));
        }
        self.flush()
    }
}

impl Drop for Link {
    /// Says goodbye where the protocol has one (MQTT DISCONNECT; with TLS, close_notify), best
    /// effort and without waiting for a full socket, so the broker sees a clean end.
    fn drop(&mut self) {
        let _ = self.stream.set_nonblocking(true);
        self.out.clear();
        self.peer.goodbye(&mut self.out);
        let _ = self.flush();
        if let Some(t) = &mut self.tls {
            t.tls.close(&mut t.wire);
            let _ = self.stream.write_all(&t.wire);
        }
    }
}

impl PeerAppServer {
    /// Connects the subscriber (and the publisher, for pushes) and starts their threads. The
    /// subscription is in place when this returns, so GPS from the first driver on is counted.
    pub fn start(cfg: Config) -> io::Result<PeerAppServer> {
        let shared = Arc::new(Shared::default());
        let pid = std::process::id();
        let sub = Link::open(
            cfg.addr,
            cfg.proto,
            format!("fg-appserver-sub-{pid}"),
            Some(cfg.proto.gps_filter().to_vec()),
            cfg.tls.as_ref(),
        )?;
        let subscriber = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("peer-subscriber".into())
                .spawn(move || subscriber_loop(sub, &shared))?
        };
        let pusher = if cfg.push_rate > 0.0 && cfg.fanout > 0 {
            let link =
                Link::open(cfg.addr, cfg.proto, format!("fg-appserver-pub-{pid}"), None, cfg.tls.as_ref())?;
            let shared = shared.clone();
            Some(
                thread::Builder::new()
                    .name("peer-pusher".into())
                    .spawn(move || pusher_loop(link, &shared, &cfg))?,
            )
        } else {
            None
        };
        Ok(PeerAppServer { shared, subscriber: Some(subscriber), pusher })
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Lets the pusher begin (the measured window began).
    pub fn start_pushing(&self) {
        self.shared.start_pushing.store(true, Relaxed);
    }

    /// Stops the pusher and waits for it.
    pub fn stop_pushing(&mut self) {
        self.shared.stop_pushing.store(true, Relaxed);
        if let Some(p) = self.pusher.take() {
            let _ = p.join();
        }
    }

    /// Stops everything and returns the figures.
    pub fn finish(mut self) -> PeerOutcome {
        self.stop_pushing();
        self.shared.stop.store(true, Relaxed);
        if let Some(s) = self.subscriber.take() {
            let _ = s.join();
        }
        let c = &self.shared.counters;
        PeerOutcome {
            gps_points: c.gps_points.load(Relaxed),
            pushes: c.pushes.load(Relaxed),
            pairs: c.pairs.load(Relaxed),
            push_failed: c.push_failed.load(Relaxed),
            connections_lost: c.connections_lost.load(Relaxed),
        }
    }
}

impl Drop for PeerAppServer {
    fn drop(&mut self) {
        self.shared.stop_pushing.store(true, Relaxed);
        self.shared.stop.store(true, Relaxed);
    }
}

/// Reads GPS until told to stop, pinging every `KEEPALIVE`.
fn subscriber_loop(mut link: Link, shared: &Shared) {
    let mut last_ping = Instant::now();
    while !shared.stop.load(Relaxed) {
        let mut points = 0u64;
        let r = link.pump(false, |topic, payload| {
            if super::is_gps(topic) {
                points += super::points_in(payload.len());
            }
        });
        shared.counters.gps_points.fetch_add(points, Relaxed);
        if r.is_ok() && last_ping.elapsed() >= KEEPALIVE {
            last_ping = Instant::now();
            link.peer.ping(&mut link.out);
            if link.flush().is_ok() {
                continue;
            }
        }
        if let Err(e) = r {
            eprintln!("loadgen: the app-server's subscriber lost its connection: {e}");
            shared.counters.connections_lost.fetch_add(1, Relaxed);
            return;
        }
    }
}

/// Pushes at the plan's rate to `fanout` random drivers until told to stop.
fn pusher_loop(mut link: Link, shared: &Shared, cfg: &Config) {
    let c = &shared.counters;
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let interval = Duration::from_secs_f64(1.0 / cfg.push_rate);
    let (first, drivers) = cfg.drivers;
    let fanout = (cfg.fanout.min(drivers)) as usize;
    let topics: Vec<Vec<u8>> = (0..u64::from(drivers)).map(|i| cfg.proto.push_topic(first + i)).collect();
    let mut message_id = crate::appserver::now_us();
    let mut payload = Vec::with_capacity(cfg.payload_bytes.max(super::PUSH_HEADER));
    let mut buf = Vec::new();
    while !shared.start_pushing.load(Relaxed) {
        if shared.stop_pushing.load(Relaxed) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut next = Instant::now();
    while !shared.stop_pushing.load(Relaxed) {
        message_id += 1;
        payload.clear();
        super::push_payload(&mut payload, message_id, crate::appserver::now_us(), cfg.payload_bytes);
        let picked = rand::seq::index::sample(&mut rng, drivers as usize, fanout);
        let mut written = Ok(());
        for i in picked {
            match cfg.proto {
                Proto::Mqtt => mqtt::publish(&mut buf, &topics[i], &payload),
                Proto::Nats => nats::publish(&mut buf, &topics[i], &payload),
                Proto::Ceiling => {}
            }
            if buf.len() >= MAX_WRITE {
                written = written.and_then(|_| link.send(&buf));
                buf.clear();
            }
        }
        written = written.and_then(|_| link.send(&buf));
        buf.clear();
        // Answer whatever the server sent meanwhile (NATS pings) without waiting.
        let r = written.and_then(|_| link.pump(true, |_, _| {}));
        if let Err(e) = r {
            eprintln!("loadgen: the app-server's publisher lost its connection: {e}");
            c.push_failed.fetch_add(1, Relaxed);
            c.connections_lost.fetch_add(1, Relaxed);
            return;
        }
        c.pushes.fetch_add(1, Relaxed);
        c.pairs.fetch_add(fanout as u64, Relaxed);
        // Pushes keep their rate on average; jitter spreads them like real dispatch.
        next += interval.mul_f64(rng.random_range(0.8..1.2));
        let now = Instant::now();
        if next > now {
            while Instant::now() < next && !shared.stop_pushing.load(Relaxed) {
                thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
            }
        } else if now - next > Duration::from_secs(1) {
            next = now;
        }
    }
}
