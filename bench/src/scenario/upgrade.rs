//! `--scenario upgrade` (issue 7): three logic servers and two gateways on AMQP, an
//! open-loop load through both gateways; 5 s measured before, then the three servers
//! are upgraded one at a time (SIGTERM, wait for the exit, start a new process of the
//! same binary under a new node id (`up-N-g1` for `up-N-g0`), wait until `keelson status --expect-up NODE`
//! exits 0), measured during. Failures must be 0; goal p99 during <= 3x p99 before.

use super::keelson_config::{SERVICE, gateway_spec, logic_server, spec_with_config};
use super::special::{
    Disturbance, OpenLoad, Settings, http_target, loadavg, ms, payload, utc_now, window,
};
use super::{Env, stop_all};
use crate::broker::{self, Objects};
use crate::procs::{Proc, Ready, Spec};
use anyhow::Context as _;
use keelson_protocol::context::SNAPSHOT_SERVICE;
use std::time::{Duration, Instant};

const SERVERS: usize = 3;

fn server_spec(env: &Env, i: usize, generation: usize) -> anyhow::Result<Spec> {
    let mut toml = logic_server(env);
    toml.push_str(&format!("\n[node]\nid = \"up-{i}-g{generation}\"\n"));
    spec_with_config(
        env,
        [
            "logic0",
            "logic1",
            "logic2",
            "logic0-g1",
            "logic1-g1",
            "logic2-g1",
        ][i + 3 * generation],
        "logic-server",
        &format!("logic-server-{i}-g{generation}.toml"),
        &toml,
        Ready::Line("logic server ready"),
    )
}

/// Wait until `keelson status` shows `node` up (bounded).
async fn wait_up(env: &Env, gateway_spec: &Spec, node: &str) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let config = env.dir.join("gateway.toml");
    loop {
        let mut cmd = tokio::process::Command::new(env.bin("keelson"));
        cmd.arg("--config")
            .arg(&config)
            .args(["status", "--expect-up", node, "--listen-ms", "1500"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in &gateway_spec.env {
            cmd.env(k, v);
        }
        let status = cmd.status().await.context("cannot run keelson status")?;
        if status.success() {
            return Ok(began.elapsed());
        }
        anyhow::ensure!(
            began.elapsed() < Duration::from_secs(30),
            "{node} was not up within 30 s (keelson status: {status})"
        );
    }
}

/// Run the scenario; print the table; return the JSON.
pub async fn run(settings: &Settings) -> anyhow::Result<serde_json::Value> {
    let rate = settings.rate.unwrap_or(200.0);
    let date = utc_now();
    let load_start = loadavg();
    let env = settings.env("upgrade")?;
    let mut servers: Vec<Option<Proc>> = Vec::new();
    let mut gateways: Vec<Proc> = Vec::new();
    let outcome = async {
        for i in 0..SERVERS {
            servers.push(Some(
                Proc::start(server_spec(&env, i, 0)?, settings.worker_threads, &env.dir).await?,
            ));
        }
        let gw_spec = gateway_spec(&env)?;
        for role in ["gateway0", "gateway1"] {
            let mut spec = gw_spec.clone();
            spec.role = role;
            gateways.push(Proc::start(spec, settings.worker_threads, &env.dir).await?);
        }
        let body = payload(settings.payload_bytes);
        let mut targets = Vec::new();
        for g in &gateways {
            let base = g.url.clone().context("ui-gateway gave no URL")?;
            targets.push(http_target(&base, "echo", body.clone()).await?);
        }
        for i in 0..SERVERS {
            wait_up(&env, &gw_spec, &format!("up-{i}-g0")).await?;
        }
        let mut watched: Vec<u32> = gateways.iter().map(|p| p.pid).collect();
        watched.push(std::process::id());
        watched.extend(broker::local_pid(broker::port(&settings.amqp_url)));

        let load = OpenLoad::start(targets, rate, 64).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before_from = Instant::now();
        let dist_before = Disturbance::begin(&watched)?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let other_before = dist_before.other_cores(&watched)?;
        let during_from = Instant::now();
        let dist_during = Disturbance::begin(&watched)?;
        let mut steps = Vec::new();
        for (i, slot) in servers.iter_mut().enumerate() {
            let step = Instant::now();
            eprintln!("keelson-bench: upgrade: up-{i}");
            if let Some(old) = slot.take() {
                old.stop().await;
            }
            let stopped = step.elapsed();
            *slot = Some(
                Proc::start(server_spec(&env, i, 1)?, settings.worker_threads, &env.dir).await?,
            );
            let started = step.elapsed();
            wait_up(&env, &gw_spec, &format!("up-{i}-g1")).await?;
            steps.push(serde_json::json!({
                "node": format!("up-{i}-g1"),
                "stopped_ms": stopped.as_millis() as u64,
                "ready_ms": started.as_millis() as u64,
                "up_in_status_ms": step.elapsed().as_millis() as u64,
            }));
        }
        let during_to = Instant::now();
        let other_during = dist_during.other_cores(&watched)?;
        let samples = load.finish().await?;
        let before = window(&samples, before_from, during_from)?;
        let during = window(&samples, during_from, during_to)?;
        let total_errors = samples.iter().filter(|s| s.error.is_some()).count();
        anyhow::Ok((
            before,
            during,
            total_errors,
            samples.len(),
            steps,
            other_before,
            other_during,
            during_to - during_from,
        ))
    }
    .await;
    let mut all: Vec<Proc> = servers.into_iter().flatten().collect();
    all.extend(gateways);
    stop_all(all).await;
    if let Ok(conn) = broker::connect(&settings.amqp_url).await {
        let _ = Objects::keelson(&env.namespace, &[SERVICE, SNAPSHOT_SERVICE])
            .delete(&conn)
            .await;
    }
    let (before, during, total_errors, total, steps, other_before, other_during, took) = outcome?;
    let load_end = loadavg();
    let mut s = format!(
        "Rolling-upgrade scenario ({date}; load average {load_start} at the start, {load_end} at the end)\n\
         three logic servers, two gateways, open loop {rate:.0} req/s of echo over both gateways, 64 connections; \
         upgrade of all three took {:.1} s\n\
         {:<8} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>6}\n",
        took.as_secs_f64(),
        "window",
        "reqs",
        "errors",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "other"
    );
    for (name, st, other) in [
        ("before", &before, other_before),
        ("during", &during, other_during),
    ] {
        s.push_str(&format!(
            "{name:<8} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>6.2}\n",
            st.count,
            st.errors,
            ms(st.p50_us),
            ms(st.p99_us),
            ms(st.p999_us),
            ms(st.max_us),
            other
        ));
    }
    s.push_str(&format!(
        "failed requests over the whole run: {total_errors} of {total}{}\n\
         goal: 0 failures and p99 during <= 3x p99 before: {} (ratio {:.2})\n",
        during
            .first_error
            .as_deref()
            .or(before.first_error.as_deref())
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        if total_errors == 0 && during.p99_us <= 3 * before.p99_us {
            "met"
        } else {
            "SHORT"
        },
        during.p99_us as f64 / before.p99_us.max(1) as f64
    ));
    print!("{s}");
    Ok(serde_json::json!({
        "machine": {"date": date, "loadavg_start": load_start, "loadavg_end": load_end},
        "rate_per_s": rate,
        "before": before,
        "during": during,
        "failed_total": total_errors,
        "requests_total": total,
        "steps": steps,
        "other_cores_before": other_before,
        "other_cores_during": other_during,
    }))
}
