//! The logic server: where handlers run.
//!
//! A logic server consumes the queue of its service from the configured transport,
//! runs each request in its own task under a concurrency limit, and replies. It hosts
//! handler plugins: crates that register handlers with [`handler!`] (async
//! functions) or [`register_handler!`] ([`Handler`] implementations); the
//! configuration enables them by name, and the [`Plugin`]s (shared resources) they
//! take are set up at start.
//!
//! * [`handler_fn`] and [`extract`]: handlers as async functions, their arguments
//!   ([`Json`], [`User`], [`Context`], [`Res`], [`Meta`], [`Caller`]) and results;
//! * [`handler`]: the [`Handler`] trait, [`RequestCtx`], [`Response`], [`HandlerError`];
//! * [`resource`]: [`Plugin`] resources and their lifecycle; [`call`]: calls to
//!   other handlers; [`testkit`]: running handlers in unit tests;
//! * [`context`]: the per-user context handlers read and write ([`UserContext`]),
//!   behind the [`ContextStore`] trait, replicated between servers by
//!   [`ReplicatedContextStore`];
//! * [`plugin`]: registration of handler plugins and the [`Registry`] built from config;
//! * [`server`]: the consume loop, deadlines, panics, drain on shutdown;
//! * [`schedules`]: cluster-wide cron schedules, each slot fired once as a job;
//!   [`singleton`]: tasks that run on one server of the cluster at a time.
//!
//! # Writing a handler
//!
//! A handler is an async function whose arguments are [extractors](extract) and whose
//! result is anything [`IntoReply`]; one line registers it:
//!
//! ```
//! use keelson_logic_server::{Context, HandlerError, Json};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Visit { page: String }
//!
//! #[derive(Serialize)]
//! struct Visits { page: String, visits: i64 }
//!
//! /// 401 when anonymous, 400 on a bad body, else the user's visits of the page.
//! async fn visit(cx: Context, Json(v): Json<Visit>) -> Result<Json<Visits>, HandlerError> {
//!     let visits = cx.increment(&v.page, 1).await?;
//!     Ok(Json(Visits { page: v.page, visits }))
//! }
//!
//! keelson_logic_server::handler!("doc.visit", "counts the user's visits of a page", visit);
//! ```
//!
//! The [`Handler`] trait remains for handlers that want the whole [`RequestCtx`]:
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

pub mod call;
pub mod config;
pub mod context;
pub mod error;
pub mod extract;
pub mod governor;
pub mod handler;
pub mod handler_fn;
pub mod job_ctx;
pub mod jobs;
pub mod lifecycle;
pub mod operator;
pub mod panic;
pub mod plugin;
pub mod resource;
pub mod schedules;
pub mod server;
pub mod singleton;
pub mod testkit;

mod consume;
mod dispatch;
#[cfg(feature = "test-failpoints")]
mod failpoint;
mod leased;
mod metrics;
mod monitor;
mod stats;
mod trace;

pub use async_trait::async_trait;
pub use call::Caller;
pub use config::{
    ContextConfig, GovernorConfig, IdempotencyConfig, LogicServerConfig, ScheduleConfig,
};
pub use context::{
    ContextError, ContextStore, Effects, RecordValue, RecordWrite, ReplicatedContextStore,
    UserContext,
};
pub use dispatch::{ROUTE_MISMATCH, UNTRUSTED_PUBLISHER};
pub use error::Error;
pub use extract::{Body, Context, FromRequest, Json, Meta, Res, User};
pub use handler::{Handler, HandlerError, RequestCtx, Response};
pub use handler_fn::IntoReply;
pub use job_ctx::JobCtx;
pub use lifecycle::{Lifecycle, Phase};
pub use metrics::describe_metrics;
pub use operator::OperatorService;
pub use plugin::{HandlerPlugin, PluginError, Registry, Settings};
pub use resource::{Plugin, PluginDecl, Resources};
pub use server::{LogicServer, RunningServer, ServerError, ServerStats};
pub use singleton::{SingletonCtx, SingletonPlugin};

#[doc(hidden)]
pub use inventory;
