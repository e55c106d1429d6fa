//! Property tests of the codec: what `encode` writes, `decode` reads back unchanged,
//! whatever the field values; newer minor versions are read, other major versions
//! never are.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_protocol::{
    DecodeError, ErrorInfo, ProtocolVersion, Reply, ReplyStatus, Request, decode, encode,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use serde::Serialize;

/// Every status except `Unknown` (which a writer never means to send). `ReplyStatus`
/// is `#[non_exhaustive]`; the unit tests in `codec/tests.rs` hold the exhaustive list.
const KNOWN_STATUSES: [ReplyStatus; 10] = [
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

const STATUS_NAMES: [&str; 13] = [
    "ok",
    "key_reused",
    "too_many_requests",
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "payload_too_large",
    "handler_error",
    "timeout",
    "overloaded",
    "unknown",
];

fn compatible_version() -> impl Strategy<Value = ProtocolVersion> {
    any::<u16>().prop_map(|minor| ProtocolVersion {
        major: ProtocolVersion::CURRENT.major,
        minor,
    })
}

fn incompatible_version() -> impl Strategy<Value = ProtocolVersion> {
    (any::<u16>(), any::<u16>())
        .prop_filter("another major version", |(major, _)| {
            *major != ProtocolVersion::CURRENT.major
        })
        .prop_map(|(major, minor)| ProtocolVersion { major, minor })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..64),
        vec(any::<u8>(), 0..2048),
        // Lengths around the bin8/bin16 boundaries.
        (250usize..=260).prop_map(|n| vec![0x5a; n]),
        (65_530usize..=65_540).prop_map(|n| vec![0xa5; n]),
    ]
}

fn request_with_version(
    version: impl Strategy<Value = ProtocolVersion>,
) -> impl Strategy<Value = Request> {
    (
        version,
        any::<String>(),
        any::<String>(),
        option::of(any::<String>()),
        option::of(any::<String>()),
        any::<u64>(),
        any::<u32>(),
        option::of(any::<String>()),
        option::of(any::<String>()),
        btree_map(any::<String>(), any::<String>(), 0..8),
        body(),
    )
        .prop_map(
            |(
                v,
                id,
                handler,
                user,
                session,
                deadline_unix_ms,
                attempt,
                idempotency_key,
                idempotency_fingerprint,
                headers,
                body,
            )| Request {
                v,
                id,
                handler,
                user,
                session,
                deadline_unix_ms,
                attempt,
                idempotency_key,
                idempotency_fingerprint,
                headers,
                body,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    request_with_version(compatible_version())
}

fn reply_with_version(
    version: impl Strategy<Value = ProtocolVersion>,
) -> impl Strategy<Value = Reply> {
    (
        version,
        any::<String>(),
        proptest::sample::select(&KNOWN_STATUSES[..]),
        body(),
        option::of((any::<String>(), any::<String>())),
        any::<String>(),
        any::<bool>(),
    )
        .prop_map(|(v, id, status, body, error, served_by, replayed)| Reply {
            v,
            id,
            status,
            body,
            error: error.map(|(code, message)| ErrorInfo { code, message }),
            served_by,
            replayed,
            http_status: None,
            headers: Vec::new(),
        })
}

fn reply() -> impl Strategy<Value = Reply> {
    reply_with_version(compatible_version())
}

/// A message as a newer minor version writes it: the current fields plus new ones.
#[derive(Serialize)]
struct Newer<'a, T> {
    priority: u8,
    #[serde(flatten)]
    current: &'a T,
    extra: Vec<String>,
    nested: Vec<Vec<(u64, String)>>,
}

proptest! {
    #[test]
    fn request_round_trips(request in request()) {
        let bytes = encode(&request).unwrap();
        let back: Request = decode(&bytes).unwrap();
        prop_assert_eq!(back, request);
    }

    #[test]
    fn reply_round_trips(reply in reply()) {
        let bytes = encode(&reply).unwrap();
        let back: Reply = decode(&bytes).unwrap();
        prop_assert_eq!(back, reply);
    }

    #[test]
    fn re_encoding_a_decoded_message_gives_the_same_bytes(request in request(), reply in reply()) {
        let bytes = encode(&request).unwrap();
        prop_assert_eq!(encode(&decode::<Request>(&bytes).unwrap()).unwrap(), bytes);
        let bytes = encode(&reply).unwrap();
        prop_assert_eq!(encode(&decode::<Reply>(&bytes).unwrap()).unwrap(), bytes);
    }

    #[test]
    fn newer_minor_request_decodes_with_known_fields_intact(
        request in request(),
        priority in any::<u8>(),
        extra in vec(any::<String>(), 0..4),
        nested in vec(vec((any::<u64>(), any::<String>()), 0..3), 0..3),
    ) {
        let newer = Newer { priority, current: &request, extra, nested };
        let bytes = rmp_serde::to_vec_named(&newer).unwrap();
        let back: Request = decode(&bytes).unwrap();
        prop_assert_eq!(back, request);
    }

    #[test]
    fn newer_minor_reply_decodes_with_known_fields_intact(
        reply in reply(),
        priority in any::<u8>(),
        extra in vec(any::<String>(), 0..4),
    ) {
        let newer = Newer { priority, current: &reply, extra, nested: Vec::new() };
        let bytes = rmp_serde::to_vec_named(&newer).unwrap();
        let back: Reply = decode(&bytes).unwrap();
        prop_assert_eq!(back, reply);
    }

    #[test]
    fn request_of_another_major_version_is_refused(request in request_with_version(incompatible_version())) {
        let bytes = encode(&request).unwrap();
        match decode::<Request>(&bytes) {
            Err(DecodeError::IncompatibleVersion { kind, found, ours }) => {
                prop_assert_eq!(kind, "request");
                prop_assert_eq!(found, request.v);
                prop_assert_eq!(ours, ProtocolVersion::CURRENT);
            }
            other => prop_assert!(false, "expected IncompatibleVersion, got {:?}", other),
        }
    }

    #[test]
    fn reply_of_another_major_version_is_refused(reply in reply_with_version(incompatible_version())) {
        let bytes = encode(&reply).unwrap();
        match decode::<Reply>(&bytes) {
            Err(DecodeError::IncompatibleVersion { kind, found, .. }) => {
                prop_assert_eq!(kind, "reply");
                prop_assert_eq!(found, reply.v);
            }
            other => prop_assert!(false, "expected IncompatibleVersion, got {:?}", other),
        }
    }

    #[test]
    fn request_of_another_major_version_read_as_a_reply_is_refused_as_incompatible(
        request in request_with_version(incompatible_version()),
    ) {
        // Wrong envelope and wrong version: the version is what the caller must hear.
        let bytes = encode(&request).unwrap();
        match decode::<Reply>(&bytes) {
            Err(DecodeError::IncompatibleVersion { kind, found, .. }) => {
                prop_assert_eq!(kind, "reply");
                prop_assert_eq!(found, request.v);
            }
            other => prop_assert!(false, "expected IncompatibleVersion, got {:?}", other),
        }
    }

    #[test]
    fn unknown_status_name_decodes_as_unknown(
        reply in reply(),
        name in "[a-zA-Z_][a-zA-Z0-9_]{0,24}"
            .prop_filter("not a known status", |n| !STATUS_NAMES.contains(&n.as_str())),
    ) {
        let bytes = rmp_serde::to_vec_named(&ReplyWithStatusName::new(&reply, &name)).unwrap();

        let back: Reply = decode(&bytes).unwrap();

        prop_assert_eq!(back, Reply { status: ReplyStatus::Unknown, ..reply });
    }
}

/// A `Reply` whose status is any string, as a newer peer may write it.
#[derive(Serialize)]
struct ReplyWithStatusName<'a> {
    v: ProtocolVersion,
    id: &'a str,
    status: &'a str,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    error: &'a Option<ErrorInfo>,
    served_by: &'a str,
    replayed: bool,
}

impl<'a> ReplyWithStatusName<'a> {
    fn new(reply: &'a Reply, status: &'a str) -> Self {
        Self {
            v: reply.v,
            id: &reply.id,
            status,
            body: &reply.body,
            error: &reply.error,
            served_by: &reply.served_by,
            replayed: reply.replayed,
        }
    }
}
