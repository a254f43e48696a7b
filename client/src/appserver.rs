//! The app-server side of the protocol over blocking sockets: a thin shell around
//! [`proto::appserver::Session`](crate::proto::appserver::Session), the state machine that holds
//! every rule (hello and incarnation, pending pairs and receipts, acks, upstream routing,
//! reconnects, GateLost, late receipts). Its module docs state those rules; this one only moves
//! bytes and runs timers.
//!
//! [`AppServerConn::connect`] dials and waits for the hello's answer. Each connection then has a
//! reader thread that feeds what it reads to the machine and hands the machine's events to the
//! caller's [`AppServerEvents`], waiting while that queue is full (the reader then stops reading
//! and the gate's outbound queue fills: the gate is backpressured instead of this process
//! growing). One driver thread per group sleeps until the machine's next deadline, dials the
//! connections it asks for (each in a thread of its own), and hands over the events that the
//! caller's own calls produce (the caller's threads never wait on the event queue). The machine
//! sits under one lock, held only while it is called; writes to one connection go through that
//! connection's own lock, frames whole and in the order the machine queued them.
//!
//! Answers to [`AppServerConn::push`] go to the waiting call; answers to
//! [`AppServerConn::push_async`] (and to a `push` that gave up waiting) arrive as
//! [`Event::PushAnswer`]. Dropping [`AppServerEvents`] ends the group at its next event: receipts
//! would otherwise be acked and upstream requests left unanswered with nobody to see them.

pub use crate::proto::appserver::{
    Accepted, Chosen, Event, GeoPushSpec, GeoSpec, PushSpec, ServerErrorInfo, SessionEnd, UpstreamRequest,
    Welcome, DEFAULT_RECONNECT_WITHIN, LOST_MEMORY, MAX_IN_FLIGHT_ENDS, MAX_IN_FLIGHT_PUSHES,
    MAX_RECONNECT_ATTEMPTS, UNCONFIRMED_GRACE,
};
use crate::proto::appserver::{Action, Config, ConnId, HandleId, Session};
use crate::ClientError;
use schema::wire::ErrorCode;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvError, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most events queued for the caller before the reader threads stop reading (backpressure on
/// the gate). Large enough for a few full receipt batches, so a consumer that keeps up never
/// stalls the reader.
pub const EVENT_QUEUE: usize = 100_000;

/// Bytes read from a socket at once, then handed to the machine.
const READ_CHUNK: usize = 64 * 1024;
/// Most events taken from the machine under one lock.
const EMIT_BATCH: usize = 1024;

/// How a group connects and how long it tries to get back to its gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Bounds the connect, the hello, every write and every [`AppServerConn::push`].
    pub timeout: Duration,
    /// After the group's last connection ends (not closed by the caller), how long it tries to
    /// reconnect to the same gate process before every pending pair ends as GateLost. Zero: no
    /// reconnect, GateLost at once.
    pub reconnect_within: Duration,
}

impl ConnectOptions {
    /// `timeout`, and reconnects within [`DEFAULT_RECONNECT_WITHIN`].
    pub fn new(timeout: Duration) -> ConnectOptions {
        ConnectOptions { timeout, reconnect_within: DEFAULT_RECONNECT_WITHIN }
    }

    /// The same options with another reconnect bound.
    pub fn reconnect_within(self, bound: Duration) -> ConnectOptions {
        ConnectOptions { reconnect_within: bound, ..self }
    }
}

/// The receiving end of a group's events. Dropping it ends the group's connections at their
/// next event.
pub struct AppServerEvents {
    /// Bounded by `EVENT_QUEUE`; the group holds the sender until it ends.
    rx: Receiver<Event>,
}

impl AppServerEvents {
    /// Waits for the next event; `Err` once the group ended and every event was taken.
    pub fn recv(&self) -> Result<Event, RecvError> {
        self.rx.recv()
    }

    /// Waits at most `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        self.rx.try_recv()
    }

    /// Blocks for each event in turn; ends once the group ended and every event was taken.
    pub fn iter(&self) -> mpsc::Iter<'_, Event> {
        self.rx.iter()
    }

    /// The events queued now, without waiting.
    pub fn try_iter(&self) -> mpsc::TryIter<'_, Event> {
        self.rx.try_iter()
    }
}

impl<'a> IntoIterator for &'a AppServerEvents {
    type Item = Event;
    type IntoIter = mpsc::Iter<'a, Event>;

    fn into_iter(self) -> Self::IntoIter {
        self.rx.iter()
    }
}

impl IntoIterator for AppServerEvents {
    type Item = Event;
    type IntoIter = mpsc::IntoIter<Event>;

    fn into_iter(self) -> Self::IntoIter {
        self.rx.into_iter()
    }
}

/// What a waiting `push` gets: the accepted targets, or why not.
type Answer = Result<u32, ServerErrorInfo>;

/// What a waiting `geo_query` or `geo_push` gets.
type GeoResult = Result<Vec<Chosen>, ServerErrorInfo>;

/// What a waiting `end_session` gets.
type EndResult = Result<SessionEnd, ServerErrorInfo>;

/// The machine and what the shell keeps beside it, under one lock.
struct Inner {
    /// The protocol state.
    session: Session,
    /// `push` calls waiting for their answer, by (connection, sequence-id).
    waiters: HashMap<(ConnId, u32), SyncSender<Answer>>,
    /// `end_session` calls waiting for their answer, by (connection, sequence-id).
    end_waiters: HashMap<(ConnId, u32), SyncSender<EndResult>>,
    /// `geo_query` and `geo_push` calls waiting for their answer, by (connection, sequence-id).
    geo_waiters: HashMap<(ConnId, u32), SyncSender<GeoResult>>,
    /// The driver thread waits on `Group::wake` (and re-reads everything before it does).
    driver_waiting: bool,
    /// Until when it waits (`None`: until woken).
    driver_until: Option<Instant>,
}

/// One socket's halves for writing and closing.
struct Wire {
    /// A clone kept outside the write lock, so a close works even while a write is blocked.
    ctl: TcpStream,
    /// The write half; held while a batch of frames is taken from the machine and written.
    writer: Mutex<TcpStream>,
}

/// Whether a thread may wait on the caller's event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The caller's own thread: never waits on the event queue (it may be the one reading it).
    Caller,
    /// A reader, dialer or the driver: hands events over itself, waiting while the queue is full.
    Background,
}

/// What a call into the machine left for the shell to do.
struct Work {
    /// Connections to open or close.
    actions: Vec<Action>,
    /// Events wait to be handed over.
    events: bool,
    /// A new handle's hello ended.
    opened: bool,
    /// The driver must look again (an earlier deadline, events a caller cannot hand over, the
    /// end).
    wake: bool,
}

impl Work {
    /// Takes the machine's actions and notes what else waits. EndSession answers go straight to
    /// their waiting calls (they are not events: an answer nobody waits for any more is dropped).
    fn collect(inner: &mut Inner, role: Role) -> Work {
        while let Some((conn, seq, result)) = inner.session.poll_end_answer() {
            if let Some(tx) = inner.end_waiters.remove(&(conn, seq)) {
                let _ = tx.try_send(result);
            }
        }
        while let Some((conn, seq, result)) = inner.session.poll_geo_answer() {
            if let Some(tx) = inner.geo_waiters.remove(&(conn, seq)) {
                let _ = tx.try_send(result);
            }
        }
        let s = &mut inner.session;
        let actions = std::iter::from_fn(|| s.poll_action()).collect();
        let events = s.has_events();
        let sooner = match (s.poll_timeout(), inner.driver_until) {
            (Some(due), Some(until)) => due < until,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let wake = inner.driver_waiting && (s.is_ended() || sooner || (events && role == Role::Caller));
        Work { actions, events, opened: s.has_opened(), wake }
    }
}

/// What connections of one app-server share.
struct Group {
    /// The gate's address, for `connect_another` and reconnects.
    addr: SocketAddr,
    /// Connect and write timeout, and the longest `push` waits.
    timeout: Duration,
    /// The machine.
    inner: Mutex<Inner>,
    /// Wakes the driver thread.
    wake: Condvar,
    /// Wakes callers waiting for a hello's outcome.
    opened: Condvar,
    /// Open sockets by connection.
    wires: Mutex<HashMap<ConnId, Arc<Wire>>>,
    /// The caller's event queue; `None` once the group ended or the caller dropped it. Held while
    /// events are handed over, so they arrive in the machine's order.
    events: Mutex<Option<SyncSender<Event>>>,
}

impl Group {
    /// A group with no connection yet, and its driver thread.
    fn start(addr: SocketAddr, config: Config, events: SyncSender<Event>) -> Result<Arc<Group>, ClientError> {
        let timeout = config.timeout;
        let group = Arc::new(Group {
            addr,
            timeout,
            inner: Mutex::new(Inner {
                session: Session::new(config, seed()),
                waiters: HashMap::new(),
                end_waiters: HashMap::new(),
                geo_waiters: HashMap::new(),
                driver_waiting: false,
                driver_until: None,
            }),
            wake: Condvar::new(),
            opened: Condvar::new(),
            wires: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(events)),
        });
        let driver = Arc::clone(&group);
        thread::Builder::new().name("fleetgate-sidecar-driver".to_owned()).spawn(move || driver.drive())?;
        Ok(group)
    }

    /// Calls the machine, then does what it asks.
    fn run<R>(self: &Arc<Self>, role: Role, op: impl FnOnce(&mut Inner) -> R) -> R {
        let (r, work) = {
            let mut inner = lock(&self.inner);
            let r = op(&mut inner);
            (r, Work::collect(&mut inner, role))
        };
        self.perform(work, role);
        r
    }

    /// Opens and closes connections, hands events over (or leaves them to the driver), writes
    /// what waits to be written.
    fn perform(self: &Arc<Self>, work: Work, role: Role) {
        for action in work.actions {
            match action {
                Action::Close { conn } => self.shut(conn),
                Action::Connect { conn, timeout } => self.dial(conn, timeout),
            }
        }
        if work.opened {
            self.opened.notify_all();
        }
        if work.events && role == Role::Background {
            self.hand_over();
        }
        self.flush_all();
        if work.wake {
            self.wake.notify_one();
        }
    }

    /// The driver: handles the machine's deadlines, and hands over events the caller's calls
    /// produced. Ends with the group.
    fn drive(self: Arc<Self>) {
        loop {
            let work = {
                let mut inner = lock(&self.inner);
                loop {
                    let now = Instant::now();
                    let due = inner.session.poll_timeout().is_some_and(|t| t <= now);
                    if due {
                        inner.session.handle_timeout(now);
                    }
                    if due || inner.session.has_actions() || inner.session.has_events() {
                        break Work::collect(&mut inner, Role::Background);
                    }
                    if inner.session.is_ended() {
                        drop(inner);
                        self.hand_over();
                        return;
                    }
                    let until = inner.session.poll_timeout();
                    inner.driver_waiting = true;
                    inner.driver_until = until;
                    inner = match until {
                        Some(t) => {
                            self.wake.wait_timeout(inner, t - now).unwrap_or_else(PoisonError::into_inner).0
                        }
                        None => self.wake.wait(inner).unwrap_or_else(PoisonError::into_inner),
                    };
                    inner.driver_waiting = false;
                }
            };
            self.perform(work, Role::Background);
        }
    }

    /// Hands the machine's events to the caller's queue, waiting while it is full; a push's answer
    /// goes to its waiting `push` instead. Once the group ended and every event is out, the queue
    /// is disconnected. If the caller dropped the queue, the group is abandoned.
    fn hand_over(self: &Arc<Self>) {
        let mut sender = lock(&self.events);
        loop {
            let (batch, ended) = {
                let mut inner = lock(&self.inner);
                let mut batch = Vec::new();
                while batch.len() < EMIT_BATCH {
                    let Some(ev) = inner.session.poll_event() else { break };
                    batch.extend(route(&mut inner.waiters, ev));
                }
                let ended = inner.session.is_ended();
                if ended && batch.is_empty() {
                    // Waiting `push` and `end_session` calls wake up with `Closed`.
                    inner.waiters.clear();
                    inner.end_waiters.clear();
                    inner.geo_waiters.clear();
                }
                (batch, ended)
            };
            if batch.is_empty() {
                if ended {
                    *sender = None;
                }
                return;
            }
            let Some(tx) = sender.as_ref() else { continue };
            if batch.into_iter().try_for_each(|ev| tx.send(ev)).is_err() {
                *sender = None;
                drop(sender);
                self.run(Role::Caller, |inner| {
                    inner.session.abandon();
                    inner.waiters.clear();
                    inner.end_waiters.clear();
                    inner.geo_waiters.clear();
                });
                return;
            }
        }
    }

    /// Writes what the machine has for every connection.
    fn flush_all(&self) {
        let conns = lock(&self.inner).session.transmits();
        for conn in conns {
            self.flush(conn);
        }
    }

    /// Writes what the machine has for `conn`, under its write lock. A failed write may have left
    /// part of a frame on the wire, so framing is lost: the socket is shut down, and its reader
    /// reports the end.
    fn flush(&self, conn: ConnId) {
        let Some(wire) = self.wire(conn) else { return };
        let mut stream = lock(&wire.writer);
        let mut out = Vec::new();
        loop {
            let more = lock(&self.inner).session.transmit(conn, &mut out);
            if !more {
                return;
            }
            if write_counted(&mut stream, &out).is_err() {
                let _ = wire.ctl.shutdown(Shutdown::Both);
                return;
            }
            out.clear();
        }
    }

    /// Queues frames with `queue` and writes them on `conn` at once, under its write lock, so a
    /// push's frame is the last one written. `Err`: nothing was queued. `Ok((r, Err))`: the write
    /// failed before its end, so the frame `queue` added was not written whole.
    fn send_on<R>(
        &self,
        conn: ConnId,
        queue: impl FnOnce(&mut Inner) -> Result<R, ClientError>,
    ) -> Result<(R, io::Result<()>), ClientError> {
        let wire = self.wire(conn).ok_or(ClientError::Closed)?;
        let mut stream = lock(&wire.writer);
        let mut out = Vec::new();
        let r = {
            let mut inner = lock(&self.inner);
            let r = queue(&mut inner)?;
            inner.session.transmit(conn, &mut out);
            r
        };
        let written = write_counted(&mut stream, &out);
        if written.is_err() {
            let _ = wire.ctl.shutdown(Shutdown::Both);
        }
        Ok((r, written))
    }

    /// The socket of `conn`.
    fn wire(&self, conn: ConnId) -> Option<Arc<Wire>> {
        lock(&self.wires).get(&conn).cloned()
    }

    /// Closes the socket of `conn`; its reader then ends.
    fn shut(&self, conn: ConnId) {
        if let Some(wire) = lock(&self.wires).remove(&conn) {
            let _ = wire.ctl.shutdown(Shutdown::Both);
        }
    }

    /// Opens a connection the machine asked for, in a thread of its own.
    fn dial(self: &Arc<Self>, conn: ConnId, timeout: Duration) {
        let group = Arc::clone(self);
        let spawned =
            thread::Builder::new().name(format!("fleetgate-sidecar-dial-{conn}")).spawn(move || {
                match TcpStream::connect_timeout(&group.addr, timeout.max(Duration::from_millis(1))) {
                    Ok(stream) => group.attach(conn, stream, Role::Background),
                    Err(e) => {
                        group.run(Role::Background, |i| i.session.dial_failed(conn, e.into(), Instant::now()))
                    }
                }
            });
        if let Err(e) = spawned {
            self.run(Role::Caller, |i| i.session.dial_failed(conn, ClientError::Io(e), Instant::now()));
        }
    }

    /// Gives the machine an open socket for `conn` (it queues the hello) and starts its reader.
    fn attach(self: &Arc<Self>, conn: ConnId, stream: TcpStream, role: Role) {
        let halves = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .and_then(|()| Ok((stream.try_clone()?, stream.try_clone()?)));
        let (read_half, ctl) = match halves {
            Ok(h) => h,
            Err(e) => return self.run(role, |i| i.session.dial_failed(conn, e.into(), Instant::now())),
        };
        lock(&self.wires).insert(conn, Arc::new(Wire { ctl, writer: Mutex::new(stream) }));
        if !self.run(role, |i| i.session.dialed(conn, Instant::now())) {
            return self.shut(conn);
        }
        let group = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("fleetgate-sidecar-{conn}"))
            .spawn(move || group.read(conn, read_half));
        if spawned.is_err() {
            self.shut(conn);
            self.run(role, |i| i.session.connection_lost(conn, Instant::now()));
        }
    }

    /// A connection's reader: feeds the machine until the socket ends, then reports the end.
    fn read(self: Arc<Self>, conn: ConnId, mut stream: TcpStream) {
        let mut buf = vec![0; READ_CHUNK];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.run(Role::Background, |i| i.session.handle_input(conn, &buf[..n], Instant::now()))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.run(Role::Background, |i| i.session.connection_lost(conn, Instant::now()));
        self.shut(conn);
    }

    /// A new handle: dials (unless `stream` is given), says hello and waits for the outcome.
    fn open_handle(self: &Arc<Self>, stream: Option<TcpStream>) -> Result<(HandleId, Welcome), ClientError> {
        let (handle, conn) = self.run(Role::Caller, |i| i.session.open())?;
        let dialed = match stream {
            Some(s) => Ok(s),
            None => TcpStream::connect_timeout(&self.addr, self.timeout),
        };
        match dialed {
            Ok(s) => self.attach(conn, s, Role::Caller),
            Err(e) => self.run(Role::Caller, |i| i.session.dial_failed(conn, e.into(), Instant::now())),
        }
        // The machine decides by the hello's deadline; the bound here only guards against a
        // driver that is gone.
        let deadline = Instant::now() + self.timeout * 2 + Duration::from_secs(1);
        let mut inner = lock(&self.inner);
        loop {
            if let Some(outcome) = inner.session.take_opened(handle) {
                return outcome.map(|w| (handle, w));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(inner);
                self.run(Role::Caller, |i| {
                    i.session.close(handle, now);
                    i.session.take_opened(handle);
                });
                return Err(ClientError::Timeout);
            }
            inner = self.opened.wait_timeout(inner, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// A push's answer for its waiting `push` call, if there is one; otherwise the event.
fn route(waiters: &mut HashMap<(ConnId, u32), SyncSender<Answer>>, ev: Event) -> Option<Event> {
    let Event::PushAnswer { conn, seq, message_id, result } = ev else { return Some(ev) };
    let unclaimed = match waiters.remove(&(conn, seq)) {
        Some(w) => match w.try_send(result) {
            Ok(()) => return None,
            Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) => r,
        },
        None => result,
    };
    Some(Event::PushAnswer { conn, seq, message_id, result: unclaimed })
}

/// Writes `buf` whole; an error means it stopped before the end.
fn write_counted(stream: &mut TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < buf.len() {
        match stream.write(&buf[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One sidecar connection to a gate. Cheap to share between threads by reference: every method
/// takes `&self`. Dropping it closes the connection. When the group reconnects after losing
/// every connection, the handle gets a new connection (and a new [`AppServerConn::conn_id`]).
pub struct AppServerConn {
    /// What this connection shares with the others of its group.
    group: Arc<Group>,
    /// This handle in the machine.
    handle: HandleId,
    /// The gate's Welcome on this handle's first connection.
    welcome: Welcome,
    /// The connection the handle had when it was closed (the machine forgets closed handles).
    closed_conn: AtomicU32,
}

impl AppServerConn {
    /// Connects to the gate's sidecar port at `addr` (each resolved address in turn) and says
    /// hello with `secret` and `name`. `timeout` bounds the connect, the hello, every write and
    /// every [`AppServerConn::push`]; a lost gate is reconnected within
    /// [`DEFAULT_RECONNECT_WITHIN`] (see [`AppServerConn::connect_with`]).
    ///
    /// A refused hello is `ClientError::Server` with code BadSecret. The events of this
    /// connection, and of any opened with [`AppServerConn::connect_another`], arrive on the
    /// returned [`AppServerEvents`].
    pub fn connect(
        addr: impl ToSocketAddrs,
        secret: &[u8],
        name: &str,
        timeout: Duration,
    ) -> Result<(AppServerConn, AppServerEvents), ClientError> {
        AppServerConn::connect_with(addr, secret, name, ConnectOptions::new(timeout))
    }

    /// [`AppServerConn::connect`] with options: the timeout and the reconnect bound.
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        secret: &[u8],
        name: &str,
        options: ConnectOptions,
    ) -> Result<(AppServerConn, AppServerEvents), ClientError> {
        let mut last = None;
        let mut dialed = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, options.timeout) {
                Ok(stream) => {
                    dialed = Some((stream, a));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some((stream, addr)) = dialed else {
            return Err(match last {
                Some(e) => e.into(),
                None => ClientError::Unexpected("address resolved to nothing".to_owned()),
            });
        };
        let config = Config {
            secret: secret.to_vec(),
            name: name.to_owned(),
            timeout: options.timeout,
            reconnect_within: options.reconnect_within,
        };
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE);
        let group = Group::start(addr, config, tx)?;
        let (handle, welcome) = group.open_handle(Some(stream))?;
        Ok((AppServerConn::new(group, handle, welcome), AppServerEvents { rx }))
    }

    /// Opens one more connection to the same gate with the same secret, name and timeout. It
    /// shares this one's pending receipts and event queue, as the gate spreads receipts,
    /// upstream requests and GPS over all of an app-server's connections.
    ///
    /// After [`Event::GateLost`] this reopens the group: if the gate is the same process, the
    /// receipts it kept for pairs reported GateLost arrive and are counted in
    /// [`AppServerConn::late_receipts`]. `Closed` while the group reconnects and once it ended
    /// (every handle closed); `Unexpected` if another gate process answers while the group
    /// still has connections to the one it knows.
    pub fn connect_another(&self) -> Result<AppServerConn, ClientError> {
        let (handle, welcome) = self.group.open_handle(None)?;
        Ok(AppServerConn::new(Arc::clone(&self.group), handle, welcome))
    }

    /// A handle whose hello succeeded.
    fn new(group: Arc<Group>, handle: HandleId, welcome: Welcome) -> AppServerConn {
        let conn = lock(&group.inner).session.handle_conn(handle).unwrap_or(0);
        AppServerConn { group, handle, welcome, closed_conn: AtomicU32::new(conn) }
    }

    /// Sends a push and waits (at most the connection's timeout) for the gate's answer.
    ///
    /// Every (message_id, uid) is registered as pending before the frame is written, since
    /// receipts may arrive before the acceptance. A refusal (`ClientError::Server`: e.g.
    /// LimitExceeded, InvalidField, ShuttingDown) un-registers them: no receipts follow.
    /// On `Timeout` the pairs stay pending and the late answer arrives as
    /// [`Event::PushAnswer`]; on `Closed` after the frame was written they stay pending too (the
    /// push may have been accepted) and end with receipts, GateLost ones if the gate is lost;
    /// likewise on `Unexpected` for an answer that did not verify. An error before the frame was
    /// written whole (this handle's connection is down, a local limit, a failed write) registers
    /// nothing.
    pub fn push(&self, p: &PushSpec) -> Result<Accepted, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (conn, seq) = self.send_push(p, Some(tx))?;
        // A push that gave up waiting gets its answer as an event.
        let answer = self.wait_answer(&rx, |inner| inner.waiters.remove(&(conn, seq)).is_some())?;
        match answer {
            Ok(targets) => Ok(Accepted { message_id: p.message_id, targets }),
            Err(e) if e.refused => Err(e.into()),
            Err(e) if e.answer_lost() => Err(ClientError::Closed),
            Err(e) => Err(ClientError::Unexpected(e.message)),
        }
    }

    /// Sends a push without waiting; returns its sequence-id. The answer arrives as
    /// [`Event::PushAnswer`] with this connection's id and that sequence-id. Pairs are
    /// registered as for [`AppServerConn::push`]; on any error nothing is registered. `QueueFull`
    /// past `MAX_IN_FLIGHT_PUSHES` unanswered pushes on this connection.
    pub fn push_async(&self, p: &PushSpec) -> Result<u32, ClientError> {
        self.send_push(p, None).map(|(_, seq)| seq)
    }

    /// Sends several pushes without waiting, in one write, so the gate reads them together;
    /// returns their sequence-ids in order (answers as for [`AppServerConn::push_async`]). All
    /// or nothing: on an error nothing of them is registered or written.
    pub fn push_many_async(&self, ps: &[PushSpec]) -> Result<Vec<u32>, ClientError> {
        let conn = self.current_conn().ok_or(ClientError::Closed)?;
        let sent_at_us = now_us();
        let (seqs, written) = self
            .group
            .send_on(conn, |inner| inner.session.push_batch(conn, ps, sent_at_us, Instant::now()))?;
        if let Err(e) = written {
            let mut inner = lock(&self.group.inner);
            for (&seq, p) in seqs.iter().zip(ps) {
                inner.session.push_unsent(conn, seq, p.message_id);
            }
            return Err(e.into());
        }
        Ok(seqs)
    }

    /// Waits at most the timeout for the answer `rx` brings. Past it, `forget` takes the call's
    /// waiter out and says whether it was still there: answers are routed under the machine's
    /// lock, so either the call still waited (Timeout) or its answer is in the channel already.
    fn wait_answer<T>(
        &self,
        rx: &Receiver<T>,
        forget: impl FnOnce(&mut Inner) -> bool,
    ) -> Result<T, ClientError> {
        match rx.recv_timeout(self.group.timeout) {
            Ok(answer) => Ok(answer),
            Err(RecvTimeoutError::Disconnected) => Err(ClientError::Closed),
            Err(RecvTimeoutError::Timeout) => {
                if forget(&mut lock(&self.group.inner)) {
                    return Err(ClientError::Timeout);
                }
                rx.try_recv().map_err(|_| ClientError::Closed)
            }
        }
    }

    /// Queues a push in the machine and writes it; returns the connection and the sequence-id.
    fn send_push(
        &self,
        p: &PushSpec,
        waiter: Option<SyncSender<Answer>>,
    ) -> Result<(ConnId, u32), ClientError> {
        let conn = self.current_conn().ok_or(ClientError::Closed)?;
        let sent_at_us = now_us();
        let (seq, written) = self.group.send_on(conn, |inner| {
            let seq = inner.session.push(conn, p, sent_at_us, Instant::now())?;
            if let Some(tx) = waiter {
                inner.waiters.insert((conn, seq), tx);
            }
            Ok(seq)
        })?;
        if let Err(e) = written {
            let mut inner = lock(&self.group.inner);
            inner.session.push_unsent(conn, seq, p.message_id);
            inner.waiters.remove(&(conn, seq));
            return Err(e.into());
        }
        Ok((conn, seq))
    }

    /// Ends `uid`'s session wherever it is (e.g. the account was banned) and waits (at most the
    /// connection's timeout) for the answer: found and ended (and on which node), or not found.
    /// The app gets GoAway Ended with `message` (the gate keeps at most 256 characters) and its
    /// unacked pushes end with Offline receipts (PROTOCOL.md §9.15). `Server` errors: ShuttingDown,
    /// Overloaded (origin Directory: Redis could not be asked; origin Gate: too many asks
    /// waiting) with a retry-after, Timeout (origin Gate: the node holding the session did not
    /// answer, or was lost). `Closed` if the connection ended first: the session may or may not
    /// have been ended, and asking again is harmless.
    pub fn end_session(&self, uid: u64, message: &str) -> Result<SessionEnd, ClientError> {
        let conn = self.current_conn().ok_or(ClientError::Closed)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let (seq, written) = self.group.send_on(conn, |inner| {
            let seq = inner.session.end_session(conn, uid, message, 0)?;
            inner.end_waiters.insert((conn, seq), tx);
            Ok(seq)
        })?;
        if let Err(e) = written {
            lock(&self.group.inner).end_waiters.remove(&(conn, seq));
            return Err(e.into());
        }
        // An end that gave up waiting drops its answer.
        let answer = self.wait_answer(&rx, |inner| inner.end_waiters.remove(&(conn, seq)).is_some())?;
        match answer {
            Ok(end) => Ok(end),
            Err(e) if e.answer_lost() => Err(ClientError::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// The `q.k` nearest drivers within `q.radius_m` of the point, nearest first, over every
    /// logic shard of the gate (PROTOCOL.md §9.16); waits at most the connection's timeout.
    /// `Server` errors: InvalidField or LimitExceeded (an argument out of its bounds; the
    /// message says which), Overloaded with a retry-after, ShuttingDown, Timeout.
    pub fn geo_query(&self, q: &GeoSpec) -> Result<Vec<Chosen>, ClientError> {
        self.geo(q, None)
    }

    /// Pushes `p` to the `q.k` nearest drivers within `q.radius_m` of the point and returns them,
    /// nearest first (PROTOCOL.md §9.16). Each chosen driver's receipt comes as an event, as
    /// for any push. Errors as [`AppServerConn::geo_query`]'s, and a push's: LimitExceeded for a
    /// payload over 16 KiB, InvalidField for a TTL over the gate's, Overloaded when the gate
    /// holds as many pushes as it may (nothing was pushed).
    pub fn geo_push(&self, q: &GeoSpec, p: &GeoPushSpec) -> Result<Vec<Chosen>, ClientError> {
        self.geo(q, Some(p))
    }

    fn geo(&self, q: &GeoSpec, p: Option<&GeoPushSpec>) -> Result<Vec<Chosen>, ClientError> {
        let conn = self.current_conn().ok_or(ClientError::Closed)?;
        let (tx, rx) = mpsc::sync_channel(1);
        let sent_at_us = now_us();
        let (seq, written) = self.group.send_on(conn, |inner| {
            let seq = inner.session.geo(conn, q, p, sent_at_us, Instant::now())?;
            inner.geo_waiters.insert((conn, seq), tx);
            Ok(seq)
        })?;
        if let Err(e) = written {
            let mut inner = lock(&self.group.inner);
            inner.geo_waiters.remove(&(conn, seq));
            if let Some(p) = p {
                inner.session.push_unsent(conn, seq, p.message_id);
            }
            return Err(e.into());
        }
        let answer = self.wait_answer(&rx, |inner| inner.geo_waiters.remove(&(conn, seq)).is_some())?;
        match answer {
            Ok(hits) => Ok(hits),
            Err(e) if e.answer_lost() => Err(ClientError::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// Answers an upstream request: an Upstream Response with the request's sequence-id and
    /// log-id, on the connection it came from, whichever handle of the group it is called on. A
    /// non-zero `code` is the app-server's own and still a normal answer for the app. `Closed` if
    /// that connection has ended (the gate has answered the app NoAppServer by then).
    pub fn reply(
        &self,
        req: &UpstreamRequest,
        code: u16,
        message: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let ((), written) = self.group.send_on(req.conn, |i| i.session.reply(req, code, message, payload))?;
        written.map_err(ClientError::from)
    }

    /// Answers an upstream request with an Error frame (origin AppServer), for a request the
    /// app-server cannot process (e.g. a cmd it does not know); the app gets AppServerError with
    /// `message`.
    pub fn reply_error(
        &self,
        req: &UpstreamRequest,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), ClientError> {
        let ((), written) = self.group.send_on(req.conn, |i| i.session.reply_error(req, code, message))?;
        written.map_err(ClientError::from)
    }

    /// What the gate announced on this handle's first connection (a reconnect only ever goes on
    /// with the same gate process).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The id within its group of this handle's current connection (the `conn` of its events and
    /// upstream requests); a new one after the group reconnected.
    pub fn conn_id(&self) -> u32 {
        self.current_conn().unwrap_or_else(|| self.closed_conn.load(Ordering::Relaxed))
    }

    /// The handle's connection, while it is open.
    fn current_conn(&self) -> Option<ConnId> {
        lock(&self.group.inner).session.handle_conn(self.handle)
    }

    /// Pairs of the group's pushes still awaiting their final receipt (broadcasts not included:
    /// their targets are unknown until their receipts arrive).
    pub fn pending_receipts(&self) -> usize {
        lock(&self.group.inner).session.pending_receipts()
    }

    /// Receipts the group dropped because their pair was not pending: resent batches, or
    /// pushes not sent from this group.
    pub fn duplicate_receipts(&self) -> u64 {
        lock(&self.group.inner).session.duplicate_receipts()
    }

    /// Receipts the group dropped (and acked) because their pair had been reported GateLost:
    /// they came from a gate the group had given up on, e.g. after `connect_another` reopened
    /// the group to the same gate process.
    pub fn late_receipts(&self) -> u64 {
        lock(&self.group.inner).session.late_receipts()
    }

    /// Pushes sent on this handle's current connection and not answered yet.
    pub fn pushes_in_flight(&self) -> usize {
        let inner = lock(&self.group.inner);
        inner.session.handle_conn(self.handle).map_or(0, |c| inner.session.pushes_in_flight(c))
    }

    /// Closes this handle: its connection ends ([`Event::ConnectionLost`]) and the group never
    /// reconnects it; if it was the group's last open connection, GateLost receipts and
    /// [`Event::GateLost`] follow (no reconnect: the caller asked for the end). Once every handle
    /// is closed the group ends and its event queue disconnects after the last event.
    pub fn close(&self) -> Result<(), ClientError> {
        let handle = self.handle;
        self.group.run(Role::Caller, |i| {
            if let Some(conn) = i.session.handle_conn(handle) {
                self.closed_conn.store(conn, Ordering::Relaxed);
            }
            i.session.close(handle, Instant::now());
        });
        Ok(())
    }

    /// Cuts this handle's connection as a network failure would: unlike [`AppServerConn::close`],
    /// the group treats it as a drop it did not ask for, so if it was the last connection the
    /// group reconnects. For tests and failover drills.
    pub fn sever(&self) {
        if let Some(wire) = self.current_conn().and_then(|c| self.group.wire(c)) {
            let _ = wire.ctl.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for AppServerConn {
    /// Closes the handle, so its reader thread ends instead of outliving it.
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A seed for the reconnect jitter, different in every group.
fn seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |t| t.as_nanos()));
    h.finish()
}

/// Locks a mutex, going on after a panic elsewhere: the machine is only changed by its own
/// methods, and the readers must still report the end.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wall-clock µs since the Unix epoch, for `Push.sent_at_us` (apps measure latency with it).
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The shell's own duties, against a fake gate on a real socket: answers reach the waiting call
/// or become events, a lost answer wakes the waiting call, the group reconnects, the event queue
/// disconnects when the group ends, and dropping it ends the group. The protocol's rules are
/// tested on the machine (`proto::appserver`).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameReader, OwnedFrame};
    use schema::wire::{self, Outcome, Receipt};
    use schema::{Body, Cmd, Encoder, FrameType, Limits};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    const T: Duration = Duration::from_secs(5);
    const INCARNATION: u64 = 0x1AC4_0000_0000_0007;

    /// The fake gate's end of one connection.
    struct Side {
        s: TcpStream,
        r: FrameReader,
        e: Encoder,
    }

    impl Side {
        /// Accepts one connection and answers its hello with a Welcome.
        fn accept(l: &TcpListener) -> Side {
            let (s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(T)).expect("timeout");
            let mut side = Side { s, r: FrameReader::new(Limits::SIDECAR), e: Encoder::new() };
            let hello = side.read();
            assert_eq!((hello.cmd, hello.seq()), (Cmd::AppServerHello, 1));
            side.send(|e, o| {
                e.frame(o, FrameType::Response, Cmd::AppServerHello, 1, 0, |b| {
                    let args = wire::AppServerWelcomeArgs {
                        node: None,
                        max_body: 0,
                        max_targets: 50_000,
                        incarnation: INCARNATION,
                    };
                    wire::AppServerWelcome::create(b, &args)
                })
            });
            side
        }

        fn read(&mut self) -> OwnedFrame {
            self.r.read_frame(&mut self.s).expect("a frame from the client")
        }

        fn send(&mut self, build: impl FnOnce(&mut Encoder, &mut Vec<u8>)) {
            let mut out = Vec::new();
            build(&mut self.e, &mut out);
            self.s.write_all(&out).expect("write to the client");
        }

        fn accept_push(&mut self, push: &OwnedFrame, targets: u32) {
            let Body::Push(p) = push.body() else { panic!("not a push: {push:?}") };
            let message_id = p.message_id();
            self.send(|e, o| {
                e.frame(o, FrameType::Response, Cmd::Push, push.seq(), 0, |b| {
                    wire::PushAccepted::create(b, &wire::PushAcceptedArgs { message_id, targets })
                })
            });
        }

        fn receipt(&mut self, seq: u32, message_id: u64, uid: u64) {
            let rs = [Receipt::new(message_id, uid, Outcome::Delivered.0, 0, 0, 0)];
            self.send(|e, o| {
                e.frame(o, FrameType::Push, Cmd::Receipts, seq, 0, |b| {
                    let receipts = b.create_vector(&rs);
                    wire::Receipts::create(
                        b,
                        &wire::ReceiptsArgs { batch_id: u64::from(seq), receipts: Some(receipts) },
                    )
                })
            });
        }

        /// True once the client closed the connection.
        fn closed(&mut self) -> bool {
            matches!(self.r.read_frame(&mut self.s), Err(ClientError::Closed))
        }
    }

    fn fake_gate(script: impl FnOnce(TcpListener) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, thread::spawn(move || script(listener)))
    }

    fn spec(message_id: u64) -> PushSpec {
        PushSpec { message_id, uids: vec![10], ttl_ms: 30_000, ..PushSpec::default() }
    }

    fn next(events: &AppServerEvents) -> Event {
        events.recv_timeout(T).expect("an event")
    }

    #[test]
    fn a_late_answer_becomes_an_event_and_the_queue_disconnects_when_the_group_ends() {
        let (go_on, wait) = mpsc::channel::<()>();
        let (addr, gate) = fake_gate(move |l| {
            let mut g = Side::accept(&l);
            let p1 = g.read();
            wait.recv().expect("the client gave up waiting");
            g.accept_push(&p1, 1);
            let p2 = g.read();
            g.receipt(7, 1, 10);
            let ack = g.read();
            assert_eq!((ack.cmd, ack.seq()), (Cmd::ReceiptsAck, 7));
            g.accept_push(&p2, 1);
            assert!(g.closed());
        });
        let options = ConnectOptions::new(Duration::from_millis(300));
        let (conn, events) = AppServerConn::connect_with(addr, b"s", "dispatch-1", options).expect("connect");
        assert_eq!(conn.welcome().incarnation, INCARNATION);
        assert!(matches!(conn.push(&spec(1)), Err(ClientError::Timeout)));
        assert_eq!((conn.pending_receipts(), conn.pushes_in_flight()), (1, 1));
        go_on.send(()).expect("gate waits");
        assert!(matches!(next(&events), Event::PushAnswer { message_id: 1, result: Ok(1), .. }));
        let seq2 = conn.push_async(&spec(2)).expect("push 2");
        assert_eq!(next(&events), Event::Receipt { message_id: 1, uid: 10, outcome: Outcome::Delivered });
        assert_eq!(
            next(&events),
            Event::PushAnswer { conn: conn.conn_id(), seq: seq2, message_id: 2, result: Ok(1) }
        );
        let c = conn.conn_id();
        drop(conn);
        assert_eq!(next(&events), Event::ConnectionLost { conn: c });
        assert_eq!(next(&events), Event::Receipt { message_id: 2, uid: 10, outcome: Outcome::GateLost });
        assert_eq!(next(&events), Event::GateLost);
        assert!(matches!(events.recv_timeout(T), Err(RecvTimeoutError::Disconnected)));
        gate.join().expect("fake gate");
    }

    #[test]
    fn a_waiting_push_whose_connection_ends_is_closed_and_the_group_reconnects() {
        let (addr, gate) = fake_gate(|l| {
            let mut g = Side::accept(&l);
            let _ = g.read();
            drop(g);
            // The same process takes the reconnect and delivers the receipt it owed.
            let mut g = Side::accept(&l);
            g.receipt(1, 1, 10);
            let ack = g.read();
            assert_eq!((ack.cmd, ack.seq()), (Cmd::ReceiptsAck, 1));
        });
        let (conn, events) = AppServerConn::connect(addr, b"s", "dispatch-1", T).expect("connect");
        let first = conn.conn_id();
        assert!(matches!(conn.push(&spec(1)), Err(ClientError::Closed)));
        assert_eq!(next(&events), Event::ConnectionLost { conn: first });
        let Event::Reconnected { conn: second, incarnation } = next(&events) else {
            panic!("expected the reconnect")
        };
        assert_eq!((second, incarnation), (conn.conn_id(), INCARNATION));
        assert_ne!(second, first);
        assert_eq!(next(&events), Event::Receipt { message_id: 1, uid: 10, outcome: Outcome::Delivered });
        assert_eq!(conn.pending_receipts(), 0);
        gate.join().expect("fake gate");
    }

    #[test]
    fn dropping_the_event_queue_ends_the_group_at_its_next_event() {
        let (dropped, wait) = mpsc::channel::<()>();
        let (addr, gate) = fake_gate(move |l| {
            let mut g = Side::accept(&l);
            wait.recv().expect("the client dropped its queue");
            g.send(|e, o| {
                e.frame(o, FrameType::Event, Cmd::GpsForward, 0, 0, |b| {
                    wire::GpsForward::create(b, &wire::GpsForwardArgs { points: None })
                })
            });
            assert!(g.closed(), "the group closed its connection");
        });
        let (conn, events) = AppServerConn::connect(addr, b"s", "dispatch-1", T).expect("connect");
        drop(events);
        dropped.send(()).expect("gate waits");
        gate.join().expect("fake gate");
        assert!(matches!(conn.push(&spec(1)), Err(ClientError::Closed)));
        assert!(matches!(conn.connect_another(), Err(ClientError::Closed)));
    }
}
