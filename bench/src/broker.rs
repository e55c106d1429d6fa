//! The RabbitMQ broker the AMQP configurations share: checking that it answers,
//! finding its process (to read its CPU time), its version, deleting what a
//! configuration declared, and virtual hosts of a scenario's own.

use anyhow::Context as _;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use procfs::net::TcpState;
use procfs::process::FDTarget;
use std::collections::HashSet;
use std::time::Duration;

/// `url` with the password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Connect to the broker or fail with a message that says what to do. No figure is
/// measured without a broker.
pub async fn connect(url: &str) -> anyhow::Result<Connection> {
    let attempt = Connection::connect(url, ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => anyhow::bail!(
            "RabbitMQ is not reachable at {}: {e}\nStart it (deploy/ensure-broker.sh) or pass \
             --amqp-url, or run only A and C with --configs A,C. Nothing was measured.",
            redact(url)
        ),
        Err(_) => anyhow::bail!(
            "RabbitMQ at {} did not answer within 10 s. Nothing was measured.",
            redact(url)
        ),
    }
}

/// The TCP port of an `amqp://` URL (5672 when none is given).
pub fn port(url: &str) -> u16 {
    let after_at = url.rsplit('@').next().unwrap_or(url);
    let host_port = after_at
        .trim_start_matches("amqp://")
        .split('/')
        .next()
        .unwrap_or_default();
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5672)
}

/// The process id of the local broker listening on `port`: the `beam.smp` process
/// holding that listening socket. `None` when the broker is not a local process we
/// can see (its CPU is then not reported, rather than guessed).
pub fn local_pid(port: u16) -> Option<u32> {
    let mut listening = HashSet::new();
    for entries in [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
    {
        for e in entries {
            if e.state == TcpState::Listen && e.local_address.port() == port {
                listening.insert(e.inode);
            }
        }
    }
    let processes = procfs::process::all_processes().ok()?;
    for process in processes.flatten() {
        let Ok(stat) = process.stat() else { continue };
        if stat.comm != "beam.smp" {
            continue;
        }
        let Ok(fds) = process.fd() else { continue };
        let holds_listener = fds
            .flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(inode) if listening.contains(&inode)));
        if holds_listener {
            return u32::try_from(process.pid).ok();
        }
    }
    None
}

/// Established client connections to `port` on this host (other engineers' tests
/// share the broker; they show here).
pub fn client_connections(port: u16) -> usize {
    [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.state == TcpState::Established && e.local_address.port() == port)
        .count()
}

/// The broker's version, from `rabbitmqctl version` when it is installed here.
pub fn version() -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    (out.status.success() && !line.is_empty()).then(|| line.to_owned())
}

/// `url` with its virtual host replaced by `vhost` (a name that needs no
/// percent-encoding), its query kept.
pub fn with_vhost(url: &str, vhost: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_from = base.find("://").map_or(0, |s| s + 3);
    let host_end = base[authority_from..]
        .find('/')
        .map_or(base.len(), |i| authority_from + i);
    let mut out = format!("{}/{vhost}", &base[..host_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// The user of an `amqp://` URL (`guest` when none is given, as lapin assumes).
fn user(url: &str) -> String {
    url.find("://")
        .and_then(|s| {
            let rest = &url[s + 3..];
            let at = rest.find('@')?;
            rest[..at].split(':').next().map(str::to_owned)
        })
        .unwrap_or_else(|| "guest".to_owned())
}

/// A virtual host of a run's own on the local broker, so that everything a
/// scenario declares (queues, exchanges, delay queues) goes with it at once.
#[derive(Debug)]
pub struct Vhost {
    /// Its name.
    pub name: String,
    /// The broker URL pointing at it.
    pub url: String,
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .context("cannot run rabbitmqctl")?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Vhost {
    /// Create `name` with `rabbitmqctl` and give the URL's user every permission on
    /// it. Fails when the broker of `url` is not a local process (`rabbitmqctl` would
    /// act on another broker) or `rabbitmqctl` fails.
    pub async fn create(url: &str, name: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            local_pid(port(url)).is_some(),
            "the broker at {} is not a local process",
            redact(url)
        );
        rabbitmqctl(&["-q", "add_vhost", name]).await?;
        let vhost = Self {
            name: name.to_owned(),
            url: with_vhost(url, name),
        };
        if let Err(e) = rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            name,
            &user(url),
            ".*",
            ".*",
            ".*",
        ])
        .await
        {
            vhost.delete().await;
            return Err(e);
        }
        Ok(vhost)
    }

    /// Delete it and everything in it.
    pub async fn delete(self) {
        if let Err(e) = rabbitmqctl(&["-q", "delete_vhost", &self.name]).await {
            eprintln!("keelson-bench: cannot delete vhost {}: {e:#}", self.name);
        }
    }
}

/// Queues and exchanges a configuration declared, deleted after it ran.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// Queue names.
    pub queues: Vec<String>,
    /// Exchange names.
    pub exchanges: Vec<String>,
}

impl Objects {
    /// Everything a Keelson AMQP transport declares in `namespace` for `services`
    /// (see protocol/TOPOLOGY.md).
    pub fn keelson(namespace: &str, services: &[&str]) -> Self {
        let mut queues: Vec<String> = services
            .iter()
            .map(|s| format!("{namespace}.svc.{s}"))
            .collect();
        queues.push(format!("{namespace}.dead-letter"));
        Self {
            queues,
            exchanges: vec![
                format!("{namespace}.requests"),
                format!("{namespace}.dead-letter"),
                format!("{namespace}.dead-letter.broker"),
            ],
        }
    }

    /// Delete them, each on a channel of its own (a refused deletion closes its
    /// channel). What is already gone is fine.
    pub async fn delete(&self, connection: &Connection) -> anyhow::Result<()> {
        for queue in &self.queues {
            let channel = connection.create_channel().await?;
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .with_context(|| format!("deleting queue {queue}"))?;
            let _ = channel.close(200, "OK".into()).await;
        }
        for exchange in &self.exchanges {
            let channel = connection.create_channel().await?;
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .with_context(|| format!("deleting exchange {exchange}"))?;
            let _ = channel.close(200, "OK".into()).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_their_port_found() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(port("amqp://guest:guest@127.0.0.1:5673/%2f"), 5673);
        assert_eq!(port("amqp://127.0.0.1/%2f"), 5672);
    }

    #[test]
    fn a_url_is_pointed_at_another_vhost() {
        assert_eq!(
            with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "kb-1"),
            "amqp://guest:guest@127.0.0.1:5672/kb-1"
        );
        assert_eq!(
            with_vhost("amqp://h:5673?heartbeat=10", "kb-1"),
            "amqp://h:5673/kb-1?heartbeat=10"
        );
        assert_eq!(user("amqp://bench:pw@h/%2f"), "bench");
        assert_eq!(user("amqp://h/%2f"), "guest");
    }
}
