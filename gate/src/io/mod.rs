//! The I/O shell of a shard: tasks that only move bytes. Listener tasks accept connections;
//! each connection's task reads into a small inline buffer and posts what it read to the
//! shard's loop ([`Events`]); the loop owns all state, decides everything, writes with
//! non-blocking sends, and hands a connection's task the rare jobs that need waiting (a write
//! the socket could not take, the final write of a close) through its [`ConnCtl`].
//!
//! The two small queues here are the only shared cells of a shard: the events into its loop and
//! one mailbox per connection out of it. Neither holds shard state.

pub mod conn;
pub mod listener;

use crate::lifecycle::Port;
use logic::ConnRef;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Inline read buffer: one GPS frame (64 bytes) fits, so the common segment is one read.
pub const INLINE: usize = 128;

/// Read buffer of an app-server connection's task.
pub const BULK: usize = 64 * 1024;

/// Events' capacity the queue keeps between bursts.
pub const KEEP_EVENTS: usize = 256;

/// Events one shard's loop takes at most before connection tasks wait to post more.
pub const MAX_EVENTS: usize = 65_536;

/// What the I/O tasks tell the loop.
#[derive(Debug)]
pub enum Event {
    /// A connection was accepted; its task waits for [`ConnCtl::admit`] or a refusal.
    Opened {
        /// The port it came in on.
        port: Port,
        /// Its socket, for the loop's non-blocking reads and writes.
        fd: RawFd,
        /// Its mailbox.
        ctl: Rc<ConnCtl>,
    },
    /// Bytes arrived.
    Data {
        /// The connection.
        conn: ConnRef,
        /// How many of `buf`.
        len: u8,
        /// The bytes.
        buf: [u8; INLINE],
    },
    /// Bytes arrived on an app-server connection, read in large pieces (app-servers send large
    /// frames in bursts; there are few of them, so a buffer each costs little).
    Bulk {
        /// The connection.
        conn: ConnRef,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A write handed to the task finished (`ok`) or failed.
    Written {
        /// The connection.
        conn: ConnRef,
        /// True when every byte was written.
        ok: bool,
    },
    /// The task ended: the peer closed, the socket failed, or the loop closed it.
    Closed {
        /// The connection.
        conn: ConnRef,
    },
}

/// The bounded queue of events into a shard's loop.
#[derive(Debug, Default)]
pub struct Events {
    queue: RefCell<VecDeque<Event>>,
    /// The loop, waiting for an event.
    reader: RefCell<Option<Waker>>,
    /// Tasks waiting for room.
    writers: RefCell<Vec<Waker>>,
}

impl Events {
    /// An empty queue.
    pub fn new() -> Rc<Events> {
        Rc::new(Events::default())
    }

    /// Posts an event, waiting while the queue is full.
    pub async fn post(&self, e: Event) {
        let mut e = Some(e);
        futures_lite::future::poll_fn(|cx| {
            let mut q = self.queue.borrow_mut();
            if q.len() >= MAX_EVENTS {
                let mut writers = self.writers.borrow_mut();
                if !writers.iter().any(|w| w.will_wake(cx.waker())) {
                    writers.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            q.push_back(e.take().expect("posted once"));
            drop(q);
            if let Some(w) = self.reader.borrow_mut().take() {
                w.wake();
            }
            Poll::Ready(())
        })
        .await
    }

    /// Posts an event at once when there is room; gives it back when the queue is full.
    // The event comes back by value on purpose: boxing it would cost an allocation on the rare
    // full-queue path of every read, for nothing.
    #[allow(clippy::result_large_err)]
    pub fn try_post(&self, e: Event) -> Result<(), Event> {
        let mut q = self.queue.borrow_mut();
        if q.len() >= MAX_EVENTS {
            return Err(e);
        }
        q.push_back(e);
        drop(q);
        if let Some(w) = self.reader.borrow_mut().take() {
            w.wake();
        }
        Ok(())
    }

    /// Posts an event at once, or returns the boxed wait for room when the queue is full: a
    /// connection task awaits only the box, so its state does not carry an event's room for its
    /// whole life.
    pub fn send<'a>(
        &'a self,
        e: Event,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>> {
        match self.try_post(e) {
            Ok(()) => None,
            Err(e) => Some(Box::pin(self.post(e))),
        }
    }

    /// Ready when an event waits; registers the loop's waker otherwise.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.queue.borrow().is_empty() {
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Moves every waiting event into `out` and lets waiting tasks post again.
    pub fn drain_into(&self, out: &mut Vec<Event>) {
        let mut q = self.queue.borrow_mut();
        out.extend(q.drain(..));
        // A burst (a login storm) grows the queue; an idle gate must not keep that memory.
        if q.capacity() > KEEP_EVENTS {
            q.shrink_to(KEEP_EVENTS);
        }
        drop(q);
        for w in self.writers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// What the loop asks a connection's task to do.
#[derive(Debug)]
pub enum Command {
    /// Write these bytes, waiting for the socket as long as it takes (or until a `Close`),
    /// then post `Written`.
    Write(Vec<u8>),
    /// Write these last bytes (bounded in time), close, post `Closed` and end.
    Close(Vec<u8>),
    /// Stop reading: the loop reads this busy connection itself on its read tick.
    Park,
    /// Read again.
    Unpark,
}

/// Where a connection's admission stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Waiting,
    Admitted { conn: ConnRef, wait_ms: u32 },
    Refused,
}

/// One connection's mailbox from the loop to its task.
#[derive(Debug)]
pub struct ConnCtl {
    admission: Cell<Admission>,
    /// Few at a time: a write and a close at most, or a park and an unpark.
    commands: RefCell<VecDeque<Command>>,
    waker: RefCell<Option<Waker>>,
}

impl ConnCtl {
    /// A mailbox for a connection not yet admitted.
    pub fn new() -> Rc<ConnCtl> {
        Rc::new(ConnCtl {
            admission: Cell::new(Admission::Waiting),
            commands: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
        })
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The loop admitted the connection as `conn`; its task starts reading after `wait`.
    pub fn admit(&self, conn: ConnRef, wait: Duration) {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        self.admission.set(Admission::Admitted { conn, wait_ms });
        self.wake();
    }

    /// The loop refused the connection: its task writes `frame` (best effort) and ends.
    pub fn refuse(&self, frame: Vec<u8>) {
        self.admission.set(Admission::Refused);
        self.commands.borrow_mut().push_back(Command::Close(frame));
        self.wake();
    }

    /// Queues a command for the task.
    pub fn send(&self, c: Command) {
        self.commands.borrow_mut().push_back(c);
        self.wake();
    }

    /// True when a `Close` waits (a blocked write gives up for it).
    fn close_waiting(&self) -> bool {
        self.commands.borrow().iter().any(|c| matches!(c, Command::Close(_)))
    }

    /// Resolves with the admission decision: the connection and its wait, or `None` (refused).
    async fn admitted(&self) -> Option<(ConnRef, Duration)> {
        futures_lite::future::poll_fn(|cx| match self.admission.get() {
            Admission::Waiting => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
            Admission::Admitted { conn, wait_ms } => {
                Poll::Ready(Some((conn, Duration::from_millis(u64::from(wait_ms)))))
            }
            Admission::Refused => Poll::Ready(None),
        })
        .await
    }

    /// Resolves with the next command.
    async fn next(&self) -> Command {
        futures_lite::future::poll_fn(|cx| {
            let mut commands = self.commands.borrow_mut();
            match commands.pop_front() {
                Some(c) => {
                    if commands.is_empty() {
                        // Idle connections (the great majority) keep no command buffer.
                        *commands = VecDeque::new();
                    }
                    Poll::Ready(c)
                }
                None => {
                    *self.waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Resolves once a `Close` is queued.
    async fn close_requested(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.close_waiting() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A one-way signal from the loop to the shard's other tasks (listeners, admin): set once.
#[derive(Debug, Default)]
pub struct Stop {
    set: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Stop {
    /// An unset signal.
    pub fn new() -> Rc<Stop> {
        Rc::new(Stop::default())
    }

    /// Sets it and wakes every waiter.
    pub fn fire(&self) {
        self.set.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once it is set.
    pub async fn wait(&self) {
        futures_lite::future::poll_fn(|cx| {
            if self.set.get() {
                Poll::Ready(())
            } else {
                // One waker per waiting task, however often it is polled.
                let mut wakers = self.wakers.borrow_mut();
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}

/// A wake-up from one task to the loop, kept until the loop takes it: one waker, replaced, never
/// accumulated however often the loop polls.
#[derive(Debug, Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// A notify with nothing pending.
    pub fn new() -> Rc<Notify> {
        Rc::new(Notify::default())
    }

    /// Sets it and wakes the loop.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Ready (and cleared) when set; registers the loop's waker otherwise.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.replace(false) {
            Poll::Ready(())
        } else {
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}
