#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The diagnostic log's filter, changed while the proxy runs (`POST /logging?level=…` on the
//! admin port, as Envoy's `/logging`), and an `OUTRIDER_LOG` that cannot be used.

use std::time::{Duration, Instant};

use outrider::testing::{admin_get, admin_post, raw_exchange, read_log, BinProxy};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");
const CONFIG: &str = "outbound:\n  egress:\n    allow:\n      - host: example.test\n";
/// A debug line: a client whose bytes are not HTTP ends its connection with an error.
const DEBUG_LINE: &str = "client connection ended with error";

/// Sends a client that speaks no HTTP, and waits until its refusal is in the access log, so
/// that whatever the proxy logs about it has been written by then.
async fn garbage(proxy: &BinProxy, seen: usize) -> usize {
    let _ = raw_exchange(proxy.proxy_addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = read_log(&proxy.log_path)
            .iter()
            .filter(|r| r["status"] == 400)
            .count();
        if n > seen {
            // The access log and stderr are written apart: give stderr a moment too.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return n;
        }
        assert!(Instant::now() < deadline, "the refusal was not logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_is_changed_without_a_restart() {
    let proxy = BinProxy::start(BIN, CONFIG);
    let admin = proxy.admin_addr;
    assert_eq!(
        admin_get(admin, "/logging").await,
        (200, "log filter: info\n".to_owned())
    );
    let seen = garbage(&proxy, 0).await;
    assert!(!proxy.stderr().contains(DEBUG_LINE), "{}", proxy.stderr());

    // Up to debug: the same client is now logged, by the same process.
    let (status, body) = admin_post(admin, "/logging?level=debug").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "log filter: debug (was info)\n");
    let seen = garbage(&proxy, seen).await;
    assert!(proxy.stderr().contains(DEBUG_LINE), "{}", proxy.stderr());
    assert!(
        proxy
            .stderr()
            .contains("log filter set to debug (was info)"),
        "{}",
        proxy.stderr()
    );

    // A whole filter, percent-encoded as a query value: Outrider's own lines at warn and
    // above, the rest at info. The debug line is gone again.
    let (status, body) = admin_post(admin, "/logging?level=%20outrider%3Dwarn%2Cinfo").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "log filter: outrider=warn,info (was debug)\n");
    let before = proxy.stderr().matches(DEBUG_LINE).count();
    garbage(&proxy, seen).await;
    assert_eq!(proxy.stderr().matches(DEBUG_LINE).count(), before);

    // What is not a filter is refused and changes nothing: not a level (which the filter
    // syntax would read as a module name, and so log nothing else), a bad level, nothing.
    for bad in [
        "level=verbose",
        "level=outrider%3Dloud",
        "level=",
        "lvl=debug",
    ] {
        let (status, body) = admin_post(admin, &format!("/logging?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (_, body) = admin_post(admin, "/logging?level=verbose").await;
    assert!(body.contains("\"verbose\" is neither a level"), "{body}");
    assert_eq!(
        admin_get(admin, "/logging").await,
        (200, "log filter: outrider=warn,info\n".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_outrider_log_is_the_default() {
    let proxy = BinProxy::start_under(&["env", "OUTRIDER_LOG="], BIN, CONFIG);
    assert_eq!(
        admin_get(proxy.admin_addr, "/logging").await,
        (200, "log filter: info\n".to_owned())
    );
    assert!(
        !proxy.stderr().contains("OUTRIDER_LOG"),
        "{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outrider_log_that_is_not_a_filter_is_named_and_info_is_used() {
    // `env` execs the proxy, so it still runs as the child whose stderr is read.
    let proxy = BinProxy::start_under(&["env", "OUTRIDER_LOG=verbose"], BIN, CONFIG);
    assert!(
        proxy.wait_stderr("OUTRIDER_LOG is not a valid filter"),
        "{}",
        proxy.stderr()
    );
    assert_eq!(
        admin_get(proxy.admin_addr, "/logging").await,
        (200, "log filter: info\n".to_owned())
    );
}
