//! The `keelson` package: the embedded single-process mesh, the `ui-gateway` and
//! `logic-server` binaries, and the command line (`keelson token`, ...).
//!
//! This crate is thin glue: it loads the configuration ([`settings`]), builds the
//! transport it names, and starts the parts that live in `keelson-ui-gateway` and
//! `keelson-logic-server` ([`run`]). The whole command line is the library function
//! [`main`], so an application's own binary, `fn main() -> std::process::ExitCode {
//! keelson::main() }`, is a full `keelson` serving the application's handlers.
//!
//! Handler plugins are linked by the binaries, not by this library: Keelson's own
//! binaries link the example plugins (`src/main.rs`), and an application links its
//! own handlers only.
//!
//! With the default feature `jemalloc`, every binary built on this crate allocates
//! with jemalloc. An application that wants another global allocator turns the
//! feature off (`default-features = false, features = ["tls"]`).

pub mod admin;
pub mod call;
pub mod check;
pub mod cli;
pub mod context_get;
pub mod dlq;
pub mod handler_list;
pub mod jobs_cli;
pub mod metrics;
pub mod run;
pub mod scaffold;
pub mod settings;
pub mod status;
pub mod systemd;
pub mod telemetry;
pub mod topology;

pub use keelson_logic_server::testkit;
pub use keelson_logic_server::{handler, register_handler};

/// What a handler author needs, in one import: `use keelson::prelude::*;`.
pub mod prelude {
    pub use keelson_logic_server::{
        Body, Caller, Context, Error, Handler, HandlerError, Json, Meta, Plugin, RequestCtx, Res,
        Response, User, async_trait,
    };
}

/// The version this build reports in heartbeats and `--version`.
pub const VERSION: &str = if cfg!(feature = "next-preview") {
    concat!(env!("CARGO_PKG_VERSION"), "+next")
} else {
    env!("CARGO_PKG_VERSION")
};

pub use cli::main;

/// jemalloc, with its background threads: memory freed (after a flood of
/// connections, say) goes back to the system within seconds, without waiting for
/// more allocations, where glibc's arenas keep it. Declared in the library so that
/// every binary built on it, an application's included, gets it.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
