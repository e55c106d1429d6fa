//! `--scenario governor` (issue 6): two logic servers pinned to different cores
//! (`taskset -c 0` and `taskset -c 1`), a CPU hog pinned to core 0 (a shell busy
//! loop at `nice -n -10`, so the server sharing its core gets about a tenth of it),
//! one `ui-gateway` (not pinned), and a steady open-loop load of a CPU-bound handler
//! (`test.spin`, 2 ms) through the gateway; p99 with the governor off, then on (a
//! fresh deployment each).

use super::keelson_config::{SERVICE, gateway_spec, logic_server, spec_with_config};
use super::special::{
    Disturbance, OpenLoad, Settings, Stats, http_status_target, http_target, loadavg, ms, payload,
    utc_now, window,
};
use super::stop_all;
use crate::broker::{self, Objects};
use crate::procs::{Proc, Ready};
use anyhow::Context as _;
use keelson_protocol::context::SNAPSHOT_SERVICE;
use serde::Serialize;
use std::time::{Duration, Instant};

/// One mode's figures.
#[derive(Debug, Serialize)]
pub struct ModeRun {
    /// Governor enabled.
    pub governor: bool,
    /// Latency over the window.
    pub stats: Stats,
    /// Pause and resume transitions in each server's log (server 0 shares the hog's
    /// core).
    pub pauses: [usize; 2],
    /// Resumes in each server's log.
    pub resumes: [usize; 2],
    /// Cores busy outside the measured processes (hog included in "measured").
    pub other_cores: f64,
    /// Each server's load factor and its parts, from `keelson status --json` in the
    /// middle of the window.
    pub load: Vec<serde_json::Value>,
}

/// `keelson status --json` against the gateway's configuration: node, load, paused.
async fn status(env: &super::Env, spec: &crate::procs::Spec) -> Vec<serde_json::Value> {
    let mut cmd = tokio::process::Command::new(env.bin("keelson"));
    cmd.arg("--config")
        .arg(env.dir.join("gateway.toml"))
        .args(["status", "--json", "--listen-ms", "1500"])
        .stderr(std::process::Stdio::null());
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let Ok(out) = cmd.output().await else {
        return Vec::new();
    };
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    nodes
        .iter()
        .map(|n| {
            let hb = n.get("heartbeat").unwrap_or(n);
            serde_json::json!({
                "node": hb.get("node"),
                "load": hb.get("load"),
                "paused": hb.get("paused"),
                "in_flight": hb.get("in_flight"),
                "window": hb.get("window"),
            })
        })
        .collect()
}

fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// The hog's niceness: `KEELSON_BENCH_HOG_NICE` (default -10: the server sharing its
/// core gets about a tenth of it; -19 about 1%; 0 half).
fn hog_nice() -> String {
    std::env::var("KEELSON_BENCH_HOG_NICE").unwrap_or_else(|_| "-10".to_owned())
}

async fn hog() -> anyhow::Result<tokio::process::Child> {
    let nice = hog_nice();
    tokio::process::Command::new("taskset")
        .args([
            "-c",
            "0",
            "nice",
            "-n",
            nice.as_str(),
            "sh",
            "-c",
            "while :; do :; done",
        ])
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the CPU hog (taskset, nice, sh)")
}

/// The default handler: burns CPU for the time its body asks.
const SPIN: &str = "test.spin";
const SPIN_BODY: &str = r#"{"us":2000}"#;

async fn one_mode(
    settings: &Settings,
    governor: bool,
    rate: f64,
    handler: &str,
    body: Option<&str>,
) -> anyhow::Result<ModeRun> {
    let tag = if governor { "gov-on" } else { "gov-off" };
    let env = settings.env(tag)?;
    let mut procs = Vec::new();
    let result = async {
        for core in 0..2 {
            let mut toml = logic_server(&env);
            toml = toml.replace(
                "handlers = [\"echo\"]",
                &format!("handlers = [\"{handler}\"]"),
            );
            toml.push_str(&format!(
                "\n[node]\nid = \"gov-{core}\"\n\n[logic_server.governor]\nenabled = {governor}\n"
            ));
            let mut spec = spec_with_config(
                &env,
                if core == 0 { "logic0" } else { "logic1" },
                "logic-server",
                &format!("logic-server-{core}.toml"),
                &toml,
                Ready::Line("logic server ready"),
            )?;
            let mut args = vec![
                "-c".into(),
                core.to_string().into(),
                spec.program.clone().into_os_string(),
            ];
            args.append(&mut spec.args);
            spec.args = args;
            spec.program = "taskset".into();
            procs.push(Proc::start(spec, settings.worker_threads, &env.dir).await?);
        }
        let gw_spec = gateway_spec(&env)?;
        procs.push(Proc::start(gw_spec.clone(), settings.worker_threads, &env.dir).await?);
        let base = procs[2].url.clone().context("ui-gateway gave no URL")?;
        let target = match body {
            Some(body) => http_status_target(&base, handler, body.to_owned().into()).await?,
            None => http_target(&base, handler, payload(settings.payload_bytes)).await?,
        };

        let mut hog = hog().await?;
        let hog_pid = hog.id().unwrap_or(0);
        let mut watched: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        watched.push(std::process::id());
        watched.push(hog_pid);
        watched.extend(broker::local_pid(broker::port(&settings.amqp_url)));
        let warm = Duration::from_secs(2);
        let measure = Duration::from_secs(if settings.quick { 5 } else { 10 });
        let load = OpenLoad::start(vec![target], rate, 64).await?;
        let began = Instant::now();
        tokio::time::sleep(warm).await;
        let disturbance = Disturbance::begin(&watched)?;
        let from = Instant::now();
        tokio::time::sleep(measure / 2).await;
        let load_seen = status(&env, &gw_spec).await;
        tokio::time::sleep_until(tokio::time::Instant::from_std(from + measure)).await;
        let to = Instant::now();
        let other_cores = disturbance.other_cores(&watched)?;
        let samples = load.finish().await?;
        let _ = hog.kill().await;
        let _ = began;
        let stats = window(&samples, from, to)?;
        let logs: Vec<String> = procs[..2]
            .iter()
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .collect();
        Ok(ModeRun {
            governor,
            stats,
            pauses: [
                count(&logs[0], "pausing intake"),
                count(&logs[1], "pausing intake"),
            ],
            resumes: [
                count(&logs[0], "resuming intake"),
                count(&logs[1], "resuming intake"),
            ],
            other_cores,
            load: load_seen,
        })
    }
    .await;
    stop_all(procs).await;
    if let Ok(conn) = broker::connect(&settings.amqp_url).await {
        let _ = Objects::keelson(&env.namespace, &[SERVICE, SNAPSHOT_SERVICE])
            .delete(&conn)
            .await;
    }
    result
}

/// Run the scenario; print the table; return the JSON.
pub async fn run(settings: &Settings) -> anyhow::Result<serde_json::Value> {
    let rate = settings.rate.unwrap_or(300.0);
    let handler = settings.handler.as_deref().unwrap_or(SPIN);
    let body = match (&settings.body, handler) {
        (Some(body), _) => Some(body.clone()),
        (None, SPIN) => Some(SPIN_BODY.to_owned()),
        (None, _) => None,
    };
    let date = utc_now();
    let load_start = loadavg();
    let mut runs = Vec::new();
    for governor in [false, true] {
        eprintln!(
            "keelson-bench: governor {}: {rate:.0} req/s",
            if governor { "on" } else { "off" }
        );
        runs.push(one_mode(settings, governor, rate, handler, body.as_deref()).await?);
    }
    let load_end = loadavg();
    let nice = hog_nice();
    let mut s = format!(
        "Governor scenario ({date}; load average {load_start} at the start, {load_end} at the end)\n\
         two logic servers (taskset -c 0 / -c 1), hog: `nice -n {nice}` busy loop on core 0, \
         gateway unpinned, open loop {rate:.0} req/s of {handler}, 64 connections\n\
         {:<9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>13} {:>6}\n",
        "governor",
        "reqs",
        "errors",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "pauses s0/s1",
        "other"
    );
    for r in &runs {
        s.push_str(&format!(
            "{:<9} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>13} {:>6.2}\n",
            if r.governor { "on" } else { "off" },
            r.stats.count,
            r.stats.errors,
            ms(r.stats.p50_us),
            ms(r.stats.p99_us),
            ms(r.stats.p999_us),
            ms(r.stats.max_us),
            format!("{}/{}", r.pauses[0], r.pauses[1]),
            r.other_cores
        ));
    }
    for r in &runs {
        for n in &r.load {
            s.push_str(&format!(
                "  governor {}: {} load {} paused {} in flight {} window {}\n",
                if r.governor { "on" } else { "off" },
                n["node"],
                n["load"],
                n["paused"],
                n["in_flight"],
                n["window"]
            ));
        }
    }
    let (off, on) = (&runs[0].stats, &runs[1].stats);
    s.push_str(&format!(
        "goal: p99 on <= 1/2 p99 off: {} (on {} ms, off {} ms, ratio {:.2})\n",
        if on.p99_us * 2 <= off.p99_us {
            "met"
        } else {
            "SHORT"
        },
        ms(on.p99_us),
        ms(off.p99_us),
        on.p99_us as f64 / off.p99_us.max(1) as f64
    ));
    print!("{s}");
    Ok(serde_json::json!({
        "machine": {"date": date, "loadavg_start": load_start, "loadavg_end": load_end},
        "rate_per_s": rate,
        "handler": handler,
        "body": body,
        "hog": format!("taskset -c 0 nice -n {} sh -c 'while :; do :; done'", hog_nice()),
        "runs": runs,
    }))
}
