//! Handlers as async functions, run through the test kit (the real server over the
//! in-memory transport): extractors, replies, plugins and their lifecycle,
//! handler-to-handler calls, and the multi-server test cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_logic_server::testkit::{TestCluster, TestRequest};
use keelson_logic_server::{
    Caller, Context, Error, HandlerError, Json, LogicServer, Meta, Plugin, Registry, Res, Response,
    User,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

// ---------------------------------------------------------------------------------
// Handlers of this test binary
// ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Note {
    text: String,
}

/// 201 with a Location, the note numbered in the user's context.
async fn create(cx: Context, Json(note): Json<Note>) -> Result<Response, HandlerError> {
    let n = cx.increment("notes", 1).await?;
    cx.set(&format!("note.{n}"), &note.text).await?;
    Response::created(format!("/api/t.notes/{n}"), &json!({ "n": n }))
}

/// The same extractors in the other order.
async fn create_reversed(Json(note): Json<Note>, cx: Context) -> Result<Response, HandlerError> {
    create(cx, Json(note)).await
}

/// 204.
async fn forget(cx: Context) -> Result<(), HandlerError> {
    cx.delete("note.1").await?;
    Ok(())
}

/// Anonymous or not.
async fn whoami(user: Option<User>, meta: Meta) -> Json<Value> {
    let left = meta
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    Json(json!({
        "user": user.map(|u| u.0),
        "left_ms": left.as_millis() as u64,
        "id": meta.id,
        "traceparent": meta.headers.get("traceparent"),
    }))
}

#[derive(Debug, thiserror::Error)]
#[error("the database refused: {0}")]
struct DbError(String);

/// A foreign error through `?`.
async fn broken() -> Result<Json<Value>, Error> {
    Err(DbError(
        "password authentication failed for user app".into(),
    ))?
}

/// Calls the handler its body names, with the body's `body`.
async fn relay(calls: Caller, Json(call): Json<Value>) -> Result<Json<Value>, HandlerError> {
    let handler = call["handler"].as_str().unwrap_or_default().to_owned();
    calls.call(&handler, &call["body"]).await.map(Json)
}

/// Calls itself: a cycle.
async fn cycle(calls: Caller) -> Result<Json<Value>, HandlerError> {
    calls.call("t.cycle", &()).await.map(Json)
}

/// A body whose fields all have defaults.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
struct Paging {
    page: u32,
    per_page: Option<u32>,
}

async fn paging(Json(p): Json<Paging>) -> Json<Paging> {
    Json(p)
}

keelson_logic_server::handler!("t.paging", "answers its paging", paging);
keelson_logic_server::handler!("t.create", "creates a note", create);
keelson_logic_server::handler!("t.create_reversed", "creates a note", create_reversed);
keelson_logic_server::handler!("t.forget", "forgets the notes", forget);
keelson_logic_server::handler!("t.whoami", "says who asks", whoami);
keelson_logic_server::handler!("t.broken", "fails with a foreign error", broken);
keelson_logic_server::handler!("t.relay", "calls another handler", relay);
keelson_logic_server::handler!("t.cycle", "calls itself", cycle);

/// A plugin with a shutdown hook that records what it saw.
struct Tracked {
    greeting: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TrackedSettings {
    greeting: String,
    fail: bool,
}

impl Plugin for Tracked {
    const NAME: &'static str = "tracked";
    type Settings = TrackedSettings;
    async fn setup(settings: TrackedSettings) -> Result<Self, Error> {
        if settings.fail {
            return Err(Error::internal(
                "cannot reach the price service at 10.0.0.9",
            ));
        }
        Ok(Tracked {
            greeting: settings.greeting,
        })
    }
}

/// A plugin whose shutdown hook records when it ran (only `t.slow` takes it).
struct Hooked;

static SHUTDOWNS: AtomicU32 = AtomicU32::new(0);
static SLOW_DONE: AtomicBool = AtomicBool::new(false);
static DONE_AT_SHUTDOWN: AtomicBool = AtomicBool::new(false);

impl Plugin for Hooked {
    const NAME: &'static str = "hooked";
    type Settings = serde::de::IgnoredAny;
    async fn setup(_: serde::de::IgnoredAny) -> Result<Self, Error> {
        Ok(Hooked)
    }
    async fn shutdown(&self) {
        DONE_AT_SHUTDOWN.store(SLOW_DONE.load(Ordering::SeqCst), Ordering::SeqCst);
        SHUTDOWNS.fetch_add(1, Ordering::SeqCst);
    }
}

async fn greet(plugin: Res<Tracked>) -> Json<String> {
    Json(plugin.greeting.clone())
}

/// Works a while (its work is the wait), then says so.
async fn slow(_plugin: Res<Hooked>) -> Json<bool> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    SLOW_DONE.store(true, Ordering::SeqCst);
    Json(true)
}

keelson_logic_server::handler!("t.greet", "greets with the plugin's greeting", greet);
keelson_logic_server::handler!("t.slow", "takes a while", slow);

// ---------------------------------------------------------------------------------
// Log capture
// ---------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What this test binary logged so far.
fn logs() -> String {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    let captured = LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        captured
    });
    String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned()
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_handler_answers_201_with_a_location_and_204_without_a_body() {
    let reply = TestRequest::new("t.create")
        .user("ada")
        .json(&json!({"text": "milk"}))
        .send()
        .await;
    assert_eq!(reply.status(), 201);
    assert_eq!(reply.header("location"), Some("/api/t.notes/1"));
    assert_eq!(reply.json::<Value>(), json!({"n": 1}));
    assert_eq!(
        reply.context::<String>("note.1").await.as_deref(),
        Some("milk")
    );

    let reply = TestRequest::new("t.forget")
        .user("ada")
        .context_value("note.1", "milk")
        .send()
        .await;
    assert_eq!(reply.status(), 204);
    assert!(reply.body().is_empty());
    assert_eq!(reply.context::<String>("note.1").await, None);
}

#[tokio::test]
async fn a_bad_body_is_a_400_that_says_why_and_an_anonymous_one_is_a_401_in_any_order() {
    let reply = TestRequest::new("t.create")
        .user("ada")
        .json(&json!({"text": 7}))
        .send()
        .await;
    assert_eq!(reply.status(), 400);
    assert_eq!(reply.error_code(), Some("bad_request"));
    let message = reply.error_message().unwrap();
    assert!(
        message.contains("invalid type: integer `7`, expected a string"),
        "{message}"
    );

    for handler in ["t.create", "t.create_reversed"] {
        let reply = TestRequest::new(handler)
            .raw_body("{\"nope\":1}")
            .send()
            .await;
        assert_eq!(
            reply.status(),
            401,
            "{handler}: {:?}",
            reply.error_message()
        );
        assert_eq!(reply.error_code(), Some("unauthorized"));
    }
}

#[tokio::test]
async fn no_body_reads_as_the_defaults_of_a_body_whose_fields_all_have_them() {
    // No HTTP body reaches a handler as `null` (what the gateway sends).
    let reply = TestRequest::new("t.paging").send().await;
    assert_eq!(reply.json::<Value>(), json!({"page": 0, "per_page": null}));
    let reply = TestRequest::new("t.paging").raw_body("").send().await;
    assert_eq!(reply.json::<Value>(), json!({"page": 0, "per_page": null}));
    let reply = TestRequest::new("t.paging")
        .json(&json!({"page": 2}))
        .send()
        .await;
    assert_eq!(reply.json::<Value>(), json!({"page": 2, "per_page": null}));
    // A body that is there but wrong is still a 400.
    let reply = TestRequest::new("t.paging")
        .json(&json!("all"))
        .send()
        .await;
    assert_eq!(reply.status(), 400);
}

#[tokio::test]
async fn an_optional_user_takes_anonymous_requests_and_meta_carries_the_request() {
    let reply = TestRequest::new("t.whoami").send().await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.json::<Value>()["user"], Value::Null);
    let reply = TestRequest::new("t.whoami")
        .user("ada")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    let body = reply.json::<Value>();
    assert_eq!(body["user"], "ada");
    assert!(body["left_ms"].as_u64().unwrap() <= 3_000);
    assert!(body["traceparent"].as_str().unwrap().starts_with("00-0af7"));
}

#[tokio::test]
async fn a_foreign_error_is_a_500_whose_cause_is_logged_not_shown() {
    let _ = logs();
    let reply = TestRequest::new("t.broken").send().await;
    assert_eq!(reply.status(), 500);
    assert_eq!(reply.error_message(), Some("the handler failed"));
    assert!(!format!("{:?}", reply.reply()).contains("password"));
    let logged = logs();
    assert!(
        logged.contains("the database refused: password authentication failed for user app"),
        "{logged}"
    );
}

#[tokio::test]
async fn a_failing_plugin_setup_names_the_plugin_and_the_cause() {
    let settings = BTreeMap::from([("tracked".to_owned(), json!({"fail": true}))]);
    let e = Registry::build(&["t.greet".to_owned()], &BTreeMap::new(), &settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("plugin `tracked`"), "{e}");
    assert!(
        e.contains("cannot reach the price service at 10.0.0.9"),
        "{e}"
    );

    let settings = BTreeMap::from([("tracked".to_owned(), json!({"greting": "hi"}))]);
    let e = Registry::build(&["t.greet".to_owned()], &BTreeMap::new(), &settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("logic_server.plugins.tracked"), "{e}");
    assert!(e.contains("unknown field `greting`"), "{e}");

    let reply = TestRequest::new("t.greet")
        .plugin_settings("tracked", &json!({"greeting": "hi"}))
        .send()
        .await;
    assert_eq!(reply.json::<String>(), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hooks_run_once_after_the_drain() {
    let transport = keelson_protocol::transport::memory::MemoryTransport::new();
    let shared: Arc<dyn keelson_protocol::Transport> = Arc::new(transport.clone());
    let registry = Registry::build(&["t.slow".to_owned()], &BTreeMap::new(), &BTreeMap::new())
        .await
        .unwrap();
    let resources = registry.resources().clone();
    let store = keelson_logic_server::ReplicatedContextStore::start(
        shared.clone(),
        "hooks",
        Default::default(),
    )
    .await
    .unwrap();
    let config = keelson_logic_server::LogicServerConfig {
        service: "hooks".into(),
        ..Default::default()
    };
    let server = LogicServer::new(config, "hooks", shared.clone(), registry, store)
        .start()
        .await
        .unwrap();
    let client = keelson_protocol::client::Client::new(shared);
    let call = tokio::spawn(async move {
        client
            .call("t.slow", Vec::new(), None, Duration::from_secs(5))
            .await
    });
    // Shut down once the request is running (it is in flight, not queued).
    while server.stats().in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
    let reply = call.await.unwrap().unwrap();
    assert_eq!(reply.status, keelson_protocol::ReplyStatus::Ok);
    assert_eq!(SHUTDOWNS.load(Ordering::SeqCst), 1);
    assert!(
        DONE_AT_SHUTDOWN.load(Ordering::SeqCst),
        "the hook ran before the in-flight request finished"
    );
    resources.shutdown().await;
    assert_eq!(SHUTDOWNS.load(Ordering::SeqCst), 1, "once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_carries_the_user_and_the_deadline_and_a_cycle_ends_504_at_the_deadline() {
    let reply = TestRequest::new("t.relay")
        .with_handler("t.whoami")
        .user("ada")
        .timeout(Duration::from_secs(2))
        .json(&json!({"handler": "t.whoami", "body": null}))
        .send()
        .await;
    let body = reply.json::<Value>();
    assert_eq!(body["user"], "ada");
    assert!(body["left_ms"].as_u64().unwrap() <= 2_000, "{body}");
    assert!(
        body["id"].as_str().unwrap().ends_with(".1"),
        "the nested request's id derives from the caller's: {body}"
    );

    // The callee's failure keeps its kind.
    let reply = TestRequest::new("t.relay")
        .with_handler("t.create")
        .user("ada")
        .json(&json!({"handler": "t.create", "body": {"text": 1}}))
        .send()
        .await;
    assert_eq!(reply.status(), 400);

    let started = std::time::Instant::now();
    let reply = TestRequest::new("t.cycle")
        .user("ada")
        .timeout(Duration::from_millis(800))
        .send()
        .await;
    assert_eq!(reply.status(), 504, "{:?}", reply.error_message());
    assert!(
        started.elapsed() < Duration::from_millis(1_800),
        "answered at the deadline, not later: {:?}",
        started.elapsed()
    );
}

#[derive(Serialize)]
struct Empty {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_replicates_context_and_serves_on_when_a_server_stops() {
    let mut cluster = TestCluster::builder(&["t.create", "t.whoami"])
        .start(3)
        .await;
    let reply = cluster
        .call(Some("ada"), "t.create", &json!({"text": "milk"}))
        .await;
    assert_eq!(reply.status(), 201);
    cluster.settle().await;
    for i in 0..3 {
        assert_eq!(
            cluster
                .context_on::<String>(i, "ada", "note.1")
                .await
                .as_deref(),
            Some("milk"),
            "server-{i}"
        );
    }
    // Requests keep coming while a server stops: every one is answered.
    let mut served_by = std::collections::BTreeSet::new();
    for round in 0..30 {
        if round == 10 {
            cluster.stop(0).await;
        }
        let reply = cluster.call(Some("ada"), "t.whoami", &Empty {}).await;
        assert_eq!(reply.status(), 200, "round {round}");
        if round >= 10 {
            served_by.insert(TestCluster::served_by(&reply).to_owned());
        }
    }
    assert!(!served_by.contains("server-0"), "{served_by:?}");
    assert!(!served_by.is_empty());
    cluster.shutdown().await;
}

#[tokio::test]
async fn settings_of_a_disabled_handler_are_ignored_and_of_an_unknown_one_refused() {
    let enabled = ["t.whoami".to_owned()];
    // `t.create` is linked but not enabled: its section may stay in the file.
    let settings = BTreeMap::from([("t.create".to_owned(), json!({"anything": 1}))]);
    let registry = Registry::build(&enabled, &settings, &BTreeMap::new()).await;
    assert_eq!(registry.unwrap().names(), ["t.whoami"]);

    // A name no linked plugin offers is a typo: refused, with the names there are.
    let settings = BTreeMap::from([("t.craete".to_owned(), json!({}))]);
    let e = Registry::build(&enabled, &settings, &BTreeMap::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"t.craete\" configures a handler no linked plugin offers"),
        "{e}"
    );
    assert!(e.contains("t.create"), "{e}");
}
