//! `keelson`: runs the embedded mesh, and the operator commands.

use clap::{Parser, Subcommand};
use keelson::run::{Role, run, shutdown_signal};
use keelson::settings::{self, Source};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// jemalloc, with its background threads: memory freed (after a flood of
/// connections, say) goes back to the system within seconds, without waiting for
/// more allocations, where glibc's arenas keep it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keelson: a message-broker-driven service mesh.
///
/// Without a command, runs the embedded mesh: gateway and logic server in one
/// process over the transport of the configuration (in memory by default).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file; default config/keelson.toml.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded mesh (the default).
    Run,
    /// Print a bearer token for USER that the configured gateway accepts.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds; default `auth.token_ttl_s`.
        #[arg(long)]
        ttl_s: Option<u64>,
    },
    /// List the handlers linked into this binary.
    Handlers,
    /// Inspect the dead-letter queue of the configuration's transport, and re-drive
    /// dead requests.
    ///
    /// On `kind = "memory"` the queue is this command's own, and empty: another
    /// process's in-memory queues cannot be reached.
    Dlq(keelson::dlq::DlqArgs),
    /// Declare the broker topology the processes use, with the operator's broker user,
    /// so that they can run with `declare_topology = false` (least privilege).
    Topology(keelson::topology::TopologyArgs),
    /// Print the logic servers of the cluster the configuration's transport reaches,
    /// from their heartbeats.
    Status {
        /// How long to listen for heartbeats, in milliseconds.
        #[arg(long, default_value_t = 2500)]
        listen_ms: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Exit with status 3 unless this node is up (ready and taking requests):
        /// what an upgrade script waits for.
        #[arg(long, value_name = "NODE")]
        expect_up: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keelson: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    keelson::link_plugins();
    let source = Source::resolve(cli.config);
    let config = settings::load(&source)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            keelson::telemetry::init(&config.log);
            if matches!(source, Source::Builtin) {
                tracing::info!(
                    "{} not found; using the built-in copy",
                    settings::DEFAULT_CONFIG
                );
            }
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(run(config, Role::Embedded, shutdown_signal()))?;
        }
        Command::Token { user, ttl_s } => {
            let secret = config.auth.load_secret()?;
            let ttl = Duration::from_secs(ttl_s.unwrap_or(config.auth.token_ttl_s));
            let token = keelson_ui_gateway::issue_token_for(&config.auth, &secret, &user, ttl)?;
            println!("{token}");
        }
        Command::Status {
            listen_ms,
            json,
            expect_up,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            let nodes = runtime.block_on(keelson::status::collect(
                &config,
                Duration::from_millis(listen_ms),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", keelson::status::render(&nodes));
            }
            if let Some(node) = expect_up {
                let up = nodes.iter().any(|n| {
                    n.heartbeat.node == node && n.state == keelson_protocol::control::NodeState::Up
                });
                if !up {
                    eprintln!("keelson status: node {node} is not up");
                    return Ok(ExitCode::from(3));
                }
            }
        }
        Command::Dlq(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            return Ok(runtime.block_on(keelson::dlq::run(&config, args))?);
        }
        Command::Topology(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(keelson::topology::run(&config, args))?;
        }
        Command::Handlers => {
            for (name, plugin) in keelson_logic_server::Registry::available() {
                println!("{name:24} {}", plugin.description);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
