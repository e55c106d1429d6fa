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

/// `text` with the commented `[[logic_server.schedules]]` example uncommented.
fn uncomment_schedule_example(text: &str) -> String {
    let start = text
        .find("# [[logic_server.schedules]]\n")
        .expect("a commented schedule example");
    let end = start + text[start..].find("\n\n").unwrap() + 1;
    let example: String = text[start..end]
        .lines()
        .map(|line| format!("{}\n", line.strip_prefix("# ").unwrap()))
        .collect();
    format!("{}{example}{}", &text[..start], &text[end..])
}

#[test]
fn the_schedule_example_of_the_shipped_configs_is_a_working_schedule() {
    let scratch = tempfile::tempdir().unwrap();
    for name in ["keelson.toml", "logic-server.toml"] {
        let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        let text = std::fs::read_to_string(&shipped).unwrap();
        assert!(load(shipped).unwrap().logic_server.schedules.is_empty());
        let path = scratch.path().join(name);
        std::fs::write(&path, uncomment_schedule_example(&text)).unwrap();
        let config = load(path).unwrap();
        let ls = &config.logic_server;
        assert_eq!(ls.schedules.len(), 1, "{name}");
        let s = &ls.schedules[0];
        assert_eq!(s.name, "nightly-report");
        assert_eq!(s.timezone, "Europe/Berlin");
        assert!(ls.handlers.contains(&s.handler), "{name}: {}", s.handler);
        // An inline table is a JSON object, as in handler_settings.
        assert_eq!(s.body, serde_json::json!({"rows": 1000}));
        // The sections after the example are still read as theirs.
        assert_eq!(ls.governor, Default::default());
    }
}

#[test]
fn schedules_default_what_they_do_not_set() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("one.toml");
    std::fs::write(
        &path,
        "[[logic_server.schedules]]\nname = \"tick\"\ncron = \"*/5 * * * * *\"\nhandler = \"echo\"\n\n\
         [[logic_server.schedules]]\nname = \"Dotted.Keys-kept\"\ncron = \"0 0 * * * *\"\nhandler = \"echo\"\n\
         body = { \"a.b\" = { CamelCase = [1, 2.5, \"x\", true] } }\nmisfire = \"skip\"\noverlap = \"allow\"\n",
    )
    .unwrap();
    let err = load(path.clone()).unwrap_err();
    // The second's name is refused, not its body.
    assert!(err.contains("logic_server.schedules[1].name"), "{err}");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("Dotted.Keys-kept", "dotted")).unwrap();
    let config = load(path).unwrap();
    let [tick, dotted] = &config.logic_server.schedules[..] else {
        panic!("{:?}", config.logic_server.schedules)
    };
    assert_eq!(tick.timezone, "UTC");
    assert_eq!(tick.body, serde_json::json!({}));
    assert_eq!(tick.misfire, keelson_logic_server::config::Misfire::FireAll);
    assert_eq!(tick.catch_up_window_s, 300);
    assert_eq!(tick.overlap, keelson_logic_server::config::Overlap::Skip);
    assert_eq!(
        dotted.body,
        serde_json::json!({"a.b": {"CamelCase": [1, 2.5, "x", true]}})
    );
    assert_eq!(dotted.misfire, keelson_logic_server::config::Misfire::Skip);
    assert_eq!(dotted.overlap, keelson_logic_server::config::Overlap::Allow);
}

#[test]
fn a_bad_schedule_names_the_file_and_the_key() {
    let scratch = tempfile::tempdir().unwrap();
    let table = |body: &str| {
        format!(
            "[[logic_server.schedules]]\nname = \"first\"\ncron = \"0 0 * * * *\"\nhandler = \"echo\"\n\n[[logic_server.schedules]]\n{body}\n"
        )
    };
    for (body, expected) in [
        (
            "name = \"n\"\ncron = \"30 2 * * *\"\nhandler = \"echo\"",
            "logic_server.schedules[1].cron: `30 2 * * *` has 5 fields, but a seconds field is needed first",
        ),
        (
            "name = \"n\"\ncron = \"0 30 2 * * *\"\ntimezone = \"Mars/Olympus\"\nhandler = \"echo\"",
            "logic_server.schedules[1].timezone: `Mars/Olympus` is not an IANA time zone name",
        ),
        (
            "name = \"Nightly\"\ncron = \"0 30 2 * * *\"\nhandler = \"echo\"",
            "logic_server.schedules[1].name: `Nightly` is not a schedule name",
        ),
        (
            "name = \"first\"\ncron = \"0 30 2 * * *\"\nhandler = \"echo\"",
            "logic_server.schedules[1].name: `first` is also the name of logic_server.schedules[0]",
        ),
        (
            "name = \"n\"\ncron = \"0 30 2 * * *\"\nhandler = \"echo\"\ncronn = \"x\"",
            "unknown field `cronn`",
        ),
        (
            "name = \"n\"\ncron = \"0 30 2 * * *\"\nhandler = \"echo\"\nmisfire = \"sometimes\"",
            "at key `logic_server.schedules[1].misfire`: `sometimes` is not a misfire policy: expected one of `skip`, `fire_once`, `fire_all`",
        ),
        (
            "name = \"n\"\ncron = \"0 30 2 * * *\"\nhandler = \"echo\"\noverlap = \"never\"",
            "at key `logic_server.schedules[1].overlap`: `never` is not an overlap policy: expected `skip` or `allow`",
        ),
        (
            "name = \"n\"\ncron = \"0 30 2 * * *\"\nhandler = \"echo\"\ncatch_up_window_s = -1",
            "logic_server.schedules[1].catch_up_window_s",
        ),
        // (The `config` crate's wording.)
        (
            "name = \"n\"\nhandler = \"echo\"",
            "at key `logic_server.schedules[1]`: missing configuration field",
        ),
    ] {
        let path = scratch.path().join("sched.toml");
        std::fs::write(&path, table(body)).unwrap();
        let err = load(path).unwrap_err();
        assert!(err.contains("sched.toml"), "{err}");
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(err.contains("logic_server.schedules"), "{err}");
        assert!(!err.contains("for key"), "the key said twice: {err}");
    }
}
