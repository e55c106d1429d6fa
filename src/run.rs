//! Starting and stopping the parts of the mesh in this process.

use crate::admin::AdminListener;
use crate::settings::KeelsonConfig;
use anyhow::Context as _;
use keelson_logic_server::{
    Lifecycle, LogicServer, OperatorService, Phase, Registry, ReplicatedContextStore, RunningServer,
};
use keelson_protocol::Transport;
use keelson_ui_gateway::{Gateway, TokenVerifier};
use std::sync::Arc;

/// Which parts this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gateway and logic server together (the embedded mesh).
    Embedded,
    /// Only the HTTP gateway.
    Gateway,
    /// Only a logic server.
    LogicServer,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Embedded => "embedded",
            Role::Gateway => "gateway",
            Role::LogicServer => "logic",
        }
    }
}

/// A future that resolves when SIGINT or SIGTERM arrives. The handlers are
/// installed by this call (it must run inside the runtime), not when the future is
/// first polled: a signal that comes in between, while the process is still
/// starting, stops it gracefully instead of killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
                        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                    }
                }
                (Ok(mut term), Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch SIGINT; only SIGTERM stops this process");
                    term.recv().await;
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops this process");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Run `role` until `shutdown` resolves, then stop gracefully through the
/// process's [`Lifecycle`]: the gateway stops accepting and finishes open requests
/// (bounded; phase intake), the logic server drains and its plugins shut down
/// (drain), background work winds down, the transport closes (close).
pub async fn run(
    config: KeelsonConfig,
    role: Role,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node_id = config.node.id(role.name());
    // Before anything records: the parts resolve their metric handles when built.
    let render = crate::metrics::install();
    let transport = config
        .transport
        .build(&node_id)
        .await
        .with_context(|| format!("cannot start the {} transport", config.transport.kind()))?;
    tracing::info!(node = %node_id, transport = config.transport.kind(), role = role.name(), "starting");
    let watchdog = crate::systemd::spawn_watchdog();
    let lifecycle = Lifecycle::new();
    let closing = transport.clone();
    lifecycle.on_shutdown(Phase::Close, "transport", async move {
        closing.close().await;
    });

    if matches!(role, Role::Embedded | Role::LogicServer) {
        // Listening before the start, so that /readyz says "starting" during the join.
        let admin = match &config.logic_server.admin_listen {
            Some(addr) => Some(AdminListener::bind(addr, render.clone()).await?),
            None => None,
        };
        let admin_addr = match &admin {
            Some(admin) => Some(admin.local_addr()?),
            None => None,
        };
        let readiness = admin.as_ref().map(AdminListener::readiness);
        if let Some(admin) = admin {
            let task = tokio::spawn(admin.serve());
            // Stopped last, so that probes see the drain.
            lifecycle.on_shutdown(Phase::Close, "admin listener", async move {
                task.abort();
            });
        }
        if let Some(addr) = admin_addr {
            tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
        }
        let (server, operator) = start_logic_server(&config, &node_id, transport.clone()).await?;
        if let Some(readiness) = readiness {
            let _ = readiness.set(server.stats().clone());
        }
        // The admin address on the ready line, for scripts and tests (port 0).
        let admin_part = admin_addr
            .map(|a| format!(" admin=http://{a}"))
            .unwrap_or_default();
        if role == Role::LogicServer {
            println!(
                "keelson logic server ready: node={node_id} service={}{admin_part}",
                config.logic_server.service
            );
        } else if let Some(addr) = admin_addr {
            println!("Keelson admin endpoints (/metrics, /healthz, /readyz): admin=http://{addr}");
        }
        lifecycle.on_shutdown(Phase::Drain, "logic server", async move {
            drop(operator);
            // A second signal during the drain stops at once: what has not finished
            // goes back to the queue for a peer.
            server
                .shutdown_or_abort(async {
                    shutdown_signal().await;
                    tracing::warn!("second signal: stopping now");
                })
                .await;
        });
    }

    if matches!(role, Role::Embedded | Role::Gateway) {
        let verifier =
            TokenVerifier::from_config(&config.auth).context("cannot set up token verification")?;
        let mut gateway =
            Gateway::with_verifier(config.gateway.clone(), verifier, transport.clone());
        if let Some(render) = render.clone() {
            gateway = gateway.with_metrics(render);
        }
        let listener = gateway
            .bind()
            .await
            .with_context(|| format!("cannot listen on {}", config.gateway.listen))?;
        let addr = listener.local_addr().context("listener has no address")?;
        if role == Role::Embedded {
            print_banner(&addr.to_string(), &config.logic_server.handlers);
        } else {
            // One line on standard output that scripts and tests wait for.
            println!("keelson gateway listening on http://{addr}");
        }
        lifecycle.spawn(Phase::Intake, "gateway", move |stop| async move {
            if let Err(e) = gateway.serve(listener, stop.cancelled_owned()).await {
                tracing::warn!(error = %e, "gateway stopped with an error");
            }
        });
    }

    // Everything this role runs has started: the logic server consumes (after its
    // context join), the gateway listens.
    crate::systemd::ready(&format!("{} {node_id} ready", role.name()));
    shutdown.await;
    crate::systemd::stopping();
    lifecycle.shutdown().await;
    // The mesh stopped: no more "alive" for the service manager.
    drop(watchdog);
    tracing::info!("stopped");
    Ok(())
}

async fn start_logic_server(
    config: &KeelsonConfig,
    node_id: &str,
    transport: Arc<dyn Transport>,
) -> anyhow::Result<(RunningServer, Option<OperatorService>)> {
    let ls = &config.logic_server;
    let registry = Registry::build(&ls.handlers, &ls.handler_settings, &ls.plugins).await?;
    // Not ready before every context the peers hold is here.
    let store = ReplicatedContextStore::start_with(
        transport.clone(),
        node_id,
        ls.context.clone(),
        ls.trust_unstamped_requests,
    )
    .await
    .context("cannot join the context channel")?;
    // Operator requests (`keelson context get`) are an aid, not the server's job: a
    // broker that refuses their queue (a topology declared by an older `keelson
    // topology declare`) leaves the server serving without them. Started before the
    // server consumes, so that nothing stands between consuming and the ready line
    // (a request that kills the server may arrive at once).
    let operator = match OperatorService::start(ls, node_id, transport.clone(), store.clone()).await
    {
        Ok(operator) => Some(operator),
        Err(e) => {
            tracing::warn!(error = %e, "operator requests (keelson context get) are not answered by this server");
            None
        }
    };
    let server = LogicServer::new(ls.clone(), node_id, transport.clone(), registry, store)
        .with_version(crate::VERSION)
        .start()
        .await?;
    Ok((server, operator))
}

/// The first lines of the embedded mesh: where it listens, then requests to try
/// with the handlers the configuration enables (an application has its own).
fn print_banner(addr: &str, handlers: &[String]) {
    let enabled = |name: &str| handlers.iter().any(|h| h == name);
    let mut text = format!("Keelson embedded mesh listening on http://{addr}\n\n");
    if enabled("echo") {
        text.push_str(&format!(
            "Try:\n  curl -s -XPOST {addr}/api/echo -d '{{\"hi\":1}}'\n"
        ));
    } else if let Some(first) = handlers.first() {
        text.push_str(&format!(
            "Try:\n  curl -s -XPOST {addr}/api/{first} -d '{{}}'\n"
        ));
    } else {
        text.push_str("No handler is enabled: name some in logic_server.handlers.\n");
    }
    if enabled("counter.increment") {
        text.push_str(&format!(
            "  TOKEN=$(cargo run -q --release -- token --user alice)\n\
             \x20 curl -s -XPOST -H \"Authorization: Bearer $TOKEN\" {addr}/api/counter.increment\n"
        ));
    }
    text.push_str("\nStop with Ctrl-C.");
    println!("{text}");
}
