//! A RabbitMQ virtual host of a test's own, so that tests share one broker without
//! seeing each other's queues, and a disruptive test (closing connections) touches
//! only what it created. Dropping it deletes the vhost and everything in it.

use std::process::Command;

/// The broker the tests use (the README's test command makes sure it answers).
pub fn broker_base() -> String {
    std::env::var("KEELSON_TEST_AMQP_BASE")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".to_owned())
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e} (the tests of the AMQP path need RabbitMQ's rabbitmqctl; run them with bash tests/run.sh)"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh vhost, deleted on drop.
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn create(test: &str) -> Self {
        let name = format!("keelson-test-{test}-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["-q", "add_vhost", &name]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            &name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
        Self { name }
    }

    /// The AMQP URL of this vhost.
    pub fn url(&self) -> String {
        format!("{}/{}", broker_base(), self.name)
    }

    /// Close every client connection to this vhost (and no other).
    pub fn close_all_connections(&self) {
        rabbitmqctl(&[
            "-q",
            "close_all_connections",
            "-p",
            &self.name,
            "keelson test: simulated outage",
        ]);
    }

    /// Close the connections of Keelson node `node` to this vhost (and no other);
    /// returns how many were closed.
    pub fn close_connections_of(&self, node: &str) -> usize {
        let name = format!("keelson {node} (");
        let list = rabbitmqctl(&[
            "-q",
            "list_connections",
            "pid",
            "vhost",
            "client_properties",
            "--no-table-headers",
        ]);
        let mut closed = 0;
        for line in list.lines() {
            let mut cols = line.splitn(3, '\t');
            let (Some(pid), Some(vhost), Some(props)) = (cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            if vhost == self.name && props.contains(&name) {
                rabbitmqctl(&[
                    "-q",
                    "close_connection",
                    pid,
                    "keelson test: simulated outage",
                ]);
                closed += 1;
            }
        }
        closed
    }

    /// Delete queue `name` of this vhost.
    pub fn delete_queue(&self, name: &str) {
        rabbitmqctl(&["-q", "delete_queue", "-p", &self.name, name]);
    }

    /// Messages (ready or unacknowledged) in the queues of this vhost whose name
    /// `which` accepts.
    pub fn messages(&self, which: impl Fn(&str) -> bool) -> usize {
        rabbitmqctl(&[
            "-q",
            "list_queues",
            "-p",
            &self.name,
            "name",
            "messages",
            "--no-table-headers",
        ])
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let (name, count) = (cols.next()?, cols.next()?);
            which(name).then(|| count.parse::<usize>().ok())?
        })
        .sum()
    }

    /// Number of client connections open to this vhost.
    pub fn connection_count(&self) -> usize {
        rabbitmqctl(&["-q", "list_connections", "vhost"])
            .lines()
            .filter(|l| l.trim() == self.name)
            .count()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// A broker user of a test's own with full rights on one vhost, deleted on drop.
pub struct BrokerUser {
    pub name: String,
    password: String,
    vhost: String,
}

impl BrokerUser {
    pub fn create(vhost: &Vhost, role: &str) -> Self {
        let name = format!("keelson-test-{role}-{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["-q", "add_user", &name, &password]);
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            &vhost.name,
            &name,
            ".*",
            ".*",
            ".*",
        ]);
        Self {
            name,
            password,
            vhost: vhost.name.clone(),
        }
    }

    /// The AMQP URL of the vhost, as this user.
    pub fn url(&self) -> String {
        let base = broker_base();
        let (scheme, rest) = base.split_once("://").unwrap_or(("amqp", &base));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!(
            "{scheme}://{}:{}@{host}/{}",
            self.name, self.password, self.vhost
        )
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

/// `[transport]` for the AMQP transport on `urls`.
pub fn amqp_transport(urls: &[String]) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[transport]\nkind = \"amqp\"\nurls = [{}]\nheartbeat_s = 2\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n",
        urls.join(", ")
    )
}

/// The role users of `deploy/broker-setup.sh` (gateway, logic, operator), created by
/// the script itself with a user-name prefix of this test's own (users are
/// broker-wide, shared by parallel tests); deleted on drop.
pub struct RoleUsers {
    pub prefix: String,
    pub secrets: std::path::PathBuf,
}

impl RoleUsers {
    /// Run the script for `vhost` and namespace `ns`, passwords into `secrets`.
    pub fn set_up(vhost: &Vhost, ns: &str, secrets: &std::path::Path) -> Self {
        let prefix = format!("kt{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let users = Self {
            prefix,
            secrets: secrets.to_owned(),
        };
        users.add_vhost(vhost, ns);
        users
    }

    /// Run the script again for another vhost (same users and passwords).
    pub fn add_vhost(&self, vhost: &Vhost, ns: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/broker-setup.sh");
        let out = Command::new("bash")
            .arg(script)
            .args(["--vhost", &vhost.name, "--namespace", ns])
            .args(["--user-prefix", &self.prefix])
            .arg(&self.secrets)
            .output()
            .expect("cannot run deploy/broker-setup.sh");
        assert!(
            out.status.success(),
            "deploy/broker-setup.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The broker user of `role` (`gateway`, `logic`, `operator`).
    pub fn name(&self, role: &str) -> String {
        format!("{}keelson-{role}", self.prefix)
    }

    /// The password file the script wrote for `role`.
    pub fn password_file(&self, role: &str) -> std::path::PathBuf {
        self.secrets.join(format!("{}.password", self.name(role)))
    }

    /// The AMQP URL of `vhost` as `role`, password included.
    pub fn url(&self, vhost: &Vhost, role: &str) -> String {
        let password = std::fs::read_to_string(self.password_file(role))
            .expect("the script wrote the password");
        let base = broker_base();
        let (scheme, rest) = base.split_once("://").unwrap_or(("amqp", &base));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!(
            "{scheme}://{}:{}@{host}/{}",
            self.name(role),
            password.trim(),
            vhost.name
        )
    }

    /// `[transport]` on `vhost` as `role`, namespace `ns`, with the password from
    /// the script's file, declaring passively (`declare_topology = false`).
    pub fn passive_transport(&self, vhost: &Vhost, ns: &str, role: &str) -> String {
        let base = broker_base();
        let (scheme, rest) = base.split_once("://").unwrap_or(("amqp", &base));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!(
            "[transport]\nkind = \"amqp\"\nurls = [\"{scheme}://{user}@{host}/{vhost}\"]\npassword_file = \"{file}\"\nnamespace = \"{ns}\"\ndeclare_topology = false\nheartbeat_s = 2\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n",
            user = self.name(role),
            vhost = vhost.name,
            file = self.password_file(role).display(),
        )
    }
}

impl Drop for RoleUsers {
    fn drop(&mut self) {
        for role in ["gateway", "logic", "operator"] {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_user", &self.name(role)])
                .output();
        }
    }
}

/// Publish `payload` to the dead-letter exchange of the namespace `keelson` as a
/// consumer's rejection would (`channel` in confirm mode).
pub async fn dead_letter(channel: &lapin::Channel, payload: &[u8], reason: &str) {
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-keelson-dead-letter-reason".into(),
        lapin::types::AMQPValue::LongString(lapin::types::LongString::from(reason)),
    );
    channel
        .basic_publish(
            "keelson.dead-letter".into(),
            "".into(),
            lapin::options::BasicPublishOptions::default(),
            payload,
            lapin::BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A connection to `url` and a channel on it in publisher-confirm mode; keep the
/// connection alive as long as the channel is used.
pub async fn confirmed_channel(url: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    (connection, channel)
}
