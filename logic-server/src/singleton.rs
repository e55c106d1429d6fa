//! Singleton tasks: work that runs on exactly one logic server of the cluster at a
//! time.
//!
//! A plugin crate registers a singleton with [`singleton!`](crate::singleton) (one
//! line, like a handler); `logic_server.singletons` enables it by name. Every server
//! that enables it is a candidate for its lease (`singleton.{name}`); the holder runs
//! the task with a [`SingletonCtx`], which carries the lease's fencing token. The
//! task is cancelled when its server loses the lease (its connection went, a renewal
//! was not confirmed in time) or drains; a drained server gives the lease up at once,
//! so a peer starts the task without waiting for a timeout.
//!
//! The guarantee is the lease's: at most one server holds it at any instant, and
//! [`SingletonCtx::is_leader`] turns false *before* another server can take over.
//! A task checks it right before each effect it must not do twice at once, and
//! passes [`SingletonCtx::token`] on with what it does, so that a receiver can
//! refuse the work of an older holder (a server that froze between its check and
//! its act).
//!
//! ```
//! use keelson_logic_server::{HandlerError, SingletonCtx};
//! use std::time::Duration;
//!
//! /// Sweeps something every second while it leads.
//! async fn sweeper(ctx: SingletonCtx) -> Result<(), HandlerError> {
//!     while !ctx.is_cancelled() {
//!         if ctx.is_leader() {
//!             // ... act, passing ctx.token() along ...
//!         }
//!         tokio::select! {
//!             () = ctx.cancelled() => break,
//!             () = tokio::time::sleep(Duration::from_secs(1)) => {}
//!         }
//!     }
//!     Ok(())
//! }
//!
//! keelson_logic_server::singleton!("doc.sweeper", "sweeps every second", sweeper);
//! ```

use crate::handler::HandlerError;
use futures_util::future::BoxFuture;
use keelson_protocol::transport::Fence;
use serde::de::DeserializeOwned;
use std::fmt;
use tokio_util::sync::CancellationToken;

/// A singleton task offered by a linked plugin crate.
pub struct SingletonPlugin {
    /// The name `logic_server.singletons` enables it by (`[a-z0-9._-]`).
    pub name: &'static str,
    /// One line for operators.
    pub description: &'static str,
    /// Runs the task while this server holds its lease.
    pub run: fn(SingletonCtx) -> BoxFuture<'static, Result<(), HandlerError>>,
}

impl fmt::Debug for SingletonPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingletonPlugin")
            .field("name", &self.name)
            .finish()
    }
}

inventory::collect!(SingletonPlugin);

/// Register the async function `$f` (taking a [`SingletonCtx`], returning
/// `Result<(), HandlerError>`) as the singleton task `$name`, with a one-line
/// description for operators. If it returns while its server still holds the
/// lease, it is started again after a second.
#[macro_export]
macro_rules! singleton {
    ($name:expr, $description:expr, $f:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::SingletonPlugin {
                name: $name,
                description: $description,
                run: |ctx| ::std::boxed::Box::pin($f(ctx)),
            }
        }
    };
}

/// The singleton plugin called `name`, if linked.
pub(crate) fn find(name: &str) -> Option<&'static SingletonPlugin> {
    inventory::iter::<SingletonPlugin>
        .into_iter()
        .find(|p| p.name == name)
}

/// Every singleton plugin linked into this binary, by name.
pub fn available() -> Vec<(&'static str, &'static str)> {
    let mut all: Vec<_> = inventory::iter::<SingletonPlugin>
        .into_iter()
        .map(|p| (p.name, p.description))
        .collect();
    all.sort_unstable();
    all
}

/// What is wrong with the singletons of a configuration (`logic_server.singletons`
/// and `logic_server.singleton_settings`), one line per problem naming the key.
pub fn check(
    enabled: &[String],
    settings: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Vec<String> {
    let names = || {
        available()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut problems = Vec::new();
    for (i, name) in enabled.iter().enumerate() {
        if find(name).is_none() {
            problems.push(format!(
                "logic_server.singletons[{i}]: no singleton named `{name}` is linked into this binary (linked: {})",
                names()
            ));
        } else if let Err(e) = keelson_protocol::transport::lease::check_lease_name(name) {
            problems.push(format!("logic_server.singletons[{i}]: {e}"));
        }
        if enabled[..i].contains(name) {
            problems.push(format!(
                "logic_server.singletons[{i}]: `{name}` is listed twice"
            ));
        }
    }
    for name in settings.keys().filter(|k| !enabled.contains(k)) {
        problems.push(format!(
            "logic_server.singleton_settings.{name}: `{name}` is not in logic_server.singletons"
        ));
    }
    problems
}

/// What a singleton task knows while it runs.
#[derive(Clone)]
pub struct SingletonCtx {
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) token: u64,
    pub(crate) fence: Fence,
    pub(crate) cancel: CancellationToken,
    pub(crate) settings: serde_json::Value,
}

impl fmt::Debug for SingletonCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingletonCtx")
            .field("name", &self.name)
            .field("token", &self.token)
            .finish()
    }
}

impl SingletonCtx {
    /// The singleton's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node running it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The fencing token of this run: greater than every earlier holder's.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether this server holds the lease at this instant: check right before each
    /// act. False from the moment the lease may be lost (before any other server
    /// can gain it), and once the task is cancelled.
    pub fn is_leader(&self) -> bool {
        !self.cancel.is_cancelled() && self.fence.check() == Some(self.token)
    }

    /// Whether the task was told to stop (lease lost, or the server drains).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the task must stop. Cancel-safe.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Its settings (`logic_server.singleton_settings.<name>`), `null` when absent.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_value(self.settings.clone()).map_err(|e| {
            HandlerError::internal(format!(
                "logic_server.singleton_settings.{}: {e}",
                self.name
            ))
        })
    }

    /// A context for a test of a singleton task: holding `token` until `cancel`.
    pub fn for_test(name: &str, token: u64, cancel: CancellationToken) -> Self {
        let fence = Fence::new();
        fence.hold(
            token,
            tokio::time::Instant::now() + std::time::Duration::from_secs(3600),
        );
        Self {
            name: name.to_owned(),
            node: "test".to_owned(),
            token,
            fence,
            cancel,
            settings: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn noop(_ctx: SingletonCtx) -> Result<(), HandlerError> {
        Ok(())
    }
    crate::singleton!("unit.noop", "does nothing", noop);

    #[test]
    fn a_configuration_naming_unknown_or_repeated_singletons_is_refused() {
        let settings =
            std::collections::BTreeMap::from([("unit.other".to_owned(), serde_json::json!({}))]);
        let problems = check(
            &[
                "unit.noop".to_owned(),
                "unit.missing".to_owned(),
                "unit.noop".to_owned(),
            ],
            &settings,
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("logic_server.singletons[1]: no singleton named `unit.missing`")
        );
        assert!(problems[0].contains("unit.noop"), "lists what is linked");
        assert!(problems[1].starts_with("logic_server.singletons[2]: `unit.noop` is listed twice"));
        assert!(problems[2].starts_with("logic_server.singleton_settings.unit.other:"));
        assert!(check(&["unit.noop".to_owned()], &Default::default()).is_empty());
    }

    #[tokio::test]
    async fn a_test_context_leads_until_cancelled() {
        let cancel = CancellationToken::new();
        let ctx = SingletonCtx::for_test("unit.noop", 3, cancel.clone());
        assert!(ctx.is_leader());
        assert_eq!(ctx.token(), 3);
        cancel.cancel();
        assert!(!ctx.is_leader());
        ctx.cancelled().await;
    }
}
