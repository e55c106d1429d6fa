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
}
