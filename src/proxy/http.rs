//! HTTP message rules for a proxy (RFC 9110 §7.6): hop-by-hop headers, `Via`, and the
//! request target.

use std::future::Future;
use std::time::Duration;

use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::aside::First;

/// Limits on a client connection, from the `clients` config section (its defaults are
/// there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// How long a connection may have no request in flight (nor a response being sent).
    /// It is also the slowloris limit: a request head still arriving after this long
    /// since the last response ended (or since the connection opened) is cut off.
    pub idle_timeout: Duration,
    /// The largest request head a client may send (request line and headers); a larger
    /// head is answered 431. hyper's default (~400 KB) let every connection make the proxy
    /// hold that much. hyper bounds its write queue with the same number, and below 128 KiB
    /// (the default) responses of 1 MiB lost 9 % of their throughput (fewer bytes per
    /// `writev`), so not Envoy's 60 KiB.
    pub max_head: usize,
    /// How long a tunnel may pass no byte either way: a peer that vanished without a
    /// FIN or RST (a host powered off, a NAT entry dropped) would otherwise hold its
    /// tunnel, and the descriptors at both ends, for ever.
    pub tunnel_idle_timeout: Duration,
    /// Client connections each listener holds at once (0: no limit); see `slots`.
    pub max_connections: usize,
}

/// The HTTP/1 + HTTP/2 server settings for client connections, both directions.
fn server_builder(limits: ClientLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_head);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head).unwrap_or(u32::MAX));
    builder
}

/// The service a client connection is served with, as hyper's servers take it (the futures
/// `Unpin`, so that the keep-alive loop can stop hyper between requests and take it back).
/// Implemented for every such service: it names the bounds once for the functions that
/// pass one along.
pub trait ClientService<B>:
    hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<B>,
        Error: Into<crate::body::BoxError>,
        Future: Send + Unpin + 'static,
    > + Send
    + Unpin
    + 'static
{
}

impl<S, B> ClientService<B> for S where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error: Into<crate::body::BoxError>,
            Future: Send + Unpin + 'static,
        > + Send
        + Unpin
        + 'static
{
}

/// The body of a response to a client, as hyper's servers take it.
pub trait ResponseBody:
    http_body::Body<Data: Send, Error: Into<crate::body::BoxError>> + Send + 'static
{
}

impl<B> ResponseBody for B where
    B: http_body::Body<Data: Send, Error: Into<crate::body::BoxError>> + Send + 'static
{
}

/// Serves one client connection (keep-alive, upgrades) until it closes, draining it
/// gracefully on shutdown. `http1` says detection already saw HTTP/1: the connection is then
/// served by hyper's HTTP/1 server alone, whose state is a fraction of the size of the
/// auto-detecting one's, and parked while it is quiet (see `keepalive`). Not an `async fn`,
/// which would keep its arguments in its state beside the server's (see `keepalive::serve`).
pub fn serve_connection<I, S, B>(
    io: I,
    svc: S,
    http1: bool,
    limits: ClientLimits,
    shutdown: CancellationToken,
) -> impl Future<Output = Result<(), crate::body::BoxError>> + Send
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService<B>,
    B: ResponseBody,
{
    if http1 {
        return Either::Left(super::keepalive::serve(io, svc, limits, shutdown));
    }
    // Boxed: hyper's auto-detecting server is several KB, which every HTTP/1 connection's
    // task would otherwise carry (parked ones too) for the few that speak HTTP/2.
    Either::Right(Box::pin(serve_auto(io, svc, limits, shutdown)))
}

/// [`serve_connection`] for HTTP/2, or a protocol not yet known: hyper's auto server.
async fn serve_auto<I, S, B>(
    io: I,
    svc: S,
    limits: ClientLimits,
    shutdown: CancellationToken,
) -> Result<(), crate::body::BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService<B>,
    B: ResponseBody,
{
    // HTTP/2 answers to many streams are sent in one write (see `corked`).
    let (io, cork) = crate::net::corked::new(io);
    let io = TokioIo::new(io);
    // Idle connections are timed out with this tracker, as in `keepalive`, rather than with
    // hyper's timers: its HTTP/2 server has none, and its HTTP/1 header-read timer was a
    // fresh boxed `Sleep` per request (3 % of the inbound path's CPU).
    let idle = super::idle::Idle::new();
    let builder = server_builder(limits);
    let svc =
        super::idle::Tracked::new(svc, idle.clone()).with_keep_alive_hint(limits.idle_timeout);
    let connection = cork.drive(builder.serve_connection_with_upgrades(io, svc));
    tokio::pin!(connection);
    let drain = shutdown.cancelled();
    tokio::pin!(drain);
    let expired = idle.expired(limits.idle_timeout);
    tokio::pin!(expired);
    // The drain and the idle timer wait aside, polled only when they woke, not on each of
    // the connection's wakeups (see `aside`).
    let mut aside = super::aside::Aside::new();
    let main = |cx: &mut std::task::Context<'_>| connection.as_mut().poll(cx);
    match aside
        .first(main, Some(drain.as_mut()), expired.as_mut())
        .await
    {
        First::Main(res) => res,
        First::Drain => {
            idle.stop_keep_alive_hint();
            connection.as_mut().conn().graceful_shutdown();
            connection.await
        }
        First::Timer => {
            tracing::debug!("closing an idle client connection");
            connection.as_mut().conn().graceful_shutdown();
            // A graceful close waits on the client: to finish its handshake (a client that
            // sent the preface and no SETTINGS), or to answer the GOAWAY's PING. One that
            // never does gets as long again, then the connection is dropped, which closes it.
            tokio::time::timeout(limits.idle_timeout, connection)
                .await
                .unwrap_or(Ok(()))
        }
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus the
/// de-facto ones clients still send to proxies.
/// (`Trailer` is not one: it names the trailer fields end to end, and hyper sends only the
/// trailers it names.)
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers: the fixed set and every header named in `Connection`.
/// With `keep_upgrade`, `Upgrade` and `Connection: upgrade` stay, for a protocol switch.
/// `Transfer-Encoding` goes too: hyper re-frames the body on the next hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Nothing is refused when codings are not checked.
    let _ = strip(headers, keep_upgrade, false);
}

/// `Transfer-Encoding`'s bit in the set [`strip`] finds.
const TRANSFER_ENCODING_BIT: u8 = 1 << 4;

/// [`strip_hop_by_hop`]; with `check_coding`, a `Transfer-Encoding` naming a coding other
/// than chunked is refused first (the coding is returned, nothing is removed). Checked
/// here because this pass already knows whether the header is there: a lookup of its own
/// cost every request about 80 instructions.
fn strip(headers: &mut HeaderMap, keep_upgrade: bool, check_coding: bool) -> Result<(), String> {
    // One pass over the fields finds which of the fixed set are there: a message usually
    // has none or one (`Connection: keep-alive`), and a hashed removal for each of the
    // eight cost more instructions than the rest of the request's header handling.
    // The names in Connection are copied out in the same pass, before the map changes:
    // onto the stack when they fit, else the heap. Names of the fixed set are skipped:
    // the bits cover them (`keep-alive` is the usual token).
    const ROOM: usize = 256;
    let mut present = 0u8;
    let mut stack = [0u8; ROOM];
    let mut spans = [(0u16, 0u16); 16];
    let (mut used, mut count) = (0usize, 0usize);
    let mut spilled: Vec<&[u8]> = Vec::new();
    for (name, value) in headers.iter() {
        let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) else {
            continue;
        };
        present |= 1 << i;
        if name != header::CONNECTION {
            continue;
        }
        let named = crate::net::upstream::value_tokens(value.as_bytes()).filter(|t| {
            !HOP_BY_HOP
                .iter()
                .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(t))
        });
        for t in named {
            if spilled.is_empty() && count < spans.len() && used + t.len() <= ROOM {
                stack[used..used + t.len()].copy_from_slice(t);
                // Both fit in u16: ROOM is 256.
                spans[count] = (used as u16, t.len() as u16);
                used += t.len();
                count += 1;
            } else {
                spilled.push(t);
            }
        }
    }
    if present == 0 {
        return Ok(());
    }
    if check_coding && present & TRANSFER_ENCODING_BIT != 0 {
        if let Some(coding) = crate::net::upstream::foreign_coding(headers) {
            return Err(coding);
        }
    }
    // Borrowed from the map, the spilled names are owned before it changes (rare: more
    // than 16 names, or 256 bytes of them).
    let spilled: Vec<String> = spilled
        .into_iter()
        .filter_map(|t| std::str::from_utf8(t).ok().map(str::to_owned))
        .collect();
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for &(at, len) in &spans[..count] {
        let (at, len) = (usize::from(at), usize::from(len));
        // Names are removed by string: parsed on the stack, no HeaderName built.
        if let Ok(name) = std::str::from_utf8(&stack[at..at + len]) {
            headers.remove(name);
        }
    }
    for name in &spilled {
        headers.remove(name.as_str());
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if let Some(up) = upgrade {
        headers.insert(header::UPGRADE, up);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Ok(())
}

/// The protocol of a request's hop to its upstream: HTTP/2 when the client spoke HTTP/2
/// to the destination itself (`to_destination`: a redirected connection, a `CONNECT`
/// tunnel, the inbound listener), as Linkerd and Istio's inbound side do; else HTTP/1.1.
/// Such a client chose HTTP/2 for that server, which may speak nothing else (gRPC), and
/// gRPC's trailers would not survive an HTTP/1.1 hop. An explicit-proxy client chose
/// HTTP/2 for the proxy, not for the origin, which may not speak it.
pub fn upstream_version(client: http::Version, to_destination: bool) -> http::Version {
    if client == http::Version::HTTP_2 && to_destination {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    }
}

/// [`strip_hop_by_hop`] for a request going upstream in `version`: over HTTP/2,
/// `TE: trailers` stays (the one `TE` HTTP/2 allows, RFC 9113 §8.2.2), because gRPC
/// servers take it as the sign that every hop between passes trailers on.
///
/// A request body in a transfer coding other than chunked is refused with 501 (RFC 9112
/// §6.1), as Squid and Envoy do: see [`crate::net::upstream::foreign_coding`].
pub fn strip_request_hop_by_hop(
    headers: &mut HeaderMap,
    keep_upgrade: bool,
    version: http::Version,
) -> Result<(), super::error::ProxyError> {
    let te_trailers = version == http::Version::HTTP_2
        && crate::net::upstream::has_token(headers, header::TE, "trailers");
    strip(headers, keep_upgrade, true).map_err(|coding| {
        super::error::ProxyError::NotImplemented(format!(
            "request transfer coding {coding:?} is not supported: only chunked"
        ))
    })?;
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(())
}

/// `Max-Forwards` on a TRACE or OPTIONS request (RFC 9110 §7.6.2, a must for every
/// intermediary): at 0 the proxy answers as the final recipient and forwards nothing;
/// above it, the request goes on with one less. Other methods, and requests without the
/// header, are left alone. Returns the proxy's own answer, when it gives one.
pub fn max_forwards<B>(req: &mut http::Request<B>) -> Option<http::Response<crate::body::Body>> {
    use http::Method;
    if req.method() != Method::TRACE && req.method() != Method::OPTIONS {
        return None;
    }
    // A value that is not a number is no limit: the request goes on as it came.
    let left: u32 = req
        .headers()
        .get(header::MAX_FORWARDS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if left > 0 {
        req.headers_mut()
            .insert(header::MAX_FORWARDS, HeaderValue::from(left - 1));
        return None;
    }
    let resp = if req.method() == Method::TRACE {
        // The request as received, which is what TRACE is for, minus the fields that carry
        // credentials (§9.3.8): an echo must not hand them to a script that can read it.
        let mut echo = format!("TRACE {} {:?}\r\n", req.uri(), req.version()).into_bytes();
        for (name, value) in req.headers() {
            if matches!(
                name.as_str(),
                "authorization" | "proxy-authorization" | "cookie"
            ) {
                continue;
            }
            echo.extend_from_slice(name.as_str().as_bytes());
            echo.extend_from_slice(b": ");
            echo.extend_from_slice(value.as_bytes());
            echo.extend_from_slice(b"\r\n");
        }
        echo.extend_from_slice(b"\r\n");
        let mut resp = http::Response::new(crate::body::full(echo));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("message/http"),
        );
        resp
    } else {
        let mut resp = http::Response::new(crate::body::empty());
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static(
                "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
            ),
        );
        resp
    };
    Some(resp)
}

/// Whether a request asks to switch protocols (WebSocket and the like). An offer of
/// cleartext HTTP/2 is taken out first (see [`drop_h2c`]), so a request that offers only
/// that goes on as an ordinary one.
pub fn wants_upgrade(headers: &mut HeaderMap) -> bool {
    if !headers.contains_key(header::UPGRADE) {
        return false;
    }
    drop_h2c(headers);
    headers.contains_key(header::UPGRADE)
        && crate::net::upstream::has_token(headers, header::CONNECTION, "upgrade")
}

/// Takes `h2c` out of a request's `Upgrade` (other protocols offered beside it stay) and
/// drops its `HTTP2-Settings`. Passed on, the offer would let an app that accepts it
/// switch the connection to HTTP/2, whose requests, for any path, would then go through
/// the joined connection unseen: past the inbound authorization rules, which checked the
/// first request only, and past the access log (h2c smuggling). RFC 9113 §3.1 deprecates
/// the upgrade; Envoy removes it the same way.
fn drop_h2c(headers: &mut HeaderMap) {
    use crate::net::upstream::tokens;
    if !tokens(headers, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("h2c")) {
        return;
    }
    let rest = tokens(headers, header::UPGRADE)
        .filter(|t| !t.eq_ignore_ascii_case("h2c"))
        .collect::<Vec<_>>()
        .join(", ");
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    // Tokens are visible ASCII, so the rest is a valid value.
    match HeaderValue::from_str(&rest) {
        Ok(v) if !rest.is_empty() => {
            headers.insert(header::UPGRADE, v);
        }
        _ => {}
    }
}

/// Appends this hop to `Via`, after every earlier one: several `Via` lines are one list
/// (RFC 9110 §5.3), and all are kept, in order, in the one line sent on.
pub fn add_via(headers: &mut HeaderMap, version: http::Version) {
    // Constants: `from_static` at run time checks the bytes of the value each time (about
    // 120 instructions per call, two calls per request).
    const VIA_10: HeaderValue = HeaderValue::from_static("1.0 outrider");
    const VIA_11: HeaderValue = HeaderValue::from_static("1.1 outrider");
    const VIA_2: HeaderValue = HeaderValue::from_static("2 outrider");
    let (proto, hop) = match version {
        http::Version::HTTP_10 => ("1.0", VIA_10),
        http::Version::HTTP_2 => ("2", VIA_2),
        _ => ("1.1", VIA_11),
    };
    match headers.entry(header::VIA) {
        // The usual case, the first proxy on the path: the constant, no formatting.
        header::Entry::Vacant(e) => {
            e.insert(hop);
        }
        header::Entry::Occupied(e) => append_to_entry(e, &[proto.as_bytes(), b" outrider"]),
    }
}

/// Appends `parts` as one more member of the list header `name`, after every earlier one:
/// several lines are one list (RFC 9110 §5.3), sent on as one line. One lookup for both
/// cases.
pub fn append_to_list(headers: &mut HeaderMap, name: HeaderName, parts: &[&[u8]]) {
    match headers.entry(name) {
        header::Entry::Vacant(e) => {
            if let Some(v) = append_value(&[], parts) {
                e.insert(v);
            }
        }
        header::Entry::Occupied(e) => append_to_entry(e, parts),
    }
}

/// [`append_to_list`] where the header is there.
fn append_to_entry(mut entry: header::OccupiedEntry<'_, HeaderValue>, parts: &[&[u8]]) {
    let value = {
        let lines: smallvec::SmallVec<[&HeaderValue; 2]> = entry.iter().collect();
        append_value(&lines, parts)
    };
    if let Some(v) = value {
        entry.insert(v);
    }
}

/// A header value `prev, <parts>`, where `prev` is every earlier line of the header in
/// order (or just the parts: earlier lines are kept only when all are visible ASCII), put
/// together on the stack when it fits, so that the value's own bytes are the only
/// allocation. (Parts, not `format_args!`: the formatting machinery cost more than the rest
/// of the forwarding headers.)
pub fn append_value(prev: &[&HeaderValue], parts: &[&[u8]]) -> Option<HeaderValue> {
    let visible = prev.iter().all(|v| v.to_str().is_ok());
    let prev = if visible { prev } else { &[] };
    let pieces = || {
        prev.iter()
            .flat_map(|p| [p.as_bytes(), b", "])
            .chain(parts.iter().copied())
    };
    let len: usize = pieces().map(<[u8]>::len).sum();
    let put = |out: &mut [u8]| {
        let mut at = 0;
        for p in pieces() {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
    };
    let mut stack = [0u8; 192];
    if len <= stack.len() {
        put(&mut stack[..len]);
        return HeaderValue::from_bytes(&stack[..len]).ok();
    }
    let mut heap = vec![0u8; len];
    put(&mut heap);
    HeaderValue::from_bytes(&heap).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_transfer_encoding_bit_is_its_place_in_the_set() {
        let at = HOP_BY_HOP
            .iter()
            .position(|h| h == header::TRANSFER_ENCODING)
            .unwrap();
        assert_eq!(TRANSFER_ENCODING_BIT, 1 << at);
    }

    #[test]
    fn strips_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn each_fixed_hop_by_hop_header_goes_on_its_own_and_lookalikes_stay() {
        // Each fixed name goes without `Connection` naming it; names as long as the
        // hop-by-hop ones (10, 7, 2, 16 to 19 bytes) stay.
        let keep = [
            "user-agent",
            "referer",
            "x2",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-prefix",
            "access-control-xyzw",
        ];
        for name in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("1"));
            for k in keep {
                h.insert(k, HeaderValue::from_static("1"));
            }
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(&name), "{name} was kept");
            assert_eq!(h.len(), keep.len(), "{name}: left {h:?}");
        }
    }

    #[test]
    fn via_names_this_hop_after_earlier_ones() {
        let mut h = HeaderMap::new();
        add_via(&mut h, http::Version::HTTP_11);
        assert_eq!(h[header::VIA], "1.1 outrider");
        h.insert(header::VIA, HeaderValue::from_static("1.0 edge"));
        add_via(&mut h, http::Version::HTTP_2);
        assert_eq!(h[header::VIA], "1.0 edge, 2 outrider");
        // Two lines are one list: both kept, in order, in one line.
        h.append(header::VIA, HeaderValue::from_static("1.1 mid"));
        add_via(&mut h, http::Version::HTTP_10);
        let lines: Vec<_> = h.get_all(header::VIA).iter().collect();
        assert_eq!(lines, ["1.0 edge, 2 outrider, 1.1 mid, 1.0 outrider"]);
        // An earlier hop that is not visible ASCII is not passed on.
        h.insert(
            header::VIA,
            HeaderValue::from_bytes(b"1.1 \xffedge").unwrap(),
        );
        add_via(&mut h, http::Version::HTTP_11);
        assert_eq!(h[header::VIA], "1.1 outrider");
    }

    #[test]
    fn strips_every_named_header_when_there_are_many() {
        // More names than fit on the stack: the rest must still go.
        let mut h = HeaderMap::new();
        let names: Vec<String> = (0..40)
            .map(|i| format!("x-hop-{i:02}-{}", "n".repeat(i)))
            .collect();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_str(&names.join(", ")).unwrap(),
        );
        for n in &names {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "left: {h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upgrade_survives_when_asked_and_nothing_else_hop_by_hop_does() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, Keep-Alive, X-Trace"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h.len(), 3, "left: {h:?}");
        // Without any hop-by-hop header the map is left as it is.
        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a"));
        plain.insert("x-keep", HeaderValue::from_static("1"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain, before);
    }

    #[test]
    fn an_h2c_offer_is_taken_out_of_upgrade() {
        let request = |upgrade: &[&'static str]| {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static("Upgrade, HTTP2-Settings"),
            );
            for u in upgrade {
                h.append(header::UPGRADE, HeaderValue::from_static(u));
            }
            h.insert(
                "http2-settings",
                HeaderValue::from_static("AAMAAABkAAQAAP__"),
            );
            h
        };
        // Only h2c: no upgrade at all, and the settings gone.
        for only in [&["h2c"][..], &["H2C"], &[" h2c ,"]] {
            let mut h = request(only);
            assert!(!wants_upgrade(&mut h), "{only:?}");
            assert!(!h.contains_key(header::UPGRADE), "{only:?}: {h:?}");
            assert!(!h.contains_key("http2-settings"), "{only:?}: {h:?}");
        }
        // Beside other protocols, in one field or several: they stay, in order.
        for mixed in [&["h2c, websocket, foo/2"][..], &["h2c", "websocket, foo/2"]] {
            let mut h = request(mixed);
            assert!(wants_upgrade(&mut h), "{mixed:?}");
            assert_eq!(h[header::UPGRADE], "websocket, foo/2", "{mixed:?}");
            assert!(!h.contains_key("http2-settings"), "{mixed:?}");
        }
        // Anything else is left exactly as it came.
        let mut h = request(&["websocket"]);
        let before = h.clone();
        assert!(wants_upgrade(&mut h));
        assert_eq!(h, before);
        // No `Connection: upgrade`, no upgrade.
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_upgrade(&mut h));
    }

    #[test]
    fn appended_values_join_with_a_comma_and_long_ones_go_to_the_heap() {
        let prev = HeaderValue::from_static("a");
        assert_eq!(append_value(&[&prev], &[b"b", b"c"]).unwrap(), "a, bc");
        assert_eq!(append_value(&[], &[b"b"]).unwrap(), "b");
        // An earlier value that is not visible ASCII is not carried on.
        let odd = HeaderValue::from_bytes(b"\xff").unwrap();
        assert_eq!(append_value(&[&odd], &[b"x"]).unwrap(), "x");
        // Several earlier lines are one list, kept in order, or dropped all together.
        let second = HeaderValue::from_static("z");
        assert_eq!(append_value(&[&prev, &second], &[b"x"]).unwrap(), "a, z, x");
        assert_eq!(append_value(&[&prev, &odd], &[b"x"]).unwrap(), "x");
        let long = "v".repeat(500);
        let prev = HeaderValue::from_str(&long).unwrap();
        let v = append_value(&[&prev], &[b"end"]).unwrap();
        assert_eq!(v.to_str().unwrap(), format!("{long}, end"));
        // Bytes a header value may not hold are refused, not sent.
        assert!(append_value(&[], &[b"a\r\nb"]).is_none());
    }
}
