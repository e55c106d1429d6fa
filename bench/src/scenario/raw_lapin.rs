//! B: raw lapin RPC, the broker-bound limit. `bench-lapin-server` consumes a queue
//! bound to a direct exchange (Keelson's topology) and answers each delivery from a
//! task of its own; the load generator publishes with direct reply-to.

use super::{Deployment, Env, Load, Scenario};
use crate::broker::Objects;
use crate::procs::{Proc, Ready, Spec};
use async_trait::async_trait;

/// Configuration B.
#[derive(Debug)]
pub struct RawLapin;

#[async_trait]
impl Scenario for RawLapin {
    fn id(&self) -> &'static str {
        "B"
    }

    fn describe(&self) -> &'static str {
        "raw lapin RPC with direct reply-to, a task per delivery (the broker-bound limit)"
    }

    fn needs_broker(&self) -> bool {
        true
    }

    async fn deploy(&self, env: &Env) -> anyhow::Result<Deployment> {
        let exchange = format!("{}.requests", env.namespace);
        let queue = format!("{}.svc.bench", env.namespace);
        let routing_key = "echo".to_owned();
        let spec = Spec::new(
            "server",
            env.bin("bench-lapin-server"),
            [
                "--amqp-url",
                &env.amqp_url,
                "--exchange",
                &exchange,
                "--queue",
                &queue,
                "--routing-key",
                &routing_key,
                "--prefetch",
                &env.prefetch.to_string(),
            ],
            Ready::Line("bench lapin server ready"),
        );
        let server = Proc::start(spec, env.worker_threads, &env.dir).await?;
        Ok(Deployment {
            procs: vec![server],
            load: Load::Lapin {
                exchange: exchange.clone(),
                routing_key,
            },
            broker_objects: Some(Objects {
                queues: vec![queue],
                exchanges: vec![exchange],
            }),
        })
    }
}
