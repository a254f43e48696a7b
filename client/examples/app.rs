//! A driver app: logs in to a gate, prints every push it is sent (and acks it), and keeps the
//! session alive with keepalives. The first thing to run after `make run`:
//!
//! ```sh
//! cargo run -p client --example app -- --uid 42
//! ```
//!
//! It speaks the secure channel (docs/PROTOCOL.md §14), like the gate by default.
//!
//! Flags (all optional):
//! - `--gate HOST:PORT`    the gate's app port (default 127.0.0.1:7100, what `make run` binds);
//! - `--token HEX`         a login token, as `gate token --uid 42 --role driver` prints it;
//! - `--uid N`             without `--token`: mint a driver token for this uid with the built-in
//!   development secret (only a gate running without a configured token
//!   secret, such as `make run`'s, accepts it);
//! - `--server-key KEY`    the gate's public key: 64 hex digits, or the path of the public key
//!   file `gate keygen` wrote (default: the development key, which a gate
//!   without a configured key, such as `make run`'s, uses);
//! - `--plaintext`         speak plaintext frames, to a gate run with `--plaintext`;
//! - `--seconds N`         stop after this long (default: run until interrupted).

use client::{dev_token, token_from_hex, AppConn, ClientError};
use schema::Cmd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The development secret a gate uses when none is configured (docs/PROTOCOL.md §10.1).
const DEV_SECRET: &[u8] = b"fleetgate-dev-secret-change-me";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let gate = flag("--gate").unwrap_or_else(|| "127.0.0.1:7100".into());
    let uid: u64 = flag("--uid").map_or(Ok(42), |u| u.parse())?;
    let token = match flag("--token") {
        Some(hex) => token_from_hex(&hex).ok_or("--token is not hex")?,
        None => {
            eprintln!("minting a development token for uid {uid} (only a gate without a configured secret takes it)");
            dev_token(DEV_SECRET, uid, 1, Duration::from_secs(3600))
        }
    };
    let stop_at =
        flag("--seconds").map(|s| s.parse().map(|s| Instant::now() + Duration::from_secs(s))).transpose()?;
    let plaintext = args.iter().any(|a| a == "--plaintext");
    let server_key = match flag("--server-key") {
        Some(k) => server_key(&k)?,
        None => *channel::Keypair::dev().public(),
    };

    let timeout = Duration::from_secs(5);
    let mut app = if plaintext {
        AppConn::connect(gate.as_str(), timeout)?
    } else {
        AppConn::connect_secure(gate.as_str(), timeout, server_key)?
    };
    let session = match app.login(&token, "example app") {
        Err(ClientError::Channel(channel::ChannelError::RejectedByGate { reason, message })) => {
            return Err(format!(
                "the gate refused the secure channel ({reason}: {message}); is --server-key its public key, \
                 or does it run with --plaintext?"
            )
            .into());
        }
        // A frame's magic byte where a record was due: the gate speaks plaintext.
        Err(ClientError::Channel(channel::ChannelError::Record(channel::RecordError::UnknownType(
            schema::MAGIC,
        )))) => {
            return Err("the gate speaks plaintext frames (it runs with --plaintext): add --plaintext".into());
        }
        // A Reject record's first byte, read as a frame: the gate speaks the secure channel.
        Err(ClientError::Protocol(schema::StreamError::BadMagic(0x04))) if plaintext => {
            return Err("the gate speaks the secure channel: drop --plaintext".into());
        }
        other => other?,
    };
    println!(
        "logged in{}: uid {} role {} epoch {} node {} (heartbeat every {} ms)",
        if plaintext { " (plaintext)" } else { " over the secure channel" },
        session.uid,
        session.role,
        session.session_epoch,
        session.node,
        session.heartbeat_ms
    );
    if let Some(k) = app.new_server_key() {
        // The key this app was given is being retired: a real app stores the new one.
        print!("the gate has a new key; use it from now on: {}", channel::keys::public_file_text(&k));
    }
    // Wake at least twice per heartbeat to send a keepalive when nothing else went out.
    let beat = Duration::from_millis(u64::from(session.heartbeat_ms.max(1000)) / 2);
    // Reads wake at least every second, so --seconds is honoured on a quiet connection.
    app.set_read_timeout(beat.min(Duration::from_secs(1)))?;
    let mut last_sent = Instant::now();
    loop {
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            app.logout()?;
            println!("logged out");
            return Ok(());
        }
        if last_sent.elapsed() >= beat {
            app.keepalive()?;
            last_sent = Instant::now();
        }
        match app.recv() {
            Ok(f) if f.cmd == Cmd::PushDelivery => {
                if let Some(d) = f.delivery() {
                    println!(
                        "push {} (kind {}, log-id {:#x}{}): {}",
                        d.message_id,
                        d.kind,
                        f.log_id(),
                        if d.redelivery { ", redelivered" } else { "" },
                        String::from_utf8_lossy(d.payload)
                    );
                }
                // Ack at once (docs/PROTOCOL.md §9.10): the app-server's receipt says Delivered.
                app.ack_push(&f)?;
                last_sent = Instant::now();
            }
            Ok(f) if f.cmd == Cmd::GoAway => {
                let reason = f.go_away().map(|g| g.reason());
                println!("the gate sent go-away ({reason:?}); a real app reconnects and resumes (client::AppSession)");
                return Ok(());
            }
            Ok(f) => println!("frame {:?} {:?} seq {}", f.cmd, f.ty, f.seq()),
            Err(ClientError::Timeout) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// `--server-key`: 64 hex digits, or the path of a public key file.
fn server_key(arg: &str) -> Result<channel::PublicKey, Box<dyn std::error::Error>> {
    let hex = arg.trim();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let text = format!("{} public {hex}", channel::keys::KEY_FILE_MAGIC);
        return Ok(channel::keys::parse_public(&text)?);
    }
    Ok(channel::keys::load_public(Path::new(arg))?)
}
