//! The logic server: where handlers run.
//!
//! A logic server consumes the queue of its service from the configured transport,
//! runs each request in its own task under a concurrency limit, and replies. It hosts
//! handler plugins: crates that register [`Handler`]s with [`register_handler!`];
//! the configuration enables them by name and gives each its settings.
//!
//! * [`handler`]: the [`Handler`] trait, [`RequestCtx`], [`Response`], [`HandlerError`];
//! * [`context`]: the per-user context handlers read and write ([`UserContext`]),
//!   behind the [`ContextStore`] trait, replicated between servers by
//!   [`ReplicatedContextStore`];
//! * [`plugin`]: registration of handler plugins and the [`Registry`] built from config;
//! * [`server`]: the consume loop, deadlines, panics, drain on shutdown.
//!
//! # Writing a handler
//!
//! ```
//! use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
//!
//! /// Returns its body unchanged.
//! struct Echo;
//!
//! #[async_trait]
//! impl Handler for Echo {
//!     async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
//!         Ok(Response::raw_json(req.body().clone()))
//!     }
//! }
//!
//! keelson_logic_server::register_handler!("doc.echo", "returns its body", |_settings| Ok(Echo));
//! ```

pub mod config;
pub mod context;
pub mod governor;
pub mod handler;
pub mod plugin;
pub mod server;

mod consume;
mod dispatch;
#[cfg(feature = "test-failpoints")]
mod failpoint;
mod monitor;
mod stats;

pub use async_trait::async_trait;
pub use config::{ContextConfig, GovernorConfig, IdempotencyConfig, LogicServerConfig};
pub use context::{
    ContextError, ContextStore, Effects, RecordWrite, ReplicatedContextStore, UserContext,
};
pub use dispatch::{ROUTE_MISMATCH, UNTRUSTED_PUBLISHER};
pub use handler::{Handler, HandlerError, RequestCtx, Response};
pub use plugin::{HandlerPlugin, PluginError, Registry, Settings};
pub use server::{LogicServer, RunningServer, ServerError, ServerStats};

#[doc(hidden)]
pub use inventory;
