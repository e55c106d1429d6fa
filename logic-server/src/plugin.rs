//! Handler plugins: how a crate offers handlers and how configuration enables them.
//!
//! A plugin crate registers each handler with [`register_handler!`](crate::register_handler)
//! at compile time (through `inventory`); linking the crate into a binary makes its
//! handlers available, and the `handlers` list of the configuration enables them by
//! name. Nothing runs that the configuration did not name.

use crate::handler::Handler;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A handler offered by a linked plugin crate.
pub struct HandlerPlugin {
    /// The name requests use (`POST /api/{name}`) and configuration enables.
    pub name: &'static str,
    /// One line for operators.
    pub description: &'static str,
    /// Builds the handler from its settings (`handler_settings.<name>`, or `null`).
    pub build: fn(&Settings) -> Result<Arc<dyn Handler>, PluginError>,
}

impl fmt::Debug for HandlerPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerPlugin")
            .field("name", &self.name)
            .finish()
    }
}

inventory::collect!(HandlerPlugin);

/// Register a handler of this crate under `name`.
///
/// `$build` is a closure `|settings: &Settings| -> Result<H, PluginError>` where `H`
/// implements [`Handler`].
#[macro_export]
macro_rules! register_handler {
    ($name:expr, $description:expr, $build:expr) => {
        $crate::inventory::submit! {
            $crate::HandlerPlugin {
                name: $name,
                description: $description,
                build: |settings| {
                    let build: fn(&$crate::Settings) -> _ = $build;
                    build(settings).map(|h| ::std::sync::Arc::new(h) as ::std::sync::Arc<dyn $crate::Handler>)
                },
            }
        }
    };
}

/// The settings of one handler, as written in the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    handler: String,
    value: serde_json::Value,
}

impl Settings {
    /// Settings for `handler`; `value` is `null` when the configuration has none.
    pub fn new(handler: impl Into<String>, value: serde_json::Value) -> Self {
        Self {
            handler: handler.into(),
            value,
        }
    }

    /// Parse the settings as `T`. Absent settings parse as `T`'s defaults when `T`
    /// uses `#[serde(default)]`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, PluginError> {
        let value = match &self.value {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v => v.clone(),
        };
        serde_json::from_value(value).map_err(|e| PluginError::Settings {
            handler: self.handler.clone(),
            reason: e.to_string(),
        })
    }
}

/// Why the registry could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The configuration names a handler no linked plugin offers.
    #[error("unknown handler `{name}` in logic_server.handlers; available: {available}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// What the linked plugins offer.
        available: String,
    },
    /// A handler's settings are invalid.
    #[error("invalid settings in logic_server.handler_settings.\"{handler}\": {reason}")]
    Settings {
        /// The handler.
        handler: String,
        /// What was wrong.
        reason: String,
    },
    /// Settings were given for a handler that is not enabled.
    #[error(
        "logic_server.handler_settings.\"{0}\" configures a handler that is not in logic_server.handlers"
    )]
    SettingsForDisabled(String),
    /// Two plugins registered the same name.
    #[error("two linked plugins register the handler `{0}`")]
    Duplicate(String),
}

/// The enabled handlers of one server, by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// Every handler offered by the plugins linked into this binary.
    pub fn available() -> BTreeMap<&'static str, &'static HandlerPlugin> {
        inventory::iter::<HandlerPlugin>
            .into_iter()
            .map(|p| (p.name, p))
            .collect()
    }

    /// Build the handlers that `enabled` names, each with its settings.
    pub fn from_config(
        enabled: &[String],
        settings: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Self, PluginError> {
        let mut seen = BTreeMap::new();
        for p in inventory::iter::<HandlerPlugin> {
            if seen.insert(p.name, p).is_some() {
                return Err(PluginError::Duplicate(p.name.to_owned()));
            }
        }
        if let Some(name) = settings.keys().find(|k| !enabled.contains(k)) {
            return Err(PluginError::SettingsForDisabled(name.clone()));
        }
        let mut registry = Registry::default();
        for name in enabled {
            let plugin = seen
                .get(name.as_str())
                .ok_or_else(|| PluginError::Unknown {
                    name: name.clone(),
                    available: seen.keys().copied().collect::<Vec<_>>().join(", "),
                })?;
            let value = settings
                .get(name)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            let handler = (plugin.build)(&Settings::new(name.clone(), value))?;
            registry.handlers.insert(name.clone(), handler);
        }
        Ok(registry)
    }

    /// Add a handler directly (embedding, tests).
    pub fn insert(&mut self, name: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(name.into(), handler);
    }

    /// The handler called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(name)
    }

    /// Names of the enabled handlers.
    pub fn names(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }
}
