#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The data path's worker threads (`runtime.worker_threads`): as many as configured, each
//! serving the connections it accepts, kept through a reload, and none left behind once a
//! server ends.
//!
//! The in-process tests count this process's threads by name, so no other test in this
//! file may run a proxy in-process at the same time: the binary test runs its own process.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use outrider::testing::{BinProxy, ProxyClient, TestProxy, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");

/// The names of a process's threads (`/proc/PID/task/*/comm`) that are Outrider workers.
fn worker_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| n.starts_with("outrider-w"))
        .collect();
    names.sort();
    names
}

/// This process's worker threads, once they number `n` (or whatever they are after 5 s).
fn own_workers_once(n: usize) -> Vec<String> {
    workers_once(std::process::id(), n)
}

/// A process's worker threads, once they number `n` (or whatever they are after 5 s). A
/// thread names itself as it starts, which may be just after the proxy is ready.
fn workers_once(pid: u32, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = worker_threads(pid);
        if now.len() == n || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn allow_loopback(workers: usize) -> String {
    format!(
        "runtime:\n  worker_threads: {workers}\noutbound:\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_the_configured_workers_and_serves_through_them() {
    let up = Upstream::start().await;
    let mut proxy = BinProxy::start(BIN, &allow_loopback(3));
    let pid = u32::try_from(proxy.pid()).unwrap();
    assert_eq!(
        workers_once(pid, 3),
        ["outrider-w0", "outrider-w1", "outrider-w2"],
        "ps -T shows the workers by name"
    );
    // Clients at once, each on its own connection: whichever worker accepts one serves it.
    let url = format!("http://127.0.0.1:{}/w", up.port());
    let statuses = futures_util::future::join_all((0..24).map(|_| {
        let url = url.clone();
        async move {
            let mut c = ProxyClient::connect(proxy.proxy_addr).await;
            let first = c.get(&url).await.status.as_u16();
            let second = c.get(&url).await.status.as_u16();
            (first, second)
        }
    }))
    .await;
    assert!(statuses.iter().all(|&s| s == (200, 200)), "{statuses:?}");
    assert_eq!(up.requests(), 48);
    // A reload cannot change the threads that run: it says so, and they stay.
    proxy.write_config(&allow_loopback(1));
    proxy.signal(Signal::SIGHUP);
    assert!(
        proxy.wait_stderr("runtime.worker_threads changed: it applies after a restart"),
        "{}",
        proxy.stderr()
    );
    assert_eq!(worker_threads(pid).len(), 3);
    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success(), "{status:?}\n{}", proxy.stderr());
}

/// Left to the race for the listening socket, an idle proxy's first connections all went to
/// the same worker: an app with two keep-alive connections used one core of two. The
/// worker that accepts one now hands it to a worker serving fewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_client_connections_are_served_by_two_workers() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start(BIN, &allow_loopback(2));
    let url = format!("http://127.0.0.1:{}/spread", up.port());
    let mut first = ProxyClient::connect(proxy.proxy_addr).await;
    assert_eq!(first.get(&url).await.status, 200);
    let mut second = ProxyClient::connect(proxy.proxy_addr).await;
    assert_eq!(second.get(&url).await.status, 200);
    let (status, text) = outrider::testing::admin_get(proxy.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let served = |worker: &str| {
        let name = "outrider_worker_connections_total";
        outrider::testing::metric_value(&text, name, &[("worker", worker)])
    };
    assert_eq!((served("0"), served("1")), (1.0, 1.0), "{text}");
    assert!(first.is_open() && second.is_open());
}

/// A burst of connections, as a load generator or a client pool opens at start, is split
/// about evenly. A worker used to count a connection it handed to another only once the
/// other had taken it; until then the other still looked idle, so the two could hand a
/// burst back and forth on stale counts: wrk's 64 connections went 53 and 12, or 17 and
/// 48, and one core carried most of the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_is_split_evenly_between_the_workers() {
    let proxy = BinProxy::start(BIN, &allow_loopback(2));
    let served = |text: &str, worker: &str| {
        let name = "outrider_worker_connections_total";
        outrider::testing::metric_value(text, name, &[("worker", worker)])
    };
    let mut before = (0.0, 0.0);
    for round in 1..=5 {
        // Opened back to back without waiting for the proxy (the kernel completes the
        // handshakes), so that the workers find many waiting in the accept queue at once.
        let addr = proxy.proxy_addr;
        let clients = tokio::task::spawn_blocking(move || {
            (0..64)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (w0, w1) = loop {
            let (status, text) = outrider::testing::admin_get(proxy.admin_addr, "/metrics").await;
            assert_eq!(status, 200);
            let now = (served(&text, "0") - before.0, served(&text, "1") - before.1);
            if now.0 + now.1 >= 64.0 || Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(w0 + w1, 64.0, "round {round}: every connection served");
        // The balance tolerates a sixteenth, plus the few two workers accepting at the
        // same moment may both keep.
        assert!(
            (w0 - w1).abs() <= 8.0,
            "round {round}: worker 0 took {w0} of the burst, worker 1 {w1}"
        );
        before = (before.0 + w0, before.1 + w1);
        drop(clients);
        // Closed, they leave both workers' counts before the next burst.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, text) = outrider::testing::admin_get(proxy.admin_addr, "/metrics").await;
            let open = outrider::testing::metric_value(&text, "outrider_connections_open", &[]);
            if open == 0.0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ends_or_never_runs_leaves_no_worker_threads() {
    assert_eq!(own_workers_once(0), Vec::<String>::new());
    // Stopped: the drain ends, then the workers.
    let proxy = TestProxy::start(&allow_loopback(2)).await;
    assert_eq!(own_workers_once(2), ["outrider-w0", "outrider-w1"]);
    proxy.shutdown().await;
    assert_eq!(own_workers_once(0), Vec::<String>::new(), "after shutdown");

    // Bound, then dropped without running: its workers were waiting, and end.
    let dir = outrider::testing::TempDir::new("workers");
    let (cfg, _) =
        outrider::testing::prepare_config(&allow_loopback(2), &dir.path().join("access.log"));
    let server = outrider::server::Server::bind(outrider::config::validate(cfg).unwrap(), None)
        .await
        .unwrap();
    assert_eq!(own_workers_once(2).len(), 2);
    drop(server);
    assert_eq!(own_workers_once(0), Vec::<String>::new(), "after drop");
}
