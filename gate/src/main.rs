//! `gate`: the fleetgate server binary. See `gate --help`.

use gate::config::{default_toml, hex, Cli, Command, LogFormat, DEV_SECRET, EXIT_BAD_CONFIG};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

fn main() {
    let cli = Cli::parse_process();
    match &cli.command {
        Some(Command::PrintConfig) => {
            print!("{}", default_toml());
            return;
        }
        Some(Command::CheckConfig) => match cli.load() {
            Ok(_) => {
                println!("configuration ok");
                return;
            }
            Err(e) => {
                eprintln!("gate: bad configuration: {e}");
                std::process::exit(EXIT_BAD_CONFIG);
            }
        },
        Some(Command::Keygen(args)) => match args.run() {
            Ok(kp) => {
                println!("{}", hex(kp.public()));
                return;
            }
            Err(e) => {
                eprintln!("gate keygen: {e}");
                std::process::exit(1);
            }
        },
        Some(Command::Token(args)) => {
            let cfg = match cli.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("gate: bad configuration: {e}");
                    std::process::exit(EXIT_BAD_CONFIG);
                }
            };
            match args.issue(cfg.token_secret(), now_ms()) {
                Ok(token) => {
                    if cfg.token_secret() == DEV_SECRET.as_bytes() {
                        eprintln!(
                            "gate: WARNING: this token is signed with the built-in DEVELOPMENT secret \
                             {DEV_SECRET:?}: anyone can mint one. Only a gate without a configured \
                             token secret accepts it; never use it in production."
                        );
                    }
                    println!("{}", hex(&token));
                    return;
                }
                Err(e) => {
                    eprintln!("gate token: {e}");
                    std::process::exit(EXIT_BAD_CONFIG);
                }
            }
        }
        None => {}
    }
    let cfg = match cli.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gate: bad configuration: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    // `cli.load()` already raised log.level for -v and -vv.
    let level = cfg.log.level.as_str();
    // -v and -vv win over FLEETGATE_LOG (the flag is the operator's word for this run); without
    // them FLEETGATE_LOG (a tracing filter) wins over log.level.
    let filter = match cli.verbose {
        0 => tracing_subscriber::EnvFilter::try_from_env("FLEETGATE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        _ => tracing_subscriber::EnvFilter::new(level),
    };
    // Colour only on a terminal: log files and pipes get plain `key=value`, which grep finds.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The filter sits behind a reload handle so the admin port can change it without a restart
    // (POST /log). A disabled callsite (the per-target push and GPS lines at info) is skipped on
    // its cached interest, rebuilt on a reload; a written line takes the handle's read lock.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if cfg.log.format == LogFormat::Json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    let log = gate::admin::LogControl::new(move |directives| {
        if let Some(text) = directives {
            let filter = tracing_subscriber::EnvFilter::try_new(text).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())?;
        }
        handle.with_current(|f| f.to_string()).map_err(|e| e.to_string())
    });
    // A panicking shard would leave a gate that serves some uids and not others: better to stop
    // the whole process (exit 70) so a supervisor restarts it and apps reconnect elsewhere.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("panic: {info}; stopping the gate");
        std::process::exit(70);
    }));
    if let Err(e) = gate::server::run(cfg, cli.ports_file.as_deref(), Some(log)) {
        tracing::error!("{e}");
        eprintln!("gate: {e}");
        // A setting that could not be used (a key file, the cores) is the operator's to fix.
        let bad_setting = matches!(e, gate::server::StartError::Config(_));
        std::process::exit(if bad_setting { EXIT_BAD_CONFIG } else { 1 });
    }
}

/// Wall-clock milliseconds since the Unix epoch, the unit of token expiries.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
