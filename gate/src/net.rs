//! Socket helpers glommio does not offer: listeners with a chosen backlog, and non-blocking
//! send/recv straight on a connection's fd for draining bursts and coalesced writes.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Binds a listening socket with `SO_REUSEPORT` (one per shard, the kernel spreads accepts) and
/// the given backlog. glommio's own `bind` fixes the backlog at 1024, which a reconnect storm
/// overflows into 1 s SYN retransmits.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&SockAddr::from(addr))?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock.into())
}

/// Binds one listener per shard on the same port: the first binds `addr` (port 0 picks a free
/// port), the others bind the port it got.
pub fn listen_all(addr: SocketAddr, backlog: u32, shards: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = listen(addr, backlog)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..shards {
        all.push(listen(bound, backlog)?);
    }
    Ok(all)
}

/// Outcome of a non-blocking socket call.
#[derive(Debug, PartialEq, Eq)]
pub enum Io {
    /// This many bytes moved.
    Done(usize),
    /// The socket would block.
    WouldBlock,
    /// The peer closed (recv returned 0).
    Eof,
}

/// `recv` with `MSG_DONTWAIT`, whatever the socket's blocking mode.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Io> {
    // SAFETY: buf is valid for writes of buf.len() bytes; fd is owned by the caller's stream.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    classify(n)
}

/// `send` with `MSG_DONTWAIT | MSG_NOSIGNAL` (a closed peer is an error, not a SIGPIPE).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<Io> {
    // SAFETY: buf is valid for reads of buf.len() bytes; fd is owned by the caller's stream.
    let n =
        unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    classify(n)
}

fn classify(n: isize) -> io::Result<Io> {
    if n > 0 {
        return Ok(Io::Done(n as usize));
    }
    if n == 0 {
        return Ok(Io::Eof);
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(Io::WouldBlock),
        io::ErrorKind::Interrupted => Ok(Io::WouldBlock),
        _ => Err(e),
    }
}

/// ms since the Unix epoch: tokens expire by the wall clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `recv` with `MSG_DONTWAIT` into the spare capacity of `buf`, growing its length.
pub fn recv_into(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<Io> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv writes at most spare.len() bytes into the spare capacity and returns how
    // many; only those are exposed by set_len below.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    let r = classify(n)?;
    if let Io::Done(k) = r {
        // SAFETY: the kernel initialised k bytes past the old length.
        unsafe { buf.set_len(buf.len() + k) };
    }
    Ok(r)
}
