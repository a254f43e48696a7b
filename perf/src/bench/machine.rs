//! What a result is worth depends on where it was measured: the machine (cores, kernel, CPU,
//! limits, load), the versions of every server, and the time. Also the kernel's own memory per
//! socket, from /proc/net/sockstat and /proc/slabinfo. Parsers are pure; readers return `None`
//! (never fail the run) when a file is missing or unreadable.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The machine a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// Cores online.
    pub cores: usize,
    /// `uname -r`.
    pub kernel: String,
    /// The CPU's model name.
    pub cpu_model: String,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Open files one process may have (the soft limit, which perf cannot raise here).
    pub open_files_limit: u64,
    /// net.core.somaxconn.
    pub somaxconn: Option<u64>,
    /// The 1-minute load average when the bench started, and when it ended: other work on
    /// the machine shows here.
    pub loadavg_start: Option<f64>,
    /// See `loadavg_start`.
    pub loadavg_end: Option<f64>,
    /// The servers and loadgen ran at real-time priority (`--realtime`).
    #[serde(default)]
    pub realtime: bool,
}

impl Machine {
    /// Reads this machine.
    pub fn read() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_default();
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        // SAFETY: getrlimit writes into the struct we pass.
        let open_files_limit = unsafe {
            let mut r: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
                r.rlim_cur
            } else {
                0
            }
        };
        Machine {
            cores: loadgen::cli::online_cpus(),
            kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
            cpu_model,
            memory_bytes,
            open_files_limit,
            somaxconn: read_trimmed("/proc/sys/net/core/somaxconn").and_then(|s| s.parse().ok()),
            loadavg_start: loadavg(),
            loadavg_end: None,
            realtime: super::servers::realtime(),
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    read_trimmed("/proc/loadavg")?.split_whitespace().next()?.parse().ok()
}

/// The first line a command prints (stdout, else stderr), bounded; `None` if it cannot run.
pub fn first_line(program: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stdin(std::process::Stdio::null()).output().ok()?;
    let text = if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) { out.stdout } else { out.stderr };
    let line = String::from_utf8_lossy(&text).lines().map(str::trim).find(|l| !l.is_empty())?.to_owned();
    Some(line.chars().take(200).collect())
}

/// The source tree's commit, with `-dirty` when it has changes (so a figure names its code).
pub fn git_revision(root: &Path) -> Option<String> {
    let rev =
        Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(root).output().ok()?;
    if !rev.status.success() {
        return None;
    }
    let mut s = String::from_utf8_lossy(&rev.stdout).trim().to_owned();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root)
        .output()
        .ok()?;
    if !dirty.stdout.is_empty() {
        s.push_str("-dirty");
    }
    Some(s)
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-11-27T08:24:20Z`.
pub fn utc_iso(secs: u64) -> String {
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", t / 3600, t / 60 % 60, t % 60)
}

/// `2026-11-27T08-24-20Z`: the same, safe in a file name on every system.
pub fn utc_stamp(secs: u64) -> String {
    utc_iso(secs).replace(':', "-")
}

/// Kernel memory that sockets hold, at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelMem {
    /// /proc/net/sockstat `TCP: ... mem N`: pages of socket buffers charged to TCP.
    pub tcp_mem_pages: u64,
    /// TCP sockets allocated (`alloc`).
    pub tcp_alloc: u64,
    /// Bytes of the TCP socket slab (struct tcp_sock), when /proc/slabinfo is readable.
    pub tcp_slab_bytes: Option<u64>,
    /// Bytes of the socket inode slab.
    pub sock_inode_slab_bytes: Option<u64>,
}

impl KernelMem {
    /// Reads /proc now.
    pub fn read() -> Option<KernelMem> {
        let mut k = parse_sockstat(&std::fs::read_to_string("/proc/net/sockstat").ok()?)?;
        if let Ok(slab) = std::fs::read_to_string("/proc/slabinfo") {
            k.tcp_slab_bytes = parse_slab_bytes(&slab, "TCP");
            k.sock_inode_slab_bytes = parse_slab_bytes(&slab, "sock_inode_cache");
        }
        Some(k)
    }

    /// Bytes held, all parts counted (buffers at 4 KiB a page).
    pub fn bytes(&self) -> u64 {
        self.tcp_mem_pages * 4096 + self.tcp_slab_bytes.unwrap_or(0) + self.sock_inode_slab_bytes.unwrap_or(0)
    }
}

/// The `TCP:` line of /proc/net/sockstat.
pub fn parse_sockstat(text: &str) -> Option<KernelMem> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let field =
        |name: &str| f.iter().position(|x| *x == name).and_then(|i| f.get(i + 1)?.parse::<u64>().ok());
    Some(KernelMem { tcp_mem_pages: field("mem")?, tcp_alloc: field("alloc")?, ..KernelMem::default() })
}

/// Bytes of slab `name` in /proc/slabinfo: active objects × object size.
pub fn parse_slab_bytes(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).take(3).filter_map(|x| x.parse().ok()).collect();
    match f.as_slice() {
        [active, _total, size] => Some(active * size),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_iso(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_iso(1_798_359_860), "2026-12-27T08:24:20Z");
        assert_eq!(utc_stamp(1_798_359_860), "2026-12-27T08-24-20Z");
        assert_eq!(utc_iso(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn sockstat_and_slabs() {
        let s = "sockets: used 15\nTCP: inuse 4 orphan 0 tw 5 alloc 7 mem 183\nUDP: inuse 0 mem 0\n";
        let k = parse_sockstat(s).expect("parsed");
        assert_eq!((k.tcp_mem_pages, k.tcp_alloc), (183, 7));
        assert!(parse_sockstat("UDP: inuse 0 mem 0\n").is_none());
        let slab = "slabinfo - version: 2.1\n# name <active_objs> ...\n\
                    TCPv6                 26     26   2496   13    8 : tunables 0 0 0 : slabdata 2 2 0\n\
                    TCP                  105    156   2368   13    8 : tunables 0 0 0 : slabdata 12 12 0\n";
        assert_eq!(parse_slab_bytes(slab, "TCP"), Some(105 * 2368));
        assert_eq!(parse_slab_bytes(slab, "TCPv6"), Some(26 * 2496));
        assert_eq!(parse_slab_bytes(slab, "UDP"), None);
        let k = KernelMem {
            tcp_mem_pages: 2,
            tcp_alloc: 0,
            tcp_slab_bytes: Some(10),
            sock_inode_slab_bytes: None,
        };
        assert_eq!(k.bytes(), 8202);
    }
}
