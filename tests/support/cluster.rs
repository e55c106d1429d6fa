//! A 3-node RabbitMQ cluster on loopback (`deploy/rabbitmq-cluster.sh`), beside the
//! main broker: started, or reused when it already runs, once per test binary; vhosts
//! of a test's own on it; a node's application stopped and started again to simulate
//! losing that node.

use std::process::Command;
use std::sync::OnceLock;

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its Erlang node name, `kN@host`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub amqp_port: u16,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rabbitmq-cluster.sh");

/// Run the cluster script; fails the test with its output when it fails.
fn script(args: &[&str]) -> String {
    super::run_script(SCRIPT, args, &[])
}

/// The three nodes, the cluster started (or found running) on first use.
pub fn nodes() -> &'static [Node] {
    static NODES: OnceLock<Vec<Node>> = OnceLock::new();
    NODES.get_or_init(|| {
        let started = std::time::Instant::now();
        let said = script(&["start"]);
        println!(
            "RabbitMQ cluster ready in {:.1?}: {}",
            started.elapsed(),
            said.trim()
        );
        let nodes: Vec<Node> = script(&["ports"])
            .lines()
            .filter_map(|line| {
                let mut cols = line.split_whitespace();
                let name = cols.next()?.to_owned();
                let amqp_port = cols.next()?.parse().ok()?;
                Some(Node { name, amqp_port })
            })
            .collect();
        assert_eq!(nodes.len(), 3, "{SCRIPT} ports named {nodes:?}");
        nodes
    })
}

/// `rabbitmqctl -n {node} args`, on the first of `nodes` that runs RabbitMQ.
fn rabbitmqctl(nodes: &[&Node], args: &[&str]) -> Result<String, String> {
    let mut failures = Vec::new();
    for node in nodes {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "-n", &node.name])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        failures.push(format!(
            "{}: {}{}",
            node.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Err(format!(
        "rabbitmqctl {args:?} failed: {}",
        failures.join("; ")
    ))
}

/// A fresh vhost on the cluster, deleted on drop.
pub struct ClusterVhost {
    pub name: String,
}

impl ClusterVhost {
    pub fn create(test: &str) -> Self {
        let nodes = nodes();
        let name = format!("keelson-test-{test}-{}", uuid::Uuid::new_v4().simple());
        let first = [&nodes[0]];
        rabbitmqctl(&first, &["add_vhost", &name]).unwrap_or_else(|e| panic!("{e}"));
        rabbitmqctl(
            &first,
            &["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Self { name }
    }

    /// The AMQP URL of this vhost on node `n` (1 to 3).
    pub fn url(&self, n: usize) -> String {
        let node = &nodes()[n - 1];
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            node.amqp_port, self.name
        )
    }

    /// The URLs of this vhost on every node, node `first` first, then the others in
    /// order.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        (0..3).map(|k| self.url((first - 1 + k) % 3 + 1)).collect()
    }
}

impl Drop for ClusterVhost {
    fn drop(&mut self) {
        // Any running node will do: node 1 may be the one a failed test left stopped.
        let all: Vec<&Node> = nodes().iter().collect();
        let _ = rabbitmqctl(&all, &["delete_vhost", &self.name]);
    }
}

/// Node `n`'s RabbitMQ application, stopped (`rabbitmqctl stop_app`): its clients
/// lose their connections, its queue replicas stop. Started again by [`Self::start`],
/// or on drop (so that a failed test leaves the cluster whole).
pub struct StoppedApp {
    node: usize,
    started: bool,
}

/// Stop node `n`'s application (blocking: a few hundred milliseconds).
pub fn stop_app(n: usize) -> StoppedApp {
    script(&["stop-app", &n.to_string()]);
    StoppedApp {
        node: n,
        started: false,
    }
}

impl StoppedApp {
    /// Start the application again and wait until it runs (blocking).
    pub fn start(mut self) {
        self.started = true;
        script(&["start-app", &self.node.to_string()]);
    }
}

impl Drop for StoppedApp {
    fn drop(&mut self) {
        if !self.started {
            let _ = Command::new("bash")
                .arg(SCRIPT)
                .args(["start-app", &self.node.to_string()])
                .output();
        }
    }
}
