//! The per-request span an operator reads: request id, handler, status, latency.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use support::Mesh;

/// Collects formatted log output in memory.
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

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

// A current-thread runtime keeps the gateway's tasks on this thread, inside the
// thread-local subscriber set below.
#[tokio::test(flavor = "current_thread")]
async fn each_request_logs_one_line_with_id_handler_status_and_latency() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mesh = Mesh::start().await;
    let ok = mesh
        .post("echo", "{}")
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let failed = mesh
        .post("fail", "{}")
        .header("x-request-id", "trace-me-2")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);

    let lines = captured.lines();
    let served = |id: &str| {
        let found: Vec<&String> = lines
            .iter()
            .filter(|l| l.ends_with(": served") && l.contains(&format!("request_id={id}")))
            .collect();
        assert_eq!(found.len(), 1, "one `served` line for {id}: {lines:#?}");
        found[0].clone()
    };
    let line = served("trace-me-1");
    assert!(line.contains("handler=echo"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("latency_ms="), "{line}");
    let line = served("trace-me-2");
    assert!(
        line.contains("handler=fail") && line.contains("status=500"),
        "{line}"
    );
    // The handler failure's cause is logged inside the same request's span.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("handler failed") && l.contains("request_id=trace-me-2")),
        "{lines:#?}"
    );
}
