//! meshctl command logic (the binary in `src/bin/meshctl.rs` only parses and calls `run`).

use std::io::Write;

use clap::{Parser, Subcommand};

/// meshctl: run and inspect a meshd mesh.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// meshctl subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a whole mesh on this machine (etcd, apiserver and agent per cluster).
    Up {
        /// Number of clusters.
        #[arg(long, default_value_t = 2)]
        clusters: u16,
    },
    /// Print the version.
    Version,
}

/// What went wrong running a command.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command is not built yet.
    #[error("`meshctl {0}` is not implemented yet (tracked in the meshctl issue)")]
    NotYet(&'static str),
    /// Writing output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs a parsed command, writing its output to `out`.
pub fn run(cli: &Cli, out: &mut impl Write) -> Result<(), CtlError> {
    match &cli.command {
        Command::Up { .. } => Err(CtlError::NotYet("up")),
        Command::Version => {
            writeln!(out, "meshctl {}", env!("CARGO_PKG_VERSION"))?;
            Ok(())
        }
    }
}
