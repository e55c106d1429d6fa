//! `ui-gateway`: the HTTP gateway alone; logic servers run elsewhere. The same as
//! `keelson ui-gateway`.

// Keelson's binaries link the same plugins (see src/main.rs for why this suffices).
use keelson_plugins_examples as _;
#[cfg(feature = "test-handlers")]
use keelson_plugins_testing as _;

fn main() -> std::process::ExitCode {
    keelson::cli::role_main(keelson::run::Role::Gateway)
}
