//! D: Keelson on AMQP through HTTP: a `ui-gateway` and a `logic-server` process on the
//! broker, `echo`.

use super::keelson_config::{SERVICE, gateway_spec, logic_server, spec_with_config};
use super::{Deployment, Env, Load, Scenario, stop_all};
use crate::broker::Objects;
use crate::procs::{Proc, Ready};
use anyhow::Context as _;
use async_trait::async_trait;

/// Configuration D.
#[derive(Debug)]
pub struct AmqpHttp;

#[async_trait]
impl Scenario for AmqpHttp {
    fn id(&self) -> &'static str {
        "D"
    }

    fn describe(&self) -> &'static str {
        "Keelson on AMQP through HTTP: ui-gateway + logic-server processes, echo handler"
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("B")
    }

    fn needs_broker(&self) -> bool {
        true
    }

    async fn deploy(&self, env: &Env) -> anyhow::Result<Deployment> {
        let objects = Objects::keelson(&env.namespace, &[SERVICE]);
        // The logic server first: it declares and binds the service queue the
        // gateway's requests are routed to.
        let logic = spec_with_config(
            env,
            "logic",
            "logic-server",
            "logic-server.toml",
            &logic_server(env),
            Ready::Line("logic server ready"),
        )?;
        let logic = Proc::start(logic, env.worker_threads, &env.dir).await?;
        let gateway = match gateway_spec(env) {
            Ok(spec) => Proc::start(spec, env.worker_threads, &env.dir).await,
            Err(e) => Err(e),
        };
        let gateway = match gateway {
            Ok(g) => g,
            Err(e) => {
                stop_all(vec![logic]).await;
                return Err(e);
            }
        };
        let url = format!(
            "{}/api/echo",
            gateway.url.as_deref().context("ui-gateway gave no URL")?
        );
        Ok(Deployment {
            procs: vec![logic, gateway],
            load: Load::Http { url },
            broker_objects: Some(objects),
        })
    }
}
