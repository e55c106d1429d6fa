//! Choosing a transport by configuration: one enum arm per implementation.

use super::Transport;
use super::TransportError;
#[cfg(feature = "amqp")]
use super::amqp::{AmqpConfig, AmqpTransport};
use super::memory::MemoryTransport;
use serde::Deserialize;
use std::sync::Arc;

/// The `[transport]` section of every Keelson configuration file.
///
/// ```toml
/// [transport]
/// kind = "memory"
/// ```
///
/// or, with the `amqp` feature, a RabbitMQ broker (see `AmqpConfig` for the keys):
///
/// ```toml
/// [transport]
/// kind = "amqp"
/// urls = ["amqp://keelson@127.0.0.1:5672/%2f"]
/// password_env = "KEELSON_BROKER_PASSWORD"
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
// Read once at start and moved into the transport: boxing the larger variant would
// buy nothing and make every `match` on a config clumsier.
#[allow(clippy::large_enum_variant)]
pub enum TransportConfig {
    /// In-process queues: gateway and logic server share one process.
    Memory(MemoryConfig),
    /// A RabbitMQ broker: the mesh across processes and machines.
    #[cfg(feature = "amqp")]
    Amqp(AmqpConfig),
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig::Memory(MemoryConfig::default())
    }
}

/// Settings of the in-memory transport.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {}

impl TransportConfig {
    /// Build the configured transport. `node_id` names this process to the broker.
    ///
    /// An AMQP transport is connected when this returns; if no broker answers, the
    /// error says why each URL failed.
    pub async fn build(&self, node_id: &str) -> Result<Arc<dyn Transport>, TransportError> {
        let _ = node_id;
        match self {
            TransportConfig::Memory(_) => Ok(Arc::new(MemoryTransport::new())),
            #[cfg(feature = "amqp")]
            TransportConfig::Amqp(config) => Ok(Arc::new(
                AmqpTransport::connect(config.clone(), node_id).await?,
            )),
        }
    }

    /// Short name of the transport kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            TransportConfig::Memory(_) => "memory",
            #[cfg(feature = "amqp")]
            TransportConfig::Amqp(_) => "amqp",
        }
    }
}
