//! Background jobs over HTTP: `POST /api/{handler}` with `Prefer: respond-async`
//! submits one (answered `202 Accepted` with `Location: /jobs/{id}`), `GET
//! /jobs/{id}[?wait=S]` shows it, `DELETE /jobs/{id}` cancels it.
//!
//! The gateway keeps nothing: each call is a request to the logic servers' job
//! service (`keelson_protocol::job`), whose reply is answered verbatim.

use crate::api::{exchange, respond, unix_ms_after};
use crate::auth;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::routes::AppState;
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use keelson_protocol::Request as Envelope;
use keelson_protocol::job::{CANCEL_ROUTE, GET_ROUTE};
use keelson_protocol::transport::RequestError;
use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;

/// The longest `?wait=` a gateway passes on (a server may hold less).
const MAX_WAIT_S: u64 = 60;

/// Whether the client asked for the request to run as a job (RFC 7240
/// `Prefer: respond-async`).
pub(crate) fn wants_job(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|p| {
                p.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("respond-async")
            })
        })
    })
}

/// Per-job choices of a submission, from the query string
/// (`?max_attempts=&timeout_ms=&result_ttl_s=`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobOptions {
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    result_ttl_s: Option<u64>,
}

impl JobOptions {
    pub(crate) fn from_query(uri: &axum::http::Uri) -> Result<Self, ApiError> {
        if uri.query().is_none_or(str::is_empty) {
            return Ok(Self::default());
        }
        Query::<Self>::try_from_uri(uri).map(|q| q.0).map_err(|e| {
            ApiError::BadQuery(format!(
                "job options are max_attempts, timeout_ms and result_ttl_s, positive integers: {}",
                e.body_text()
            ))
        })
    }

    /// The body of the submit request for `handler` with the client's JSON `body`.
    pub(crate) fn submission(&self, handler: &str, body: &[u8]) -> Result<Vec<u8>, ApiError> {
        let body: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        let submit = keelson_protocol::job::Submit {
            handler: handler.to_owned(),
            body,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            result_ttl_s: self.result_ttl_s,
        };
        serde_json::to_vec(&submit).map_err(|e| ApiError::Internal(e.to_string()))
    }
}

/// The query of `GET /jobs/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusQuery {
    wait: Option<u64>,
}

/// `GET /jobs/{id}[?wait=S]`.
pub(crate) async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::BadQuery(format!("`wait` is a number of seconds: {}", e.body_text()))
    })?;
    let wait = query.wait.unwrap_or(0).min(MAX_WAIT_S);
    ask(&state, &headers, request_id, GET_ROUTE, &id, wait).await
}

/// `DELETE /jobs/{id}`.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    ask(&state, &headers, request_id, CANCEL_ROUTE, &id, 0).await
}

async fn ask(
    state: &AppState,
    headers: &HeaderMap,
    request_id: Option<Extension<RequestId>>,
    route: &str,
    id: &str,
    wait_s: u64,
) -> Result<Response, ApiError> {
    let user = auth::user_from_headers(&state.verifier, headers)?;
    let _permit = state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    let timeout = state.config.request_timeout() + Duration::from_secs(wait_s);
    let body = serde_json::json!({ "id": id, "wait_s": wait_s });
    let request_id = request_id.map_or_else(RequestId::generate, |r| r.0);
    let mut envelope = Envelope::new(
        request_id.as_str(),
        route,
        body.to_string().into_bytes(),
        unix_ms_after(timeout),
    );
    envelope.user = user;
    let reply = exchange(state, envelope, Instant::now() + timeout)
        .await
        .map_err(|e| match e {
            // No server consumes the job service (none runs, or all are of a release
            // before jobs).
            ApiError::UnknownHandler(_) => {
                ApiError::Unavailable(RequestError::Unroutable(route.to_owned()).to_string())
            }
            e => e,
        })?;
    Ok(respond(reply))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn prefer_respond_async_among_other_preferences() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("prefer", HeaderValue::from_static(v));
            h
        };
        assert!(wants_job(&with("respond-async")));
        assert!(wants_job(&with("return=minimal, Respond-Async; wait=10")));
        assert!(!wants_job(&with("return=minimal")));
        assert!(!wants_job(&HeaderMap::new()));
    }

    #[test]
    fn job_options_from_the_query() {
        let uri = |q: &str| format!("/api/h?{q}").parse::<axum::http::Uri>().unwrap();
        let o = JobOptions::from_query(&uri("max_attempts=3&timeout_ms=5000")).unwrap();
        assert_eq!(
            (o.max_attempts, o.timeout_ms, o.result_ttl_s),
            (Some(3), Some(5000), None)
        );
        assert!(JobOptions::from_query(&uri("retries=3")).is_err());
        assert!(JobOptions::from_query(&uri("max_attempts=-1")).is_err());
    }
}
