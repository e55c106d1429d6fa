//! A: raw axum, the HTTP limit. `bench-axum` echoes the body of `POST /api/echo`.

use super::{Deployment, Env, Load, Scenario};
use crate::procs::{Proc, Ready, Spec};
use anyhow::Context as _;
use async_trait::async_trait;

/// Configuration A.
#[derive(Debug)]
pub struct RawAxum;

#[async_trait]
impl Scenario for RawAxum {
    fn id(&self) -> &'static str {
        "A"
    }

    fn describe(&self) -> &'static str {
        "raw axum echo server over HTTP (the HTTP limit)"
    }

    fn needs_broker(&self) -> bool {
        false
    }

    async fn deploy(&self, env: &Env) -> anyhow::Result<Deployment> {
        let spec = Spec::new(
            "server",
            env.bin("bench-axum"),
            ["--listen", "127.0.0.1:0"],
            Ready::Listening,
        );
        let server = Proc::start(spec, env.worker_threads, &env.dir).await?;
        let url = format!(
            "{}/api/echo",
            server.url.as_deref().context("bench-axum gave no URL")?
        );
        Ok(Deployment {
            procs: vec![server],
            load: Load::Http { url },
            broker_objects: None,
        })
    }
}
