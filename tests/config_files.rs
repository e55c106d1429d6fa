//! Every configuration file shipped in `config/` parses, and mistakes in a file are
//! reported with the file, the key and what was expected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson::settings::{KeelsonConfig, Source, load_with_env};
use std::collections::HashMap;
use std::path::PathBuf;

fn shipped_configs() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn load(path: PathBuf) -> Result<KeelsonConfig, String> {
    load_with_env(&Source::File(path), Some(HashMap::new())).map_err(|e| e.to_string())
}

#[test]
fn every_shipped_config_parses() {
    let files = shipped_configs();
    assert!(
        !files.is_empty(),
        "expected keelson.toml, gateway.toml, logic-server.toml: {files:?}"
    );
    for file in files {
        if let Err(e) = load(file.clone()) {
            panic!("{} does not parse: {e}", file.display());
        }
    }
}

#[test]
fn the_builtin_copy_is_the_default_file() {
    let on_disk = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(keelson::settings::DEFAULT_CONFIG),
    )
    .unwrap();
    assert_eq!(on_disk, keelson::settings::BUILTIN_CONFIG);
    load_with_env(&Source::Builtin, Some(HashMap::new())).unwrap();
}

#[test]
fn an_unknown_key_in_any_shipped_config_is_rejected_with_its_name() {
    let scratch = tempfile::tempdir().unwrap();
    for file in shipped_configs() {
        let text = std::fs::read_to_string(&file).unwrap();
        // An unknown key at the top, and one inside the first section.
        for (case, bad) in [
            ("top", format!("surprise = 1\n{text}")),
            (
                "section",
                text.replacen("\n[transport]\n", "\n[transport]\nsurprise = 1\n", 1),
            ),
        ] {
            let name = format!("{case}-{}", file.file_name().unwrap().to_string_lossy());
            let path = scratch.path().join(&name);
            std::fs::write(&path, bad).unwrap();
            let err = load(path).expect_err("an unknown key must be an error");
            assert!(err.contains(&name), "{err}");
            assert!(err.contains("surprise"), "{err}");
        }
    }
}

#[test]
fn a_wrong_type_names_the_key_and_the_expected_type() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("bad.toml");
    std::fs::write(&path, "[logic_server]\nconcurrency = \"lots\"\n").unwrap();
    let err = load(path).unwrap_err();
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("logic_server.concurrency"), "{err}");
    assert!(err.contains("expected an integer"), "{err}");
}

#[test]
fn environment_overrides_any_key() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/keelson.toml");
    let env = HashMap::from([
        (
            "KEELSON__GATEWAY__LISTEN".to_owned(),
            "127.0.0.1:9999".to_owned(),
        ),
        (
            "KEELSON__LOGIC_SERVER__CONCURRENCY".to_owned(),
            "7".to_owned(),
        ),
    ]);
    let config = load_with_env(&Source::File(file), Some(env)).unwrap();
    assert_eq!(config.gateway.listen, "127.0.0.1:9999");
    assert_eq!(config.logic_server.concurrency, 7);
}

#[test]
fn a_bad_environment_override_is_reported_as_such() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/keelson.toml");
    let env = HashMap::from([(
        "KEELSON__LOGIC_SERVER__CONCURRENCY".to_owned(),
        "many".to_owned(),
    )]);
    let err = load_with_env(&Source::File(file), Some(env))
        .unwrap_err()
        .to_string();
    assert!(err.contains("KEELSON__LOGIC_SERVER__CONCURRENCY"), "{err}");
    assert!(err.contains("logic_server.concurrency"), "{err}");
}

/// The distributed files are the embedded one split by role: every section they
/// have is the embedded file's, except `[transport]`.
#[test]
fn distributed_configs_differ_from_the_embedded_one_only_in_the_transport() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let read = |name: &str| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let embedded = read("keelson.toml");
    for name in ["gateway.toml", "logic-server.toml"] {
        let file = read(name);
        for (section, value) in &file {
            if section == "transport" {
                assert_eq!(value["kind"].as_str(), Some("amqp"), "{name}");
                continue;
            }
            assert_eq!(
                Some(value),
                embedded.get(section),
                "[{section}] of {name} differs from config/keelson.toml"
            );
        }
    }
}

#[test]
fn contradicting_auth_and_cors_settings_are_refused_naming_the_keys() {
    let scratch = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "[auth]\ntoken_ttl_s = 7200\nmax_token_lifetime_s = 3600\n",
            "auth.token_ttl_s (7200) exceeds auth.max_token_lifetime_s (3600)",
        ),
        ("[auth]\nleeway_s = 86400\n", "auth.leeway_s"),
        (
            "[log]\nlevel = \"warning\"\n",
            "at key `log.level`: `warning` is not a level: expected one of trace, debug, info, warn, error, off",
        ),
        (
            "[log]\nlevel = \"info,keelson=loud\"\n",
            "`keelson=loud` is not a level",
        ),
        ("[auth]\nalgorithms = [\"none\"]\n", "auth.algorithms"),
        (
            "[gateway.cors]\nallowed_origins = [\"https://app.example.com/\"]\n",
            "gateway.cors.allowed_origins",
        ),
        (
            "[telemetry]\notlp_endpoint = \"collector:4318\"\n",
            "at key `telemetry.otlp_endpoint`: `collector:4318` is not supported: expected an http:// URL",
        ),
        (
            "[telemetry]\nsampling_ratio = 2.0\n",
            "at key `telemetry.sampling_ratio`: 2 is out of range: expected a number from 0.0 to 1.0",
        ),
        ("[telemetry]\notlp_endpiont = \"x\"\n", "otlp_endpiont"),
    ] {
        let path = scratch.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let err = load(path).unwrap_err();
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains(expected), "{expected}: {err}");
    }
}

#[test]
fn token_settings_can_be_overridden_from_the_environment() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/keelson.toml");
    let env = HashMap::from([
        (
            "KEELSON__AUTH__ALGORITHMS".to_owned(),
            "RS256,ES256".to_owned(),
        ),
        (
            "KEELSON__GATEWAY__CORS__ALLOWED_ORIGINS".to_owned(),
            "https://a.example,https://b.example".to_owned(),
        ),
    ]);
    let config = load_with_env(&Source::File(file), Some(env)).unwrap();
    assert_eq!(config.auth.algorithms.len(), 2);
    assert_eq!(config.gateway.cors.allowed_origins.len(), 2);
}

#[test]
fn each_binary_names_and_describes_itself() {
    for (bin, about) in [
        (
            env!("CARGO_BIN_EXE_keelson"),
            "Keelson: a message-broker-driven service mesh",
        ),
        (env!("CARGO_BIN_EXE_ui-gateway"), "Keelson UI gateway"),
        (env!("CARGO_BIN_EXE_logic-server"), "Keelson logic server"),
    ] {
        let name = std::path::Path::new(bin)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let version = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&version.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
        let help = std::process::Command::new(bin)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.starts_with(about), "{name} --help: {help}");
    }
}

/// A file whose handler `test.quota` (a dotted name) has settings.
fn quota_file(scratch: &tempfile::TempDir) -> PathBuf {
    let path = scratch.path().join("quota.toml");
    std::fs::write(
        &path,
        "[logic_server]\nhandlers = [\"echo\", \"test.quota\"]\n\n[logic_server.handler_settings.\"test.quota\"]\nlimit = 100\n",
    )
    .unwrap();
    path
}

#[test]
fn settings_of_a_dotted_handler_name_are_overridden_from_the_environment() {
    let scratch = tempfile::tempdir().unwrap();
    let file = quota_file(&scratch);
    let limit = |config: &KeelsonConfig| {
        config.logic_server.handler_settings["test.quota"]["limit"].as_u64()
    };
    let config = load_with_env(&Source::File(file.clone()), Some(HashMap::new())).unwrap();
    assert_eq!(limit(&config), Some(100));

    // `test.quota` is written TEST_QUOTA: what a shell `export` and a systemd
    // `Environment=` line accept.
    let env = HashMap::from([(
        "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__TEST_QUOTA__LIMIT".to_owned(),
        "7".to_owned(),
    )]);
    let config = load_with_env(&Source::File(file), Some(env)).unwrap();
    assert_eq!(limit(&config), Some(7));
    assert_eq!(config.logic_server.handler_settings.len(), 1);

    // A plugin's settings need nothing special.
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/keelson.toml");
    let env = HashMap::from([(
        "KEELSON__LOGIC_SERVER__PLUGINS__CART__MAX_ITEMS".to_owned(),
        "7".to_owned(),
    )]);
    let config = load_with_env(&Source::File(file), Some(env)).unwrap();
    assert_eq!(config.logic_server.plugins["cart"]["max_items"], 7);
}

#[test]
fn a_handler_setting_for_no_enabled_handler_names_the_variable_and_the_forms() {
    let scratch = tempfile::tempdir().unwrap();
    let file = quota_file(&scratch);
    // The dot read as one more level: `test`, then `quota`.
    let env = HashMap::from([(
        "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__TEST__QUOTA__LIMIT".to_owned(),
        "7".to_owned(),
    )]);
    let err = load_with_env(&Source::File(file), Some(env))
        .unwrap_err()
        .to_string();
    assert!(err.contains("quota.toml (with environment overrides KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__TEST__QUOTA__LIMIT)"), "{err}");
    assert!(
        err.contains(
            "KEELSON__LOGIC_SERVER__HANDLER_SETTINGS__TEST__QUOTA__LIMIT: `TEST` names no handler of logic_server.handlers"
        ),
        "{err}"
    );
    assert!(err.contains("TEST_QUOTA for test.quota"), "{err}");
}
