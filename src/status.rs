//! `keelson status`: listen to the control channel for a few heartbeat intervals
//! and print the cluster as a table.

use crate::settings::KeelsonConfig;
use anyhow::Context as _;
use keelson_protocol::control::{ClusterView, NodeState, NodeStatus};
use keelson_protocol::topic::HEARTBEATS;
use std::time::Duration;
use tokio::time::Instant;

/// Collect heartbeats for `listen`, then return the cluster table.
pub async fn collect(config: &KeelsonConfig, listen: Duration) -> anyhow::Result<Vec<NodeStatus>> {
    let node = format!("status-{}", std::process::id());
    let transport = config
        .transport
        .build(&node)
        .await
        .with_context(|| format!("cannot connect the {} transport", config.transport.kind()))?;
    let mut heartbeats = HEARTBEATS
        .subscribe(transport.as_ref())
        .await
        .context("cannot listen to the control channel")?;
    let mut view = ClusterView::default();
    let until = Instant::now() + listen;
    while let Ok(Some(hb)) = tokio::time::timeout_at(until, heartbeats.next()).await {
        view.observe(hb, Instant::now());
    }
    transport.close().await;
    Ok(view.nodes(Instant::now()))
}

/// The table `keelson status` prints.
pub fn render(nodes: &[NodeStatus]) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:<10} {:<16} {:>6} {:>6} {:>6} {:>6} {:>9} {:>6} {:>9}\n",
        "NODE",
        "STATE",
        "VERSION",
        "SERVICES",
        "LOAD",
        "BUSY",
        "CPU",
        "SYS",
        "IN-FLIGHT",
        "WINDOW",
        "CONTEXTS"
    );
    for n in nodes {
        let hb = &n.heartbeat;
        let state = match n.state {
            NodeState::Up => "up",
            NodeState::Paused => "PAUSED",
            NodeState::NotReady => "not-ready",
            NodeState::Left => "left",
            NodeState::Gone => "GONE",
        };
        out.push_str(&format!(
            "{:<24} {:<10} {:<10} {:<16} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>9} {:>6} {:>9}\n",
            hb.node,
            state,
            hb.version,
            hb.services.join(","),
            hb.load.factor,
            hb.load.busy,
            hb.load.process_cpu,
            hb.load.system_cpu,
            format!("{}/{}", hb.in_flight, hb.concurrency),
            match hb.window {
                0 => "-".to_owned(),
                w => w.to_string(),
            },
            hb.contexts,
        ));
    }
    if nodes.is_empty() {
        out.push_str("(no logic server heard on the control channel)\n");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use keelson_protocol::ProtocolVersion;
    use keelson_protocol::control::Heartbeat;
    use keelson_protocol::control::Load;

    fn node(name: &str, window: u32, paused: bool) -> NodeStatus {
        NodeStatus {
            state: if paused {
                NodeState::Paused
            } else {
                NodeState::Up
            },
            age_ms: 200,
            heartbeat: Heartbeat {
                v: ProtocolVersion::CURRENT,
                node: name.to_owned(),
                version: "0.1.0".to_owned(),
                services: vec!["default".to_owned()],
                handlers: vec!["echo".to_owned()],
                load: Load::default(),
                paused,
                in_flight: 3,
                concurrency: 16,
                window,
                ready: true,
                contexts: 7,
                context: None,
                digest: None,
                jobs: None,
                leases: Vec::new(),
                schedules: Vec::new(),
                interval_ms: 1000,
                leaving: false,
            },
        }
    }

    #[test]
    fn the_table_shows_state_in_flight_and_window() {
        let table = render(&[node("narrow", 4, false), node("old", 0, true)]);
        let columns =
            |row: &str| -> Vec<String> { row.split_whitespace().map(str::to_owned).collect() };
        let header = columns(table.lines().next().unwrap());
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let narrow = columns(table.lines().find(|l| l.starts_with("narrow ")).unwrap());
        assert_eq!(narrow[col("STATE")], "up");
        assert_eq!(narrow[col("IN-FLIGHT")], "3/16");
        assert_eq!(narrow[col("WINDOW")], "4");
        assert_eq!(narrow[col("CONTEXTS")], "7");
        // A node that does not report its window (an older version) shows "-".
        let old = columns(table.lines().find(|l| l.starts_with("old ")).unwrap());
        assert_eq!(old[col("STATE")], "PAUSED");
        assert_eq!(old[col("WINDOW")], "-");
    }
}
