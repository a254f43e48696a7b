use super::*;
use std::collections::HashMap;

/// Parses `args` with no environment.
fn cli(args: &[&str]) -> Cli {
    cli_env(args, &[])
}

/// Parses `args` with `env` as the whole environment (the process's is never read).
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> Cli {
    let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Cli::try_parse_with(std::iter::once("gate").chain(args.iter().copied()), &|name| env.get(name).cloned())
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn load(args: &[&str]) -> Result<Config, ConfigError> {
    cli(args).load()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("fleetgate-config-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Asserts a validation error names `key` and carries `value`.
fn assert_invalid(result: Result<impl std::fmt::Debug, ConfigError>, key: &str, value: &str) {
    match result {
        Err(e @ ConfigError::Invalid { .. }) => {
            let message = e.to_string();
            let ConfigError::Invalid { key: k, value: v, .. } = e else { unreachable!() };
            assert_eq!(k, key, "{message}");
            assert_eq!(v, value, "{message}");
            assert!(message.starts_with(key), "{message}");
        }
        other => panic!("expected an error for {key}, got {other:?}"),
    }
}

/// Every setting at its example value, the others at their defaults, in one config.
fn all_examples() -> Config {
    let mut c = Config::default();
    for s in SETTINGS {
        s.set(&mut c, s.example).unwrap_or_else(|e| panic!("{}: example {:?}: {e}", s.name(), s.example));
    }
    c
}

#[test]
fn every_setting_is_named_by_the_rule_and_has_a_usable_example() {
    let mut flags = std::collections::HashSet::new();
    for s in SETTINGS {
        assert_eq!(s.flag(), format!("{}-{}", s.section, s.key.replace('_', "-")));
        assert_eq!(s.env(), format!("FLEETGATE_{}_{}", s.section, s.key).to_uppercase());
        assert!(flags.insert(s.flag()), "{} twice", s.flag());
        for a in s.aliases {
            assert!(flags.insert(a.to_string()), "alias {a} twice");
        }
        let mut c = Config::default();
        s.set(&mut c, s.example).unwrap();
        assert_ne!(s.get(&c), s.get(&Config::default()), "{}: the example is the default", s.name());
        assert!(s.help.ends_with('.'), "{}: help is a sentence", s.name());
    }
    all_examples().validate().expect("the examples together are a valid configuration");
}

#[test]
fn every_setting_reads_back_from_flag_variable_and_file() {
    let want = all_examples();
    // By flag: each setting once, with its canonical flag.
    let mut args = Vec::new();
    for s in SETTINGS {
        args.push(format!("--{}", s.flag()));
        args.push(s.example.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(load(&args).unwrap(), want, "by flag");
    // By variable.
    let env: Vec<(String, String)> = SETTINGS.iter().map(|s| (s.env(), s.example.to_string())).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(cli_env(&[], &env).load().unwrap(), want, "by variable");
    // By file: what print-config would write for these values.
    let mut text = String::new();
    let mut section = "";
    for s in SETTINGS {
        if s.section != section {
            section = s.section;
            text.push_str(&format!("[{section}]\n"));
        }
        text.push_str(&format!("{} = {}\n", s.key, s.get(&want)));
    }
    let path = temp_file("all", &text);
    let from_file = load(&["-c", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(from_file.unwrap(), want, "by file");
}

#[test]
fn aliases_keep_the_older_flags_working() {
    for s in SETTINGS {
        for alias in s.aliases {
            // The alias sets its setting (checked without the cross-setting rules, which may need
            // a partner value).
            let c = cli(&[&format!("--{alias}"), s.example]);
            assert_eq!(c.overrides.len(), 1, "--{alias}");
            assert_eq!(c.overrides[0].setting.name(), s.name(), "--{alias}");
            assert_eq!(c.overrides[0].text, s.example, "--{alias}");
        }
    }
    assert_eq!(load(&["--hold-ms", "5"]).unwrap().app.hold_ms, 5);
    assert_eq!(load(&["--token-secret", "t"]).unwrap().token_secret(), b"t");
}

#[test]
fn precedence_is_file_then_variable_then_flag() {
    let path = temp_file("layers", "[app]\nhold_ms = 1\nheartbeat_ms = 5_000\nidle_timeout_ms = 20_000\n");
    let p = path.to_str().unwrap();
    assert_eq!(cli_env(&["-c", p], &[]).load().unwrap().app.hold_ms, 1);
    assert_eq!(cli_env(&["-c", p], &[("FLEETGATE_APP_HOLD_MS", "2")]).load().unwrap().app.hold_ms, 2);
    let c = cli_env(&["-c", p, "--hold-ms", "3"], &[("FLEETGATE_APP_HOLD_MS", "2")]).load().unwrap();
    assert_eq!(c.app.hold_ms, 3);
    assert_eq!(c.app.heartbeat_ms, 5_000, "the file's other keys stay");
    // Settings flags are accepted after a subcommand too.
    let c = load(&["check-config", "-c", p, "--idle-timeout-ms", "25000"]).unwrap();
    assert_eq!(c.app.idle_timeout_ms, 25_000);
    // A flag can make the file's values invalid, and validation sees the merged result.
    assert_invalid(load(&["-c", p, "--heartbeat-ms", "20000"]), "app.idle_timeout_ms", "20_000");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn bad_flag_or_variable_values_name_the_setting_and_their_origin() {
    let e = load(&["--hold-ms", "soon"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "app.hold_ms = \"soon\" (from --app-hold-ms): not a whole number from 0 to 4294967295"
    );
    let e = cli_env(&[], &[("FLEETGATE_GPS_FORWARD", "some")]).load().unwrap_err();
    assert_eq!(
        e.to_string(),
        "gps.forward = \"some\" (from FLEETGATE_GPS_FORWARD): must be one of latest|all"
    );
    assert_invalid(load(&["--log-level", "loud"]), "log.level", "\"loud\"");
    assert_invalid(load(&["--app-listen", "nowhere"]), "app.listen", "\"nowhere\"");
    assert_invalid(load(&["--advertise", "gate-a:0"]), "gate.advertise", "\"gate-a:0\"");
    assert_invalid(load(&["--cores", "3-1"]), "gate.cores", "\"3-1\"");
    // A secret's value never appears in a message.
    let e = cli_env(&[], &[("FLEETGATE_AUTH_TOKEN_SECRET", "x")]).load();
    assert!(e.is_ok());
}

#[test]
fn print_config_is_the_table_with_a_comment_per_key_and_round_trips() {
    let text = default_toml();
    let parsed: Config = toml::from_str(&text).unwrap();
    assert_eq!(parsed, Config::default());
    let lines: Vec<&str> = text.lines().collect();
    for s in SETTINGS {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("{} = ", s.key)) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("print-config lacks {}", s.name()));
        assert!(lines[at - 1].starts_with("# "), "no comment above {}", s.name());
        assert!(lines.contains(&format!("[{}]", s.section).as_str()));
    }
    assert!(text.contains("hold_ms = 60_000\n"), "{text}");
    assert!(text.contains("listen = \"0.0.0.0:7100\"\n"), "{text}");
}

#[test]
fn help_shows_every_setting_with_its_default_and_variable() {
    let mut cmd = Cli::command_with_settings();
    cmd.build();
    let help = cmd.render_long_help().to_string();
    for s in SETTINGS {
        let arg = cmd.get_arguments().find(|a| a.get_id() == s.name().as_str()).expect("a flag per setting");
        let text = arg.get_help().unwrap().to_string();
        assert!(text.contains(&format!("[env: {}]", s.env())), "{}: {text}", s.name());
        assert!(text.contains("[default: "), "{}: {text}", s.name());
        assert!(help.contains(&format!("--{}", s.flag())), "--help lacks --{}", s.flag());
        for a in s.aliases {
            assert!(help.contains(a), "--help lacks the alias {a}");
        }
    }
    assert!(help.contains("[default: 60000]"), "numbers shown plainly");
    assert!(help.contains("[default: the built-in development secret]"));
    cmd.debug_assert();
}

#[test]
fn subcommands_and_their_flags_parse() {
    assert_eq!(cli(&["print-config"]).command, Some(Command::PrintConfig));
    assert_eq!(cli(&["check-config"]).command, Some(Command::CheckConfig));
    assert_eq!(cli(&[]).command, None);
    let p = cli(&["--ports-file", "/tmp/ports"]);
    assert_eq!(p.ports_file.as_deref(), Some(Path::new("/tmp/ports")));
    let t = cli(&["token", "--uid", "42", "--role", "driver"]);
    assert_eq!(
        t.command,
        Some(Command::Token(TokenArgs { uid: 42, role: "driver".into(), ttl_s: DEFAULT_TOKEN_TTL_S }))
    );
    // The server's secret flag works after the subcommand too.
    let t = cli(&["token", "--uid", "7", "--role", "2", "--ttl-s", "60", "--token-secret", "s"]);
    assert_eq!(t.load().unwrap().token_secret(), b"s");
    assert!(
        Cli::try_parse_with(["gate", "token", "--role", "driver"], &|_| None).is_err(),
        "--uid is required"
    );
}

#[test]
fn token_args_issue_a_verifiable_token() {
    let args = |role: &str, ttl_s: u64| TokenArgs { uid: 42, role: role.into(), ttl_s };
    for (role, value) in [("driver", 1), ("Passenger", 2), ("1", 1), ("2", 2)] {
        assert_eq!(args(role, 60).role_value().unwrap(), value, "{role}");
    }
    let now = 1_700_000_000_000;
    let token = args("driver", 60).issue(b"sekrit", now).unwrap();
    let claims = schema::token::verify(b"sekrit", &token, now + 59_000).unwrap();
    assert_eq!((claims.uid, claims.role, claims.expires_ms), (42, 1, now + 60_000));
    assert!(schema::token::verify(b"other", &token, now).is_err());
    assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    assert_eq!(hex(&token).len(), 100);
    assert_invalid(args("pilot", 60).issue(b"s", now), "--role", "\"pilot\"");
    assert_invalid(args("0", 60).issue(b"s", now), "--role", "\"0\"");
    assert_invalid(args("driver", 0).issue(b"s", now), "--ttl-s", "0");
}

#[test]
fn verbose_raises_the_level() {
    assert_eq!(load(&["-v"]).unwrap().log.level, LogLevel::Debug);
    assert_eq!(load(&["-vv"]).unwrap().log.level, LogLevel::Trace);
    assert_eq!(load(&["-v", "--log-level", "trace"]).unwrap().log.level, LogLevel::Trace);
    assert_eq!(load(&["-v", "--log-level", "error"]).unwrap().log.level, LogLevel::Debug);
}

#[test]
fn secrets_default_to_the_dev_secret_and_stay_out_of_debug() {
    let mut c = Config::default();
    assert_eq!(c.token_secret(), DEV_SECRET.as_bytes());
    assert_eq!(c.sidecar_secret(), DEV_SECRET.as_bytes());
    assert!(c.uses_dev_secret());
    c.auth.token_secret = Secret("token-secret-value".into());
    assert!(c.uses_dev_secret(), "the sidecar still uses it");
    c.sidecar.secret = Secret(DEV_SECRET.into());
    assert!(c.uses_dev_secret(), "naming the dev secret explicitly is still the dev secret");
    c.sidecar.secret = Secret("sidecar-secret-value".into());
    assert!(!c.uses_dev_secret());
    let debug = format!("{c:?}");
    assert!(!debug.contains("token-secret-value") && !debug.contains("sidecar-secret-value"), "{debug}");
}

#[test]
fn cores_resolve_against_the_machine() {
    assert_eq!(resolve_cores(&Cores::All, &[0, 1, 2, 3]).unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(resolve_cores(&Cores::List(vec![3, 0, 1]), &[0, 1, 2, 3]).unwrap(), vec![3, 0, 1]);
    let e = resolve_cores(&Cores::List(vec![5]), &[0, 1]).unwrap_err().to_string();
    assert!(e.contains("core 5") && e.contains("0-1"), "{e}");
    assert!(resolve_cores(&Cores::All, &[]).is_err());
    assert_eq!(Config::default().resolved_cores().unwrap(), available_cores());
    // A narrowed affinity (taskset, CPUAffinity=, a cpuset): the cores are the mask's ids, not
    // 0 to n-1.
    assert_eq!(resolve_cores(&Cores::All, &[2, 3]).unwrap(), vec![2, 3]);
    assert_eq!(resolve_cores(&Cores::List(vec![3]), &[2, 3]).unwrap(), vec![3]);
    let e = resolve_cores(&Cores::List(vec![0]), &[2, 3, 5]).unwrap_err().to_string();
    assert!(e.contains("core 0") && e.contains("2-3,5"), "{e}");
}

#[test]
fn cross_setting_checks_name_the_setting() {
    assert_invalid(load(&["--idle-timeout-ms", "30000"]), "app.idle_timeout_ms", "30_000");
    assert_invalid(load(&["--heartbeat-ms", "95000"]), "app.idle_timeout_ms", "90_000");
    assert_invalid(load(&["--sidecar-listen", "127.0.0.1:7100"]), "sidecar.listen", "\"127.0.0.1:7100\"");
    assert_invalid(load(&["--admin-listen", "127.0.0.1:7200"]), "admin.listen", "\"127.0.0.1:7200\"");
    assert!(load(&["--app-listen", "127.0.0.1:0", "--sidecar-listen", "127.0.0.1:0"]).is_ok());
    assert!(load(&["--app-listen", "127.0.0.2:7200"]).is_ok());
    assert_invalid(load(&["--sidecar-max-ttl-ms", "1000"]), "sidecar.max_ttl_ms", "1_000");
}

#[test]
fn bounds_name_the_setting() {
    for (flag, value, key) in [
        ("--heartbeat-ms", "0", "app.heartbeat_ms"),
        ("--backlog", "0", "app.backlog"),
        ("--app-max-body", "1023", "app.max_body"),
        ("--sidecar-max-body", "100", "sidecar.max_body"),
        ("--out-queue-bytes", "65535", "app.out_queue_bytes"),
        ("--gps-flush-ms", "0", "gps.flush_ms"),
        ("--gps-max-batch-points", "2731", "gps.max_batch_points"),
        ("--limits-push-queue-len", "0", "limits.push_queue_len"),
        ("--node-name", "a b", "gate.node_name"),
    ] {
        match load(&[flag, value]) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{flag} {value}"),
            other => panic!("{flag} {value}: {other:?}"),
        }
    }
    let mut c = Config::default();
    c.gps.max_batch_points = MAX_GPS_BATCH_POINTS;
    c.app.max_body = 1024;
    c.app.out_queue_bytes = 65_536;
    c.sidecar.max_ttl_ms = c.sidecar.default_ttl_ms;
    c.validate().unwrap();
}

#[test]
fn the_file_refuses_unknown_keys_and_bad_types_naming_them() {
    let path = temp_file("unknown", "[app]\nheartbeat_ms = 1000\nlisten_port = 7100\n");
    let err = load(&["-c", path.to_str().unwrap()]).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("listen_port"), "{err}");
    for (text, names) in [
        ("[apps]\nlisten = \"0.0.0.0:1\"\n", "apps"),
        ("[app]\nheartbeat_ms = \"soon\"\n", "heartbeat_ms"),
        ("[gps]\nforward = \"some\"\n", "forward"),
        ("[app]\nlisten = \"nowhere\"\n", "listen"),
        ("[gate]\ncores = \"2-1\"\n", "cores"),
    ] {
        let path = temp_file("bad", text);
        let err = load(&["-c", path.to_str().unwrap()]).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.to_string().contains(names), "{text}: {err}");
    }
    let err = load(&["-c", "/nonexistent/fleetgate.toml"]).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }) && err.to_string().contains("/nonexistent"), "{err}");
}

#[test]
fn the_redis_ca_goes_with_rediss_and_a_file_that_cannot_be_used_names_it() {
    // With a plain URL the CA would protect nothing: refused, not ignored.
    assert_invalid(
        load(&["--redis", "redis://127.0.0.1:6379", "--redis-ca", "/ca.pem"]),
        "cluster.redis_ca",
        "\"/ca.pem\"",
    );
    let c = load(&["--redis", "rediss://127.0.0.1:6379", "--redis-ca", "/ca.pem"]).unwrap();
    assert_eq!(c.cluster.redis_ca, "/ca.pem");
    // One node: no Redis, and the file is not read.
    let one = load(&["--redis-ca", "/nonexistent/ca.pem"]).unwrap();
    assert!(one.redis_tls_roots().unwrap().is_none());
    // Empty: fred's default, the system's CA certificates.
    assert!(load(&["--redis", "rediss://127.0.0.1:6379"]).unwrap().redis_tls_roots().unwrap().is_none());

    let dir = std::env::temp_dir().join(format!("fleetgate-config-redis-ca-{}", std::process::id()));
    let certs = testkit::redis::write_test_certs(&dir).unwrap();
    let with = |ca: &Path| {
        load(&["--redis", "rediss://127.0.0.1:6379", "--redis-ca", ca.to_str().unwrap()])
            .unwrap()
            .redis_tls_roots()
    };
    let roots = with(&certs.ca).unwrap().expect("read");
    assert_eq!((roots.path(), roots.certificates()), (certs.ca.as_path(), 1));
    for (path, why) in [(dir.join("missing.pem"), "No such file"), (certs.key.clone(), "no CERTIFICATE")] {
        let value = toml_quote(path.to_str().unwrap());
        let e = with(&path).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
        assert_invalid(Err::<(), _>(e), "cluster.redis_ca", &value);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
