//! `counter.increment` and `counter.get`: a per-user counter.
//!
//! The counter is a context counter, not a value read and written back, so
//! increments of one user arriving at once (even on different servers) all count.
//! Settings: `[logic_server.plugins.counter] max_step` (default 1,000,000), the
//! largest step one request may add.

use keelson_logic_server::{Context, HandlerError, Json, Res};
use serde::{Deserialize, Serialize};

const KEY: &str = "counter";

/// Body of `counter.increment`; empty or `null` means `{"by": 1}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Increment {
    #[serde(default = "one")]
    by: i64,
}

fn one() -> i64 {
    1
}

/// What both handlers answer.
#[derive(Debug, Serialize)]
struct Value {
    value: i64,
}

/// The counter plugin's settings, shared by its handlers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Limits {
    /// Largest absolute step a single request may add.
    max_step: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_step: 1_000_000,
        }
    }
}

keelson_logic_server::settings_plugin!(Limits, "counter");

async fn increment(
    cx: Context,
    Json(step): Json<Option<Increment>>,
    limits: Res<Limits>,
) -> Result<Json<Value>, HandlerError> {
    let by = step.map_or(1, |i| i.by);
    if by.unsigned_abs() > limits.max_step.unsigned_abs() {
        return Err(HandlerError::bad_request(format!(
            "`by` must be between -{0} and {0}",
            limits.max_step
        )));
    }
    let value = cx.increment(KEY, by).await?;
    Ok(Json(Value { value }))
}

async fn get(cx: Context) -> Result<Json<Value>, HandlerError> {
    let value = cx.counter(KEY).await?;
    Ok(Json(Value { value }))
}

keelson_logic_server::handler!(
    "counter.increment",
    "adds `by` (default 1) to the user's counter and answers {\"value\": n}",
    increment
);
keelson_logic_server::handler!(
    "counter.get",
    "answers the user's counter as {\"value\": n}",
    get
);
