//! Background jobs on the embedded mesh (memory transport), as a client meets them:
//! the real `keelson` binary, real HTTP. The same semantics over RabbitMQ, with
//! servers killed, are in `tests/jobs_cluster.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{Bin, Process, Scratch, http, token};

use support::SECRET;

fn config(jobs: &str) -> String {
    format!(
        r#"
[transport]
kind = "memory"

[gateway]
listen = "127.0.0.1:0"
request_timeout_ms = 5000

[auth]
secret = "{SECRET}"

[logic_server]
handlers = ["report.build", "test.job", "echo"]
drain_timeout_ms = 2000

[logic_server.jobs]
backoff_base_ms = 300
{jobs}
"#
    )
}

struct Node {
    process: Process,
    config: std::path::PathBuf,
    _scratch: Scratch,
}

impl Node {
    async fn start(jobs: &str) -> Self {
        let scratch = Scratch::new();
        let config = scratch.write("keelson.toml", &config(jobs));
        let log = scratch.path().join("keelson.log");
        let process = Process::start(Bin::Keelson, &config, &log, &[]).await;
        Self {
            process,
            config,
            _scratch: scratch,
        }
    }

    fn base(&self) -> String {
        self.process.url("x").trim_end_matches("/api/x").to_owned()
    }

    fn token(&self, user: &str) -> String {
        token(&self.config, user)
    }

    /// Submit `handler` as a job; the 202's body and `Location`.
    async fn submit(
        &self,
        handler: &str,
        body: Value,
        user: Option<&str>,
        query: &str,
    ) -> (Value, String) {
        let mut req = http()
            .post(format!("{}/api/{handler}{query}", self.base()))
            .header("prefer", "respond-async")
            .json(&body);
        if let Some(user) = user {
            req = req.bearer_auth(self.token(user));
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 202, "submit answered {status}: {body}");
        (body, location)
    }

    async fn get(&self, id: &str, user: Option<&str>, query: &str) -> (u16, Value) {
        let mut req = http().get(format!("{}/jobs/{id}{query}", self.base()));
        if let Some(user) = user {
            req = req.bearer_auth(self.token(user));
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn wait_done(&self, id: &str, user: Option<&str>) -> Value {
        let (status, body) = self.get(id, user, "?wait=30").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            ["succeeded", "failed", "cancelled"].contains(&body["state"].as_str().unwrap()),
            "not finished after ?wait=30: {body}"
        );
        body
    }

    async fn cancel(&self, id: &str, user: Option<&str>) -> (u16, Value) {
        let mut req = http().delete(format!("{}/jobs/{id}", self.base()));
        if let Some(user) = user {
            req = req.bearer_auth(self.token(user));
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }
}

#[tokio::test]
async fn a_job_is_accepted_shown_and_waited_for() {
    let node = Node::start("").await;
    let (accepted, location) = node
        .submit("report.build", json!({"rows": 400}), None, "")
        .await;
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/jobs/{id}"));
    assert_eq!(accepted["state"], "queued");
    assert_eq!(accepted["handler"], "report.build");
    // Known at once.
    let (status, now) = node.get(&id, None, "").await;
    assert_eq!(status, 200, "{now}");
    assert!(
        ["queued", "running"].contains(&now["state"].as_str().unwrap()),
        "{now}"
    );
    // The completion note without a poll loop.
    let started = Instant::now();
    let done = node.wait_done(&id, None).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["result"]["rows"], 400);
    assert!(done["finished_at"].is_string() && done["started_at"].is_string());
    assert!(started.elapsed() < Duration::from_secs(10));
    // A finished job stays finished.
    let (_, again) = node.get(&id, None, "").await;
    assert_eq!(again["state"], "succeeded");
}

#[tokio::test]
async fn progress_is_shown_while_a_job_runs() {
    let node = Node::start("").await;
    let (accepted, _) = node
        .submit("report.build", json!({"rows": 3000}), None, "")
        .await;
    let id = accepted["id"].as_str().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let progress = loop {
        let (_, now) = node.get(id, None, "").await;
        if now["progress"]["fraction"]
            .as_f64()
            .is_some_and(|f| f > 0.0)
        {
            break now["progress"].clone();
        }
        assert!(
            now["state"] != "succeeded" && Instant::now() < until,
            "no progress seen: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        progress["message"]
            .as_str()
            .unwrap()
            .ends_with("of 3000 rows"),
        "{progress}"
    );
}

#[tokio::test]
async fn a_failing_job_is_retried_with_backoff_then_succeeds_or_fails() {
    let node = Node::start("").await;
    let started = Instant::now();
    let (accepted, _) = node
        .submit("test.job", json!({"fail_first": 2}), Some("alice"), "")
        .await;
    let done = node
        .wait_done(accepted["id"].as_str().unwrap(), Some("alice"))
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 3);
    assert_eq!(done["result"]["attempt"], 3);
    // Backoff 300 ms then 600 ms, each within a quarter: at least 675 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(675),
        "{:?}",
        started.elapsed()
    );

    let (accepted, _) = node
        .submit(
            "test.job",
            json!({"fail_first": 10}),
            Some("alice"),
            "?max_attempts=2",
        )
        .await;
    let done = node
        .wait_done(accepted["id"].as_str().unwrap(), Some("alice"))
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["attempts"], 2);
    assert!(done["error"]["message"].as_str().is_some(), "{done}");
}

#[tokio::test]
async fn cancelling_a_queued_job_and_a_running_one() {
    let node = Node::start("concurrency = 1").await;
    let (running, _) = node
        .submit("test.job", json!({"ms": 20_000}), Some("alice"), "")
        .await;
    let running = running["id"].as_str().unwrap().to_owned();
    // The one slot is taken: the next job waits.
    let until = Instant::now() + Duration::from_secs(10);
    while node.get(&running, Some("alice"), "").await.1["state"] != "running" {
        assert!(Instant::now() < until, "the first job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (queued, _) = node.submit("test.job", json!({}), Some("alice"), "").await;
    let queued = queued["id"].as_str().unwrap().to_owned();
    let (status, cancelled) = node.cancel(&queued, Some("alice")).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");

    let (status, cancelling) = node.cancel(&running, Some("alice")).await;
    assert_eq!(status, 202, "{cancelling}");
    let done = node.wait_done(&running, Some("alice")).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(done["finished_at"].is_string());
    // The queued one never ran, even now that the slot is free.
    let (_, never) = node.get(&queued, Some("alice"), "?wait=1").await;
    assert_eq!(never["state"], "cancelled");
    assert!(never["started_at"].is_null(), "{never}");
}

#[tokio::test]
async fn a_result_over_the_bound_fails_the_job() {
    let node = Node::start("max_result_bytes = 1000").await;
    let (accepted, _) = node
        .submit("test.job", json!({"result_bytes": 5000}), Some("alice"), "")
        .await;
    let done = node
        .wait_done(accepted["id"].as_str().unwrap(), Some("alice"))
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "result_too_large");
}

#[tokio::test]
async fn a_finished_job_is_gone_after_its_result_ttl() {
    let node = Node::start("").await;
    let (accepted, _) = node
        .submit("echo", json!({"a": 1}), None, "?result_ttl_s=1")
        .await;
    let id = accepted["id"].as_str().unwrap();
    let done = node.wait_done(id, None).await;
    assert_eq!(done["result"], json!({"a": 1}));
    let finished = Instant::now();
    loop {
        let (status, body) = node.get(id, None, "").await;
        if status == 404 {
            assert_eq!(body["error"]["code"], "job_not_found");
            break;
        }
        assert!(
            finished.elapsed() < Duration::from_secs(5),
            "still there: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(finished.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn a_job_is_visible_to_its_submitter_only() {
    let node = Node::start("").await;
    let (accepted, _) = node.submit("test.job", json!({}), Some("alice"), "").await;
    let id = accepted["id"].as_str().unwrap();
    assert_eq!(node.get(id, Some("alice"), "?wait=10").await.0, 200);
    let (status, body) = node.get(id, Some("bob"), "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    assert_eq!(node.get(id, None, "").await.0, 404);
    assert_eq!(node.cancel(id, Some("bob")).await.0, 404);
    // A made-up id is the same 404.
    assert_eq!(node.get(&"0".repeat(32), Some("alice"), "").await.0, 404);
    assert_eq!(node.get("not-an-id", Some("alice"), "").await.0, 404);
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_job() {
    let node = Node::start("").await;
    let submit = |body: Value, key: &'static str| {
        http()
            .post(format!("{}/api/test.job", node.base()))
            .header("prefer", "respond-async")
            .header("idempotency-key", key)
            .bearer_auth(node.token("alice"))
            .json(&body)
            .send()
    };
    let first: Value = submit(json!({}), "k-1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second = submit(json!({}), "k-1").await.unwrap();
    assert_eq!(second.status(), 202);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    let done = node
        .wait_done(first["id"].as_str().unwrap(), Some("alice"))
        .await;
    assert_eq!(done["result"]["count"], 1, "the job ran once: {done}");
    let other = submit(json!({"ms": 1}), "k-1").await.unwrap();
    assert_eq!(other.status(), 422);
}

#[tokio::test]
async fn bad_submissions_get_clear_errors() {
    let node = Node::start("").await;
    let post = |handler: &str, query: &str| {
        http()
            .post(format!("{}/api/{handler}{query}", node.base()))
            .header("prefer", "respond-async")
            .body("{}")
            .send()
    };
    let resp = post("no.such", "").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "unknown_handler"
    );
    let resp = post("echo", "?max_attempts=0").await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_job_option"
    );
    let resp = post("echo", "?retries=3").await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "bad_query"
    );
    let resp = http()
        .get(format!("{}/jobs/x?wait=soon", node.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}
