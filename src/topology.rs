//! `keelson topology declare`: the operator's one-time step of a least-privilege
//! deployment. It declares everything the processes of a namespace use (exchanges,
//! the dead-letter queue and its bindings, the service queues with the arguments
//! their logic servers would give them, the broadcast exchanges), so that gateways
//! and logic servers can run with `declare_topology = false` and no configure right
//! on any of it (`protocol/TOPOLOGY.md`, "Broker users and permissions").

use crate::settings::KeelsonConfig;
use anyhow::{Context as _, bail};
use keelson_protocol::TransportConfig;
use keelson_protocol::context::{CONTEXT_CHANNEL, SNAPSHOT_SERVICE};
use keelson_protocol::control::CONTROL_CHANNEL;
use keelson_protocol::transport::{AmqpConfig, AmqpTransport, Transport};

/// `keelson topology`: manage the broker topology of the configuration's namespace.
#[derive(Debug, clap::Args)]
pub struct TopologyArgs {
    #[command(subcommand)]
    pub action: TopologyAction,
}

/// What to do with the topology.
#[derive(Debug, clap::Subcommand)]
pub enum TopologyAction {
    /// Declare the namespace's exchanges and queues, creating what is missing
    /// (idempotent), with the configuration's broker user (the operator's).
    ///
    /// Declares the request and dead-letter exchanges, the dead-letter queue, the
    /// broadcast exchanges, the context-snapshot, operator and job-request queues,
    /// and the queues (requests, jobs, job watches) of the configuration's
    /// `[logic_server] service` and of every `--service`, with the
    /// `[transport]` settings' queue arguments (`queue_type`, `delivery_limit`,
    /// `queue_expires_ms`): use the logic servers' values. Logic servers bind their
    /// own routes. `declare_topology` in the file is ignored here.
    Declare {
        /// Another service whose queue to declare (repeatable).
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
    },
}

/// Run `keelson topology`; prints what it declared.
pub async fn run(config: &KeelsonConfig, args: TopologyArgs) -> anyhow::Result<()> {
    let TopologyAction::Declare { services: extra } = args.action;
    let TransportConfig::Amqp(amqp) = &config.transport else {
        bail!(
            "keelson topology declare needs `kind = \"amqp\"` in [transport]: the memory transport has no broker topology"
        );
    };
    let mut services = vec![config.logic_server.service.clone()];
    services.extend(extra);
    // Each service's job and job-watch queues (background jobs).
    let job_queues: Vec<String> = services
        .iter()
        .flat_map(|s| {
            [
                keelson_protocol::job::jobs_service(s),
                keelson_protocol::job::watches_service(s),
            ]
        })
        .collect();
    services.extend(job_queues);
    services.push(SNAPSHOT_SERVICE.to_owned());
    services.push(keelson_protocol::operator::OPERATOR_SERVICE.to_owned());
    services.push(keelson_protocol::job::JOBS_SERVICE.to_owned());
    let mut seen = std::collections::BTreeSet::new();
    services.retain(|s| seen.insert(s.clone()));
    // Declaring is the point, whatever the processes' setting.
    let amqp = AmqpConfig {
        declare_topology: true,
        ..amqp.clone()
    };
    let node = format!("topology-{}", std::process::id());
    let transport = AmqpTransport::connect(amqp, &node)
        .await
        .context("cannot connect the amqp transport")?;
    let declared = transport
        .declare_topology(&services, &[CONTROL_CHANNEL, CONTEXT_CHANNEL])
        .await;
    transport.close().await;
    let declared = declared.with_context(|| {
        format!(
            "cannot declare the topology of namespace `{}` (the operator's broker user needs configure, write and read on it)",
            transport.namespace()
        )
    })?;
    for name in declared {
        println!("declared {name}");
    }
    Ok(())
}
