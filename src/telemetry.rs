//! Logging and tracing set-up shared by every binary, and what keeps request data out
//! of logs.
//!
//! Spans carry the request's `request_id` and `trace_id`, and both formats print the
//! fields of the spans a line is logged in (JSON: `span` and `spans`), so every line
//! of a request shows them. With `[telemetry] otlp_endpoint` set, an OpenTelemetry
//! layer also exports Keelson's spans (see `keelson_protocol::trace`); without it
//! there is neither layer nor exporter.

use crate::settings::{LogConfig, LogFormat, TelemetryConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

/// lapin logs every message the broker returns at WARN with the whole message:
/// a request's body and user, verbatim. Keelson logs a returned request itself, in
/// one line without them; this target is kept quiet unless a filter names it.
const LAPIN_RETURNS: &str = "lapin::returned_messages";

/// Install the global subscriber: `RUST_LOG` if set, else the configured level; logs
/// go to standard error so that standard output stays for what a command prints.
/// Also installs the panic hook (see [`install_panic_hook`]). No span is exported.
pub fn init(config: &LogConfig) {
    install(config, None);
}

/// [`init`], and with `[telemetry] otlp_endpoint` set, span export over OTLP/HTTP
/// too. Call it inside the Tokio runtime that will run the process (the exporter
/// runs on it); keep the returned [`Traces`] and [`Traces::shutdown`] it at exit, so
/// that the last spans are sent.
pub fn init_with_traces(
    log: &LogConfig,
    telemetry: &TelemetryConfig,
    default_service: &str,
) -> Result<Traces, String> {
    let provider = match telemetry.traces_url() {
        Some(url) => Some(tracer_provider(&url, telemetry, default_service)?),
        None => None,
    };
    install(log, provider.clone());
    if let Some(url) = telemetry.traces_url() {
        // The URL is configuration, not request data.
        tracing::info!(%url, sampling_ratio = telemetry.sampling_ratio, "exporting traces over OTLP");
    }
    Ok(Traces { provider })
}

/// The exporter of a process, to flush at exit.
#[derive(Debug)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Send the spans not yet exported and stop the exporter (bounded by the SDK's
    /// export timeout). Call it from outside the runtime's worker threads, while the
    /// runtime still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "could not send the last spans");
        }
    }
}

fn tracer_provider(
    url: &str,
    telemetry: &TelemetryConfig,
    default_service: &str,
) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    use opentelemetry_sdk::trace::Sampler;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("at key `telemetry.otlp_endpoint`: cannot export to `{url}`: {e}"))?;
    // Batches are sent from a task of the process's runtime (the HTTP client is
    // Tokio's); queue size and delay follow the SDK's OTEL_BSP_* variables.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let service = telemetry
        .service_name
        .clone()
        .unwrap_or_else(|| default_service.to_owned());
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        telemetry.sampling_ratio,
    )));
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build())
}

/// The log filter: `RUST_LOG` if set, else `level`, with lapin's returned messages
/// quiet unless named.
fn log_filter(level: &str) -> EnvFilter {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| level.to_owned());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if !spec.contains(LAPIN_RETURNS)
        && let Ok(quiet) = format!("{LAPIN_RETURNS}=error").parse()
    {
        filter = filter.add_directive(quiet);
    }
    filter
}

fn install(config: &LogConfig, provider: Option<SdkTracerProvider>) {
    let filter = log_filter(&config.level);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A second init (tests that start several components) is not an error.
    match provider {
        // Export off: the plain subscriber, its filter global (cheapest).
        None => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi);
            let _ = match config.format {
                LogFormat::Text => builder.try_init(),
                LogFormat::Json => builder.json().try_init(),
            };
        }
        // Export on: the log filter applies to the log lines only, so that Keelson's
        // spans are exported whatever the log level.
        Some(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            use tracing_subscriber::prelude::*;
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi);
            let fmt = match config.format {
                LogFormat::Text => fmt.with_filter(filter).boxed(),
                LogFormat::Json => fmt.json().with_filter(filter).boxed(),
            };
            let keelson = tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("keelson")
                    && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
            });
            let otel = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("keelson"))
                .with_filter(keelson);
            if tracing_subscriber::registry()
                .with(fmt)
                .with(otel)
                .try_init()
                .is_ok()
            {
                keelson_protocol::trace::enable();
            }
        }
    }
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
