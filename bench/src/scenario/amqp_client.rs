//! E: Keelson on AMQP without HTTP: the load generator calls through
//! `keelson_protocol::client::Client` over the AMQP transport, straight to a
//! `logic-server` process.

use super::keelson_config::{SERVICE, logic_server, spec_with_config};
use super::{Deployment, Env, Load, Scenario};
use crate::broker::Objects;
use crate::procs::{Proc, Ready};
use async_trait::async_trait;

/// Configuration E.
#[derive(Debug)]
pub struct AmqpClient;

#[async_trait]
impl Scenario for AmqpClient {
    fn id(&self) -> &'static str {
        "E"
    }

    fn describe(&self) -> &'static str {
        "Keelson on AMQP without HTTP: Rust client API straight to a logic-server process"
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("B")
    }

    fn needs_broker(&self) -> bool {
        true
    }

    async fn deploy(&self, env: &Env) -> anyhow::Result<Deployment> {
        let spec = spec_with_config(
            env,
            "logic",
            "logic-server",
            "logic-server.toml",
            &logic_server(env),
            Ready::Line("logic server ready"),
        )?;
        let logic = Proc::start(spec, env.worker_threads, &env.dir).await?;
        Ok(Deployment {
            procs: vec![logic],
            load: Load::Keelson {
                namespace: env.namespace.clone(),
                handler: "echo".to_owned(),
            },
            broker_objects: Some(Objects::keelson(&env.namespace, &[SERVICE])),
        })
    }
}
