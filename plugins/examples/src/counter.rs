//! `counter.increment` and `counter.get`: a per-user counter.
//!
//! The counter is a context counter, not a value read and written back, so
//! increments of one user arriving at once (even on different servers) all count.

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
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

struct IncrementHandler {
    max_step: i64,
}

/// Settings of `counter.increment`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct IncrementSettings {
    /// Largest absolute step a single request may add.
    max_step: i64,
}

impl Default for IncrementSettings {
    fn default() -> Self {
        Self {
            max_step: 1_000_000,
        }
    }
}

#[async_trait]
impl Handler for IncrementHandler {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let context = req.context()?;
        let by = match req.json::<Option<Increment>>()? {
            Some(i) => i.by,
            None => 1,
        };
        if by.unsigned_abs() > self.max_step.unsigned_abs() {
            return Err(HandlerError::bad_request(format!(
                "`by` must be between -{0} and {0}",
                self.max_step
            )));
        }
        let value = context.increment(KEY, by).await?;
        Response::json(&Value { value })
    }
}

struct GetHandler;

#[async_trait]
impl Handler for GetHandler {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let value = req.context()?.counter(KEY).await?;
        Response::json(&Value { value })
    }
}

keelson_logic_server::register_handler!(
    "counter.increment",
    "adds `by` (default 1) to the user's counter and answers {\"value\": n}",
    |settings| {
        let s: IncrementSettings = settings.parse()?;
        Ok(IncrementHandler {
            max_step: s.max_step,
        })
    }
);

keelson_logic_server::register_handler!(
    "counter.get",
    "answers the user's counter as {\"value\": n}",
    |_| Ok(GetHandler)
);
