//! Crash points for Keelson's own cross-process tests (feature `test-failpoints`,
//! which the `test-handlers` feature of the `keelson` package enables; a shipped
//! build has none).
//!
//! `KEELSON_TEST_ABORT_AFTER_COMMIT={handler}` aborts the process right after a
//! request for that handler replicated its effects and outcome, before its reply
//! and its ack: the moment whose redelivery the outcome records must absorb.

use std::sync::OnceLock;

/// Abort if the environment asks for it after a commit of `handler`.
pub(crate) fn after_commit(handler: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var("KEELSON_TEST_ABORT_AFTER_COMMIT").ok());
    if target.as_deref() == Some(handler) {
        tracing::error!(handler, "test failpoint: aborting after the commit");
        std::process::abort();
    }
}
