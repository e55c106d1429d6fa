//! `ui-gateway`: the HTTP gateway alone; logic servers run elsewhere.

use clap::Parser;
use keelson::run::{Role, run, shutdown_signal};
use keelson::settings::Source;
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc gives freed memory back to the system (a flood of connections leaves no
/// lasting resident size, unlike glibc's arenas) and is fast with many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keelson UI gateway: HTTP in, requests onto the transport, replies back.
#[derive(Debug, Parser)]
#[command(version, about)]
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
