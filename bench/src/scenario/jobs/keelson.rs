//! The Keelson side: two logic servers and a gateway on AMQP, jobs submitted and
//! their records read over HTTP.

use super::{BODY, IN_FLIGHT, ONE_BY_ONE, SEND_TIMEOUT, Sends, Sent, Side, WARMUP};
use super::{done_stats, per_s, send_all, send_stats};
use crate::broker;
use crate::procs::{Proc, Ready};
use crate::scenario::keelson_config::{gateway_spec, logic_server, spec_with_config};
use crate::scenario::special::{Disturbance, Sender, Settings, connect_http, http_exchange};
use crate::scenario::{Env, stop_all};
use anyhow::Context as _;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// An HTTP call on a worker's connection with a JSON answer, bounded by `within` (a
/// connection that timed out may hold half an answer: it is replaced).
async fn http(
    conn: &mut Sender,
    addr: SocketAddr,
    request: hyper::http::request::Builder,
    body: &'static [u8],
    within: Duration,
) -> Result<(hyper::StatusCode, serde_json::Value), String> {
    let call = http_exchange(conn, addr, request, Bytes::from_static(body));
    let (status, body) = match tokio::time::timeout(within, call).await {
        Ok(answer) => answer?,
        Err(_) => {
            *conn = connect_http(addr).await.map_err(|e| format!("{e:#}"))?;
            return Err(format!("no answer within {within:?}"));
        }
    };
    let json = serde_json::from_slice(&body).map_err(|_| {
        format!(
            "status {status}, not JSON: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    Ok((status, json))
}

/// `POST /api/echo` with `Prefer: respond-async`: the job's id.
struct Submit {
    addr: SocketAddr,
    authority: String,
}

impl Sends for Submit {
    type Conn = Sender;
    type Out = String;

    async fn connect(&self) -> anyhow::Result<Sender> {
        connect_http(self.addr).await
    }

    async fn send(&self, conn: &mut Sender, _: usize) -> Result<String, String> {
        let request = hyper::Request::post("/api/echo")
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("prefer", "respond-async");
        match http(conn, self.addr, request, BODY, SEND_TIMEOUT).await? {
            (hyper::StatusCode::ACCEPTED, body) => body["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("202 without an id: {body}")),
            (status, body) => Err(format!("status {status}: {body}")),
        }
    }
}

/// `GET /jobs/{id}?wait=30` of each job: its `finished_at`, in Unix milliseconds,
/// once `succeeded`.
struct Finished {
    addr: SocketAddr,
    authority: String,
    ids: Vec<Option<String>>,
}

impl Sends for Finished {
    type Conn = Sender;
    type Out = u64;

    async fn connect(&self) -> anyhow::Result<Sender> {
        connect_http(self.addr).await
    }

    async fn send(&self, conn: &mut Sender, i: usize) -> Result<u64, String> {
        let Some(id) = &self.ids[i] else {
            return Err("not accepted".to_owned());
        };
        let request = hyper::Request::get(format!("/jobs/{id}?wait=30"))
            .header(hyper::header::HOST, self.authority.as_str());
        let (status, body) = http(conn, self.addr, request, b"", Duration::from_secs(40)).await?;
        if status != hyper::StatusCode::OK || body["state"] != "succeeded" {
            return Err(format!("status {status}: {body}"));
        }
        body["finished_at"]
            .as_str()
            .and_then(unix_ms)
            .ok_or_else(|| format!("no finished_at: {body}"))
    }
}

/// Milliseconds since the Unix epoch of a time as the servers write it
/// (`keelson_protocol::job::rfc3339`: `YYYY-MM-DDTHH:MM:SS.mmmZ`).
fn unix_ms(rfc3339: &str) -> Option<u64> {
    let (date, time) = rfc3339.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, millis) = time.split_once('.')?;
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + (153 * m + 2) / 5 + day - 1;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + s;
    u64::try_from(secs * 1000 + millis.parse::<i64>().ok()?).ok()
}

/// Submit `n` jobs, `in_flight` at once, then read when each finished.
async fn keelson_batch(
    gateway: &str,
    n: usize,
    in_flight: usize,
    watched: &[u32],
) -> anyhow::Result<Side> {
    let authority = gateway
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {gateway}"))?
        .trim_end_matches('/')
        .to_owned();
    let addr = tokio::net::lookup_host(&authority)
        .await?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))?;
    let disturbance = Disturbance::begin(watched)?;
    let submit = Arc::new(Submit {
        addr,
        authority: authority.clone(),
    });
    let (sent, elapsed) = send_all(submit, n, in_flight).await?;
    let ids: Vec<Option<String>> = sent.iter().map(|s| s.out.clone().ok()).collect();
    let finished = Arc::new(Finished {
        addr,
        authority,
        ids,
    });
    // Wait for the last job first (jobs run about in order): most reads after it find
    // their job over, rather than hold a wait in the servers while jobs still run.
    if n > 0 {
        let mut conn = finished.connect().await?;
        let _ = finished.send(&mut conn, n - 1).await;
    }
    let (reads, _) = send_all(finished, n, IN_FLIGHT).await?;
    let other_cores = disturbance.other_cores(watched)?;
    let latency = |s: &Sent<String>, r: &Sent<u64>| -> Result<Duration, String> {
        s.out.as_ref().map_err(Clone::clone)?;
        let finished_us = r.out.clone()?.saturating_mul(1000);
        Ok(Duration::from_micros(finished_us.saturating_sub(s.unix_us)))
    };
    let done: Vec<Result<Duration, String>> = sent
        .iter()
        .zip(&reads)
        .map(|(s, r)| latency(s, r))
        .collect();
    let last_us = reads
        .iter()
        .filter_map(|r| r.out.as_ref().ok())
        .max()
        .map_or(0, |ms| ms.saturating_mul(1000));
    let first_us = sent.first().map_or(0, |s| s.unix_us);
    Ok(Side {
        count: n,
        in_flight,
        sent_per_s: per_s(n, elapsed),
        send: send_stats(&sent)?,
        done: done_stats(&done)?,
        done_per_s: per_s(n, Duration::from_micros(last_us.saturating_sub(first_us))),
        other_cores,
    })
}

/// Start two logic servers and a gateway; run the warm-up, `n` jobs at
/// [`IN_FLIGHT`], then [`ONE_BY_ONE`] one at a time.
pub(super) async fn side(env: &Env, settings: &Settings, n: usize) -> anyhow::Result<[Side; 2]> {
    let mut procs = Vec::new();
    let outcome = async {
        for i in 0..2 {
            let toml = format!(
                "{}\n[node]\nid = \"jobs-{i}\"\n\n[logic_server.jobs]\nconcurrency = {}\n",
                logic_server(env),
                settings.prefetch
            );
            let spec = spec_with_config(
                env,
                ["logic0", "logic1"][i],
                "logic-server",
                &format!("logic-server-{i}.toml"),
                &toml,
                Ready::Line("logic server ready"),
            )?;
            procs.push(Proc::start(spec, settings.worker_threads, &env.dir).await?);
        }
        procs.push(Proc::start(gateway_spec(env)?, settings.worker_threads, &env.dir).await?);
        let base = procs[2].url.clone().context("ui-gateway gave no URL")?;
        let mut watched: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        watched.push(std::process::id());
        watched.extend(broker::local_pid(broker::port(&env.amqp_url)));
        keelson_batch(&base, WARMUP, IN_FLIGHT, &watched).await?;
        Ok([
            keelson_batch(&base, n, IN_FLIGHT, &watched).await?,
            keelson_batch(&base, ONE_BY_ONE, 1, &watched).await?,
        ])
    }
    .await;
    stop_all(procs).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_times_are_read_back() {
        for ms in [0, 951_782_400_000, 1_709_164_800_123, 1_798_761_599_999] {
            assert_eq!(unix_ms(&keelson_protocol::job::rfc3339(ms)), Some(ms));
        }
        assert_eq!(unix_ms("2026-11-22T05:08:00Z"), None);
        assert_eq!(unix_ms("yesterday"), None);
    }
}
