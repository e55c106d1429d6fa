//! The example handlers, tested with Keelson's test kit: what a plugin author's own
//! tests look like.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_logic_server::testkit::{JobState, TestRequest};
// Naming the crate links it, and with it its handlers' registrations.
use keelson_plugins_examples as _;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[tokio::test]
async fn echo_answers_its_body_unchanged() {
    let reply = TestRequest::new("echo")
        .raw_body(r#"{"b":1,"a":[true]}"#)
        .send()
        .await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.body(), br#"{"b":1,"a":[true]}"#);
}

#[tokio::test]
async fn the_counter_counts_per_user_within_its_step_limit() {
    let reply = TestRequest::new("counter.increment")
        .user("ada")
        .counter("counter", 41)
        .send()
        .await;
    assert_eq!(reply.json::<Value>(), json!({"value": 42}));
    let reply = TestRequest::new("counter.increment")
        .user("ada")
        .plugin_settings("counter", &json!({"max_step": 10}))
        .json(&json!({"by": 11}))
        .send()
        .await;
    assert_eq!(reply.status(), 400);
    assert_eq!(
        reply.error_message(),
        Some("`by` must be between -10 and 10")
    );
    assert_eq!(TestRequest::new("counter.get").send().await.status(), 401);
}

#[tokio::test]
async fn the_cart_adds_lists_clears_and_holds_at_most_max_items() {
    let reply = TestRequest::new("cart.add")
        .user("ada")
        .context_value("cart", &json!({"apple": 1}))
        .json(&json!({"item": "apple", "quantity": 2}))
        .send()
        .await;
    assert_eq!(
        reply.json::<Value>(),
        json!({"items": [{"item": "apple", "quantity": 3}]})
    );
    assert_eq!(
        reply.context::<Value>("cart").await,
        Some(json!({"apple": 3}))
    );

    let full = TestRequest::new("cart.add")
        .user("ada")
        .plugin_settings("cart", &json!({"max_items": 1}))
        .context_value("cart", &json!({"apple": 1}))
        .json(&json!({"item": "pear"}))
        .send()
        .await;
    assert_eq!(full.status(), 409);
    assert_eq!(
        full.error_message(),
        Some("the cart already holds 1 distinct items")
    );

    let bad = TestRequest::new("cart.add")
        .user("ada")
        .json(&json!({"item": ""}))
        .send()
        .await;
    assert_eq!(bad.error_message(), Some("`item` must be 1 to 200 bytes"));

    let listed = TestRequest::new("cart.list")
        .user("ada")
        .context_value("cart", &json!({"fig": 2}))
        .send()
        .await;
    assert_eq!(
        listed.json::<Value>(),
        json!({"items": [{"item": "fig", "quantity": 2}]})
    );
    let cleared = TestRequest::new("cart.clear")
        .user("ada")
        .context_value("cart", &json!({"fig": 2}))
        .send()
        .await;
    assert_eq!(cleared.json::<Value>(), json!({"items": []}));
    assert_eq!(cleared.context::<Value>("cart").await, None);
}

#[tokio::test]
async fn hello_greets_and_counts_visits_and_wants_a_user_before_a_body() {
    let reply = TestRequest::new("hello")
        .user("ada")
        .counter("visits", 2)
        .json(&json!({"name": "Ada"}))
        .send()
        .await;
    assert_eq!(
        reply.json::<Value>(),
        json!({"text": "hello, Ada", "visits": 3})
    );
    let anonymous = TestRequest::new("hello").raw_body("{}").send().await;
    assert_eq!(anonymous.status(), 401);
    let bad = TestRequest::new("hello")
        .user("ada")
        .raw_body("{}")
        .send()
        .await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn checkout_prices_the_cart_it_reads_by_calling_cart_list_and_empties_it() {
    let checkout = || {
        TestRequest::new("shop.checkout")
            .with_handler("cart.list")
            .with_handler("cart.clear")
            .plugin_settings("shop", &json!({"prices": {"apple": 120, "fig": 40}}))
            .user("ada")
    };
    let reply = checkout()
        .context_value("cart", &json!({"apple": 2, "fig": 1}))
        .counter("orders", 6)
        .send()
        .await;
    assert_eq!(reply.status(), 201);
    assert_eq!(
        reply.json::<Value>(),
        json!({
            "order": 7,
            "items": {"items": [{"item": "apple", "quantity": 2}, {"item": "fig", "quantity": 1}]},
            "total_cents": 280
        })
    );
    assert_eq!(
        reply.context::<Value>("cart").await,
        None,
        "the cart is emptied"
    );

    let unknown = checkout()
        .context_value("cart", &json!({"durian": 1}))
        .send()
        .await;
    assert_eq!(unknown.status(), 409);
    assert_eq!(unknown.error_message(), Some("`durian` is not for sale"));
    assert_eq!(
        unknown.context::<Value>("cart").await,
        Some(json!({"durian": 1})),
        "nothing bought"
    );

    let empty = checkout().send().await;
    assert_eq!(empty.error_message(), Some("the cart is empty"));

    let prices = TestRequest::new("shop.prices")
        .plugin_settings("shop", &json!({"prices": {"apple": 120}}))
        .send()
        .await;
    assert_eq!(prices.json::<Value>(), json!({"apple": 120}));
}

/// The checksum `report.build` computes over `rows` rows.
fn checksum(rows: u64) -> u64 {
    (0..rows).fold(0u64, |c, row| c.wrapping_mul(31).wrapping_add(row))
}

#[tokio::test]
async fn report_build_reports_its_progress_as_a_job_and_answers_a_summary() {
    let reply = TestRequest::new("report.build")
        .json(&json!({"rows": 300}))
        .as_job()
        .send()
        .await;
    assert_eq!(reply.job_state(), Some(JobState::Succeeded));
    assert_eq!(
        reply.json::<Value>(),
        json!({"rows": 300, "checksum": checksum(300), "attempt": 1})
    );
    let reports = reply.progress_reports();
    // A report every 3 rows (a hundredth), each after a sleep: the job server sees
    // them one by one, moving forward, up to the whole report.
    assert!(reports.len() >= 20, "only {} reports", reports.len());
    assert!(
        reports.windows(2).all(|w| w[0].fraction < w[1].fraction),
        "{reports:?}"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.fraction, 1.0);
    assert_eq!(last.message.as_deref(), Some("300 of 300 rows"));

    // A retry knows its attempt; a plain request reports nothing.
    let retry = TestRequest::new("report.build")
        .json(&json!({"rows": 5}))
        .job_attempt(2, 3)
        .send()
        .await;
    assert_eq!(retry.json::<Value>()["attempt"], 2);
    let plain = TestRequest::new("report.build")
        .json(&json!({"rows": 5}))
        .send()
        .await;
    assert_eq!(plain.json::<Value>()["checksum"], checksum(5));
    assert_eq!(plain.job_state(), None);
    assert!(plain.progress_reports().is_empty());
}

#[tokio::test]
async fn report_build_stops_early_when_its_job_is_cancelled() {
    // Ten seconds of work, 100 ms a step.
    let mut job = TestRequest::new("report.build")
        .json(&json!({"rows": 10_000}))
        .timeout(Duration::from_secs(30))
        .start()
        .await;
    let report = job.progress_reached(0.03).await;
    assert!(
        report
            .message
            .as_deref()
            .unwrap()
            .ends_with("00 of 10000 rows"),
        "{report:?}"
    );
    assert!(!job.is_finished());
    let cancelled_at = Instant::now();
    job.cancel();
    let reply = job.reply().await;
    // It stops within a step, not at the end of the ten seconds.
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        cancelled_at.elapsed()
    );
    assert_eq!(reply.job_state(), Some(JobState::Cancelled));
    assert_eq!(reply.status(), 409);
    let last = reply.progress_reports().last().unwrap();
    assert!(last.fraction < 0.1, "{last:?}");
}
