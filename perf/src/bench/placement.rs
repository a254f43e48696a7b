//! What the bench binaries (`bench`, `bench-cluster`) take alike from the command line: where
//! the project's binaries are and which cores the servers and loadgen get.

use super::servers::Bins;
use std::path::PathBuf;

/// `--bin-dir`, `--server-core`, `--loadgen-core`.
#[derive(Debug, Clone, clap::Args)]
pub struct Placement {
    /// Where gate, loadgen and ceiling are, e.g. `--bin-dir target/release` [default: beside
    /// this binary]
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The servers' core, e.g. `--server-core 0`
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// loadgen's core, e.g. `--loadgen-core 1` [default: the last core]
    #[arg(long)]
    pub loadgen_core: Option<usize>,
    /// Run every server and loadgen at real-time priority (SCHED_FIFO 10; needs root or
    /// CAP_SYS_NICE), every target alike: on a shared machine, other processes (a build, an
    /// editor) then cannot preempt them on their cores, as on a host whose cores are set apart
    /// for the gate. The kernel still keeps 5 % of each core for others. Results say so.
    #[arg(long)]
    pub realtime: bool,
}

impl Placement {
    /// The (server, loadgen) cores, checked against the cores online; a warning when they are
    /// one core.
    pub fn cores(&self, program: &str) -> Result<(usize, usize), String> {
        super::servers::set_realtime(self.realtime);
        let cores = loadgen::cli::online_cpus();
        let loadgen_core = self.loadgen_core.unwrap_or(cores - 1);
        if self.server_core >= cores || loadgen_core >= cores {
            return Err(format!("cores are 0..{}", cores - 1));
        }
        if self.server_core == loadgen_core {
            eprintln!(
                "{program}: the servers and loadgen share core {loadgen_core}: figures will be worth little"
            );
        }
        Ok((self.server_core, loadgen_core))
    }

    /// The binaries, from `--bin-dir` or beside the running one.
    pub fn bins(&self) -> Result<Bins, String> {
        let dir = match &self.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find this binary: {e}"))?
                .parent()
                .map(PathBuf::from)
                .ok_or("no binary directory")?,
        };
        Bins::find(&dir)
    }
}

/// Pins this process to `core`: perf's own sampling belongs with the load generator, not on
/// the servers' core.
pub fn pin_self(core: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
