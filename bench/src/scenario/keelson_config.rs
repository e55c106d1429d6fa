//! The configuration files the Keelson scenarios generate: the shipped settings, with
//! an ephemeral port, an inline token secret, a namespace of the run's own, and
//! the broker password passed through the environment (never written to a file).

use super::Env;
use crate::procs::Spec;
use anyhow::Context as _;
use std::path::PathBuf;

/// The environment variable carrying the broker password to the Keelson processes.
const PASSWORD_ENV: &str = "KEELSON_BENCH_BROKER_PASSWORD";

/// The service the benchmark's logic servers belong to.
pub(super) const SERVICE: &str = "bench";

/// A TOML string literal.
fn quoted(s: &str) -> String {
    // A JSON string is a valid TOML basic string for everything serde_json escapes.
    serde_json::Value::String(s.to_owned()).to_string()
}

/// `url` without its password, and the password.
fn split_password(url: &str) -> (String, Option<String>) {
    let Some(scheme_end) = url.find("://") else {
        return (url.to_owned(), None);
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return (url.to_owned(), None);
    };
    match rest[..at].split_once(':') {
        Some((user, password)) => (
            format!("{}{user}{}", &url[..scheme_end + 3], &rest[at..]),
            Some(password.to_owned()),
        ),
        None => (url.to_owned(), None),
    }
}

/// The sections every generated file shares.
fn common(env: &Env, transport: &str) -> String {
    format!(
        r#"{transport}
[auth]
secret = "keelson-bench-secret-0123456789abcdef0123456789"

[log]
level = {level}
format = "text"
"#,
        level = quoted(&env.log_level)
    )
}

fn amqp_transport(env: &Env) -> String {
    let (url, password) = split_password(&env.amqp_url);
    let password_env = match password {
        Some(_) => format!("password_env = {}\n", quoted(PASSWORD_ENV)),
        None => String::new(),
    };
    format!(
        r#"[transport]
kind = "amqp"
urls = [{url}]
{password_env}namespace = {ns}
# A safety net: queues left behind by an interrupted run vanish after ten minutes.
queue_expires_ms = 600000
"#,
        url = quoted(&url),
        ns = quoted(&env.namespace),
    )
}

fn gateway_section() -> &'static str {
    r#"
[gateway]
listen = "127.0.0.1:0"
request_timeout_ms = 10000
shutdown_timeout_ms = 2000
"#
}

fn logic_server_section(env: &Env) -> String {
    format!(
        r#"
[logic_server]
service = {service}
handlers = ["echo"]
concurrency = {concurrency}
drain_timeout_ms = 2000
"#,
        service = quoted(SERVICE),
        concurrency = env.prefetch,
    )
}

/// The embedded mesh (configuration C) on the memory transport.
pub(super) fn embedded(env: &Env) -> String {
    let mut s = common(env, "[transport]\nkind = \"memory\"\n");
    s.push_str(gateway_section());
    s.push_str(&logic_server_section(env));
    s
}

/// A `ui-gateway` on AMQP (configuration D).
pub(super) fn gateway(env: &Env) -> String {
    let mut s = common(env, &amqp_transport(env));
    s.push_str(gateway_section());
    s
}

/// A `logic-server` on AMQP (configurations D and E).
pub(super) fn logic_server(env: &Env) -> String {
    let mut s = common(env, &amqp_transport(env));
    s.push_str(&logic_server_section(env));
    s
}

/// The `ui-gateway` of a scenario on AMQP: `gateway.toml`, ready once it listens.
pub(super) fn gateway_spec(env: &Env) -> anyhow::Result<Spec> {
    spec_with_config(
        env,
        "gateway",
        "ui-gateway",
        "gateway.toml",
        &gateway(env),
        crate::procs::Ready::Listening,
    )
}

/// Write `contents` to `name` in the scenario's directory and return a spec running
/// `binary --config FILE`, with the broker password in its environment.
pub(super) fn spec_with_config(
    env: &Env,
    role: &'static str,
    binary: &str,
    name: &str,
    contents: &str,
    ready: crate::procs::Ready,
) -> anyhow::Result<Spec> {
    let path: PathBuf = env.dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    let mut spec = Spec::new(
        role,
        env.bin(binary),
        [std::ffi::OsString::from("--config"), path.into_os_string()],
        ready,
    );
    if let (_, Some(password)) = split_password(&env.amqp_url) {
        spec.env.push((PASSWORD_ENV.to_owned(), password));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_leaves_the_url() {
        assert_eq!(
            split_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            (
                "amqp://guest@127.0.0.1:5672/%2f".to_owned(),
                Some("guest".to_owned())
            )
        );
        assert_eq!(
            split_password("amqp://127.0.0.1/%2f"),
            ("amqp://127.0.0.1/%2f".to_owned(), None)
        );
    }
}
