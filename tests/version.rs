#![allow(clippy::expect_used)]
//! `outrider --version` names the commit the binary was built from (see src/build.rs), so a
//! benchmark or a bug report says which code it ran.

use std::process::Command;

/// What git says of this checkout: `None` without git or outside a checkout.
fn git(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

#[test]
fn the_version_names_the_commit_the_binary_was_built_from() {
    let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .arg("--version")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let said = String::from_utf8(out.stdout).expect("utf-8");
    let sources = ["src", "Cargo.toml", "Cargo.lock"];
    let expected = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some((true, head)) => {
            let diff = [&["diff", "--quiet", "HEAD", "--"][..], &sources].concat();
            let unchanged = git(&diff).expect("git ran a moment ago").0;
            let others = [
                &["ls-files", "--others", "--exclude-standard", "--"][..],
                &sources,
            ]
            .concat();
            let untracked = git(&others).expect("git ran a moment ago").1;
            let dirty = if unchanged && untracked.is_empty() {
                ""
            } else {
                "-dirty"
            };
            format!("{head}{dirty}")
        }
        _ => "unknown".to_owned(),
    };
    assert_eq!(
        said.trim_end(),
        format!("outrider {} ({expected})", env!("CARGO_PKG_VERSION"))
    );
}
