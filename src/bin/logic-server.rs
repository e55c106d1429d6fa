//! `logic-server`: a logic server alone, consuming its service's queue.

use clap::Parser;
use keelson::run::{Role, run, shutdown_signal};
use keelson::settings::Source;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc gives freed memory back to the system (a flood of connections leaves no
/// lasting resident size, unlike glibc's arenas) and is fast with many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keelson logic server: consumes requests, runs handler plugins, replies.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file, e.g. config/logic-server.toml.
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keelson::link_plugins();
    keelson::run_main(Source::File(cli.config), |config| {
        run(config, Role::LogicServer, shutdown_signal())
    })
}
