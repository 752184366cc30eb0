#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Bodies stream through the proxy in both directions with bounded memory: a 1 GiB download
//! and a 1 GiB upload through the real binary (a child process, so its peak resident memory
//! is its own), then its VmHWM is read from /proc.

use std::time::Instant;

use http_body_util::BodyExt;
use outrider::testing::{generated_body, BinProxy, ProxyClient, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");
const GIB: u64 = 1024 * 1024 * 1024;
/// Far below the body size: a proxy that buffered either body whole would blow through it.
const MAX_HWM_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_bounded_memory() {
    let up = Upstream::start().await;
    let proxy = BinProxy::start(
        BIN,
        "outbound:\n  egress:\n    allow:\n      - host: big.test\n      - cidr: 127.0.0.1/32\n\
         dns:\n  hosts:\n    big.test: 127.0.0.1\n",
    );
    let hwm_start = proxy.vm_hwm_kib();
    let mut client = ProxyClient::connect(proxy.proxy_addr).await;

    let started = Instant::now();
    let req = http::Request::get(format!("http://big.test:{}/stream?bytes={GIB}", up.port()))
        .body(generated_body(0))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, GIB, "download came through short");
    let download = started.elapsed();

    let started = Instant::now();
    let req = http::Request::post(format!("http://big.test:{}/upload", up.port()))
        .header("content-length", GIB.to_string())
        .body(generated_body(GIB))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let count = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&count),
        GIB.to_string(),
        "upstream received a different upload"
    );
    let upload = started.elapsed();

    let hwm = proxy.vm_hwm_kib();
    eprintln!(
        "download {download:?}, upload {upload:?}, VmHWM {hwm_start} KiB at start, {hwm} KiB after"
    );
    assert!(
        hwm < MAX_HWM_KIB,
        "proxy peak RSS {hwm} KiB for 1 GiB bodies: they were buffered"
    );
    // Both transfers are in the access log with their byte counts, neither marked cut off.
    let log = &proxy.log_path;
    let down = outrider::testing::wait_log_file(log, |r| {
        r["path"].as_str().is_some_and(|p| p.starts_with("/stream")) && r["bytes_out"] == GIB
    })
    .await;
    assert!(down.get("error").is_none(), "{down}");
    let up =
        outrider::testing::wait_log_file(log, |r| r["path"] == "/upload" && r["bytes_in"] == GIB)
            .await;
    assert!(up.get("error").is_none(), "{up}");
}
