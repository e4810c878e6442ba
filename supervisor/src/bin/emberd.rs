//! `emberd`: the Ember supervisor daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use supervisor::daemon::{self, DaemonError, Options};

/// The Ember supervisor: keeps a base warm and runs modules in pre-forked
/// workers.
#[derive(Debug, Parser)]
#[command(name = "emberd", version)]
struct Args {
    /// TOML configuration file (default: the embedded configuration).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket path (overrides the configuration).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory (overrides the configuration).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, ADDR an IP address
    /// and port such as 127.0.0.1:9464 (overrides `metrics_address`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// Exit codes (sysexits.h).
fn exit_code(e: &DaemonError) -> u8 {
    match e {
        DaemonError::Config(_) | DaemonError::RuntimeLibs(_) => 78,
        DaemonError::Store(_) => 73,
        DaemonError::Zygote(_)
        | DaemonError::Runtime(_)
        | DaemonError::Subreaper(_)
        | DaemonError::Dumpable(_) => 71,
        DaemonError::Bind(_) | DaemonError::MetricsBind { .. } => 69,
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // Zygote mode: before anything else, and never with a runtime.
    if argv.get(1).map(String::as_str) == Some(supervisor::zygote::ZYGOTE_ARG) {
        return ExitCode::from(supervisor::zygote::process::main(&argv[2..]) as u8);
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a terminal: under systemd or in a log file they
        // are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let opts = Options {
        config: args.config,
        socket: args.socket,
        state_dir: args.state_dir,
        metrics: args.metrics,
    };
    let result = if args.check_config {
        daemon::load_config(&opts)
            .map(drop)
            .map_err(DaemonError::Config)
    } else {
        daemon::run(opts)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emberd: {}", supervisor::error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}
