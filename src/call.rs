//! `keelson call HANDLER [JSON] [--user U] [--gateway URL]`: call a handler as a
//! client would, and print the status and the body.
//!
//! With `--gateway` it is an HTTP `POST URL/api/HANDLER`, with a bearer token for
//! `--user` minted from the configuration's `[auth]` (as `keelson token` does).
//! Without, it goes straight over the configuration's transport, as a gateway does
//! (a request envelope; the user it names is believed by servers that trust this
//! broker user, see `trusted_publishers`). Either way the first line printed is the
//! HTTP status and its reason, then the body; an error status exits 1.

use crate::settings::KeelsonConfig;
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use keelson_protocol::client::{CallError, Client};
use keelson_protocol::transport::RequestError;
use keelson_protocol::{ReplyStatus, Transport};
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `keelson call`.
#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// The handler, e.g. `echo` or `cart.add`.
    pub handler: String,
    /// The request body (JSON); none sends what a gateway sends for an empty body.
    pub json: Option<String>,
    /// Call as this user: a token for it (with --gateway), or the request's user.
    #[arg(long)]
    pub user: Option<String>,
    /// A gateway's base URL, e.g. http://127.0.0.1:8080; without it the request goes
    /// over the configuration's transport.
    #[arg(long, value_name = "URL")]
    pub gateway: Option<String>,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// What a call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status (a gateway's, or the one a gateway would answer).
    pub status: u16,
    /// Its reason phrase or the reply status.
    pub reason: String,
    /// The body.
    pub body: String,
}

impl Answer {
    /// Whether the status is a success (2xx).
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The status line, then the body.
    pub fn render(&self) -> String {
        format!("{} {}\n{}", self.status, self.reason, self.body)
    }
}

/// Run `keelson call` with `config`.
pub async fn run(config: &KeelsonConfig, args: &CallArgs) -> anyhow::Result<Answer> {
    let body = match &args.json {
        Some(json) => {
            serde_json::from_str::<serde::de::IgnoredAny>(json)
                .with_context(|| format!("the request body is not JSON: {json}"))?;
            json.as_bytes().to_vec()
        }
        None => Vec::new(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    match &args.gateway {
        Some(url) => through_gateway(config, args, url, body, timeout).await,
        None => {
            // What a gateway sends for an empty body.
            let body = if body.is_empty() {
                b"null".to_vec()
            } else {
                body
            };
            let transport = connect(config, "call").await?;
            let answer =
                over_transport(&transport, &args.handler, body, args.user.clone(), timeout).await;
            transport.close().await;
            answer
        }
    }
}

/// The configuration's transport, for a command-line node named after `what`.
pub async fn connect(config: &KeelsonConfig, what: &str) -> anyhow::Result<Arc<dyn Transport>> {
    let node = format!("{what}-{}", std::process::id());
    config
        .transport
        .build(&node)
        .await
        .with_context(|| format!("cannot start the {} transport", config.transport.kind()))
}

/// Send `body` to `handler` as `user` over `transport`, as a gateway would, and
/// turn the reply into what the gateway would answer.
pub async fn over_transport(
    transport: &Arc<dyn Transport>,
    handler: &str,
    body: Vec<u8>,
    user: Option<String>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let client = Client::new(transport.clone());
    let error = |status: ReplyStatus, code: &str, message: &str| Answer {
        status: status.http_status(),
        reason: status_name(status),
        body: serde_json::json!({ "error": { "code": code, "message": message } }).to_string(),
    };
    let reply = match client.call(handler, body, user, timeout).await {
        Ok(reply) => reply,
        Err(CallError::Request(RequestError::Unroutable(_))) => {
            let message = format!("no logic server serves the handler `{handler}`");
            return Ok(error(ReplyStatus::NotFound, "unknown_handler", &message));
        }
        Err(CallError::Request(RequestError::Timeout)) => {
            let message = format!("no answer within {} ms", timeout.as_millis());
            return Ok(error(ReplyStatus::Timeout, "timeout", &message));
        }
        Err(e) => return Err(e).context("the call failed"),
    };
    Ok(match reply.status {
        ReplyStatus::Ok => Answer {
            status: reply.http_status.unwrap_or(200),
            reason: "ok".to_owned(),
            body: String::from_utf8_lossy(&reply.body).into_owned(),
        },
        status => {
            let (code, message) = reply
                .error
                .as_ref()
                .map_or(("", ""), |e| (e.code.as_str(), e.message.as_str()));
            error(status, code, message)
        }
    })
}

/// The snake-case name of a reply status, as it travels.
fn status_name(status: ReplyStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `POST {url}/api/{handler}` over HTTP/1.1.
async fn through_gateway(
    config: &KeelsonConfig,
    args: &CallArgs,
    url: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let uri: hyper::Uri = format!("{}/api/{}", url.trim_end_matches('/'), args.handler)
        .parse()
        .with_context(|| format!("--gateway {url} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        anyhow::bail!("--gateway {url}: only http:// URLs are supported (put TLS in front)");
    }
    let host = uri
        .host()
        .with_context(|| format!("--gateway {url} names no host"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let mut request = hyper::Request::post(uri.clone())
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(user) = &args.user {
        let secret = config.auth.load_secret()?;
        let ttl = Duration::from_secs(config.auth.token_ttl_s);
        let token = keelson_ui_gateway::issue_token_for(&config.auth, &secret, user, ttl)?;
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    let exchange = async {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot connect to {host}:{port}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok(Answer {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("").to_owned(),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {url} within {} ms", timeout.as_millis()))?
}
