//! The `keelson` package: the embedded single-process mesh, the `ui-gateway` and
//! `logic-server` binaries, and the command line (`keelson token`, ...).
//!
//! This crate is thin glue: it loads the configuration ([`settings`]), builds the
//! transport it names, and starts the parts that live in `keelson-ui-gateway` and
//! `keelson-logic-server` ([`run`]). Handler plugins are linked here, because a plugin
//! depends on the logic-server library and the binary depends on the plugins.

pub mod dlq;
pub mod run;
pub mod settings;
pub mod status;
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

/// Keep the linked plugin crates' handler registrations in the binary.
pub fn link_plugins() {
    keelson_plugins_examples::link();
    #[cfg(feature = "test-handlers")]
    keelson_plugins_testing::link();
}

/// Shared `main` of the single-role binaries: load the configuration, set up
/// logging, run `body` on a runtime, and turn any error into a message and a
/// non-zero exit.
pub fn run_main<F, Fut>(source: settings::Source, body: F) -> std::process::ExitCode
where
    F: FnOnce(settings::KeelsonConfig) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let name = std::env::args()
        .next()
        .unwrap_or_else(|| "keelson".to_owned());
    let outcome = (|| -> anyhow::Result<()> {
        let config = settings::load(&source)?;
        telemetry::init(&config.log);
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(body(config))
    })();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
