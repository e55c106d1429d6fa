//! The `keelson` command line, as a library function: [`main`] is the whole of
//! Keelson's own `keelson` binary, and of a user's application binary, whose `main`
//! is `fn main() -> std::process::ExitCode { keelson::main() }`. Either way every
//! subcommand serves the handlers of the plugin crates linked into that binary.
//!
//! This module is the one place of the library that plays `main`: it turns errors
//! into a message on standard error and an exit status (`anyhow`, as binaries do).

use crate::run::{Role, run, shutdown_signal};
use crate::settings::{self, KeelsonConfig, Source};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Keelson: a message-broker-driven service mesh.
///
/// Without a command, runs the embedded mesh: gateway and logic server in one
/// process over the transport of the configuration (in memory by default).
#[derive(Debug, Parser)]
#[command(version = crate::VERSION, about)]
struct Cli {
    /// Configuration file; default `keelson.toml` if the working directory has
    /// one, else `config/keelson.toml`, else a built-in copy of it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded mesh (the default).
    Run,
    /// Run the HTTP gateway alone, as the `ui-gateway` binary does.
    ///
    /// Logic servers run elsewhere. Needs --config, e.g. config/gateway.toml.
    UiGateway,
    /// Run a logic server alone, as the `logic-server` binary does.
    ///
    /// It consumes its service's queue. Needs --config, e.g.
    /// config/logic-server.toml.
    LogicServer,
    /// Create an application: a cargo package in DIR whose binary is this command
    /// line with its own handlers, depending on Keelson by path.
    New(crate::scaffold::NewArgs),
    /// Print a bearer token for USER that the configured gateway accepts.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds; default `auth.token_ttl_s`.
        #[arg(long)]
        ttl_s: Option<u64>,
    },
    /// List the handlers linked into this binary, marking those the configuration
    /// enables.
    ///
    /// Handlers the configuration enables that no linked plugin offers are listed
    /// as missing, and the exit status is then 1: a logic server would refuse to
    /// start with that configuration.
    Handlers,
    /// Inspect the dead-letter queue of the configuration's transport, and re-drive
    /// dead requests.
    ///
    /// On `kind = "memory"` the queue is this command's own, and empty: another
    /// process's in-memory queues cannot be reached.
    Dlq(crate::dlq::DlqArgs),
    /// Declare the broker topology the processes use, with the operator's broker user,
    /// so that they can run with `declare_topology = false` (least privilege).
    Topology(crate::topology::TopologyArgs),
    /// Print the logic servers of the cluster the configuration's transport reaches,
    /// from their heartbeats, then the leases they hold and the schedules they fire.
    Status {
        /// How long to listen for heartbeats, in milliseconds.
        #[arg(long, default_value_t = 2500)]
        listen_ms: u64,
        /// Print JSON (the array of nodes, leases and schedules inside each) instead
        /// of the tables.
        #[arg(long)]
        json: bool,
        /// Exit with status 3 unless this node is up (ready and taking requests):
        /// what an upgrade script waits for.
        #[arg(long, value_name = "NODE")]
        expect_up: Option<String>,
    },
    /// Print the cluster's schedules, from the logic servers' heartbeats: pattern,
    /// time zone, handler, last and next slot (RFC 3339 UTC), and the leader that
    /// fires them (the holder of the `scheduler` lease; none: nothing fires).
    Schedules {
        /// How long to listen for heartbeats, in milliseconds.
        #[arg(long, default_value_t = 2500)]
        listen_ms: u64,
        /// Print JSON (the `schedules` array of a gateway's `GET /cluster`) instead
        /// of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration completely without connecting to anything: keys,
    /// types, log level, the handler list against the handlers linked into this
    /// binary, handlers' and plugins' settings. Exit status 1 when it has problems.
    Check,
    /// Call a handler and print the status and the body: through a gateway
    /// (--gateway URL), or straight over the configuration's transport. Exit status
    /// 1 on an error status.
    Call(crate::call::CallArgs),
    /// Read users' replicated contexts (answered by any logic server).
    Context(crate::context_get::ContextArgs),
    /// List, show or cancel background jobs (answered by any logic server).
    Jobs(crate::jobs_cli::JobsArgs),
    /// Print a shell completion script for SHELL to standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output, e.g. `keelson man | man -l -`.
    Man,
}

/// The `keelson` command line: parse the arguments, run the subcommand, and turn an
/// error into a message on standard error and a non-zero exit status.
///
/// `--help` and `--version` name the running binary (a user's application is not
/// called `keelson`); `--version` prints Keelson's version.
pub fn main() -> ExitCode {
    let name = binary_name();
    let command = Cli::command()
        .bin_name(name.clone())
        .display_name(name.clone());
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    report(&name, execute(cli))
}

/// The `main` of the single-role binaries `ui-gateway` and `logic-server`: their
/// command line (`--config FILE`), then [`run`] of `role` until SIGINT or SIGTERM.
pub fn role_main(role: Role) -> ExitCode {
    /// The configuration file (required).
    #[derive(Debug, Parser)]
    #[command(version = crate::VERSION)]
    struct RoleCli {
        #[arg(long, short)]
        config: PathBuf,
    }

    let (about, example) = match role {
        Role::Gateway => (
            "Keelson UI gateway: HTTP in, requests onto the transport, replies back.",
            "Configuration file, e.g. config/gateway.toml.",
        ),
        Role::LogicServer => (
            "Keelson logic server: consumes requests, runs handler plugins, replies.",
            "Configuration file, e.g. config/logic-server.toml.",
        ),
        Role::Embedded => (
            "Keelson embedded mesh: gateway and logic server in one process.",
            "Configuration file, e.g. config/keelson.toml.",
        ),
    };
    let name = binary_name();
    let command = RoleCli::command()
        .bin_name(name.clone())
        .display_name(name.clone())
        .about(about)
        .mut_arg("config", |arg| arg.help(example));
    let cli = match RoleCli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    report(
        &name,
        serve(role, &Source::File(cli.config)).map(|()| ExitCode::SUCCESS),
    )
}

/// The file name this process was started as (`keelson`, `ui-gateway`, a user's
/// application), for `--help`, `--version` and error messages.
fn binary_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|path| path.file_name().map(OsString::from))
        .map(|file| {
            let file = file.to_string_lossy();
            file.strip_suffix(std::env::consts::EXE_SUFFIX)
                .filter(|stem| !stem.is_empty())
                .unwrap_or(&file)
                .to_owned()
        })
        .unwrap_or_else(|| "keelson".to_owned())
}

fn report(name: &str, outcome: anyhow::Result<ExitCode>) -> ExitCode {
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run the subcommand of `cli`.
fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = cli.command.unwrap_or(Command::Run);
    // The single-role subcommands take no default: the embedded configuration would
    // start a gateway or logic server alone on the in-memory transport, which
    // reaches nothing.
    let needs_file = match command {
        Command::UiGateway => Some(("ui-gateway", "config/gateway.toml")),
        Command::LogicServer => Some(("logic-server", "config/logic-server.toml")),
        _ => None,
    };
    let source = match (needs_file, cli.config) {
        (Some((subcommand, example)), None) => {
            anyhow::bail!("`{subcommand}` needs --config FILE (e.g. {example})")
        }
        (_, explicit) => Source::resolve(explicit),
    };
    match command {
        Command::Check => {
            if !crate::check::run(&source) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Call(args) => {
            let config = settings::load(&source)?;
            let runtime = tokio::runtime::Runtime::new()?;
            let answer = runtime.block_on(crate::call::run(&config, &args))?;
            println!("{}", answer.render());
            if !answer.is_success() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Context(args) => {
            let config = settings::load(&source)?;
            let runtime = tokio::runtime::Runtime::new()?;
            println!(
                "{}",
                runtime.block_on(crate::context_get::run(&config, &args))?
            );
        }
        Command::Jobs(args) => {
            let config = settings::load(&source)?;
            let runtime = tokio::runtime::Runtime::new()?;
            let out = runtime.block_on(crate::jobs_cli::run(&config, &args))?;
            if !out.is_empty() {
                println!("{out}");
            }
        }
        Command::Completions { shell } => {
            let name = binary_name();
            let mut command = Cli::command().bin_name(name.clone());
            clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
        }
        Command::Man => {
            let name = binary_name();
            let command = Cli::command().display_name(name.clone()).bin_name(name);
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        }
        Command::New(args) => println!("{}", crate::scaffold::create(&args)?),
        Command::Run => serve(Role::Embedded, &source)?,
        Command::UiGateway => serve(Role::Gateway, &source)?,
        Command::LogicServer => serve(Role::LogicServer, &source)?,
        Command::Token { user, ttl_s } => {
            let config = settings::load(&source)?;
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
            let heard = hear_cluster(&source, listen_ms)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&heard.nodes)?);
            } else {
                print!("{}", crate::status::render(&heard));
            }
            if let Some(node) = expect_up {
                let up = heard.nodes.iter().any(|n| {
                    n.heartbeat.node == node && n.state == keelson_protocol::control::NodeState::Up
                });
                if !up {
                    eprintln!("keelson status: node {node} is not up");
                    return Ok(ExitCode::from(3));
                }
            }
        }
        Command::Schedules { listen_ms, json } => {
            let heard = hear_cluster(&source, listen_ms)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&heard.schedules)?);
            } else {
                print!("{}", crate::status::render_schedules(&heard.schedules));
            }
        }
        Command::Dlq(args) => {
            let config = settings::load(&source)?;
            let runtime = tokio::runtime::Runtime::new()?;
            return Ok(runtime.block_on(crate::dlq::run(&config, args))?);
        }
        Command::Topology(args) => {
            let config = settings::load(&source)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(crate::topology::run(&config, args))?;
        }
        Command::Handlers => {
            let config = settings::load(&source)?;
            let linked: Vec<_> = keelson_logic_server::Registry::available()
                .into_values()
                .map(|plugin| crate::handler_list::Linked {
                    name: plugin.name,
                    description: plugin.description,
                })
                .collect();
            let listing = crate::handler_list::render(
                &linked,
                &config.logic_server.handlers,
                &source.describe(),
            );
            print!("{}", listing.text);
            if !listing.missing.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Load the configuration, set up logging, and run `role` until SIGINT or SIGTERM.
/// What `keelson status` and `keelson schedules` print: the heartbeats heard on the
/// transport of `source` for `listen_ms`.
fn hear_cluster(source: &Source, listen_ms: u64) -> anyhow::Result<crate::status::Heard> {
    let config = settings::load(source)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(crate::status::collect(
        &config,
        Duration::from_millis(listen_ms),
    ))
}

fn serve(role: Role, source: &Source) -> anyhow::Result<()> {
    let config: KeelsonConfig = settings::load(source)?;
    let runtime = tokio::runtime::Runtime::new()?;
    // Inside the runtime: a trace exporter runs on it.
    let traces = {
        let _runtime = runtime.enter();
        let service = match role {
            Role::Embedded => "keelson",
            Role::Gateway => "keelson-gateway",
            Role::LogicServer => "keelson-logic-server",
        };
        crate::telemetry::init_with_traces(&config.log, &config.telemetry, service)
            .map_err(|e| anyhow::anyhow!("{}: {e}", source.describe()))?
    };
    match source {
        Source::File(path) => tracing::info!("configuration: {}", path.display()),
        Source::Builtin => tracing::info!(
            "no {} or {} in {}; using the built-in copy of {}",
            settings::LOCAL_CONFIG,
            settings::DEFAULT_CONFIG,
            std::env::current_dir()
                .as_deref()
                .unwrap_or(Path::new("."))
                .display(),
            settings::DEFAULT_CONFIG
        ),
    }
    let outcome = runtime
        // The signal handlers are installed first thing, before the transport
        // connects: a SIGTERM during start-up stops the process gracefully.
        .block_on(async {
            let stop = shutdown_signal();
            run(config, role, stop).await
        });
    traces.shutdown();
    outcome.map_err(|e| {
        // Handlers and plugins read their settings at start, after the file
        // loaded: a mistake there names the file too.
        let settings = e
            .downcast_ref::<keelson_logic_server::PluginError>()
            .is_some_and(|p| !matches!(p, keelson_logic_server::PluginError::Setup { .. }));
        if settings {
            e.context(source.describe())
        } else {
            e
        }
    })
}
