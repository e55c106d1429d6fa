//! `keelson check --config FILE`: validate a configuration completely without
//! connecting to anything, for CI and before a deployment.
//!
//! It reads the file as every process does (with the `KEELSON__` environment
//! overrides of the shell it runs in), so unknown keys, bad types, bad values and
//! an unknown log level are refused as a process would refuse them at start; then
//! it checks what a logic server checks only once it starts: that each enabled
//! handler and singleton is linked into this binary, and that the handlers' and plugins' settings
//! read as their types (without any plugin's `setup`). Secrets (`auth.secret_env`,
//! `password_file`, ...) are not read: they usually exist only where the process
//! runs.

use crate::settings::{self, Source};
use keelson_logic_server::Registry;

/// What is wrong with the configuration of `source`, each problem one line naming
/// the file and the key; empty when it is good.
pub fn problems(source: &Source) -> Vec<String> {
    let config = match settings::load(source) {
        Ok(config) => config,
        // Reading stops at the first mistake of the file itself.
        Err(e) => return vec![e.to_string()],
    };
    let file = source.describe();
    let ls = &config.logic_server;
    let mut problems: Vec<String> =
        Registry::check(&ls.handlers, &ls.handler_settings, &ls.plugins)
            .into_iter()
            .map(|e| format!("{file}: {e}"))
            .collect();
    problems.extend(
        keelson_logic_server::singleton::check(&ls.singletons, &ls.singleton_settings)
            .into_iter()
            .map(|e| format!("{file}: {e}")),
    );
    if let Err(e) = ls.governor.validate() {
        problems.push(format!("{file}: logic_server.governor: {e}"));
    }
    problems
}

/// Print the problems of `source` (standard error) or that it is good (standard
/// output); whether it is good.
pub fn run(source: &Source) -> bool {
    let problems = problems(source);
    if problems.is_empty() {
        println!("{}: ok", source.describe());
        return true;
    }
    for p in &problems {
        eprintln!("{p}");
    }
    eprintln!(
        "{}: {} problem{}",
        source.describe(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    false
}
