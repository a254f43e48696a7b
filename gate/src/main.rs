//! `gate`: the fleetgate server binary. See `gate --help`.

use gate::config::{default_toml, hex, Cli, Command, LogFormat, DEV_SECRET, EXIT_BAD_CONFIG};

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
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cfg.log.format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
    // A panicking shard would leave a gate that serves some uids and not others: better to stop
    // the whole process (exit 70) so a supervisor restarts it and apps reconnect elsewhere.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("panic: {info}; stopping the gate");
        std::process::exit(70);
    }));
    if let Err(e) = gate::server::run(cfg, cli.ports_file.as_deref()) {
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
