//! The `outrider` binary: parse the command line, load config, run, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outrider::config::Config;
use outrider::server::{run_with_signals, Server};

/// mimalloc instead of glibc's malloc. Each proxied request allocates a few blocks over
/// glibc's 1 KiB thread cache (hyper's 8 KiB read buffer, the boxed request future of
/// ~5 KiB), which glibc serves from its locked bins and pays for with `malloc_consolidate`:
/// a sixth of the proxy's user time. With mimalloc, user CPU per inbound request fell by
/// about a fifth (README → Performance). Built with `no_thp`: mimalloc would otherwise ask
/// for transparent huge pages, which took idle RSS from 8 to 16 MB. Called through
/// `outrider::alloc`, which keeps ordinary alignments off mimalloc's aligned slow path.
#[global_allocator]
static GLOBAL: outrider::alloc::Mimalloc = outrider::alloc::Mimalloc;

#[derive(Parser)]
#[command(
    name = "outrider",
    // The commit too (see src/build.rs): which code a benchmark or a bug report ran.
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("OUTRIDER_COMMIT"), ")"),
    about = "A sidecar proxy: egress allowlist, inbound routing, mesh mTLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default config without --config).
    Run {
        /// YAML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0, or print the error naming the key and exit 1.
    Check {
        /// YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the embedded default config.
    DefaultConfig,
    /// Wait until the sidecar's admin `/ready` answers 200 (its certificate fetched, its
    /// listeners open), then exit 0; exit 1 at the timeout. For a container's postStart hook,
    /// so that the app starts only once its traffic has somewhere to go.
    WaitReady {
        /// The admin listener.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// How long to wait (`60s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Transparent-capture rules: runs the shipped iptables script (embedded in the binary)
    /// with these arguments, e.g. `outrider iptables apply --proxy-uid 1337`.
    Iptables {
        /// `apply`, `remove` or `print`, then the script's flags (see iptables/README.md).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// The mesh CA: init, token, serve.
    #[command(subcommand)]
    Ca(outrider::tls::ca::CaCommand),
}

fn main() -> ExitCode {
    outrider::alloc::configure();
    let cli = Cli::parse();
    outrider::logging::init();
    match cli.command {
        Command::Check { config } => match Config::load(Some(&config)) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::FAILURE
            }
        },
        Command::Iptables { args } => run_iptables_script(&args),
        Command::Ca(cmd) => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(outrider::tls::ca::run_ca(cmd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outrider ca: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DefaultConfig => {
            print!("{}", outrider::config::EMBEDDED_DEFAULT);
            ExitCode::SUCCESS
        }
        Command::WaitReady { admin, timeout } => wait_ready(admin, timeout),
        Command::Run { config } => {
            let compiled = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("config error: {e}");
                    return ExitCode::from(2);
                }
            };
            raise_open_file_limit();
            // The control runtime (admin API, signals, renewal); the data path gets its own
            // threads, `runtime.worker_threads` of them (see `outrider::workers`).
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result: anyhow::Result<()> = rt.block_on(async move {
                let server = Server::bind(compiled, config).await?;
                run_with_signals(server).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("outrider: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Raises the soft open-file limit to the hard one. A proxy holds two descriptors per
/// proxied connection, and the usual soft limit (1024) would stop it near 500 connections
/// — accept fails with EMFILE — while the hard limit allows far more. HAProxy and Go's
/// runtime raise it the same way; nothing else in the process depends on a low limit
/// (no `select`).
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    // Linux refuses an unlimited open-file limit; fs.nr_open's default is the ceiling.
    const CEILING: u64 = 1 << 20;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    let target = if hard == RLIM_INFINITY { CEILING } else { hard };
    let soft = if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = target, "raised the open-file limit");
                target
            }
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    if soft < 4096 {
        tracing::warn!(
            limit = soft,
            "the open-file limit allows only about {} proxied connections",
            soft / 2
        );
    }
}

/// Polls `GET /ready` on `admin` every 100 ms until it answers 200 or `timeout` passes.
fn wait_ready(admin: std::net::SocketAddr, timeout: std::time::Duration) -> ExitCode {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let asked = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(1))
            .and_then(|mut s| {
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
                s.write_all(b"GET /ready HTTP/1.1\r\nHost: outrider\r\nConnection: close\r\n\r\n")?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer)
            });
        let last = match asked {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") => {
                println!("outrider at {admin} is ready");
                return ExitCode::SUCCESS;
            }
            Ok(answer) => answer
                .lines()
                .next()
                .unwrap_or("an empty answer")
                .to_owned(),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "outrider at {admin} is not ready after {}: {last}",
                humantime::format_duration(timeout)
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The iptables script, embedded so that `outrider iptables` works wherever the binary is.
const IPTABLES_SCRIPT: &str = include_str!("../iptables/outrider-iptables.sh");

fn run_iptables_script(args: &[String]) -> ExitCode {
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(IPTABLES_SCRIPT)
        .arg("outrider-iptables")
        .args(args)
        .status();
    match status {
        Ok(s) => ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("outrider iptables: cannot run bash: {e}");
            ExitCode::FAILURE
        }
    }
}
