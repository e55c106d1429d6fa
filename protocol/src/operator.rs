//! Operator requests: what `keelson context get` asks a logic server, on the request
//! exchange, as an ordinary [`Request`](crate::Request) envelope.
//!
//! Their routes start with `_`, which no gateway forwards (a gateway refuses
//! handler names that do not start with a letter or digit), so no HTTP client
//! reaches them. A server answers one only when it names a user and its publisher
//! is in the server's `trusted_publishers` (the broker validates the publisher, see
//! `TOPOLOGY.md`); anything else is refused with `forbidden` and dead-lettered.
//!
//! Servers that answer them consume the queue of [`OPERATOR_SERVICE`]; servers of
//! releases before it do not, so a request meets no consumer and its requester
//! times out (or, when no queue is bound at all, is told at once that nobody serves
//! the route). Nothing reaches those servers.

/// The service (queue) whose consumers answer operator requests.
pub const OPERATOR_SERVICE: &str = "_keelson.operator";

/// `keelson context get --user U`: the request names the user, its body is `null`;
/// the reply's body is the JSON object
/// `{"user": U, "values": {key: JSON}, "counters": {key: integer}}`, or `not_found`
/// (code `no_context`) when no server holds a context for that user.
pub const CONTEXT_GET_ROUTE: &str = "_keelson.context.get";
