//! Byte tunnels: `CONNECT` (checked on its target, dialled before the 200 so that a failure
//! is still a proper error response), protocol upgrades, and transparent opaque TCP.
//! Each tunnel is logged once, at its close, with the bytes each way.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::admit::admit;
use super::error::ProxyError;
use super::forward::{note_admission, parse_authority};
use super::{ConnInfo, Inputs};
use crate::access_log::{Bytes, LogGuard, Record};
use crate::body::{self, Body};
use crate::net::connect;

/// Serves a `CONNECT host:port` request.
pub async fn connect(
    inputs: Arc<Inputs>,
    conn: ConnInfo,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let state = inputs.state.load_full();
    let authority = req.uri().authority().map(|a| a.to_string());
    let mut guard = LogGuard::start(
        state.log.clone(),
        Record {
            direction: "outbound",
            mode: conn.mode(),
            protocol: "connect",
            client: Some(conn.client),
            original_dst: conn.original_dst,
            method: Some("CONNECT".into()),
            authority: authority.clone(),
            ..Record::default()
        },
    );
    let result = async {
        let authority =
            authority.ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
        if req.uri().port().is_none() {
            return Err(ProxyError::BadRequest("CONNECT needs host:port".into()));
        }
        let (host, port) = parse_authority(&authority, 0)?;
        let admitted = admit(&inputs, &state, &host, port, conn.original_dst).await?;
        note_admission(&mut guard, &admitted);
        connect::connect_maybe_mesh(
            admitted.addr,
            state.cfg.connect_timeout,
            state.mesh_client.as_ref(),
        )
        .await
        .map_err(ProxyError::Connect)
    }
    .await;
    match result {
        Ok(upstream) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            guard.record.status = 200;
            inputs.tasks.spawn(async move {
                // The tunnel outlives the HTTP connection it came from: count it as open.
                let _gauge = crate::metrics::ConnectionGauge::continued();
                match on_upgrade.await {
                    Ok(upgraded) => splice(TokioIo::new(upgraded), upstream, guard).await,
                    Err(e) => guard.fail(format!("client upgrade failed: {e}")),
                }
            });
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        Err(e) => super::forward::note_error(&mut guard, &e),
    }
}

/// Copies bytes both ways until either side closes, counting them into the guard's
/// record, which is written when the guard drops here (also on reset).
pub async fn splice<C, U>(client: C, mut upstream: U, mut guard: LogGuard)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = CountingIo {
        inner: client,
        bytes: guard.bytes.clone(),
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        guard.record.error = Some(format!("tunnel ended with error: {e}"));
    }
}

/// Joins an upgraded client connection with its upgraded upstream (WebSocket and the like);
/// the request's record is written when it closes, with the bytes each way.
pub async fn splice_upgrades(
    client: OnUpgrade,
    upstream: crate::net::upstream::Upgraded,
    mut guard: LogGuard,
) {
    let _gauge = crate::metrics::ConnectionGauge::continued();
    let Some(upstream) = upstream.take() else {
        guard.fail("protocol upgrade failed: the upstream connection was already taken".into());
        return;
    };
    match client.await {
        Ok(c) => splice(TokioIo::new(c), upstream, guard).await,
        Err(e) => guard.fail(format!("protocol upgrade failed: {e}")),
    }
}

/// Counts bytes read from (in) and written to (out) the client.
struct CountingIo<T> {
    inner: T,
    bytes: Arc<Bytes>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.bytes.inbound.fetch_add(n, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.bytes.outbound.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
