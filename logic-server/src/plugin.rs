//! Handler plugins: how a crate offers handlers and how configuration enables them.
//!
//! A plugin crate registers each handler with [`handler!`](crate::handler) (an async
//! function) or [`register_handler!`](crate::register_handler) (a [`Handler`]
//! implementation) at compile time (through `inventory`); linking the crate into a
//! binary makes its handlers available, and the `handlers` list of the configuration
//! enables them by name. Nothing runs that the configuration did not name; the
//! plugins ([`Plugin`](crate::Plugin) resources) the enabled handlers take are set up
//! before the server takes requests.

use crate::handler::Handler;
use crate::resource::{PluginDecl, Resources};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

mod check;

/// A handler offered by a linked plugin crate.
pub struct HandlerPlugin {
    /// The name requests use (`POST /api/{name}`) and configuration enables.
    pub name: &'static str,
    /// One line for operators.
    pub description: &'static str,
    /// Builds the handler from its settings (`handler_settings.<name>`, or `null`).
    pub build: fn(&Settings) -> Result<Arc<dyn Handler>, PluginError>,
    /// The plugins ([`Plugin`](crate::Plugin) resources) the handler takes, set up
    /// at start when it is enabled.
    pub plugins: fn() -> Vec<PluginDecl>,
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
                plugins: ::std::vec::Vec::new,
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

    /// Refuse any settings: for handlers that take none (a handler function's
    /// configuration is its plugins').
    pub fn refuse_any(&self) -> Result<(), PluginError> {
        match &self.value {
            serde_json::Value::Null => Ok(()),
            serde_json::Value::Object(m) if m.is_empty() => Ok(()),
            _ => Err(PluginError::Settings {
                handler: self.handler.clone(),
                reason: "this handler takes no settings (its plugins take theirs under logic_server.plugins.<plugin>)".to_owned(),
            }),
        }
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
    /// Settings were given for a handler no linked plugin offers (a typo?).
    #[error(
        "logic_server.handler_settings.\"{name}\" configures a handler no linked plugin offers; available: {available}"
    )]
    SettingsForUnknown {
        /// The name in the settings.
        name: String,
        /// What the linked plugins offer.
        available: String,
    },
    /// A plugin's settings are invalid.
    #[error("invalid settings in logic_server.plugins.{plugin}{}: {reason}", key_suffix(.key))]
    PluginSettings {
        /// The plugin.
        plugin: String,
        /// The key inside its section, if known.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A plugin's setup failed.
    #[error("plugin `{plugin}` failed to set up: {cause}")]
    Setup {
        /// The plugin.
        plugin: String,
        /// Why.
        cause: String,
    },
    /// Two plugins registered the same name.
    #[error("two linked plugins register the handler `{0}`")]
    Duplicate(String),
}

fn key_suffix(key: &str) -> String {
    if key.is_empty() || key == "." {
        String::new()
    } else {
        format!(".{key}")
    }
}

/// The enabled handlers of one server, by name, and their plugins' resources.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
    resources: Arc<Resources>,
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

    /// Build the handlers that `enabled` names, each with its settings, and set up
    /// the plugins they take with theirs (`plugin_settings`, by plugin name).
    /// Settings of a linked handler that is not enabled are ignored (with a
    /// warning): disabling a handler does not mean deleting its section.
    pub async fn build(
        enabled: &[String],
        settings: &BTreeMap<String, serde_json::Value>,
        plugin_settings: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Self, PluginError> {
        Self::build_with(enabled, settings, plugin_settings, Resources::default()).await
    }

    /// [`Registry::build`], with plugins already built (`preset`, e.g. by a test):
    /// those are not set up again.
    pub async fn build_with(
        enabled: &[String],
        settings: &BTreeMap<String, serde_json::Value>,
        plugin_settings: &BTreeMap<String, serde_json::Value>,
        preset: Resources,
    ) -> Result<Self, PluginError> {
        let mut seen = BTreeMap::new();
        for p in inventory::iter::<HandlerPlugin> {
            if seen.insert(p.name, p).is_some() {
                return Err(PluginError::Duplicate(p.name.to_owned()));
            }
        }
        let available = || seen.keys().copied().collect::<Vec<_>>().join(", ");
        for name in settings.keys().filter(|k| !enabled.contains(k)) {
            if !seen.contains_key(name.as_str()) {
                return Err(PluginError::SettingsForUnknown {
                    name: name.clone(),
                    available: available(),
                });
            }
            tracing::warn!(handler = %name, "logic_server.handler_settings has a section for a handler that is not enabled; ignored");
        }
        let mut handlers = BTreeMap::new();
        let mut decls = Vec::new();
        for name in enabled {
            let plugin = seen
                .get(name.as_str())
                .ok_or_else(|| PluginError::Unknown {
                    name: name.clone(),
                    available: available(),
                })?;
            let value = settings
                .get(name)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            let handler = (plugin.build)(&Settings::new(name.clone(), value))?;
            handlers.insert(name.clone(), handler);
            decls.extend((plugin.plugins)());
        }
        let resources = preset.setup(&decls, plugin_settings).await?;
        Ok(Registry {
            handlers,
            resources: Arc::new(resources),
        })
    }

    /// Add a handler directly (embedding, tests).
    pub fn insert(&mut self, name: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(name.into(), handler);
    }

    /// Use `resources` for the handlers' [`Res`](crate::Res) extractors (embedding,
    /// tests); their shutdown hooks run when the server stops.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = Arc::new(resources);
        self
    }

    /// The handler called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(name)
    }

    /// Names of the enabled handlers.
    pub fn names(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// The plugins' resources.
    pub fn resources(&self) -> &Arc<Resources> {
        &self.resources
    }
}
