//! A real gRPC stack through the inbound listener: Debian's `python3-grpcio` (gRPC's C core)
//! as both the app and its caller, with no protobuf (the methods carry raw bytes). Unary,
//! client-streaming and server-streaming calls go through with their messages in order, an
//! error status in trailers reaches the caller as that status, and a call that the
//! authorization rules refuse is `PERMISSION_DENIED` to the caller (gRPC's reading of 403).
//! `tests/run.sh` installs `python3-grpcio`; without it these tests fail saying so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use outrider::testing::TestProxy;

/// The system python3 (Debian's packages are installed for it, not for a pyenv one).
const PYTHON: &str = "/usr/bin/python3";

/// The app: `demo.Echo` with four methods on raw bytes (see [`app_script`]).
const SERVER: &str = r#"
def unary(req, ctx):
    return b"echo:" + req

def client_stream(requests, ctx):
    return b"+".join(requests)

def server_stream(req, ctx):
    for i in range(3):
        yield req + str(i).encode()

def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

handlers = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary, same, same),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, same, same),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, same, same),
    "Fail": grpc.unary_unary_rpc_method_handler(fail, same, same),
}
"#;

/// A gRPC app serving `demo.Echo` on raw bytes: `methods` defines the functions and the
/// `handlers` dict, `options` the server's channel options. It prints its port.
fn app_script(methods: &str, options: &str) -> String {
    format!(
        r#"
import grpc, sys, time
from concurrent import futures
same = lambda b: b
{methods}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[{options}])
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", handlers),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#
    )
}

/// The caller: each call's outcome, as JSON (`[code, details]` for an error).
const CLIENT: &str = r#"
import json, sys, grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
same = lambda b: b
def outcome(call):
    try:
        return call()
    except grpc.RpcError as e:
        return [e.code().name, e.details()]
out = {
    "unary": outcome(lambda: channel.unary_unary("/demo.Echo/Unary", same, same)(b"hi", timeout=10).decode()),
    "client_stream": outcome(lambda: channel.stream_unary("/demo.Echo/ClientStream", same, same)(iter([b"a", b"b", b"c"]), timeout=10).decode()),
    "server_stream": outcome(lambda: [m.decode() for m in channel.unary_stream("/demo.Echo/ServerStream", same, same)(b"m", timeout=10)]),
    "fail": outcome(lambda: channel.unary_unary("/demo.Echo/Fail", same, same)(b"x", timeout=10)),
    "other_service": outcome(lambda: channel.unary_unary("/demo.Admin/Drop", same, same)(b"x", timeout=10)),
}
print(json.dumps(out))
"#;

fn python_has_grpc() {
    let probe = Command::new(PYTHON).args(["-c", "import grpc"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{PYTHON} cannot import grpc (install python3-grpcio, as tests/run.sh does): {probe:?}"
    );
}

/// The app, killed when dropped.
struct App(Child, u16);

impl App {
    fn start() -> App {
        App::start_script(&app_script(SERVER, ""))
    }

    fn start_script(script: &str) -> App {
        python_has_grpc();
        let mut child = Command::new(PYTHON)
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the gRPC app printed {line:?}, not its port"));
        App(child, port)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the caller against `target` and returns its JSON.
async fn call_all(target: std::net::SocketAddr) -> serde_json::Value {
    run_caller(CLIENT, target).await
}

/// Runs a caller script against `target` (its `argv[1]`) and returns the JSON it prints.
async fn run_caller(script: &str, target: std::net::SocketAddr) -> serde_json::Value {
    let out = tokio::process::Command::new(PYTHON)
        .args(["-c", script, &target.to_string()])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("grpc_proxy")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the gRPC caller failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_of_every_kind_go_through_the_inbound_listener() {
    let app = App::start();
    let p = TestProxy::start(&format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: 127.0.0.1:{}\n  authorization:\n    - paths: [/demo.Echo/]\n",
        app.1
    ))
    .await;
    let out = call_all(p.handle().inbound_addr.unwrap()).await;
    assert_eq!(out["unary"], "echo:hi", "{out}");
    assert_eq!(out["client_stream"], "a+b+c", "{out}");
    assert_eq!(
        out["server_stream"],
        serde_json::json!(["m0", "m1", "m2"]),
        "{out}"
    );
    // The app's own error status, carried in trailers.
    assert_eq!(
        out["fail"],
        serde_json::json!(["NOT_FOUND", "no such thing"]),
        "{out}"
    );
    // Refused by the proxy (403), which the caller reads as PERMISSION_DENIED.
    assert_eq!(out["other_service"][0], "PERMISSION_DENIED", "{out}");

    let fail = p.wait_log(|l| l["path"] == "/demo.Echo/Fail").await;
    assert_eq!(fail["protocol"], "http2", "{fail}");
    assert!(fail.get("error").is_none(), "{fail}");
    let denied = p.wait_log(|l| l["path"] == "/demo.Admin/Drop").await;
    assert_eq!(denied["decision"], "deny", "{denied}");
    p.shutdown().await;
}

/// An app whose server-streaming call sends one message, is silent for 35 s, then sends
/// another; it applies gRPC's PING policy (at most one PING per 5 minutes while it
/// sends nothing) with one second chance (`max_ping_strikes` 1, where the default allows two;
/// 0 would allow any number).
const SILENT_STREAM: &str = r#"
def watch(req, ctx):
    yield b"first"
    time.sleep(35)
    yield b"second"

handlers = {"Watch": grpc.unary_stream_rpc_method_handler(watch, same, same)}
"#;

/// A streaming call that stays silent (a watch with nothing to report) is not killed by the
/// proxy's keepalive: gRPC servers close a connection PINGed more often than every 5 minutes
/// while they send nothing (GOAWAY "too many pings"), and the proxy PINGed every 10 s, so a
/// watch through it died after 40 s of quiet (`UNAVAILABLE: Too many pings`; 30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_streaming_call_outlives_the_servers_ping_policy() {
    let strict = r#"("grpc.http2.max_ping_strikes", 1)"#;
    let app = App::start_script(&app_script(SILENT_STREAM, strict));
    let p = TestProxy::start(&format!(
        "inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: 127.0.0.1:{}\n",
        app.1
    ))
    .await;
    let caller = r#"
import json, sys, grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
same = lambda b: b
try:
    got = [m.decode() for m in channel.unary_stream("/demo.Echo/Watch", same, same)(b"w", timeout=60)]
except grpc.RpcError as e:
    got = [e.code().name, e.details()]
print(json.dumps(got))
"#;
    let got = run_caller(caller, p.handle().inbound_addr.unwrap()).await;
    assert_eq!(got, serde_json::json!(["first", "second"]));
    p.shutdown().await;
}

/// An app whose unary call takes 3 s to answer.
const SLOW_UNARY: &str = r#"
def slow(req, ctx):
    time.sleep(3)
    return b"slow:" + req

handlers = {"Slow": grpc.unary_unary_rpc_method_handler(slow, same, same)}
"#;

/// A gRPC call's own deadline (`grpc-timeout`) is what the proxy waits for its answer, not
/// `outbound.timeouts.response`: with that at 1 s, a 3-second call whose client allows 10 s
/// is answered (it was `UNAVAILABLE`, the proxy's 504); one whose client sets no deadline
/// still gets the configured timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_calls_deadline_is_the_response_timeout() {
    let app = App::start_script(&app_script(SLOW_UNARY, ""));
    let p = TestProxy::start(&format!(
        "outbound:\n  timeouts: {{ response: 1s }}\n\
         inbound:\n  mtls: disabled\n  routes:\n    - match: {{ path_prefix: / }}\n      to: 127.0.0.1:{}\n",
        app.1
    ))
    .await;
    let caller = r#"
import json, sys, grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
same = lambda b: b
def outcome(**kw):
    try:
        return channel.unary_unary("/demo.Echo/Slow", same, same)(b"x", **kw).decode()
    except grpc.RpcError as e:
        return [e.code().name, e.details()]
print(json.dumps({"deadline": outcome(timeout=10), "none": outcome()}))
"#;
    let got = run_caller(caller, p.handle().inbound_addr.unwrap()).await;
    assert_eq!(got["deadline"], "slow:x", "{got}");
    assert_eq!(got["none"][0], "UNAVAILABLE", "{got}");
    let timed_out = p.wait_log(|l| l["status"] == 504).await;
    assert_eq!(timed_out["path"], "/demo.Echo/Slow", "{timed_out}");
    p.shutdown().await;
}
