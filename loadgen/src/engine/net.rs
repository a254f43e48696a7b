//! Sockets for simulated apps: a non-blocking TCP connect from a chosen source address, and the
//! two hand-overs that need raw descriptors (a `send` without waiting, and a socket given to
//! glommio for the misbehaving peers of [`crate::bad`]).
//!
//! Every `unsafe` of loadgen's connections is in this module. Its invariants:
//! 1. Each call works on a descriptor the caller owns for the call's duration (a `Socket` or a
//!    stream it borrows), with pointers to live values of the sizes given.
//! 2. A descriptor changes owner only by `into_raw_fd` followed at once by `from_raw_fd`, so
//!    exactly one value owns (and closes) it.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

/// A non-blocking TCP socket to `to` (Nagle off, so each write is its own segment), bound to
/// `source` if given, with its connect started: it completes when the socket turns writable.
pub fn connect(to: SocketAddr, source: Option<IpAddr>, rcvbuf: Option<usize>) -> io::Result<Socket> {
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
        // SAFETY (invariant 1): our own socket, a pointer to a live c_int of the size given.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
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
    Ok(sock)
}

/// Asks the kernel to stamp each segment `sock` receives with the wall-clock time it arrived
/// (`SO_TIMESTAMPNS`), read back by [`recv_stamped`]: the push runs tell the time a delivery
/// waited in loadgen's socket from the time it took to get there.
pub fn stamp_arrivals(sock: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY (invariant 1): our own socket, a pointer to a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `recv` into `buf` on a socket [`stamp_arrivals`] set up: (bytes read, when the last segment
/// read arrived, wall-clock µs; `None` if the kernel gave no stamp).
pub fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    // Room for one control message holding a timespec, aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zero is a valid value of every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY (invariant 1): iov points into `buf`, valid for writes of its length; the control
    // buffer is live, of the length given; the caller's stream owns fd for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the kernel filled msg's control buffer; CMSG_FIRSTHDR/NXTHDR stay inside it, and
    // an SCM_TIMESTAMPNS message's data is one timespec.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                stamp = Some(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// `sock` as a glommio stream (glommio speaks an older socket2, so the descriptor is handed
/// over raw).
pub fn into_glommio(sock: Socket) -> glommio::net::TcpStream {
    // SAFETY (invariant 2): `into_raw_fd` gives up the only owner of the descriptor; glommio's
    // stream becomes the next.
    unsafe { <glommio::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(sock.into_raw_fd()) }
}

/// `send` with `MSG_DONTWAIT | MSG_NOSIGNAL` on a socket the caller holds: bytes taken (0 when
/// the socket is full).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY (invariant 1): buf is valid for reads of buf.len() bytes; the caller's stream
        // owns fd for the call.
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
