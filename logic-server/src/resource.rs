//! Plugin resources: what a plugin builds once at start and shares between its
//! handlers (a database pool, an HTTP client, a price list), and its shutdown hook.
//!
//! A type implementing [`Plugin`] is a plugin's resources. Its settings are the
//! section `[logic_server.plugins.<NAME>]`; [`Plugin::setup`] builds it (it may
//! await: connect a pool, load a file) before the server takes requests, and
//! [`Plugin::shutdown`] runs once, after the drain. A handler reaches it with the
//! [`Res`](crate::extract::Res) extractor, which is also what tells the server to
//! set the plugin up: a plugin is built when an enabled handler takes it.
//!
//! ```
//! use keelson_logic_server::{Error, Plugin};
//! use serde::Deserialize;
//! use std::collections::BTreeMap;
//!
//! /// Prices of the shop, from its settings.
//! struct Prices(BTreeMap<String, u64>);
//!
//! #[derive(Default, Deserialize)]
//! #[serde(default, deny_unknown_fields)]
//! struct PricesSettings {
//!     cents: BTreeMap<String, u64>,
//! }
//!
//! impl Plugin for Prices {
//!     const NAME: &'static str = "prices";
//!     type Settings = PricesSettings;
//!     async fn setup(settings: PricesSettings) -> Result<Self, Error> {
//!         Ok(Prices(settings.cents))
//!     }
//! }
//! ```

use crate::error::Error;
use crate::plugin::PluginError;
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// A plugin's resources, built once at start from its settings and shared by its
/// handlers. See the [module documentation](self).
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The plugin's name: its settings are `[logic_server.plugins.<NAME>]`, and
    /// errors name it.
    const NAME: &'static str;
    /// Its settings. An absent section reads as an empty table, so a type with
    /// `#[serde(default)]` needs none and a required field is an error at start.
    type Settings: DeserializeOwned + Send;
    /// Build the resources. An error stops the server from starting, naming the
    /// plugin and the cause.
    fn setup(settings: Self::Settings) -> impl Future<Output = Result<Self, Error>> + Send;
    /// Release what `setup` took. Runs once, after the server drained (no handler
    /// of this server runs any more); it should be brief.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

type Shared = Arc<dyn Any + Send + Sync>;

/// A [`Plugin`] type, erased: how the registry sets it up and shuts it down.
#[derive(Clone, Copy)]
pub struct PluginDecl {
    /// [`Plugin::NAME`].
    pub name: &'static str,
    type_id: fn() -> TypeId,
    setup: fn(serde_json::Value) -> BoxFuture<'static, Result<Shared, PluginError>>,
    check: fn(serde_json::Value) -> Result<(), PluginError>,
    shutdown: fn(Shared) -> BoxFuture<'static, ()>,
}

impl fmt::Debug for PluginDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginDecl")
            .field("name", &self.name)
            .finish()
    }
}

impl PluginDecl {
    /// The declaration of `P`.
    pub fn of<P: Plugin>() -> Self {
        Self {
            name: P::NAME,
            type_id: TypeId::of::<P>,
            setup: setup_erased::<P>,
            check: |value| settings_of::<P>(value).map(drop),
            shutdown: shutdown_erased::<P>,
        }
    }

    /// Read `value` (its section of `[logic_server.plugins]`, `null` when absent) as
    /// the plugin's settings, without setting it up: what `keelson check` does.
    pub fn check_settings(&self, value: serde_json::Value) -> Result<(), PluginError> {
        (self.check)(value)
    }
}

/// `value` as `P`'s settings; an absent section reads as an empty table.
fn settings_of<P: Plugin>(value: serde_json::Value) -> Result<P::Settings, PluginError> {
    let value = match value {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        v => v,
    };
    serde_path_to_error::deserialize(value).map_err(|e| PluginError::PluginSettings {
        plugin: P::NAME.to_owned(),
        key: e.path().to_string(),
        reason: e.into_inner().to_string(),
    })
}

fn setup_erased<P: Plugin>(
    value: serde_json::Value,
) -> BoxFuture<'static, Result<Shared, PluginError>> {
    Box::pin(async move {
        let settings = settings_of::<P>(value)?;
        let plugin = P::setup(settings).await.map_err(|e| PluginError::Setup {
            plugin: P::NAME.to_owned(),
            cause: e.into_handler_error().to_string(),
        })?;
        Ok(Arc::new(plugin) as Shared)
    })
}

fn shutdown_erased<P: Plugin>(shared: Shared) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        if let Ok(plugin) = shared.downcast::<P>() {
            plugin.shutdown().await;
        }
    })
}

/// The resources of one server's plugins, by type.
#[derive(Default)]
pub struct Resources {
    by_type: HashMap<TypeId, Shared>,
    /// In set-up order; taken by the (single) shutdown.
    hooks: Mutex<Vec<(PluginDecl, Shared)>>,
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(d, _)| d.name)
            .collect();
        f.debug_struct("Resources")
            .field("plugins", &names)
            .finish()
    }
}

impl Resources {
    /// Set up each of `decls` once (in order), with its section of `settings`,
    /// unless these resources hold it already. Settings for a plugin nobody needs
    /// are left alone (the operator may have disabled its handlers).
    pub async fn setup(
        mut self,
        decls: &[PluginDecl],
        settings: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Self, PluginError> {
        let mut names: HashMap<&str, TypeId> = HashMap::new();
        for decl in decls {
            let id = (decl.type_id)();
            if self.by_type.contains_key(&id) {
                continue;
            }
            match names.insert(decl.name, id) {
                Some(other) if other != id => {
                    return Err(PluginError::Duplicate(format!("plugin {}", decl.name)));
                }
                Some(_) => continue,
                None => {}
            }
            let value = settings
                .get(decl.name)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            tracing::info!(plugin = decl.name, "setting up a plugin");
            let shared = match (decl.setup)(value).await {
                Ok(shared) => shared,
                Err(e) => {
                    // Those set up already are released before the error goes up.
                    self.shutdown().await;
                    return Err(e);
                }
            };
            self.by_type.insert(id, shared.clone());
            self.hooks
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .push((*decl, shared));
        }
        Ok(self)
    }

    /// Add resources built elsewhere (tests, embedding); their shutdown hook runs too.
    pub fn insert<P: Plugin>(&mut self, plugin: P) -> Arc<P> {
        let shared = Arc::new(plugin);
        self.by_type.insert(TypeId::of::<P>(), shared.clone());
        self.hooks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .push((PluginDecl::of::<P>(), shared.clone()));
        shared
    }

    /// The resources of plugin `P`, if set up.
    pub fn get<P: Plugin>(&self) -> Option<Arc<P>> {
        self.by_type
            .get(&TypeId::of::<P>())
            .and_then(|s| s.clone().downcast::<P>().ok())
    }

    /// Run the shutdown hooks, latest set up first. Only the first call does
    /// anything.
    pub async fn shutdown(&self) {
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for (decl, shared) in hooks.into_iter().rev() {
            tracing::info!(plugin = decl.name, "shutting a plugin down");
            (decl.shutdown)(shared).await;
        }
    }
}

/// Make a settings type a [`Plugin`] of its own: its resources are its settings,
/// read from `[logic_server.plugins.<name>]` (an absent section reads as `{}`).
///
/// ```
/// #[derive(serde::Deserialize)]
/// #[serde(default)]
/// struct Limits { max_items: usize }
/// impl Default for Limits { fn default() -> Self { Self { max_items: 100 } } }
/// keelson_logic_server::settings_plugin!(Limits, "cart");
/// ```
#[macro_export]
macro_rules! settings_plugin {
    ($ty:ty, $name:expr) => {
        impl $crate::Plugin for $ty {
            const NAME: &'static str = $name;
            type Settings = Self;
            async fn setup(settings: Self) -> ::std::result::Result<Self, $crate::Error> {
                Ok(settings)
            }
        }
    };
}
