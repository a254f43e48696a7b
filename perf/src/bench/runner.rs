//! Runs one loadgen process and watches it from outside: its JSON report (stdout), its live
//! lines (stderr), and every 100 ms its own CPU, the server's CPU and every core's busy time
//! from /proc.
//!
//! loadgen's report gives its CPU over the whole run; what tells whether it was the bottleneck
//! is its CPU during the measured window. The window is placed on perf's clock from the report
//! (`connections.ramp_s`, `window_s`) and the live lines (each says how long after loadgen's
//! start it was printed), and the 100 ms samples are read at its two ends. The same samples
//! give the CPU that other processes took on each core meanwhile: the machine is shared, and a
//! figure measured beside someone else's build says so.

use super::machine::KernelMem;
use super::servers::pinned;
use loadgen::procstat::clk_tck;
use loadgen::report::Report;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// stderr lines kept for an error message.
const TAIL_LINES: usize = 40;
/// Most bytes of stdout read (the report is a few KiB).
const MAX_STDOUT: u64 = 16 << 20;
/// Poll step while loadgen runs.
const POLL: Duration = Duration::from_millis(50);
/// Sampling period of the CPU figures.
const TICK: Duration = Duration::from_millis(100);
/// Most samples kept (an hour at 100 ms); a run is minutes.
const MAX_TICKS: usize = 36_000;

/// Busy and total time of one core so far, clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoreTimes {
    /// user + nice + system.
    pub busy: u64,
    /// Stolen by the hypervisor.
    pub steal: u64,
}

/// The CPU figures at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    /// Seconds since loadgen was started.
    pub t: f64,
    /// loadgen's CPU seconds.
    pub loadgen_cpu_s: f64,
    /// The server's CPU seconds.
    pub server_cpu_s: f64,
    /// Every core's times.
    pub cores: Vec<CoreTimes>,
}

/// A live line.
#[derive(Debug, Clone)]
pub struct Line {
    /// Seconds since loadgen was started, when perf read it.
    pub at: f64,
    /// The time loadgen printed in it (seconds since its own start).
    pub t: f64,
    /// Its phase label (`ramp`, `run`, `drain`, `storm`).
    pub label: String,
    /// The kernel's socket memory then.
    pub kernel: Option<KernelMem>,
}

/// What one loadgen run gave.
#[derive(Debug, Clone)]
pub struct LoadgenRun {
    /// Its report.
    pub report: Report,
    /// The same as it printed it (kept in the results).
    pub report_json: serde_json::Value,
    /// Its exit status (0 clean, 1 audit failed).
    pub exit_code: i32,
    /// Wall time of the whole process, s.
    pub wall_s: f64,
    /// CPU samples.
    pub ticks: Vec<Tick>,
    /// Its live lines.
    pub lines: Vec<Line>,
    /// The last stderr lines.
    pub stderr_tail: String,
}

/// CPU over the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowCpu {
    /// loadgen's share of one core.
    pub loadgen_share: f64,
    /// Share of the server's core that other processes (not the server) were busy.
    pub other_on_server_core: f64,
    /// Share of loadgen's core that other processes (not loadgen) were busy.
    pub other_on_loadgen_core: f64,
    /// Share of the server's core stolen by the hypervisor.
    pub steal_on_server_core: f64,
}

/// Every `cpuN` line of /proc/stat, by N.
pub fn parse_proc_stat(text: &str) -> Vec<CoreTimes> {
    let mut out: Vec<(usize, CoreTimes)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let n: usize = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal ...
            let busy = v.first()? + v.get(1)? + v.get(2)?;
            Some((n, CoreTimes { busy, steal: v.get(7).copied().unwrap_or(0) }))
        })
        .collect();
    out.sort_by_key(|(n, _)| *n);
    out.into_iter().map(|(_, c)| c).collect()
}

/// Linear interpolation of `f` over the ticks at time `t` (clamped to the ends).
fn at(ticks: &[Tick], t: f64, f: impl Fn(&Tick) -> f64) -> Option<f64> {
    let i = ticks.iter().position(|k| k.t >= t)?;
    if i == 0 {
        return Some(f(&ticks[0]));
    }
    let (a, b) = (&ticks[i - 1], &ticks[i]);
    let w = if b.t > a.t { (t - a.t) / (b.t - a.t) } else { 1.0 };
    Some(f(a) + (f(b) - f(a)) * w)
}

impl LoadgenRun {
    /// Where loadgen's window was on perf's clock (seconds since it was started): its start
    /// offset from the live lines, then its ramp and window from the report.
    pub fn window(&self) -> Option<(f64, f64)> {
        let (ramp, window) = (self.report.connections.ramp_s, self.report.window_s);
        // A line is read a little after it is printed; the smallest gap is the closest.
        let offset = self.lines.iter().map(|l| l.at - l.t).fold(f64::INFINITY, f64::min);
        let offset = if offset.is_finite() { offset.max(0.0) } else { 0.0 };
        Some((offset + ramp, offset + ramp + window))
    }

    /// CPU figures over the window; `None` when it cannot be placed or is shorter than 0.3 s.
    pub fn window_cpu(&self, server_core: usize, loadgen_core: usize) -> Option<WindowCpu> {
        let (a, b) = self.window()?;
        // A saturated loadgen prints its lines late, which places the window late too; the
        // samples end when loadgen does, shortly after its window.
        let b = b.min(self.ticks.last()?.t);
        let dt = b - a;
        if dt < 0.3 || dt < 0.8 * self.report.window_s {
            return None;
        }
        let delta = |f: &dyn Fn(&Tick) -> f64| Some(at(&self.ticks, b, f)? - at(&self.ticks, a, f)?);
        let hz = clk_tck();
        let core = |c: usize, steal: bool| {
            move |k: &Tick| k.cores.get(c).map_or(0.0, |x| if steal { x.steal } else { x.busy } as f64 / hz)
        };
        let loadgen = delta(&|k| k.loadgen_cpu_s)?;
        let server = delta(&|k| k.server_cpu_s)?;
        let busy_server_core = delta(&core(server_core, false))?;
        let busy_loadgen_core = delta(&core(loadgen_core, false))?;
        Some(WindowCpu {
            loadgen_share: loadgen / dt,
            other_on_server_core: ((busy_server_core - server) / dt).max(0.0),
            other_on_loadgen_core: ((busy_loadgen_core - loadgen) / dt).max(0.0),
            steal_on_server_core: delta(&core(server_core, true))? / dt,
        })
    }

    /// (loadgen, server) shares of their cores between `a` and `b` seconds after the window
    /// started; `None` when the samples do not cover it.
    pub fn shares_after_window_start(&self, a: f64, b: f64) -> Option<(f64, f64)> {
        let (start, _) = self.window()?;
        let (a, b) = (start + a, (start + b).min(self.ticks.last()?.t));
        if b - a < 0.05 {
            return None;
        }
        let delta = |f: &dyn Fn(&Tick) -> f64| Some(at(&self.ticks, b, f)? - at(&self.ticks, a, f)?);
        Some((delta(&|k| k.loadgen_cpu_s)? / (b - a), delta(&|k| k.server_cpu_s)? / (b - a)))
    }

    /// The kernel memory at the last live line inside the window.
    pub fn kernel_at_window_end(&self) -> Option<KernelMem> {
        let (_, end) = self.window()?;
        self.lines.iter().rev().find(|l| l.at <= end + 0.05 && l.label != "ramp").and_then(|l| l.kernel)
    }
}

/// A child killed and reaped when dropped, so no path out of [`run`] (a panic included)
/// leaves a loadgen running.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The time and phase label of a live line: `[  5.1s run  ] ...` → (5.1, `run`).
pub fn live_label(line: &str) -> Option<(f64, &str)> {
    let inner = line.strip_prefix('[')?.split(']').next()?;
    let mut words = inner.split_whitespace();
    let t = words.next()?.strip_suffix('s')?.parse::<f64>().ok()?;
    Some((t, words.next()?))
}

/// CPU seconds of process `pid` (all its threads).
fn cpu_of(pid: u32) -> Option<f64> {
    loadgen::procstat::sample(pid).map(|s| s.cpu_s)
}

/// Runs `loadgen args` pinned to `core`, for at most `timeout` (or until `stop` is set),
/// sampling it and `server_pid`, and returns its report.
pub fn run(
    loadgen: &Path,
    args: &[String],
    core: usize,
    server_pid: u32,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<LoadgenRun, String> {
    let started = Instant::now();
    let mut child = Reap(
        pinned(loadgen, core)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", loadgen.display()))?,
    );
    let pid = child.0.id();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let stderr = child.0.stderr.take().map(|err| {
        let (lines, tail) = (lines.clone(), tail.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some((t, label)) = live_label(&line) {
                    let l = Line {
                        at: started.elapsed().as_secs_f64(),
                        t,
                        label: label.to_owned(),
                        kernel: KernelMem::read(),
                    };
                    lines.lock().unwrap_or_else(PoisonError::into_inner).push(l);
                }
                let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        })
    });
    let stdout = child.0.stdout.take().map(|out| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.take(MAX_STDOUT).read_to_string(&mut s);
            s
        })
    });
    let deadline = started + timeout;
    let mut ticks = Vec::new();
    let mut next_tick = started;
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(format!("cannot wait for loadgen: {e}")),
        }
        if stop.load(Relaxed) {
            break Err("interrupted".into());
        }
        if Instant::now() > deadline {
            break Err(format!("loadgen did not finish within {timeout:?}"));
        }
        if Instant::now() >= next_tick && ticks.len() < MAX_TICKS {
            next_tick += TICK;
            if let (Some(l), Some(s)) = (cpu_of(pid), cpu_of(server_pid)) {
                let cores =
                    std::fs::read_to_string("/proc/stat").map(|t| parse_proc_stat(&t)).unwrap_or_default();
                ticks.push(Tick {
                    t: started.elapsed().as_secs_f64(),
                    loadgen_cpu_s: l,
                    server_cpu_s: s,
                    cores,
                });
            }
        }
        std::thread::sleep(
            POLL.min(next_tick.saturating_duration_since(Instant::now())).max(Duration::from_millis(1)),
        );
    };
    drop(child);
    let wall_s = started.elapsed().as_secs_f64();
    let out = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    if let Some(h) = stderr {
        let _ = h.join();
    }
    let stderr_tail =
        tail.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect::<Vec<_>>().join("\n");
    let status = status.map_err(|e| format!("{e}; loadgen's last words:\n{stderr_tail}"))?;
    let exit_code = status.code().unwrap_or(-1);
    let report_json: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| {
        format!("loadgen exited with {status} and no JSON report ({e}); its last words:\n{stderr_tail}")
    })?;
    let report = read_report(out.trim()).map_err(|e| format!("{} ran, but {e}", loadgen.display()))?;
    let lines = std::mem::take(&mut *lines.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(LoadgenRun { report, report_json, exit_code, wall_s, ticks, lines, stderr_tail })
}

/// Reads loadgen's JSON report as loadgen's own [`Report`]. Every field must be there (see
/// [`loadgen::report`]): a report from a loadgen built from other sources fails here, naming
/// the field, rather than giving zeros.
pub fn read_report(json: &str) -> Result<Report, String> {
    serde_json::from_str(json).map_err(|e| {
        format!(
            "its report does not read as this perf's loadgen report ({e}); \
             is loadgen built from the same sources?"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_labels() {
        assert_eq!(live_label("[  5.1s run  ] sessions 1000/1000"), Some((5.1, "run")));
        assert_eq!(live_label("[ 12.0s storm] sessions"), Some((12.0, "storm")));
        assert_eq!(live_label("[  0.9s ramp ] mqtt connections"), Some((0.9, "ramp")));
        assert_eq!(live_label("loadgen gps: 4.0 s window"), None);
        assert_eq!(live_label("[x] y"), None);
    }

    #[test]
    fn proc_stat_cores() {
        let text =
            "cpu  10 0 5 100 0 0 0 0 0 0\ncpu1 4 1 2 50 0 0 0 3 0 0\ncpu0 6 0 3 50 0 0 0 0 0 0\nintr 1\n";
        assert_eq!(
            parse_proc_stat(text),
            vec![CoreTimes { busy: 9, steal: 0 }, CoreTimes { busy: 7, steal: 3 }]
        );
    }

    #[test]
    fn the_window_is_placed_from_the_report_and_read_from_samples() {
        let hz = clk_tck();
        // loadgen uses half a core, the server a quarter; others take another quarter of the
        // server's core. Samples every 100 ms for 10 s.
        let ticks: Vec<Tick> = (0..=100)
            .map(|i| {
                let t = f64::from(i) / 10.0;
                Tick {
                    t,
                    loadgen_cpu_s: t * 0.5,
                    server_cpu_s: t * 0.25,
                    cores: vec![
                        CoreTimes { busy: (t * 0.5 * hz) as u64, steal: 0 },
                        CoreTimes { busy: (t * 0.5 * hz) as u64, steal: 0 },
                    ],
                }
            })
            .collect();
        let mut report = Report { window_s: 5.0, ..Report::default() };
        report.connections.ramp_s = 1.0;
        let lines = vec![
            Line { at: 1.25, t: 1.0, label: "ramp".into(), kernel: None },
            Line { at: 2.21, t: 2.0, label: "run".into(), kernel: None },
        ];
        let r = LoadgenRun {
            report,
            report_json: serde_json::Value::Null,
            exit_code: 0,
            wall_s: 10.0,
            ticks,
            lines,
            stderr_tail: String::new(),
        };
        let (a, b) = r.window().expect("placed");
        assert!((a - 1.21).abs() < 1e-9 && (b - 6.21).abs() < 1e-9, "{a} {b}");
        let w = r.window_cpu(0, 1).expect("cpu");
        assert!((w.loadgen_share - 0.5).abs() < 0.02, "{w:?}");
        assert!((w.other_on_server_core - 0.25).abs() < 0.02, "{w:?}");
        assert!(w.other_on_loadgen_core < 0.02, "{w:?}");
        let short = LoadgenRun { ticks: r.ticks[..40].to_vec(), ..r };
        assert_eq!(short.window_cpu(0, 1), None, "the samples end long before the window does");
    }
}
