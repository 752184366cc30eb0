//! `outrider iptables …` runs the same script as `iptables/outrider-iptables.sh`, embedded in
//! the binary, with the same flags: `print` (which changes nothing) is identical either way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn outrider_iptables_print_matches_the_script() {
    let args = [
        "print",
        "--proxy-uid",
        "1500",
        "--exclude-outbound-ports",
        "5432",
        "--block-uncaptured",
    ];
    let via_binary = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .arg("iptables")
        .args(args)
        .output()
        .unwrap();
    let via_script = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/iptables/outrider-iptables.sh"
        ))
        .args(args)
        .output()
        .unwrap();
    assert!(
        via_binary.status.success(),
        "{}",
        String::from_utf8_lossy(&via_binary.stderr)
    );
    assert_eq!(via_binary.stdout, via_script.stdout);
    let text = String::from_utf8_lossy(&via_binary.stdout);
    assert!(text.contains("--uid-owner 1500"), "{text}");
    assert!(text.contains("--dport 5432"), "{text}");
    assert!(text.contains("-j OUTRIDER_EGRESS"), "{text}");

    // A bad flag fails the same way, naming it.
    let bad = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["iptables", "print", "--proxy-uid", "nobody"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("proxy-uid"));
}
