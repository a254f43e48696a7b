//! `ceiling`: the read-and-discard TCP server that sets the floor for CPU per message on this
//! machine (io_uring multishot accept + multishot receive into a provided-buffer ring).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use perf::ceiling::{self, Config};

#[derive(Debug, Parser)]
#[command(name = "ceiling", about = "Read-and-discard TCP server: the CPU floor per message on this machine")]
struct Args {
    /// Address to listen on; port 0 picks a free one (see --ports-file).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write `app=PORT` here once listening.
    #[arg(long)]
    ports_file: Option<PathBuf>,
    /// Pin the server's single thread to this CPU.
    #[arg(long)]
    core: Option<usize>,
    /// Provided buffers in the ring (a power of two, at most 32768).
    #[arg(long, default_value_t = 4096)]
    buffers: u32,
    /// Size of each provided buffer, in bytes.
    #[arg(long, default_value_t = 2048)]
    buffer_size: u32,
    /// Write {"bytes","recvs","conns","cpu_s",...} as JSON here every second and on exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Exit after this many seconds (default: run until SIGTERM or SIGINT).
    #[arg(long, value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Connections beyond this many open ones are closed as soon as they are accepted.
    #[arg(long, default_value_t = 19_000)]
    max_conns: u32,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = Config {
        listen: args.listen,
        ports_file: args.ports_file,
        core: args.core,
        buffers: args.buffers,
        buffer_size: args.buffer_size,
        stats_file: args.stats_file,
        duration: args.duration,
        max_conns: args.max_conns,
    };
    match ceiling::run(&config) {
        Ok(stats) => {
            eprintln!("ceiling: {}", stats.to_json(ceiling::process_cpu_seconds()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ceiling: {e}");
            ExitCode::FAILURE
        }
    }
}
