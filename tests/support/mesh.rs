//! Distributed meshes for tests: `ui-gateway` and `logic-server` processes on the
//! AMQP transport, each test in a RabbitMQ vhost of its own.

use super::{Bin, Process, SECRET, Scratch};
use std::path::Path;
use std::time::{Duration, Instant};

/// The response header naming the logic server that answered.
pub const SERVED_BY: &str = "x-keelson-served-by";

/// Every handler a test server may host.
pub const ALL_HANDLERS: &[&str] = &[
    "echo",
    "counter.increment",
    "counter.get",
    "cart.add",
    "cart.list",
    "cart.clear",
    "test.slow",
    "test.spin",
    "test.whoami",
];

/// A governor that reacts within a second to the busy ratio alone (CPU figures on a
/// shared test machine would make the test depend on its neighbours), and keeps its
/// window (tests/governor.rs checks the window on its own).
pub const GOVERNED: &str = r#"
[logic_server.governor]
sample_ms = 100
smoothing = 1.0
high_watermark = 0.5
low_watermark = 0.3
min_pause_ms = 500
use_busy = true
use_process_cpu = false
use_system_cpu = false
adaptive_window = false
"#;

pub fn gateway_toml(transport: &str) -> String {
    format!(
        "{transport}\n[gateway]\nlisten = \"127.0.0.1:0\"\nrequest_timeout_ms = 20000\n\n[auth]\nsecret = \"{SECRET}\"\n"
    )
}

/// How one logic server is set up.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub node: String,
    pub service: String,
    pub handlers: Vec<String>,
    pub concurrency: u16,
    /// TOML appended to the server's configuration.
    pub extra: String,
    /// TOML keys of the `[logic_server]` section itself.
    pub logic: String,
    /// Run the next-version build.
    pub next: bool,
    /// Run the previous release's build.
    pub previous: bool,
    /// Environment variables of the process.
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            service: "default".to_owned(),
            handlers: ALL_HANDLERS.iter().map(|h| (*h).to_owned()).collect(),
            concurrency: 16,
            extra: String::new(),
            logic: String::new(),
            next: false,
            previous: false,
            env: Vec::new(),
        }
    }

    /// Run the next-version build (another version, protocol 1.3, `test.next`).
    pub fn next_version(mut self) -> Self {
        self.next = true;
        self.handlers.push("test.next".to_owned());
        self
    }

    /// Run the previous release (protocol 1.0, no outcome records).
    pub fn previous_version(mut self) -> Self {
        self.previous = true;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// Keys of the `[logic_server]` section (`extra` comes after its subsections).
    pub fn logic(mut self, toml: &str) -> Self {
        self.logic.push_str(toml);
        self
    }

    pub fn service(mut self, service: &str, handlers: &[&str]) -> Self {
        self.service = service.to_owned();
        self.handlers = handlers.iter().map(|h| (*h).to_owned()).collect();
        self
    }

    pub fn concurrency(mut self, concurrency: u16) -> Self {
        self.concurrency = concurrency;
        self
    }

    fn toml(&self, transport: &str) -> String {
        let handlers: Vec<String> = self.handlers.iter().map(|h| format!("\"{h}\"")).collect();
        format!(
            r#"{transport}
[node]
id = "{node}"

[logic_server]
service = "{service}"
handlers = [{handlers}]
concurrency = {concurrency}
drain_timeout_ms = 5000
{logic}

[logic_server.context]
join_timeout_ms = 1000
{extra}
"#,
            extra = self.extra,
            logic = self.logic,
            node = self.node,
            service = self.service,
            handlers = handlers.join(", "),
            concurrency = self.concurrency,
        )
    }
}

/// The server settings of a schedule test: the recording handler `test.record`
/// (a line per call appended to `record`), one schedule `tick` firing it every
/// second (UTC), and job slots.
pub fn schedule_spec(node: &str, record: &Path) -> ServerSpec {
    ServerSpec::new(node)
        .service("default", &["test.record"])
        .extra(&format!(
            r#"
[logic_server.jobs]
concurrency = 8
lease_check_ms = 1000

[logic_server.handler_settings."test.record"]
path = "{}"

[[logic_server.schedules]]
name = "tick"
cron = "* * * * * *"
handler = "test.record"
body = {{ from = "schedule" }}
misfire = "fire_all"
catch_up_window_s = 300
overlap = "allow"
"#,
            record.display()
        ))
}

/// Gateways and logic servers sharing one transport configuration.
pub struct Mesh {
    pub scratch: Scratch,
    pub transport: String,
    pub gateways: Vec<Process>,
    /// `None` once a server was stopped or killed.
    pub servers: Vec<Option<Process>>,
}

impl Mesh {
    pub fn new(transport: String) -> Self {
        Self {
            scratch: Scratch::new(),
            transport,
            gateways: Vec::new(),
            servers: Vec::new(),
        }
    }

    /// `servers` logic servers `logic-1..` hosting every test handler, and `gateways`
    /// gateways.
    pub async fn start(
        transport: String,
        servers: usize,
        gateways: usize,
        concurrency: u16,
    ) -> Self {
        let mut mesh = Self::new(transport);
        for i in 1..=servers {
            mesh.add_server(ServerSpec::new(&format!("logic-{i}")).concurrency(concurrency))
                .await;
        }
        for _ in 0..gateways {
            mesh.add_gateway().await;
        }
        mesh
    }

    /// Start a logic server and wait until it is ready; returns its index.
    pub async fn add_server(&mut self, spec: ServerSpec) -> usize {
        let name = format!("{}-{}", spec.node, self.servers.len());
        let config = self
            .scratch
            .write(&format!("{name}.toml"), &spec.toml(&self.transport));
        let log = self.scratch.path().join(format!("{name}.log"));
        let bin = match (spec.next, spec.previous) {
            (true, _) => Bin::NextLogicServer,
            (false, true) => Bin::PreviousLogicServer,
            (false, false) => Bin::LogicServer,
        };
        let env: Vec<(&str, &str)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.servers
            .push(Some(Process::start(bin, &config, &log, &env).await));
        self.servers.len() - 1
    }

    /// Start a gateway and wait until it listens; returns its index.
    pub async fn add_gateway(&mut self) -> usize {
        self.add_gateway_of(Bin::Gateway).await
    }

    /// Start a gateway of the build `bin` (this one or the previous release's).
    pub async fn add_gateway_of(&mut self, bin: Bin) -> usize {
        let i = self.gateways.len();
        let config = self
            .scratch
            .write(&format!("gateway-{i}.toml"), &gateway_toml(&self.transport));
        let log = self.scratch.path().join(format!("gateway-{i}.log"));
        self.gateways
            .push(Process::start(bin, &config, &log, &[]).await);
        i
    }

    pub fn url(&self, gateway: usize, handler: &str) -> String {
        self.gateways[gateway % self.gateways.len()].url(handler)
    }

    /// Stop server `i` with SIGTERM and check it exited cleanly.
    pub async fn stop_server(&mut self, i: usize) {
        let p = self.servers[i].take().expect("server already stopped");
        let status = p.terminate(Duration::from_secs(20)).await;
        assert!(status.success(), "logic server exit status {status:?}");
    }

    /// `kill -9` server `i`.
    pub async fn kill_server(&mut self, i: usize) {
        self.servers[i]
            .take()
            .expect("server already stopped")
            .kill9()
            .await;
    }

    /// A config file for `keelson token` with the test secret.
    pub fn token(&self, user: &str) -> String {
        let config = self
            .scratch
            .write("token.toml", &format!("[auth]\nsecret = \"{SECRET}\"\n"));
        super::token(&config, user)
    }
}

/// Outcome of one HTTP request: status (0 for a transport error), who served it, the
/// body and the elapsed time.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub served_by: Option<String>,
    pub elapsed: Duration,
    pub body: String,
}

/// POST `body` to `url`, optionally with a bearer token and a deadline.
pub async fn post(
    client: &reqwest::Client,
    url: String,
    body: String,
    token: Option<&str>,
    timeout_ms: Option<u64>,
) -> Outcome {
    let started = Instant::now();
    let mut req = client.post(url).body(body);
    if let Some(ms) = timeout_ms {
        req = req.header("x-keelson-timeout-ms", ms.to_string());
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let served_by = resp
                .headers()
                .get(SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.text().await.unwrap_or_default();
            Outcome {
                status,
                served_by,
                elapsed: started.elapsed(),
                body,
            }
        }
        Err(e) => Outcome {
            status: 0,
            served_by: None,
            elapsed: started.elapsed(),
            body: e.to_string(),
        },
    }
}

impl Mesh {
    /// Start a logic server `busy` (four slots, governed by [`GOVERNED`]) and hold
    /// three of its slots with `test.slow` requests of `ms` sent through gateway 0
    /// while it is alone (a busy ratio of 0.75), then start a peer `peer`: the busy
    /// server may now pause (it is no longer the last one); waits until its log says
    /// it did. Returns the busy server's index and the slow requests.
    pub async fn pause_a_busy_server(
        &mut self,
        client: &reqwest::Client,
        ms: u64,
    ) -> (usize, Vec<tokio::task::JoinHandle<Outcome>>) {
        let busy = self
            .add_server(ServerSpec::new("busy").concurrency(4).extra(GOVERNED))
            .await;
        let slow = (0..3)
            .map(|_| {
                let (client, url) = (client.clone(), self.url(0, "test.slow"));
                let body = format!(r#"{{"ms":{ms}}}"#);
                tokio::spawn(async move { post(&client, url, body, None, None).await })
            })
            .collect();
        self.add_server(ServerSpec::new("peer").concurrency(4))
            .await;
        self.servers[busy]
            .as_ref()
            .unwrap()
            .wait_for_log("pausing intake")
            .await;
        (busy, slow)
    }

    /// The first gateway's `GET /cluster` now.
    pub async fn cluster(&self, client: &reqwest::Client) -> serde_json::Value {
        let url = format!("{}/cluster", self.gateways[0].base_url.clone().unwrap());
        client.get(&url).send().await.unwrap().json().await.unwrap()
    }

    /// Poll the first gateway's `GET /cluster` (fed by heartbeats, about one a
    /// second) until `done` holds for it; fails the test after 10 s. Returns the
    /// table that satisfied it.
    pub async fn wait_for_cluster(
        &self,
        client: &reqwest::Client,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_cluster_within(client, what, Duration::from_secs(10), done)
            .await
    }

    /// [`Mesh::wait_for_cluster`], failing the test after `within`.
    pub async fn wait_for_cluster_within(
        &self,
        client: &reqwest::Client,
        what: &str,
        within: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let table = self.cluster(client).await;
            if done(&table) {
                return table;
            }
            assert!(
                started.elapsed() < within,
                "/cluster never showed {what} within {within:?}: {table}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Submit `handler` with `body` as a background job (`Prefer: respond-async`)
    /// through gateway `gateway`, as the user of `token` (or anonymously); the id
    /// of the job accepted (202).
    pub async fn submit_job(
        &self,
        client: &reqwest::Client,
        gateway: usize,
        handler: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> String {
        let mut req = client
            .post(self.url(gateway, handler))
            .header("prefer", "respond-async")
            .json(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 202, "submitting a {handler} job: {text}");
        let accepted: serde_json::Value = serde_json::from_str(&text).unwrap();
        accepted["id"].as_str().unwrap().to_owned()
    }

    /// `GET /jobs/{id}?wait=30` through gateway `gateway` until the job is over;
    /// its final status. Fails the test when it is not over after a minute.
    pub async fn wait_for_job(
        &self,
        client: &reqwest::Client,
        gateway: usize,
        id: &str,
        token: Option<&str>,
    ) -> serde_json::Value {
        let base = self.gateways[gateway % self.gateways.len()]
            .base_url
            .clone()
            .unwrap();
        let started = Instant::now();
        loop {
            let mut req = client
                .get(format!("{base}/jobs/{id}?wait=30"))
                .timeout(Duration::from_secs(40));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200, "job {id}");
            let status: serde_json::Value = resp.json().await.unwrap();
            if ["succeeded", "failed", "cancelled"].contains(&status["state"].as_str().unwrap()) {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "job {id} not over after a minute: {status}"
            );
        }
    }
}

/// The state `/cluster` gives `node`, if it lists it.
pub fn node_state(table: &serde_json::Value, node: &str) -> Option<String> {
    node_row(table, node).and_then(|n| n["state"].as_str().map(str::to_owned))
}

/// The intake window `node` reported in its last heartbeat.
pub fn node_window(table: &serde_json::Value, node: &str) -> Option<u64> {
    node_row(table, node).and_then(|n| n["window"].as_u64())
}

fn node_row<'a>(table: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    table["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
}

impl Mesh {
    /// Wait until `counter.get` for the user of `token` reads `expected` through every
    /// gateway (replication is asynchronous); a value past it fails the test at once.
    pub async fn wait_for_counter(&self, client: &reqwest::Client, token: &str, expected: i64) {
        let value = self.settled_counter(client, token, expected).await;
        assert_eq!(value, expected, "the counter went past {expected}");
    }
}

impl Mesh {
    /// Read `counter.get` for the user of `token` through every gateway until each
    /// reads at least `min` (writes replicate asynchronously) and all agree; then that
    /// value. Fails the test after 10 s.
    pub async fn settled_counter(&self, client: &reqwest::Client, token: &str, min: i64) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut values = Vec::new();
            for g in 0..self.gateways.len() {
                let out = post(
                    client,
                    self.url(g, "counter.get"),
                    String::new(),
                    Some(token),
                    None,
                )
                .await;
                let value = serde_json::from_str::<serde_json::Value>(&out.body)
                    .ok()
                    .and_then(|v| v["value"].as_i64())
                    .unwrap_or(-1);
                values.push(value);
            }
            if values.iter().all(|&v| v >= min && v == values[0]) {
                return values[0];
            }
            assert!(
                Instant::now() < deadline,
                "the counter never reached {min} everywhere: {values:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
