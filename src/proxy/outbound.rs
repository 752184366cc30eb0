//! The outbound listener's per-connection logic: explicit proxy client or transparent
//! capture (by the original destination), then protocol detection for transparent ones.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::admit::admit;
use super::detect::{detect, Protocol, Rewind};
use super::forward::note_admission;
use super::tunnel::splice;
use super::{ConnInfo, Inputs};
use crate::access_log::{LogGuard, Record};
use crate::net::connect;
use crate::policy::host::Host;

/// Serves one accepted outbound connection. `original_dst` is `None` for explicit clients
/// (including those whose original destination is the listener itself).
pub fn serve(
    inputs: Arc<Inputs>,
    mut stream: TcpStream,
    client: SocketAddr,
    original_dst: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    // A block, not an `async fn`: a block's captures are its state, where an `async fn`
    // keeps its arguments twice (as passed, and moved into its body; see
    // `keepalive::serve`). The gauge is opened here and moved in: a local, even of size
    // zero, is placed after the detection's room and pushes the server's further along.
    let gauge = crate::metrics::ConnectionGauge::open();
    async move {
        let _ = stream.set_nodelay(true);
        // What serves the connection is awaited outside the block that picks it, so that the
        // block's locals end first: they would otherwise keep their room in the state (moved
        // out or not), and the config (which a reload replaces), for the connection's life.
        'pick: {
            let conn = ConnInfo {
                client,
                original_dst,
                in_connect: false,
            };
            let state = inputs.state.load_full();
            let (http1, prefix) = match original_dst {
                None => {
                    // Explicit clients are sniffed only to serve HTTP/1 with hyper's HTTP/1
                    // server alone (see `serve_connection`); one that is slow to speak is
                    // served by either.
                    let detected = detect(&mut stream, state.cfg.detect_timeout).await;
                    let Ok((protocol, prefix)) = detected else {
                        return;
                    };
                    (protocol == Protocol::Http1, prefix)
                }
                Some(od) if state.cfg.server_first_ports.contains(&od.port()) => {
                    // Boxed here and below: admission (DNS) and the tunnel would otherwise
                    // size the state of every HTTP connection too.
                    let tcp = Protocol::Tcp { timed_out: false };
                    let tunnel = tunnel_tcp(inputs, stream, bytes::Bytes::new(), conn, tcp);
                    break 'pick Either::Right(tunnel.boxed());
                }
                Some(_) => {
                    let detected = detect(&mut stream, state.cfg.detect_timeout).await;
                    let (protocol, prefix) = match detected {
                        Ok(found) => found,
                        Err(e) => {
                            tracing::debug!(%client, error = %e, "client closed during detection");
                            return;
                        }
                    };
                    match protocol {
                        Protocol::Http1 => (true, prefix),
                        Protocol::Http2 => (false, prefix),
                        other => {
                            if let Protocol::Tcp { timed_out: true } = other {
                                // Fails open to opaque TCP (still subject to CIDR policy), and
                                // is counted.
                                metrics::counter!("outrider_detect_timeouts_total").increment(1);
                            }
                            let tunnel = tunnel_tcp(inputs, stream, prefix, conn, other);
                            break 'pick Either::Right(tunnel.boxed());
                        }
                    }
                }
            };
            let io = Rewind::new(prefix, stream);
            Either::Left(serve_http(inputs, io, conn, http1, shutdown))
        }
        .await;
        drop(gauge);
    }
}

/// Serves the plain HTTP inside a `CONNECT` tunnel (see `tunnel::connect`); `http1` when
/// it is HTTP/1, else HTTP/2 with prior knowledge. Drained as tunnels are: kept until the
/// drain deadline. The future is boxed under a named type: requests served here can
/// themselves be `CONNECT`s, and the compiler cannot prove an opaque future `Send` through
/// that cycle.
pub(super) fn serve_in_connect(
    inputs: Arc<Inputs>,
    io: super::detect::Rewind<super::upgrade::ClientIo>,
    conn: ConnInfo,
    http1: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(serve_http(
        inputs,
        io,
        conn,
        http1,
        CancellationToken::new(),
    ))
}

/// HTTP/1 and HTTP/2 with keep-alive and upgrades; drains gracefully on shutdown.
/// `http1` when detection saw HTTP/1.
fn serve_http<I>(
    inputs: Arc<Inputs>,
    io: I,
    conn: ConnInfo,
    http1: bool,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed: hyper keeps room for the in-flight request's future in every connection, and
    // unboxed that room (the size of the whole request path) is paid by idle ones too.
    let for_svc = inputs.clone();
    let svc = service_fn(move |req| Box::pin(super::forward::handle(for_svc.clone(), conn, req)));
    let limits = inputs.state.load().cfg.clients;
    // Not an `async fn`: see `http::serve_connection`.
    super::http::serve_connection(io, svc, http1, limits, shutdown).map(move |res| {
        if let Err(e) = res {
            tracing::debug!(client = %conn.client, error = %e, "client connection ended with error");
            super::log_refused_head(&inputs, "outbound", conn, &e);
        }
    })
}

/// TLS (checked on its SNI) and opaque TCP (checked on the destination address): admitted,
/// dialled at the original destination, the detected bytes replayed, then spliced.
async fn tunnel_tcp(
    inputs: Arc<Inputs>,
    stream: TcpStream,
    prefix: bytes::Bytes,
    conn: ConnInfo,
    protocol: Protocol,
) {
    let Some(od) = conn.original_dst else { return };
    let state = inputs.state.load_full();
    let (sni, server) = match &protocol {
        Protocol::Tls(hello) => (hello.sni.clone(), hello.server()),
        _ => (None, None),
    };
    let mut guard = LogGuard::start(
        state.log.clone(),
        Record {
            direction: "outbound",
            mode: "transparent",
            protocol: protocol.name(),
            client: Some(conn.client),
            original_dst: Some(od),
            authority: Some(od.to_string()),
            sni: sni.clone(),
            ..Record::default()
        },
    );
    // Without an SNI, the destination address is all there is to check.
    let host = match server {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            guard.record.decision = "deny";
            guard.record.reason = Some(format!("invalid SNI: {e}"));
            crate::metrics::record_denial("invalid_host", "deny");
            return;
        }
        None => Host::Ip(od.ip()),
    };
    let admitted = match admit(&inputs, &state, &host, od.port(), Some(od), true).await {
        Ok(a) => a,
        Err(e) => {
            // Denied TLS/TCP: the connection is closed (dropped here), and logged.
            super::forward::record_error(&mut guard, &e);
            return;
        }
    };
    note_admission(&mut guard, &admitted);
    let dial = connect::connect_maybe_mesh(
        admitted.addr,
        state.cfg.connect_timeout,
        state.mesh_client.as_ref(),
    );
    let mut upstream = match dial.await {
        Ok(s) => s,
        Err(e) => {
            guard.record.error = Some(e.to_string());
            return;
        }
    };
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(&prefix).await {
            guard.record.error = Some(format!("upstream write failed: {e}"));
            return;
        }
        guard
            .bytes
            .inbound
            .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    let recheck = super::tunnel::egress_recheck(host, od.port(), admitted.addr, true);
    splice(&inputs, stream, upstream, guard, recheck).await;
}
