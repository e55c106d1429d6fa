//! The `keelson` command line run as a user runs it: `keelson new` and what it
//! writes, `keelson handlers`, and the environment an operator sets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson::settings::{Source, load_with_env};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use support::{Bin, Process, Scratch, embedded_config, http, keelson};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap();
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn new_writes_an_application_whose_configuration_loads() {
    let scratch = Scratch::new();
    let out = keelson(&["new", "apps/shop"], Some(scratch.path()));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("cd apps/shop && cargo run"), "{stdout}");

    let app = scratch.path().join("apps/shop");
    assert_eq!(
        files_under(&app),
        [
            ".gitignore",
            "Cargo.lock",
            "Cargo.toml",
            "README.md",
            "keelson.toml",
            "src/main.rs"
        ]
    );
    let read = |file: &str| std::fs::read_to_string(app.join(file)).unwrap();

    // The package: its name from the directory, Keelson by absolute path, and a
    // workspace of its own.
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    assert_eq!(manifest["package"]["name"].as_str(), Some("shop"));
    assert_eq!(manifest["package"]["edition"].as_str(), Some("2024"));
    let keelson_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    assert_eq!(
        manifest["dependencies"]["keelson"]["path"].as_str(),
        keelson_dir.to_str()
    );
    for dependency in ["serde", "serde_json", "tokio"] {
        assert!(
            manifest["dependencies"].get(dependency).is_some(),
            "{dependency}"
        );
    }
    assert!(manifest["workspace"].as_table().unwrap().is_empty());

    assert_eq!(
        read("Cargo.lock"),
        std::fs::read_to_string(keelson_dir.join("Cargo.lock")).unwrap()
    );
    assert!(read("src/main.rs").starts_with("//! shop: a Keelson application."));
    assert!(read("src/main.rs").contains("keelson::main()"));
    assert_eq!(read(".gitignore"), "/target\n/.keelson\n");
    assert!(read("README.md").contains("curl -s -XPOST localhost:8080/api/hello"));

    let config = load_with_env(
        &Source::File(app.join("keelson.toml")),
        Some(HashMap::new()),
    )
    .unwrap();
    assert_eq!(config.logic_server.handlers, ["hello"]);
    assert_eq!(config.gateway.listen, "127.0.0.1:8080");
    assert_eq!(config.transport.kind(), "memory");
}

#[test]
fn new_takes_a_name_and_a_keelson_path() {
    let scratch = Scratch::new();
    let keelson_dir = env!("CARGO_MANIFEST_DIR");
    let out = keelson(
        &[
            "new",
            "app",
            "--name",
            "my-shop",
            "--keelson-path",
            keelson_dir,
        ],
        Some(scratch.path()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(scratch.path().join("app/Cargo.toml")).unwrap())
            .unwrap();
    assert_eq!(manifest["package"]["name"].as_str(), Some("my-shop"));
}

#[test]
fn new_refuses_a_directory_that_is_not_empty_and_writes_nothing() {
    let scratch = Scratch::new();
    std::fs::create_dir(scratch.path().join("shop")).unwrap();
    scratch.write("shop/notes.txt", "mine");
    let out = keelson(&["new", "shop"], Some(scratch.path()));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("shop already exists and is not empty"),
        "{stderr}"
    );
    assert_eq!(files_under(&scratch.path().join("shop")), ["notes.txt"]);
}

#[test]
fn new_refuses_a_name_cargo_would_refuse_and_writes_nothing() {
    let scratch = Scratch::new();
    for (args, expected) in [
        (
            &["new", "my app"][..],
            "`my app` cannot be the package name: ` ` is not allowed",
        ),
        (
            &["new", "app", "--name", "2fast"][..],
            "`2fast` cannot be the package name: it must start with a letter",
        ),
        (
            &["new", "app", "--keelson-path", "/"][..],
            "/ is not a Keelson checkout",
        ),
    ] {
        let out = keelson(args, Some(scratch.path()));
        assert!(!out.status.success(), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(files_under(scratch.path()).is_empty());
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

/// The line of `listing` for `handler`, without its description.
fn handler_line<'a>(listing: &'a str, handler: &str) -> &'a str {
    listing
        .lines()
        .find(|line| {
            line.get(2..)
                .is_some_and(|rest| rest.split_whitespace().next() == Some(handler))
        })
        .unwrap_or_else(|| panic!("no line for {handler}:\n{listing}"))
}

#[test]
fn handlers_marks_what_the_configuration_enables_and_what_is_missing() {
    let scratch = Scratch::new();
    let config = scratch.write(
        "app.toml",
        "[logic_server]\nhandlers = [\"echo\", \"cart.add\", \"nope\"]\n",
    );
    let out = keelson(&["handlers", "--config", config.to_str().unwrap()], None);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("Handlers linked into this binary"),
        "{stdout}"
    );
    assert!(
        stdout.lines().next().unwrap().contains("app.toml"),
        "{stdout}"
    );
    assert!(handler_line(&stdout, "echo").starts_with("* "), "{stdout}");
    assert!(
        handler_line(&stdout, "cart.add").starts_with("* "),
        "{stdout}"
    );
    assert!(
        handler_line(&stdout, "cart.list").starts_with("  "),
        "{stdout}"
    );
    assert!(
        handler_line(&stdout, "test.slow").starts_with("  "),
        "{stdout}"
    );
    assert!(stdout.contains("\nMissing: enabled by"), "{stdout}");
    assert!(stdout.ends_with("! nope\n"), "{stdout}");
    // A logic server would refuse this configuration.
    assert_eq!(out.status.code(), Some(1));

    std::fs::write(&config, "[logic_server]\nhandlers = [\"echo\"]\n").unwrap();
    let out = keelson(&["handlers", "--config", config.to_str().unwrap()], None);
    assert!(out.status.success());
    assert!(!text(&out.stdout).contains("Missing"));
}

#[test]
fn without_config_keelson_toml_of_the_working_directory_comes_first() {
    let scratch = Scratch::new();
    let out = keelson(&["handlers"], Some(scratch.path()));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .ends_with("of built-in config/keelson.toml"),
        "{stdout}"
    );
    assert!(handler_line(&stdout, "echo").starts_with("* "), "{stdout}");

    std::fs::create_dir(scratch.path().join("config")).unwrap();
    scratch.write(
        "config/keelson.toml",
        "[logic_server]\nhandlers = [\"cart.list\"]\n",
    );
    let stdout = text(&keelson(&["handlers"], Some(scratch.path())).stdout);
    assert!(
        stdout
            .lines()
            .next()
            .unwrap()
            .ends_with("of config/keelson.toml"),
        "{stdout}"
    );
    assert!(
        handler_line(&stdout, "cart.list").starts_with("* "),
        "{stdout}"
    );
    assert!(handler_line(&stdout, "echo").starts_with("  "), "{stdout}");

    scratch.write(
        "keelson.toml",
        "[logic_server]\nhandlers = [\"counter.get\"]\n",
    );
    let stdout = text(&keelson(&["handlers"], Some(scratch.path())).stdout);
    assert!(
        stdout.lines().next().unwrap().ends_with("of keelson.toml"),
        "{stdout}"
    );
    assert!(
        handler_line(&stdout, "counter.get").starts_with("* "),
        "{stdout}"
    );
    assert!(
        handler_line(&stdout, "cart.list").starts_with("  "),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_dotted_handlers_setting_from_the_environment_reaches_the_handler() {
    let scratch = Scratch::new();
    let config = embedded_config("\n[logic_server.handler_settings.\"test.quota\"]\nlimit = 100\n")
        .replace("handlers = [", "handlers = [\"test.quota\", ");
    let config = scratch.write("keelson.toml", &config);
    let node = Process::start(
        Bin::Keelson,
        &config,
        &scratch.path().join("keelson.log"),
        &[(
            "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__TEST_QUOTA__LIMIT",
            "1",
        )],
    )
    .await;
    let answer = http()
        .post(node.url("test.quota"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(answer, r#"{"limit":1}"#, "the file says 100");
}

/// `keelson SUBCOMMAND --config CONFIG`, started and waited for as a process.
async fn start_subcommand(scratch: &Scratch, subcommand: &str) -> Process {
    let config = scratch.write("keelson.toml", &embedded_config(""));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keelson"));
    cmd.arg(subcommand)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    Process::start_program(
        &format!("keelson {subcommand}"),
        cmd,
        &scratch.path().join(format!("{subcommand}.log")),
    )
    .await
}

#[tokio::test]
async fn keelson_ui_gateway_and_logic_server_run_one_role_each() {
    let scratch = Scratch::new();
    // A logic server alone says it is ready and listens on no HTTP port.
    let server = start_subcommand(&scratch, "logic-server").await;
    assert!(server.base_url.is_none());
    assert!(server.terminate(Duration::from_secs(20)).await.success());

    // A gateway alone serves HTTP but hosts no handler: on the in-memory transport
    // of this process no logic server takes the request.
    let gateway = start_subcommand(&scratch, "ui-gateway").await;
    let client = http();
    let health = client
        .get(format!("{}/healthz", gateway.base_url.as_deref().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let echo = client
        .post(gateway.url("echo"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(echo.status(), 404);
    assert_eq!(
        echo.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "unknown_handler"
    );
    assert!(gateway.terminate(Duration::from_secs(20)).await.success());
}

#[test]
fn keelson_ui_gateway_needs_a_configuration_file() {
    let scratch = Scratch::new();
    for (subcommand, example) in [
        ("ui-gateway", "config/gateway.toml"),
        ("logic-server", "config/logic-server.toml"),
    ] {
        let out = keelson(&[subcommand], Some(scratch.path()));
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "`{subcommand}` needs --config FILE (e.g. {example})"
            )),
            "{stderr}"
        );
    }
}
