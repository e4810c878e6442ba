//! `emberctl`: a Varlink client of `emberd` with a verb per request kind.
//!
//! Exit codes (also in `emberctl --help`): 0 success, 1 other failure (a
//! start or rollout that failed), 2 usage, 3 module or revision not found,
//! 4 invalid input (bad path, manifest or parameter; no rollout to act on),
//! 5 conflict (already installed, port in use, a rollout in progress),
//! 6 permission denied (by the socket file's mode or owner, a directory on
//! its path, or the daemon's allow list), 7 daemon unreachable (no socket,
//! nobody listening), 8 protocol error.

pub mod client;
mod commands;
mod events;
pub mod output;
mod release;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

pub use client::{Client, CtlError};

const EXIT_CODES: &str = "Exit codes: 0 success, 1 failure (including a start or rollout \
that failed), 2 usage, 3 module or revision not found, 4 invalid input (including no \
rollout to act on), 5 conflict (already installed, port in use, a rollout in progress), \
6 permission denied (socket file mode/owner, or the daemon's allow list), 7 daemon \
unreachable (no socket, nobody listening), 8 protocol error.";

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
    ///
    /// A bare `entry` (`libhello.so`) that is not next to the manifest is
    /// taken from cargo's build of it: `release/` or `debug/` (this
    /// emberctl's own profile first) of $CARGO_TARGET_DIR (or
    /// $CARGO_BUILD_TARGET_DIR), else of `build.target-dir` in a
    /// `.cargo/config.toml`, else of the cargo workspace's `target/`; the
    /// build picked is printed first.
    Install {
        /// Module directory or manifest file.
        path: PathBuf,
        /// Follow the module's start: print each state it enters until it
        /// settles: running (exit 0), or failed, crashloop or its first
        /// backoff (exit 1, with the reason).
        #[arg(long, short)]
        wait: bool,
    },
    /// Install a module, or roll it out to a new revision.
    ///
    /// Installs the module from its directory or module.toml if it is not
    /// installed; else rolls it out to a new revision: new replicas start
    /// beside the old ones, which drain once the new ones are ready (surge),
    /// or replicas are replaced in batches (rolling). The same artifact and
    /// manifest as the active revision change nothing.
    Deploy {
        /// Module directory or manifest file.
        path: PathBuf,
        /// How to roll out (flags override the manifest's [rollout]).
        #[command(flatten)]
        options: DeployOptions,
    },
    /// Roll a module back to an earlier revision.
    ///
    /// Goes back to a revision of the module's history (default: the one
    /// before the active one), rolled out the same way as by `deploy`.
    Rollback {
        /// Module name.
        name: String,
        /// The revision to go back to (see `emberctl history NAME`).
        #[arg(long, value_name = "REV")]
        to: Option<u64>,
        /// Follow the rollout: print a line per change of its phase or
        /// replica counts, then its outcome: completed (exit 0), or aborted
        /// or rolled-back (exit 1, with the reason).
        #[arg(long, short)]
        wait: bool,
    },
    /// List a module's revisions, newest first.
    ///
    /// Each with its version, artifact digest, when it was deployed, and its
    /// outcome: active, rolling-out, superseded, rolled-back, aborted or
    /// failed (with the reason).
    History {
        /// Module name.
        name: String,
    },
    /// Pause, resume or abort a module's rollout in progress, then show it.
    Rollout {
        /// What to do with the rollout.
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Stop a module and remove it (says so if it had to be killed at its
    /// stop deadline).
    Uninstall {
        /// Module name.
        name: String,
    },
    /// List installed modules, their revisions and rollouts.
    List {
        /// Keep the list on screen, redrawn each time something changes
        /// (fed by the event stream).
        #[arg(long, short)]
        watch: bool,
    },
    /// Show one module: state, revision, pid, restarts, last error, memory,
    /// CPU, limits, listeners, imports, rollout, replicas; without a name,
    /// every module as a table.
    Status {
        /// Module name (default: a table of every module).
        name: Option<String>,
        /// Keep it on screen, redrawn each time something changes (fed by
        /// the event stream, no polling): the table then leaves out CPU,
        /// PSS and uptime, and one module's view notes that its memory,
        /// CPU and time in state are as of the drawing.
        #[arg(long, short)]
        watch: bool,
    },
    /// Follow what happens: state changes (starts, crashes, restarts,
    /// back-off), installs, uninstalls, rollouts, pool and zygote events,
    /// one line each (with --json: one JSON object each) as they happen.
    ///
    /// Runs until interrupted; exits 1 if emberd drops it for falling
    /// behind (saying how many events it missed).
    Events {
        /// Only events about this module.
        name: Option<String>,
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
    Pool {
        /// Keep it on screen, redrawn each time something changes (fed by
        /// the event stream).
        #[arg(long, short)]
        watch: bool,
    },
    /// Show daemon health.
    Health,
    /// Write a module as an OCI image archive, for `ctr images import`.
    ///
    /// The image holds module.toml and the library its `entry` names
    /// (found as `install` finds it), at its root, with `entry` rewritten
    /// to the library's file name; the annotation `dev.ember.module =
    /// "module.toml"` says where the manifest is. Runs without emberd.
    Pack {
        /// Module directory or manifest file.
        path: PathBuf,
        /// The archive to write (default: NAME-VERSION.oci.tar here).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The image name (default: ember.local/NAME:VERSION).
        #[arg(long, value_name = "REF")]
        name: Option<String>,
    },
    /// Print a shell completion script.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// `deploy`'s flags.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DeployOptions {
    /// Follow the rollout: print a line per change of its phase or replica
    /// counts, then its outcome: completed, installed or unchanged (exit
    /// 0), or aborted or rolled-back (exit 1, with the reason).
    #[arg(long, short)]
    pub wait: bool,
    /// How the new revision replaces the running one.
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// Replicas that may run above the module's count during the rollout
    /// (default: all of them with surge, 1 with rolling).
    #[arg(long, value_name = "N")]
    pub max_surge: Option<u32>,
    /// Replicas that may be missing below the module's count during a
    /// rolling rollout (default 0).
    #[arg(long, value_name = "N")]
    pub max_unavailable: Option<u32>,
    /// Pause the rollout once N new replicas are ready, until `emberctl
    /// rollout resume NAME`.
    #[arg(long, value_name = "N")]
    pub pause_after: Option<u32>,
}

/// A rollout strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Start every new replica beside the old ones, then drain the old ones
    /// (the default).
    Surge,
    /// Replace replicas in batches bounded by --max-surge and
    /// --max-unavailable.
    Rolling,
}

impl Strategy {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Surge => "surge",
            Strategy::Rolling => "rolling",
        }
    }
}

/// `rollout`'s actions.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum RolloutAction {
    /// Hold the rollout where it is: no further replica is started or
    /// stopped.
    Pause {
        /// Module name.
        name: String,
    },
    /// Go on with a paused rollout (paused by `pause`, or by --pause-after).
    Resume {
        /// Module name.
        name: String,
    },
    /// Stop the new revision's replicas; the old revision keeps serving.
    ///
    /// Old replicas a rolling rollout had already stopped are started
    /// again.
    Abort {
        /// Module name.
        name: String,
    },
}

impl RolloutAction {
    /// The wire name of the action.
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutAction::Pause { .. } => "pause",
            RolloutAction::Resume { .. } => "resume",
            RolloutAction::Abort { .. } => "abort",
        }
    }

    /// The module acted on.
    pub fn name(&self) -> &str {
        match self {
            RolloutAction::Pause { name }
            | RolloutAction::Resume { name }
            | RolloutAction::Abort { name } => name,
        }
    }
}

/// Typed exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Any other failure (a start or a rollout that failed).
    Failure = 1,
    /// Bad command line (clap's own code).
    Usage = 2,
    /// No such module, or no such revision of it.
    NotFound = 3,
    /// Bad path, manifest or parameter; no rollout to act on.
    InvalidInput = 4,
    /// Already installed, port in use, a rollout in progress.
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
        Command::Pack {
            ref path,
            ref output,
            ref name,
        } => commands::pack(path, output.as_deref(), name.as_deref(), cli.json),
        _ => commands::run(&crate::paths::client_socket(cli.socket.clone()), &cli),
    };
    match result {
        Ok(()) | Err(CtlError::StdoutClosed) => ExitCode::Ok,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is closed too. The
            // cause chain too: `cannot reach emberd at …: Connection refused`.
            let _ = writeln!(std::io::stderr(), "emberctl: {}", crate::error_chain(&e));
            e.exit_code()
        }
    }
}

fn completions(shell: clap_complete::Shell) -> Result<(), CtlError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "emberctl", &mut script);
    output::Printer::new().print(&String::from_utf8_lossy(&script))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("emberctl").chain(args.iter().copied()))
    }

    #[test]
    fn deploy_flags() {
        let cli = parse(&["deploy", "examples/greeter"]).unwrap();
        let Command::Deploy { path, options } = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(path, PathBuf::from("examples/greeter"));
        assert_eq!(
            options,
            DeployOptions {
                wait: false,
                strategy: None,
                max_surge: None,
                max_unavailable: None,
                pause_after: None,
            }
        );
        let cli = parse(&[
            "deploy",
            "--wait",
            "m",
            "--strategy",
            "rolling",
            "--max-surge",
            "2",
            "--max-unavailable",
            "1",
            "--pause-after",
            "4",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Deploy { options, .. } = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            options,
            DeployOptions {
                wait: true,
                strategy: Some(Strategy::Rolling),
                max_surge: Some(2),
                max_unavailable: Some(1),
                pause_after: Some(4),
            }
        );
        let cli = parse(&["deploy", "-w", "m", "--strategy", "surge"]).unwrap();
        let Command::Deploy { options, .. } = cli.command else {
            panic!("{cli:?}")
        };
        assert!(options.wait);
        assert_eq!(options.strategy, Some(Strategy::Surge));
    }

    #[test]
    fn deploy_rejects_bad_flags() {
        for args in [
            &["deploy"][..],
            &["deploy", "m", "--strategy", "blue-green"],
            &["deploy", "m", "--max-surge", "-1"],
            &["deploy", "m", "--pause-after", "many"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), ExitCode::Usage as i32, "{args:?}: {e}");
        }
    }

    #[test]
    fn rollback_history_rollout() {
        let cli = parse(&["rollback", "greeter"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Rollback { ref name, to: None, wait: false } if name == "greeter"
        ));
        let cli = parse(&["rollback", "greeter", "--to", "2", "--wait"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Rollback {
                to: Some(2),
                wait: true,
                ..
            }
        ));
        assert!(parse(&["rollback", "greeter", "--to", "two"]).is_err());
        let cli = parse(&["history", "greeter"]).unwrap();
        assert!(matches!(cli.command, Command::History { ref name } if name == "greeter"));
        for (verb, wire) in [("pause", "pause"), ("resume", "resume"), ("abort", "abort")] {
            let cli = parse(&["rollout", verb, "greeter"]).unwrap();
            let Command::Rollout { action } = cli.command else {
                panic!("{cli:?}")
            };
            assert_eq!(action.as_str(), wire);
            assert_eq!(action.name(), "greeter");
        }
        assert!(parse(&["rollout", "restart", "greeter"]).is_err());
        assert!(parse(&["rollout", "pause"]).is_err());
    }

    #[test]
    fn help_and_completions_cover_the_new_verbs() {
        Cli::command().debug_assert();
        for verb in ["deploy", "rollback", "history", "rollout"] {
            let e = parse(&[verb, "--help"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{verb}");
        }
        let help = parse(&["deploy", "--help"]).unwrap_err().to_string();
        for flag in [
            "--wait",
            "--strategy",
            "--max-surge",
            "--max-unavailable",
            "--pause-after",
        ] {
            assert!(help.contains(flag), "{flag}: {help}");
        }
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "emberctl",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in ["deploy", "rollback", "history", "rollout", "--pause-after"] {
            assert!(script.contains(word), "{word}");
        }
    }
}
