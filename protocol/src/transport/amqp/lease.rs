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
//!    the fence window: it publishes the next copy of its baton (confirmed), then
//!    acknowledges the previous one when the copy comes back. A confirmed renewal
//!    proves that the broker still counted the holder's connection alive when it was
//!    sent; the broker gives a silent connection up only after two to three heartbeat
//!    intervals, so the holder's [`Fence`] stays valid for one heartbeat interval after
//!    sending a confirmed renewal, and it fences itself when that passes unrenewed.
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

/// The fence window of a transport: how long a confirmed renewal vouches for the
/// lease (one heartbeat interval).
fn window(shared: &Shared) -> Duration {
    match shared.config.heartbeat_s {
        0 => WINDOW_WITHOUT_HEARTBEATS,
        s => Duration::from_secs(u64::from(s)),
    }
}

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
        /// The highest token among the batons seen.
        max_token: u64,
        /// The number of our latest probe: only that one may end the wait.
        probe: u64,
    },
    Holding {
        token: u64,
        /// The copy number of the newest baton published.
        copy: u64,
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
        let (channel, mut consumer) = match self.open(link).await {
            Ok(opened) => opened,
            Err(e) => return End::Failed(e.to_string()),
        };
        let end = self.attached(link, &channel, &mut consumer).await;
        if channel.status().connected() {
            // Closing returns the held baton to the queue and activates the next
            // candidate at once.
            let _ = channel.close(200, "lease released".into()).await;
        }
        end
    }

    async fn attached(
        &self,
        link: &Link,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
    ) -> End {
        let window = window(&self.shared);
        let renew_every = window / 4;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let probe = Mark {
            kind: "probe".to_owned(),
            token: 0,
            nonce: nonce.clone(),
            copy: 0,
        };
        if let Err(e) = self.publish(channel, &probe).await {
            return End::Failed(e);
        }
        let mut phase = Phase::Waiting {
            max_token: 0,
            probe: 0,
        };
        let mut renew_at = Instant::now() + renew_every;
        let mut stop = self.stop.clone();
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
                    self.lost(&phase, "no renewal was confirmed within the fence window");
                    return End::Failed("renewal not confirmed in time".to_owned());
                }
                () = tokio::time::sleep_until(renew_at), if holding => {
                    if let Err(reason) = self.renew(channel, &mut phase, &nonce, window).await {
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

    async fn renew(
        &self,
        channel: &Channel,
        phase: &mut Phase,
        nonce: &str,
        window: Duration,
    ) -> Result<(), String> {
        let Phase::Holding { token, copy, .. } = phase else {
            return Ok(());
        };
        *copy += 1;
        let mark = Mark {
            kind: "baton".to_owned(),
            token: *token,
            nonce: nonce.to_owned(),
            copy: *copy,
        };
        let sent = Instant::now();
        let deadline = sent + self.fence.remaining();
        match tokio::time::timeout_at(deadline, self.publish(channel, &mark)).await {
            Ok(Ok(())) => {
                self.fence.extend(sent + window);
                Ok(())
            }
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
            Phase::Waiting { max_token, probe } => {
                let ours = mark.kind == "probe" && mark.nonce == nonce;
                if !ours || mark.copy != *probe {
                    if mark.kind == "baton" {
                        *max_token = (*max_token).max(mark.token);
                    }
                    // Receiving anything means we are the active consumer now; our
                    // first probe may have gone to the holder before us, so probe
                    // again: when that one arrives, every baton before it has been
                    // seen. (Everything stays unacknowledged until our own baton is
                    // confirmed.)
                    if !ours {
                        *probe += 1;
                        let again = Mark {
                            kind: "probe".to_owned(),
                            token: 0,
                            nonce: nonce.to_owned(),
                            copy: *probe,
                        };
                        self.publish(channel, &again).await?;
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
                // Every message up to our probe: the old batons and the probes.
                Self::ack(channel, tag, true).await?;
                *phase = Phase::Holding {
                    token,
                    copy: 0,
                    held: None,
                };
                info!(queue = %self.queue, token, "lease acquired");
                let _ = self.events.send(LeaseEvent::Acquired { token });
                Ok(())
            }
            Phase::Holding { token, copy, held } => {
                if mark.kind == "baton" && mark.nonce == nonce {
                    if mark.copy == *copy {
                        // Our newest copy: hold it, let the previous one go.
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
