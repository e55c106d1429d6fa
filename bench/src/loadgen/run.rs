//! The closed and open loops, and the line protocol to the harness.

use super::Target;
use super::recorder::Recorder;
use crate::phase::{Phase, PhaseResult};
use anyhow::Context as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Standard output, one flushed line per event: the harness samples CPU time when it
/// reads `start` and `end`, so they must not sit in a buffer.
#[derive(Debug, Default)]
pub struct Out;

impl Out {
    /// Write `line` and flush.
    pub fn line(&self, line: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()
    }
}

/// How long each part of a phase lasts.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Warm-up before the first phase (connections, JIT-like caches, allocator).
    pub warmup: Duration,
    /// Warm-up before every later phase, at that phase's load.
    pub phase_warmup: Duration,
    /// The measurement window.
    pub measure: Duration,
    /// Open loop: after the window, how long requests still queued on the schedule
    /// may be sent before the rest is counted as unsent.
    pub drain: Duration,
    /// A call's own timeout (the target enforces it); bounds the wait for workers.
    pub call_timeout: Duration,
}

/// Run `phases` in order against `target`, reporting on `out`.
pub async fn run_phases<T: Target>(
    target: Arc<T>,
    phases: &[Phase],
    timing: Timing,
    out: &Out,
) -> anyhow::Result<()> {
    for (i, phase) in phases.iter().enumerate() {
        let warmup = if i == 0 {
            timing.warmup
        } else {
            timing.phase_warmup
        };
        let recorder = match *phase {
            Phase::Closed { concurrency } => {
                closed(&target, concurrency, warmup, timing, i, out).await?
            }
            Phase::Open { rate, workers } => {
                open(&target, rate, workers, warmup, timing, i, out).await?
            }
        };
        let duration_s = timing.measure.as_secs_f64();
        let result = PhaseResult {
            phase: *phase,
            duration_s,
            completed: recorder.completed,
            errors: recorder.errors,
            error_sample: recorder.first_error.clone(),
            throughput: recorder.completed as f64 / duration_s,
            latency: recorder.summary(),
            unsent: recorder.unsent,
        };
        out.line(&format!("result {i} {}", serde_json::to_string(&result)?))?;
    }
    Ok(())
}

async fn connect_all<T: Target>(target: &Arc<T>, n: usize) -> anyhow::Result<Vec<T::Conn>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(target.connect().await.context("cannot connect a worker")?);
    }
    Ok(conns)
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

/// Wait for every worker, bounded: a worker that outlives `by` is a hung call.
async fn join(mut tasks: JoinSet<Recorder>, by: Instant) -> anyhow::Result<Recorder> {
    let mut total = Recorder::new()?;
    let wait = tokio::time::timeout_at(tokio::time::Instant::from_std(by), async {
        while let Some(done) = tasks.join_next().await {
            total.merge(done.context("a load worker failed")?)?;
        }
        anyhow::Ok(())
    });
    wait.await
        .context("load workers still busy long after the window (calls not timing out?)")??;
    Ok(total)
}

async fn closed<T: Target>(
    target: &Arc<T>,
    concurrency: usize,
    warmup: Duration,
    timing: Timing,
    index: usize,
    out: &Out,
) -> anyhow::Result<Recorder> {
    let conns = connect_all(target, concurrency).await?;
    let begin = Instant::now() + warmup;
    let end = begin + timing.measure;
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        let mut rec = Recorder::new()?;
        tasks.spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = target.call(&mut conn).await;
                let done = Instant::now();
                // Count what completes inside the window: the same window the CPU
                // time is read over.
                if done < begin || done > end {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        rec.completed += 1;
                        rec.latency(done - sent);
                    }
                    Err(e) => rec.error(e),
                }
            }
            rec
        });
    }
    sleep_until(begin).await;
    out.line(&format!("start {index}"))?;
    sleep_until(end).await;
    out.line(&format!("end {index}"))?;
    join(tasks, end + timing.call_timeout + Duration::from_secs(5)).await
}

async fn open<T: Target>(
    target: &Arc<T>,
    rate: f64,
    workers: usize,
    warmup: Duration,
    timing: Timing,
    index: usize,
    out: &Out,
) -> anyhow::Result<Recorder> {
    let conns = connect_all(target, workers).await?;
    let t0 = Instant::now() + Duration::from_millis(10);
    let begin = t0 + warmup;
    let end = begin + timing.measure;
    let cutoff = end + timing.drain;
    let (tx, rx) = async_channel::unbounded::<Instant>();
    // tokio's timer has a resolution of one millisecond, far coarser than the gap
    // between two requests; a thread of its own sleeping to the microsecond keeps the
    // schedule. Each intended send time goes to the first idle worker.
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            let mut i: u64 = 0;
            loop {
                let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                if at >= end {
                    return;
                }
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if tx.send_blocking(at).is_err() {
                    return;
                }
                i += 1;
            }
        })
        .context("cannot start the pacer thread")?;
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        let rx = rx.clone();
        let mut rec = Recorder::new()?;
        tasks.spawn(async move {
            while let Ok(intended) = rx.recv().await {
                let scheduled_in_window = intended >= begin;
                if Instant::now() >= cutoff {
                    if scheduled_in_window {
                        rec.unsent += 1;
                        rec.latency(cutoff - intended);
                    }
                    continue;
                }
                let outcome = target.call(&mut conn).await;
                let done = Instant::now();
                let done_in_window = done >= begin && done <= end;
                match outcome {
                    Ok(()) => {
                        if done_in_window {
                            rec.completed += 1;
                        }
                        if scheduled_in_window {
                            rec.latency(done - intended);
                        }
                    }
                    Err(e) => {
                        if scheduled_in_window {
                            rec.error(e);
                        }
                    }
                }
            }
            rec
        });
    }
    drop(rx);
    sleep_until(begin).await;
    out.line(&format!("start {index}"))?;
    sleep_until(end).await;
    out.line(&format!("end {index}"))?;
    let total = join(tasks, cutoff + timing.call_timeout + Duration::from_secs(5)).await?;
    if pacer.join().is_err() {
        anyhow::bail!("the pacer thread panicked");
    }
    Ok(total)
}
