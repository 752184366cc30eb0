//! Transparent capture without root: the outbound listener is given each connection's
//! "original destination" through the `Server::with_orig_dst` seam, exactly as the kernel's
//! SO_ORIGINAL_DST would report it after an iptables REDIRECT. Covers protocol detection
//! (HTTP/1, TLS with SNI, opaque TCP, server-first ports, the detection timeout) and the
//! forged-Host/SNI check. The namespace tests (tests/netns_*.rs) repeat this with real iptables.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outrider::config::{validate, Config};
use outrider::server::{Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Proxy {
    handle: ServerHandle,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts a proxy whose every outbound connection claims `original_dst`.
    async fn start(egress_and_more: &str, original_dst: SocketAddr) -> Self {
        Self::start_with_detect(egress_and_more, original_dst, "300ms").await
    }

    async fn start_with_detect(
        egress_and_more: &str,
        original_dst: SocketAddr,
        detect: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let yaml = format!(
            "admin: {{ listen: 127.0.0.1:0 }}\noutbound:\n  listen: 127.0.0.1:0\n  detect: {{ timeout: {detect}, server_first_ports: [2525] }}\n{egress_and_more}\naccess_log: {{ output: {} }}\n",
            log.display()
        );
        let compiled = validate(Config::from_yaml(&yaml).unwrap()).unwrap();
        // Written out too, so that `reload_with` can change it as a user would.
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let server = Server::bind(compiled, Some(path))
            .await
            .unwrap()
            .with_orig_dst(Arc::new(move |_s: &TcpStream| Some(original_dst)));
        let handle = server.handle();
        tokio::spawn(server.run());
        Proxy {
            handle,
            log,
            _dir: dir,
        }
    }

    /// Rewrites the egress part of the config file and reloads it, as SIGHUP does.
    fn reload_with(&self, egress_and_more: &str) {
        let path = self.log.with_file_name("config.yaml");
        let old = std::fs::read_to_string(&path).unwrap();
        let start = old.find("  egress:").unwrap();
        let end = old.find("\naccess_log:").unwrap();
        let new = format!("{}{egress_and_more}{}", &old[..start], &old[end..]);
        std::fs::write(&path, new).unwrap();
        self.handle.reload().unwrap();
    }

    async fn log_lines(&self) -> Vec<serde_json::Value> {
        for _ in 0..50 {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if !text.is_empty() {
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Vec::new()
    }
}

/// A tiny HTTP/1 origin that answers every request with its Host header.
async fn http_origin() -> SocketAddr {
    origin(|req| {
        let host = req
            .lines()
            .find_map(|l| {
                l.strip_prefix("host: ")
                    .or_else(|| l.strip_prefix("Host: "))
            })
            .unwrap_or("");
        ("", format!("origin saw host {host}"))
    })
    .await
}

/// An origin that answers each request (read whole in one go) with `answer`'s extra head
/// lines and body, and closes.
async fn origin(answer: fn(&str) -> (&'static str, String)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let (extra, body) = answer(&String::from_utf8_lossy(&buf[..n]));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// An echo server; with `banner`, it speaks first (like SMTP or MySQL).
async fn echo_server(banner: Option<&'static str>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                if let Some(b) = banner {
                    let _ = s.write_all(b.as_bytes()).await;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn raw_request(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn transparent_http_allowed_by_cidr_reaches_the_original_destination() {
    let origin = http_origin().await;
    let p = Proxy::start(
        "  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n",
        origin,
    )
    .await;
    let resp = raw_request(
        p.handle.outbound_addr,
        "GET /x HTTP/1.1\r\nHost: anything.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("origin saw host anything.test"), "{resp}");
    let lines = p.log_lines().await;
    let l = &lines[0];
    assert_eq!(l["mode"], "transparent");
    assert_eq!(l["protocol"], "http1");
    assert_eq!(l["original_dst"], origin.to_string());
    assert_eq!(l["upstream"], origin.to_string());
    assert_eq!(l["decision"], "allow");
}

#[tokio::test]
async fn transparent_http_with_forged_host_is_refused() {
    let origin = http_origin().await;
    // good.test is allowed by name and resolves to 127.0.0.2, but the client's connection was
    // really going to 127.0.0.1: an allowed name sent to another server's address.
    let p = Proxy::start(
        "  egress:\n    allow:\n      - host: good.test\n      - cidr: 127.0.0.2/32\ndns:\n  hosts:\n    good.test: 127.0.0.2\n",
        origin,
    )
    .await;
    let resp = raw_request(
        p.handle.outbound_addr,
        "GET / HTTP/1.1\r\nHost: good.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.to_lowercase()
            .contains("x-outrider-error: good.test does not resolve to the original destination"),
        "{resp}"
    );
    let lines = p.log_lines().await;
    assert_eq!(lines[0]["decision"], "deny");
}

/// The port that counts is the one the connection was going to: a Host header naming an
/// allowed port cannot open a port no rule allows.
#[tokio::test]
async fn transparent_http_is_checked_on_the_original_port_not_the_hosts() {
    let origin = http_origin().await;
    let allowed_port = if origin.port() == 8080 { 8081 } else { 8080 };
    let p = Proxy::start(
        &format!(
            "  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n        ports: [{allowed_port}]\n      - host: good.test\n        ports: [{allowed_port}]\ndns:\n  hosts:\n    good.test: 127.0.0.1\n"
        ),
        origin,
    )
    .await;
    for host in [
        format!("127.0.0.1:{allowed_port}"),
        format!("good.test:{allowed_port}"),
    ] {
        let resp = raw_request(
            p.handle.outbound_addr,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            resp.starts_with("HTTP/1.1 403"),
            "Host {host} opened port {}: {resp}",
            origin.port()
        );
        assert!(resp.contains(&origin.port().to_string()), "{resp}");
    }
}

const CACHEABLE: &str = "cache-control: max-age=60\r\n";

/// A transparent request whose Host names another port than the one it reached must not
/// leave its response in the cache under that name: the next client that really goes to
/// that port would get it.
#[tokio::test]
async fn a_host_naming_another_port_cannot_plant_a_cached_response() {
    let a = origin(|_| (CACHEABLE, "from port A".into())).await;
    let b = origin(|_| (CACHEABLE, "from port B".into())).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\noutbound:\n  listen: 127.0.0.1:0\n  egress:\n    allow:\n      - cidr: 127.0.0.1/32\n  cache:\n    enabled: true\naccess_log: {{ output: {} }}\n",
        dir.path().join("access.log").display()
    );
    let dst = Arc::new(std::sync::Mutex::new(a));
    let seen = dst.clone();
    let server = Server::bind(validate(Config::from_yaml(&yaml).unwrap()).unwrap(), None)
        .await
        .unwrap()
        .with_orig_dst(Arc::new(move |_s: &TcpStream| Some(*seen.lock().unwrap())));
    let proxy = server.handle().outbound_addr;
    tokio::spawn(server.run());
    let get =
        |host: String| format!("GET /page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");

    // Reaches port A, names port B.
    let resp = raw_request(proxy, &get(b.to_string())).await;
    assert!(resp.ends_with("from port A"), "{resp}");
    // A client that really goes to port B.
    *dst.lock().unwrap() = b;
    let resp = raw_request(proxy, &get(b.to_string())).await;
    assert!(
        resp.ends_with("from port B"),
        "got port A's response from the cache: {resp}"
    );
}

#[tokio::test]
async fn transparent_http_denied_without_rule() {
    let origin = http_origin().await;
    let p = Proxy::start("  egress:\n    allow:\n      - host: other.test\n", origin).await;
    let resp = raw_request(
        p.handle.outbound_addr,
        "GET / HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("no rule for host evil.test"), "{resp}");
}

#[tokio::test]
async fn opaque_tcp_is_checked_on_the_destination_address() {
    let echo = echo_server(None).await;
    let allowed = Proxy::start("  egress:\n    allow:\n      - cidr: 127.0.0.0/8\n", echo).await;
    let mut s = TcpStream::connect(allowed.handle.outbound_addr)
        .await
        .unwrap();
    s.write_all(b"\x00\x01hello").await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"\x00\x01hello");
    drop(s);
    let lines = allowed.log_lines().await;
    assert_eq!(lines[0]["protocol"], "tcp");
    assert_eq!(lines[0]["decision"], "allow");

    let denied = Proxy::start("  egress:\n    allow:\n      - cidr: 10.0.0.0/8\n", echo).await;
    let mut s = TcpStream::connect(denied.handle.outbound_addr)
        .await
        .unwrap();
    s.write_all(b"\x00\x01hello").await.unwrap();
    let mut out = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        n.is_err() || out.is_empty(),
        "denied TCP must be closed without data"
    );
    let lines = denied.log_lines().await;
    assert_eq!(lines[0]["decision"], "deny");
    assert!(lines[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no rule for address 127.0.0.1"));
}

/// Opaque TCP admitted by a CIDR rule is closed (and logged as denied) when a reload
/// removes that rule, and left open by a reload that keeps it.
#[tokio::test]
async fn a_reload_closes_opaque_tcp_it_no_longer_allows() {
    let echo = echo_server(None).await;
    let proxy = Proxy::start("  egress:\n    allow:\n      - cidr: 127.0.0.0/8\n", echo).await;
    let mut s = TcpStream::connect(proxy.handle.outbound_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 7];
    for round in ["before", "after a harmless reload"] {
        if round != "before" {
            proxy.reload_with(
                "  egress:\n    allow:\n      - cidr: 127.0.0.0/8\n      - cidr: 10.0.0.0/8\n",
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        s.write_all(b"\x00\x01hello").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no echo {round}"))
            .unwrap();
        assert_eq!(&buf, b"\x00\x01hello", "{round}");
    }
    proxy.reload_with("  egress:\n    allow:\n      - cidr: 10.0.0.0/8\n");
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was still open 5 s after a reload revoked its rule: {read:?}"
    );
    let lines = proxy.log_lines().await;
    assert_eq!(lines[0]["protocol"], "tcp", "{lines:?}");
    assert_eq!(lines[0]["decision"], "deny", "{lines:?}");
    let reason = lines[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("config reload") && reason.contains("no rule for address 127.0.0.1"),
        "{reason}"
    );
}

#[tokio::test]
async fn silent_client_fails_open_to_tcp_after_the_detection_timeout() {
    let echo = echo_server(Some("220 banner\r\n")).await;
    let p = Proxy::start("  egress:\n    allow:\n      - cidr: 127.0.0.0/8\n", echo).await;
    let mut s = TcpStream::connect(p.handle.outbound_addr).await.unwrap();
    // The client waits for the server to speak; after the 300 ms detection timeout the
    // proxy connects and the banner arrives.
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 banner\r\n");
    let metrics = admin_get(p.handle.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("outrider_detect_timeouts_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn server_first_port_skips_detection() {
    // Port 2525 is configured server-first by Proxy::start; the echo server is given that
    // "original port" by running the proxy with an original destination on 2525 that a
    // local relay forwards to the real echo server.
    let echo = echo_server(Some("220 hello\r\n")).await;
    let relay = TcpListener::bind("127.0.0.1:2525").await;
    let Ok(relay) = relay else {
        panic!("port 2525 is taken on this machine; the server-first test needs it");
    };
    tokio::spawn(async move {
        loop {
            let (mut a, _) = relay.accept().await.unwrap();
            tokio::spawn(async move {
                let mut b = TcpStream::connect(echo).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
    let od: SocketAddr = "127.0.0.1:2525".parse().unwrap();
    // Detection would wait a minute for a client that never speaks: only skipping it for
    // the server-first port lets the banner through.
    let p = Proxy::start_with_detect(
        "  egress:\n    allow:\n      - cidr: 127.0.0.0/8\n",
        od,
        "60s",
    )
    .await;
    let mut s = TcpStream::connect(p.handle.outbound_addr).await.unwrap();
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 hello\r\n");
    drop(s);
    let lines = p.log_lines().await;
    assert_eq!(lines[0]["protocol"], "tcp");
}

async fn admin_get(admin: SocketAddr, path: &str) -> String {
    raw_request(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
    )
    .await
}

mod tls {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    /// A real TLS origin for `name`, and a client config that trusts it.
    async fn tls_origin(name: &str) -> (SocketAddr, Arc<rustls::ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        let _ = tls.write_all(b"secret hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        (addr, Arc::new(client))
    }

    #[tokio::test]
    async fn tls_is_passed_through_untouched_and_logged_with_its_sni() {
        let (origin, client) = tls_origin("svc.test").await;
        let p = Proxy::start(
            "  egress:\n    allow:\n      - cidr: 127.0.0.1/32\ndns:\n  hosts:\n    svc.test: 127.0.0.1\n",
            origin,
        )
        .await;
        let tcp = TcpStream::connect(p.handle.outbound_addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client);
        let mut tls = connector
            .connect(ServerName::try_from("svc.test").unwrap(), tcp)
            .await
            .expect("end-to-end TLS handshake through the proxy");
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        assert_eq!(out, b"secret hello");
        drop(tls);
        let lines = p.log_lines().await;
        assert_eq!(lines[0]["protocol"], "tls");
        assert_eq!(lines[0]["sni"], "svc.test");
        assert_eq!(lines[0]["decision"], "allow");
    }

    #[tokio::test]
    async fn tls_with_a_forged_sni_is_closed() {
        let (origin, client) = tls_origin("good.test").await;
        let p = Proxy::start(
            "  egress:\n    allow:\n      - host: good.test\n      - cidr: 127.0.0.2/32\ndns:\n  hosts:\n    good.test: 127.0.0.2\n",
            origin,
        )
        .await;
        let tcp = TcpStream::connect(p.handle.outbound_addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client);
        let result = connector
            .connect(ServerName::try_from("good.test").unwrap(), tcp)
            .await;
        assert!(
            result.is_err(),
            "the proxy must close a connection whose SNI does not match its destination"
        );
        let lines = p.log_lines().await;
        assert_eq!(lines[0]["decision"], "deny");
        assert_eq!(lines[0]["sni"], "good.test");
        assert!(lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not resolve to the original destination"));
    }
}
