//! `outrider`: the sidecar's command line. Thin: parse, run, map errors to exit codes.

use clap::Parser;

/// Outrider, a sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "outrider", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The mesh certificate authority.
    #[command(subcommand)]
    Ca(outrider::tls::CaCommand),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    outrider::tls::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ca(cmd) => outrider::tls::run_ca(cmd).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
