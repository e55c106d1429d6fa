//! Keelson client target (configuration E): `keelson_protocol::client::Client` over
//! the AMQP transport, straight to a logic server, no HTTP.

use super::Target;
use anyhow::Context as _;
use bytes::Bytes;
use keelson_protocol::client::Client;
use keelson_protocol::{ReplyStatus, TransportConfig};
use std::time::Duration;

/// Calls one handler through the Rust client API.
#[derive(Debug)]
pub struct KeelsonCall {
    client: Client,
    handler: String,
    body: Bytes,
    timeout: Duration,
}

impl KeelsonCall {
    /// Build the AMQP transport on `url` in `namespace`, as a `[transport]` section with
    /// `kind = "amqp"` would.
    pub async fn new(
        url: &str,
        namespace: &str,
        handler: &str,
        body: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let config: TransportConfig = serde_json::from_value(serde_json::json!({
            "kind": "amqp",
            "urls": [url],
            "namespace": namespace,
        }))
        .context(
            "cannot configure the AMQP transport (is keelson-protocol's amqp transport built?)",
        )?;
        let transport = config
            .build(&format!("bench-load-{}", std::process::id()))
            .await
            .context("cannot start the AMQP transport")?;
        Ok(Self {
            client: Client::new(transport),
            handler: handler.to_owned(),
            body,
            timeout,
        })
    }
}

impl Target for KeelsonCall {
    type Conn = ();

    async fn connect(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn call(&self, _: &mut ()) -> Result<(), String> {
        let reply = self
            .client
            .call(&self.handler, self.body.to_vec(), None, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        if reply.status != ReplyStatus::Ok {
            return Err(format!(
                "reply status {:?}: {:?}",
                reply.status, reply.error
            ));
        }
        if reply.body != self.body {
            return Err(format!(
                "the reply is not the echoed body ({} bytes instead of {})",
                reply.body.len(),
                self.body.len()
            ));
        }
        Ok(())
    }
}
