//! `gate keygen` writes a key pair a gate then serves with; key files it cannot use stop the gate
//! with exit status 64 and the setting named.

mod common;

use common::{temp_dir, token, Gate};
use std::process::Command;
use std::time::Duration;

#[test]
fn keygen_writes_a_pair_the_gate_serves_with_and_refuses_to_overwrite() {
    let dir = temp_dir("keygen");
    let key = dir.join("gate.key");
    let out =
        Command::new(env!("CARGO_BIN_EXE_gate")).args(["keygen", "--out"]).arg(&key).output().expect("runs");
    assert!(out.status.success(), "{out:?}");
    let hex = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(hex.len(), 64, "the public key as hex: {hex:?}");
    let public = channel::keys::load_public(&dir.join("gate.key.pub")).expect("the public key file");
    assert_eq!(channel::keys::load_private(&key).expect("the private key file").public(), &public);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is its owner's only");

    // A second keygen to the same path refuses (a key in use is never overwritten).
    let again =
        Command::new(env!("CARGO_BIN_EXE_gate")).args(["keygen", "--out"]).arg(&key).output().expect("runs");
    assert!(!again.status.success());
    assert_eq!(channel::keys::load_public(&dir.join("gate.key.pub")).expect("kept"), public);

    // A gate with the key serves apps that know its public key.
    let gate = Gate::start(&["--app-plaintext", "false", "--channel-key-file", key.to_str().expect("path")]);
    let mut app = client::AppConn::connect_secure(gate.app, Duration::from_secs(5), public).expect("connect");
    app.login(&token(5, 1), "keygen-test").expect("login with the generated key");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_key_file_the_gate_cannot_use_exits_64_naming_the_setting() {
    let dir = temp_dir("badkey");
    let bad = dir.join("bad.key");
    std::fs::write(&bad, "not a key\n").expect("write");
    for (setting, path) in
        [("channel.key_file", bad.clone()), ("channel.previous_key_file", dir.join("missing.key"))]
    {
        common::refused_file(setting, &path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
