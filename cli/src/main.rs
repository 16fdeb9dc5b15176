//! `keel`: the project template generator (`keel new`) and the benchmark harness (`keel bench`).
//!
//! Neither subcommand is implemented yet; each says so and exits with status 2 rather than
//! pretending to work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keel's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a new Keel service from a template.
    New {
        /// Name of the service (and of its folder).
        name: String,
    },
    /// Drive load at a Keel or raw endpoint and report throughput and latency.
    Bench,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let what = match cli.command {
        Command::New { .. } => "keel new",
        Command::Bench => "keel bench",
    };
    eprintln!("{what}: not implemented yet");
    ExitCode::from(2)
}
