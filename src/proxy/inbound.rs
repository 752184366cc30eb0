//! The inbound listener: connections redirected to the pod (or addressed to the listener)
//! go to the local app at `app_host:<original port>`, or where `inbound.routes` send them.
//! HTTP is proxied per request (logged, `x-forwarded-for`, `forwarded`, `x-request-id`);
//! anything else is passed through as bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::FutureExt;
use http::{header, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::detect::{detect, Protocol, Rewind};
use super::error::ProxyError;
use super::http::{
    add_via, append_to_list, append_value, strip_hop_by_hop, strip_request_hop_by_hop,
    upstream_version, wants_upgrade,
};
use super::slots::Listener;
use super::tunnel::splice;
use super::{ConnInfo, Inputs};
use crate::access_log::{LogGuard, Record};
use crate::body::{self, Body, Counted};
use crate::config::MtlsMode;
use crate::net::connect;
use crate::net::text::IpText;
use crate::policy::authz;

/// Serves one inbound connection: mesh mTLS is terminated (once identity is configured),
/// plaintext is accepted unless `inbound.mtls` is strict, then HTTP is proxied per request
/// and anything else passed through to the app.
pub fn serve(
    inputs: Arc<Inputs>,
    mut stream: TcpStream,
    client: SocketAddr,
    original_dst: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    // As on the outbound listener (`outbound::serve`): a block, not an `async fn`; what
    // serves the connection is awaited outside the block that picks it; the gauge is moved in.
    let gauge = crate::metrics::ConnectionGauge::open();
    async move {
        let _ = stream.set_nodelay(true);
        'pick: {
            let conn = ConnInfo {
                client,
                original_dst,
                in_connect: false,
            };
            let state = inputs.state.load_full();
            let (protocol, prefix) = match detect(&mut stream, state.cfg.detect_timeout).await {
                Ok(found) => found,
                Err(_) => return,
            };
            let io = Rewind::new(prefix, stream);
            match (&protocol, inputs.mesh.clone()) {
                (Protocol::Tls(hello), Some(mesh))
                    if hello.mesh && state.cfg.inbound_mtls != MtlsMode::Disabled =>
                {
                    // Boxed: the TLS session and the HTTP server over it would otherwise size
                    // the state of every plaintext connection too (about 7 KB each, idle or
                    // not).
                    let mtls = terminate_mtls(inputs, io, conn, mesh, shutdown);
                    break 'pick Either::Right(mtls.boxed());
                }
                _ => {}
            }
            if state.cfg.inbound_mtls == MtlsMode::Strict {
                // Strict: plaintext (anything but mesh TLS) is refused and logged.
                refuse(
                    &state,
                    conn,
                    protocol.name(),
                    "plaintext refused: inbound.mtls is strict",
                );
                return;
            }
            let http1 = match protocol {
                Protocol::Http1 => true,
                Protocol::Http2 => false,
                other => {
                    let name = other.name();
                    break 'pick Either::Right(pass_through(inputs, io, conn, None, name).boxed());
                }
            };
            Either::Left(serve_http(inputs, io, conn, None, http1, shutdown))
        }
        .await;
        drop(gauge);
    }
}

/// Terminates mesh mTLS: the caller's chain and trust domain are verified by the server
/// config; its SPIFFE ID then drives authorization and `x-forwarded-client-cert`.
async fn terminate_mtls<I>(
    inputs: Arc<Inputs>,
    io: I,
    conn: ConnInfo,
    mesh: Arc<super::Mesh>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = inputs.state.load_full();
    let acceptor = tokio_rustls::TlsAcceptor::from(mesh.server.clone());
    // Bounded like a request head: a caller that stops part-way through the handshake
    // (after its ClientHello, say) would otherwise hold the connection for ever.
    let limit = state.cfg.clients.idle_timeout;
    let Ok(accepted) = tokio::time::timeout(limit, acceptor.accept(io)).await else {
        let why = format!("mTLS handshake not finished within {limit:?}");
        refuse(&state, conn, "mtls", &why);
        return;
    };
    let mut tls = match accepted {
        Ok(tls) => tls,
        Err(e) => {
            // Wrong CA, expired, wrong trust domain, no certificate: refused and logged.
            refuse(
                &state,
                conn,
                "mtls",
                &format!("mTLS handshake refused: {e}"),
            );
            return;
        }
    };
    let peer: Option<Arc<str>> =
        crate::tls::peer_spiffe_id(tls.get_ref().1).map(|id| Arc::from(id.to_string()));
    let (inner, prefix) = match detect(&mut tls, state.cfg.detect_timeout).await {
        Ok(found) => found,
        Err(_) => return,
    };
    let io = Rewind::new(prefix, tls);
    drop(state);
    match inner {
        Protocol::Http1 | Protocol::Http2 => {
            let http1 = inner == Protocol::Http1;
            serve_http(inputs, io, conn, peer, http1, shutdown).await
        }
        _ => pass_through(inputs, io, conn, peer, "mtls").await,
    }
}

/// Logs a refused connection; dropping it closes it.
fn refuse(state: &super::State, conn: ConnInfo, protocol: &'static str, reason: &str) {
    let mut guard = inbound_guard(state, conn, protocol);
    guard.record.decision = "deny";
    guard.record.reason = Some(reason.to_owned());
}

fn inbound_guard(state: &super::State, conn: ConnInfo, protocol: &'static str) -> LogGuard {
    LogGuard::start(
        state.log.clone(),
        Record {
            direction: "inbound",
            mode: conn.mode(),
            protocol,
            client: Some(conn.client),
            original_dst: conn.original_dst,
            ..Record::default()
        },
    )
}

/// HTTP/1 or HTTP/2 from a caller (plaintext, or inside terminated mTLS with `peer` set).
fn serve_http<I>(
    inputs: Arc<Inputs>,
    io: I,
    conn: ConnInfo,
    peer: Option<Arc<str>>,
    http1: bool,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed: hyper keeps room for the in-flight request's future in every connection, and
    // unboxed that room (the size of the whole request path) is paid by idle ones too.
    let for_svc = inputs.clone();
    let svc = service_fn(move |req| Box::pin(handle(for_svc.clone(), conn, peer.clone(), req)));
    let limits = inputs.state.load().cfg.clients;
    // Not an `async fn`: see `http::serve_connection`.
    super::http::serve_connection(io, svc, http1, limits, shutdown).map(move |res| {
        if let Err(e) = res {
            tracing::debug!(client = %conn.client, error = %e, "inbound connection ended with error");
            super::log_refused_head(&inputs, "inbound", conn, &e);
        }
    })
}

/// Non-HTTP traffic: authorized on identity and port only, then spliced to the app.
async fn pass_through<I>(
    inputs: Arc<Inputs>,
    io: I,
    conn: ConnInfo,
    peer: Option<Arc<str>>,
    protocol: &'static str,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let state = inputs.state.load_full();
    let mut guard = inbound_guard(&state, conn, protocol);
    guard.record.peer_identity = peer.clone();
    let Some(od) = conn.original_dst else {
        guard.fail("no original destination and not HTTP: nowhere to send it".into());
        return;
    };
    guard.record.authority = Some(od.to_string());
    let asked = authz::Request {
        identity: peer.as_deref(),
        port: od.port(),
        path: None,
        method: None,
    };
    match state.cfg.authz.check(asked) {
        Ok(rule) => guard.record.rule = Some(rule),
        Err(reason) => {
            guard.record.decision = "deny";
            guard.record.reason = Some(reason);
            return;
        }
    }
    let app = state.cfg.app_addr(od);
    guard.record.upstream = Some(app);
    if inputs.is_own(app) {
        // Another host connected to the pod on one of the sidecar's own ports: handing
        // that to the loopback-only listener would let it use the outbound proxy (and the
        // pod's egress rights) or the admin API.
        super::forward::record_error(&mut guard, &ProxyError::Loop(app.to_string()));
        return;
    }
    let upstream = match connect::connect(app, state.cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            guard.fail(e.to_string());
            return;
        }
    };
    // Checked again after each reload on the caller and port alone, as here.
    let recheck = authz_recheck(peer.as_deref(), od.port(), None, None);
    splice(&inputs, io, upstream, guard, recheck).await;
}

/// The recheck after a reload for a connection authorized on these: the same question
/// asked of the new authorization rules.
fn authz_recheck(
    identity: Option<&str>,
    port: u16,
    path: Option<&str>,
    method: Option<&str>,
) -> super::tunnel::StillAllowed {
    let identity = identity.map(str::to_owned);
    let (path, method) = (path.map(str::to_owned), method.map(str::to_owned));
    Box::new(move |state| {
        let asked = authz::Request {
            identity: identity.as_deref(),
            port,
            path: path.as_deref(),
            method: method.as_deref(),
        };
        state.cfg.authz.check(asked).map(|_| ())
    })
}

/// One inbound HTTP request: route, add forwarding headers, send to the app, log.
async fn handle(
    inputs: Arc<Inputs>,
    conn: ConnInfo,
    peer: Option<Arc<str>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let state = inputs.state.load_full();
    // The caller's id when it sent a usable one, else a new one; the app and the log get
    // the same value.
    let request_id = match req.headers().get(X_REQUEST_ID) {
        Some(v) if v.to_str().is_ok() => v.clone(),
        _ => new_request_id(),
    };
    let mut record = super::request_record("inbound", conn, &req);
    if state.log.is_on() {
        record.request_id = Some(request_id.clone());
    }
    // The guard and `to_app` boxed: see `forward::handle`. (`to_app`'s future built in
    // its box with `super::boxed` was copied as whole as with `Box::pin`.)
    let mut guard = Box::new(LogGuard::start(state.log.clone(), record));

    guard.record.peer_identity = peer.clone();
    match Box::pin(to_app(
        &inputs,
        &state,
        conn,
        peer.as_deref(),
        req,
        request_id,
        &mut guard,
    ))
    .await
    {
        Ok((resp, Some((client_side, app_side, recheck)))) => {
            // A protocol switch (WebSocket and the like): the record is written when the
            // upgraded connection closes.
            guard.record.status = resp.status().as_u16();
            inputs.tasks.spawn(super::tunnel::splice_upgrades(
                inputs.clone(),
                client_side,
                app_side,
                *guard,
                recheck,
                Listener::Inbound,
            ));
            Ok(resp)
        }
        Ok((resp, None)) => {
            guard.record.status = resp.status().as_u16();
            let counter = guard.bytes.clone();
            Ok(resp.map(|b| body::boxed(Counted::new(b, counter, true, Some(guard)))))
        }
        Err(e) => Ok(super::forward::note_error(&mut guard, &e)),
    }
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Both halves of a protocol switch, and how to authorize the joined connection again
/// after a reload.
type Upgrade = (
    super::upgrade::OnUpgrade,
    crate::net::upstream::Upgraded,
    super::tunnel::StillAllowed,
);

/// Route → authorize → forwarding headers → the app (pooled) → response filters. A
/// request to switch protocols (WebSocket) is passed on as one, and when the app accepts
/// it, the two halves to join come back with the response.
async fn to_app(
    inputs: &Inputs,
    state: &super::State,
    conn: ConnInfo,
    peer: Option<&str>,
    mut req: Request<Incoming>,
    request_id: HeaderValue,
    guard: &mut LogGuard,
) -> Result<(Response<Body>, Option<Upgrade>), ProxyError> {
    // The inbound listener routes requests to the app; it is no tunnel. Passed on, a
    // CONNECT reached the app with its target rewritten to `/`, and an app's 200 left the
    // caller with a "tunnel" that closed at once.
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(
            "CONNECT is not served on the inbound listener: it routes requests to the app (tunnels go through the outbound listener)",
        ));
    }
    check_host(&mut req)?;
    let target = state
        .cfg
        .routes
        .pick(
            guard.record.authority.as_deref(),
            req.uri().path(),
            req.headers(),
        )
        .or_else(|| conn.original_dst.map(|od| state.cfg.app_addr(od)))
        .ok_or(ProxyError::NoRoute)?;
    guard.record.upstream = Some(target);
    // Never one of the sidecar's own listeners (see `pass_through`), whatever the port
    // or a route says.
    if inputs.is_own(target) {
        return Err(ProxyError::Loop(target.to_string()));
    }
    let port = conn.original_dst.map_or(target.port(), |od| od.port());
    let asked = authz::Request {
        identity: peer,
        port,
        path: Some(req.uri().path()),
        method: Some(req.method().as_str()),
    };
    guard.record.rule = Some(
        state
            .cfg
            .authz
            .check(asked)
            .map_err(ProxyError::Unauthorized)?,
    );
    if let Some(answer) = super::http::max_forwards(&mut req) {
        guard.record.upstream = None;
        return Ok((answer, None));
    }

    let upgrading = wants_upgrade(req.headers_mut());
    let client_upgrade = upgrading.then(|| {
        // An upgraded connection is checked again after a reload as this request was.
        let path = Some(req.uri().path());
        let recheck = authz_recheck(peer, port, path, Some(req.method().as_str()));
        (super::upgrade::on(&mut req), recheck)
    });
    let (mut parts, incoming) = req.into_parts();
    // The caller addressed the app: HTTP/2 stays HTTP/2 (gRPC apps speak nothing else).
    let client_version = parts.version;
    let version = upstream_version(client_version, true);
    strip_request_hop_by_hop(&mut parts.headers, upgrading, version)?;
    add_forwarding(
        &mut parts.headers,
        conn,
        guard.record.authority.as_deref(),
        request_id,
    );
    // Only the proxy may say who the caller is: a caller's own XFCC header is dropped, or
    // replaced by the verified identity (`insert` replaces every line of it).
    match peer.and_then(|id| append_value(&[], &[b"URI=", id.as_bytes()])) {
        Some(v) => {
            parts.headers.insert(X_FORWARDED_CLIENT_CERT, v);
        }
        None => {
            parts.headers.remove(X_FORWARDED_CLIENT_CERT);
        }
    }
    parts.version = version;
    let counter = guard.bytes.clone();
    let up = Request::from_parts(
        parts,
        body::request_body(
            incoming,
            counter,
            client_version,
            state.cfg.clients.idle_timeout,
        ),
    );
    let pooled = super::forward::Pooled {
        upstreams: state.upstreams.clone(),
        addr: target,
        timeout: state.cfg.response_timeout,
        mesh: false,
    };
    let mut resp = pooled.send_to_origin(up).await?;
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = match (client_upgrade, switching) {
        (Some((client_side, recheck)), true) => resp
            .extensions_mut()
            .remove::<crate::net::upstream::Upgraded>()
            .map(|app_side| (client_side, app_side, recheck)),
        _ => None,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, switching);
    add_via(&mut parts.headers, parts.version);
    parts.version = client_version;
    Ok((Response::from_parts(parts, body), upgrade))
}

/// The host a request names, as a server must take it (RFC 9112 §3.2, §3.2.2): the request
/// target's authority when it has one, which every Host header is then made to say; else the
/// one Host header. What the route was chosen by is what the app is told: an app behind a
/// sidecar builds links and password-reset mails from Host and trusts the sidecar to have
/// checked it, as nginx and Envoy answer `400` to a missing, doubled or malformed one.
fn check_host<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    use crate::policy::host::{check_authority, HostError};
    let invalid = |what: &str, e: HostError| ProxyError::BadRequest(format!("invalid {what}: {e}"));
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let hosts = (hosts.next(), hosts.next());
    if let Some(authority) = req.uri().authority() {
        let raw = authority.as_str().as_bytes();
        if raw.contains(&b'@') {
            return Err(invalid("request target", HostError::Userinfo));
        }
        check_authority(raw).map_err(|e| invalid("request target", e))?;
        let agrees = match hosts {
            (None, _) => true,
            (Some(h), None) => h.as_bytes() == raw,
            _ => false,
        };
        if !agrees {
            let value = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::BadRequest("request target is no valid Host".into()))?;
            req.headers_mut().insert(header::HOST, value);
        }
        return Ok(());
    }
    match hosts {
        (Some(h), None) => check_authority(h.as_bytes()).map_err(|e| invalid("Host", e)),
        (Some(_), Some(_)) => Err(ProxyError::BadRequest(
            "more than one Host header: which host is meant is ambiguous".into(),
        )),
        // HTTP/1.0 predates Host, and HTTP/2 names the host in `:authority`, if at all.
        (None, _) if req.version() != http::Version::HTTP_11 => Ok(()),
        (None, _) => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
    }
}

const X_FORWARDED_CLIENT_CERT: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-client-cert");

fn add_forwarding(
    headers: &mut http::HeaderMap,
    conn: ConnInfo,
    host: Option<&str>,
    request_id: HeaderValue,
) {
    const XFF: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
    // Room for the three below at once. On a connection's first request the map is as
    // small as the client's headers (later ones reuse the previous response's, which is
    // roomy), and inserting one at a time grew it twice.
    headers.reserve(3);
    let ip = IpText::new(conn.client.ip());
    append_to_list(headers, XFF, &[ip.as_bytes()]);
    // The client as a `Forwarded` node: IPv6 in quoted brackets (RFC 7239 §6).
    let (open, close): (&[u8], &[u8]) = match conn.client {
        std::net::SocketAddr::V6(_) => (b"\"[", b"]\""),
        std::net::SocketAddr::V4(_) => (b"", b""),
    };
    // A host that could not be a quoted-string's content is left out rather than escaped.
    let host = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    });
    let (host_open, host, host_close): (&[u8], &[u8], &[u8]) = match host {
        Some(h) => (b";host=\"", h.as_bytes(), b"\""),
        None => (b"", b"", b""),
    };
    let node = [
        &b"for="[..],
        open,
        ip.as_bytes(),
        close,
        b";proto=http",
        host_open,
        host,
        host_close,
    ];
    append_to_list(headers, header::FORWARDED, &node);
    // Sent over HTTP/2 never indexed, as unique to the request (`http2::never_index_ids`).
    headers.insert(X_REQUEST_ID, request_id);
}

/// A 128-bit request id in hex, unique within the process and unlikely to repeat across
/// processes: a counter through a bijective mixer, keyed by 128 random bits drawn once. (A
/// fresh random id per request cost a DRBG call, which showed in the inbound profile.)
fn new_request_id() -> HeaderValue {
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEY: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let key = *KEY.get_or_init(|| {
        let mut b = [0u8; 16];
        if aws_lc_rs::rand::fill(&mut b).is_ok() {
            return u128::from_le_bytes(b);
        }
        // Uniqueness, not secrecy, is what a request id needs: fall back to the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        t ^ u128::from(std::process::id())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // splitmix64's finalizer is a bijection, so distinct counters give distinct ids.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // Truncations on purpose: the key's two halves.
    let hi = mix(n ^ key as u64);
    let lo = mix(hi ^ (key >> 64) as u64);
    let id = (u128::from(hi) << 64) | u128::from(lo);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http::{HeaderMap, HeaderValue};

    fn forwarded(client: &str, host: Option<&str>, prev: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in prev {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let conn = super::ConnInfo {
            client: client.parse().unwrap(),
            original_dst: None,
            in_connect: false,
        };
        super::add_forwarding(&mut h, conn, host, HeaderValue::from_static("id-1"));
        h
    }

    #[test]
    fn forwarding_headers_append_to_earlier_hops_and_quote_ipv6() {
        let h = forwarded("10.0.0.7:5000", Some("app.test"), &[]);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["forwarded"], "for=10.0.0.7;proto=http;host=\"app.test\"");
        assert_eq!(h["x-request-id"], "id-1");

        let h = forwarded(
            "[2001:db8::1]:5000",
            None,
            &[
                ("x-forwarded-for", "192.0.2.1"),
                ("forwarded", "for=192.0.2.1"),
            ],
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 2001:db8::1");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1, for=\"[2001:db8::1]\";proto=http"
        );
    }

    #[test]
    fn a_host_that_would_break_the_quoted_string_is_left_out() {
        let h = forwarded("10.0.0.7:5000", Some("a\"b"), &[]);
        assert_eq!(h["forwarded"], "for=10.0.0.7;proto=http");
    }

    #[test]
    fn long_earlier_values_are_kept_whole() {
        // Longer than the stack buffer: the value is built on the heap instead, not cut.
        let prev: Vec<String> = (0..40).map(|i| format!("192.0.2.{i}")).collect();
        let prev = prev.join(", ");
        let h = forwarded("10.0.0.7:5000", None, &[("x-forwarded-for", &prev)]);
        assert_eq!(h["x-forwarded-for"], format!("{prev}, 10.0.0.7").as_str());
    }

    #[test]
    fn request_ids_are_128_bit_hex_and_do_not_repeat() {
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| String::from_utf8_lossy(super::new_request_id().as_bytes()).into_owned())
            .collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    }
}
