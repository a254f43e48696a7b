//! `gate token`: a token printed by the binary logs in to a gate that shares its secret, and a
//! bad flag stops it with exit status 64 and the flag named.

mod common;

use common::{Gate, SECRET};
use std::process::{Command, Output};

/// Runs `gate token` with `args` and no config from the environment.
fn gate_token(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gate"))
        .arg("token")
        .args(args)
        .env_remove("FLEETGATE_CONFIG")
        .env_remove("FLEETGATE_AUTH_TOKEN_SECRET")
        .output()
        .expect("gate token runs")
}

#[test]
fn printed_token_logs_in_over_a_real_socket() {
    let gate = Gate::start(&[]);
    let secret = String::from_utf8_lossy(SECRET).into_owned();
    let out = gate_token(&["--uid", "42", "--role", "driver", "--token-secret", &secret]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout:?}");
    let line = stdout.trim_end_matches('\n');
    assert_eq!(line.len(), 100, "50 bytes as hex: {line:?}");
    assert!(
        line.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "lowercase hex: {line:?}"
    );
    assert!(out.stderr.is_empty(), "no development warning with a secret given: {:?}", out.stderr);
    let token = client::token_from_hex(line).expect("hex");
    let mut app = gate.connect();
    let s = app.login(&token, "gate-token-test").expect("the printed token logs in");
    assert_eq!((s.uid, s.role), (42, 1));

    // The secret from the environment works as for the server, and role 2 is a passenger.
    let out = Command::new(env!("CARGO_BIN_EXE_gate"))
        .args(["token", "--uid", "43", "--role", "passenger", "--ttl-s", "60"])
        .env_remove("FLEETGATE_CONFIG")
        .env("FLEETGATE_AUTH_TOKEN_SECRET", &secret)
        .output()
        .expect("gate token runs");
    assert!(out.status.success(), "{out:?}");
    let token = client::token_from_hex(&String::from_utf8_lossy(&out.stdout)).expect("hex");
    let s = gate.connect().login(&token, "gate-token-test").expect("login as a passenger");
    assert_eq!((s.uid, s.role), (43, 2));

    // Signed with the development secret (nothing configured): a loud warning, and this gate,
    // which has a secret of its own, refuses the token.
    let out = gate_token(&["--uid", "44", "--role", "1"]);
    assert!(out.status.success(), "{out:?}");
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("DEVELOPMENT secret"), "{warning}");
    let token = client::token_from_hex(&String::from_utf8_lossy(&out.stdout)).expect("hex");
    match gate.connect().login(&token, "gate-token-test") {
        Err(client::ClientError::Server { code: schema::wire::ErrorCode::BadToken, .. }) => {}
        other => panic!("a dev-secret token must not log in to this gate: {other:?}"),
    }
}

#[test]
fn bad_role_exits_64_naming_the_flag() {
    let out = gate_token(&["--uid", "42", "--role", "pilot"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--role") && stderr.contains("pilot"), "{stderr}");
}
