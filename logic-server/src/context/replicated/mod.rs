//! The replicated context store: every server holds every user's context; writes
//! are broadcast as deltas on the context channel and merged by every peer; a
//! starting server pulls a snapshot from its peers before it serves.
//!
//! # Which write wins
//!
//! * Of two `set`/`delete` of one key, the one with the higher hybrid-logical-clock
//!   stamp wins (the later one, by the clocks of the servers; the node id breaks an
//!   exact tie). Writes of one user through one server are ordered as issued.
//! * Counter increments never conflict: each server keeps its own running sum, the
//!   value is the sum over servers, so concurrent increments through different
//!   servers all count.
//! * A request's writes are applied here at once and broadcast together, with its
//!   outcome record, in one delta when it ends (see `Effects`), so every replica
//!   has all of them and the outcome or none.
//!
//! # Joining
//!
//! A starting server subscribes to deltas, then asks for the state in chunks on the
//! snapshot route (any ready peer answers each chunk; the chunk cursor is a user id,
//! so chunks from different peers fit together), merges them with the deltas that
//! arrive meanwhile, and only then serves. No answer within `join_timeout_ms` (or no
//! peer at all) means it is alone: it says so and starts empty.
//!
//! # Staying equal
//!
//! Deltas are numbered per origin; a hole repairs at once (`gaps`). Heartbeats carry
//! a digest of the settled state, and a server whose state differs from a peer's
//! at the same applied deltas, persistently, says so and pulls (`divergence`).

mod clock;
mod divergence;
mod gaps;
mod metrics;
mod state;
mod store;

pub use metrics::describe_metrics;
pub use store::ReplicatedContextStore;
