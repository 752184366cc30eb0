//! One HTTP request's whole path on the outbound side, phase by phase:
//! target → admit (policy, DNS) → rewrite (hop-by-hop, Via) → upstream (pooled) →
//! response filters → log. CONNECT goes to `tunnel`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;

use super::admit::{admit, Admitted};
use super::error::ProxyError;
use super::http::{
    add_via, strip_hop_by_hop, strip_request_hop_by_hop, upstream_version, wants_upgrade,
};
use super::{ConnInfo, Inputs, State};
use crate::access_log::LogGuard;
use crate::body::{self, Body, Counted};
use crate::net::upstream::SendError;
use crate::policy::host::{parse_host, parse_port, split_authority, Host};

/// Serves one request from an outbound client connection. Never fails: every error becomes
/// a response that names it.
pub async fn handle(
    inputs: Arc<Inputs>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Both boxed, and so is `inbound::to_app`: awaited in place, a callee's future is built
    // on the stack and copied into this one's (twice, as rustc does it), and this one,
    // sized for the largest callee, is copied again into the box each request gets.
    if req.method() == Method::CONNECT {
        return Ok(Box::pin(super::tunnel::connect(inputs, conn, req)).await);
    }
    let state = inputs.state.load_full();
    let record = super::request_record("outbound", conn, &req);
    // Boxed (about 500 bytes): it goes from this future into the response body's, and
    // by value it was copied four times on the way, and made this future larger.
    let mut guard = Box::new(LogGuard::start(state.log.clone(), record));

    let (resp, upgrade) =
        match super::boxed(|| forward(&inputs, &state, conn, req, &mut guard)).await {
            Ok(done) => done,
            Err(e) => (note_error(&mut guard, &e), None),
        };
    guard.record.status = resp.status().as_u16();
    if let Some((client_side, upstream_side, recheck)) = upgrade {
        // A protocol switch: the record is written when the upgraded connection closes.
        inputs.tasks.spawn(super::tunnel::splice_upgrades(
            inputs.clone(),
            client_side,
            upstream_side,
            *guard,
            recheck,
            super::slots::Listener::Outbound,
        ));
        return Ok(resp);
    }
    let counter = guard.bytes.clone();
    Ok(resp.map(|b| body::boxed(Counted::new(b, counter, true, Some(guard)))))
}

/// Records a refusal or failure in the log record (and a denial in the metrics), and returns
/// the response the client gets.
pub fn note_error(guard: &mut LogGuard, e: &ProxyError) -> Response<Body> {
    let resp = e.response();
    guard.record.status = resp.status().as_u16();
    record_error(guard, e);
    resp
}

/// Records a refusal or failure where no response is sent (TLS and TCP are closed).
pub fn record_error(guard: &mut LogGuard, e: &ProxyError) {
    if e.is_denial() {
        guard.record.decision = "deny";
        guard.record.reason = Some(e.to_string());
        let code = match e {
            ProxyError::Denied(d) => d.code(),
            ProxyError::Loop(_) => "loop",
            ProxyError::BadRequest(_) => "malformed_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::NotImplemented(_) => "not_implemented",
            _ => "unauthorized",
        };
        crate::metrics::record_denial(code, "deny");
    } else {
        guard.fail(e.to_string());
    }
}

/// Both halves of a protocol switch (WebSocket and the like), to be joined, and how to
/// check the joined connection again after a reload.
type Upgrade = (
    super::upgrade::OnUpgrade,
    crate::net::upstream::Upgraded,
    super::tunnel::StillAllowed,
);

async fn forward(
    inputs: &Inputs,
    state: &State,
    conn: ConnInfo,
    mut req: Request<Incoming>,
    guard: &mut LogGuard,
) -> Result<(Response<Body>, Option<Upgrade>), ProxyError> {
    let (host, port, authority, port_named) = target(&req, conn)?;
    if guard.record.authority.as_deref() != Some(authority.as_str()) {
        guard.record.authority = Some(authority.clone());
    }
    let admitted = admit(
        inputs,
        state,
        &host,
        port,
        conn.original_dst,
        conn.captured(),
    )
    .await?;
    note_admission(guard, &admitted);
    if let Some(answer) = super::http::max_forwards(&mut req) {
        guard.record.upstream = None;
        return Ok((answer, None));
    }

    let client_version = req.version();
    let upgrading = wants_upgrade(req.headers_mut());
    let client_upgrade = upgrading.then(|| super::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    // A connection addressed to the destination (redirected, or inside a CONNECT) keeps its
    // HTTP/2 upstream; an explicit proxy request goes on in HTTP/1.1.
    let version = upstream_version(client_version, conn.original_dst.is_some());
    strip_request_hop_by_hop(&mut parts.headers, upgrading, version)?;
    add_via(&mut parts.headers, parts.version);
    // Host is the checked authority, and only it (RFC 9112 §3.2.2); usually it already is.
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host_is_authority = matches!(
        (hosts.next(), hosts.next()),
        (Some(h), None) if h.as_bytes() == authority.as_bytes()
    );
    if !host_is_authority {
        let host_value = HeaderValue::from_str(&authority)
            .map_err(|_| ProxyError::BadRequest("authority is not a valid Host".into()))?;
        parts.headers.insert(header::HOST, host_value);
    }
    // The cache keys on the URL as the client named it, so an origin-form request (from a
    // transparent client) gets its absolute form; `Pooled` dials the checked address.
    if parts.uri.authority().is_none() {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(format!("http://{authority}{path}"))
            .map_err(|_| ProxyError::BadRequest("request target is not a valid URI".into()))?;
    }
    parts.version = version;
    let counter = guard.bytes.clone();
    let upstream_req = Request::from_parts(
        parts,
        body::request_body(
            incoming,
            counter,
            client_version,
            state.cfg.clients.idle_timeout,
        ),
    );
    let pooled = Pooled {
        upstreams: state.upstreams.clone(),
        addr: admitted.addr,
        timeout: state.cfg.response_timeout,
        mesh: state
            .mesh_client
            .as_ref()
            .is_some_and(|m| m.covers(admitted.addr)),
    };
    let use_cache = state.cfg.cache.enabled && !upgrading;
    let mut upstream_req = upstream_req;
    if !admitted.alternates.is_empty() {
        let others = admitted.alternates.iter().map(|(a, _)| *a).collect();
        upstream_req
            .extensions_mut()
            .insert(crate::net::upstream::Alternates(others));
    }
    // What comes from this address is cached under the request's name only when both the
    // name and its port are the ones dialled; else in the address's own key space, so that
    // a client cannot plant a response for a name (or port) it did not reach.
    if !admitted.name_verified || !port_named {
        upstream_req
            .extensions_mut()
            .insert(crate::cache::CacheScope(format!("dest={}", admitted.addr)));
    }
    let mut resp = if use_cache {
        // Boxed: the cache's future is large, and inline it would enlarge the future of
        // every request, cached or not.
        let (result, outcome) = Box::pin(state.cache.handle(upstream_req, Arc::new(pooled))).await;
        guard.record.cache = Some(outcome.as_str());
        result.map_err(|e| ProxyError::Gateway {
            status: e.status,
            reason: e.reason,
        })?
    } else {
        pooled.send_to_origin(upstream_req).await?
    };
    // The name's first address could not be reached and another answered: that one is
    // what the log names, with the rule that allows it, and what an upgrade is checked on.
    let mut dialled = admitted.addr;
    if let Some(&crate::net::upstream::Dialled(other)) = resp.extensions().get() {
        dialled = other;
        guard.record.upstream = Some(other);
        if let Some((_, rule)) = admitted.alternates.iter().find(|(a, _)| *a == other) {
            guard.record.rule = rule.clone();
        }
    }
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = match (client_upgrade, switching) {
        (Some(client_side), true) => resp
            .extensions_mut()
            .remove::<crate::net::upstream::Upgraded>()
            .map(|up| {
                let recheck = super::tunnel::egress_recheck(host, port, dialled, conn.captured());
                (client_side, up, recheck)
            }),
        _ => None,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, switching);
    add_via(&mut parts.headers, parts.version);
    // The client hears the protocol it spoke, whatever the upstream answered in.
    parts.version = client_version;
    Ok((Response::from_parts(parts, body), upgrade))
}

/// The upstream phase: one request on a pooled connection to the checked address, with
/// the response-head timeout. Also what the cache calls on a miss or revalidation.
#[derive(Clone)]
pub(super) struct Pooled {
    pub(super) upstreams: Arc<crate::net::upstream::Upstreams>,
    pub(super) addr: std::net::SocketAddr,
    pub(super) timeout: std::time::Duration,
    /// Whether `addr` is a mesh peer reached over mTLS (for clearer errors).
    pub(super) mesh: bool,
}

impl Pooled {
    /// Sends to `addr` (the request target is the URI's path and query; Host stays).
    pub(super) async fn send_to_origin(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        // The response timeout runs from the end of the request body (see `send`).
        match self.upstreams.send(self.addr, req, self.timeout).await {
            Ok(resp) => Ok(resp),
            Err(SendError::Connect(e)) => Err(ProxyError::Connect(e)),
            Err(SendError::Timeout) => Err(ProxyError::ResponseTimeout(self.addr.to_string())),
            Err(SendError::ClientIdle(detail)) => Err(ProxyError::ClientTimeout(detail)),
            // With TLS 1.3 the client's handshake completes before the server checks
            // the client certificate, so a refusal shows up as a closed connection.
            Err(SendError::Failed(detail)) if self.mesh => Err(ProxyError::Upstream(
                self.addr.to_string(),
                format!("{detail} (the mesh peer closed the connection: it may have refused this workload's certificate or identity)"),
            )),
            Err(SendError::Failed(detail)) => {
                Err(ProxyError::Upstream(self.addr.to_string(), detail))
            }
        }
    }
}

impl crate::cache::Upstream for Pooled {
    fn send(
        &self,
        req: Request<Body>,
    ) -> futures_util::future::BoxFuture<'static, Result<Response<Body>, crate::cache::UpstreamError>>
    {
        let me = self.clone();
        Box::pin(async move {
            me.send_to_origin(req)
                .await
                .map_err(|e| crate::cache::UpstreamError {
                    status: e.status(),
                    reason: e.to_string(),
                })
        })
    }
}

/// Fills in the log fields that admission decided.
pub fn note_admission(guard: &mut LogGuard, admitted: &Admitted) {
    guard.record.upstream = Some(admitted.addr);
    guard.record.decision = admitted.decision;
    guard.record.rule = admitted.rule.clone();
    guard.record.reason = admitted.reason.clone();
}

/// The request's target host, port and authority string. Explicit clients must send
/// absolute-form `http://` URIs; transparent ones are routed by their Host header.
/// The last value says whether the authority names the port that is dialled: a transparent
/// request whose Host names another port is not cached under that name (see `forward`).
fn target(
    req: &Request<Incoming>,
    conn: ConnInfo,
) -> Result<(Host, u16, String, bool), ProxyError> {
    let uri = req.uri();
    let (authority, default_port) = match (conn.original_dst, uri.authority()) {
        (None, Some(a)) => {
            if uri.scheme_str() != Some("http") {
                return Err(ProxyError::BadRequest(
                    "only http:// URLs can be proxied in absolute form; use CONNECT for https"
                        .into(),
                ));
            }
            (a.as_str().to_owned(), 80)
        }
        (None, None) => {
            // Origin-form on a connection that was not redirected: a client that treats the
            // proxy as the server (a base URL set to the proxy, say). What it needs to hear
            // is how to talk to a proxy; squid answers these with 400 too.
            return Err(ProxyError::BadRequest(
                "this is a proxy: send the absolute URL (GET http://host/path), or CONNECT host:443 for https"
                    .into(),
            ));
        }
        (Some(od), Some(a)) => (a.as_str().to_owned(), od.port()),
        (Some(od), None) => match req.headers().get(header::HOST) {
            Some(h) => (
                h.to_str()
                    .map_err(|_| {
                        ProxyError::Denied(crate::policy::egress::Deny::InvalidHost(
                            crate::policy::host::HostError::BadChar,
                        ))
                    })?
                    .to_owned(),
                od.port(),
            ),
            None => (od.to_string(), od.port()),
        },
    };
    let (host, named) = parse_authority(&authority, default_port)?;
    // A redirected connection goes to its original destination's port whatever the Host
    // says, so that port is the one the policy checks: `Host: a.test:8080` on a connection
    // to port 22 must not be let through by a rule for port 8080.
    let port = conn.original_dst.map_or(named, |od| od.port());
    Ok((host, port, authority, named == port))
}

/// Parses `host[:port]` strictly.
pub fn parse_authority(authority: &str, default_port: u16) -> Result<(Host, u16), ProxyError> {
    use crate::policy::host::HostError;
    // `@` is no host character, so userinfo always fails the parse below; only then is it
    // told apart from other bad characters, so valid authorities are not scanned for it.
    let invalid = |e| {
        let e = match e {
            HostError::BadChar if authority.contains('@') => HostError::Userinfo,
            e => e,
        };
        ProxyError::Denied(crate::policy::egress::Deny::InvalidHost(e))
    };
    let (h, p) = split_authority(authority).ok_or_else(|| invalid(HostError::BadChar))?;
    let host = parse_host(h).map_err(invalid)?;
    let port = match p {
        None => default_port,
        Some(p) => parse_port(p)
            .ok_or_else(|| ProxyError::BadRequest(format!("invalid port in {authority:?}")))?,
    };
    Ok((host, port))
}
