//! Message headers between the mesh ([`Headers`], strings) and AMQP (field tables).
//!
//! Outgoing headers are AMQP long strings. Incoming simple values (strings, numbers,
//! booleans, timestamps) become strings so that a peer in another language may send
//! them typed; nested values (arrays, tables such as RabbitMQ's `x-death`), byte
//! arrays and decimals are left out.

use super::super::Headers;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::warn;

/// `headers` as an AMQP field table of long strings. A key longer than an AMQP short
/// string (255 bytes) cannot be carried and is dropped with a warning.
pub(crate) fn to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in headers {
        match ShortString::try_new(key.as_str()) {
            Ok(k) => {
                table.insert(k, AMQPValue::LongString(LongString::from(value.as_bytes())));
            }
            Err(_) => warn!(
                "dropping a message header whose name is {} bytes long (at most 255)",
                key.len()
            ),
        }
    }
    table
}

/// Remove what a trip through a delay queue adds to a message: the level header
/// that routed it there and the broker's `x-first-death-*` headers. A consumer sees
/// the headers that were enqueued; the raw ones stay on the AMQP message (a dead
/// letter keeps them).
pub(crate) fn strip_delay_marks(headers: &mut Headers) {
    headers
        .retain(|key, _| key != super::delay::DELAY_HEADER && !key.starts_with("x-first-death-"));
}

/// The reason of the latest dead-lettering recorded in `table`'s `x-death` header
/// (the broker keeps its entries most recent first), if any.
pub(crate) fn last_death_reason(table: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = table?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else {
        return None;
    };
    value_string(latest.inner().get("reason")?)
}

/// The simple values of `table` as strings.
pub(crate) fn from_table(table: Option<&FieldTable>) -> Headers {
    let mut headers = Headers::new();
    for (key, value) in table.into_iter().flat_map(|t| t.inner()) {
        if let Some(v) = value_string(value) {
            headers.insert(key.as_str().to_owned(), v);
        }
    }
    headers
}

fn value_string(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::DecimalValue(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::FieldTable(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_typed_values_become_strings() {
        let mut headers = Headers::new();
        headers.insert("traceparent".into(), "00-abc-def-01".into());
        headers.insert("x".repeat(300), "too long a name".into());
        let mut table = to_table(&headers);
        assert_eq!(table.inner().len(), 1);
        table.insert("count".into(), AMQPValue::LongLongInt(-3));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        table.insert("x-death".into(), AMQPValue::FieldArray(Vec::new().into()));
        let back = from_table(Some(&table));
        assert_eq!(back.get("traceparent").unwrap(), "00-abc-def-01");
        assert_eq!(back.get("count").unwrap(), "-3");
        assert_eq!(back.get("flag").unwrap(), "true");
        assert!(!back.contains_key("x-death"));
        assert!(from_table(None).is_empty());
    }

    #[test]
    fn the_latest_death_is_the_first_entry_of_x_death() {
        let death = |reason: &str| {
            let mut entry = FieldTable::default();
            entry.insert("reason".into(), AMQPValue::LongString(reason.into()));
            AMQPValue::FieldTable(entry)
        };
        let mut table = FieldTable::default();
        assert_eq!(last_death_reason(Some(&table)), None);
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("delivery_limit"), death("expired")].into()),
        );
        assert_eq!(
            last_death_reason(Some(&table)).as_deref(),
            Some("delivery_limit")
        );
        assert_eq!(last_death_reason(None), None);
    }

    #[test]
    fn delay_marks_are_stripped_and_the_rest_kept() {
        let mut headers = Headers::new();
        for key in [
            "x-keelson-delay",
            "x-first-death-reason",
            "x-first-death-queue",
            "traceparent",
            "x-keelson-deliveries",
        ] {
            headers.insert(key.into(), "v".into());
        }
        strip_delay_marks(&mut headers);
        let left: Vec<&str> = headers.keys().map(String::as_str).collect();
        assert_eq!(left, ["traceparent", "x-keelson-deliveries"]);
    }
}
