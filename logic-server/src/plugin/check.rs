//! [`Registry::check`]: what [`Registry::build`] would refuse in a configuration,
//! found without building anything that touches the outside world (no plugin's
//! `setup` runs), for `keelson check`.

use super::{HandlerPlugin, PluginError, Registry, Settings};
use std::collections::{BTreeMap, BTreeSet};

impl Registry {
    /// Every problem [`Registry::build`] would stop at, with these settings and the
    /// plugins linked into this binary, all of them rather than the first: an
    /// enabled handler no linked plugin offers, settings for a handler nobody offers,
    /// a handler's settings it refuses, and a plugin's settings that do not read as
    /// its `Settings` type. Handlers are built from their settings (cheap, no I/O);
    /// plugins are not set up, so what their `setup` would refuse (a database that
    /// does not answer) is not found here.
    pub fn check(
        enabled: &[String],
        settings: &BTreeMap<String, serde_json::Value>,
        plugin_settings: &BTreeMap<String, serde_json::Value>,
    ) -> Vec<PluginError> {
        let mut problems = Vec::new();
        let mut seen: BTreeMap<&str, &HandlerPlugin> = BTreeMap::new();
        for p in inventory::iter::<HandlerPlugin> {
            if seen.insert(p.name, p).is_some() {
                problems.push(PluginError::Duplicate(p.name.to_owned()));
            }
        }
        let available = || seen.keys().copied().collect::<Vec<_>>().join(", ");
        for name in settings.keys() {
            if !enabled.contains(name) && !seen.contains_key(name.as_str()) {
                problems.push(PluginError::SettingsForUnknown {
                    name: name.clone(),
                    available: available(),
                });
            }
        }
        let mut checked = BTreeSet::new();
        for name in enabled {
            let Some(plugin) = seen.get(name.as_str()) else {
                problems.push(PluginError::Unknown {
                    name: name.clone(),
                    available: available(),
                });
                continue;
            };
            let value = settings
                .get(name)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            if let Err(e) = (plugin.build)(&Settings::new(name.clone(), value)) {
                problems.push(e);
            }
            for decl in (plugin.plugins)() {
                if !checked.insert(decl.name) {
                    continue;
                }
                let value = plugin_settings
                    .get(decl.name)
                    .cloned()
                    .unwrap_or(serde_json::Value::Null);
                if let Err(e) = decl.check_settings(value) {
                    problems.push(e);
                }
            }
        }
        problems
    }
}
