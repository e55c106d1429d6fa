//! Leases on RabbitMQ: a quorum queue `{ns}.lease.{name}` with a single active
//! consumer, holding one *baton* message that carries the lease's token.
//!
//! Every candidate consumes the queue; the broker delivers only to the one active
//! consumer (single active consumer), so only one candidate ever sees messages. AMQP
//! 0-9-1 never says "you are active" (nor does RabbitMQ before 4.0), so a candidate
//! learns it by receiving messages:
//!
//! 1. on each (re)attachment a candidate publishes a *probe* carrying a fresh nonce;
//! 2. the active candidate receives, in queue order, every baton that exists (a
//!    departed holder's baton is returned to the queue when its channel closes, before
//!    the next consumer becomes active) and then its own probe: it has now seen every
//!    baton, takes the highest token + 1, publishes its own baton with it (confirmed:
//!    Raft-committed on a quorum queue) and only then holds the lease. The old batons
//!    and the probes are acknowledged after that, so a baton with the highest token
//!    exists at every instant. With no baton at all (a new lease) the first holder
//!    takes token 1.
//! 3. the holder keeps its newest baton unacknowledged and **renews** every quarter of
//!    the fence window (the heartbeat interval negotiated with the broker): it
//!    publishes the next copy of its baton (confirmed), and when that copy comes back
//!    to it, acknowledges the previous one. A copy that comes back proves that this
//!    consumer was still the active one when it was sent (a confirm alone would only
//!    prove the connection alive: the broker may hand the baton on without closing
//!    the channel); the broker gives a silent connection up only after two to three
//!    heartbeat intervals, so the holder's [`Fence`] stays valid for one heartbeat
//!    interval after sending a renewal that came back, and it fences itself when that
//!    passes without a newer one.
//!    (Holding a copy at most a renewal long also keeps it far from RabbitMQ's
//!    `consumer_timeout`.)
//! 4. release closes the channel: the broker returns the baton and activates the next
//!    consumer at once. A killed process's connection closes with it (the same); a
//!    frozen one's is closed by the broker after its heartbeats stop.
//!
//! See `TOPOLOGY.md`, "Leases", for the broker facts this rests on.

use super::super::TransportError;
use super::super::lease::{Fence, Lease, LeaseEvent};
use super::connection::Link;
use super::shared::{Shared, lock};
use super::topology;
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How many messages a candidate may hold unacknowledged: enough to receive every
/// stray baton and probe ahead of its own probe.
const PREFETCH: u16 = 256;
/// Delay before a candidate attaches again after its session failed.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// The fence window when heartbeats are disabled (`heartbeat_s = 0`).
const WINDOW_WITHOUT_HEARTBEATS: Duration = Duration::from_secs(5);

/// What a lease queue carries (JSON, readable in the management UI).
#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    /// `baton` or `probe`.
    kind: String,
    /// The baton's token (0 for a probe).
    #[serde(default)]
    token: u64,
    /// The nonce of the candidate session that published it.
    nonce: String,
    /// The copy number of a baton within its holder's session.
    #[serde(default)]
    copy: u64,
}

impl Mark {
    fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The fence window of a connection: how long a renewal that came back vouches for
/// the lease (one heartbeat interval, as negotiated with the broker: the lower of
/// the client's and the broker's).
fn window(link: &Link) -> Duration {
    match link.connection.configuration().heartbeat() {
        0 => WINDOW_WITHOUT_HEARTBEATS,
        s => Duration::from_secs(u64::from(s)),
    }
}

/// How long one broker operation of a lease session may take before the session
/// is given up (a blocked connection, a queue without a leader).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A candidate for a lease on RabbitMQ: the handle of its driver task.
pub(crate) struct AmqpLease {
    name: String,
    fence: Fence,
    events: mpsc::UnboundedReceiver<LeaseEvent>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for AmqpLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpLease")
            .field("name", &self.name)
            .field("fence", &self.fence)
            .finish()
    }
}

impl AmqpLease {
    pub(crate) fn start(shared: Arc<Shared>, name: &str) -> Result<Self, TransportError> {
        let queue = topology::short("lease name", shared.names.lease_queue(name))?;
        let fence = Fence::new();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let driver = Driver {
            shared,
            queue,
            fence: fence.clone(),
            events: events_tx,
            stop: stop_rx,
        };
        Ok(Self {
            name: name.to_owned(),
            fence,
            events,
            stop,
            task: Some(tokio::spawn(driver.run())),
        })
    }
}

#[async_trait]
impl Lease for AmqpLease {
    async fn next(&mut self) -> Option<LeaseEvent> {
        self.events.recv().await
    }

    fn fence(&self) -> Fence {
        self.fence.clone()
    }

    async fn release(&mut self) {
        self.fence.drop_hold();
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            // The driver closes its channel (the broker returns the baton) and ends.
            let _ = task.await;
        }
        self.events.close();
    }
}

impl Drop for AmqpLease {
    fn drop(&mut self) {
        // The driver sees the stop (or its closed event channel) and closes its
        // channel by itself.
        self.fence.drop_hold();
        self.stop.send_replace(true);
    }
}

struct Driver {
    shared: Arc<Shared>,
    queue: ShortString,
    fence: Fence,
    events: mpsc::UnboundedSender<LeaseEvent>,
    stop: watch::Receiver<bool>,
}

/// Resolves once the candidate is told to stop (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How a session on one channel ended.
enum End {
    Stopped,
    Failed(String),
}

/// The state of a session: waiting in line, or holding with a token.
enum Phase {
    Waiting {
        /// The highest token among the batons seen, and the tag of that baton (kept
        /// unacknowledged until our own baton is confirmed; lower ones are
        /// acknowledged at once).
        max_token: u64,
        max_tag: Option<u64>,
        /// The number of our latest probe: only that one may end the wait.
        probe: u64,
    },
    Holding {
        token: u64,
        /// The copy number of the newest baton published, and when it was sent.
        copy: u64,
        sent: Instant,
        /// The tag of the baton copy held (unacknowledged).
        held: Option<u64>,
    },
}

impl Driver {
    async fn run(mut self) {
        // The last failure logged, so that a lasting one (a refused declaration: the
        // broker user lacks the right) is said once, not every half second.
        let mut said = String::new();
        loop {
            let link = tokio::select! {
                link = self.shared.wait_link() => link,
                () = stopped(&mut self.stop) => None,
            };
            let Some(link) = link else {
                self.fence.drop_hold();
                return;
            };
            let end = self.session(&link).await;
            self.fence.drop_hold();
            match end {
                End::Stopped => return,
                End::Failed(reason) => {
                    if reason != said {
                        warn!(queue = %self.queue, %reason, "lease candidate detached; attaching again");
                        said = reason;
                    } else {
                        debug!(queue = %self.queue, %reason, "lease session ended");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                        () = stopped(&mut self.stop) => return,
                    }
                }
            }
        }
    }

    /// Tell the candidate it lost the lease (if it held it in this session).
    fn lost(&self, phase: &Phase, reason: &str) {
        if let Phase::Holding { token, .. } = phase {
            self.fence.drop_hold();
            warn!(queue = %self.queue, token, %reason, "lease lost: fenced");
            let _ = self.events.send(LeaseEvent::Lost {
                token: *token,
                reason: reason.to_owned(),
            });
        }
    }

    async fn open(&self, link: &Link) -> Result<(Channel, lapin::Consumer), TransportError> {
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| topology::error("opening a lease channel", &e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| topology::error("confirm mode on a lease channel", &e))?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), topology::long("quorum"));
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        channel
            .queue_declare(self.queue.clone(), topology::durable(), args)
            .await
            .map_err(|e| topology::error(&format!("declaring {}", self.queue), &e))?;
        lock(&self.shared.registry)
            .leases
            .insert(self.queue.to_string());
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| topology::error("setting a lease prefetch", &e))?;
        let consumer = channel
            .basic_consume(
                self.queue.clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| topology::error(&format!("consuming {}", self.queue), &e))?;
        Ok((channel, consumer))
    }

    async fn publish(&self, channel: &Channel, mark: &Mark) -> Result<(), String> {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                "".into(),
                self.queue.clone(),
                BasicPublishOptions::default(),
                &mark.encode(),
                properties,
            )
            .await
            .map_err(|e| format!("publishing a lease {}: {e}", mark.kind))?;
        match confirm.await {
            Ok(lapin::Confirmation::Nack(_)) => {
                Err(format!("the broker refused a lease {} (nack)", mark.kind))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("awaiting a lease {} confirm: {e}", mark.kind)),
        }
    }

    async fn ack(channel: &Channel, tag: u64, multiple: bool) -> Result<(), String> {
        channel
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| format!("acknowledging a lease message: {e}"))
    }

    /// One attachment: open a channel, wait in line, hold, until the channel or the
    /// connection goes, or the candidate stops.
    async fn session(&mut self, link: &Link) -> End {
        let mut stop = self.stop.clone();
        let opened = tokio::select! {
            () = stopped(&mut stop) => return End::Stopped,
            opened = tokio::time::timeout(STEP_TIMEOUT, self.open(link)) => opened,
        };
        let (channel, mut consumer) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return End::Failed(e.to_string()),
            Err(_) => return End::Failed("opening the lease channel timed out".to_owned()),
        };
        let end = self.attached(link, &channel, &mut consumer).await;
        if channel.status().connected() {
            // Closing returns the held baton to the queue and activates the next
            // candidate at once.
            let _ = tokio::time::timeout(STEP_TIMEOUT, channel.close(200, "lease released".into()))
                .await;
        }
        end
    }

    async fn attached(
        &self,
        link: &Link,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
    ) -> End {
        let window = window(link);
        let renew_every = window / 4;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let probe = Mark {
            kind: "probe".to_owned(),
            token: 0,
            nonce: nonce.clone(),
            copy: 0,
        };
        let mut stop = self.stop.clone();
        tokio::select! {
            () = stopped(&mut stop) => return End::Stopped,
            published = tokio::time::timeout(STEP_TIMEOUT, self.publish(channel, &probe)) => {
                match published {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Failed(e),
                    Err(_) => return End::Failed("a lease probe was not confirmed in time".to_owned()),
                }
            }
        }
        let mut phase = Phase::Waiting {
            max_token: 0,
            max_tag: None,
            probe: 0,
        };
        let mut renew_at = Instant::now() + renew_every;
        loop {
            let holding = matches!(phase, Phase::Holding { .. });
            let valid_for = self.fence.remaining();
            tokio::select! {
                () = stopped(&mut stop) => {
                    self.fence.drop_hold();
                    return End::Stopped;
                }
                () = link.lost() => {
                    self.lost(&phase, "the broker connection was lost");
                    return End::Failed("connection lost".to_owned());
                }
                () = tokio::time::sleep(valid_for), if holding => {
                    self.lost(&phase, "no renewal came back within the fence window");
                    return End::Failed("renewal not back in time".to_owned());
                }
                () = tokio::time::sleep_until(renew_at), if holding => {
                    if let Err(reason) = self.renew(channel, &mut phase, &nonce).await {
                        self.lost(&phase, &reason);
                        return End::Failed(reason);
                    }
                    renew_at = Instant::now() + renew_every;
                }
                delivery = consumer.next() => {
                    let delivery = match delivery {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => {
                            let reason = format!("the lease channel failed: {e}");
                            self.lost(&phase, &reason);
                            return End::Failed(reason);
                        }
                        None => {
                            self.lost(&phase, "the lease consumer was cancelled");
                            return End::Failed("consumer cancelled".to_owned());
                        }
                    };
                    let tag = delivery.delivery_tag;
                    let mark: Option<Mark> = serde_json::from_slice(&delivery.data).ok();
                    let step = self.on_message(channel, &mut phase, &nonce, window, tag, mark).await;
                    if let Err(reason) = step {
                        self.lost(&phase, &reason);
                        return End::Failed(reason);
                    }
                    if matches!(phase, Phase::Holding { .. }) && !holding {
                        renew_at = Instant::now() + renew_every;
                    }
                }
            }
        }
    }

    /// Publish the next copy of the baton. The fence is extended only when the copy
    /// comes back to this consumer (see `on_message`): a confirm proves that the
    /// connection is alive, not that this consumer is still the active one (the
    /// broker may have handed the baton on without closing our channel, e.g. when
    /// our node lost the queue's leader for a moment).
    async fn renew(&self, channel: &Channel, phase: &mut Phase, nonce: &str) -> Result<(), String> {
        let Phase::Holding {
            token, copy, sent, ..
        } = phase
        else {
            return Ok(());
        };
        *copy += 1;
        *sent = Instant::now();
        let mark = Mark {
            kind: "baton".to_owned(),
            token: *token,
            nonce: nonce.to_owned(),
            copy: *copy,
        };
        let deadline = *sent + self.fence.remaining();
        match tokio::time::timeout_at(deadline, self.publish(channel, &mark)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no renewal was confirmed within the fence window".to_owned()),
        }
    }

    async fn on_message(
        &self,
        channel: &Channel,
        phase: &mut Phase,
        nonce: &str,
        window: Duration,
        tag: u64,
        mark: Option<Mark>,
    ) -> Result<(), String> {
        let Some(mark) = mark else {
            // Not ours to read: drop it so it cannot block the line.
            warn!(queue = %self.queue, "an unreadable message on a lease queue was discarded");
            return Self::ack(channel, tag, false).await;
        };
        match phase {
            Phase::Waiting {
                max_token,
                max_tag,
                probe,
            } => {
                let ours = mark.kind == "probe" && mark.nonce == nonce;
                if !ours || mark.copy != *probe {
                    // Keep only the highest baton (unacknowledged until our own is
                    // confirmed, so that one with the highest token always exists);
                    // everything else goes at once, so nothing piles up.
                    if mark.kind == "baton" && (max_tag.is_none() || mark.token > *max_token) {
                        *max_token = mark.token;
                        if let Some(lower) = max_tag.replace(tag) {
                            Self::ack(channel, lower, false).await?;
                        }
                    } else {
                        Self::ack(channel, tag, false).await?;
                    }
                    // Receiving anything means we are the active consumer now (we
                    // stay so until our channel closes); our first probe may have
                    // gone to the holder before us, so probe once more: when that
                    // one arrives, every baton before it has been seen.
                    if *probe == 0 && !ours {
                        *probe = 1;
                        let again = Mark {
                            kind: "probe".to_owned(),
                            token: 0,
                            nonce: nonce.to_owned(),
                            copy: 1,
                        };
                        tokio::time::timeout(STEP_TIMEOUT, self.publish(channel, &again))
                            .await
                            .map_err(|_| "a lease probe was not confirmed in time".to_owned())??;
                    }
                    return Ok(());
                }
                let token = *max_token + 1;
                let baton = Mark {
                    kind: "baton".to_owned(),
                    token,
                    nonce: nonce.to_owned(),
                    copy: 0,
                };
                let sent = Instant::now();
                tokio::time::timeout(window, self.publish(channel, &baton))
                    .await
                    .map_err(|_| "the new baton was not confirmed in time".to_owned())??;
                self.fence.hold(token, sent + window);
                // Every message up to our probe: the highest old baton.
                Self::ack(channel, tag, true).await?;
                *phase = Phase::Holding {
                    token,
                    copy: 0,
                    sent,
                    held: None,
                };
                info!(queue = %self.queue, token, "lease acquired");
                let _ = self.events.send(LeaseEvent::Acquired { token });
                Ok(())
            }
            Phase::Holding {
                token,
                copy,
                sent,
                held,
            } => {
                if mark.kind == "baton" && mark.nonce == nonce {
                    if mark.copy == *copy {
                        // Our newest copy came back to us: we are still the active
                        // consumer, as of when it was sent. Hold it, let the
                        // previous one go.
                        self.fence.extend(*sent + window);
                        if let Some(previous) = held.replace(tag) {
                            Self::ack(channel, previous, false).await?;
                        }
                        return Ok(());
                    }
                    return Self::ack(channel, tag, false).await;
                }
                if mark.kind == "baton" && mark.token >= *token {
                    return Err(format!(
                        "a baton with token {} appeared while holding token {token}",
                        mark.token
                    ));
                }
                // Stray older batons and other candidates' probes.
                Self::ack(channel, tag, false).await
            }
        }
    }
}
