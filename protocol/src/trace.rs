//! W3C trace context (`traceparent`, `tracestate`) carried by requests and context
//! deltas, and the OpenTelemetry spans of a process continued from it (feature
//! `trace`).
//!
//! A request carries its trace context in its envelope's `headers` (both
//! transports) and in the AMQP message headers of the same names (TOPOLOGY.md). Every
//! process joins the trace it receives: [`adopt`] makes a `tracing` span the child of
//! the sender's span and records the trace id on it (so every log line of the request
//! shows it); [`inject`] writes the span's own context into the headers it sends on.
//!
//! Export is off unless the process installed an OpenTelemetry layer and called
//! [`enable`]. Then no OpenTelemetry call is made: [`adopt`] only parses the
//! incoming `traceparent` (or makes one, so that a trace id still ties the logs of
//! a request together across processes) and [`inject`] leaves the headers as they
//! came, which costs a few hundred nanoseconds per request.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header of vendor-specific trace data, carried along unchanged.
pub const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turn span export on for this process: called once the OpenTelemetry layer is
/// installed, before any request is served.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether this process exports spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A parsed `traceparent` (version 00): `00-{trace id}-{parent span id}-{flags}`.
///
/// ```
/// use keelson_protocol::trace::TraceParent;
///
/// let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(tp.sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// Parse a `traceparent` value; `None` when it is malformed or names the invalid
    /// (all-zero) trace or span. A version other than `00` is read as `00` when its
    /// first four fields are (as the W3C specification asks).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.splitn(5, '-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || version == "ff" || (version == "00" && rest.is_some()) {
            return None;
        }
        let trace_id = hex_array::<16>(trace)?;
        let span_id = hex_array::<8>(span)?;
        let flags = hex_array::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new trace with a random id (not sampled: nothing records it here).
    pub fn random() -> Self {
        let mut trace_id: [u8; 16] = rand::random();
        let mut span_id: [u8; 8] = rand::random();
        // All-zero ids are invalid; one in 2^64 is not worth a loop.
        trace_id[0] |= 1;
        span_id[0] |= 1;
        Self {
            trace_id,
            span_id,
            flags: 0,
        }
    }

    /// Whether the sender recorded (sampled) its span.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lower-case hex digits, as logs and trace viewers show it.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    fn span_context(&self, state: Option<&String>) -> SpanContext {
        let state = state
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            state,
        )
    }

    fn of(context: &SpanContext) -> Option<Self> {
        context.is_valid().then(|| Self {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 55 bytes on the stack: this runs for every request a gateway starts a
        // trace for.
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        write_hex(&mut out[3..35], &self.trace_id);
        write_hex(&mut out[36..52], &self.span_id);
        write_hex(&mut out[53..], &[self.flags]);
        // Hex digits, dashes: ASCII.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// `bytes` as lower-case hex into `out` (twice as long).
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    write_hex(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

/// A trace id shown as 32 lower-case hex digits, formatted without allocating (a
/// span field on every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIdHex(pub [u8; 16]);

impl fmt::Display for TraceIdHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 32];
        write_hex(&mut out, &self.0);
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// `N` bytes from exactly `2 * N` lower-case hex digits.
fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = nibble(pair[0])?;
        let lo = nibble(pair[1])?;
        *byte = hi << 4 | lo;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Make `span` (not yet entered) continue the trace that `headers` carry, or start
/// one, and record its `trace_id` field (declare it `trace_id = Empty`).
///
/// With export on, `span` becomes the child of the sender's span. With export off,
/// a missing or malformed `traceparent` in `headers` is replaced by a new, unsampled
/// one, so that whatever this request calls next shares the trace id in its logs.
pub fn adopt(span: &Span, headers: &mut BTreeMap<String, String>) {
    let parent = headers.get(TRACEPARENT).and_then(|v| TraceParent::parse(v));
    if enabled() {
        if let Some(parent) = parent {
            let remote = parent.span_context(headers.get(TRACESTATE));
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let context = span.context();
        if let Some(own) = TraceParent::of(context.span().span_context()) {
            span.record(
                "trace_id",
                tracing::field::display(TraceIdHex(own.trace_id)),
            );
            return;
        }
        // The span is disabled (filtered out): fall through, logs still get an id.
    }
    let parent = parent.unwrap_or_else(|| fresh(headers));
    span.record(
        "trace_id",
        tracing::field::display(TraceIdHex(parent.trace_id)),
    );
}

/// With export off, the trace `headers` carry, or a new unsampled one written into
/// them (see [`adopt`]); a span can then take the trace id as a field when it is
/// created, which costs less than recording it afterwards.
pub fn carried(headers: &mut BTreeMap<String, String>) -> TraceParent {
    headers
        .get(TRACEPARENT)
        .and_then(|v| TraceParent::parse(v))
        .unwrap_or_else(|| fresh(headers))
}

fn fresh(headers: &mut BTreeMap<String, String>) -> TraceParent {
    let fresh = TraceParent::random();
    headers.insert(TRACEPARENT.to_owned(), fresh.to_string());
    headers.remove(TRACESTATE);
    fresh
}

/// Write `span`'s own trace context into `headers` (`traceparent`, and `tracestate`
/// when it has one), so that the receiver's span becomes its child. With export off
/// the headers are left as they are (they carry the trace [`adopt`] continued).
pub fn inject(span: &Span, headers: &mut BTreeMap<String, String>) {
    if !enabled() {
        return;
    }
    let context = span.context();
    let context = context.span();
    let context = context.span_context();
    if let Some(own) = TraceParent::of(context) {
        headers.insert(TRACEPARENT.to_owned(), own.to_string());
        let state = context.trace_state().header();
        if state.is_empty() {
            headers.remove(TRACESTATE);
        } else {
            headers.insert(TRACESTATE.to_owned(), state);
        }
    }
}

/// Record `span`'s own trace id in its `trace_id` field, with export on (a span
/// whose parent already [`adopt`]ed a trace).
pub fn record_trace_id(span: &Span) {
    if !enabled() {
        return;
    }
    let context = span.context();
    if let Some(own) = TraceParent::of(context.span().span_context()) {
        span.record(
            "trace_id",
            tracing::field::display(TraceIdHex(own.trace_id)),
        );
    }
}

/// The `traceparent` of the current span, with export on (else `None`, at no
/// cost): what a context delta carries so that its receivers can link to the write.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = Span::current().context();
    TraceParent::of(context.span().span_context()).map(|tp| tp.to_string())
}

/// Set an OpenTelemetry attribute of `span` that is not a `tracing` field (every log
/// line would show a field); nothing with export off.
pub fn set_attribute(span: &Span, key: &'static str, value: impl Into<String>) {
    if enabled() {
        span.set_attribute(key, value.into());
    }
}

/// Link `span` (not yet entered) to the span that `traceparent` names, with export
/// on; a malformed value is ignored.
pub fn link(span: &Span, traceparent: &str) {
    if let Some(remote) = TraceParent::parse(traceparent) {
        span.add_link(remote.span_context(None));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        // A later version with more fields is read as 00.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert!(TraceParent::parse(later).is_some());
    }

    #[test]
    fn trace_ids_show_as_hex() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            TraceIdHex(tp.trace_id).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn without_export_a_trace_is_started_or_continued_for_the_logs() {
        let mut headers = BTreeMap::new();
        adopt(&Span::none(), &mut headers);
        let started = TraceParent::parse(&headers[TRACEPARENT]).unwrap();
        assert!(!started.sampled());
        let mut again = headers.clone();
        adopt(&Span::none(), &mut again);
        assert_eq!(again, headers, "a valid traceparent is kept as it came");
        inject(&Span::none(), &mut again);
        assert_eq!(again, headers);
        headers.insert(TRACEPARENT.into(), "garbage".into());
        adopt(&Span::none(), &mut headers);
        assert_ne!(
            TraceParent::parse(&headers[TRACEPARENT]).unwrap(),
            started,
            "a malformed traceparent is replaced by a new trace"
        );
        assert!(current_traceparent().is_none());
    }
}
