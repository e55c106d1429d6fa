//! Settings of the AMQP transport: the `[transport]` section with `kind = "amqp"`.
//!
//! Credentials never need to be in a TOML file: `password_env` names an environment
//! variable whose value replaces the password of every URL. Every URL that reaches a
//! log is redacted first ([`redact`]).

use super::super::TransportError;
use lapin::uri::AMQPUri;
use serde::Deserialize;
use std::time::Duration;

/// Settings of the AMQP transport (RabbitMQ).
///
/// ```toml
/// [transport]
/// kind = "amqp"
/// urls = ["amqp://keelson@broker-a:5672/%2f", "amqp://keelson@broker-b:5672/%2f"]
/// password_env = "KEELSON_BROKER_PASSWORD"
/// namespace = "keelson"
/// queue_type = "quorum"
/// delivery_limit = 5
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URLs (`amqp://user:password@host:port/vhost`; `amqps://` needs the `tls`
    /// cargo feature), tried in order at start; on connection loss the next one is
    /// tried first. The vhost is URL-encoded: `%2f` is the default vhost `/`.
    pub urls: Vec<String>,
    /// Name of an environment variable whose value replaces the password of every URL,
    /// so that committed files hold no secret. Unset: the passwords in the URLs are used.
    pub password_env: Option<String>,
    /// Prefix of every exchange and queue name (`{namespace}.requests`, ...), so that
    /// separate meshes, and parallel tests, can share one broker and vhost.
    pub namespace: String,
    /// AMQP heartbeat interval in seconds: a dead broker socket is noticed after about
    /// two missed heartbeats. 0 disables heartbeats (not recommended).
    pub heartbeat_s: u16,
    /// Largest AMQP frame, in bytes (the broker's default is 128 KiB). The client
    /// keeps I/O buffers of 32 frames each way, so this sets most of an idle process's
    /// memory; larger messages are simply split into more frames.
    pub frame_max: u32,
    /// Type of the service and dead-letter queues: `classic` or `quorum` (replicated,
    /// counts deliveries, needs a cluster of three nodes to be worth it).
    pub queue_type: QueueType,
    /// Quorum queues only: a message delivered this many times without being settled
    /// (its consumers crashed or requeued it) is moved to the dead-letter queue
    /// (`x-delivery-limit`). Unset: no limit.
    pub delivery_limit: Option<u32>,
    /// Delete a service queue after it has had no consumer for this many milliseconds
    /// (`x-expires`), for ephemeral meshes and tests. Unset: queues live until deleted.
    pub queue_expires_ms: Option<u64>,
    /// How long one connection attempt to one URL may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// First delay before trying the URLs again after a round in which none answered,
    /// in milliseconds; it doubles after each failed round.
    pub reconnect_min_ms: u64,
    /// Longest delay between two rounds of connection attempts, in milliseconds.
    pub reconnect_max_ms: u64,
}

/// The RabbitMQ queue type of the service and dead-letter queues (`x-queue-type`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// A classic queue on one node.
    #[default]
    Classic,
    /// A replicated quorum queue (Raft); supports a delivery limit.
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            urls: vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()],
            password_env: None,
            namespace: "keelson".to_owned(),
            heartbeat_s: 5,
            frame_max: 16 * 1024,
            queue_type: QueueType::Classic,
            delivery_limit: None,
            queue_expires_ms: None,
            connect_timeout_ms: 5_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
        }
    }
}

/// One broker URL, parsed, with the password substituted, and its redacted form for
/// logs.
#[derive(Clone)]
pub(crate) struct BrokerUrl {
    pub(crate) uri: AMQPUri,
    pub(crate) redacted: String,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the parsed URI: it holds the password.
        f.write_str(&self.redacted)
    }
}

impl AmqpConfig {
    /// Check the settings and resolve the broker URLs (password from the environment,
    /// heartbeat and connect timeout applied).
    pub(crate) fn brokers(&self) -> Result<Vec<BrokerUrl>, TransportError> {
        let invalid = |what: String| {
            TransportError::Refused(format!("invalid [transport] settings for amqp: {what}"))
        };
        if self.urls.is_empty() {
            return Err(invalid("`urls` is empty: name at least one broker".into()));
        }
        if self.frame_max < 4096 {
            return Err(invalid(format!(
                "`frame_max` must be at least 4096 bytes (the AMQP minimum), got {}",
                self.frame_max
            )));
        }
        if self.namespace.is_empty() || self.namespace.len() > 100 {
            return Err(invalid(format!(
                "`namespace` must be 1 to 100 bytes long, got {:?}",
                self.namespace
            )));
        }
        if self.delivery_limit.is_some() && self.queue_type != QueueType::Quorum {
            return Err(invalid(
                "`delivery_limit` needs `queue_type = \"quorum\"` (classic queues do not \
                 count deliveries)"
                    .into(),
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(invalid(format!(
                "`reconnect_min_ms` ({}) must be at least 1 and at most `reconnect_max_ms` ({})",
                self.reconnect_min_ms, self.reconnect_max_ms
            )));
        }
        if self.connect_timeout_ms == 0 {
            return Err(invalid("`connect_timeout_ms` must be at least 1".into()));
        }
        let password = match &self.password_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                invalid(format!(
                    "`password_env` names the environment variable {var}, which is not set \
                     (or not valid UTF-8)"
                ))
            })?),
        };
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let redacted = redact(url);
                let mut uri: AMQPUri = url.parse().map_err(|e| {
                    invalid(format!("`urls[{i}]` ({redacted}) is not an AMQP URL: {e}"))
                })?;
                if let Some(password) = &password {
                    uri.authority.userinfo.password.clone_from(password);
                }
                uri.query.heartbeat = Some(self.heartbeat_s);
                // A URL's own `frame_max` wins over the setting.
                if uri.query.frame_max.is_none() {
                    uri.query.frame_max = Some(self.frame_max);
                }
                uri.query.connection_timeout = Some(self.connect_timeout_ms);
                Ok(BrokerUrl { uri, redacted })
            })
            .collect()
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The delays between rounds of connection attempts: exponential, with jitter.
    pub(crate) fn backoff(&self) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.reconnect_min_ms))
            .with_max_delay(Duration::from_millis(self.reconnect_max_ms))
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// `url` with its password replaced by `***`, fit for a log line.
///
/// Everything between `://` and the last `@` before the query is user information;
/// only the user name is kept. Works on malformed URLs too (never panics).
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let before_query = rest.find('?').unwrap_or(rest.len());
    let Some(at) = rest[..before_query].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => userinfo.to_owned(),
    };
    format!("{}{}{}", &url[..rest_start], user, &rest[at..])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://a:b/c@d@h:1/v?x=@"), "amqp://a:***@h:1/v?x=@");
        assert_eq!(redact("amqp://h:1/%2f"), "amqp://h:1/%2f");
        assert_eq!(redact("amqp://user@h"), "amqp://user@h");
        assert_eq!(redact("garbage"), "garbage");
    }

    #[test]
    fn password_env_replaces_every_password() {
        let config = AmqpConfig {
            urls: vec!["amqp://u:old@h:1/%2f".into(), "amqp://v@g:2/x".into()],
            password_env: Some("PATH".into()),
            ..AmqpConfig::default()
        };
        let path = std::env::var("PATH").unwrap_or_default();
        let brokers = config.brokers().unwrap_or_default();
        assert_eq!(brokers.len(), 2);
        for b in &brokers {
            assert_eq!(b.uri.authority.userinfo.password, path);
            assert_eq!(b.uri.query.heartbeat, Some(5));
        }
        assert_eq!(format!("{:?}", brokers[0]), "amqp://u:***@h:1/%2f");
    }

    #[test]
    fn bad_settings_are_refused_with_the_key() {
        let check = |config: AmqpConfig, key: &str| {
            let err = config
                .brokers()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(key), "{err}");
        };
        check(
            AmqpConfig {
                urls: vec![],
                ..AmqpConfig::default()
            },
            "urls",
        );
        check(
            AmqpConfig {
                urls: vec!["http://x y".into()],
                ..AmqpConfig::default()
            },
            "urls[0]",
        );
        check(
            AmqpConfig {
                delivery_limit: Some(3),
                ..AmqpConfig::default()
            },
            "delivery_limit",
        );
        check(
            AmqpConfig {
                password_env: Some("KEELSON_SURELY_UNSET_VAR".into()),
                ..AmqpConfig::default()
            },
            "KEELSON_SURELY_UNSET_VAR",
        );
    }
}
