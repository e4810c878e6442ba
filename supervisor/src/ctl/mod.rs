//! `emberctl`: a Varlink client of `emberd` with a verb per request kind.
//!
//! Exit codes (also in `emberctl --help`): 0 success, 1 other failure,
//! 2 usage, 3 module not found, 4 invalid input (bad path, manifest or
//! parameter), 5 conflict (already installed, port in use), 6 permission
//! denied (by the socket file's mode or owner, a directory on its path, or
//! the daemon's allow list), 7 daemon unreachable (no socket, nobody
//! listening), 8 protocol error.

pub mod client;
mod commands;
pub mod output;

use std::io::Write;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

pub use client::{Client, CtlError};

const EXIT_CODES: &str = "Exit codes: 0 success, 1 failure, 2 usage, 3 module not found, \
4 invalid input, 5 conflict (already installed, port in use), 6 permission denied \
(socket file mode/owner, or the daemon's allow list), 7 daemon unreachable (no socket, \
nobody listening), 8 protocol error.";

/// Drive the Ember supervisor.
#[derive(Debug, Parser)]
#[command(name = "emberctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Control socket (default: $EMBER_SOCKET if set and not empty, else
    /// the daemon's default).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print replies as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install a module from its directory or module.toml and start it.
    Install {
        /// Module directory or manifest file.
        path: PathBuf,
        /// Follow the module's start: print each state it enters until it
        /// settles: running (exit 0), or failed, crashloop or its first
        /// backoff (exit 1, with the reason).
        #[arg(long, short)]
        wait: bool,
    },
    /// Stop a module and remove it (says so if it had to be killed at its
    /// stop deadline).
    Uninstall {
        /// Module name.
        name: String,
    },
    /// List installed modules.
    List,
    /// Show one module: state, pid, restarts, last error, memory, CPU,
    /// limits, listeners, imports.
    Status {
        /// Module name.
        name: String,
    },
    /// Show a module's output.
    Logs {
        /// Module name.
        name: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many trailing lines.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: u32,
    },
    /// Show the warm pool.
    Pool,
    /// Show daemon health.
    Health,
    /// Print a shell completion script.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// Typed exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Any other failure.
    Failure = 1,
    /// Bad command line (clap's own code).
    Usage = 2,
    /// No such module.
    NotFound = 3,
    /// Bad path, manifest or parameter.
    InvalidInput = 4,
    /// Already installed, port in use.
    Conflict = 5,
    /// Refused by the socket file's mode or owner (or a directory on its
    /// path), or by the daemon's allow list.
    PermissionDenied = 6,
    /// No daemon answers on the socket.
    Unreachable = 7,
    /// The daemon's answer was not understood.
    Protocol = 8,
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Completions { shell } => completions(shell),
        _ => commands::run(&crate::paths::client_socket(cli.socket.clone()), &cli),
    };
    match result {
        Ok(()) | Err(CtlError::StdoutClosed) => ExitCode::Ok,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is closed too.
            let _ = writeln!(std::io::stderr(), "emberctl: {e}");
            e.exit_code()
        }
    }
}

fn completions(shell: clap_complete::Shell) -> Result<(), CtlError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "emberctl", &mut script);
    output::Printer::new().print(&String::from_utf8_lossy(&script))
}
