//! Loading the configuration: one TOML file, overridden by `KEELSON__SECTION__KEY`
//! environment variables, validated strictly. Handler settings, whose handler names
//! hold dots, are overridden as `KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD__MAX_ITEMS`
//! ([`handler_env`]).
//!
//! Every binary reads the same schema ([`KeelsonConfig`]); each uses the sections it
//! needs, so a file for the gateway and one for a logic server differ from the
//! embedded one only in what they leave out and in `[transport]`.
//!
//! A bad file fails with a message naming the file, the key and what was expected:
//! `config/keelson.toml: at key `gateway.max_body_bytes`: invalid type: string "x",
//! expected usize`.

use keelson_logic_server::LogicServerConfig;
use keelson_protocol::TransportConfig;
use keelson_ui_gateway::{AuthConfig, GatewayConfig};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod handler_env;
pub mod telemetry;

pub use telemetry::TelemetryConfig;

/// The configuration file of an application made by `keelson new`, looked for first
/// in the working directory.
pub const LOCAL_CONFIG: &str = "keelson.toml";

/// The default configuration file of the embedded mesh, relative to the working
/// directory (the repository root under `cargo run`), used when there is no
/// [`LOCAL_CONFIG`].
pub const DEFAULT_CONFIG: &str = "config/keelson.toml";

/// A copy of `config/keelson.toml` built into the binary, used when the default file
/// is not found (e.g. the binary was copied elsewhere).
pub const BUILTIN_CONFIG: &str = include_str!("../config/keelson.toml");

/// Prefix of environment overrides: `KEELSON__GATEWAY__LISTEN=0.0.0.0:8080`.
pub const ENV_PREFIX: &str = "KEELSON";

/// The whole configuration schema.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeelsonConfig {
    /// This process's identity in the mesh.
    pub node: NodeConfig,
    /// Logging.
    pub log: LogConfig,
    /// Which transport connects gateways and logic servers.
    pub transport: TransportConfig,
    /// Verification of bearer tokens (gateway) and issuing them (`keelson token`).
    pub auth: AuthConfig,
    /// The HTTP gateway.
    pub gateway: GatewayConfig,
    /// The logic server.
    pub logic_server: LogicServerConfig,
    /// Trace export (OpenTelemetry); off by default.
    pub telemetry: TelemetryConfig,
}

/// The `[node]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node id shown in logs, replies and cluster status; default `<hostname>-<pid>`.
    pub id: Option<String>,
}

impl NodeConfig {
    /// The configured id, or `<hostname>-<pid>`.
    pub fn id(&self, role: &str) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".to_owned());
            format!("{host}-{role}-{}", std::process::id())
        })
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter in `tracing` syntax, e.g. `info` or `info,keelson_protocol=debug`.
    /// `RUST_LOG`, when set, takes precedence.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// The levels `log.level` takes, alone or after `TARGET=`.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

impl LogConfig {
    /// Refuse a filter whose parts are not levels: `tracing` would read a bare
    /// `warning` as a target name and turn off every other line, errors included.
    pub fn validate(&self) -> Result<(), String> {
        for directive in self
            .level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            let level = directive
                .rsplit_once('=')
                .map_or(directive, |(_, level)| level)
                .trim();
            if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "at key `log.level`: `{directive}` is not a level: expected one of {}, or TARGET=LEVEL (e.g. `info,keelson_protocol=debug`)",
                    LOG_LEVELS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A TOML file.
    File(PathBuf),
    /// The copy of `config/keelson.toml` built into the binary.
    Builtin,
}

impl Source {
    /// The file given with `--config`; else [`LOCAL_CONFIG`] when the working
    /// directory has one; else [`DEFAULT_CONFIG`] when it exists; else the built-in copy.
    pub fn resolve(explicit: Option<PathBuf>) -> Self {
        match explicit {
            Some(p) => Source::File(p),
            None => [LOCAL_CONFIG, DEFAULT_CONFIG]
                .into_iter()
                .find(|file| Path::new(file).is_file())
                .map_or(Source::Builtin, |file| Source::File(file.into())),
        }
    }

    /// How to name this source in messages.
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Builtin => format!("built-in {DEFAULT_CONFIG}"),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    origin: String,
    message: String,
}

impl ConfigError {
    /// An error about `origin` (a file, possibly with its env overrides).
    pub fn new(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            message: message.into(),
        }
    }
}

/// Load `source` with overrides from the process environment.
pub fn load(source: &Source) -> Result<KeelsonConfig, ConfigError> {
    load_with_env(source, None)
}

/// Load `source` with overrides from `env` (tests) or, when `None`, the process
/// environment.
pub fn load_with_env(
    source: &Source,
    env: Option<HashMap<String, String>>,
) -> Result<KeelsonConfig, ConfigError> {
    let origin = source.describe();
    let text = match source {
        Source::File(p) => std::fs::read_to_string(p)
            .map_err(|e| ConfigError::new(&origin, format!("cannot read the file: {e}")))?,
        Source::Builtin => BUILTIN_CONFIG.to_owned(),
    };
    let file = config::File::from_str(&text, config::FileFormat::Toml);
    let mut vars = match env {
        Some(vars) => vars,
        None => process_environment().map_err(|e| ConfigError::new(&origin, e))?,
    };
    let handler_vars = handler_env::split(&mut vars);
    let environment = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        // Lists from the environment are comma-separated:
        // KEELSON__TRANSPORT__URLS=amqp://a:5672/%2f,amqp://b:5672/%2f
        .list_separator(",")
        .with_list_parse_key("transport.urls")
        .with_list_parse_key("logic_server.handlers")
        .with_list_parse_key("auth.algorithms")
        .with_list_parse_key("gateway.cors.allowed_origins")
        .with_list_parse_key("gateway.cors.allowed_headers")
        .source(Some(vars));
    let mut overridden = environment_keys(&environment);
    overridden.extend(
        handler_vars
            .iter()
            .map(|(name, _)| name.to_ascii_uppercase()),
    );
    overridden.sort();
    let built = config::Config::builder()
        .add_source(file)
        .add_source(environment)
        .build()
        .map_err(|e| ConfigError::new(&origin, e.to_string()))?;
    let origin = if overridden.is_empty() {
        origin
    } else {
        format!(
            "{origin} (with environment overrides {})",
            overridden.join(", ")
        )
    };
    let mut config = serde_path_to_error::deserialize::<_, KeelsonConfig>(built).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." || inner.contains(&format!("`{path}`")) {
            ConfigError::new(&origin, inner)
        } else {
            // The `config` crate ends some messages with its own spelling of the
            // key, wrong inside an array (`schedules[0]misfire`): the path in front
            // names it.
            let inner = match inner.rfind(" for key `") {
                Some(i) if inner.ends_with('`') => &inner[..i],
                _ => &inner,
            };
            ConfigError::new(&origin, format!("at key `{path}`: {inner}"))
        }
    })?;
    handler_env::apply(&handler_vars, &mut config.logic_server)
        .map_err(|e| ConfigError::new(&origin, e))?;
    // Settings that parse but contradict each other; the messages name the keys.
    config
        .auth
        .validate()
        .map_err(|e| ConfigError::new(&origin, e.to_string()))?;
    config
        .gateway
        .cors
        .validate()
        .map_err(|e| ConfigError::new(&origin, e.to_string()))?;
    config
        .log
        .validate()
        .map_err(|e| ConfigError::new(&origin, e))?;
    config
        .telemetry
        .validate()
        .map_err(|e| ConfigError::new(&origin, e))?;
    keelson_logic_server::schedules::plan::build_schedules(&config.logic_server.schedules)
        .map_err(|e| ConfigError::new(&origin, e))?;
    Ok(config)
}

/// The variables of this process whose names start with `KEELSON__` (in any case,
/// as `config` matches them); one with a value that is not UTF-8 is an error.
fn process_environment() -> Result<HashMap<String, String>, String> {
    let prefix = format!("{ENV_PREFIX}__");
    let mut vars = HashMap::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !name.to_ascii_uppercase().starts_with(&prefix) {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| format!("the environment variable {name} is not UTF-8"))?;
        vars.insert(name.to_owned(), value);
    }
    Ok(vars)
}

fn environment_keys(env: &config::Environment) -> Vec<String> {
    use config::Source as _;
    env.collect()
        .map(|m| {
            m.keys()
                .map(|k| format!("{ENV_PREFIX}__{}", k.to_uppercase().replace('.', "__")))
                .collect()
        })
        .unwrap_or_default()
}
