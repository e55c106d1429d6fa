//! Prometheus metrics: the gateway's `GET /metrics`, the logic server's admin
//! listener (`/metrics`, `/healthz`, `/readyz`), and the embedded mesh's one page,
//! scraped over real HTTP from real processes and read with a Prometheus
//! text-format parser.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, ServerSpec, post};
use support::{Bin, Process, Scratch, embedded_config, http};

/// How long a figure may take to reach what a test expects.
const SETTLE: Duration = Duration::from_secs(10);

/// `GET {base}/metrics`, parsed; also checks the page is the text format.
async fn scrape(client: &reqwest::Client, base: &str) -> Scrape {
    let resp = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("cannot scrape {base}/metrics: {e}"));
    assert_eq!(resp.status(), 200, "{base}/metrics");
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = resp.text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for sample in &scrape.samples {
        assert!(
            !matches!(sample.value, Value::Summary(_)),
            "{} is a summary; histograms were configured: {text}",
            sample.metric
        );
    }
    scrape
}

fn matches(sample: &prometheus_parse::Sample, labels: &[(&str, &str)]) -> bool {
    labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

/// The value of the counter or gauge `name` with `labels` (others may be present).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && matches(s, labels))
        .find_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The count (the `+Inf` bucket) of the histogram `name` with `labels`; checks the
/// buckets are cumulative.
fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let buckets = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && matches(s, labels))
        .find_map(|s| match &s.value {
            Value::Histogram(b) => Some(b.clone()),
            _ => None,
        })?;
    let mut buckets = buckets;
    buckets.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
    assert!(buckets.len() > 2, "{name}: too few buckets");
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "{name}: buckets not cumulative: {buckets:?}"
    );
    let last = buckets.last().unwrap();
    assert!(last.less_than.is_infinite(), "{name}: no +Inf bucket");
    let count = value(scrape, &format!("{name}_count"), labels);
    assert_eq!(count, Some(last.count), "{name}_count and its +Inf bucket");
    Some(last.count)
}

/// Scrape `base` until `done` holds (the figures of the last requests may be
/// recorded just after their replies left); fails with the last page after
/// [`SETTLE`].
async fn scrape_until(
    client: &reqwest::Client,
    base: &str,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + SETTLE;
    loop {
        let page = scrape(client, base).await;
        if done(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{base}/metrics never showed {what}: {:#?}",
            page.samples
                .iter()
                .filter(|s| s.metric.starts_with("keelson_"))
                .map(|s| format!("{}{} {:?}", s.metric, s.labels, s.value))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Families (`keelson_*`) on a page, `_count`/`_sum` folded into their histogram.
fn families(scrape: &Scrape) -> BTreeSet<String> {
    scrape
        .samples
        .iter()
        .map(|s| {
            let m = s.metric.as_str();
            m.strip_suffix("_count")
                .or_else(|| m.strip_suffix("_sum"))
                .filter(|base| scrape.samples.iter().any(|o| o.metric == *base))
                .unwrap_or(m)
                .to_owned()
        })
        .filter(|m| m.starts_with("keelson_"))
        .collect()
}

/// Every family on `page` has a HELP line and a row in the README's metrics list.
fn assert_documented(page: &Scrape) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("### Metrics")
        .nth(1)
        .expect("README.md has no \"### Metrics\" section");
    for family in families(page) {
        assert!(page.docs.contains_key(&family), "{family} has no HELP line");
        assert!(
            section.contains(&format!("`{family}`")),
            "{family} is not in README.md's metrics list"
        );
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Json) {
    let resp = client.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// A mesh on `vhost` with one logic server `node` hosting `handlers`, its admin
/// listener on a free port; returns the mesh, the server's index and the admin URL.
async fn mesh_with_admin(vhost: &Vhost, node: &str, handlers: &[&str]) -> (Mesh, usize, String) {
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let server = mesh
        .add_server(
            ServerSpec::new(node)
                .service("default", handlers)
                .logic("admin_listen = \"127.0.0.1:0\"\n"),
        )
        .await;
    let admin = mesh.servers[server]
        .as_ref()
        .unwrap()
        .admin_url
        .clone()
        .expect("the ready line names the admin listener");
    (mesh, server, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_logic_server_count_each_handlers_requests_and_errors() {
    let vhost = Vhost::create("metrics");
    let (mut mesh, _, admin) =
        mesh_with_admin(&vhost, "logic-m", &["echo", "test.whoami", "test.fail"]).await;
    mesh.add_gateway().await;
    let client = http();
    let gateway = mesh.gateways[0].base_url.clone().unwrap();

    let (echoes, whoamis, failures, unknowns) = (7, 5, 3, 2);
    for (handler, n, expected) in [
        ("echo", echoes, 200),
        ("test.whoami", whoamis, 200),
        ("test.fail", failures, 500),
        ("no.such.handler", unknowns, 404),
    ] {
        for _ in 0..n {
            let out = post(&client, mesh.url(0, handler), "{}".into(), None, None).await;
            assert_eq!(out.status, expected, "{handler}: {out:?}");
        }
    }

    let node = ("node", "logic-m");
    let server_page = scrape_until(&client, &admin, "every delivery counted", |p| {
        value(
            p,
            "keelson_deliveries_total",
            &[node, ("outcome", "answered")],
        ) == Some(f64::from(echoes + whoamis))
            && value(
                p,
                "keelson_deliveries_total",
                &[node, ("outcome", "failed")],
            ) == Some(f64::from(failures))
    })
    .await;
    for (handler, n) in [
        ("echo", echoes),
        ("test.whoami", whoamis),
        ("test.fail", failures),
    ] {
        assert_eq!(
            histogram_count(
                &server_page,
                "keelson_handler_duration_seconds",
                &[node, ("handler", handler)]
            ),
            Some(f64::from(n)),
            "{handler} runs on the logic server"
        );
    }
    for outcome in [
        "redelivered",
        "handed_back",
        "deduplicated",
        "dead_lettered",
    ] {
        assert_eq!(
            value(
                &server_page,
                "keelson_deliveries_total",
                &[node, ("outcome", outcome)]
            ),
            Some(0.0),
            "{outcome}"
        );
    }
    assert_eq!(
        value(&server_page, "keelson_broker_connected", &[]),
        Some(1.0)
    );
    assert_eq!(value(&server_page, "keelson_paused", &[node]), Some(0.0));
    assert_eq!(
        value(&server_page, "keelson_intake_window", &[node]),
        Some(16.0)
    );
    let factor = value(&server_page, "keelson_load_factor", &[node]).unwrap();
    assert!((0.0..=1.0).contains(&factor), "load factor {factor}");
    for part in ["busy", "process_cpu", "system_cpu"] {
        assert!(
            value(&server_page, "keelson_load_part", &[node, ("part", part)]).is_some(),
            "load part {part}"
        );
    }
    assert_eq!(
        value(&server_page, "keelson_build_info", &[("version", "0.1.0")]),
        Some(1.0)
    );

    let gateway_page = scrape_until(&client, &gateway, "every request counted", |p| {
        value(
            p,
            "keelson_gateway_requests_total",
            &[("handler", "unknown"), ("code", "404")],
        ) == Some(f64::from(unknowns))
    })
    .await;
    for (handler, code, n) in [
        ("echo", "200", echoes),
        ("test.whoami", "200", whoamis),
        ("test.fail", "500", failures),
        ("unknown", "404", unknowns),
    ] {
        assert_eq!(
            value(
                &gateway_page,
                "keelson_gateway_requests_total",
                &[("handler", handler), ("code", code)]
            ),
            Some(f64::from(n)),
            "{handler} {code}"
        );
        assert_eq!(
            histogram_count(
                &gateway_page,
                "keelson_gateway_request_duration_seconds",
                &[("handler", handler)]
            ),
            Some(f64::from(n)),
            "{handler} duration"
        );
    }
    assert!(
        !gateway_page
            .samples
            .iter()
            .any(|s| s.labels.get("handler") == Some("no.such.handler")),
        "a name no server hosts became a label value"
    );
    assert_eq!(
        value(&gateway_page, "keelson_gateway_requests_in_flight", &[]),
        Some(0.0)
    );
    let open = value(&gateway_page, "keelson_gateway_connections_open", &[]).unwrap();
    assert!(open >= 1.0, "the scrape's own connection is open: {open}");
    assert_eq!(
        value(
            &gateway_page,
            "keelson_gateway_connections_refused_total",
            &[]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&gateway_page, "keelson_broker_connected", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&gateway_page, "keelson_broker_reconnections_total", &[]),
        Some(0.0)
    );
    // The gateway process runs no logic server.
    assert!(value(&gateway_page, "keelson_deliveries_total", &[]).is_none());

    assert_documented(&gateway_page);
    assert_documented(&server_page);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_probes_follow_start_and_drain() {
    let vhost = Vhost::create("admin-probes");
    let client = http();
    // A known port, so that /readyz can be asked before the ready line.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("http://127.0.0.1:{port}");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    // A second, longer join: the first server waits for peers that are not there.
    let spec = ServerSpec::new("logic-a")
        .service("default", &["echo", "test.slow"])
        .logic(&format!("admin_listen = \"127.0.0.1:{port}\"\n"));
    let watcher = {
        let (client, admin) = (client.clone(), admin.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut seen = Vec::new();
            while Instant::now() < deadline {
                if let Ok(resp) = client.get(format!("{admin}/readyz")).send().await {
                    let status = resp.status().as_u16();
                    let body: Json = resp.json().await.unwrap();
                    let word = body["status"].as_str().unwrap().to_owned();
                    if seen.last() != Some(&(status, word.clone())) {
                        seen.push((status, word.clone()));
                    }
                    if word == "ready" {
                        return seen;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("/readyz never said ready: {seen:?}");
        })
    };
    let server = mesh.add_server(spec).await;
    let seen = watcher.await.unwrap();
    assert_eq!(
        seen,
        vec![(503, "starting".to_owned()), (200, "ready".to_owned())],
        "/readyz while the server joined, then once it consumed"
    );
    mesh.add_gateway().await;

    let (status, body) = get_json(&client, &format!("{admin}/healthz")).await;
    assert_eq!((status, body), (200, serde_json::json!({"status": "ok"})));
    let (status, body) = get_json(&client, &format!("{admin}/nothing-here")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    // A slow request holds the drain open while /readyz is asked.
    let slow = {
        let (client, url) = (client.clone(), mesh.url(0, "test.slow"));
        tokio::spawn(async move { post(&client, url, r#"{"ms":3000}"#.into(), None, None).await })
    };
    scrape_until(&client, &admin, "the slow request in flight", |p| {
        value(p, "keelson_in_flight", &[("node", "logic-a")]) == Some(1.0)
    })
    .await;
    mesh.servers[server].as_ref().unwrap().signal("TERM");
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, body) = get_json(&client, &format!("{admin}/readyz")).await;
        if status == 503 {
            assert_eq!(body, serde_json::json!({"status": "draining"}));
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "/readyz never said draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = get_json(&client, &format!("{admin}/healthz")).await;
    assert_eq!(status, 200, "alive while draining");
    let out = slow.await.unwrap();
    assert_eq!(out.status, 200, "the drain finished the request: {out:?}");
    mesh.stop_server(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_meshs_gateway_shows_its_logic_servers_metrics_too() {
    let scratch = Scratch::new();
    let config = scratch.write("keelson.toml", &embedded_config(""));
    let node = Process::start(Bin::Keelson, &config, &scratch.path().join("k.log"), &[]).await;
    let client = http();
    let base = node.base_url.clone().unwrap();
    for _ in 0..3 {
        let out = post(&client, node.url("echo"), "{}".into(), None, None).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    let out = post(&client, node.url("test.panic"), "{}".into(), None, None).await;
    assert_eq!(out.status, 500, "{out:?}");
    let page = scrape_until(&client, &base, "the logic server's deliveries", |p| {
        value(p, "keelson_deliveries_total", &[("outcome", "answered")]) == Some(3.0)
            && value(p, "keelson_deliveries_total", &[("outcome", "failed")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        histogram_count(
            &page,
            "keelson_handler_duration_seconds",
            &[("handler", "echo")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &page,
            "keelson_gateway_requests_total",
            &[("handler", "test.panic"), ("code", "500")]
        ),
        Some(1.0)
    );
    assert_eq!(
        histogram_count(
            &page,
            "keelson_gateway_request_duration_seconds",
            &[("handler", "echo")]
        ),
        Some(3.0)
    );
    // The memory transport has no broker connection to report.
    assert!(value(&page, "keelson_broker_connected", &[]).is_none());
    assert_documented(&page);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_connection_is_counted_when_it_comes_back() {
    let vhost = Vhost::create("metrics-reconnect");
    let (mut mesh, server, admin) = mesh_with_admin(&vhost, "logic-r", &["echo"]).await;
    let client = http();
    let page = scrape(&client, &admin).await;
    assert_eq!(value(&page, "keelson_broker_connected", &[]), Some(1.0));
    assert_eq!(
        value(&page, "keelson_broker_reconnections_total", &[]),
        Some(0.0)
    );
    assert!(
        vhost.close_connections_of("logic-r") > 0,
        "no connection to close"
    );
    scrape_until(&client, &admin, "one reconnection, connected again", |p| {
        value(p, "keelson_broker_reconnections_total", &[]) == Some(1.0)
            && value(p, "keelson_broker_connected", &[]) == Some(1.0)
    })
    .await;
    mesh.stop_server(server).await;
}
