//! The operator's command line, run as an operator runs it: `keelson check`,
//! `keelson call` (through a gateway and over the transport), `keelson context
//! get`, `keelson jobs`, `keelson schedules` and `keelson status`, `keelson
//! completions` and `keelson man`, against real processes on a real RabbitMQ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, ServerSpec, schedule_spec};
use support::{SECRET, Scratch, http, keelson};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `keelson args... --config config`: exit success, standard output, standard error.
fn run(args: &[&str], config: &Path) -> (bool, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    let config = config.to_str().unwrap();
    all.extend(["--config", config]);
    let out = keelson(&all, None);
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn check_refuses_each_kind_of_mistake_naming_the_file_and_the_key() {
    let scratch = Scratch::new();
    let cases = [
        (
            "unknown-key.toml",
            "[gateway]\nlisten_port = 8080\n",
            "listen_port",
        ),
        (
            "bad-type.toml",
            "[gateway]\nmax_body_bytes = \"big\"\n",
            "gateway.max_body_bytes",
        ),
        (
            "bad-level.toml",
            "[log]\nlevel = \"warning\"\n",
            "log.level",
        ),
        (
            "unknown-handler.toml",
            "[logic_server]\nhandlers = [\"echo\", \"ecoh\"]\n",
            "`ecoh` in logic_server.handlers",
        ),
        (
            "bad-handler-settings.toml",
            "[logic_server]\nhandlers = [\"test.quota\"]\n\n[logic_server.handler_settings.\"test.quota\"]\nlimit = \"three\"\n",
            "logic_server.handler_settings.\"test.quota\"",
        ),
        (
            "bad-plugin-settings.toml",
            "[logic_server]\nhandlers = [\"cart.add\"]\n\n[logic_server.plugins.cart]\nmax_items = -1\n",
            "logic_server.plugins.cart.max_items",
        ),
        (
            "bad-schedule.toml",
            "[[logic_server.schedules]]\nname = \"nightly\"\ncron = \"30 2 * * *\"\nhandler = \"echo\"\n",
            "logic_server.schedules[0].cron: `30 2 * * *` has 5 fields, but a seconds field is needed first",
        ),
    ];
    for (file, toml, key) in cases {
        let path = scratch.write(file, toml);
        let out = keelson(&["check", "--config", path.to_str().unwrap()], None);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{file}: no file name in {stderr}"
        );
        assert!(stderr.contains(key), "{file}: no `{key}` in {stderr}");
    }
    // Every problem at once, not the first only.
    let path = scratch.write(
        "two.toml",
        "[logic_server]\nhandlers = [\"ecoh\", \"cart.add\"]\n\n[logic_server.plugins.cart]\nmax_items = \"x\"\n",
    );
    let (ok, _, stderr) = run(&["check"], &path);
    assert!(!ok);
    assert!(
        stderr.contains("`ecoh`") && stderr.contains("plugins.cart.max_items"),
        "{stderr}"
    );
    assert!(stderr.contains("2 problems"), "{stderr}");
}

#[test]
fn check_accepts_every_shipped_configuration() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, stdout, stderr) = run(&["check"], &path);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.ends_with(": ok\n"), "{stdout}");
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} files in {}", dir.display());
}

#[test]
fn completions_and_the_man_page_name_the_subcommands() {
    let out = keelson(&["completions", "bash"], None);
    assert!(out.status.success());
    let bash = text(&out.stdout);
    let out = keelson(&["man"], None);
    assert!(out.status.success());
    let man = text(&out.stdout);
    assert!(
        man.starts_with(".ie") && man.contains(".SH SUBCOMMANDS"),
        "{man}"
    );
    for sub in [
        "check",
        "call",
        "context",
        "jobs",
        "schedules",
        "status",
        "dlq",
        "completions",
    ] {
        assert!(
            bash.contains(&format!("keelson__subcmd__{sub}")),
            "bash: no {sub}"
        );
        assert!(
            man.contains(&format!("keelson\\-{sub}(1)")),
            "man: no {sub}"
        );
    }
    let out = keelson(&["completions", "tcsh"], None);
    assert!(!out.status.success(), "an unknown shell is refused");
}

/// The context `keelson context get` prints for `user`, once it satisfies `done`
/// (replication between servers is asynchronous); fails the test after 10 s.
fn context_until(config: &Path, user: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, stdout, stderr) = run(&["context", "get", "--user", user], config);
        if ok {
            let view: Value = serde_json::from_str(&stdout).unwrap();
            if done(&view) {
                return view;
            }
        }
        assert!(
            Instant::now() < deadline,
            "context get never showed it: {stdout}{stderr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_and_context_get_on_a_mesh_over_rabbitmq() {
    let vhost = Vhost::create("operator-cli");
    let transport = amqp_transport(&[vhost.url()]);
    let mesh = Mesh::start(transport.clone(), 2, 1, 8).await;
    let operator = mesh.scratch.write(
        "operator.toml",
        &format!("{transport}\n[auth]\nsecret = \"{SECRET}\"\n"),
    );
    let gateway = mesh.gateways[0].base_url.clone().unwrap();

    // Through the gateway, with a token minted for --user.
    let (ok, stdout, stderr) = run(
        &[
            "call",
            "cart.add",
            r#"{"item":"apple"}"#,
            "--user",
            "alice",
            "--gateway",
            &gateway,
        ],
        &operator,
    );
    assert!(ok, "{stdout}{stderr}");
    let (status, body) = stdout.split_once('\n').unwrap();
    assert_eq!(status, "200 OK");
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"items": [{"item": "apple", "quantity": 1}]})
    );

    // Straight over the transport, as a gateway would: the same user's cart.
    let (ok, stdout, stderr) = run(
        &[
            "call",
            "cart.add",
            r#"{"item":"pear","quantity":2}"#,
            "--user",
            "alice",
        ],
        &operator,
    );
    assert!(ok, "{stdout}{stderr}");
    let (status, body) = stdout.split_once('\n').unwrap();
    assert_eq!(status, "200 ok");
    let items = json!([{"item": "apple", "quantity": 1}, {"item": "pear", "quantity": 2}]);
    assert_eq!(serde_json::from_str::<Value>(body).unwrap()["items"], items);

    // Error statuses: printed, exit status 1, both ways.
    let (ok, stdout, _) = run(&["call", "nope"], &operator);
    assert!(!ok);
    assert!(
        stdout.starts_with("404 not_found\n") && stdout.contains("unknown_handler"),
        "{stdout}"
    );
    let (ok, stdout, _) = run(&["call", "cart.add", "--gateway", &gateway], &operator);
    assert!(!ok);
    assert!(stdout.starts_with("401 Unauthorized\n"), "{stdout}");
    let (ok, _, stderr) = run(&["call", "echo", "{not json"], &operator);
    assert!(!ok);
    assert!(stderr.contains("not JSON"), "{stderr}");

    // What the handler wrote for alice, from whichever server answers.
    let view = context_until(&operator, "alice", |v| v["values"]["cart"]["pear"] == 2);
    assert_eq!(view["user"], "alice");
    assert_eq!(view["values"]["cart"], json!({"apple": 1, "pear": 2}));
    let (ok, _, stderr) = run(&["context", "get", "--user", "nobody"], &operator);
    assert!(!ok);
    assert!(
        stderr.contains("no context is held for the user `nobody`"),
        "{stderr}"
    );

    // No HTTP client reaches the operator route through a gateway.
    let (ok, stdout, _) = run(
        &[
            "call",
            "_keelson.context.get",
            "--user",
            "alice",
            "--gateway",
            &gateway,
        ],
        &operator,
    );
    assert!(!ok);
    assert!(stdout.starts_with("404 "), "{stdout}");
    assert!(!stdout.contains("apple"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_get_is_refused_to_a_publisher_the_servers_do_not_trust() {
    let vhost = Vhost::create("operator-untrusted");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    mesh.add_server(
        ServerSpec::new("strict").logic("trusted_publishers = [\"keelson-gateway\"]\n"),
    )
    .await;
    let operator = mesh.scratch.write("operator.toml", &transport);
    let (ok, _, stderr) = run(&["context", "get", "--user", "alice"], &operator);
    assert!(!ok);
    assert!(stderr.contains("trusted_publishers"), "{stderr}");
}

/// The mesh's first gateway answers `echo` with `body`: its servers serve.
async fn assert_echoes(mesh: &Mesh, body: &str) {
    let out = support::mesh::post(
        &support::http(),
        mesh.url(0, "echo"),
        body.into(),
        None,
        None,
    )
    .await;
    assert_eq!((out.status, out.body.as_str()), (200, body), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_get_against_servers_of_the_previous_release_fails_clearly_and_leaves_them_serving()
{
    let vhost = Vhost::create("operator-previous");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    mesh.add_server(ServerSpec::new("old").previous_version())
        .await;
    mesh.add_gateway().await;
    let operator = mesh.scratch.write("operator.toml", &transport);
    let (ok, _, stderr) = run(
        &["context", "get", "--user", "alice", "--timeout-ms", "1500"],
        &operator,
    );
    assert!(!ok);
    assert!(stderr.contains("before `keelson context get`"), "{stderr}");
    // The old server still serves.
    assert_echoes(&mesh, "[2]").await;

    // With a current server beside it, the queue exists: the old one never takes
    // operator requests, and the new one answers.
    let new = mesh.add_server(ServerSpec::new("new")).await;
    let (ok, stdout, stderr) = run(&["context", "get", "--user", "alice"], &operator);
    assert!(!ok);
    assert!(stderr.contains("no context is held"), "{stdout}{stderr}");

    // The current server gone, its queue stays and nobody consumes it: the command
    // times out with the reason, and the old server still serves.
    mesh.stop_server(new).await;
    let started = Instant::now();
    let (ok, _, stderr) = run(
        &["context", "get", "--user", "alice", "--timeout-ms", "1500"],
        &operator,
    );
    assert!(!ok);
    assert!(
        stderr.contains("no logic server answered within 1500 ms")
            && stderr.contains("before `keelson context get`"),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_echoes(&mesh, "[3]").await;
}

/// The lines `keelson jobs list [args]` prints, each a job's status.
fn jobs_list(config: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["jobs", "list"];
    all.extend(args);
    let (ok, stdout, stderr) = run(&all, config);
    assert!(ok, "jobs list {args:?}: {stdout}{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The status `keelson jobs show ID` prints.
fn jobs_show(config: &Path, id: &str) -> Value {
    let (ok, stdout, stderr) = run(&["jobs", "show", id], config);
    assert!(ok, "jobs show {id}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn ids(statuses: &[Value]) -> Vec<&str> {
    statuses.iter().map(|s| s["id"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_show_and_cancel_on_a_mesh_over_rabbitmq() {
    let vhost = Vhost::create("operator-jobs");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    for node in ["logic-1", "logic-2"] {
        mesh.add_server(ServerSpec::new(node).service("default", &["test.job", "echo"]))
            .await;
    }
    mesh.add_gateway().await;
    let operator = mesh.scratch.write("operator.toml", &transport);
    let client = http();
    let (alice, bob) = (mesh.token("alice"), mesh.token("bob"));

    // Nothing yet: an empty list.
    assert!(jobs_list(&operator, &[]).is_empty());

    // Two quick jobs of two users to their end, then a long one of alice's.
    let mut quick = Vec::new();
    for token in [&alice, &bob] {
        let id = mesh
            .submit_job(&client, 0, "test.job", &json!({"ms": 10}), Some(token))
            .await;
        let status = mesh.wait_for_job(&client, 0, &id, Some(token)).await;
        assert_eq!(status["state"], "succeeded", "{status}");
        quick.push(id);
    }
    let long = mesh
        .submit_job(&client, 0, "test.job", &json!({"ms": 60_000}), Some(&alice))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while jobs_show(&operator, &long)["state"] != "running" {
        assert!(Instant::now() < deadline, "the long job never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every job, oldest first, with its submitter; whichever server answers.
    let all = jobs_list(&operator, &[]);
    assert_eq!(
        ids(&all),
        [quick[0].as_str(), quick[1].as_str(), long.as_str()]
    );
    assert_eq!(
        all.iter()
            .map(|j| j["user"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["alice", "bob", "alice"]
    );
    assert!(all.iter().all(|j| j["handler"] == "test.job"), "{all:?}");
    let succeeded = jobs_list(&operator, &["--state", "succeeded"]);
    assert_eq!(ids(&succeeded), [quick[0].as_str(), quick[1].as_str()]);
    assert_eq!(
        ids(&jobs_list(&operator, &["--state", "running"])),
        [long.as_str()]
    );
    assert!(jobs_list(&operator, &["--state", "cancelled"]).is_empty());
    let (ok, _, stderr) = run(&["jobs", "list", "--state", "done"], &operator);
    assert!(!ok);
    assert!(
        stderr.contains("--state done: expected one of queued, running"),
        "{stderr}"
    );

    // One job, whoever submitted it: its result as the submitter sees it.
    let shown = jobs_show(&operator, &quick[1]);
    assert_eq!(shown["id"], quick[1].as_str());
    assert_eq!(shown["state"], "succeeded");
    assert_eq!(shown["attempts"], 1);
    assert_eq!(shown["result"]["count"], 1, "{shown}");

    // Cancel the long job: it stops and ends cancelled, long before its minute.
    let cancelled_at = Instant::now();
    let (ok, stdout, stderr) = run(&["jobs", "cancel", &long], &operator);
    assert!(ok, "{stdout}{stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["id"], long.as_str());
    assert!(
        answer["state"] == "cancelled" || answer["cancel_requested"] == true,
        "{answer}"
    );
    let status = mesh.wait_for_job(&client, 0, &long, Some(&alice)).await;
    assert_eq!(status["state"], "cancelled", "{status}");
    assert_eq!(status["error"]["code"], "cancelled", "{status}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(20));
    assert_eq!(jobs_show(&operator, &long)["state"], "cancelled");
    assert_eq!(
        ids(&jobs_list(&operator, &["--state", "cancelled"])),
        [long.as_str()]
    );

    // An unknown id, and something that is no id at all: exit status 1, and why.
    let unknown = "0123456789abcdef0123456789abcdef";
    let out = keelson(
        &[
            "jobs",
            "show",
            unknown,
            "--config",
            operator.to_str().unwrap(),
        ],
        None,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("no such job") && stderr.contains(unknown),
        "{stderr}"
    );
    let out = keelson(
        &[
            "jobs",
            "cancel",
            "nope",
            "--config",
            operator.to_str().unwrap(),
        ],
        None,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`nope` is not a job id"), "{stderr}");
}

/// The row of the table headed by a line starting with `header` whose first cell is
/// `first`, by column name: cells are cut at the header's column positions (a cron
/// pattern has blanks).
fn table_row(text: &str, header: &str, first: &str) -> BTreeMap<String, String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(header));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no table headed {header}:\n{text}"));
    let row = lines
        .take_while(|l| !l.is_empty())
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first} under {header}:\n{text}"));
    let mut starts: Vec<(usize, &str)> = Vec::new();
    for name in head.split_whitespace() {
        let from = starts.last().map_or(0, |(at, n)| at + n.len());
        starts.push((from + head[from..].find(name).unwrap(), name));
    }
    starts
        .iter()
        .enumerate()
        .map(|(i, (at, name))| {
            let end = starts
                .get(i + 1)
                .map_or(row.len(), |(e, _)| (*e).min(row.len()));
            let cell = row.get((*at).min(end)..end).unwrap_or("");
            ((*name).to_owned(), cell.trim().to_owned())
        })
        .collect()
}

/// A slot as `GET /cluster` and `keelson schedules` write it: RFC 3339 UTC, seconds.
fn is_slot(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 20
        && v.ends_with('Z')
        && [4, 7].iter().all(|i| b[*i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|i| b[*i] == b':')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_and_status_show_each_schedule_and_the_lease_of_its_leader() {
    let vhost = Vhost::create("operator-schedules");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    let record = mesh.scratch.path().join("record.jsonl");
    for node in ["logic-1", "logic-2"] {
        mesh.add_server(schedule_spec(node, &record)).await;
    }
    let operator = mesh.scratch.write("operator.toml", &transport);

    // The schedule, once one of the servers leads and has fired a slot.
    let deadline = Instant::now() + Duration::from_secs(30);
    let tick = loop {
        let (ok, stdout, stderr) = run(&["schedules", "--json", "--listen-ms", "1500"], &operator);
        assert!(ok, "{stdout}{stderr}");
        let schedules: Value = serde_json::from_str(&stdout).unwrap();
        let tick = schedules.as_array().unwrap().first().cloned();
        if let Some(tick) = tick.filter(|t| t["leader"].is_string() && t["last_slot"].is_string()) {
            assert_eq!(schedules.as_array().unwrap().len(), 1, "{schedules}");
            break tick;
        }
        assert!(
            Instant::now() < deadline,
            "no schedule with a leader and a fired slot: {schedules}"
        );
    };
    assert_eq!(tick["name"], "tick");
    assert_eq!(tick["cron"], "* * * * * *");
    assert_eq!(tick["timezone"], "UTC");
    assert_eq!(tick["handler"], "test.record");
    let leader = tick["leader"].as_str().unwrap().to_owned();
    assert!(["logic-1", "logic-2"].contains(&leader.as_str()), "{tick}");
    let (last, next) = (
        tick["last_slot"].as_str().unwrap(),
        tick["next_slot"].as_str().unwrap(),
    );
    assert!(is_slot(last) && is_slot(next) && next > last, "{tick}");
    let token = tick["last_token"].as_u64().unwrap();
    assert!(token > 0, "{tick}");
    // The slot fired is one the handler runs (as a job, a moment after the mark),
    // with the leader's token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fired: Vec<Value> = std::fs::read_to_string(&record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if fired
            .iter()
            .any(|f| f["slot"] == last && f["token"] == token)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{last} (token {token}) never ran: {fired:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The table: the same schedule, its slots and its leader.
    let (ok, stdout, stderr) = run(&["schedules", "--listen-ms", "1500"], &operator);
    assert!(ok, "{stdout}{stderr}");
    let row = table_row(&stdout, "SCHEDULE ", "tick");
    assert_eq!(row["CRON"], "* * * * * *", "{stdout}");
    assert_eq!(row["TIMEZONE"], "UTC", "{stdout}");
    assert_eq!(row["HANDLER"], "test.record", "{stdout}");
    assert_eq!(row["LEADER"], leader, "{stdout}");
    assert!(
        is_slot(&row["LAST-SLOT"]) && is_slot(&row["NEXT-SLOT"]),
        "{stdout}"
    );
    assert!(!stdout.contains("NODE "), "the schedules alone:\n{stdout}");

    // `keelson status`: the servers, then the scheduler lease held by the leader
    // with the token it fires with, then the schedule.
    let (ok, stdout, stderr) = run(&["status", "--listen-ms", "1500"], &operator);
    assert!(ok, "{stdout}{stderr}");
    for node in ["logic-1", "logic-2"] {
        assert_eq!(table_row(&stdout, "NODE ", node)["STATE"], "up", "{stdout}");
    }
    let lease = table_row(&stdout, "LEASE ", "scheduler");
    assert_eq!(lease["NODE"], leader, "{stdout}");
    assert_eq!(lease["TOKEN"], token.to_string(), "{stdout}");
    assert_eq!(table_row(&stdout, "SCHEDULE ", "tick")["LEADER"], leader);
}
