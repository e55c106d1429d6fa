//! How many dead letters wait, for `GET /cluster` and the dashboard.
//!
//! Asked of the transport ([`Transport::dead_letters_waiting`]: on RabbitMQ a passive
//! declaration of the namespace's dead-letter queue, which needs no right on it) at
//! most once per [`REFRESH`], however many clients poll, and never for longer than
//! [`ASK_TIMEOUT`]: a slow broker makes the figure unknown, not `/cluster` slow.
//!
//! The dead-letter queue is one per namespace, shared by every service: the figure
//! is the namespace's. Telling services apart would mean reading the letters, which
//! a gateway has no right to do (`keelson dlq list` does it).

use keelson_protocol::Transport;
use serde::Serialize;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A figure younger than this is served from the cache.
const REFRESH: Duration = Duration::from_secs(1);
/// Longest wait for the transport's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The `dead_letters` member of `GET /cluster`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct DeadLetterCount {
    /// Dead letters waiting to be read; `None` when the transport cannot tell now
    /// (disconnected, or a transport that does not count them).
    pub(crate) waiting: Option<u64>,
}

/// The last figure and when it was taken.
#[derive(Debug, Default)]
pub(crate) struct DeadLetters {
    last: Mutex<Option<(Instant, DeadLetterCount)>>,
}

impl DeadLetters {
    /// The count, asked of `transport` when the cached one is older than [`REFRESH`].
    pub(crate) async fn count(&self, transport: &dyn Transport) -> DeadLetterCount {
        // Held across the question: concurrent callers wait for one answer instead
        // of each asking the broker.
        let mut last = self.last.lock().await;
        if let Some((at, count)) = *last
            && at.elapsed() < REFRESH
        {
            return count;
        }
        let waiting =
            match tokio::time::timeout(ASK_TIMEOUT, transport.dead_letters_waiting()).await {
                Ok(Ok(waiting)) => waiting,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot count the dead letters");
                    None
                }
                Err(_) => {
                    tracing::debug!("counting the dead letters took longer than {ASK_TIMEOUT:?}");
                    None
                }
            };
        let count = DeadLetterCount { waiting };
        *last = Some((Instant::now(), count));
        count
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use keelson_protocol::transport::memory::MemoryTransport;
    use keelson_protocol::transport::{Message, ServiceSpec};

    /// One request on `service`, rejected to the dead-letter queue.
    async fn dead_letter(t: &MemoryTransport) {
        let spec = ServiceSpec {
            name: "s".into(),
            routes: vec!["r".into()],
        };
        t.declare_service(&spec).await.unwrap();
        let mut consumer = t.consume("s", 1).await.unwrap();
        let t2 = t.clone();
        let request = tokio::spawn(async move {
            t2.request(
                "r",
                Message::new("x"),
                Instant::now() + Duration::from_millis(50),
            )
            .await
        });
        let delivery = consumer.next().await.unwrap().unwrap();
        delivery.reject("test").await.unwrap();
        let _ = request.await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_is_cached_for_a_second_then_asked_again() {
        let transport = MemoryTransport::new();
        let letters = DeadLetters::default();
        assert_eq!(letters.count(&transport).await.waiting, Some(0));
        dead_letter(&transport).await;
        // Within the refresh interval: the cached figure.
        assert_eq!(letters.count(&transport).await.waiting, Some(0));
        tokio::time::advance(REFRESH).await;
        assert_eq!(letters.count(&transport).await.waiting, Some(1));
    }

    #[tokio::test]
    async fn a_closed_transport_gives_no_figure() {
        let transport = MemoryTransport::new();
        transport.close().await;
        let letters = DeadLetters::default();
        assert_eq!(letters.count(&transport).await.waiting, None);
    }
}
