//! The app port's own io_uring, one per shard beside glommio's: a multishot accept on the
//! listener, a multishot receive per connection into a provided-buffer ring, and sends
//! submitted together once per turn of the shard's loop. The loop calls [`AppRing::drain`] and
//! gets [`Completion`]s; it never touches the ring otherwise.
//!
//! This module holds every `unsafe` of the app port. Its invariants:
//! 1. **Buffers the kernel may write** (the provided-buffer ring and its data) are one pair of
//!    anonymous mappings owned by [`BufRing`], unmapped only after the io_uring is dropped
//!    (`AppRing`'s field order: `ring` drops before `bufs`).
//! 2. **Buffers the kernel may read** (a send's bytes) are owned by the ring in `sends` from the
//!    moment the entry is queued until its completion is reaped; the caller gets them back then.
//!    A `Vec`'s heap block does not move while the `Vec` itself moves.
//! 3. **A received buffer** is lent to the caller only inside `drain`'s callback and handed back
//!    to the kernel right after it returns, so no slice outlives its recycling.
//! 4. **Entries** point at nothing else (accept, multishot receive, cancel and close carry no
//!    pointers), so pushing them is sound whatever the caller does.

use io_uring::types::{BufRingEntry, Fd};
use io_uring::{cqueue, opcode, squeue, IoUring};
use slab::Slab;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

/// The kernel refuses provided-buffer rings larger than this.
pub const MAX_BUFFERS: u32 = 32_768;
const BUF_GROUP: u16 = 0;

// user_data: the operation in the top 4 bits, its subject below.
const OP_SHIFT: u32 = 60;
const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_CANCEL: u64 = 4;
const SUBJECT: u64 = (1 << OP_SHIFT) - 1;

/// Sizes of one app ring.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    /// Provided receive buffers (a power of two, at most `MAX_BUFFERS`): sized to a batch of
    /// completions, not to the number of connections.
    pub buffers: u32,
    /// Bytes per receive buffer.
    pub buffer_size: u32,
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Completion queue entries.
    pub cq_entries: u32,
}

/// What the kernel finished, as the loop sees it.
#[derive(Debug)]
pub enum Completion<'a> {
    /// A connection was accepted (the accept stays armed while `more`).
    Accepted {
        /// The new socket, owned by the caller now.
        fd: RawFd,
    },
    /// The multishot accept ended or failed; the ring re-arms it.
    AcceptFailed {
        /// The error (negative errno).
        res: i32,
    },
    /// Bytes received on the connection `token`.
    Data {
        /// The caller's token of the connection.
        token: u64,
        /// The bytes, valid only during the callback.
        bytes: &'a [u8],
    },
    /// The multishot receive of `token` ended: `res` is 0 (the peer closed), a negative errno
    /// (a reset, a cancel), or `ENOBUFS` (the buffer ring ran dry: re-arm, nothing was lost).
    RecvEnded {
        /// The caller's token of the connection.
        token: u64,
        /// 0 or a negative errno.
        res: i32,
    },
    /// A send finished: `res` bytes written (or a negative errno); `buf` is the caller's buffer
    /// back.
    Sent {
        /// The caller's token of the connection.
        token: u64,
        /// Bytes written, or a negative errno.
        res: i32,
        /// The buffer that was sent.
        buf: Vec<u8>,
    },
}

/// One shard's app ring.
pub struct AppRing {
    // Field order is drop order: the ring (which may still point into the buffers) first.
    ring: IoUring,
    bufs: BufRing,
    sends: Slab<(u64, Vec<u8>)>,
    /// Entries that found the submission queue full, in order (see `push`).
    backlog: VecDeque<squeue::Entry>,
    listen_fd: RawFd,
    efd: RawFd,
    accept_armed: bool,
    /// Completions that the kernel had to keep on its overflow list, counted when seen.
    pub overflows: u64,
}

impl std::fmt::Debug for AppRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppRing").field("sends", &self.sends.len()).finish_non_exhaustive()
    }
}

impl AppRing {
    /// A ring for the listening socket `listen_fd` (not owned), with an eventfd the kernel
    /// signals on every completion.
    pub fn new(listen_fd: RawFd, cfg: RingConfig) -> io::Result<AppRing> {
        if !cfg.buffers.is_power_of_two() || cfg.buffers > MAX_BUFFERS || cfg.buffer_size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffers: a power of two up to 32768"));
        }
        // Single issuer: only the shard's thread submits. Not cooperative task work: with it the
        // kernel posts completions only when the thread enters the kernel for this ring, and the
        // thread sleeps in glommio's ring, so completions (an app's ack, a request) waited for
        // the next unrelated wake-up, up to hundreds of milliseconds.
        let ring = IoUring::builder()
            .setup_cqsize(cfg.cq_entries)
            .setup_single_issuer()
            .build(cfg.sq_entries)
            .or_else(|_| IoUring::builder().setup_cqsize(cfg.cq_entries).build(cfg.sq_entries))?;
        let bufs = BufRing::new(cfg.buffers, cfg.buffer_size)?;
        // SAFETY: `bufs` outlives `ring` (field order, invariant 1).
        unsafe { bufs.register(&ring, BUF_GROUP)? };
        // Blocking on purpose: the loop reads it through glommio's ring, which waits on a blocking
        // file and would return EAGAIN at once on a non-blocking one.
        // SAFETY: eventfd has no memory arguments.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        ring.submitter().register_eventfd(efd)?;
        let mut me = AppRing {
            ring,
            bufs,
            sends: Slab::new(),
            backlog: VecDeque::new(),
            listen_fd,
            efd,
            accept_armed: false,
            overflows: 0,
        };
        me.arm_accept();
        me.submit()?;
        Ok(me)
    }

    /// Whether the kernel signals the eventfd on completions: off while the loop harvests on its
    /// window anyway, so a busy shard is not woken for each batch.
    pub fn set_eventfd(&mut self, on: bool) {
        let cq = self.ring.completion();
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    /// The eventfd the kernel signals when completions are posted.
    pub fn eventfd(&self) -> RawFd {
        self.efd
    }

    fn push(&mut self, e: &squeue::Entry) {
        // Entries wait in order behind any that could not be queued yet.
        if self.backlog.is_empty() && Self::try_queue(&mut self.ring, e) {
            return;
        }
        // Full: hand what is queued to the kernel and move the waiting ones in; what still does
        // not fit waits for the next submit. Nothing is dropped: a dropped receive would leave a
        // connection deaf, a dropped send its buffer stranded. Bounded: a connection has at most
        // one receive, one send and one cancel outstanding.
        self.backlog.push_back(e.clone());
        let _ = self.ring.submit();
        self.move_backlog();
    }

    fn try_queue(ring: &mut IoUring, e: &squeue::Entry) -> bool {
        // SAFETY: invariant 4 (and 2 for sends, queued by `send`).
        unsafe { ring.submission().push(e) }.is_ok()
    }

    /// Moves waiting entries into the submission queue while it has room.
    fn move_backlog(&mut self) {
        while let Some(e) = self.backlog.front() {
            if !Self::try_queue(&mut self.ring, e) {
                break;
            }
            self.backlog.pop_front();
        }
    }

    fn arm_accept(&mut self) {
        let e = opcode::AcceptMulti::new(Fd(self.listen_fd))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(OP_ACCEPT << OP_SHIFT);
        self.push(&e);
        self.accept_armed = true;
    }

    /// Arms the multishot receive of the connection `token` on `fd`.
    pub fn arm_recv(&mut self, fd: RawFd, token: u64) {
        let e = opcode::RecvMulti::new(Fd(fd), BUF_GROUP)
            .build()
            .user_data((OP_RECV << OP_SHIFT) | (token & SUBJECT));
        self.push(&e);
    }

    /// Cancels the receive of the connection `token` (its `RecvEnded` follows).
    pub fn cancel_recv(&mut self, token: u64) {
        let target = (OP_RECV << OP_SHIFT) | (token & SUBJECT);
        let e = opcode::AsyncCancel::new(target).build().user_data(OP_CANCEL << OP_SHIFT);
        self.push(&e);
    }

    /// Queues a send of `buf` on `fd`; the ring keeps `buf` until its `Sent` comes.
    pub fn send(&mut self, fd: RawFd, token: u64, buf: Vec<u8>) {
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let id = self.sends.insert((token, buf)) as u64;
        let e = opcode::Send::new(Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data((OP_SEND << OP_SHIFT) | id);
        self.push(&e);
    }

    /// Hands every queued entry to the kernel (one system call for all of a turn's work).
    pub fn submit(&mut self) -> io::Result<()> {
        // Bounded: each round hands the kernel a full queue or ends.
        for _ in 0..=self.backlog.len() / 1024 + 1 {
            self.move_backlog();
            if self.ring.submission().is_empty() && !self.ring.submission().cq_overflow() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                // The kernel is busy (its completion queue is backed up): the rest waits for
                // the next turn, after this one's harvest.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR | libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Takes at most `max` completions, calling `f` for each; returns how many there were.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(Completion<'_>)) -> usize {
        if self.ring.submission().cq_overflow() {
            // Completions wait on the kernel's overflow list: entering the kernel moves them in.
            self.overflows += 1;
            let _ = self.ring.submit();
        }
        let mut n = 0;
        let mut rearm_accept = false;
        while n < max {
            let Some(cqe) = self.ring.completion().next() else { break };
            n += 1;
            let (data, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            let subject = data & SUBJECT;
            match data >> OP_SHIFT {
                OP_ACCEPT => {
                    if res >= 0 {
                        f(Completion::Accepted { fd: res });
                    } else {
                        f(Completion::AcceptFailed { res });
                    }
                    if !cqueue::more(flags) {
                        rearm_accept = true;
                    }
                }
                OP_RECV => {
                    let bid = cqueue::buffer_select(flags);
                    if res > 0 {
                        if let Some(bid) = bid {
                            let bytes = self.bufs.get(bid, res as usize);
                            f(Completion::Data { token: subject, bytes });
                        }
                    }
                    // Invariant 3: the buffer goes back once the callback is done with it.
                    if let Some(bid) = bid {
                        self.bufs.recycle(bid);
                    }
                    if !cqueue::more(flags) {
                        // A receive that ended after data (the kernel's choice) is re-armed by
                        // the caller like one that ran dry.
                        let res = if res > 0 { -libc::ENOBUFS } else { res };
                        f(Completion::RecvEnded { token: subject, res });
                    }
                }
                OP_SEND => {
                    if let Some((token, buf)) = self.sends.try_remove(subject as usize) {
                        f(Completion::Sent { token, res, buf });
                    }
                }
                _ => {} // cancels: their target's own completion says what happened
            }
        }
        if rearm_accept {
            self.arm_accept();
        }
        n
    }

    /// Sends in flight (each holds its buffer).
    pub fn sends_in_flight(&self) -> usize {
        self.sends.len()
    }
}

impl Drop for AppRing {
    fn drop(&mut self) {
        // SAFETY: our eventfd, closed once.
        unsafe { libc::close(self.efd) };
    }
}

/// Provided buffers: one anonymous mapping for the ring of descriptors the kernel picks from,
/// one for the buffers themselves. Shared with perf's ceiling server, which receives the same way.
#[derive(Debug)]
pub struct BufRing {
    ring: *mut BufRingEntry,
    ring_len: usize,
    data: *mut u8,
    data_len: usize,
    buf_size: u32,
    entries: u32,
    tail: u16,
}

impl BufRing {
    /// `entries` buffers (a power of two) of `buf_size` bytes, every one handed to the kernel.
    pub fn new(entries: u32, buf_size: u32) -> io::Result<BufRing> {
        let ring_len = entries as usize * std::mem::size_of::<BufRingEntry>();
        let data_len = entries as usize * buf_size as usize;
        let ring = map_anonymous(ring_len)?.cast::<BufRingEntry>();
        let data = match map_anonymous(data_len) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: `ring` was mapped just above with this length.
                unsafe { libc::munmap(ring.cast(), ring_len) };
                return Err(e);
            }
        };
        let mut bufs = BufRing { ring, ring_len, data, data_len, buf_size, entries, tail: 0 };
        for bid in 0..entries {
            bufs.put(bid as u16);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Registers the ring with `ring` as buffer group `group`.
    ///
    /// # Safety
    /// `ring` must be dropped (or the group unregistered) before `self`: the kernel writes into
    /// these mappings for as long as the group is registered.
    pub unsafe fn register(&self, ring: &IoUring, group: u16) -> io::Result<()> {
        // SAFETY: the caller keeps the mappings alive as long as the registration (above).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(self.ring as u64, self.entries as u16, group, 0)
        }
    }

    /// The first `len` bytes of buffer `bid`.
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        if u32::from(bid) >= self.entries {
            return &[];
        }
        let len = len.min(self.buf_size as usize);
        // SAFETY: `bid` < entries, so the range lies inside the data mapping; the kernel wrote
        // it before posting the completion and does not touch it again until it is recycled
        // (invariant 3).
        unsafe { std::slice::from_raw_parts(self.data.add(bid as usize * self.buf_size as usize), len) }
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        if u32::from(bid) < self.entries {
            self.put(bid);
            self.publish();
        }
    }

    fn put(&mut self, bid: u16) {
        let mask = (self.entries - 1) as u16;
        let slot = usize::from(self.tail & mask);
        // SAFETY: `slot` < entries, inside the ring mapping; the setters never write the `resv`
        // field that doubles as the tail in the first entry.
        let entry = unsafe { &mut *self.ring.add(slot) };
        entry.set_addr(self.data as u64 + u64::from(bid) * u64::from(self.buf_size));
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail is a u16 at a 2-byte aligned offset of the first entry, shared with
        // the kernel, which only reads it; the release store orders the entries before it.
        let tail = unsafe { &*BufRingEntry::tail(self.ring).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both were mapped in `new` with these lengths; the io_uring that could write
        // them was dropped first (invariant 1).
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_len);
            libc::munmap(self.data.cast(), self.data_len);
        }
    }
}

fn map_anonymous(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping aliases nothing.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr.cast())
}
