//! Open-loop fixed-rate HTTP/1.1 load for `bench/run.sh`: requests go out on a fixed
//! schedule, whether or not the server keeps up, and each latency is measured the way
//! wrk2 does it, without coordinated omission.
//!
//! Each of the `--connections` keep-alive connections has its own thread and its own
//! share of the schedule: request `k` of the whole run is due at `start + k / rate` and
//! goes out on connection `k % connections`. A request whose connection was still busy
//! with the previous answer when it fell due is timed from when it was due, so a stalled
//! server is charged for the requests queued behind the stall. A request whose connection
//! was free is timed from when it went out: the client's own wake-up lateness (reported
//! as `client_lag_us`) is not the server's.
//!
//! This replaced a Python asyncio client, whose own event-loop delay (tens to hundreds of
//! microseconds, varying with the machine's load) was in every latency it measured and
//! moved the p99 of the same server by more than the differences between the servers.
//! h2load's `--rps` cannot send the absolute-form requests an explicit proxy needs, and
//! times each request from when it went out; wrk2 is not in Debian.
//!
//! ```text
//! openloop --connect 127.0.0.1:PORT --path /1k --host 127.0.0.1:ORIGIN \
//!     --rate 2000 --duration 8 --connections 64 --out result.json
//! ```

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(about = "Open-loop fixed-rate HTTP/1.1 load (bench/run.sh)")]
struct Args {
    /// host:port to connect to.
    #[arg(long)]
    connect: String,
    /// Request target: "/1k", or absolute-form ("http://host:port/1k") for a forward proxy.
    #[arg(long)]
    path: String,
    /// Host header.
    #[arg(long)]
    host: String,
    /// Requests per second, over all connections.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Where the JSON result goes (also printed).
    #[arg(long)]
    out: String,
}

/// What one connection's thread saw.
#[derive(Default)]
struct Tally {
    /// Latencies in nanoseconds.
    latencies: Vec<u64>,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    /// Lateness of sends on a free connection, in nanoseconds: the client's own.
    lags: Vec<u64>,
    /// When this connection's last answer ended.
    last_end: Option<Instant>,
}

/// One keep-alive connection and the bytes read past the last response.
struct Conn {
    addr: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.buf.clear();
            self.stream = Some(s);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::other("no connection"))
    }

    fn drop_stream(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// Sends `req` and reads the whole response. A reused connection that the server
    /// closed while it was idle fails at once; that request is retried once on a fresh
    /// connection, as HTTP clients do.
    fn exchange(&mut self, req: &[u8]) -> io::Result<u16> {
        for attempt in 0..2 {
            let reused = self.stream.is_some();
            match self.try_exchange(req) {
                Ok((status, keep)) => {
                    if !keep {
                        self.drop_stream();
                    }
                    return Ok(status);
                }
                Err(e) => {
                    self.drop_stream();
                    if !(reused && attempt == 0) {
                        return Err(e);
                    }
                }
            }
        }
        Err(io::Error::other("unreachable retry"))
    }

    fn try_exchange(&mut self, req: &[u8]) -> io::Result<(u16, bool)> {
        self.open()?.write_all(req)?;
        self.read_response()
    }

    /// Reads more bytes onto `buf`; the peer closing is an error here.
    fn fill(&mut self) -> io::Result<()> {
        let stream = self.open()?;
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads until `buf` holds at least `n` bytes.
    fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(())
    }

    /// Reads one response; returns its status and whether the connection stays open.
    fn read_response(&mut self) -> io::Result<(u16, bool)> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let (head_len, status, keep, framing) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(0);
                    let http10 = resp.version == Some(0);
                    let mut length = None;
                    let mut chunked = false;
                    let mut conn_close = http10;
                    for h in resp.headers.iter() {
                        let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = Some(v.trim().parse::<usize>().map_err(|_| bad("length"))?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = v.contains("chunked");
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            if v.contains("close") {
                                conn_close = true;
                            } else if v.contains("keep-alive") {
                                conn_close = false;
                            }
                        }
                    }
                    let framing = if (100..200).contains(&status) || status == 204 || status == 304
                    {
                        Framing::Length(0)
                    } else if chunked {
                        Framing::Chunked
                    } else if let Some(n) = length {
                        Framing::Length(n)
                    } else {
                        Framing::Eof
                    };
                    break (len, status, !conn_close, framing);
                }
                Ok(httparse::Status::Partial) => self.fill()?,
                Err(_) => return Err(bad("response head")),
            }
        };
        self.buf.drain(..head_len);
        match framing {
            Framing::Length(n) => {
                self.fill_to(n)?;
                self.buf.drain(..n);
                Ok((status, keep))
            }
            Framing::Chunked => {
                loop {
                    let line = loop {
                        if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break at;
                        }
                        self.fill()?;
                    };
                    let size = std::str::from_utf8(&self.buf[..line])
                        .ok()
                        .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                        .ok_or_else(|| bad("chunk size"))?;
                    self.buf.drain(..line + 2);
                    if size == 0 {
                        break;
                    }
                    self.fill_to(size + 2)?;
                    self.buf.drain(..size + 2);
                }
                // Trailer fields, if any, up to the empty line.
                loop {
                    let line = loop {
                        if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break at;
                        }
                        self.fill()?;
                    };
                    self.buf.drain(..line + 2);
                    if line == 0 {
                        return Ok((status, keep));
                    }
                }
            }
            Framing::Eof => {
                let stream = self.open()?;
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest)?;
                Ok((status, false))
            }
        }
    }
}

enum Framing {
    Length(usize),
    Chunked,
    Eof,
}

/// Runs connection `index`'s share of the schedule.
fn run_connection(args: &Args, index: usize, start: Instant, req: &[u8], mut conn: Conn) -> Tally {
    let total = (args.rate * args.duration) as u64;
    let mut tally = Tally::default();
    let mut free_since = start;
    let mut k = index as u64;
    while k < total {
        let due = start + Duration::from_secs_f64(k as f64 / args.rate);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        // Free when due: time it from its send. Busy: from when it was due.
        let from = if free_since <= due {
            tally.lags.push(nanos(sent.saturating_duration_since(due)));
            sent
        } else {
            due
        };
        match conn.exchange(req) {
            Ok(status) => {
                let end = Instant::now();
                tally.latencies.push(nanos(end - from));
                *tally.statuses.entry(status).or_default() += 1;
                if status != 200 {
                    tally.errors += 1;
                }
            }
            Err(_) => tally.errors += 1,
        }
        free_since = Instant::now();
        tally.last_end = Some(free_since);
        k += args.connections as u64;
    }
    tally
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The value at percentile `p` of sorted `v` (nearest rank), in microseconds.
fn pct_us(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let i = ((p / 100.0 * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
    (v[i] + 500) / 1000
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.connections == 0 || args.rate <= 0.0 || args.duration <= 0.0 {
        eprintln!("openloop: --connections, --rate and --duration must be positive");
        return ExitCode::from(2);
    }
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n\r\n",
        args.path, args.host
    );
    // Every connection is open before the clock starts, as a pool would be.
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let mut c = Conn {
            addr: args.connect.clone(),
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        };
        if let Err(e) = c.open() {
            eprintln!("openloop: cannot connect to {}: {e}", args.connect);
            return ExitCode::FAILURE;
        }
        conns.push(c);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (args, req) = (&args, req.as_bytes());
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || run_connection(args, i, start, req, c))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.ok()?.join().ok())
            .collect()
    });
    if tallies.len() != args.connections {
        eprintln!("openloop: a connection thread failed");
        return ExitCode::FAILURE;
    }
    let end = tallies
        .iter()
        .filter_map(|t| t.last_end)
        .max()
        .unwrap_or(start);
    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    let mut lat: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.latencies.iter().copied())
        .collect();
    let mut lags: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.lags.iter().copied())
        .collect();
    lat.sort_unstable();
    lags.sort_unstable();
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        for (code, n) in &t.statuses {
            *statuses.entry(code.to_string()).or_default() += n;
        }
    }
    let achieved = if elapsed > 0.0 {
        (lat.len() as f64 / elapsed * 10.0).round() / 10.0
    } else {
        0.0
    };
    let result = serde_json::json!({
        "tool": "openloop (bench/tools/openloop.rs)",
        "target_rps": args.rate,
        "achieved_rps": achieved,
        "requests": lat.len(),
        "errors": errors,
        "statuses": statuses,
        "client_max_lag_us": pct_us(&lags, 100.0),
        "client_lag_us": { "p50": pct_us(&lags, 50.0), "p99": pct_us(&lags, 99.0) },
        "latency_us": {
            "p50": pct_us(&lat, 50.0),
            "p90": pct_us(&lat, 90.0),
            "p99": pct_us(&lat, 99.0),
            "p99_9": pct_us(&lat, 99.9),
            "max": pct_us(&lat, 100.0),
        },
    });
    let text = result.to_string();
    println!("{text}");
    if let Err(e) = std::fs::write(&args.out, &text) {
        eprintln!("openloop: cannot write {}: {e}", args.out);
        return ExitCode::FAILURE;
    }
    if lat.is_empty() || errors as f64 > 0.01 * lat.len().max(1) as f64 {
        eprintln!("openloop: too many errors ({errors} of {})", lat.len());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
