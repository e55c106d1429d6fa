//! `logic-server`: a logic server alone, consuming its service's queue. The same as
//! `keelson logic-server`.

// The handlers this binary offers (see src/main.rs for why this suffices).
use keelson_plugins_examples as _;
#[cfg(feature = "test-handlers")]
use keelson_plugins_testing as _;

fn main() -> std::process::ExitCode {
    keelson::cli::role_main(keelson::run::Role::LogicServer)
}
