#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The real binary started with a low soft open-file limit (`prlimit`, as a shell or a
//! service manager would leave it) raises it to the hard limit, and so serves more
//! connections at once than the low limit would have let it open.

use outrider::testing::{BinProxy, ProxyClient, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

/// Soft and hard "Max open files" of a process.
fn open_file_limits(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// `n` clients at once, each on its own keep-alive connection, each GETting `url` once;
/// their connections stay open (returned) with the status each got (0: none in `secs`).
async fn held_gets(
    proxy: std::net::SocketAddr,
    url: &str,
    n: usize,
    secs: u64,
) -> Vec<(ProxyClient, u16)> {
    futures_util::future::join_all((0..n).map(|_| async move {
        let mut c = ProxyClient::connect(proxy).await;
        let status = tokio::time::timeout(std::time::Duration::from_secs(secs), c.get(url))
            .await
            .map_or(0, |r| r.status.as_u16());
        (c, status)
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_open_file_limit_is_raised_to_the_hard_one() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start_under(
        &["prlimit", "--nofile=128:8192", "--"],
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
    );
    assert_eq!(open_file_limits(proxy.pid()), (8192, 8192));
    assert!(
        proxy.wait_stderr("raised the open-file limit"),
        "{}",
        proxy.stderr()
    );

    // 200 keep-alive connections open at once, each with an upstream connection behind
    // it: about 400 descriptors, which the soft limit of 128 would have refused.
    let url = format!("http://127.0.0.1:{}/", up.port());
    let clients = held_gets(proxy.proxy_addr, &url, 200, 20).await;
    let ok = clients.iter().filter(|(_, s)| *s == 200).count();
    assert_eq!(
        ok, 200,
        "only {ok} of 200 concurrent connections were served"
    );
}

/// At a hard limit it cannot raise, the proxy keeps serving what it can, answers what it
/// cannot connect upstream with 502, and says so in a few log lines, not one per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_the_proxy_degrades_and_logs_the_episode_once() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start_under(
        &["prlimit", "--nofile=64:64", "--"],
        BIN,
        "outbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
    );
    assert!(proxy.wait_stderr("allows only about 32 proxied connections"));

    // More connections than descriptors, held open for 3 s.
    let url = format!("http://127.0.0.1:{}/", up.port());
    let clients = held_gets(proxy.proxy_addr, &url, 100, 3).await;
    let statuses: Vec<u16> = clients.iter().map(|(_, s)| *s).collect();
    assert!(
        statuses.iter().all(|s| [0, 200, 502].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| *s != 0),
        "nobody was answered: {statuses:?}"
    );
    assert!(proxy.wait_stderr("accept failed"));
    drop(clients);

    // With the descriptors back, a new client is served (once the proxy has taken in and
    // closed the connections still queued behind the limit), and the end is logged.
    let mut served = false;
    for _ in 0..50 {
        let mut c = ProxyClient::connect(proxy.proxy_addr).await;
        if c.get(&url).await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(served, "no 200 within 5 s of the clients leaving");
    assert!(proxy.wait_stderr("accepting connections again"));
    let stderr = proxy.stderr();
    let warnings =
        stderr.matches("accept failed").count() + stderr.matches("accept still failing").count();
    assert!(
        warnings <= 3,
        "{warnings} accept warnings in about 3 s:\n{stderr}"
    );
}
