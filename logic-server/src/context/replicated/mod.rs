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
//! * `set` and `delete` are broadcast before they are applied locally: when they
//!   return an error, no server has the write. An `increment` is applied first and
//!   its running sum broadcast; if that broadcast fails the increment still counts
//!   here and reaches the peers with this server's next increment of that counter.
//!
//! # Joining
//!
//! A starting server subscribes to deltas, then asks for the state in chunks on the
//! snapshot route (any ready peer answers each chunk; the chunk cursor is a user id,
//! so chunks from different peers fit together), merges them with the deltas that
//! arrive meanwhile, and only then serves. No answer within `join_timeout_ms` (or no
//! peer at all) means it is alone: it says so and starts empty.

mod clock;
mod gaps;
mod state;
mod store;

pub use store::ReplicatedContextStore;
