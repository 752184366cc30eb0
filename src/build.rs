//! Records which commit the binary is built from, for `outrider --version`: a benchmark
//! or a bug report then says which code it ran. `-dirty` when the sources differ from that
//! commit; `unknown` outside a git checkout (a source tarball) or without git.

use std::path::PathBuf;
use std::process::Command;

/// What decides the binary: a change to any of these builds it anew.
const SOURCES: &[&str] = &["src", "Cargo.toml", "Cargo.lock"];

fn git(args: &[&str]) -> Option<String> {
    // `--no-optional-locks`: never rewrite the index here, or the index would look changed
    // to the next build and run this again.
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    // A commit or a checkout moves HEAD or the branch it names. Only paths that exist are
    // named: cargo runs this again on every build for one that does not.
    for name in ["HEAD", "refs/heads", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            if PathBuf::from(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(hash) if !hash.is_empty() => {
            let mut diff = vec!["diff", "--quiet", "HEAD", "--"];
            diff.extend_from_slice(SOURCES);
            // `--quiet` exits 1 on a difference, which `git` reads as no answer.
            let unchanged = git(&diff).is_some();
            // A new file not yet added is part of the build too (`mod` names it).
            let mut others = vec!["ls-files", "--others", "--exclude-standard", "--"];
            others.extend_from_slice(SOURCES);
            let clean = unchanged && git(&others).is_some_and(|o| o.is_empty());
            if clean {
                hash
            } else {
                format!("{hash}-dirty")
            }
        }
        _ => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=OUTRIDER_COMMIT={commit}");
}
