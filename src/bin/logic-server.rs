//! `logic-server`: a logic server alone, consuming its service's queue.

use clap::Parser;
use keelson::run::{Role, run, shutdown_signal};
use keelson::settings::Source;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc, with its background threads: memory freed (after a flood of
/// connections, say) goes back to the system within seconds, without waiting for
/// more allocations, where glibc's arenas keep it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keelson logic server: consumes requests, runs handler plugins, replies.
#[derive(Debug, Parser)]
#[command(name = "logic-server", version)]
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
