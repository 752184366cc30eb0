//! A tiny HTTP origin for trying Outrider locally: answers every request on
//! 127.0.0.1:8080 (or the address given as the first argument) with a greeting.
//!
//! Run: `cargo run --release --example origin` then, with `outrider run` on the embedded
//! default, `curl -x http://127.0.0.1:15001 http://demo.local:8080/hello` prints
//! `hello from the demo origin: GET /hello`.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("demo origin listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let text = format!(
                    "hello from the demo origin: {} {}\n",
                    req.method(),
                    req.uri().path()
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
