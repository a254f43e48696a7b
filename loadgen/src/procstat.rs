//! CPU time and memory of a process from /proc, and finding the gate's pid from the port it
//! listens on (/proc/net/tcp{,6} gives the listening socket's inode; the process holding a file
//! descriptor on `socket:[inode]` is the gate).

use std::path::Path;

/// CPU and memory of a process at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Clock ticks per second, the unit of the CPU times in /proc/PID/stat and /proc/stat.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a system value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Samples process `pid`; `None` if it is gone or unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample { cpu_s: parse_stat_ticks(&stat)? as f64 / clk_tck(), rss_bytes: parse_vm_rss(&status)? })
}

/// CPU seconds of every thread of process `pid` so far, from the scheduler's nanosecond
/// accounting (`/proc/PID/task/*/schedstat`), for short spans that 10 ms ticks would blur (a
/// storm, a ramp); `None` if the process is gone.
pub fn schedstat_cpu_s(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns: u64 = 0;
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        ns += text.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

/// This process's CPU seconds so far.
pub fn self_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat_ticks(&s))
        .map_or(0.0, |t| t as f64 / clk_tck())
}

/// The calling thread's id (its `/proc/self/task` entry).
pub fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU seconds of thread `tid` of this process so far; `None` for 0 or a thread that is gone.
pub fn thread_cpu_s(tid: u32) -> Option<f64> {
    if tid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    Some(parse_stat_ticks(&stat)? as f64 / clk_tck())
}

/// utime + stime from a /proc/PID/stat line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": state is field 3; utime and stime are fields 14 and 15.
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS from /proc/PID/status, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Inodes of sockets listening on `port` in a /proc/net/tcp or tcp6 table.
pub fn parse_listen_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port && *f.get(3)? == LISTEN).then(|| f.get(9)?.parse().ok()).flatten()
        })
        .collect()
}

/// The pid of the process listening on TCP `port`, other than this one.
pub fn find_listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(table) {
            inodes.extend(parse_listen_inodes(&t, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        if holds_any(&entry.path().join("fd"), &wanted) {
            return Some(pid);
        }
    }
    None
}

/// True if a file descriptor in `fd_dir` links to one of `targets`.
fn holds_any(fd_dir: &Path, targets: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(fd_dir) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|l| l.to_str().map(|s| targets.iter().any(|t| t == s)))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_skip_odd_command_names() {
        let stat = "4242 (gate (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 100";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn vm_rss() {
        assert_eq!(parse_vm_rss("Name:\tgate\nVmRSS:\t  12345 kB\nThreads: 3\n"), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tgate\n"), None);
    }

    #[test]
    fn listen_inodes() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                 0: 00000000:1BBC 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0 100 0 0 10 0\n\
                 1: 0100007F:1BBC 0100007F:A000 01 00000000:00000000 00:00000000 00000000  1000        0 778 1 0 100 0 0 10 0\n\
                 2: 0100007F:1C20 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 779 1 0 100 0 0 10 0\n";
        assert_eq!(parse_listen_inodes(t, 7100), vec![777]);
        assert_eq!(parse_listen_inodes(t, 7200), vec![779]);
        assert!(parse_listen_inodes(t, 7300).is_empty());
    }

    #[test]
    fn reads_this_threads_cpu() {
        let tid = current_tid().expect("a tid");
        assert!(thread_cpu_s(tid).is_some_and(|s| s >= 0.0));
        assert_eq!(thread_cpu_s(0), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_bytes > 0);
        assert!(self_cpu_s() >= 0.0);
    }
}
