//! `bench-axum` (configuration A): the HTTP limit of this machine. A bare axum
//! server, served like the Keelson gateway serves (`axum::serve`), whose one route
//! `POST /api/echo` answers with the request body.
//!
//! Prints `listening on http://ADDR` when ready; stops on SIGTERM or SIGINT.

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use clap::Parser;
use std::process::ExitCode;

/// Raw axum echo server.
#[derive(Debug, Parser)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

async fn echo(body: Bytes) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], body)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-axum: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Runtime::new's worker count honours TOKIO_WORKER_THREADS, as in the keelson
    // binaries.
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cli.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cli.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        let app = Router::new().route("/api/echo", post(echo));
        axum::serve(listener, app)
            .with_graceful_shutdown(keelson_bench::procs::terminated())
            .await
            .context("serving")
    })
}
