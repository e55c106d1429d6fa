//! `report.build`: a handler made to run as a background job (`Prefer:
//! respond-async`): it works about one millisecond per row, reports its progress,
//! stops early when cancelled, and answers a summary.

use keelson_logic_server::{HandlerError, JobCtx, Json};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Deserialize)]
struct Report {
    rows: u64,
}

#[derive(Serialize)]
struct Summary {
    rows: u64,
    checksum: u64,
    attempt: u32,
}

/// Rows are worked in steps of a hundredth of the report (at least one row).
async fn build(
    job: Option<JobCtx>,
    Json(report): Json<Report>,
) -> Result<Json<Summary>, HandlerError> {
    if report.rows > 3_600_000 {
        return Err(HandlerError::bad_request(
            "at most 3,600,000 rows (an hour)",
        ));
    }
    let step = (report.rows / 100).max(1);
    let mut done = 0;
    let mut checksum = 0u64;
    while done < report.rows {
        if job.as_ref().is_some_and(JobCtx::is_cancelled) {
            return Err(HandlerError::Conflict("cancelled".to_owned()));
        }
        let n = step.min(report.rows - done);
        tokio::time::sleep(Duration::from_millis(n)).await;
        checksum = (done..done + n).fold(checksum, |c, row| c.wrapping_mul(31).wrapping_add(row));
        done += n;
        if let Some(job) = &job {
            job.progress(
                done as f64 / report.rows as f64,
                format!("{done} of {} rows", report.rows),
            );
        }
    }
    Ok(Json(Summary {
        rows: report.rows,
        checksum,
        attempt: job.as_ref().map_or(1, JobCtx::attempt),
    }))
}

keelson_logic_server::handler!(
    "report.build",
    "builds a report of {\"rows\": n} in about n ms; run it as a job (Prefer: respond-async)",
    build
);
