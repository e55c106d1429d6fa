//! The test mesh: a real gateway on a real socket, a real in-memory transport, and a
//! small logic server written here that consumes the service queue and answers with
//! encoded `Reply` envelopes. Nothing is mocked: requests cross the same transport
//! product feature the embedded mesh uses.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::transport::{Delivery, ServiceSpec};
use keelson_protocol::{Reply, ReplyStatus, Request, Transport, decode, encode};
use keelson_ui_gateway::{AuthConfig, Gateway, GatewayConfig, Secret, TokenVerifier};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

/// The secret the gateway under test verifies tokens with.
pub const SECRET: &str = "test-secret-of-the-gateway";

/// Routes the fake logic server serves.
///
/// * `echo`: returns the request body verbatim;
/// * `whoami`: returns what the envelope said: `{id, user, headers, deadline_unix_ms}`;
/// * `fail`: a handler failure (`HandlerError`, code `boom`);
/// * `conflict`: a `Conflict` reply with its own error info;
/// * `garbage`: a reply that is not an envelope;
/// * `empty`: an `Ok` reply with an empty body;
/// * `slow`: signals `started`, waits for a `release` permit, then echoes;
/// * `blackhole`: signals `started` and never answers.
pub const ROUTES: [&str; 8] = [
    "echo",
    "whoami",
    "fail",
    "conflict",
    "garbage",
    "empty",
    "slow",
    "blackhole",
];

/// A gateway serving on 127.0.0.1 in front of the fake logic server.
pub struct Mesh {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The transport both sides share.
    pub transport: MemoryTransport,
    /// The gateway's secret.
    pub secret: Secret,
    /// Receives the request id of every `slow` / `blackhole` request the fake server
    /// has taken off the queue.
    pub started: mpsc::UnboundedReceiver<String>,
    /// One permit lets one `slow` request answer.
    pub release: Arc<Semaphore>,
    /// HTTP client.
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    /// The gateway's `serve` task.
    pub server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Mesh {
    /// A mesh with the default gateway configuration.
    pub async fn start() -> Self {
        Self::with_config(GatewayConfig::default()).await
    }

    /// A mesh whose gateway uses `config` (its `listen` is replaced by 127.0.0.1:0).
    pub async fn with_config(config: GatewayConfig) -> Self {
        let secret = Secret::new(SECRET).unwrap();
        Self::with_verifier(config, TokenVerifier::hs256(secret, &AuthConfig::default())).await
    }

    /// A mesh whose gateway uses `config` and verifies tokens with `verifier`.
    pub async fn with_verifier(config: GatewayConfig, verifier: TokenVerifier) -> Self {
        let transport = MemoryTransport::new();
        let (started_tx, started) = mpsc::unbounded_channel();
        let release = Arc::new(Semaphore::new(0));
        start_fake_logic_server(&transport, started_tx, release.clone()).await;

        let secret = Secret::new(SECRET).unwrap();
        let config = GatewayConfig {
            listen: "127.0.0.1:0".into(),
            ..config
        };
        let gateway = Gateway::with_verifier(config, verifier, Arc::new(transport.clone()));
        let listener = gateway.bind().await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(gateway.serve(listener, async move {
            let _ = shutdown_rx.await;
        }));
        Self {
            base: format!("http://{addr}"),
            transport,
            secret,
            started,
            release,
            client: reqwest::Client::new(),
            shutdown: Some(shutdown_tx),
            server: Some(server),
        }
    }

    /// The URL of `path` on the gateway.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A POST of `body` to `/api/{handler}`.
    pub fn post(&self, handler: &str, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(&format!("/api/{handler}")))
            .body(body)
    }

    /// Wait (bounded) until the fake server has taken a slow/blackhole request; returns
    /// its request id.
    pub async fn wait_started(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.started.recv())
            .await
            .expect("the fake logic server never received the request")
            .expect("fake logic server gone")
    }

    /// Tell the gateway to shut down.
    pub fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Decode a JSON response body, failing the test with the raw text when it is not JSON.
pub async fn json_of(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Assert `response` is the gateway's JSON error with `status` and `code`.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "content-type"
    );
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
}

async fn start_fake_logic_server(
    transport: &MemoryTransport,
    started: mpsc::UnboundedSender<String>,
    release: Arc<Semaphore>,
) {
    let service = ServiceSpec {
        name: "fake".into(),
        routes: ROUTES.iter().map(|r| (*r).to_owned()).collect(),
    };
    transport.declare_service(&service).await.unwrap();
    let mut consumer = transport.consume("fake", 64).await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            tokio::spawn(answer(delivery, started.clone(), release.clone()));
        }
    });
}

async fn answer(
    delivery: Delivery,
    started: mpsc::UnboundedSender<String>,
    release: Arc<Semaphore>,
) {
    let request: Request = decode(&delivery.payload).unwrap();
    let id = request.id.clone();
    let reply = match request.handler.as_str() {
        "echo" => Reply::ok(&id, request.body, "fake").into(),
        "whoami" => {
            let seen = json!({
                "id": request.id,
                "user": request.user,
                "headers": request.headers,
                "deadline_unix_ms": request.deadline_unix_ms,
            });
            Reply::ok(&id, serde_json::to_vec(&seen).unwrap(), "fake").into()
        }
        "fail" => Reply::error(&id, ReplyStatus::HandlerError, "boom", "it broke", "fake").into(),
        "conflict" => Reply::error(&id, ReplyStatus::Conflict, "stale", "try again", "fake").into(),
        "garbage" => None,
        "empty" => Reply::ok(&id, Vec::new(), "fake").into(),
        "slow" => {
            let _ = started.send(id.clone());
            release.acquire().await.unwrap().forget();
            Reply::ok(&id, request.body, "fake").into()
        }
        "blackhole" => {
            let _ = started.send(id);
            // Hold the delivery unanswered for good.
            std::future::pending::<()>().await;
            return;
        }
        other => panic!("fake logic server got a request for {other}"),
    };
    let bytes = match reply {
        Some(reply) => encode::<Reply>(&reply).unwrap(),
        None => b"this is not MessagePack".to_vec(),
    };
    delivery.reply(bytes).await.unwrap();
    delivery.ack().await.unwrap();
}
