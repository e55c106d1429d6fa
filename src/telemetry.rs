//! Logging set-up shared by every binary, and what keeps request data out of it.

use crate::settings::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// lapin logs every message the broker returns at WARN with the whole message:
/// a request's body and user, verbatim. Keelson logs a returned request itself, in
/// one line without them; this target is kept quiet unless a filter names it.
const LAPIN_RETURNS: &str = "lapin::returned_messages";

/// Install the global subscriber: `RUST_LOG` if set, else the configured level; logs
/// go to standard error so that standard output stays for what a command prints.
/// Also installs the panic hook (see [`install_panic_hook`]).
pub fn init(config: &LogConfig) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| config.level.clone());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if !spec.contains(LAPIN_RETURNS)
        && let Ok(quiet) = format!("{LAPIN_RETURNS}=error").parse()
    {
        filter = filter.add_directive(quiet);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests that start several components) is not an error.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    install_panic_hook();
}

/// Replace the default panic hook, which writes to standard error outside the log
/// format and, with `RUST_BACKTRACE` set, a raw backtrace whose symbolization takes
/// about 100 MB that the process keeps. A panic in a handler is caught by the logic
/// server, which logs it as one line with the request (see
/// `keelson_logic_server::panic`); any other panic is logged here as one line with
/// its message, location and thread. No backtrace: the location names the line.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = keelson_logic_server::panic::message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        if keelson_logic_server::panic::caught(&message, &location) {
            return;
        }
        let thread = std::thread::current();
        tracing::error!(
            panic = %message,
            %location,
            thread = thread.name().unwrap_or("unnamed"),
            "panic"
        );
    }));
}
