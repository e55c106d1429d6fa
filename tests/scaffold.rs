//! `keelson new` end to end, as a new user goes: create an application, `cargo
//! test` it, `cargo run` it, call its handler over HTTP, stop it with SIGTERM.
//!
//! The application builds Keelson as a path dependency. Its cargo uses the target
//! directory `target/scaffold` of this checkout, kept between runs so that a rerun
//! only rebuilds what changed (the first run builds every dependency once more, for
//! the application's feature set). `--offline` is passed when cargo can resolve
//! the application without the network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{Process, Scratch, http, keelson};

/// The application's package (and binary) name.
const APP: &str = "hello-app";

/// Cargo as the outer `cargo test` runs it, in `app`, with the persistent target
/// directory and none of this process's Keelson settings.
fn cargo(app: &Path) -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(app)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("CARGO_TERM_COLOR", "never");
    for (name, _) in std::env::vars_os() {
        if name
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("KEELSON__")
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/scaffold")
}

/// `["--offline"]` when cargo resolves `app` from what it has already (the lock
/// file is Keelson's, so usually it does), else nothing.
fn offline_if_it_works(app: &Path) -> Vec<&'static str> {
    let probe = cargo(app)
        .args(["tree", "--offline", "--quiet", "-e", "normal,build,dev"])
        .output()
        .expect("cannot run cargo tree");
    if probe.status.success() {
        vec!["--offline"]
    } else {
        Vec::new()
    }
}

/// Run `cargo args` in `app` to its end; a failure fails the test with cargo's
/// whole output.
fn cargo_ok(app: &Path, args: &[&str]) -> String {
    let what = format!("`cargo {}` in the new application", args.join(" "));
    support::output_ok(cargo(app).args(args), &what)
}

#[tokio::test]
async fn a_new_application_tests_runs_and_answers_over_http() {
    let scratch = Scratch::new();
    let app = scratch.path().join(APP);
    let out = keelson(&["new", app.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "keelson new failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline = offline_if_it_works(&app);

    let tested = cargo_ok(&app, &[&["test"], offline.as_slice()].concat());
    assert!(
        tested.contains("test tests::hello_greets_by_name_and_the_world_by_default ... ok"),
        "{tested}"
    );
    cargo_ok(&app, &[&["build"], offline.as_slice()].concat());

    // The application offers its own handler, and neither Keelson's examples nor
    // its test handlers.
    let handlers = cargo_ok(
        &app,
        &[&["run", "-q"], offline.as_slice(), &["--", "handlers"]].concat(),
    );
    assert!(handlers.contains("* hello"), "{handlers}");
    for foreign in ["echo", "cart.add", "test.slow"] {
        assert!(
            !handlers.contains(foreign),
            "{foreign} is linked:\n{handlers}"
        );
    }

    let mut run = cargo(&app);
    run.args([&["run", "-q"], offline.as_slice()].concat())
        .env("KEELSON__GATEWAY__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    let node = Process::start_program(
        "cargo run",
        tokio::process::Command::from(run),
        &scratch.path().join("app.log"),
    )
    .await;
    let client = http();

    let reply = client
        .post(node.url("hello"))
        .body(r#"{"name":"Ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(
        reply.json::<Value>().await.unwrap(),
        json!({"message": "hello, Ada"})
    );

    let reply = client.post(node.url("hello")).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(
        reply.json::<Value>().await.unwrap(),
        json!({"message": "hello, world"})
    );

    let log = node.log.clone();
    let status = node.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "the application exited with {status} after SIGTERM; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
