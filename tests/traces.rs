//! Traces (issue 14 item 2): a gateway and logic servers as separate processes on
//! RabbitMQ export their spans over OTLP/HTTP to a receiver in this test, which
//! decodes the protobuf bodies. A request through the gateway into a handler that
//! calls another is one trace across both processes with the right parent-child
//! links; a client's `traceparent` is continued; a peer applying a context write
//! links to the write; log lines of a request carry its trace id and request id, in
//! text and JSON, with export on and off.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, ServerSpec, gateway_toml};
use support::otlp::{ReceivedSpan, Receiver};
use support::{Bin, Process, Scratch, embedded_config, http, token};

const SERVER: i32 = 2;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;
/// OTLP's `STATUS_CODE_ERROR`.
const ERROR: i32 = 2;

/// How long spans may take to arrive (the exporter batches every 200 ms here).
const SPANS_WITHIN: Duration = Duration::from_secs(20);

fn telemetry(endpoint: &str) -> String {
    format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nsampling_ratio = 1.0\n")
}

/// The exporter's batch delay, shortened so that the test waits less.
const FAST_BATCHES: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "200");

fn find<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    pick: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} span: {spans:#?}");
    found[0]
}

fn child_of<'a>(
    spans: &'a [ReceivedSpan],
    parent: &ReceivedSpan,
    name: &str,
    kind: i32,
) -> &'a ReceivedSpan {
    let child = find(spans, name, |s| {
        s.name == name && s.parent_span_id == parent.span_id
    });
    assert_eq!(child.kind, kind, "the kind of {name}: {child:#?}");
    assert_eq!(
        child.trace_id, parent.trace_id,
        "{name} is in its parent's trace"
    );
    child
}

/// Wait for the gateway's server span of the request `request_id`; returns every
/// span received and that one.
async fn server_span(receiver: &Receiver, request_id: &str) -> (Vec<ReceivedSpan>, ReceivedSpan) {
    let is_it =
        |s: &ReceivedSpan| s.kind == SERVER && s.attribute("request_id") == Some(request_id);
    let what = format!("the server span of {request_id}");
    let spans = receiver
        .wait_for(SPANS_WITHIN, &what, |spans| spans.iter().any(is_it))
        .await;
    let span = find(&spans, &what, is_it).clone();
    (spans, span)
}

/// POST `body` to `url` as the token's user, with a request id and maybe a
/// `traceparent`.
async fn send(
    client: &reqwest::Client,
    url: String,
    token: &str,
    request_id: &str,
    traceparent: Option<&str>,
    body: String,
) -> reqwest::Response {
    let mut request = client
        .post(url)
        .bearer_auth(token)
        .header("x-request-id", request_id)
        .body(body);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    request.send().await.unwrap()
}

/// The log lines of `text` that mention `needle`.
fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_gateway_publish_process_handler_and_calls_across_processes() {
    let receiver = Receiver::start().await;
    let vhost = Vhost::create("traces");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    // The server that runs the calls logs JSON; the other one only applies the
    // context writes of the first.
    let handlers = ["test.relay", "test.meta", "test.fail", "counter.increment"];
    mesh.add_server(
        ServerSpec::new("traced-1")
            .service("default", &handlers)
            .extra(&format!(
                "{}\n[log]\nformat = \"json\"\n",
                telemetry(&receiver.endpoint)
            ))
            .env(FAST_BATCHES.0, FAST_BATCHES.1),
    )
    .await;
    mesh.add_server(
        ServerSpec::new("traced-2")
            .service("other", &["echo"])
            .extra(&telemetry(&receiver.endpoint))
            .env(FAST_BATCHES.0, FAST_BATCHES.1),
    )
    .await;
    // The gateway logs text, and its debug line per request.
    let config = mesh.scratch.write(
        "gateway-traced.toml",
        &format!(
            "{}{}",
            gateway_toml(&transport),
            telemetry(&receiver.endpoint)
        ),
    );
    let log = mesh.scratch.path().join("gateway-traced.log");
    let gateway = Process::start(
        Bin::Gateway,
        &config,
        &log,
        &[
            FAST_BATCHES,
            ("RUST_LOG", "info,keelson_ui_gateway::trace=debug"),
        ],
    )
    .await;
    let client = http();
    let token = mesh.token("alice");

    // 1. A client's trace, continued: gateway -> publish -> process -> handler ->
    // call -> process -> handler, one trace over two processes.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    let relay_meta = json!({"handler": "test.meta"}).to_string();
    let relay = gateway.url("test.relay");
    let response = send(
        &client,
        relay.clone(),
        &token,
        "traced-request-1",
        Some(&traceparent),
        relay_meta,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], "traced-request-1.1", "{body}");

    let spans = receiver
        .wait_for(SPANS_WITHIN, "the whole relay trace", |spans| {
            spans
                .iter()
                .filter(|s| s.trace_id == client_trace && s.name == "test.meta")
                .count()
                == 1
                && spans
                    .iter()
                    .any(|s| s.trace_id == client_trace && s.kind == SERVER)
        })
        .await;
    let trace: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == client_trace)
        .cloned()
        .collect();
    let server = find(&trace, "gateway server", |s| s.kind == SERVER);
    assert_eq!(server.name, "POST /api/{handler}");
    assert_eq!(server.service, "keelson-gateway");
    assert_eq!(
        server.parent_span_id, client_span,
        "the gateway continues the client's span"
    );
    assert_eq!(server.attribute("request_id"), Some("traced-request-1"));
    assert_eq!(server.attribute("handler"), Some("test.relay"));
    let publish = child_of(&trace, server, "test.relay publish", PRODUCER);
    assert_eq!(publish.service, "keelson-gateway");
    let process = child_of(&trace, publish, "test.relay process", CONSUMER);
    assert_eq!(process.service, "keelson-logic-server");
    assert_eq!(process.attribute("request_id"), Some("traced-request-1"));
    assert_eq!(
        process.attribute("messaging.destination.name"),
        Some("test.relay")
    );
    let handler = child_of(&trace, process, "test.relay", 1);
    let call = child_of(&trace, handler, "test.meta publish", PRODUCER);
    let callee = child_of(&trace, call, "test.meta process", CONSUMER);
    assert_eq!(callee.attribute("request_id"), Some("traced-request-1.1"));
    let callee_handler = child_of(&trace, callee, "test.meta", 1);
    assert_eq!(callee_handler.service, "keelson-logic-server");
    assert_eq!(trace.len(), 7, "nothing else in the trace: {trace:#?}");
    assert!(
        trace.iter().all(|s| s.status != ERROR),
        "a success has no error: {trace:#?}"
    );

    // 2. A request without a trace context starts one; a failing callee makes log
    // lines: the gateway's (text) and the server's (JSON) show the trace id and the
    // request id.
    let relay_fail = json!({"handler": "test.fail"}).to_string();
    let response = send(&client, relay, &token, "traced-request-2", None, relay_fail).await;
    assert_eq!(response.status(), 500);
    let (spans, started) = server_span(&receiver, "traced-request-2").await;
    let started = &started;
    assert!(
        started.parent_span_id.is_empty(),
        "a new trace: {started:#?}"
    );
    assert_eq!(started.status, ERROR, "a 500 is an error: {started:#?}");
    let relay = find(&spans, "failed relay process", |s| {
        s.kind == CONSUMER && s.attribute("request_id") == Some("traced-request-2")
    });
    assert_eq!(
        relay.status, ERROR,
        "a failed handler's process span: {relay:#?}"
    );
    let trace_id = started.trace_id.clone();
    assert_ne!(trace_id, client_trace);

    gateway.wait_for_log("traced-request-2").await;
    let text = gateway.log_text();
    let lines = lines_with(&text, "request_id=traced-request-2");
    assert!(!lines.is_empty(), "no gateway line of the request:\n{text}");
    for line in &lines {
        assert!(
            line.contains(&format!("trace_id={trace_id}")),
            "a text line without the trace id: {line}"
        );
    }
    let server_log = mesh.servers[0].as_ref().unwrap();
    server_log.wait_for_log("traced-request-2").await;
    let json_lines: Vec<Value> = lines_with(&server_log.log_text(), "traced-request-2")
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(
        json_lines.len() >= 2,
        "the relay's and the callee's failures: {json_lines:#?}"
    );
    for line in &json_lines {
        let span = &line["span"];
        assert_eq!(span["trace_id"], trace_id.as_str(), "{line}");
        assert!(
            span["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("traced-request-2")),
            "{line}"
        );
    }

    // 3. A context write on traced-1 is applied by traced-2 in a span linked to the
    // write's process span.
    let url = gateway.url("counter.increment");
    let response = send(&client, url, &token, "traced-request-3", None, "{}".into()).await;
    assert_eq!(response.status(), 200);
    let spans = receiver
        .wait_for(SPANS_WITHIN, "the write and its linked apply", |spans| {
            let write = spans.iter().find(|s| {
                s.kind == CONSUMER && s.attribute("request_id") == Some("traced-request-3")
            });
            write.is_some_and(|w| {
                spans.iter().any(|s| {
                    s.name == "context apply"
                        && s.links.contains(&(w.trace_id.clone(), w.span_id.clone()))
                })
            })
        })
        .await;
    let write = find(&spans, "write", |s| {
        s.kind == CONSUMER && s.attribute("request_id") == Some("traced-request-3")
    });
    let apply = find(&spans, "linked apply", |s| {
        s.name == "context apply"
            && s.links
                .contains(&(write.trace_id.clone(), write.span_id.clone()))
    });
    assert_eq!(apply.kind, CONSUMER);
    assert_eq!(
        apply
            .attribute("keelson.origin")
            .map(|o| o.starts_with("traced-1")),
        Some(true)
    );
    assert_ne!(apply.trace_id, write.trace_id, "linked, not a child");
}

/// With export off (the default), the embedded mesh still continues a client's
/// trace id into its log lines, in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_log_lines_carry_the_clients_trace_id_and_the_request_id() {
    let scratch = Scratch::new();
    let config = embedded_config("\n[log]\nformat = \"json\"\n");
    let config = scratch.write("keelson.toml", &config);
    let mesh = Process::start(Bin::Keelson, &config, &scratch.path().join("k.log"), &[]).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let bob = token(&config, "bob");
    let url = mesh.url("test.fail");
    let response = send(
        &http(),
        url,
        &bob,
        "untraced-request-1",
        Some(&traceparent),
        "{}".into(),
    )
    .await;
    assert_eq!(response.status(), 500);
    for line in json_lines_of_both_roles(&mesh, "untraced-request-1").await {
        assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
        assert_eq!(line["span"]["request_id"], "untraced-request-1", "{line}");
    }
    // Without a client trace, the gateway starts one that the server's lines share.
    let url = mesh.url("test.fail");
    let response = send(&http(), url, &bob, "untraced-request-2", None, "{}".into()).await;
    assert_eq!(response.status(), 500);
    let lines = json_lines_of_both_roles(&mesh, "untraced-request-2").await;
    let started = lines[0]["span"]["trace_id"].as_str().unwrap().to_owned();
    assert!(
        started.len() == 32
            && started.bytes().all(|b| b.is_ascii_hexdigit())
            && started != trace_id,
        "a new trace id: {started}"
    );
    for line in &lines {
        assert_eq!(line["span"]["trace_id"], started.as_str(), "{line}");
    }
    mesh.terminate(Duration::from_secs(10)).await;
}

/// The JSON log lines of `request_id`, once both the gateway and the logic server
/// logged one (polled, bounded).
async fn json_lines_of_both_roles(process: &Process, request_id: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + SPANS_WITHIN;
    loop {
        let lines: Vec<Value> = lines_with(&process.log_text(), request_id)
            .iter()
            .map(|l| serde_json::from_str(l).expect("a JSON log line"))
            .collect();
        let from = |target: &str| {
            lines
                .iter()
                .any(|l| l["target"].as_str().is_some_and(|t| t.starts_with(target)))
        };
        if from("keelson_ui_gateway") && from("keelson_logic_server") {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line of {request_id} from both the gateway and the server: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A process that stops sends the spans it still holds: with batches every minute,
/// the spans of a request reach the receiver only because SIGTERM flushes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_process_sends_the_spans_it_holds() {
    let receiver = Receiver::start().await;
    let scratch = Scratch::new();
    let config = embedded_config(&telemetry(&receiver.endpoint));
    let config = scratch.write("keelson.toml", &config);
    let log = scratch.path().join("k.log");
    let slow_batches = [("OTEL_BSP_SCHEDULE_DELAY", "60000")];
    let mesh = Process::start(Bin::Keelson, &config, &log, &slow_batches).await;
    let bob = token(&config, "bob");
    let url = mesh.url("echo");
    let response = send(&http(), url, &bob, "flushed-request-1", None, "{}".into()).await;
    assert_eq!(response.status(), 200);
    assert!(receiver.spans().is_empty(), "nothing sent before the stop");
    let status = mesh.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    let (spans, server) = server_span(&receiver, "flushed-request-1").await;
    let server = &server;
    assert_eq!(
        server.service, "keelson",
        "the embedded mesh's default service name"
    );
    let publish = child_of(&spans, server, "echo publish", PRODUCER);
    let process = child_of(&spans, publish, "echo process", CONSUMER);
    child_of(&spans, process, "echo", 1);
}
