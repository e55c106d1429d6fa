//! `keelson context get --user U`: print a user's replicated context, as whichever
//! logic server takes the operator request holds it (every server holds every
//! context). See `keelson_protocol::operator` for who may ask and why no gateway
//! can.

use crate::settings::KeelsonConfig;
use keelson_protocol::ReplyStatus;
use keelson_protocol::operator::CONTEXT_GET_ROUTE;
use std::time::Duration;

/// Arguments of `keelson context`.
#[derive(Debug, clap::Args)]
pub struct ContextArgs {
    #[command(subcommand)]
    pub action: ContextAction,
}

/// What to do with contexts.
#[derive(Debug, clap::Subcommand)]
pub enum ContextAction {
    /// Print USER's context as JSON: `{"user", "values", "counters"}`.
    Get {
        /// The user id.
        #[arg(long)]
        user: String,
        /// How long to wait for a logic server's answer, in milliseconds.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
}

/// Run `keelson context`; the JSON to print.
pub async fn run(config: &KeelsonConfig, args: &ContextArgs) -> anyhow::Result<String> {
    let ContextAction::Get { user, timeout_ms } = &args.action;
    let timeout = Duration::from_millis(*timeout_ms);
    let transport = crate::call::connect(config, "context").await?;
    let answer = crate::call::over_transport(
        &transport,
        CONTEXT_GET_ROUTE,
        b"null".to_vec(),
        Some(user.clone()),
        timeout,
    )
    .await;
    transport.close().await;
    let answer = answer?;
    if answer.is_success() {
        let json: serde_json::Value = serde_json::from_str(&answer.body)?;
        return Ok(serde_json::to_string_pretty(&json)?);
    }
    let message = serde_json::from_str::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let status = answer.status;
    let why = if status == ReplyStatus::NotFound.http_status() && message.starts_with("no logic") {
        "no logic server answers operator requests on this transport: none runs, or all are of a release before `keelson context get`".to_owned()
    } else if status == ReplyStatus::Timeout.http_status() {
        format!(
            "no logic server answered within {timeout_ms} ms: servers of releases before `keelson context get` do not answer it (--timeout-ms to wait longer)"
        )
    } else if status == ReplyStatus::Forbidden.http_status() {
        format!(
            "refused: this command's broker user is not in the logic servers' trusted_publishers ({message})"
        )
    } else if status == ReplyStatus::NotFound.http_status() {
        format!("no context is held for the user `{user}`")
    } else {
        format!("{} {}: {message}", answer.status, answer.reason)
    };
    anyhow::bail!("{why}")
}
