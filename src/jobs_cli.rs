//! `keelson jobs list [--state S] | show ID | cancel ID`: background jobs as the logic
//! servers hold them (every server holds every job's record), for an operator. The
//! requests go over the configuration's transport to the job service
//! (`keelson_protocol::job`), marked as an operator's: answered only when this
//! command's broker user is one the servers trust (`trusted_publishers`).

use crate::settings::KeelsonConfig;
use anyhow::Context as _;
use keelson_protocol::client::Client;
use keelson_protocol::job::{CANCEL_ROUTE, GET_ROUTE, LIST_ROUTE};
use keelson_protocol::{ReplyStatus, Request};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The header that marks an operator's job request (see the logic server's job API).
const OPERATOR_HEADER: &str = "x-keelson-operator";

/// Arguments of `keelson jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub action: JobsAction,
    /// How long to wait for a logic server's answer, in milliseconds.
    #[arg(long, default_value_t = 5_000, global = true)]
    pub timeout_ms: u64,
}

/// What to do with jobs.
#[derive(Debug, clap::Subcommand)]
pub enum JobsAction {
    /// Every job held (queued, running, and finished ones until their result expires),
    /// oldest first, as JSON lines.
    List {
        /// Only jobs in this state: queued, running, succeeded, failed, cancelled.
        #[arg(long)]
        state: Option<String>,
    },
    /// One job's status, as JSON.
    Show {
        /// The job id.
        id: String,
    },
    /// Cancel a job: a queued one never runs, a running one is told to stop.
    Cancel {
        /// The job id.
        id: String,
    },
}

/// Run `keelson jobs`; what to print.
pub async fn run(config: &KeelsonConfig, args: &JobsArgs) -> anyhow::Result<String> {
    let (route, body) = match &args.action {
        JobsAction::List { state } => {
            if let Some(s) = state
                && keelson_protocol::job::JobState::parse(s).is_none()
            {
                anyhow::bail!(
                    "--state {s}: expected one of queued, running, succeeded, failed, cancelled"
                );
            }
            (LIST_ROUTE, serde_json::json!({ "state": state }))
        }
        JobsAction::Show { id } | JobsAction::Cancel { id } => {
            // Said here rather than as the servers' "no such job": a typo is not an
            // expired job.
            if !keelson_protocol::job::is_job_id(id) {
                anyhow::bail!(
                    "`{id}` is not a job id: 32 lowercase hex digits, as in the `Location: /jobs/ID` of the job's 202 or in `keelson jobs list`"
                );
            }
            let route = match args.action {
                JobsAction::Show { .. } => GET_ROUTE,
                _ => CANCEL_ROUTE,
            };
            (route, serde_json::json!({ "id": id }))
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let transport = crate::call::connect(config, "jobs").await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let deadline_ms = now.saturating_add(timeout).as_millis() as u64;
    let mut request = Request::new(
        format!("jobs-{}-{}", std::process::id(), now.as_nanos()),
        route,
        body.to_string().into_bytes(),
        deadline_ms,
    );
    request
        .headers
        .insert(OPERATOR_HEADER.to_owned(), "true".to_owned());
    let reply = Client::new(transport.clone())
        .send(&request, tokio::time::Instant::now() + timeout)
        .await;
    transport.close().await;
    let reply = reply.context(
        "no logic server answered the job request (none runs, or all are of a release before jobs)",
    )?;
    if reply.status != ReplyStatus::Ok {
        let message = reply.error.map(|e| e.message).unwrap_or_default();
        match (reply.status, &args.action) {
            (ReplyStatus::NotFound, JobsAction::Show { id } | JobsAction::Cancel { id }) => {
                anyhow::bail!(
                    "no such job: {id} (the logic servers hold no record of it: never submitted, or finished longer ago than its result_ttl_s)"
                )
            }
            (ReplyStatus::Forbidden, _) => anyhow::bail!(
                "refused: this command's broker user is not in the logic servers' trusted_publishers ({message})"
            ),
            (status, _) => anyhow::bail!(
                "the job request failed ({} {status:?}): {message}",
                status.http_status()
            ),
        }
    }
    let answer: serde_json::Value = serde_json::from_slice(&reply.body)?;
    if route == LIST_ROUTE {
        let lines: Vec<String> = answer["jobs"]
            .as_array()
            .map(|jobs| jobs.iter().map(|j| j.to_string()).collect())
            .unwrap_or_default();
        return Ok(lines.join("\n"));
    }
    Ok(serde_json::to_string_pretty(&answer)?)
}
