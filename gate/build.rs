//! Records the commit the gate is built from, for `gate --version`: `git rev-parse --short HEAD`,
//! or "unknown" outside a git checkout (a source tarball) or without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=FLEETGATE_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself changes on a checkout, the branch's ref on a commit
    // (in a linked worktree they live in different folders, which `--git-path` finds; a branch
    // may also be packed). A path that does not exist would make cargo rerun this script on
    // every build, so only existing ones are named. The index is not watched on purpose: `git
    // status` rewrites it, and each rewrite would rebuild the gate.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(r);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    // Another checkout sharing this target folder (.cargo/config.toml sets the variable to the
    // checkout's folder): the paths above are the other's, so run again here.
    println!("cargo:rerun-if-env-changed=FLEETGATE_SOURCE_ROOT");
    println!("cargo:rerun-if-changed=build.rs");
}
