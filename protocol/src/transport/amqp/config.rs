//! Settings of the AMQP transport: the `[transport]` section with `kind = "amqp"`.
//!
//! Credentials never need to be in a TOML file: `password_env` names an environment
//! variable, `password_file` a file (a mounted secret), whose value replaces the
//! password of every URL. Every URL that reaches a log is redacted first ([`redact`]).
//! The `tls_*` settings (cargo feature `tls`) are read here too, so that a missing or
//! bad file stops the process at start with the key and the file named.

use super::super::TransportError;
use lapin::uri::{AMQPScheme, AMQPUri};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of the AMQP transport (RabbitMQ).
///
/// ```toml
/// [transport]
/// kind = "amqp"
/// urls = ["amqp://keelson@broker-a:5672/%2f", "amqp://keelson@broker-b:5672/%2f"]
/// password_env = "KEELSON_BROKER_PASSWORD"
/// # TLS (`amqps://`, cargo feature `tls`): trust only this CA for the brokers.
/// # tls_ca_file = "/etc/keelson/broker-ca.pem"
/// namespace = "keelson"
/// queue_type = "quorum"
/// delivery_limit = 5
/// # Least privilege: the topology was declared by `keelson topology declare`.
/// # declare_topology = false
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
    /// Path of a file holding the broker password (a mounted secret), which replaces
    /// the password of every URL; one trailing newline is dropped. Not together with
    /// `password_env`. Unset: the passwords in the URLs (or `password_env`) are used.
    pub password_file: Option<PathBuf>,
    /// Path of a PEM file of the CA certificate(s) that must have signed the broker's
    /// certificate (`amqps://` URLs). It replaces the bundled webpki roots (the public
    /// CAs), which are used when this is unset.
    pub tls_ca_file: Option<PathBuf>,
    /// Path of a PEM file of the client certificate (then its chain, if any) shown to
    /// the broker; needs `tls_key_file`. With it, connections authenticate by SASL
    /// EXTERNAL (the broker takes the user from the certificate, and needs its
    /// `rabbitmq_auth_mechanism_ssl` plugin) unless a URL sets `auth_mechanism`.
    /// Unset: no client certificate, user and password from the URL.
    pub tls_cert_file: Option<PathBuf>,
    /// Path of the PEM file of `tls_cert_file`'s private key (PKCS#8, PKCS#1 or SEC1,
    /// unencrypted).
    pub tls_key_file: Option<PathBuf>,
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
    /// `true`: this process declares the exchanges and durable queues it uses (and the
    /// dead-letter bindings), creating what is missing: the zero-setup path, which
    /// needs configure rights on all of them. `false`: it only checks that they exist
    /// (passive declarations, no configure right needed) and fails at start naming
    /// what is missing; `keelson topology declare` creates them once, with the
    /// operator's rights. Either way a logic server binds its own queue to its routes,
    /// and subscriptions use server-named queues (`amq.gen-*`).
    pub declare_topology: bool,
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
            password_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            namespace: "keelson".to_owned(),
            heartbeat_s: 5,
            frame_max: 16 * 1024,
            queue_type: QueueType::Classic,
            delivery_limit: None,
            queue_expires_ms: None,
            connect_timeout_ms: 5_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            declare_topology: true,
        }
    }
}

/// One broker URL, parsed, with the password substituted, and its redacted form for
/// logs.
#[derive(Clone)]
pub(crate) struct BrokerUrl {
    pub(crate) uri: AMQPUri,
    pub(crate) redacted: String,
    /// The TLS connector of an `amqps://` URL.
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<super::tls::Tls>,
}

impl BrokerUrl {
    /// Open an AMQP connection to this broker (through TLS for `amqps://`). The error
    /// says what to fix where it can (an untrusted broker certificate, say).
    pub(crate) async fn connect(
        &self,
        properties: lapin::ConnectionProperties,
    ) -> Result<lapin::Connection, String> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return tls.connect(self.uri.clone(), properties).await;
        }
        lapin::Connection::connect_uri(self.uri.clone(), properties)
            .await
            .map_err(|e| e.to_string())
    }
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
        let password = match (&self.password_env, &self.password_file) {
            (None, None) => None,
            (Some(var), None) => Some(std::env::var(var).map_err(|_| {
                invalid(format!(
                    "`password_env` names the environment variable {var}, which is not set \
                     (or not valid UTF-8)"
                ))
            })?),
            (None, Some(path)) => Some(read_password(path).map_err(invalid)?),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "`password_env` and `password_file` both give the password: set one".into(),
                ));
            }
        };
        let tls = self.tls().map_err(invalid)?;
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
                let tls = match uri.scheme {
                    AMQPScheme::AMQP => None,
                    AMQPScheme::AMQPS => Some(tls.clone().ok_or_else(|| {
                        invalid(format!(
                            "`urls[{i}]` ({redacted}) is amqps://, but this build has no TLS: \
                             build with the cargo feature `tls`"
                        ))
                    })?),
                };
                // A client certificate is the credential: SASL EXTERNAL, unless the URL
                // chose a mechanism itself.
                if tls.as_ref().is_some_and(Tls::client_certificate) {
                    let mechanism = uri
                        .query
                        .auth_mechanism
                        .get_or_insert(lapin::uri::SASLMechanism::External);
                    // Requests carry the broker user as their validated `user_id`,
                    // and with EXTERNAL the URL's user is the only place it is named
                    // (lapin would otherwise say `guest`, and the broker would refuse
                    // every request).
                    if *mechanism == lapin::uri::SASLMechanism::External && !names_user(url) {
                        return Err(invalid(format!(
                            "`urls[{i}]` ({redacted}) logs in with the client certificate (SASL EXTERNAL): name the broker user it logs in as in the URL (amqps://USER@host/vhost), as requests carry that user" )));
                    }
                }
                Ok(BrokerUrl {
                    uri,
                    redacted,
                    #[cfg(feature = "tls")]
                    tls,
                })
            })
            .collect()
    }

    /// The TLS connector for the `amqps://` URLs (`None` when there are none), with
    /// the settings' files read; without the `tls` feature, an error when a `tls_*`
    /// key is set.
    fn tls(&self) -> Result<Option<Tls>, String> {
        let any_tls_key = self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some();
        let any_amqps = self
            .urls
            .iter()
            .any(|u| u.trim_start().starts_with("amqps:"));
        if any_tls_key && !any_amqps {
            return Err(
                "`tls_ca_file`, `tls_cert_file` and `tls_key_file` apply to amqps:// URLs, \
                 and `urls` has none"
                    .into(),
            );
        }
        if !any_amqps {
            return Ok(None);
        }
        Tls::load(self).map(Some)
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

/// The password in `path`, without its one trailing newline (`\n` or `\r\n`).
fn read_password(path: &Path) -> Result<String, String> {
    let mut password = std::fs::read_to_string(path)
        .map_err(|e| format!("`password_file` ({}) cannot be read: {e}", path.display()))?;
    if password.ends_with('\n') {
        password.pop();
        if password.ends_with('\r') {
            password.pop();
        }
    }
    Ok(password)
}

/// TLS settings without the `tls` feature: any `tls_*` key, or an `amqps://` URL,
/// is an error (`AmqpConfig::tls`, `brokers`) rather than a plain connection.
#[cfg(not(feature = "tls"))]
#[derive(Debug, Clone)]
struct Tls;

#[cfg(not(feature = "tls"))]
impl Tls {
    fn load(_: &AmqpConfig) -> Result<Self, String> {
        Err(
            "amqps:// URLs and the `tls_*` settings need TLS, which this build does not have: \
             build with the cargo feature `tls`"
                .into(),
        )
    }

    fn client_certificate(&self) -> bool {
        false
    }
}

#[cfg(feature = "tls")]
use super::tls::Tls;

/// Whether `url` has user information (`scheme://user[:password]@host...`).
fn names_user(url: &str) -> bool {
    url.split_once("://").is_some_and(|(_, rest)| {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        authority.contains('@')
    })
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
    use super::names_user;

    #[test]
    fn a_url_names_a_user_only_with_user_information() {
        assert!(names_user("amqps://gw@broker:5671/%2f"));
        assert!(names_user("amqps://gw:secret@broker/vhost?heartbeat=5"));
        assert!(!names_user("amqps://broker:5671/%2f"));
        assert!(!names_user("amqps://broker/v?x=a@b"));
        assert!(!names_user("not a url"));
    }

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

    #[test]
    fn password_file_replaces_every_password_without_its_newline() {
        let dir = std::env::temp_dir().join(format!("keelson-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        for (written, read) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("a b\n\n", "a b\n"),
        ] {
            std::fs::write(&file, written).unwrap();
            let config = AmqpConfig {
                urls: vec!["amqp://u:old@h:1/%2f".into(), "amqp://v@g:2/x".into()],
                password_file: Some(file.clone()),
                ..AmqpConfig::default()
            };
            for b in config.brokers().unwrap() {
                assert_eq!(b.uri.authority.userinfo.password, read);
            }
        }
        let missing = dir.join("missing");
        let err = AmqpConfig {
            password_file: Some(missing.clone()),
            ..AmqpConfig::default()
        }
        .brokers()
        .unwrap_err()
        .to_string();
        assert!(err.contains("password_file"), "{err}");
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let err = AmqpConfig {
            password_file: Some(file),
            password_env: Some("PATH".into()),
            ..AmqpConfig::default()
        }
        .brokers()
        .unwrap_err()
        .to_string();
        assert!(err.contains("set one"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_settings_are_checked_at_start() {
        let err = |config: AmqpConfig| config.brokers().unwrap_err().to_string();
        // TLS keys with no amqps:// URL would be silently unused.
        let e = err(AmqpConfig {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..AmqpConfig::default()
        });
        assert!(e.contains("tls_ca_file") && e.contains("amqps"), "{e}");
        let amqps = vec!["amqps://u:p@localhost:5671/%2f".to_owned()];
        let e = err(AmqpConfig {
            urls: amqps.clone(),
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..AmqpConfig::default()
        });
        if cfg!(feature = "tls") {
            assert!(
                e.contains("`tls_ca_file` (/nonexistent/ca.pem) cannot be read"),
                "{e}"
            );
        } else {
            assert!(e.contains("feature `tls`"), "{e}");
        }
        // Not PEM.
        let dir = std::env::temp_dir().join(format!("keelson-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = err(AmqpConfig {
            urls: amqps.clone(),
            tls_ca_file: Some(junk.clone()),
            ..AmqpConfig::default()
        });
        if cfg!(feature = "tls") {
            assert!(
                e.contains("tls_ca_file") && e.contains("no PEM certificate"),
                "{e}"
            );
        }
        let e = err(AmqpConfig {
            urls: amqps,
            tls_cert_file: Some(junk),
            ..AmqpConfig::default()
        });
        if cfg!(feature = "tls") {
            assert!(e.contains("set both or neither"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
