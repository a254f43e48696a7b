//! The floor under loadgen's cost per GPS send: the least CPU one sending process spends per
//! 64-byte TCP segment on loopback at a given shape, with nothing else done (no protocol, no
//! schedule bookkeeping beyond one tick loop). On loopback the receiver's softirq work (TCP
//! receive, waking the reader) runs in the sender's system call, so this figure is not the cost
//! of a `send` alone; it is what any load generator pays here, and what loadgen is measured
//! against.
//!
//! ```text
//! ceiling --listen 127.0.0.1:7999 --core 0 &
//! taskset -c 1 cargo run --release -p perf --example send_floor -- 127.0.0.1:7999 15000 3 10 send
//! taskset -c 1 cargo run --release -p perf --example send_floor -- 127.0.0.1:7999 15000 3 10 uring
//! ```
//! Arguments: address, connections, segments/s per connection, seconds, and the mode: `send`
//! (one non-blocking `send` per segment), `uring` (every segment of a 1 ms tick as one io_uring
//! submission) or `uring-fixed` (the same with the sockets registered, so the kernel skips the
//! descriptor lookup per send); `shuffled` after it sends to the connections in a random order
//! rather than in the order they were opened.

use io_uring::types::{Fd, Fixed};
use io_uring::{opcode, IoUring};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

const SEGMENT: [u8; 64] = [0xF7; 64];
const TICK: Duration = Duration::from_millis(1);

fn cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct handed to it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if !(6..=7).contains(&a.len()) {
        eprintln!("usage: send_floor ADDR CONNS RATE_PER_CONN SECONDS send|uring|uring-fixed [shuffled]");
        std::process::exit(2);
    }
    let addr: SocketAddr = a[1].parse().expect("address");
    let conns: usize = a[2].parse().expect("connections");
    let rate: f64 = a[3].parse().expect("rate");
    let secs: f64 = a[4].parse().expect("seconds");
    let mode = a[5].as_str();
    let uring = mode.starts_with("uring");
    let fixed = mode == "uring-fixed";
    let streams: Vec<TcpStream> = (0..conns)
        .map(|_| {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let mut fds: Vec<RawFd> = streams.iter().map(AsRawFd::as_raw_fd).collect();
    if a.get(6).is_some_and(|s| s == "shuffled") {
        // The same connections in a random order (a fleet's drivers report in no order): the
        // kernel then finds each socket cold, as loadgen's sends do.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in (1..fds.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            fds.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    eprintln!("send_floor: {conns} connections up");
    let mut ring = IoUring::new(4096).expect("io_uring");
    if fixed {
        ring.submitter().register_files(&fds).expect("register files");
    }
    // Connection i sends at i/N of each interval: an even spread, as a jittered fleet is.
    let interval = 1.0 / rate;
    let total = conns as f64 * rate; // segments/s
    let start = Instant::now();
    let cpu0 = cpu_s();
    let mut sent = 0u64;
    let mut next = 0usize; // the next connection due, round robin
    let mut due_total = 0u64;
    let mut late = 0u64;
    loop {
        let t = start.elapsed().as_secs_f64();
        if t >= secs {
            break;
        }
        let due = (t * total) as u64;
        let mut batch = 0u32;
        while due_total < due {
            let sched = due_total as f64 / total;
            if t - sched > 0.010 {
                late += 1;
            }
            let fd = fds[next];
            next = (next + 1) % conns;
            due_total += 1;
            if uring {
                let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                let e = if fixed {
                    let i = (next + conns - 1) % conns;
                    opcode::Send::new(Fixed(i as u32), SEGMENT.as_ptr(), 64).flags(flags).build()
                } else {
                    opcode::Send::new(Fd(fd), SEGMENT.as_ptr(), 64).flags(flags).build()
                };
                // SAFETY: the entry points at a static buffer.
                while unsafe { ring.submission().push(&e) }.is_err() {
                    ring.submit().expect("submit");
                }
                batch += 1;
            } else {
                // SAFETY: a static buffer of the length given, our own socket.
                let n = unsafe {
                    libc::send(fd, SEGMENT.as_ptr().cast(), 64, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                };
                if n == 64 {
                    sent += 1;
                }
            }
        }
        if uring && batch > 0 {
            ring.submit().expect("submit");
            for c in ring.completion() {
                if c.result() == 64 {
                    sent += 1;
                }
            }
        }
        let _ = interval;
        std::thread::sleep(TICK);
    }
    if uring {
        let _ = ring.submit_and_wait(0);
        for c in ring.completion() {
            if c.result() == 64 {
                sent += 1;
            }
        }
    }
    let cpu = cpu_s() - cpu0;
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{} {conns} conns x {rate}/s: sent {sent} ({:.0}/s), late {late}, cpu {:.2} s ({:.0} % of a core), {:.2} us per send",
        mode,
        sent as f64 / wall,
        cpu,
        100.0 * cpu / wall,
        1e6 * cpu / sent.max(1) as f64
    );
    drop(streams);
}
