//! The request id the inbound proxy adds (`x-request-id`), and a client's tracing id
//! (`traceparent` here), reach an HTTP/2 app as never-indexed literals, so that they leave
//! the app's HPACK table alone: such an id is unique to its request and is never sent
//! again, and inserted it only pushed out the headers that do repeat. (About fifty ids filled the table's 4 KiB, and the forwarding headers, authority
//! and the rest then went out whole again; both sides paid for the insertions and
//! evictions, about 2.7k instructions per request in the proxy.) Read off the wire by an
//! app that speaks just enough HTTP/2 to see each request's header block as it was encoded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider::testing::TestProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a header field is represented in an HPACK block (RFC 7541 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rep {
    /// A reference to a table entry.
    Indexed,
    /// A literal the decoder adds to its dynamic table.
    Incremental,
    /// A literal left out of the table.
    WithoutIndexing,
    /// A literal left out of the table by every hop.
    NeverIndexed,
    /// A change of the table's size.
    SizeUpdate,
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), from `b[*at..]`.
fn int(b: &[u8], at: &mut usize, n: u32) -> usize {
    let mask = (1usize << n) - 1;
    let mut v = usize::from(b[*at]) & mask;
    *at += 1;
    if v < mask {
        return v;
    }
    let mut shift = 0;
    loop {
        let c = b[*at];
        *at += 1;
        v += usize::from(c & 0x7f) << shift;
        shift += 7;
        if c & 0x80 == 0 {
            return v;
        }
    }
}

/// Skips a string literal (RFC 7541 §5.2): its length, then its bytes.
fn skip_string(b: &[u8], at: &mut usize) {
    let len = int(b, at, 7);
    *at += len;
}

/// The representations of a header block, in order.
fn representations(b: &[u8]) -> Vec<Rep> {
    let mut at = 0;
    let mut reps = Vec::new();
    while at < b.len() {
        let c = b[at];
        let (rep, prefix) = match c {
            _ if c & 0x80 != 0 => (Rep::Indexed, 7),
            _ if c & 0x40 != 0 => (Rep::Incremental, 6),
            _ if c & 0x20 != 0 => (Rep::SizeUpdate, 5),
            _ if c & 0x10 != 0 => (Rep::NeverIndexed, 4),
            _ => (Rep::WithoutIndexing, 4),
        };
        let index = int(b, &mut at, prefix);
        if !matches!(rep, Rep::Indexed | Rep::SizeUpdate) {
            // A new name (index 0) comes as a string before the value.
            if index == 0 {
                skip_string(b, &mut at);
            }
            skip_string(b, &mut at);
        }
        reps.push(rep);
    }
    reps
}

/// One HTTP/2 frame's header: length, type, flags, stream.
fn frame(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f
}

/// An app that speaks just enough HTTP/2 (prior knowledge) to answer each request with a
/// bare 200, and keeps each request's header block as it came.
async fn start_app() -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let blocks = Arc::new(Mutex::new(Vec::new()));
    let seen = blocks.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                s.read_exact(&mut preface).await.unwrap();
                assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                // Our SETTINGS: none changed, so the table stays at 4 KiB.
                s.write_all(&frame(0, 4, 0, 0)).await.unwrap();
                loop {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                    let mut payload = vec![0u8; len];
                    s.read_exact(&mut payload).await.unwrap();
                    match kind {
                        // HEADERS: the block (without padding or priority), then a 200
                        // (`:status: 200` is static entry 8) that ends the stream.
                        1 => {
                            assert_ne!(flags & 0x4, 0, "a request's block in one frame");
                            let mut block = &payload[..];
                            if flags & 0x8 != 0 {
                                let pad = usize::from(block[0]);
                                block = &block[1..block.len() - pad];
                            }
                            if flags & 0x20 != 0 {
                                block = &block[5..];
                            }
                            seen.lock().unwrap().push(block.to_vec());
                            let mut answer = frame(1, 1, 0x4 | 0x1, stream);
                            answer.push(0x88);
                            s.write_all(&answer).await.unwrap();
                        }
                        // SETTINGS (not an ACK): acknowledged.
                        4 if flags & 0x1 == 0 => s.write_all(&frame(0, 4, 0x1, 0)).await.unwrap(),
                        // PING: answered.
                        6 if flags & 0x1 == 0 => {
                            let mut pong = frame(8, 6, 0x1, 0);
                            pong.extend_from_slice(&payload);
                            s.write_all(&pong).await.unwrap();
                        }
                        // GOAWAY.
                        7 => return,
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, blocks)
}

#[tokio::test]
async fn request_and_trace_ids_reach_an_http2_app_never_indexed_and_leave_its_table_alone() {
    let (app, blocks) = start_app().await;
    let p = TestProxy::start(&format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: {app}\n"
    ))
    .await;
    let inbound = p.handle().inbound_addr.unwrap();
    // A client speaking HTTP/2, so that the proxy speaks HTTP/2 to the app too.
    let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // More than the fifty or so ids that filled the app's table when they were indexed.
    const REQUESTS: usize = 120;
    for i in 0..REQUESTS {
        let req = http::Request::get("http://app.test/id")
            .header(
                "traceparent",
                format!("00-{:032x}-{:016x}-01", 0xabc0_0000 + i, 0x5000 + i),
            )
            .header("tracestate", "vendor=same-every-time")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }

    let blocks = blocks.lock().unwrap().clone();
    assert_eq!(blocks.len(), REQUESTS);
    for (i, block) in blocks.iter().enumerate() {
        let reps = representations(block);
        let never = reps.iter().filter(|&&r| r == Rep::NeverIndexed).count();
        assert_eq!(
            never, 2,
            "request {i}: the two ids, and only they, never indexed: {reps:?}"
        );
        // After the first request, whose headers fill the table, nothing else goes in:
        // the fields that repeat (`tracestate` among them) are all references to it, to the
        // last request.
        if i > 0 {
            assert!(
                !reps.contains(&Rep::Incremental),
                "request {i} added to the app's table: {reps:?}"
            );
        }
    }
    p.shutdown().await;
}
