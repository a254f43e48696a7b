//! The ceiling server: the least CPU any gateway could spend per received TCP segment on this
//! machine, so the gate's cost per GPS point has a floor to be compared against.
//!
//! One thread, one io_uring: a multishot accept on the listener, and per connection one
//! multishot receive that picks its buffers from a provided-buffer ring. Bytes are counted and
//! discarded, and each buffer goes back to the ring as soon as it is counted. Anything a real
//! gateway would do on top of this (decoding, routing, writing) costs more, which is the point.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gate::uring::BufRing;
use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, SubmissionQueue, Submitter};

/// The kernel refuses provided-buffer rings larger than this.
pub const MAX_BUFFERS: u32 = 32_768;
/// A receive never needs more than a large TCP burst; bigger buffers only waste memory.
pub const MAX_BUFFER_SIZE: u32 = 1 << 20;
/// Bound on the memory the buffer ring may pin, whatever the flags say.
const MAX_BUFFER_BYTES: u64 = 1 << 30;
/// Descriptors kept free beside the connections: listener, ring, signal pipe, std streams, and
/// the one a refused connection holds between its accept and its close.
const FD_HEADROOM: u64 = 16;
/// Submission queue entries; a burst of accepts beyond this is flushed with an extra submit.
const SQ_ENTRIES: u32 = 1024;
/// Completion queue entries; multishot receives on thousands of sockets post many CQEs per
/// wake-up, and a larger queue keeps them off the kernel's slower overflow list.
const CQ_ENTRIES: u32 = 16_384;
/// Listen backlog: the default (128, or glommio's 1024) overflows in a reconnect storm;
/// somaxconn here is 4096.
const LISTEN_BACKLOG: i32 = 4096;
/// How often the stats file is rewritten while running.
const STATS_PERIOD: Duration = Duration::from_secs(1);
/// Pause before re-arming an accept that ended in an error, so a persistent error (say, out of
/// descriptors) cannot turn the loop into a busy spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
const BUF_GROUP: u16 = 0;

// CQE tags. A receive is tagged with its socket's fd (non-negative i32, below 2^31), so these
// can never collide with one.
const ACCEPT_TAG: u64 = 1 << 62;
const WAKE_TAG: u64 = 2 << 62;

/// What the ceiling server is told to do; see the `ceiling` binary for each flag.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub ports_file: Option<PathBuf>,
    pub core: Option<usize>,
    pub buffers: u32,
    pub buffer_size: u32,
    pub stats_file: Option<PathBuf>,
    pub duration: Option<Duration>,
    pub max_conns: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ports_file: None,
            core: None,
            buffers: 4096,
            buffer_size: 2048,
            stats_file: None,
            duration: None,
            max_conns: 19_000,
        }
    }
}

/// Counters of what was received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes received and discarded.
    pub bytes: u64,
    /// Receive completions that carried data.
    pub recvs: u64,
    /// Connections accepted and served (refused ones excluded).
    pub conns: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections closed at once because `max_conns` were open.
    pub refused: u64,
}

impl Stats {
    /// One JSON object; `cpu_s` is this process's user + system CPU time in seconds.
    pub fn to_json(&self, cpu_s: f64) -> String {
        format!(
            "{{\"bytes\":{},\"recvs\":{},\"conns\":{},\"cpu_s\":{:.6},\"open\":{},\"refused\":{}}}",
            self.bytes, self.recvs, self.conns, cpu_s, self.open, self.refused
        )
    }
}

/// A failure that stops the server, with what it was doing at the time.
#[derive(Debug)]
pub struct Error {
    context: String,
    source: Option<io::Error>,
}

impl Error {
    fn config(context: impl Into<String>) -> Self {
        Error { context: context.into(), source: None }
    }

    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error { context: context.into(), source: Some(source) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// This process's user + system CPU time so far, in seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out pointer cannot fail.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs the server until SIGTERM or SIGINT (or `duration`), then writes the stats file one last
/// time and returns the final counters.
pub fn run(config: &Config) -> Result<Stats, Error> {
    validate(config)?;
    if let Some(core) = config.core {
        pin_to_core(core).map_err(|e| Error::io(format!("cannot pin to core {core}"), e))?;
    }
    let max_conns = effective_max_conns(config.max_conns);

    // Signals set the flag and write a byte to a socket pair; a read of that socket sits in the
    // ring, so the signal becomes a completion and the blocking wait returns at once.
    // signal-hook installs its handlers with SA_RESTART, so the wait would otherwise be restarted
    // rather than interrupted, and a periodic timeout would cost wake-ups while idle.
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_rx, wake_tx) = UnixStream::pair().map_err(|e| Error::io("cannot create signal pipe", e))?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|e| Error::io("cannot register signal flag", e))?;
        let tx = wake_tx.try_clone().map_err(|e| Error::io("cannot clone signal pipe", e))?;
        signal_hook::low_level::pipe::register(signal, tx)
            .map_err(|e| Error::io("cannot register signal pipe", e))?;
    }

    let listener =
        listen(config.listen).map_err(|e| Error::io(format!("cannot listen on {}", config.listen), e))?;
    let local = listener.local_addr().map_err(|e| Error::io("cannot read listen address", e))?;
    let local = local.as_socket().ok_or_else(|| Error::config("listener has no IP address"))?;

    // Drop order matters: locals drop in reverse, so the ring (declared last) is torn down before
    // the buffers and the wake buffer it may still point into.
    let mut wake_buf = Box::new([0u8; 64]);
    let mut bufs = BufRing::new(config.buffers, config.buffer_size)
        .map_err(|e| Error::io("cannot allocate receive buffers", e))?;
    let (mut ring, mode) = build_ring().map_err(|e| {
        Error::io("io_uring setup failed (multishot accept/recv and buffer rings need Linux >= 5.19)", e)
    })?;
    // SAFETY: `ring` is dropped before `bufs` (see the drop order above).
    unsafe { bufs.register(&ring, BUF_GROUP) }.map_err(|e| {
        Error::io(
            "cannot register the provided-buffer ring (IORING_REGISTER_PBUF_RING needs Linux >= 5.19)",
            e,
        )
    })?;

    if let Some(path) = &config.ports_file {
        write_atomically(path, &format!("app={}\n", local.port()))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
    }
    eprintln!(
        "ceiling: listening on {local} ({mode}; {} buffers of {} B; max {max_conns} connections)",
        config.buffers, config.buffer_size
    );

    let started = Instant::now();
    let end = config.duration.map(|d| started + d);
    let mut next_stats = config.stats_file.as_ref().map(|_| started + STATS_PERIOD);
    let mut state = State { stats: Stats::default(), max_conns, accept_failed: false };
    let listen_fd = listener.as_raw_fd();
    let accept =
        opcode::AcceptMulti::new(Fd(listen_fd)).flags(libc::SOCK_CLOEXEC).build().user_data(ACCEPT_TAG);
    let wake = opcode::Read::new(Fd(wake_rx.as_raw_fd()), wake_buf.as_mut_ptr(), wake_buf.len() as u32)
        .build()
        .user_data(WAKE_TAG);

    {
        let (submitter, mut sq, mut cq) = ring.split();
        push(&mut sq, &submitter, &accept).map_err(|e| Error::io("cannot queue accept", e))?;
        push(&mut sq, &submitter, &wake).map_err(|e| Error::io("cannot queue signal read", e))?;
        let mut accept_rearm_at: Option<Instant> = None;

        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Clock reads only when something is scheduled: the bare loop stays syscall + CQEs.
            let deadline = if end.is_some() || next_stats.is_some() || accept_rearm_at.is_some() {
                let now = Instant::now();
                if end.is_some_and(|t| now >= t) {
                    break;
                }
                if next_stats.is_some_and(|t| now >= t) {
                    write_stats(config.stats_file.as_deref(), &state.stats);
                    next_stats = Some(now + STATS_PERIOD);
                }
                if accept_rearm_at.is_some_and(|t| now >= t) {
                    accept_rearm_at = None;
                    push(&mut sq, &submitter, &accept).map_err(|e| Error::io("cannot queue accept", e))?;
                }
                [end, next_stats, accept_rearm_at].into_iter().flatten().min().map(|t| t - now)
            } else {
                None
            };

            sq.sync();
            let waited = match deadline {
                None => submitter.submit_and_wait(1),
                Some(left) => {
                    let ts = Timespec::from(left);
                    submitter.submit_with_args(1, &SubmitArgs::new().timespec(&ts))
                }
            };
            match waited {
                Ok(_) => {}
                // A timeout, a signal, or a full overflow list: all mean "look at the queue again".
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(Error::io("io_uring wait failed", e)),
            }

            // Bounded: one pass over what the completion queue held at this sync.
            cq.sync();
            for cqe in &mut cq {
                match cqe.user_data() {
                    ACCEPT_TAG => {
                        if !state.on_accept(&cqe, &mut sq, &submitter)? && !cqueue::more(cqe.flags()) {
                            // The multishot accept ended on an error; try again after a pause.
                            accept_rearm_at = Some(Instant::now() + ACCEPT_BACKOFF);
                        } else if !cqueue::more(cqe.flags()) {
                            push(&mut sq, &submitter, &accept)
                                .map_err(|e| Error::io("cannot queue accept", e))?;
                        }
                    }
                    WAKE_TAG => {
                        // Not a stop (say, a stray byte): keep listening for the next one.
                        if !stop.load(Ordering::Relaxed) {
                            push(&mut sq, &submitter, &wake)
                                .map_err(|e| Error::io("cannot queue signal read", e))?;
                        }
                    }
                    fd => state.on_recv(fd as RawFd, &cqe, &mut bufs, &mut sq, &submitter)?,
                }
            }
            cq.sync();
        }
    }

    write_stats(config.stats_file.as_deref(), &state.stats);
    drop(ring);
    drop(listener);
    Ok(state.stats)
}

struct State {
    stats: Stats,
    max_conns: u64,
    accept_failed: bool,
}

impl State {
    /// Handles one accept completion; false when it carried an error rather than a socket.
    fn on_accept(
        &mut self,
        cqe: &cqueue::Entry,
        sq: &mut SubmissionQueue<'_>,
        submitter: &Submitter<'_>,
    ) -> Result<bool, Error> {
        let res = cqe.result();
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if res == -libc::EINVAL {
                return Err(Error::io("multishot accept is not supported (needs Linux >= 5.19)", err));
            }
            if !self.accept_failed {
                eprintln!("ceiling: accept failed: {err}");
            }
            self.accept_failed = true;
            return Ok(false);
        }
        self.accept_failed = false;
        let fd = res;
        if self.stats.open >= self.max_conns {
            self.stats.refused += 1;
            close(fd);
            return Ok(true);
        }
        self.stats.open += 1;
        self.stats.conns += 1;
        push(sq, submitter, &recv_entry(fd)).map_err(|e| Error::io("cannot queue receive", e))?;
        Ok(true)
    }

    /// Handles one receive completion: count, hand the buffer straight back, re-arm or close.
    fn on_recv(
        &mut self,
        fd: RawFd,
        cqe: &cqueue::Entry,
        bufs: &mut BufRing,
        sq: &mut SubmissionQueue<'_>,
        submitter: &Submitter<'_>,
    ) -> Result<(), Error> {
        let res = cqe.result();
        let flags = cqe.flags();
        if let Some(bid) = cqueue::buffer_select(flags) {
            bufs.recycle(bid);
        }
        if res > 0 {
            self.stats.bytes += res as u64;
            self.stats.recvs += 1;
        }
        if cqueue::more(flags) {
            return Ok(());
        }
        // The multishot receive ended. With data, or for want of a buffer (the ring ran dry
        // between wake-ups, and has been refilled by now), the connection is fine: re-arm.
        if res > 0 || res == -libc::ENOBUFS {
            return push(sq, submitter, &recv_entry(fd)).map_err(|e| Error::io("cannot queue receive", e));
        }
        if res == -libc::EINVAL {
            return Err(Error::io(
                "multishot receive is not supported (needs Linux >= 5.19)",
                io::Error::from_raw_os_error(-res),
            ));
        }
        // End of stream or a connection error: nothing more is pending on this fd.
        close(fd);
        self.stats.open = self.stats.open.saturating_sub(1);
        Ok(())
    }
}

fn recv_entry(fd: RawFd) -> squeue::Entry {
    opcode::RecvMulti::new(Fd(fd), BUF_GROUP).build().user_data(fd as u64)
}

/// Queues one entry, flushing the submission queue to the kernel once if it is full.
fn push(sq: &mut SubmissionQueue<'_>, submitter: &Submitter<'_>, entry: &squeue::Entry) -> io::Result<()> {
    // SAFETY: the entries queued here point at nothing, or at the wake buffer, which outlives
    // the ring (see the drop order in `run`).
    if unsafe { sq.push(entry) }.is_ok() {
        return Ok(());
    }
    sq.sync();
    submitter.submit()?;
    sq.sync();
    // SAFETY: as above.
    unsafe { sq.push(entry) }.map_err(|_| io::Error::other("submission queue still full after a submit"))
}

/// Builds the ring, cheapest mode first: with DEFER_TASKRUN the kernel runs completion work
/// only when this thread enters to wait, batching it instead of interrupting the thread.
fn build_ring() -> io::Result<(IoUring, &'static str)> {
    let deferred = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(SQ_ENTRIES);
    match deferred {
        Ok(ring) => Ok((ring, "single issuer, deferred task work")),
        Err(_) => Ok((IoUring::builder().setup_cqsize(CQ_ENTRIES).build(SQ_ENTRIES)?, "default task work")),
    }
}

fn validate(config: &Config) -> Result<(), Error> {
    if !config.buffers.is_power_of_two() || config.buffers > MAX_BUFFERS {
        return Err(Error::config(format!(
            "--buffers must be a power of two from 1 to {MAX_BUFFERS}, not {}",
            config.buffers
        )));
    }
    if config.buffer_size == 0 || config.buffer_size > MAX_BUFFER_SIZE {
        return Err(Error::config(format!(
            "--buffer-size must be 1 to {MAX_BUFFER_SIZE} bytes, not {}",
            config.buffer_size
        )));
    }
    if u64::from(config.buffers) * u64::from(config.buffer_size) > MAX_BUFFER_BYTES {
        return Err(Error::config(format!(
            "--buffers × --buffer-size must stay within {MAX_BUFFER_BYTES} bytes"
        )));
    }
    if config.max_conns == 0 {
        return Err(Error::config("--max-conns must be at least 1"));
    }
    Ok(())
}

/// `max_conns`, lowered if the descriptor limit could not hold that many connections.
fn effective_max_conns(max_conns: u32) -> u64 {
    // SAFETY: getrlimit only writes the struct we hand it.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: RLIMIT_NOFILE with a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::from(max_conns);
    }
    let room = (limit.rlim_cur as u64).saturating_sub(FD_HEADROOM).max(1);
    if u64::from(max_conns) > room {
        eprintln!("ceiling: --max-conns {max_conns} lowered to {room} to fit the open-file limit");
        return room;
    }
    u64::from(max_conns)
}

fn pin_to_core(core: usize) -> io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "core number out of range"));
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` < CPU_SETSIZE was checked above, so the bit lies inside `set`.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is this thread, and `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn listen(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

fn close(fd: RawFd) {
    // SAFETY: `fd` is a socket this server accepted and nothing else refers to any more.
    unsafe { libc::close(fd) };
}

fn write_stats(path: Option<&Path>, stats: &Stats) {
    let Some(path) = path else { return };
    let json = stats.to_json(process_cpu_seconds()) + "\n";
    if let Err(e) = write_atomically(path, &json) {
        eprintln!("ceiling: cannot write {}: {e}", path.display());
    }
}

/// Writes beside the target and renames, so a reader never sees half a file.
fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(contents.as_bytes())?;
    drop(file);
    fs::rename(&tmp, path)
}
