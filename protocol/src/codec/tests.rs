//! Example-based tests of the codec: the wire format other peers rely on, version
//! compatibility in both directions, and unknown reply statuses.
//!
//! Property tests live in `tests/codec_properties.rs`, hostile input in
//! `tests/codec_robustness.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{DecodeError, MAX_MESSAGE_BYTES, decode, encode};
use crate::envelope::{ErrorInfo, Reply, ReplyStatus, Request};
use crate::version::ProtocolVersion;
use serde::Serialize;
use serde::de::IgnoredAny;
use std::collections::BTreeMap;

const V1_7: ProtocolVersion = ProtocolVersion { major: 1, minor: 7 };
const V2_0: ProtocolVersion = ProtocolVersion { major: 2, minor: 0 };

/// A request with every optional field set.
fn full_request() -> Request {
    let mut request = Request::new(
        "req-42",
        "counter.increment",
        br#"{"by":3}"#.to_vec(),
        1_700_000_000_123,
    );
    request.user = Some("alice".into());
    request.session = Some("sess-9".into());
    request.attempt = 3;
    request.idempotency_key = Some("op-7".into());
    request.headers.insert(
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    request.headers.insert("tenant".into(), "acme".into());
    request
}

/// Every status with the name it has on the wire. The exhaustive match makes this
/// list fail to compile when a variant is added without a wire name here.
fn wire_name(status: ReplyStatus) -> &'static str {
    match status {
        ReplyStatus::Ok => "ok",
        ReplyStatus::BadRequest => "bad_request",
        ReplyStatus::Unauthorized => "unauthorized",
        ReplyStatus::Forbidden => "forbidden",
        ReplyStatus::NotFound => "not_found",
        ReplyStatus::Conflict => "conflict",
        ReplyStatus::KeyReused => "key_reused",
        ReplyStatus::TooManyRequests => "too_many_requests",
        ReplyStatus::PayloadTooLarge => "payload_too_large",
        ReplyStatus::HandlerError => "handler_error",
        ReplyStatus::Timeout => "timeout",
        ReplyStatus::Overloaded => "overloaded",
        ReplyStatus::Unknown => "unknown",
    }
}

const KNOWN_STATUSES: [ReplyStatus; 12] = [
    ReplyStatus::KeyReused,
    ReplyStatus::TooManyRequests,
    ReplyStatus::Ok,
    ReplyStatus::BadRequest,
    ReplyStatus::Unauthorized,
    ReplyStatus::Forbidden,
    ReplyStatus::NotFound,
    ReplyStatus::Conflict,
    ReplyStatus::PayloadTooLarge,
    ReplyStatus::HandlerError,
    ReplyStatus::Timeout,
    ReplyStatus::Overloaded,
];

/// The keys of the top-level map of an encoded message.
fn top_level_keys(bytes: &[u8]) -> Vec<String> {
    let map: BTreeMap<String, IgnoredAny> = rmp_serde::from_slice(bytes).unwrap();
    map.into_keys().collect()
}

// ---------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------

#[test]
fn request_is_encoded_as_a_map_with_named_fields() {
    let bytes = encode(&full_request()).unwrap();
    // A fixmap of 10 entries, not a positional array.
    assert_eq!(bytes[0], 0x8a, "first byte {:#04x}", bytes[0]);
    let mut expected = vec![
        "attempt",
        "body",
        "deadline_unix_ms",
        "handler",
        "headers",
        "id",
        "idempotency_key",
        "session",
        "user",
        "v",
    ];
    expected.sort_unstable();
    assert_eq!(top_level_keys(&bytes), expected);
}

#[test]
fn reply_is_encoded_as_a_map_with_named_fields() {
    let reply = Reply::error("r-1", ReplyStatus::Conflict, "stale", "try again", "node-a");
    let bytes = encode(&reply).unwrap();
    assert_eq!(bytes[0], 0x86, "first byte {:#04x}", bytes[0]);
    assert_eq!(
        top_level_keys(&bytes),
        ["body", "error", "id", "served_by", "status", "v"]
    );
}

#[test]
fn version_is_a_map_of_major_and_minor() {
    #[derive(serde::Deserialize)]
    struct Probe {
        v: BTreeMap<String, u16>,
    }
    let probe: Probe = rmp_serde::from_slice(&encode(&full_request()).unwrap()).unwrap();
    let expected: BTreeMap<String, u16> = [
        ("major".to_string(), ProtocolVersion::CURRENT.major),
        ("minor".to_string(), ProtocolVersion::CURRENT.minor),
    ]
    .into();
    assert_eq!(probe.v, expected);
}

#[test]
fn body_is_encoded_as_msgpack_binary() {
    let mut request = Request::new("r", "h", vec![0xAB; 3], 0);
    request.headers.clear();
    let bytes = encode(&request).unwrap();
    // bin8 marker, length 3, the bytes: not an array of integers.
    let needle = [0xc4, 0x03, 0xAB, 0xAB, 0xAB];
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle),
        "body not encoded as bin8 in {bytes:02x?}"
    );
}

#[test]
fn reply_statuses_have_snake_case_wire_names_and_round_trip() {
    for status in KNOWN_STATUSES.into_iter().chain([ReplyStatus::Unknown]) {
        let name = wire_name(status);
        assert_eq!(
            rmp_serde::to_vec_named(&status).unwrap(),
            rmp_serde::to_vec(name).unwrap(),
            "wire name of {status:?}"
        );
        let reply = Reply::error("r", status, "c", "m", "n");
        let back: Reply = decode(&encode(&reply).unwrap()).unwrap();
        assert_eq!(back.status, status);
    }
}

#[test]
fn full_request_round_trips() {
    let request = full_request();
    let back: Request = decode(&encode(&request).unwrap()).unwrap();
    assert_eq!(back, request);
}

#[test]
fn replies_round_trip() {
    for reply in [
        Reply::ok("r-1", br#"{"n":1}"#.to_vec(), "node-a"),
        Reply::error(
            "r-2",
            ReplyStatus::NotFound,
            "unknown_handler",
            "no",
            "node-b",
        ),
    ] {
        let back: Reply = decode(&encode(&reply).unwrap()).unwrap();
        assert_eq!(back, reply);
    }
}

// ---------------------------------------------------------------------------------
// Forward compatibility: a newer minor version with fields this build does not know
// ---------------------------------------------------------------------------------

#[derive(Serialize)]
struct Routing {
    zone: String,
    weights: Vec<u32>,
    labels: BTreeMap<String, Vec<String>>,
}

/// `Request` as a 1.7 peer might write it: two new fields (one before the known
/// ones, so the reader must skip it before it sees `v`) and a nested new structure.
#[derive(Serialize)]
struct NewerRequest {
    priority: u8,
    v: ProtocolVersion,
    id: String,
    handler: String,
    user: Option<String>,
    session: Option<String>,
    deadline_unix_ms: u64,
    attempt: u32,
    idempotency_key: Option<String>,
    headers: BTreeMap<String, String>,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    extra: Vec<String>,
    routing: Routing,
}

impl NewerRequest {
    fn from_current(r: &Request) -> Self {
        Self {
            priority: 200,
            v: V1_7,
            id: r.id.clone(),
            handler: r.handler.clone(),
            user: r.user.clone(),
            session: r.session.clone(),
            deadline_unix_ms: r.deadline_unix_ms,
            attempt: r.attempt,
            idempotency_key: r.idempotency_key.clone(),
            headers: r.headers.clone(),
            body: r.body.clone(),
            extra: vec!["a".into(), String::new(), "ü".into()],
            routing: Routing {
                zone: "eu-west".into(),
                weights: vec![1, 70_000, u32::MAX],
                labels: [("tier".to_string(), vec!["gold".to_string()])].into(),
            },
        }
    }
}

#[test]
fn newer_minor_request_with_unknown_fields_decodes_with_known_fields_intact() {
    let current = full_request();
    let bytes = rmp_serde::to_vec_named(&NewerRequest::from_current(&current)).unwrap();

    let back: Request = decode(&bytes).unwrap();

    assert_eq!(back.v, V1_7, "the writer's version is kept");
    assert_eq!(back, Request { v: V1_7, ..current });
}

#[derive(Serialize)]
struct NewerErrorInfo {
    code: String,
    retry_after_ms: u64,
    message: String,
    details: Vec<BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct NewerReply {
    v: ProtocolVersion,
    id: String,
    status: &'static str,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    error: Option<NewerErrorInfo>,
    served_by: String,
    cost_units: f64,
}

#[test]
fn newer_minor_reply_with_unknown_fields_decodes_with_known_fields_intact() {
    let newer = NewerReply {
        v: V1_7,
        id: "r-9".into(),
        status: "overloaded",
        body: b"{}".to_vec(),
        error: Some(NewerErrorInfo {
            code: "busy".into(),
            retry_after_ms: 250,
            message: "come back later".into(),
            details: vec![[("queue".to_string(), "q1".to_string())].into()],
        }),
        served_by: "node-c".into(),
        cost_units: 1.5,
    };
    let bytes = rmp_serde::to_vec_named(&newer).unwrap();

    let back: Reply = decode(&bytes).unwrap();

    assert_eq!(
        back,
        Reply {
            v: V1_7,
            id: "r-9".into(),
            status: ReplyStatus::Overloaded,
            body: b"{}".to_vec(),
            error: Some(ErrorInfo {
                code: "busy".into(),
                message: "come back later".into(),
            }),
            served_by: "node-c".into(),
            replayed: false,
            http_status: None,
            headers: Vec::new(),
        }
    );
}

// ---------------------------------------------------------------------------------
// Backward compatibility: an older writer that did not have the optional fields
// ---------------------------------------------------------------------------------

/// `Request` with only its required fields, as an older (or minimal) peer writes it.
#[derive(Serialize)]
struct MinimalRequest {
    v: ProtocolVersion,
    id: String,
    handler: String,
    deadline_unix_ms: u64,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

#[test]
fn request_without_optional_fields_decodes_with_defaults() {
    let minimal = MinimalRequest {
        v: ProtocolVersion::CURRENT,
        id: "r-old".into(),
        handler: "echo".into(),
        deadline_unix_ms: 42,
        body: b"[1]".to_vec(),
    };
    let bytes = rmp_serde::to_vec_named(&minimal).unwrap();

    let back: Request = decode(&bytes).unwrap();

    assert_eq!(back.attempt, 1, "a missing attempt means the first attempt");
    assert_eq!(back.user, None);
    assert_eq!(back.session, None);
    assert_eq!(back.idempotency_key, None);
    assert!(back.headers.is_empty());
    assert_eq!(back, Request::new("r-old", "echo", b"[1]".to_vec(), 42));
}

#[test]
fn reply_without_optional_fields_decodes_with_defaults() {
    #[derive(Serialize)]
    struct MinimalReply {
        v: ProtocolVersion,
        id: String,
        status: ReplyStatus,
    }
    let bytes = rmp_serde::to_vec_named(&MinimalReply {
        v: ProtocolVersion::CURRENT,
        id: "r".into(),
        status: ReplyStatus::Timeout,
    })
    .unwrap();

    let back: Reply = decode(&bytes).unwrap();

    assert_eq!(
        back,
        Reply {
            v: ProtocolVersion::CURRENT,
            id: "r".into(),
            status: ReplyStatus::Timeout,
            body: Vec::new(),
            error: None,
            served_by: String::new(),
            replayed: false,
            http_status: None,
            headers: Vec::new(),
        }
    );
}

#[test]
fn request_missing_a_required_field_is_malformed() {
    #[derive(Serialize)]
    struct NoHandler {
        v: ProtocolVersion,
        id: String,
        deadline_unix_ms: u64,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    }
    let bytes = rmp_serde::to_vec_named(&NoHandler {
        v: ProtocolVersion::CURRENT,
        id: "r".into(),
        deadline_unix_ms: 1,
        body: Vec::new(),
    })
    .unwrap();

    let err = decode::<Request>(&bytes).unwrap_err();

    assert!(
        matches!(
            err,
            DecodeError::Malformed {
                kind: "request",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("handler"), "{err}");
}

// ---------------------------------------------------------------------------------
// Incompatible major versions
// ---------------------------------------------------------------------------------

fn assert_incompatible(err: &DecodeError, expected_kind: &str, expected_found: ProtocolVersion) {
    match err {
        DecodeError::IncompatibleVersion { kind, found, ours } => {
            assert_eq!(*kind, expected_kind);
            assert_eq!(*found, expected_found);
            assert_eq!(*ours, ProtocolVersion::CURRENT);
        }
        other => panic!("expected IncompatibleVersion, got {other:?}"),
    }
}

#[test]
fn major_2_request_with_otherwise_valid_fields_is_refused() {
    let mut request = full_request();
    request.v = V2_0;
    let bytes = encode(&request).unwrap();

    let err = decode::<Request>(&bytes).unwrap_err();

    assert_incompatible(&err, "request", V2_0);
    let text = err.to_string();
    assert!(text.contains("2.0") && text.contains("request"), "{text}");
}

#[test]
fn major_2_reply_with_otherwise_valid_fields_is_refused() {
    let mut reply = Reply::ok("r", b"1".to_vec(), "n");
    reply.v = V2_0;

    let err = decode::<Reply>(&encode(&reply).unwrap()).unwrap_err();

    assert_incompatible(&err, "reply", V2_0);
}

/// A 2.0 envelope of an entirely different shape: only `v` is shared.
#[derive(Serialize)]
struct ReshapedV2 {
    target: Vec<String>,
    v: ProtocolVersion,
    payload: BTreeMap<String, Vec<u64>>,
    id: u64,
}

#[test]
fn major_2_message_of_another_shape_is_refused_as_incompatible() {
    let bytes = rmp_serde::to_vec_named(&ReshapedV2 {
        target: vec!["a".into(), "b".into()],
        v: V2_0,
        payload: [("x".to_string(), vec![1, 2, 3])].into(),
        // `id` changed type: a field error is what a naive reader would report.
        id: 7,
    })
    .unwrap();

    assert_incompatible(&decode::<Request>(&bytes).unwrap_err(), "request", V2_0);
    assert_incompatible(&decode::<Reply>(&bytes).unwrap_err(), "reply", V2_0);
}

#[test]
fn map_with_only_a_major_2_version_and_unknown_fields_is_refused_as_incompatible() {
    #[derive(Serialize)]
    struct OnlyVersion {
        v: ProtocolVersion,
        shiny: bool,
        nested: BTreeMap<String, BTreeMap<String, String>>,
    }
    let bytes = rmp_serde::to_vec_named(&OnlyVersion {
        v: V2_0,
        shiny: true,
        nested: [("a".to_string(), [("b".to_string(), "c".to_string())].into())].into(),
    })
    .unwrap();

    assert_incompatible(&decode::<Request>(&bytes).unwrap_err(), "request", V2_0);
    assert_incompatible(&decode::<Reply>(&bytes).unwrap_err(), "reply", V2_0);
}

#[test]
fn version_with_extra_fields_of_a_future_writer_is_still_read() {
    #[derive(Serialize)]
    struct FutureVersion {
        major: u16,
        minor: u16,
        patch: u16,
    }
    #[derive(Serialize)]
    struct Msg {
        v: FutureVersion,
        only: bool,
    }
    let bytes = rmp_serde::to_vec_named(&Msg {
        v: FutureVersion {
            major: 3,
            minor: 1,
            patch: 4,
        },
        only: true,
    })
    .unwrap();

    let found = ProtocolVersion { major: 3, minor: 1 };
    assert_incompatible(&decode::<Request>(&bytes).unwrap_err(), "request", found);
}

#[test]
fn major_0_is_refused_too() {
    let mut request = full_request();
    request.v = ProtocolVersion { major: 0, minor: 9 };
    let err = decode::<Request>(&encode(&request).unwrap()).unwrap_err();
    assert_incompatible(&err, "request", request.v);
}

#[test]
fn same_major_message_of_another_shape_is_malformed_not_incompatible() {
    let bytes = rmp_serde::to_vec_named(&ReshapedV2 {
        target: Vec::new(),
        v: V1_7,
        payload: BTreeMap::new(),
        id: 7,
    })
    .unwrap();

    let err = decode::<Request>(&bytes).unwrap_err();

    assert!(
        matches!(
            err,
            DecodeError::Malformed {
                kind: "request",
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------
// Unknown reply statuses
// ---------------------------------------------------------------------------------

#[test]
fn unknown_reply_status_string_decodes_as_unknown() {
    #[derive(Serialize)]
    struct ReplyFromNewerPeer {
        v: ProtocolVersion,
        id: String,
        status: &'static str,
        error: Option<ErrorInfo>,
        served_by: String,
    }
    let bytes = rmp_serde::to_vec_named(&ReplyFromNewerPeer {
        v: V1_7,
        id: "r-5".into(),
        status: "rate_limited",
        error: Some(ErrorInfo {
            code: "slow_down".into(),
            message: "too many requests".into(),
        }),
        served_by: "node-z".into(),
    })
    .unwrap();

    let back: Reply = decode(&bytes).unwrap();

    assert_eq!(back.status, ReplyStatus::Unknown);
    assert_eq!(back.id, "r-5");
    assert_eq!(back.served_by, "node-z");
    assert_eq!(back.error.map(|e| e.code).as_deref(), Some("slow_down"));
}

#[test]
fn status_names_are_case_sensitive() {
    // "OK" is not "ok": a peer that gets the casing wrong is not silently a success.
    let mut bytes = encode(&Reply::ok("r", Vec::new(), "n")).unwrap();
    let pos = bytes
        .windows(3)
        .position(|w| w == [0xa2, b'o', b'k'])
        .expect("status ok on the wire");
    bytes[pos + 1..pos + 3].copy_from_slice(b"OK");

    let back: Reply = decode(&bytes).unwrap();

    assert_eq!(back.status, ReplyStatus::Unknown);
}

// ---------------------------------------------------------------------------------
// Limits (the hostile-input cases are in tests/codec_robustness.rs)
// ---------------------------------------------------------------------------------

#[test]
fn too_large_error_reports_size_and_limit() {
    let bytes = vec![0u8; MAX_MESSAGE_BYTES + 1];
    match decode::<Reply>(&bytes).unwrap_err() {
        DecodeError::TooLarge { size, limit } => {
            assert_eq!(size, MAX_MESSAGE_BYTES + 1);
            assert_eq!(limit, MAX_MESSAGE_BYTES);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}
