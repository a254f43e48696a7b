//! One loop per loadgen core that owns every connection of that core: the simulated apps
//! against the gate ([`super::session`]) and the drivers against a peer
//! ([`crate::peers::fleet`]) alike. What a connection says is its [`Client`]'s business; the loop
//! only moves bytes and time:
//!
//! - **a slot per connection** in one `Vec`, indexed by the same number as its epoll token and
//!   its timing-wheel entries: no task, future, waker or timer per connection;
//! - **deadlines on one timing wheel** ([`Wheel`], 1 ms ticks): each slot has at most one entry
//!   that counts, for the earliest of its client's deadlines (GPS, keepalive, timeouts) and the
//!   loop's own (connect timeout, a write that waits too long, the wait before a reconnect);
//! - **readiness from epoll** (`mio`, edge-triggered): a socket is registered once, for reading
//!   and writing, when its connect starts, and never modified; a readable socket is read until
//!   a read comes back short;
//! - **writes at once**: what a callback wrote is sent with one non-blocking `send` before the
//!   next callback; only bytes the socket would not take are kept, per slot, bounded
//!   ([`MAX_BLOCKED`], [`WRITE_TIMEOUT`]), and sent when epoll says the socket is writable.
//!
//! One turn: wait in epoll until the next busy tick (at most [`CONTROL_TICK`]), handle what is
//! readable or writable, fire what is due on the wheel, then the main thread's orders (stop,
//! storms, random drops) and the ramp. Sends of one tick therefore leave together, about 1 ms
//! after their schedule at worst while the core keeps up; the client counts the ones that left
//! later than [`GPS_LATE`](super::driver::GPS_LATE).
//!
//! Measured here (15,000 connections × 3 GPS points/s against perf's ceiling; the send floor of
//! a bare sender, `perf/examples/send_floor.rs`, is about 10.5 µs per 64-byte segment on
//! loopback, since the receiver's softirq work runs in the sender's `send`): one `send` per
//! point cost the same as the same sends batched in one io_uring submission per tick, so the
//! plain system call is used.

use super::wheel::Wheel;
use super::{Control, Phase};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Most bytes one connection may have waiting for its socket; past it the connection is ended
/// (the server is not reading it).
pub const MAX_BLOCKED: usize = 256 * 1024;
/// Longest bytes may wait for a socket, and a connect may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the loop looks at the main thread's orders (phase, storms, drops) and the ramp.
pub const CONTROL_TICK: Duration = Duration::from_millis(10);
/// Most connections the ramp keeps opening at once (connecting, or connected with the session
/// or handshake not up yet). A server slower than the connect rate then sets the ramp's pace:
/// past its listen backlog the kernel drops SYNs, which come back only after 1, 3, 7 s, and a
/// handshake that waits out its timeout is retried, so the server does it twice (measured with
/// rumqttd at 5,000 connects/s: stalls of seconds and thousands of handshake timeouts).
/// Reconnects are not held back: a storm measures how fast everyone comes back.
pub const MAX_OPENING: usize = 512;
/// Most connects the ramp starts in one turn. A connect costs the sender the whole loopback
/// handshake (tens of µs); started by the thousand in one turn (after a stall, or when the
/// opening window frees up) they held the turn for hundreds of ms, and the GPS of drivers
/// already up went out late into the measured window.
const RAMP_PER_TURN: usize = 32;
/// Longest wait in epoll while connections are still being started.
const RAMP_TICK: Duration = Duration::from_millis(5);
/// Readiness events taken per wait; more stay in the kernel for the next turn.
const EVENTS: usize = 1024;
/// Reads of one socket per turn; a socket still full after them is read again next turn, so one
/// busy connection cannot hold the others' sends back.
const READS_PER_TURN: usize = 16;
/// The loop's read buffer, for clients that do not read into a buffer of their own.
const SCRATCH: usize = 16 * 1024;
/// Ticks of the wheel looked at for the next wake-up.
const LOOKAHEAD_TICKS: u64 = 16;

/// How a connection ended, as the loop saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The connect failed or took longer than [`WRITE_TIMEOUT`].
    ConnectFailed,
    /// The server closed or reset it (a read saw the end).
    Closed,
    /// A write failed, or bytes waited for the socket too long or were too many.
    WriteFailed,
    /// The client ended it (it said [`Flow::End`]).
    ByClient,
    /// The loop dropped it on purpose (random drops and storms).
    Dropped,
    /// The run stopped.
    Stop,
}

/// What a callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep the connection.
    Go,
    /// Close it: the client has said why (counted), and hears [`Ended::ByClient`].
    End,
}

/// One connection's protocol side, driven by the loop. Callbacks get the loop's shared state
/// (`Shared`: plan, counters, encoder, randomness, one per loop) and append what to send to
/// `out`, which the loop sends as soon as the callback returns.
pub trait Client {
    /// What every client of one loop shares.
    type Shared;

    /// Where to connect, and from which local address.
    fn addr(&self, sh: &Self::Shared) -> (SocketAddr, Option<IpAddr>);
    /// Receive buffer size to ask for before connecting, if any.
    fn rcvbuf(&self, _sh: &Self::Shared) -> Option<usize> {
        None
    }
    /// True to learn when each read's bytes arrived (the kernel's receive stamp, passed to
    /// [`Client::on_read`]): push runs split a delivery's latency at loadgen's socket.
    fn rx_stamps(&self, _sh: &Self::Shared) -> bool {
        false
    }
    /// The session (or handshake) is up on the current connection: storms and drops pick
    /// among these.
    fn live(&self) -> bool;
    /// A connect is starting (the first one: the app's life starts now).
    fn on_connecting(&mut self, _now: Instant) {}
    /// The TCP connection is up.
    fn on_connected(&mut self, sh: &Self::Shared, now: Instant, out: &mut Vec<u8>) -> Flow;
    /// Where the next read goes: a buffer of the client's own, or `scratch`.
    fn read_buf<'a>(&'a mut self, scratch: &'a mut [u8]) -> &'a mut [u8];
    /// `n` bytes were read into [`Client::read_buf`] (`scratch` holds them if that was it);
    /// `rx_us`: when the last of them arrived in the socket (wall-clock µs), with
    /// [`Client::rx_stamps`].
    fn on_read(
        &mut self,
        sh: &Self::Shared,
        n: usize,
        scratch: &[u8],
        now: Instant,
        rx_us: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Flow;
    /// The deadline given by [`Client::next_due`] came (or an earlier one: do what is due).
    fn on_due(&mut self, sh: &Self::Shared, now: Instant, out: &mut Vec<u8>) -> Flow;
    /// The next moment something is due while connected.
    fn next_due(&self, sh: &Self::Shared) -> Option<Instant>;
    /// The loop is about to drop the connection on purpose (`storm`: as part of a storm).
    fn on_drop(&mut self, _sh: &Self::Shared, _storm: bool) {}
    /// The run stops: append a goodbye if the protocol has one.
    fn on_stop(&mut self, sh: &Self::Shared, now: Instant, out: &mut Vec<u8>);
    /// The connection is gone: how long to wait before connecting again, `None` for never.
    fn on_ended(&mut self, sh: &Self::Shared, how: Ended, now: Instant) -> Option<Duration>;
}

/// Where a slot's connection is.
enum Link {
    /// No connection: not started yet, waiting to reconnect (its wheel entry says when), or
    /// done for good (`done`).
    Down { done: bool },
    /// A connect in progress since `since`.
    Connecting { stream: TcpStream, since: Instant },
    /// Connected. `blocked` holds bytes the socket did not take yet, oldest first, since
    /// `blocked_since`.
    Open { stream: TcpStream, blocked: Vec<u8>, blocked_since: Instant },
}

/// One connection.
struct Slot<C> {
    client: C,
    link: Link,
    /// The tick its counting wheel entry is at (`None`: nothing armed).
    armed: Option<u64>,
    /// When to connect again (while `Down` and not done).
    retry_at: Option<Instant>,
    /// Counted in the loop's `opening`: a connect started and the session is not up yet.
    opening: bool,
}

/// The loop of one core.
pub struct Loop<C: Client> {
    poll: Poll,
    events: Events,
    slots: Vec<Slot<C>>,
    wheel: Wheel,
    /// Wheel entries that fired this turn.
    fired: Vec<(u32, u64)>,
    /// Slots whose socket was still full after [`READS_PER_TURN`] reads.
    again: Vec<u32>,
    /// Bytes a callback wrote, sent right after it.
    out: Vec<u8>,
    scratch: Box<[u8]>,
    /// Tick 0 of the wheel.
    epoch: Instant,
    /// Slots started so far (the ramp starts them in order).
    started: usize,
    /// Slots started per second while ramping.
    connect_rate: f64,
    /// Slots whose connect started and whose session is not up yet.
    opening: usize,
    /// Slots not yet done.
    running: usize,
}

impl<C: Client> Loop<C> {
    /// A loop for `clients`, started at `connect_rate` per second once [`Loop::run`] runs.
    pub fn new(clients: Vec<C>, connect_rate: f64) -> io::Result<Loop<C>> {
        let running = clients.len();
        let slots = clients
            .into_iter()
            .map(|client| Slot {
                client,
                link: Link::Down { done: false },
                armed: None,
                retry_at: None,
                opening: false,
            })
            .collect();
        Ok(Loop {
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS),
            slots,
            wheel: Wheel::new(),
            fired: Vec::new(),
            again: Vec::new(),
            out: Vec::with_capacity(64 * 1024),
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            epoch: Instant::now(),
            started: 0,
            connect_rate: connect_rate.max(1.0),
            opening: 0,
            running,
        })
    }

    /// Runs until the run stops, calling `control(loop, now)` every [`CONTROL_TICK`] for the
    /// orders only the caller knows (storms, random drops). Every connection is closed on
    /// return.
    pub fn run(
        &mut self,
        sh: &C::Shared,
        ctl: &Control,
        mut control: impl FnMut(&mut Self, &C::Shared, Instant),
    ) {
        let mut next_control = Instant::now();
        loop {
            let now = Instant::now();
            if ctl.phase() == Phase::Stop {
                self.stop_all(sh, now);
                return;
            }
            if now >= next_control {
                next_control = now + CONTROL_TICK;
                control(self, sh, now);
            }
            self.ramp(sh, now);
            let timeout = self.sleep_for(now, next_control);
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("loadgen: epoll failed: {e}");
                    self.stop_all(sh, Instant::now());
                    return;
                }
            }
            let now = Instant::now();
            self.on_events(sh, now);
            self.on_due(sh, now);
        }
    }

    /// How long to wait in epoll: until the next tick that holds a deadline, the next control
    /// tick, or (while ramping) the next ramp step.
    fn sleep_for(&self, now: Instant, next_control: Instant) -> Duration {
        let mut until = next_control;
        if self.started < self.slots.len() {
            until = until.min(now + RAMP_TICK);
        }
        if !self.again.is_empty() {
            return Duration::ZERO;
        }
        if let Some(t) = self.wheel.next_busy(LOOKAHEAD_TICKS) {
            until = until.min(self.epoch + Duration::from_millis(t));
        }
        until.saturating_duration_since(now)
    }

    /// Starts the slots the connect rate allows by now, at most [`MAX_OPENING`] opening at once
    /// and [`RAMP_PER_TURN`] in this turn.
    fn ramp(&mut self, sh: &C::Shared, now: Instant) {
        let allowed = ((now - self.epoch).as_secs_f64() * self.connect_rate) as usize + 1;
        let allowed = allowed.min(self.slots.len()).min(self.started + RAMP_PER_TURN);
        while self.started < allowed && self.opening < MAX_OPENING {
            let i = self.started;
            self.started += 1;
            self.connect(sh, i, now);
        }
    }

    /// Slots whose session is up (storms and drops pick among them).
    pub fn live_slots(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.is_live(i)).collect()
    }

    /// True if slot `i` is connected with its session up.
    pub fn is_live(&self, i: usize) -> bool {
        matches!(self.slots[i].link, Link::Open { .. }) && self.slots[i].client.live()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when the loop has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots not yet done for good.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Drops slot `i`'s connection on purpose; it reconnects as its client says.
    pub fn drop_conn(&mut self, sh: &C::Shared, i: usize, storm: bool, now: Instant) {
        if !matches!(self.slots[i].link, Link::Open { .. }) {
            return;
        }
        self.slots[i].client.on_drop(sh, storm);
        self.end(sh, i, Ended::Dropped, now);
    }

    /// Handles readiness: connects that completed, bytes to read, sockets with room again.
    fn on_events(&mut self, sh: &C::Shared, now: Instant) {
        let again = std::mem::take(&mut self.again);
        for i in again {
            self.read(sh, i as usize, now);
        }
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for ev in events.iter() {
            let i = ev.token().0;
            if i >= self.slots.len() {
                continue;
            }
            match &self.slots[i].link {
                Link::Down { .. } => {}
                Link::Connecting { .. } => self.connected(sh, i, now),
                Link::Open { .. } => {
                    if ev.is_writable() {
                        self.flush(sh, i, now);
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.read(sh, i, now);
                    }
                }
            }
        }
        events.clear();
        self.events = events;
    }

    /// Fires what is due on the wheel.
    fn on_due(&mut self, sh: &C::Shared, now: Instant) {
        let tick = self.tick_of(now);
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(tick, &mut fired);
        for &(key, t) in &fired {
            let i = key as usize;
            // A stale entry: the slot armed another since.
            if self.slots[i].armed != Some(t) {
                continue;
            }
            self.slots[i].armed = None;
            // The clock is read again for each: a send is stamped (and judged late or not)
            // when it leaves, not when the turn began.
            self.due(sh, i, Instant::now());
        }
        fired.clear();
        self.fired = fired;
        // Stale entries are bounded by arming only earlier deadlines; this is the backstop.
        if self.wheel.len() > 4 * self.slots.len() + 1024 {
            self.rearm_all();
        }
    }

    /// Slot `i`'s deadline came.
    fn due(&mut self, sh: &C::Shared, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        match &slot.link {
            Link::Down { done: true } => return,
            Link::Down { done: false } => {
                if slot.retry_at.is_some_and(|t| now >= t) {
                    slot.retry_at = None;
                    self.connect(sh, i, now);
                    return;
                }
            }
            Link::Connecting { since, .. } => {
                if now >= *since + WRITE_TIMEOUT {
                    self.end(sh, i, Ended::ConnectFailed, now);
                    return;
                }
            }
            Link::Open { blocked, blocked_since, .. } => {
                if !blocked.is_empty() && now >= *blocked_since + WRITE_TIMEOUT {
                    self.end(sh, i, Ended::WriteFailed, now);
                    return;
                }
                self.out.clear();
                let flow = slot.client.on_due(sh, now, &mut self.out);
                if !self.send_out(i, now) {
                    self.end(sh, i, Ended::WriteFailed, now);
                    return;
                }
                if flow == Flow::End {
                    self.end(sh, i, Ended::ByClient, now);
                    return;
                }
            }
        }
        self.rearm(sh, i);
    }

    /// Starts slot `i`'s connect.
    fn connect(&mut self, sh: &C::Shared, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        slot.client.on_connecting(now);
        if !slot.opening {
            slot.opening = true;
            self.opening += 1;
        }
        let (addr, source) = slot.client.addr(sh);
        let stamps = slot.client.rx_stamps(sh);
        let started = super::net::connect(addr, source, slot.client.rcvbuf(sh)).and_then(|s| {
            if stamps {
                super::net::stamp_arrivals(&s)?;
            }
            let mut stream = TcpStream::from_std(std::net::TcpStream::from(s));
            self.poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        match started {
            Ok(stream) => {
                slot.link = Link::Connecting { stream, since: now };
                self.rearm(sh, i);
            }
            Err(_) => self.end(sh, i, Ended::ConnectFailed, now),
        }
    }

    /// Slot `i`'s socket became writable (or failed) while connecting.
    fn connected(&mut self, sh: &C::Shared, i: usize, now: Instant) {
        let Link::Connecting { stream, .. } = &self.slots[i].link else { return };
        // mio's way to tell: an error, or a peer address once the connect is done.
        match stream.take_error() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return self.end(sh, i, Ended::ConnectFailed, now),
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(_) => return self.end(sh, i, Ended::ConnectFailed, now),
        }
        let slot = &mut self.slots[i];
        let Link::Connecting { stream, .. } = std::mem::replace(&mut slot.link, Link::Down { done: false })
        else {
            return;
        };
        slot.link = Link::Open { stream, blocked: Vec::new(), blocked_since: now };
        self.out.clear();
        let flow = slot.client.on_connected(sh, now, &mut self.out);
        self.after_callback(sh, i, flow, now);
        // Bytes may have come with the connect's completion (edge-triggered: read them now).
        if matches!(self.slots[i].link, Link::Open { .. }) {
            self.read(sh, i, now);
        }
    }

    /// Reads slot `i` until a read comes back short, would block, or [`READS_PER_TURN`].
    fn read(&mut self, sh: &C::Shared, i: usize, now: Instant) {
        for _ in 0..READS_PER_TURN {
            let slot = &mut self.slots[i];
            let Link::Open { stream, .. } = &mut slot.link else { return };
            let stamped = slot.client.rx_stamps(sh);
            let buf = slot.client.read_buf(&mut self.scratch);
            let want = buf.len();
            let got = if stamped {
                super::net::recv_stamped(stream.as_raw_fd(), buf)
            } else {
                stream.read(buf).map(|n| (n, None))
            };
            let (n, rx_us) = match got {
                Ok((0, _)) => return self.end(sh, i, Ended::Closed, now),
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.end(sh, i, Ended::Closed, now),
            };
            self.out.clear();
            let flow = slot.client.on_read(sh, n, &self.scratch, now, rx_us, &mut self.out);
            if !self.after_callback(sh, i, flow, now) {
                return;
            }
            if n < want {
                // Short: the socket is empty now, and the next bytes bring a new edge.
                return;
            }
        }
        self.again.push(i as u32);
    }

    /// Sends what a callback wrote, ends the connection if it said so or the write failed,
    /// and re-arms its deadline. False if the connection ended.
    fn after_callback(&mut self, sh: &C::Shared, i: usize, flow: Flow, now: Instant) -> bool {
        if !self.send_out(i, now) {
            self.end(sh, i, Ended::WriteFailed, now);
            return false;
        }
        if flow == Flow::End {
            self.end(sh, i, Ended::ByClient, now);
            return false;
        }
        self.rearm(sh, i);
        true
    }

    /// Sends `self.out` on slot `i`, or queues it behind bytes already waiting. False if the
    /// socket failed or the bound was passed.
    fn send_out(&mut self, i: usize, now: Instant) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let Link::Open { stream, blocked, blocked_since } = &mut self.slots[i].link else { return true };
        if !blocked.is_empty() {
            if blocked.len() + self.out.len() > MAX_BLOCKED {
                return false;
            }
            blocked.extend_from_slice(&self.out);
            return true;
        }
        let mut at = 0;
        while at < self.out.len() {
            match stream.write(&self.out[at..]) {
                Ok(0) => return false,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if at < self.out.len() {
            // The socket is full: the rest waits for a writable edge (or the write timeout).
            blocked.extend_from_slice(&self.out[at..]);
            *blocked_since = now;
        }
        true
    }

    /// Slot `i`'s socket has room again: sends what waited.
    fn flush(&mut self, sh: &C::Shared, i: usize, now: Instant) {
        let Link::Open { stream, blocked, .. } = &mut self.slots[i].link else { return };
        if blocked.is_empty() {
            return;
        }
        let mut at = 0;
        let failed = loop {
            if at == blocked.len() {
                break false;
            }
            match stream.write(&blocked[at..]) {
                Ok(0) => break true,
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        blocked.drain(..at);
        if blocked.is_empty() {
            // An idle connection keeps no write buffer.
            *blocked = Vec::new();
        }
        if failed {
            self.end(sh, i, Ended::WriteFailed, now);
        } else {
            self.rearm(sh, i);
        }
    }

    /// Closes slot `i`'s connection (if any) and asks its client what next.
    fn end(&mut self, sh: &C::Shared, i: usize, how: Ended, now: Instant) {
        let slot = &mut self.slots[i];
        // Dropping the stream closes the socket, which also takes it out of epoll.
        slot.link = Link::Down { done: false };
        self.settle(i);
        let slot = &mut self.slots[i];
        match slot.client.on_ended(sh, how, now) {
            Some(wait) if how != Ended::Stop => {
                slot.retry_at = Some(now + wait);
                self.rearm(sh, i);
            }
            _ => {
                slot.link = Link::Down { done: true };
                slot.retry_at = None;
                slot.armed = None;
                self.running -= 1;
            }
        }
    }

    /// Every connection says goodbye (if its protocol has one) and closes.
    fn stop_all(&mut self, sh: &C::Shared, now: Instant) {
        for i in 0..self.slots.len() {
            match self.slots[i].link {
                Link::Down { done: true } => continue,
                Link::Open { .. } => {
                    self.out.clear();
                    self.slots[i].client.on_stop(sh, now, &mut self.out);
                    // Best effort: a full socket keeps the goodbye.
                    let _ = self.send_out(i, now);
                }
                _ => {}
            }
            self.end(sh, i, Ended::Stop, now);
        }
    }

    /// Takes slot `i` out of the opening count once its session is up or its connection gone.
    fn settle(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.opening && (slot.client.live() || matches!(slot.link, Link::Down { .. })) {
            slot.opening = false;
            self.opening -= 1;
        }
    }

    /// Arms slot `i`'s wheel entry for its earliest deadline, if that is earlier than the one
    /// armed (a later one is found when the armed entry fires and finds nothing due). Every
    /// handled event ends here, so this is also where an opening slot is settled.
    fn rearm(&mut self, sh: &C::Shared, i: usize) {
        self.settle(i);
        let slot = &self.slots[i];
        let due = match &slot.link {
            Link::Down { done: true } => None,
            Link::Down { done: false } => slot.retry_at,
            Link::Connecting { since, .. } => Some(*since + WRITE_TIMEOUT),
            Link::Open { blocked, blocked_since, .. } => {
                let client = slot.client.next_due(sh);
                let write = (!blocked.is_empty()).then(|| *blocked_since + WRITE_TIMEOUT);
                match (client, write) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        };
        let Some(due) = due else { return };
        let tick = self.tick_ceil(due);
        if self.slots[i].armed.is_some_and(|a| a <= tick) {
            return;
        }
        let armed = self.wheel.insert(tick, i as u32);
        self.slots[i].armed = Some(armed);
    }

    /// Rebuilds the wheel from each slot's armed tick, dropping every stale entry.
    fn rearm_all(&mut self) {
        self.wheel.clear();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(t) = slot.armed {
                slot.armed = Some(self.wheel.insert(t, i as u32));
            }
        }
    }

    /// The wheel tick `t` falls in.
    fn tick_of(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The first tick that starts at or after `t`: a deadline fires no earlier than it is due.
    fn tick_ceil(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.epoch);
        let ms = d.as_millis() as u64;
        if d.subsec_nanos().is_multiple_of(1_000_000) {
            ms
        } else {
            ms + 1
        }
    }
}
