//! Handler settings from the environment, for handler names that an environment
//! variable's name cannot hold.
//!
//! `KEELSON__SECTION__KEY` reaches every key whose path is made of plain words, but a
//! handler's name is a key of `logic_server.handler_settings` and usually holds a dot
//! (`cart.add`), sometimes a `-`: neither can appear in a name a shell `export` or a
//! systemd `Environment=` line accepts, and the `config` crate would read a dot as
//! one more level of tables. So these variables are read here, not by `config`:
//!
//! ```text
//! KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__<HANDLER>__<KEY>[__<KEY>...]=<value>
//! KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD__MAX_ITEMS=50
//! ```
//!
//! `<HANDLER>` is the handler's name in capitals with every run of other characters
//! than letters and digits written `_` (`cart.add` and `cart-add` are `CART_ADD`). It
//! is matched against the handlers the configuration names (`logic_server.handlers`,
//! after its own overrides, and the tables of `handler_settings`); a name that
//! matches none, or more than one, is an error naming the variable. The keys are
//! lower-cased, as for every other variable. The value is JSON when it reads as JSON
//! (`50`, `true`, `[1, 2]`, `{"a": 1}`), else a string. Without a key, the value must
//! be a JSON object, whose keys are set one by one.
//!
//! Why not fold `CART__ADD__MAX_ITEMS` back into `"cart.add"`: a handler's settings
//! may be tables themselves, so `CART__ADD__X` could as well be setting `add.x` of a
//! handler `cart`; one segment per handler name is never ambiguous in that way.

use keelson_logic_server::LogicServerConfig;
use std::collections::HashMap;

/// The variables this module reads (matched without regard to case, as `config`
/// matches the others).
const PREFIX: &str = "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS";

/// How the variables are written, for error messages.
const FORM: &str = "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__<HANDLER>__<KEY>=value, <HANDLER> being the handler's name in capitals with `_` for `.` and `-` (cart.add: CART_ADD)";

/// Take the handler-settings variables out of `vars`, sorted by name.
pub(super) fn split(vars: &mut HashMap<String, String>) -> Vec<(String, String)> {
    let names: Vec<String> = vars
        .keys()
        .filter(|name| is_handler_setting(name))
        .cloned()
        .collect();
    let mut taken: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|name| vars.remove_entry(&name))
        .collect();
    taken.sort();
    taken
}

fn is_handler_setting(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper
        .strip_prefix(PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("__"))
}

/// `name` as an environment variable writes it: `cart.add` is `CART_ADD`.
pub fn env_form(name: &str) -> String {
    let mut form = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            form.push(c.to_ascii_uppercase());
        } else if !form.is_empty() && !form.ends_with('_') {
            form.push('_');
        }
    }
    form.trim_end_matches('_').to_owned()
}

/// Set the settings `vars` (from [`split`]) give in `logic_server.handler_settings`.
/// The error names the variable.
pub(super) fn apply(
    vars: &[(String, String)],
    logic_server: &mut LogicServerConfig,
) -> Result<(), String> {
    for (var, value) in vars {
        apply_one(var, value, logic_server).map_err(|e| format!("{var}: {e}"))?;
    }
    Ok(())
}

fn apply_one(var: &str, value: &str, logic_server: &mut LogicServerConfig) -> Result<(), String> {
    // `split` took only names that start with PREFIX (ASCII, in any case).
    let rest = var.get(PREFIX.len()..).unwrap_or_default();
    let mut segments = rest.split("__").skip(1);
    let handler_form = segments
        .next()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("no handler named; write {FORM}"))?
        .to_ascii_uppercase();
    let keys: Vec<String> = segments.map(str::to_ascii_lowercase).collect();
    if keys.iter().any(String::is_empty) {
        return Err(format!("an empty key (`____`); write {FORM}"));
    }

    let mut known: Vec<&String> = logic_server
        .handlers
        .iter()
        .chain(logic_server.handler_settings.keys())
        .collect();
    known.sort();
    known.dedup();
    let matching: Vec<&String> = known
        .iter()
        .copied()
        .filter(|name| env_form(name) == handler_form)
        .collect();
    let handler = match matching.as_slice() {
        [one] => (*one).clone(),
        [] => {
            let forms: Vec<String> = known
                .iter()
                .map(|name| format!("{} for {name}", env_form(name)))
                .collect();
            return Err(format!(
                "`{handler_form}` names no handler of logic_server.handlers ({}); write {FORM}",
                if forms.is_empty() {
                    "it enables none".to_owned()
                } else {
                    forms.join(", ")
                }
            ));
        }
        several => {
            let names: Vec<String> = several.iter().map(|n| format!("`{n}`")).collect();
            return Err(format!(
                "`{handler_form}` could be any of the handlers {}; set their settings in the file",
                names.join(", ")
            ));
        }
    };
    let value: serde_json::Value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));

    let settings = logic_server
        .handler_settings
        .entry(handler.clone())
        .or_insert(serde_json::Value::Null);
    if settings.is_null() {
        *settings = serde_json::Value::Object(Default::default());
    }
    let Some((last, parents)) = keys.split_last() else {
        // The whole settings: an object, merged key by key.
        let serde_json::Value::Object(entries) = value else {
            return Err(format!(
                "without a key after the handler, the value must be a JSON object of settings, e.g. {{\"max_items\": 50}}; or write {FORM}"
            ));
        };
        let table = as_table(settings, &handler, &[])?;
        table.extend(entries);
        return Ok(());
    };
    let mut table = as_table(settings, &handler, &[])?;
    for (depth, key) in parents.iter().enumerate() {
        let next = table
            .entry(key.clone())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        table = as_table(next, &handler, &keys[..=depth])?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// `value` as a table of settings, or an error naming where it is not one.
fn as_table<'a>(
    value: &'a mut serde_json::Value,
    handler: &str,
    path: &[String],
) -> Result<&'a mut serde_json::Map<String, serde_json::Value>, String> {
    match value {
        serde_json::Value::Object(table) => Ok(table),
        other => Err(format!(
            "logic_server.handler_settings.\"{handler}\"{} is {other} in the file, not a table of settings",
            path.iter().map(|k| format!(".{k}")).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn a_handler_name_is_written_in_capitals_with_underscores() {
        assert_eq!(env_form("cart.add"), "CART_ADD");
        assert_eq!(env_form("echo"), "ECHO");
        assert_eq!(env_form("my-shop.v2..add"), "MY_SHOP_V2_ADD");
        assert_eq!(env_form(".odd."), "ODD");
    }

    fn server(handlers: &[&str], settings: serde_json::Value) -> LogicServerConfig {
        LogicServerConfig {
            handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
            handler_settings: serde_json::from_value(settings).unwrap(),
            ..LogicServerConfig::default()
        }
    }

    fn apply_vars(vars: &[(&str, &str)], ls: &mut LogicServerConfig) -> Result<(), String> {
        let mut env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.insert("KEELSON__GATEWAY__LISTEN".to_owned(), "x".to_owned());
        let taken = split(&mut env);
        assert_eq!(env.len(), 1, "only handler settings are taken: {env:?}");
        apply(&taken, ls)
    }

    #[test]
    fn settings_of_dotted_and_nested_names_are_set() {
        let mut ls = server(
            &["cart.add", "my-shop.list"],
            json!({"cart.add": {"max_items": 100, "keep": true}}),
        );
        apply_vars(
            &[
                (
                    "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD__MAX_ITEMS",
                    "50",
                ),
                (
                    "keelson__logic_server__handler_settings__my_shop_list__page__size",
                    "20",
                ),
                (
                    "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__MY_SHOP_LIST__TITLE",
                    "Shop",
                ),
                (
                    "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__MY_SHOP_LIST",
                    r#"{"tags": ["a"]}"#,
                ),
            ],
            &mut ls,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&ls.handler_settings).unwrap(),
            json!({
                "cart.add": {"max_items": 50, "keep": true},
                "my-shop.list": {"page": {"size": 20}, "title": "Shop", "tags": ["a"]},
            })
        );
    }

    #[test]
    fn a_wrong_variable_is_named_with_what_was_expected() {
        for (var, value, expected) in [
            (
                "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART__ADD__MAX_ITEMS",
                "5",
                "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART__ADD__MAX_ITEMS: `CART` names no handler of logic_server.handlers (CART_ADD for cart.add, ECHO for echo)",
            ),
            (
                "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS",
                "5",
                "no handler named; write KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__<HANDLER>__<KEY>=value",
            ),
            (
                "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD",
                "5",
                "the value must be a JSON object",
            ),
            (
                "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD__MAX_ITEMS__LIMIT",
                "5",
                "logic_server.handler_settings.\"cart.add\".max_items is 100 in the file, not a table",
            ),
            (
                "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD____X",
                "5",
                "an empty key",
            ),
        ] {
            let mut ls = server(
                &["cart.add", "echo"],
                json!({"cart.add": {"max_items": 100}}),
            );
            let err = apply_vars(&[(var, value)], &mut ls).unwrap_err();
            assert!(err.starts_with(var), "{err}");
            assert!(err.contains(expected), "{expected}\n{err}");
        }
    }

    #[test]
    fn two_handlers_written_alike_are_refused() {
        let mut ls = server(&["cart.add", "cart-add"], json!({}));
        let err = apply_vars(
            &[("KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__CART_ADD__X", "1")],
            &mut ls,
        )
        .unwrap_err();
        assert!(
            err.contains("could be any of the handlers `cart-add`, `cart.add`"),
            "{err}"
        );
    }
}
