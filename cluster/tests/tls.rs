//! The directory over TLS (`rediss://`) against a real redis-server that speaks TLS only, its
//! certificate signed by a test CA: trusted through [`TlsRoots`] it works as over plain TCP;
//! trusting another CA (or the system's, which never heard of the test CA) it never comes up,
//! and its status says why. A CA file that cannot be used stops the start, naming the file.

mod common;

use std::path::Path;
use std::time::Duration;

use cluster::{Cmd, Config, Event, Handle, TlsRoots};
use common::{info, Node};
use testkit::redis::{write_test_certs, RedisServer, Reply};

const EPOCH: u64 = 1_750_000_000_000 << 8;

fn roots(ca: &Path) -> TlsRoots {
    TlsRoots::from_pem_file(ca).expect("the CA file loads")
}

fn tls_config(url: &str, ca: Option<&Path>) -> Config {
    Config { tls_roots: ca.map(roots), ..common::config(url) }
}

/// A folder of its own under the temp dir, removed by the caller.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fleetgate-cluster-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn over_tls_with_its_ca_the_directory_claims_and_looks_up() {
    let redis = RedisServer::start_tls(Some("tls-pw")).expect("a TLS redis-server starts");
    assert!(redis.url().starts_with("rediss://:tls-pw@127.0.0.1:"), "{}", redis.url());
    let ca = redis.tls_ca().expect("a TLS server has a CA");
    let mut a = Node::start_with(tls_config(&redis.url(), Some(ca)), info("gate-a"));
    let mut b = Node::start_with(tls_config(&redis.url(), Some(ca)), info("gate-b"));
    a.wait_up();
    b.wait_up();
    let (up, detail) = a.handle().status();
    assert!(up && detail.ends_with(", TLS"), "the status says the link is TLS: {detail}");

    assert_eq!(a.claim(1, EPOCH + 1, 2), (true, None));
    assert_eq!(b.claim(1, EPOCH, 0), (false, Some(a.owner(EPOCH + 1, 2))));
    assert_eq!(b.lookup(vec![1, 2]), vec![(1, Some(a.owner(EPOCH + 1, 2))), (2, None)]);
    // Messages between nodes ride the same TLS connections (sharded pub/sub).
    b.wait_nodes(Duration::from_secs(5), |n| n.len() == 2).expect("b sees both nodes");
    b.send(vec![Cmd::Publish { node: "gate-a".into(), bytes: b"over tls".to_vec() }]);
    let got = a.wait("a message from b", |e| matches!(e, Event::Message(_)));
    assert_eq!(got, Event::Message(b"over tls".to_vec()));
    // What the directory wrote is in this very server (read back over TLS too).
    assert_eq!(redis.command(&["HGET", "fg:u:{1}", "node"]).unwrap(), Reply::Bulk("gate-a".into()));
}

#[test]
fn trusting_another_ca_or_the_system_roots_it_never_comes_up_and_says_why() {
    let redis = RedisServer::start_tls(None).expect("a TLS redis-server starts");
    let dir = temp_dir("other-ca");
    let other = write_test_certs(&dir).expect("another test CA");
    for (name, ca) in [("gate-other-ca", Some(other.ca.as_path())), ("gate-system-ca", None)] {
        let mut a = Node::start_with(tls_config(&redis.url(), ca), info(name));
        let detail = a.wait_down();
        println!("{name}: down: {detail}");
        // rustls's reason, as fred passes it on: the server's certificate has an unknown issuer.
        assert!(detail.contains("UnknownIssuer"), "{name}: the status says why: {detail}");
        // Retries (100 ms, then 200, 400 …) fail the same way: never up.
        assert!(
            a.try_wait(Duration::from_millis(1500), |e| matches!(e, Event::Status { up: true, .. }))
                .is_none(),
            "{name} came up trusting the wrong CA"
        );
        let (up, now) = a.handle().status();
        assert!(!up && now.contains("UnknownIssuer"), "{name}: {now}");
        // Commands are answered at once, not left waiting.
        a.send(vec![Cmd::Claim { uid: 5, epoch: EPOCH, shard: 0 }]);
        a.wait("unavailable", |e| matches!(e, Event::Unavailable { uid: Some(5), .. }));
    }
    // Nothing reached Redis.
    assert_eq!(redis.command(&["EXISTS", "fg:u:{5}"]).unwrap(), Reply::Int(0));
    assert_eq!(redis.command(&["SCARD", "fg:nodes"]).unwrap(), Reply::Int(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_ca_file_that_cannot_be_used_is_refused_naming_it() {
    let dir = temp_dir("bad-files");
    let certs = write_test_certs(&dir.join("certs")).expect("test certs");
    let no_cert = dir.join("not-a-ca.pem");
    std::fs::write(&no_cert, "just text, no PEM section\n").expect("write");
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
        .expect("write");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .expect("write");
    let cases = [
        (dir.join("missing.pem"), "No such file"),
        (no_cert.clone(), "no CERTIFICATE"),
        // A private key alone is no CA.
        (certs.key.clone(), "no CERTIFICATE"),
        (broken, ""),
        (garbage, "not a CA certificate"),
    ];
    for (path, why) in cases {
        let e = TlsRoots::from_pem_file(&path).expect_err("refused");
        let text = e.to_string();
        println!("{text}");
        assert!(matches!(&e, cluster::Error::Ca { path: p, .. } if *p == path), "{text}");
        assert!(text.contains(&path.display().to_string()) && text.contains(why), "{text}");
    }
    let ok = roots(&certs.ca);
    assert_eq!((ok.path(), ok.certificates()), (certs.ca.as_path(), 1));
    // A CA for a plain URL would protect nothing: refused, not ignored.
    let sink = || Box::new(|_: Vec<Event>| {}) as cluster::Sink;
    for url in ["redis://127.0.0.1:1", "redis-cluster://127.0.0.1:1"] {
        let err = Handle::start(tls_config(url, Some(&certs.ca)), info("a"), sink()).unwrap_err();
        assert!(matches!(err, cluster::Error::Url { .. }) && err.to_string().contains("rediss"), "{err}");
    }
    for url in ["rediss://127.0.0.1:1", "rediss-cluster://127.0.0.1:1"] {
        Handle::start(tls_config(url, Some(&certs.ca)), info("a"), sink()).expect("accepted").stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
