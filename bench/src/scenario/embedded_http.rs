//! C: the Keelson embedded mesh (`keelson`, memory transport) through HTTP, `echo`.

use super::keelson_config::{embedded, spec_with_config};
use super::{Deployment, Env, Load, Scenario};
use crate::procs::{Proc, Ready};
use anyhow::Context as _;
use async_trait::async_trait;

/// Configuration C.
#[derive(Debug)]
pub struct EmbeddedHttp;

#[async_trait]
impl Scenario for EmbeddedHttp {
    fn id(&self) -> &'static str {
        "C"
    }

    fn describe(&self) -> &'static str {
        "Keelson embedded mesh (memory transport) through HTTP, echo handler"
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("A")
    }

    fn needs_broker(&self) -> bool {
        false
    }

    async fn deploy(&self, env: &Env) -> anyhow::Result<Deployment> {
        let spec = spec_with_config(
            env,
            "server",
            "keelson",
            "keelson.toml",
            &embedded(env),
            Ready::Listening,
        )?;
        let server = Proc::start(spec, env.worker_threads, &env.dir).await?;
        let url = format!(
            "{}/api/echo",
            server.url.as_deref().context("keelson gave no URL")?
        );
        Ok(Deployment {
            procs: vec![server],
            load: Load::Http { url },
            broker_objects: None,
        })
    }
}
