//! Sockets for simulated apps: connecting from a chosen source address, non-blocking writes
//! from the executor's shared buffer, and the slow path when the socket is full.
//!
//! A connection owns no write buffer while the socket takes what is written (the common case):
//! frames are built in the executor's shared buffer and sent at once. Only bytes the socket
//! would not take are copied into the connection's own `blocked` buffer, which the connection's
//! task then writes with glommio (waiting for writability), bounded by `MAX_BLOCKED` and
//! `WRITE_TIMEOUT`.

use glommio::net::TcpStream;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

/// Most bytes one connection may have waiting for its socket; past it the connection is
/// dropped (the gate is not reading it).
pub const MAX_BLOCKED: usize = 256 * 1024;
/// Longest a blocked write (or the connect under it) may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's write side: its fd and whatever the socket did not take yet.
#[derive(Debug, Default)]
pub struct Io {
    /// The socket, valid while the task holds the stream.
    pub fd: RawFd,
    /// Bytes waiting for the socket, in order; empty (and unallocated) normally.
    pub blocked: Vec<u8>,
    /// The socket failed or the bound was passed: the connection must end.
    pub dead: bool,
}

impl Io {
    /// Writes `frames` now, or queues them behind bytes already waiting.
    pub fn write(&mut self, frames: &[u8]) {
        if frames.is_empty() || self.dead {
            return;
        }
        if !self.blocked.is_empty() {
            if self.blocked.len() + frames.len() > MAX_BLOCKED {
                self.dead = true;
            } else {
                self.blocked.extend_from_slice(frames);
            }
            return;
        }
        match send(self.fd, frames) {
            Ok(n) if n == frames.len() => {}
            Ok(n) => self.blocked.extend_from_slice(&frames[n..]),
            Err(_) => self.dead = true,
        }
    }
}

/// Creates a non-blocking TCP socket to `to`, bound to `source` if given, and starts
/// connecting. The first write completes the connect (it waits for writability), so a refused
/// connect shows up as that write's error.
pub fn connect(to: SocketAddr, source: Option<IpAddr>, rcvbuf: Option<usize>) -> io::Result<TcpStream> {
    let domain = if to.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(bytes) = rcvbuf {
        sock.set_recv_buffer_size(bytes)?;
    }
    if let Some(ip) = source {
        // Without this, bind() reserves an ephemeral port for every destination, capping a
        // source address at ~28k connections; with it, the port is picked at connect time
        // per 4-tuple.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a pointer to a live c_int of the right size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match sock.connect(&SockAddr::from(to)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // glommio speaks an older socket2; hand it the fd.
    // SAFETY: the fd is a TCP socket this function owns; into_raw_fd gives up that ownership.
    Ok(unsafe {
        <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sock))
    })
}

/// `send` with `MSG_DONTWAIT | MSG_NOSIGNAL`: bytes taken (0 when the socket is full).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for reads of buf.len() bytes; fd is owned by the caller's stream.
        let n = unsafe {
            libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(0),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Writes the connection's blocked bytes, waiting for the socket (at most `WRITE_TIMEOUT`).
/// False if the connection must end.
pub async fn write_blocked(stream: &mut TcpStream, io: &mut Io) -> bool {
    use futures_lite::AsyncWriteExt;
    let buf = std::mem::take(&mut io.blocked);
    let done = futures_lite::future::or(async { Some(stream.write_all(&buf).await) }, async {
        glommio::timer::sleep(WRITE_TIMEOUT).await;
        None
    })
    .await;
    matches!(done, Some(Ok(())))
}
