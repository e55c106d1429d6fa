//! `keelson`: the embedded mesh and the operator commands, with Keelson's example
//! handlers. The command line itself is the library's [`keelson::main`], which an
//! application's binary calls too.

// Linking a plugin crate is all it takes to offer its handlers: each registration
// is an `inventory` static, kept by rustc (its link step adds a synthetic object
// that references every `#[used]` static of the crates it links). What decides is
// whether the crate is linked at all, and rustc links a dependency only when the
// crate being compiled names it. Checked with `keelson handlers` (rustc 1.95,
// debug build):
// - no mention of the crate: not on the linker's command line, no handlers;
// - `use keelson_plugins_examples as _;` (below): all of echo, counter.*, cart.*;
// - `extern crate keelson_plugins_examples;`: the same;
// - calling `keelson_plugins_examples::link()`: the same, but needs a function.
// The library never names a plugin crate, so an application's binary, whose `main`
// calls `keelson::main()`, offers its own handlers and none of these.
use keelson_plugins_examples as _;
// The test-only handlers (slow, panicking, failing), for the cross-process tests.
#[cfg(feature = "test-handlers")]
use keelson_plugins_testing as _;

fn main() -> std::process::ExitCode {
    keelson::main()
}
