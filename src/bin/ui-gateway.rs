//! `ui-gateway`: the HTTP gateway alone; logic servers run elsewhere.

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

/// Keelson UI gateway: HTTP in, requests onto the transport, replies back.
#[derive(Debug, Parser)]
#[command(name = "ui-gateway", version)]
struct Cli {
    /// Configuration file, e.g. config/gateway.toml.
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keelson::run_main(Source::File(cli.config), |config| {
        run(config, Role::Gateway, shutdown_signal())
    })
}
