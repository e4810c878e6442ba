//! `emberctl`: drive the Ember supervisor over its control socket.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = supervisor::ctl::Cli::parse();
    std::process::ExitCode::from(supervisor::ctl::run(cli) as u8)
}
