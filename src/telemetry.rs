//! Logging set-up shared by every binary.

use crate::settings::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Install the global subscriber: `RUST_LOG` if set, else the configured level; logs
/// go to standard error so that standard output stays for what a command prints.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests that start several components) is not an error.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
