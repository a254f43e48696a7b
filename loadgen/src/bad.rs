//! Peers that misbehave on purpose, so the gate's defences show under load (`loadgen bad`):
//!
//! - **slow readers** log in as drivers and then never read; the app-server pushes them large
//!   payloads, and the gate must close them as slow consumers (GoAway SlowConsumer) instead of
//!   queueing without bound. After `--slow-hold` a slow reader drains its socket to see what
//!   the gate did, then logs in again.
//! - **garbage senders** connect and send bytes that are not frames; the gate must answer
//!   BadMagic and close.
//! - **half-open connections** send half a frame header and then nothing; the gate's read (or
//!   login) timeout must close them.
//!
//! Each runs as a task in a loop until Stop, on glommio executors of their own pinned beside the
//! fleet's loops (they are few, and each is a plain sequence of connect, write, wait, read), and
//! counts what the gate did in [`BadStats`].

use crate::engine::net;
use crate::engine::stats::ExecStats;
use crate::engine::{Control, Phase};
use crate::plan::Plan;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use schema::wire::{self, ErrorCode, GoAwayReason};
use schema::{Body, Cmd, Decoded, FrameType, Frames, Limits};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receive buffer of slow readers, so the gate's queue toward them fills quickly.
const SLOW_RCVBUF: usize = 4096;
/// How long a bad peer waits for the gate's reaction before calling it missing.
const REACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a slow reader drains its socket after its hold.
const DRAIN_TIME: Duration = Duration::from_secs(3);
/// Most bytes a slow reader drains before it stops looking.
const DRAIN_MAX: usize = 64 << 20;
/// Pause between rounds of one bad peer.
const PAUSE: Duration = Duration::from_millis(200);
/// Longest a write (or the connect under it) may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an executor waits for its bad peers to end after Stop.
const STOP_PATIENCE: Duration = Duration::from_secs(15);

/// What the bad peers saw.
#[derive(Debug, Default)]
pub struct BadStats {
    /// Slow readers logged in.
    pub slow_logins: AtomicU64,
    /// Slow readers the gate closed (GoAway SlowConsumer or end of stream).
    pub slow_closed: AtomicU64,
    /// Of those, closed with GoAway SlowConsumer.
    pub slow_goaway: AtomicU64,
    /// Slow readers still open after their hold (the gate kept queueing or had room).
    pub slow_survived: AtomicU64,
    /// Garbage connections made.
    pub garbage_sent: AtomicU64,
    /// Garbage answered with Error BadMagic.
    pub garbage_refused: AtomicU64,
    /// Garbage connections the gate closed.
    pub garbage_closed: AtomicU64,
    /// Garbage connections still open after the reaction timeout.
    pub garbage_open: AtomicU64,
    /// Half-open connections made.
    pub half_open_sent: AtomicU64,
    /// Half-open connections the gate closed.
    pub half_open_closed: AtomicU64,
    /// Longest time the gate took to close one, ms.
    pub half_open_close_ms_max: AtomicU64,
    /// Half-open connections still open after the reaction timeout.
    pub half_open_stuck: AtomicU64,
    /// Bad peers that could not connect.
    pub connect_errors: AtomicU64,
}

/// `BadStats` as plain numbers, for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadSummary {
    /// Slow readers logged in.
    pub slow_logins: u64,
    /// Slow readers the gate closed.
    pub slow_closed: u64,
    /// Of those, with GoAway SlowConsumer.
    pub slow_goaway: u64,
    /// Slow readers still open after their hold.
    pub slow_survived: u64,
    /// Garbage connections made.
    pub garbage_sent: u64,
    /// Answered with BadMagic.
    pub garbage_refused: u64,
    /// Closed by the gate.
    pub garbage_closed: u64,
    /// Still open after the reaction timeout.
    pub garbage_open: u64,
    /// Half-open connections made.
    pub half_open_sent: u64,
    /// Closed by the gate.
    pub half_open_closed: u64,
    /// Longest time to close one, ms.
    pub half_open_close_ms_max: u64,
    /// Still open after the reaction timeout.
    pub half_open_stuck: u64,
    /// Could not connect.
    pub connect_errors: u64,
}

impl BadStats {
    /// The numbers now.
    pub fn summary(&self) -> BadSummary {
        let l = |a: &AtomicU64| a.load(Relaxed);
        BadSummary {
            slow_logins: l(&self.slow_logins),
            slow_closed: l(&self.slow_closed),
            slow_goaway: l(&self.slow_goaway),
            slow_survived: l(&self.slow_survived),
            garbage_sent: l(&self.garbage_sent),
            garbage_refused: l(&self.garbage_refused),
            garbage_closed: l(&self.garbage_closed),
            garbage_open: l(&self.garbage_open),
            half_open_sent: l(&self.half_open_sent),
            half_open_closed: l(&self.half_open_closed),
            half_open_close_ms_max: l(&self.half_open_close_ms_max),
            half_open_stuck: l(&self.half_open_stuck),
            connect_errors: l(&self.connect_errors),
        }
    }
}

/// What one executor's bad peers share.
pub struct Exec {
    /// Executor index.
    id: usize,
    /// The run.
    plan: Arc<Plan>,
    /// Orders from the main thread.
    control: Arc<Control>,
    /// Every core's numbers (this one's at `id`): bad peers count in its `tasks` gauge.
    all_stats: Arc<Vec<ExecStats>>,
    /// Garbage bytes.
    rng: RefCell<SmallRng>,
    /// What they saw.
    bad: Arc<BadStats>,
}

impl Exec {
    fn stats(&self) -> &ExecStats {
        &self.all_stats[self.id]
    }
}

/// The bad peers' executors, running.
pub struct Running {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Running {
    /// Waits for every executor (after `Phase::Stop`).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Starts one executor per plan core for the plan's bad peers (peer `k` on executor `k % n`);
/// `None` when the plan has none.
pub fn start(
    plan: &Arc<Plan>,
    control: &Arc<Control>,
    stats: &Arc<Vec<ExecStats>>,
    bad: &Arc<BadStats>,
) -> Result<Option<Running>, String> {
    let b = &plan.bad;
    if b.slow_readers + b.garbage + b.half_open == 0 {
        return Ok(None);
    }
    let mut handles = Vec::new();
    for (id, &cpu) in plan.cores.iter().enumerate() {
        let (plan, control, all_stats, bad) = (plan.clone(), control.clone(), stats.clone(), bad.clone());
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("loadgen-bad-{id}"))
            .spawn(move || async move {
                let ex = Rc::new(Exec {
                    id,
                    plan,
                    control,
                    all_stats,
                    rng: RefCell::new(SmallRng::from_os_rng()),
                    bad,
                });
                spawn(&ex);
                // Peers end after Stop; bounded in case one is stuck in a write.
                let mut stopped_at = None;
                loop {
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    if running(&ex) {
                        continue;
                    }
                    let t = *stopped_at.get_or_insert_with(Instant::now);
                    if ex.stats().g.tasks.load(Relaxed) <= 0 || t.elapsed() > STOP_PATIENCE {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start an executor on core {cpu}: {e}"))?;
        handles.push(h);
    }
    Ok(Some(Running { handles }))
}

/// Spawns this executor's share of the bad peers.
fn spawn(ex: &Rc<Exec>) {
    let n = ex.plan.cores.len() as u32;
    let mine = |count: u32| (0..count).filter(move |k| k % n == ex.id as u32);
    let g = &ex.stats().g;
    for k in mine(ex.plan.bad.slow_readers) {
        g.tasks.fetch_add(1, Relaxed);
        glommio::spawn_local(counted(ex.clone(), slow_reader(ex.clone(), k))).detach();
    }
    for _ in mine(ex.plan.bad.garbage) {
        g.tasks.fetch_add(1, Relaxed);
        glommio::spawn_local(counted(ex.clone(), garbage(ex.clone()))).detach();
    }
    for _ in mine(ex.plan.bad.half_open) {
        g.tasks.fetch_add(1, Relaxed);
        glommio::spawn_local(counted(ex.clone(), half_open(ex.clone()))).detach();
    }
}

async fn counted(ex: Rc<Exec>, f: impl std::future::Future<Output = ()>) {
    f.await;
    ex.stats().g.tasks.fetch_sub(1, Relaxed);
}

fn running(ex: &Exec) -> bool {
    ex.control.phase() < Phase::Stop
}

/// Sleeps `d`, waking early when the run stops; false if it stopped.
async fn pause(ex: &Exec, d: Duration) -> bool {
    let until = Instant::now() + d;
    while running(ex) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        glommio::timer::sleep(left.min(Duration::from_millis(200))).await;
    }
    false
}

/// Connects and writes `bytes` (the write waits for the connect); `None` (counted) if that
/// failed or took longer than [`WRITE_TIMEOUT`].
async fn open(ex: &Exec, bytes: &[u8], rcvbuf: Option<usize>) -> Option<TcpStream> {
    let source = ex.plan.source_ips.first().copied();
    let Ok(sock) = net::connect(ex.plan.gate(), source, rcvbuf) else {
        ex.bad.connect_errors.fetch_add(1, Relaxed);
        return None;
    };
    let mut stream = net::into_glommio(sock);
    let written = futures_lite::future::or(async { Some(stream.write_all(bytes).await) }, async {
        glommio::timer::sleep(WRITE_TIMEOUT).await;
        None
    })
    .await;
    if !matches!(written, Some(Ok(()))) {
        ex.bad.connect_errors.fetch_add(1, Relaxed);
        return None;
    }
    Some(stream)
}

/// What reading a connection until a deadline found.
#[derive(Default)]
struct Seen {
    /// The gate closed (end of stream or reset).
    closed: bool,
    /// Error codes received.
    errors: Vec<ErrorCode>,
    /// GoAway reasons received.
    go_aways: Vec<GoAwayReason>,
    /// A Session answer came.
    session: bool,
}

/// Reads and decodes until the stream ends, `stop_at_session` sees a Session, `max` bytes were
/// read, or `until` passes.
async fn read_until(
    ex: &Exec,
    stream: &mut TcpStream,
    until: Instant,
    max: usize,
    stop_at_session: bool,
) -> Seen {
    let mut seen = Seen::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut total = 0;
    while total < max {
        if Instant::now() >= until {
            break;
        }
        let r = futures_lite::future::or(async { Some(stream.read(&mut chunk).await) }, async {
            // Time out at `until`, or sooner when the run stops.
            let left = until.saturating_duration_since(Instant::now());
            pause(ex, left).await;
            None
        })
        .await;
        let n = match r {
            None => break,
            Some(Ok(0)) | Some(Err(_)) => {
                seen.closed = true;
                break;
            }
            Some(Ok(n)) => n,
        };
        total += n;
        buf.extend_from_slice(&chunk[..n]);
        let mut frames = Frames::new(&buf, Limits::APP);
        for item in frames.by_ref() {
            match item {
                Ok(Decoded::Frame(f)) => match f.body {
                    Body::Error(e) => seen.errors.push(e.code()),
                    Body::GoAway(g) => seen.go_aways.push(g.reason()),
                    Body::Session(_) => seen.session = true,
                    _ => {}
                },
                Ok(Decoded::Rejected { .. }) => {}
                Err(_) => {
                    seen.closed = true;
                    return seen;
                }
            }
        }
        let used = frames.consumed();
        buf.drain(..used);
        if stop_at_session && seen.session {
            break;
        }
    }
    seen
}

/// A driver that logs in and then leaves its socket unread.
async fn slow_reader(ex: Rc<Exec>, k: u32) {
    let uid = ex.plan.slow_reader_uid(k);
    while running(&ex) {
        let token = schema::token::issue(
            &ex.plan.token_secret,
            schema::token::Claims {
                uid,
                role: wire::Role::Driver.0,
                expires_ms: client::now_ms() + 3_600_000,
            },
        );
        let mut login = Vec::new();
        schema::Encoder::new().frame(&mut login, FrameType::Request, Cmd::Login, 1, uid, |b| {
            let token = b.create_vector(&token);
            wire::Login::create(b, &wire::LoginArgs { token: Some(token), device: None })
        });
        let Some(mut stream) = open(&ex, &login, Some(SLOW_RCVBUF)).await else {
            if !pause(&ex, Duration::from_secs(1)).await {
                return;
            }
            continue;
        };
        let seen = read_until(&ex, &mut stream, Instant::now() + REACTION_TIMEOUT, 1 << 20, true).await;
        if !seen.session {
            ex.bad.connect_errors.fetch_add(1, Relaxed);
            if !pause(&ex, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        ex.bad.slow_logins.fetch_add(1, Relaxed);
        if !pause(&ex, ex.plan.bad.slow_hold).await {
            // End the session rather than leave it held in the gate after the run; best effort,
            // the socket may be full.
            let mut logout = Vec::new();
            schema::Encoder::new().frame(&mut logout, FrameType::Request, Cmd::Logout, 2, uid, |b| {
                wire::Logout::create(b, &wire::LogoutArgs { reason: None })
            });
            let _ = net::send(stream.as_raw_fd(), &logout);
            return;
        }
        // Look at what the gate did meanwhile: a GoAway SlowConsumer, then the end of stream.
        let seen = read_until(&ex, &mut stream, Instant::now() + DRAIN_TIME, DRAIN_MAX, false).await;
        if seen.go_aways.contains(&GoAwayReason::SlowConsumer) {
            ex.bad.slow_goaway.fetch_add(1, Relaxed);
        }
        if seen.closed || !seen.go_aways.is_empty() {
            ex.bad.slow_closed.fetch_add(1, Relaxed);
        } else {
            ex.bad.slow_survived.fetch_add(1, Relaxed);
        }
        drop(stream);
        if !pause(&ex, PAUSE).await {
            return;
        }
    }
}

/// A peer that sends random bytes instead of frames.
async fn garbage(ex: Rc<Exec>) {
    while running(&ex) {
        let mut bytes = [0u8; 64];
        ex.rng.borrow_mut().fill(&mut bytes[..]);
        if bytes[0] == schema::MAGIC {
            bytes[0] = b'G';
        }
        ex.bad.garbage_sent.fetch_add(1, Relaxed);
        if let Some(mut stream) = open(&ex, &bytes, None).await {
            let seen = read_until(&ex, &mut stream, Instant::now() + REACTION_TIMEOUT, 1 << 16, false).await;
            if seen.errors.contains(&ErrorCode::BadMagic) {
                ex.bad.garbage_refused.fetch_add(1, Relaxed);
            }
            if seen.closed {
                ex.bad.garbage_closed.fetch_add(1, Relaxed);
            } else {
                ex.bad.garbage_open.fetch_add(1, Relaxed);
            }
        }
        if !pause(&ex, PAUSE).await {
            return;
        }
    }
}

/// A peer that sends the first bytes of a Login header and then nothing.
async fn half_open(ex: Rc<Exec>) {
    let mut login = Vec::new();
    schema::Encoder::new().frame(&mut login, FrameType::Request, Cmd::Login, 1, 1, |b| {
        wire::Login::create(b, &wire::LoginArgs { token: None, device: None })
    });
    while running(&ex) {
        ex.bad.half_open_sent.fetch_add(1, Relaxed);
        let t0 = Instant::now();
        if let Some(mut stream) = open(&ex, &login[..10], None).await {
            let seen = read_until(&ex, &mut stream, t0 + REACTION_TIMEOUT, 1 << 16, false).await;
            if seen.closed {
                ex.bad.half_open_closed.fetch_add(1, Relaxed);
                ex.bad.half_open_close_ms_max.fetch_max(t0.elapsed().as_millis() as u64, Relaxed);
            } else if running(&ex) {
                ex.bad.half_open_stuck.fetch_add(1, Relaxed);
            }
        }
        if !pause(&ex, PAUSE).await {
            return;
        }
    }
}
