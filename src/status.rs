//! `keelson status` and `keelson schedules`: listen to the control channel for a
//! few heartbeat intervals and print the cluster as tables: its logic servers, the
//! leases they hold, and the schedules they fire.

use crate::settings::KeelsonConfig;
use anyhow::Context as _;
use keelson_protocol::control::{
    ClusterLease, ClusterSchedule, ClusterView, NodeState, NodeStatus,
};
use keelson_protocol::topic::HEARTBEATS;
use std::time::Duration;
use tokio::time::Instant;

/// The cluster as the heartbeats of one listening told it.
#[derive(Debug, Clone, Default)]
pub struct Heard {
    /// Every logic server heard, with its state.
    pub nodes: Vec<NodeStatus>,
    /// The leases held, with their holders (as `GET /cluster` gives them).
    pub leases: Vec<ClusterLease>,
    /// The schedules, with their slots and leader (as `GET /cluster` gives them).
    pub schedules: Vec<ClusterSchedule>,
}

/// Collect heartbeats for `listen`, then return what they told.
pub async fn collect(config: &KeelsonConfig, listen: Duration) -> anyhow::Result<Heard> {
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
    let now = Instant::now();
    Ok(Heard {
        nodes: view.nodes(now),
        leases: view.leases(now),
        schedules: view.schedules(now),
    })
}

/// What `keelson status` prints: the table of logic servers, then the leases and
/// the schedules when there are any.
pub fn render(heard: &Heard) -> String {
    let mut out = render_nodes(&heard.nodes);
    if !heard.leases.is_empty() {
        out.push('\n');
        out.push_str(&render_leases(&heard.leases));
    }
    if !heard.schedules.is_empty() {
        out.push('\n');
        out.push_str(&render_schedules(&heard.schedules));
    }
    out
}

/// The leases table: each lease, its holder and its fencing token.
pub fn render_leases(leases: &[ClusterLease]) -> String {
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| vec![l.name.clone(), l.node.clone(), l.token.to_string()])
        .collect();
    table(&["LEASE", "NODE", "TOKEN"], &rows)
}

/// The schedules table (what `keelson schedules` prints): slots in RFC 3339 UTC,
/// `-` for none; a schedule without a leader does not fire.
pub fn render_schedules(schedules: &[ClusterSchedule]) -> String {
    if schedules.is_empty() {
        return "(no schedule heard on the control channel)\n".to_owned();
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.cron.clone(),
                s.timezone.clone(),
                s.handler.clone(),
                or_dash(&s.last_slot),
                or_dash(&s.next_slot),
                or_dash(&s.leader),
            ]
        })
        .collect();
    table(
        &[
            "SCHEDULE",
            "CRON",
            "TIMEZONE",
            "HANDLER",
            "LAST-SLOT",
            "NEXT-SLOT",
            "LEADER",
        ],
        &rows,
    )
}

/// Left-aligned columns as wide as their widest cell: a cron pattern has spaces,
/// so a reader finds a cell by its header's position, not by splitting on blanks.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The table of logic servers.
fn render_nodes(nodes: &[NodeStatus]) -> String {
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
        let table = render(&Heard {
            nodes: vec![node("narrow", 4, false), node("old", 0, true)],
            ..Heard::default()
        });
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

    /// The rows of the table whose header starts with `first`, each cut into cells
    /// at the positions of the header's column names (a cron pattern has blanks).
    fn rows_of(text: &str, first: &str) -> Vec<std::collections::BTreeMap<String, String>> {
        let mut lines = text.lines().skip_while(|l| !l.starts_with(first));
        let header = lines
            .next()
            .unwrap_or_else(|| panic!("no {first} table:\n{text}"));
        let mut starts: Vec<(usize, &str)> = Vec::new();
        let mut at = 0;
        for name in header.split_whitespace() {
            let start = at + header[at..].find(name).unwrap();
            starts.push((start, name));
            at = start + name.len();
        }
        lines
            .take_while(|l| !l.is_empty())
            .map(|row| {
                starts
                    .iter()
                    .enumerate()
                    .map(|(i, (start, name))| {
                        let end = starts.get(i + 1).map_or(row.len(), |(e, _)| *e);
                        let cell = row.get(*start..end.min(row.len())).unwrap_or("");
                        ((*name).to_owned(), cell.trim().to_owned())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn leases_and_schedules_follow_the_node_table_when_there_are_any() {
        let lease = |name: &str, node: &str, token| ClusterLease {
            name: name.to_owned(),
            node: node.to_owned(),
            token,
        };
        let nightly = ClusterSchedule {
            name: "nightly".to_owned(),
            cron: "0 30 2 * * *".to_owned(),
            timezone: "Europe/Berlin".to_owned(),
            handler: "report.build".to_owned(),
            last_slot: Some("2026-03-29T00:30:00Z".to_owned()),
            last_token: 7,
            next_slot: Some("2026-03-30T00:30:00Z".to_owned()),
            leader: Some("logic-1".to_owned()),
        };
        let fresh = ClusterSchedule {
            name: "fresh".to_owned(),
            cron: "*/5 * * * * *".to_owned(),
            timezone: "UTC".to_owned(),
            handler: "echo".to_owned(),
            last_slot: None,
            last_token: 0,
            next_slot: None,
            leader: None,
        };
        let heard = Heard {
            nodes: vec![node("logic-1", 16, false)],
            leases: vec![
                lease("scheduler", "logic-1", 7),
                lease("singleton.cleanup", "logic-2", 3),
            ],
            schedules: vec![fresh, nightly],
        };
        let text = render(&heard);
        // The node table first, then the leases, then the schedules.
        let order: Vec<usize> = ["NODE ", "LEASE ", "SCHEDULE "]
            .iter()
            .map(|h| text.find(h).unwrap())
            .collect();
        assert!(order.is_sorted(), "{text}");

        let leases = rows_of(&text, "LEASE ");
        let held: Vec<[&str; 3]> = leases
            .iter()
            .map(|r| [&r["LEASE"], &r["NODE"], &r["TOKEN"]].map(String::as_str))
            .collect();
        assert_eq!(
            held,
            [
                ["scheduler", "logic-1", "7"],
                ["singleton.cleanup", "logic-2", "3"]
            ],
            "{text}"
        );

        let schedules = rows_of(&text, "SCHEDULE ");
        assert_eq!(schedules.len(), 2, "{text}");
        let nightly = &schedules[1];
        assert_eq!(nightly["SCHEDULE"], "nightly");
        assert_eq!(nightly["CRON"], "0 30 2 * * *");
        assert_eq!(nightly["TIMEZONE"], "Europe/Berlin");
        assert_eq!(nightly["HANDLER"], "report.build");
        assert_eq!(nightly["LAST-SLOT"], "2026-03-29T00:30:00Z");
        assert_eq!(nightly["NEXT-SLOT"], "2026-03-30T00:30:00Z");
        assert_eq!(nightly["LEADER"], "logic-1");
        // Never fired, no next slot, no leader: dashes.
        let fresh = &schedules[0];
        assert_eq!(fresh["CRON"], "*/5 * * * * *");
        for column in ["LAST-SLOT", "NEXT-SLOT", "LEADER"] {
            assert_eq!(fresh[column], "-", "{text}");
        }
        // `keelson schedules` prints the same table alone.
        assert_eq!(
            render_schedules(&heard.schedules),
            text[order[2]..],
            "{text}"
        );

        // A cluster without leases or schedules: the node table alone.
        let bare = render(&Heard {
            nodes: heard.nodes.clone(),
            ..Heard::default()
        });
        assert!(
            !bare.contains("LEASE") && !bare.contains("SCHEDULE"),
            "{bare}"
        );
        assert_eq!(
            render_schedules(&[]),
            "(no schedule heard on the control channel)\n"
        );
    }
}
