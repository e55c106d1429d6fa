//! One dead letter as the operator sees it: read from a delivery (its reason, its
//! count, the request it holds, the broker's first death), and rendered as a table
//! row or in full.

use keelson_protocol::transport::{DEAD_LETTER_REASON_HEADER, DELIVERIES_HEADER};
use keelson_protocol::{Request, decode, peek_id};
use serde::Serialize;
use std::collections::BTreeMap;

/// Width of the REASON column.
const REASON_WIDTH: usize = 72;

/// Where the first death happened, from RabbitMQ's `x-first-death-*` headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirstDeath {
    /// `rejected`, `delivery_limit`, `expired`, ...
    pub reason: Option<String>,
    /// The queue the message died on.
    pub queue: Option<String>,
    /// The exchange it had been published to.
    pub exchange: Option<String>,
}

/// One dead letter, as `list --json` and `show` give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The request id, or for a message without a readable one the first 12 hex
    /// digits of a hash of its bytes.
    pub id: String,
    /// Why it was dead-lettered ([`DEAD_LETTER_REASON_HEADER`]).
    pub reason: Option<String>,
    /// Deliveries before it died ([`DELIVERIES_HEADER`]; 1 when absent).
    pub deliveries: u32,
    /// Set by the broker when it dead-lettered the message itself.
    pub first_death: Option<FirstDeath>,
    /// Size of the message, in bytes.
    pub size: usize,
    /// Transport headers, as received.
    pub headers: BTreeMap<String, String>,
    /// Why the message is not a readable request; `None` when it is one.
    pub undecodable: Option<String>,
    /// The request, when it decodes.
    pub request: Option<RequestView>,
}

/// The envelope fields of a dead request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestView {
    pub handler: String,
    pub user: Option<String>,
    pub session: Option<String>,
    pub version: String,
    pub deadline_unix_ms: u64,
    /// The deadline in UTC (RFC 3339).
    pub deadline: String,
    pub attempt: u32,
    pub idempotency_key: Option<String>,
    /// Envelope headers (`traceparent`, ...).
    pub headers: BTreeMap<String, String>,
    /// The body as text when it is UTF-8 JSON.
    pub body: Option<String>,
    pub body_size: usize,
}

impl DeadLetter {
    /// Read a dead letter's headers and payload; never fails.
    pub fn read(payload: &[u8], headers: &BTreeMap<String, String>) -> Self {
        let (request, undecodable) = match decode::<Request>(payload) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let id = match &request {
            Some(r) => r.id.clone(),
            None => peek_id(payload).unwrap_or_else(|| bytes_id(payload)),
        };
        let first = |what: &str| headers.get(&format!("x-first-death-{what}")).cloned();
        let first_death = FirstDeath {
            reason: first("reason"),
            queue: first("queue"),
            exchange: first("exchange"),
        };
        let any_first_death = first_death.reason.is_some()
            || first_death.queue.is_some()
            || first_death.exchange.is_some();
        Self {
            id,
            reason: headers.get(DEAD_LETTER_REASON_HEADER).cloned(),
            deliveries: headers
                .get(DELIVERIES_HEADER)
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(1)
                .max(1),
            first_death: any_first_death.then_some(first_death),
            size: payload.len(),
            headers: headers.clone(),
            undecodable,
            request: request.map(|r| RequestView {
                body: json_text(&r.body),
                body_size: r.body.len(),
                deadline: utc(r.deadline_unix_ms),
                version: r.v.to_string(),
                handler: r.handler,
                user: r.user,
                session: r.session,
                deadline_unix_ms: r.deadline_unix_ms,
                attempt: r.attempt,
                idempotency_key: r.idempotency_key,
                headers: r.headers,
            }),
        }
    }
}

/// `bytes` as text when they are UTF-8 JSON.
pub(super) fn json_text(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    Some(text.to_owned())
}

/// An id for a message without a readable one: the first 12 hex digits of its
/// FNV-1a hash (stable across builds and machines, unlike std's hasher).
pub(super) fn bytes_id(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")[..12].to_owned()
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC.
pub(super) fn utc(unix_ms: u64) -> String {
    let (days, ms_of_day) = (unix_ms / 86_400_000, unix_ms % 86_400_000);
    // Civil from days (H. Hinnant), for days since 1970-01-01; u64 keeps it simple.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let s = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

/// `text` cut to `width` characters, with an ellipsis when cut.
pub(super) fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The table `keelson dlq list` prints.
pub fn render_table(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "(no dead letters)\n".to_owned();
    }
    let rows: Vec<[String; 5]> = letters
        .iter()
        .map(|d| {
            let request = d.request.as_ref();
            [
                d.id.clone(),
                request.map_or_else(|| "?".to_owned(), |r| r.handler.clone()),
                request
                    .and_then(|r| r.user.clone())
                    .unwrap_or_else(|| "-".to_owned()),
                d.deliveries.to_string(),
                truncate(d.reason.as_deref().unwrap_or("-"), REASON_WIDTH),
            ]
        })
        .collect();
    let header = ["ID", "HANDLER", "USER", "DELIVERIES", "REASON"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        )
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    out
}

/// The text `keelson dlq show` prints.
pub fn render_one(d: &DeadLetter) -> String {
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<16}{value}\n"));
    field("id", d.id.clone());
    field("reason", or_dash(d.reason.as_deref()));
    field("deliveries", d.deliveries.to_string());
    if let Some(f) = &d.first_death {
        field(
            "first death",
            format!(
                "{} (queue {}, exchange {})",
                or_dash(f.reason.as_deref()),
                or_dash(f.queue.as_deref()),
                or_dash(f.exchange.as_deref())
            ),
        );
    }
    field("size", format!("{} bytes", d.size));
    if let Some(why) = &d.undecodable {
        field("undecodable", why.clone());
    }
    if let Some(r) = &d.request {
        field("handler", r.handler.clone());
        field("user", or_dash(r.user.as_deref()));
        field("session", or_dash(r.session.as_deref()));
        field(
            "deadline",
            format!("{} ({} unix ms)", r.deadline, r.deadline_unix_ms),
        );
        field("attempt", r.attempt.to_string());
        field("idempotency key", or_dash(r.idempotency_key.as_deref()));
        field("protocol", r.version.clone());
        field(
            "body",
            r.body.clone().unwrap_or_else(|| match r.body_size {
                0 => "(empty)".to_owned(),
                n => format!("({n} bytes, not UTF-8 JSON)"),
            }),
        );
    }
    let mut list = |title: &str, map: &BTreeMap<String, String>| {
        if !map.is_empty() {
            out.push_str(&format!("{title}\n"));
            for (k, v) in map {
                out.push_str(&format!("  {k}: {v}\n"));
            }
        }
    };
    list("headers", &d.headers);
    if let Some(r) = &d.request {
        list("request headers", &r.headers);
    }
    out
}
