//! Hostile input: `decode` is the door through which untrusted bytes enter, so no
//! input may panic it, exhaust its memory or overflow its stack. Every decode here
//! runs on a thread with a 256 KiB stack (see [`on_small_stack`]); a stack overflow
//! aborts the whole test binary, which fails the run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_protocol::codec::{MAX_DEPTH, MAX_MESSAGE_BYTES};
use keelson_protocol::{DecodeError, Reply, ReplyStatus, Request, decode, encode};
use proptest::collection::vec;
use proptest::prelude::*;

/// Stack of the threads the hostile inputs are decoded on: far below the 2 MiB of
/// tokio's workers, so a decoder that recurses per nesting level overflows here.
const SMALL_STACK: usize = 256 * 1024;

/// Run `f` on a fresh thread with a [`SMALL_STACK`]; a panic in it is re-raised here.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = std::thread::Builder::new()
        .name("small-stack-decode".into())
        .stack_size(SMALL_STACK)
        .spawn(f)
        .unwrap();
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Decode `bytes` as both envelopes on a small stack.
fn decode_both(bytes: Vec<u8>) -> (Result<Request, DecodeError>, Result<Reply, DecodeError>) {
    on_small_stack(move || (decode::<Request>(&bytes), decode::<Reply>(&bytes)))
}

fn full_request() -> Request {
    let mut request = Request::new("req-1", "counter.increment", br#"{"by":1}"#.to_vec(), 99);
    request.user = Some("alice".into());
    request.session = Some("s-1".into());
    request.attempt = 2;
    request.idempotency_key = Some("k-1".into());
    request
        .headers
        .insert("traceparent".into(), "00-ab-cd-01".into());
    request.headers.insert("x".into(), String::new());
    request
}

fn full_reply() -> Reply {
    Reply::error(
        "req-1",
        ReplyStatus::HandlerError,
        "boom",
        "handler failed",
        "node-1",
    )
}

// ---------------------------------------------------------------------------------
// Hand-built MessagePack
// ---------------------------------------------------------------------------------

/// A msgpack string (fixstr or str8).
fn msgpack_str(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let len = s.len();
    if len < 32 {
        out.push(0xa0 | u8::try_from(len).unwrap());
    } else {
        out.push(0xd9);
        out.push(u8::try_from(len).unwrap());
    }
    out.extend_from_slice(s.as_bytes());
    out
}

/// A valid encoding of [`full_request`] with one more field `key` whose value is the
/// raw msgpack `value`. Built by bumping the entry count of the top-level fixmap.
fn request_with_extra_field(key: &str, value: &[u8]) -> Vec<u8> {
    let mut bytes = encode(&full_request()).unwrap();
    assert_eq!(bytes[0] & 0xf0, 0x80, "request is a fixmap");
    assert!(bytes[0] < 0x8f);
    bytes[0] += 1;
    bytes.extend(msgpack_str(key));
    bytes.extend_from_slice(value);
    bytes
}

/// A valid encoding of [`full_request`] with the value of `field` replaced by the
/// raw msgpack `value`.
fn request_with_field_value(field: &str, value: &[u8]) -> Vec<u8> {
    // Re-encode the known fields as a map of raw values, with `field` swapped.
    let mut request = full_request();
    request.headers.clear();
    let bytes = encode(&request).unwrap();
    let key = msgpack_str(field);
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap_or_else(|| panic!("field {field} not found"));
    let value_start = at + key.len();
    let value_len = msgpack_value_len(&bytes[value_start..]);
    let mut out = bytes[..value_start].to_vec();
    out.extend_from_slice(value);
    out.extend_from_slice(&bytes[value_start + value_len..]);
    out
}

/// Length of the first msgpack value in `bytes`, for the shapes [`full_request`]
/// produces with empty headers.
fn msgpack_value_len(bytes: &[u8]) -> usize {
    let be = |n: usize| {
        bytes[1..=n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | usize::from(*b))
    };
    match bytes[0] {
        0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => 1,
        0x80 => 1,                                       // empty fixmap (headers)
        0xa0..=0xbf => 1 + usize::from(bytes[0] & 0x1f), // fixstr
        0xc4 | 0xd9 => 2 + be(1),                        // bin8 / str8
        0xc5 | 0xda => 3 + be(2),                        // bin16 / str16
        0xc6 | 0xdb => 5 + be(4),                        // bin32 / str32
        0xcc => 2,
        0xcd => 3,
        0xce => 5,
        0xcf => 9,
        0x82 => {
            // fixmap of two entries: the version {major, minor}
            let mut len = 1;
            for _ in 0..4 {
                len += msgpack_value_len(&bytes[len..]);
            }
            len
        }
        other => panic!("unexpected marker {other:#04x} in a full request"),
    }
}

/// `depth` nested one-element arrays around a nil: `[[[...nil...]]]`.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut bytes = vec![0x91; depth];
    bytes.push(0xc0);
    bytes
}

/// `depth` nested one-entry maps around a nil: `{"a": {"a": ... nil}}`.
fn nested_maps(depth: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(depth * 3 + 1);
    for _ in 0..depth {
        bytes.extend_from_slice(&[0x81, 0xa1, b'a']);
    }
    bytes.push(0xc0);
    bytes
}

/// Nested arrays and maps alternating, and an ext value at the bottom.
fn nested_mixed(depth: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for level in 0..depth {
        if level % 2 == 0 {
            bytes.push(0x91);
        } else {
            bytes.extend_from_slice(&[0x81, 0x00]);
        }
    }
    bytes.extend_from_slice(&[0xd4, 0x01, 0x00]); // fixext1
    bytes
}

fn assert_malformed<T: std::fmt::Debug>(result: &Result<T, DecodeError>, what: &str) {
    assert!(
        matches!(result, Err(DecodeError::Malformed { .. })),
        "{what}: expected Malformed, got {result:?}"
    );
}

fn assert_depth_exceeded<T: std::fmt::Debug>(result: &Result<T, DecodeError>, what: &str) {
    match result {
        Err(DecodeError::Malformed {
            source: rmp_serde::decode::Error::DepthLimitExceeded,
            ..
        }) => {}
        other => panic!("{what}: expected a depth-limit error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Arbitrary bytes
// ---------------------------------------------------------------------------------

/// Pieces of MessagePack that steer random input into the decoder's deeper paths:
/// the envelopes' field names, containers, huge length prefixes, exts, versions.
fn token() -> impl Strategy<Value = Vec<u8>> {
    let fields = [
        "v",
        "id",
        "handler",
        "user",
        "session",
        "deadline_unix_ms",
        "attempt",
        "idempotency_key",
        "headers",
        "body",
        "status",
        "error",
        "served_by",
        "code",
        "message",
        "major",
        "minor",
        "ok",
        "unknown",
    ];
    let raw: Vec<Vec<u8>> = vec![
        vec![0x91],
        vec![0x92],
        vec![0x81],
        vec![0x8a],
        vec![0x80],
        vec![0x90],
        vec![0xc0],
        vec![0xc2],
        vec![0xc3],
        vec![0x01],
        vec![0xff],
        vec![0xcc, 0xff],
        vec![0xcd, 0xff, 0xff],
        vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0],
        vec![0xca, 0x7f, 0xc0, 0, 0],
        vec![0xdc, 0xff, 0xff],
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0xde, 0xff, 0xff],
        vec![0xdf, 0xff, 0xff, 0xff, 0xff],
        vec![0xc4, 0xff],
        vec![0xc5, 0xff, 0xff],
        vec![0xc6, 0xff, 0xff, 0xff, 0xff],
        vec![0xd9, 0xff],
        vec![0xdb, 0xff, 0xff, 0xff, 0xff],
        vec![0xa2, 0xff, 0xfe], // invalid UTF-8
        vec![0xc4, 0x02, b'{', b'}'],
        vec![0xd4, 0x01, 0x00],
        vec![0xc7, 0x02, 0x05, 0xaa, 0xbb],
        vec![0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        vec![
            0x82, 0xa5, b'm', b'a', b'j', b'o', b'r', 0x01, 0xa5, b'm', b'i', b'n', b'o', b'r',
            0x00,
        ],
        vec![
            0x82, 0xa5, b'm', b'a', b'j', b'o', b'r', 0x02, 0xa5, b'm', b'i', b'n', b'o', b'r',
            0x00,
        ],
        vec![0x92, 0x01, 0x00],
    ];
    let named = fields.into_iter().map(msgpack_str);
    let all: Vec<Vec<u8>> = raw.into_iter().chain(named).collect();
    proptest::sample::select(all)
}

/// A map header followed by tokens: looks enough like an envelope to get past the
/// first byte.
fn structured_garbage() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::sample::select(vec![0x80u8, 0x83, 0x86, 0x8a, 0x8b, 0x8f, 0xde, 0x91, 0x9a]),
        vec(token(), 0..64),
    )
        .prop_map(|(head, tokens)| {
            let mut bytes = vec![head];
            if head == 0xde {
                bytes.extend_from_slice(&[0x00, 0x0a]);
            }
            for t in tokens {
                bytes.extend(t);
            }
            bytes
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<prop::sample::Index>(), token()).prop_map(|(i, t)| Mutation::Insert(i, t)),
        (any::<prop::sample::Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Set(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Insert(i, t) => {
                let i = i.index(bytes.len());
                bytes.splice(i..i, t.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let i = i.index(bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
        }
    }
    bytes
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..=4096)) {
        let (request, reply) = decode_both(bytes);
        // Random bytes are not a valid envelope; anything else is a finding.
        if let Ok(request) = request {
            prop_assert!(request.v.is_compatible());
        }
        if let Ok(reply) = reply {
            prop_assert!(reply.v.is_compatible());
        }
    }

    #[test]
    fn envelope_shaped_garbage_never_panics(bytes in structured_garbage()) {
        let (request, reply) = decode_both(bytes);
        if let Ok(request) = request {
            prop_assert!(request.v.is_compatible());
        }
        if let Ok(reply) = reply {
            prop_assert!(reply.v.is_compatible());
        }
    }

    #[test]
    fn mutated_envelopes_never_panic(
        which in any::<bool>(),
        mutations in vec(mutation(), 1..6),
    ) {
        let valid = if which {
            encode(&full_request()).unwrap()
        } else {
            encode(&full_reply()).unwrap()
        };
        let bytes = apply(valid, &mutations);
        let (request, reply) = decode_both(bytes);
        if let Ok(request) = request {
            prop_assert!(request.v.is_compatible());
        }
        if let Ok(reply) = reply {
            prop_assert!(reply.v.is_compatible());
        }
    }
}

// ---------------------------------------------------------------------------------
// Truncation and absurd lengths
// ---------------------------------------------------------------------------------

#[test]
fn every_strict_prefix_of_a_request_fails_cleanly() {
    for request in [full_request(), Request::new("r", "h", Vec::new(), 0)] {
        let bytes = encode(&request).unwrap();
        assert_eq!(decode::<Request>(&bytes).unwrap(), request, "whole message");
        let results = on_small_stack(move || {
            (0..bytes.len())
                .map(|len| (len, decode::<Request>(&bytes[..len])))
                .collect::<Vec<_>>()
        });
        for (len, result) in results {
            assert_malformed(&result, &format!("prefix of {len} bytes"));
        }
    }
}

#[test]
fn every_strict_prefix_of_a_reply_fails_cleanly() {
    for reply in [full_reply(), Reply::ok("r", b"[]".to_vec(), "n")] {
        let bytes = encode(&reply).unwrap();
        assert_eq!(decode::<Reply>(&bytes).unwrap(), reply, "whole message");
        let results = on_small_stack(move || {
            (0..bytes.len())
                .map(|len| (len, decode::<Reply>(&bytes[..len])))
                .collect::<Vec<_>>()
        });
        for (len, result) in results {
            assert_malformed(&result, &format!("prefix of {len} bytes"));
        }
    }
}

/// Length prefixes that promise about 4 GiB (or 64 Ki elements) that are not there.
const HUGE_LENGTH_HEADERS: [&[u8]; 10] = [
    &[0xdd, 0xff, 0xff, 0xff, 0xff],       // array32
    &[0xdc, 0xff, 0xff],                   // array16
    &[0xdf, 0xff, 0xff, 0xff, 0xff],       // map32
    &[0xde, 0xff, 0xff],                   // map16
    &[0xc6, 0xff, 0xff, 0xff, 0xff],       // bin32
    &[0xc5, 0xff, 0xff],                   // bin16
    &[0xdb, 0xff, 0xff, 0xff, 0xff],       // str32
    &[0xda, 0xff, 0xff],                   // str16
    &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01], // ext32
    &[0xc8, 0xff, 0xff, 0x01],             // ext16
];

#[test]
fn huge_length_headers_fail_cleanly() {
    for header in HUGE_LENGTH_HEADERS {
        let (request, reply) = decode_both(header.to_vec());
        assert_malformed(&request, &format!("request {header:02x?}"));
        assert_malformed(&reply, &format!("reply {header:02x?}"));

        // The same header followed by a little data, still far short of its promise.
        let mut padded = header.to_vec();
        padded.extend_from_slice(&[0xc0; 64]);
        let (request, reply) = decode_both(padded);
        assert_malformed(&request, &format!("request {header:02x?} + 64 nil"));
        assert_malformed(&reply, &format!("reply {header:02x?} + 64 nil"));
    }
}

#[test]
fn huge_length_headers_inside_a_request_fail_cleanly() {
    for header in HUGE_LENGTH_HEADERS {
        for field in ["id", "body", "headers", "user", "v"] {
            let bytes = request_with_field_value(field, header);
            let result = on_small_stack(move || decode::<Request>(&bytes));
            assert_malformed(&result, &format!("{field} = {header:02x?}"));
        }
        let bytes = request_with_extra_field("future", header);
        let result = on_small_stack(move || decode::<Request>(&bytes));
        assert_malformed(&result, &format!("unknown field = {header:02x?}"));
    }
}

#[test]
fn field_value_replacement_helper_produces_decodable_requests() {
    // Guards the helper above: swapping a field for a valid value of its type decodes.
    let bytes = request_with_field_value("id", &msgpack_str("other-id"));
    let request: Request = decode(&bytes).unwrap();
    assert_eq!(request.id, "other-id");
    let bytes = request_with_field_value("body", &[0xc4, 0x01, b'7']);
    assert_eq!(decode::<Request>(&bytes).unwrap().body, b"7");
    let bytes = request_with_extra_field("future", &[0x92, 0x01, 0xc0]);
    assert_eq!(decode::<Request>(&bytes).unwrap(), full_request());
}

// ---------------------------------------------------------------------------------
// Size limit
// ---------------------------------------------------------------------------------

/// A valid request whose encoding is exactly `size` bytes.
fn request_of_encoded_size(size: usize) -> Vec<u8> {
    let probe = Request::new("big", "h", vec![0; 100_000], 0);
    let overhead = encode(&probe).unwrap().len() - 100_000; // bin32 header included
    let bytes = encode(&Request::new("big", "h", vec![7; size - overhead], 0)).unwrap();
    assert_eq!(bytes.len(), size);
    bytes
}

#[test]
fn request_of_exactly_the_size_limit_decodes() {
    let bytes = request_of_encoded_size(MAX_MESSAGE_BYTES);
    let request: Request = decode(&bytes).unwrap();
    assert_eq!(request.id, "big");
    assert!(request.body.iter().all(|b| *b == 7));
}

#[test]
fn request_one_byte_over_the_size_limit_is_too_large() {
    let bytes = request_of_encoded_size(MAX_MESSAGE_BYTES + 1);
    match decode::<Request>(&bytes) {
        Err(DecodeError::TooLarge { size, limit }) => {
            assert_eq!(size, MAX_MESSAGE_BYTES + 1);
            assert_eq!(limit, MAX_MESSAGE_BYTES);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn oversized_garbage_is_too_large_before_any_parsing() {
    // Deeply nested too: the size check must come first, whatever the content.
    let bytes = nested_arrays(MAX_MESSAGE_BYTES + 10);
    let (request, reply) = decode_both(bytes);
    assert!(
        matches!(request, Err(DecodeError::TooLarge { .. })),
        "{request:?}"
    );
    assert!(
        matches!(reply, Err(DecodeError::TooLarge { .. })),
        "{reply:?}"
    );
}

// ---------------------------------------------------------------------------------
// Nesting depth
// ---------------------------------------------------------------------------------

#[test]
fn deeply_nested_arrays_fail_cleanly() {
    let (request, reply) = decode_both(nested_arrays(100_000));
    assert_malformed(&request, "request");
    assert_malformed(&reply, "reply");
}

#[test]
fn deeply_nested_maps_fail_cleanly() {
    let (request, reply) = decode_both(nested_maps(100_000));
    assert_malformed(&request, "request");
    assert_malformed(&reply, "reply");
}

#[test]
fn deep_nesting_in_an_unknown_request_field_is_refused_by_the_depth_limit() {
    for (name, deep) in [
        ("arrays", nested_arrays(100_000)),
        ("maps", nested_maps(100_000)),
        ("mixed", nested_mixed(100_000)),
    ] {
        let bytes = request_with_extra_field("future", &deep);
        let result = on_small_stack(move || decode::<Request>(&bytes));
        assert_depth_exceeded(&result, name);
    }
}

#[test]
fn deep_nesting_in_known_request_fields_fails_cleanly() {
    for field in ["headers", "body", "id", "user", "attempt"] {
        for (name, deep) in [
            ("arrays", nested_arrays(100_000)),
            ("maps", nested_maps(100_000)),
            ("mixed", nested_mixed(100_000)),
        ] {
            let bytes = request_with_field_value(field, &deep);
            let result = on_small_stack(move || decode::<Request>(&bytes));
            assert_malformed(&result, &format!("{field} = deep {name}"));
        }
    }
}

#[test]
fn deep_nesting_in_an_unknown_field_of_the_version_is_refused() {
    // `v` = {major: 1, minor: 0, "x": [[[...]]]}: skipped by the version's own visitor.
    let mut version = vec![0x83];
    version.extend(msgpack_str("major"));
    version.push(0x01);
    version.extend(msgpack_str("minor"));
    version.push(0x00);
    version.extend(msgpack_str("x"));
    version.extend(nested_maps(100_000));
    let bytes = request_with_field_value("v", &version);
    let result = on_small_stack(move || decode::<Request>(&bytes));
    assert_depth_exceeded(&result, "v.x");
}

#[test]
fn deep_nesting_in_a_reply_error_is_refused() {
    // {v, id, status, error: {code, message, "trace": [[[...]]]}}
    let mut bytes = vec![0x84];
    bytes.extend(msgpack_str("v"));
    bytes.extend_from_slice(&[0x92, 0x01, 0x00]);
    bytes.extend(msgpack_str("id"));
    bytes.extend(msgpack_str("r"));
    bytes.extend(msgpack_str("status"));
    bytes.extend(msgpack_str("handler_error"));
    bytes.extend(msgpack_str("error"));
    bytes.push(0x83);
    bytes.extend(msgpack_str("code"));
    bytes.extend(msgpack_str("c"));
    bytes.extend(msgpack_str("message"));
    bytes.extend(msgpack_str("m"));
    bytes.extend(msgpack_str("trace"));
    let mut shallow = bytes.clone();
    bytes.extend(nested_arrays(100_000));
    shallow.extend(nested_arrays(3));

    let result = on_small_stack(move || decode::<Reply>(&bytes));
    assert_depth_exceeded(&result, "error.trace");
    // The same reply with a shallow unknown field decodes.
    let reply: Reply = decode(&shallow).unwrap();
    assert_eq!(reply.error.unwrap().code, "c");
}

#[test]
fn deep_nesting_in_a_major_2_message_fails_cleanly() {
    // Our type fails, so decode probes the version: that second pass is bounded too.
    let mut bytes = vec![0x82];
    bytes.extend(msgpack_str("v"));
    bytes.extend_from_slice(&[0x92, 0x02, 0x00]);
    bytes.extend(msgpack_str("new_shape"));
    bytes.extend(nested_maps(100_000));
    let (request, reply) = decode_both(bytes);
    assert!(request.is_err(), "{request:?}");
    assert!(reply.is_err(), "{reply:?}");
}

#[test]
fn nesting_well_within_the_depth_limit_is_accepted_in_unknown_fields() {
    // A newer peer's nested optional field, a few levels below the limit, is skipped
    // rather than refused; the whole message (top map included) stays under MAX_DEPTH.
    for depth in [1, MAX_DEPTH / 2, MAX_DEPTH - 4] {
        for deep in [nested_arrays(depth), nested_maps(depth)] {
            let bytes = request_with_extra_field("future", &deep);
            let result = on_small_stack(move || decode::<Request>(&bytes));
            assert_eq!(result.unwrap(), full_request(), "depth {depth}");
        }
    }
}

#[test]
fn nesting_beyond_the_depth_limit_is_refused_in_unknown_fields() {
    for depth in [MAX_DEPTH + 1, MAX_DEPTH * 2, 10_000] {
        for deep in [nested_arrays(depth), nested_maps(depth)] {
            let bytes = request_with_extra_field("future", &deep);
            let result = on_small_stack(move || decode::<Request>(&bytes));
            assert_depth_exceeded(&result, &format!("depth {depth}"));
        }
    }
}
