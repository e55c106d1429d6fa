//! What a handler sees when it runs as a background job ([`RequestCtx::job`]): which
//! job and attempt, a way to report progress, and the submitter's cancellation.
//!
//! [`RequestCtx::job`]: crate::handler::RequestCtx::job

use keelson_protocol::job::Progress;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running job, as its handler sees it. Cheap to clone.
///
/// ```
/// use keelson_logic_server::JobCtx;
///
/// # async fn build(job: &JobCtx) {
/// for step in 0..10 {
///     if job.is_cancelled() {
///         return; // stop early: a cancelled job's context writes are discarded anyway
///     }
///     job.progress(f64::from(step) / 10.0, format!("step {step}"));
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct JobCtx {
    id: String,
    attempt: u32,
    max_attempts: u32,
    cancel: CancellationToken,
    progress: watch::Sender<Option<Progress>>,
}

impl JobCtx {
    /// A job context, and the receiving end of its progress reports. The job server
    /// makes one per run; the test kit makes one for a handler's unit test.
    pub fn new(
        id: impl Into<String>,
        attempt: u32,
        max_attempts: u32,
    ) -> (Self, watch::Receiver<Option<Progress>>) {
        let (progress, reports) = watch::channel(None);
        let ctx = Self {
            id: id.into(),
            attempt,
            max_attempts,
            cancel: CancellationToken::new(),
            progress,
        };
        (ctx, reports)
    }

    /// The job id (what `GET /jobs/{id}` names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// 1 for the first run; more for a retry, or a rerun after its server was lost.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The most attempts this job gets.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Report how far the job is: `fraction` (clamped to 0.0–1.0) and a message for
    /// people. Never waits: the latest report is replicated a few times a second at
    /// most, and shown in the job's status as `progress`.
    pub fn progress(&self, fraction: f64, message: impl Into<String>) {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let message = message.into();
        self.progress.send_replace(Some(Progress {
            fraction,
            message: (!message.is_empty()).then_some(message),
        }));
    }

    /// Whether the submitter (or an operator) cancelled the job. A cancelled job ends
    /// `cancelled` whatever the handler returns, and its context writes are
    /// discarded: return early.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves once the job is cancelled (use it in a `select!` beside the work).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Cancel the job, as its server does when the cancellation reaches it (and a
    /// test does to check how a handler reacts).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}
