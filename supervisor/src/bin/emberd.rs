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
        DaemonError::Bind(_) | DaemonError::MetricsBind { .. } | DaemonError::Activation(_) => 69,
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // Zygote mode: before anything else, and never with a runtime.
    if argv.get(1).map(String::as_str) == Some(supervisor::zygote::ZYGOTE_ARG) {
        return ExitCode::from(supervisor::zygote::process::main(&argv[2..]) as u8);
    }
    let args = Args::parse();
    let opts = Options {
        config: args.config,
        socket: args.socket,
        state_dir: args.state_dir,
        metrics: args.metrics,
    };
    // The configuration first: it says how to log.
    let cfg = match daemon::load_config(&opts) {
        Ok(c) => c,
        Err(e) => {
            let e = DaemonError::Config(e);
            let journal = supervisor::journal::stderr_is_journal();
            let prefix = if journal { "<3>" } else { "" };
            eprintln!("{prefix}emberd: {}", supervisor::error_chain(&e));
            return ExitCode::from(exit_code(&e));
        }
    };
    let journal = cfg.logging.journal_mode();
    supervisor::journal::init_tracing(journal);
    let result = if args.check_config {
        Ok(())
    } else {
        daemon::run_with_config(opts, cfg)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // An error, for the journal too.
            let prefix = if journal { "<3>" } else { "" };
            eprintln!("{prefix}emberd: {}", supervisor::error_chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}
