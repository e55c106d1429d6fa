//! Competing consumption of a service queue (or of the dead-letter queue).
//!
//! Each consumer has its own channel with `basic.qos(window)`, and a window of
//! permits, one held by each unsettled delivery: the broker's limit is per
//! `basic.consume`, so after a pause/resume, a window change or a reconnection it
//! would count afresh while older deliveries are still being handled; the permits
//! keep the promise.
//!
//! The broker applies a prefetch to consumers created after it, so a window change
//! consumes again on the same channel: a narrower window cancels the broker consumer
//! at once (what it had buffered is requeued) and consumes again with `basic.qos` =
//! the window once every delivery taken before is settled (the broker counts only
//! the new consumer's deliveries, so this is when its count and ours agree); a wider
//! one cancels and consumes again at once (until the deliveries taken before are
//! settled, the broker may then send up to that many beyond the window; they wait in
//! the client, not handed out).
//!
//! `next` is raced in a `select!` by its caller, so whatever creates a broker
//! consumer (attaching, consuming again) runs in a task of its own whose handle is
//! kept: a dropped `next` never drops a consumer holding deliveries.
//!
//! The consumer survives connection losses: when its link is lost it detaches, waits
//! for the next link and consumes again on a new channel. Deliveries handed out
//! before stay valid objects; settling them reaches a dead channel, and the broker
//! redelivers them (see `settle.rs`).
//!
//! `pause` cancels the broker consumer and gives back what the broker had already
//! sent but `next` had not handed out (republished: not a delivery that counts), so
//! peers get it; the channel stays open for the
//! deliveries handed out, and `resume` consumes again on it.

use super::super::window::Window;
use super::super::{Consumer, DEAD_LETTER_REASON_HEADER, Delivery, TransportError};
use super::connection::Link;
use super::headers;
use super::origin::Origin;
use super::settle::{AmqpSettle, copy_properties, republish_then_ack};
use super::shared::Shared;
use super::topology;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::types::ShortString;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How long `pause` waits for the broker to confirm the cancellation.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// Delay before attaching again after a failed attempt on a live connection.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// A consumer on one channel of one link.
struct Attached {
    link: Arc<Link>,
    channel: Channel,
    /// `None` while paused.
    stream: Option<lapin::Consumer>,
    /// The prefetch of the latest `basic.consume` on the channel.
    qos: u16,
}

type Consumed = Result<Option<(lapin::Consumer, u16)>, TransportError>;

/// Cancel `old` (requeueing what it had buffered), then consume with prefetch `window`
/// when one is given.
async fn change_consumer(
    shared: Arc<Shared>,
    channel: Channel,
    queue: String,
    old: Option<lapin::Consumer>,
    window: Option<u16>,
) -> Consumed {
    if let Some(old) = old {
        cancel_and_requeue(&shared, &channel, old, &queue).await;
    }
    match window {
        Some(window) => Ok(Some((consume(&channel, &queue, window).await?, window))),
        None => Ok(None),
    }
}

/// What a task needs to attach a consumer.
#[derive(Clone)]
struct Target {
    shared: Arc<Shared>,
    queue: String,
    service: Option<String>,
}

pub(crate) struct AmqpConsumer {
    shared: Arc<Shared>,
    /// Queue name on the broker.
    queue: String,
    /// The service whose queue it is; `None` for the dead-letter queue.
    service: Option<String>,
    window: Window,
    /// The window changed: consume again with it (after the broker consumer of the
    /// old one is cancelled).
    requalify: bool,
    /// A change of broker consumer under way: the old one's cancellation, then (when
    /// asked) a `basic.consume` with a prefetch, whose consumer and prefetch it gives.
    consuming: Option<JoinHandle<Consumed>>,
    /// Attaching to a link, under way.
    attaching: Option<JoinHandle<Option<Attached>>>,
    /// Declare the queue again before the next attachment (the broker cancelled the
    /// consumer on a live connection).
    redeclare: bool,
    paused: bool,
    attached: Option<Attached>,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("queue", &self.queue)
            .field("window", &self.window.size())
            .field("paused", &self.paused)
            .field("attached", &self.attached.is_some())
            .finish()
    }
}

enum Event {
    Delivery(Box<lapin::message::Delivery>),
    Detach(String),
    Closed,
}

impl AmqpConsumer {
    /// A consumer of `service`'s queue (`None`: the dead-letter queue), attached at once
    /// if the transport is connected.
    pub(crate) async fn open(
        shared: Arc<Shared>,
        service: Option<String>,
        prefetch: u16,
    ) -> Result<Self, TransportError> {
        let queue = match &service {
            Some(s) => shared.names.service_queue(s),
            None => shared.names.dead_letter_queue(),
        };
        let mut consumer = Self {
            shared,
            queue,
            service,
            window: Window::new(prefetch),
            requalify: false,
            consuming: None,
            attaching: None,
            redeclare: false,
            paused: false,
            attached: None,
        };
        // Disconnected now: `next` attaches once a connection is back.
        if let Some(link) = consumer.shared.live_link() {
            let window = consumer.window.size();
            consumer.attached = Some(consumer.target().attach(link, false, window).await?);
        }
        Ok(consumer)
    }

    fn target(&self) -> Target {
        Target {
            shared: self.shared.clone(),
            queue: self.queue.clone(),
            service: self.service.clone(),
        }
    }
}

impl Target {
    async fn attach(
        &self,
        link: Arc<Link>,
        redeclare: bool,
        window: u16,
    ) -> Result<Attached, TransportError> {
        if redeclare {
            self.redeclare(&link).await?;
        }
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| topology::error("opening a consumer channel", &e))?;
        let stream = consume(&channel, &self.queue, window).await?;
        Ok(Attached {
            link,
            channel,
            stream: Some(stream),
            qos: window,
        })
    }

    /// Declare the queue again (after the broker cancelled the consumer, e.g. because
    /// the queue was deleted).
    async fn redeclare(&self, link: &Link) -> Result<(), TransportError> {
        let (shared, connection) = (&self.shared, &link.connection);
        match &self.service {
            Some(service) => {
                let routes = super::shared::lock(&shared.registry)
                    .services
                    .get(service)
                    .cloned()
                    .unwrap_or_default();
                topology::declare_service(
                    connection,
                    &shared.names,
                    &shared.config,
                    service,
                    &routes,
                )
                .await
            }
            None => topology::declare_base(connection, &shared.names, &shared.config).await,
        }
    }

    /// Attach to the next live link, retrying; `None` once the transport is closed.
    async fn reattach(self, mut redeclare: bool, window: u16) -> Option<Attached> {
        loop {
            let link = self.shared.wait_link().await?;
            match self.attach(link, redeclare, window).await {
                Ok(attached) => return Some(attached),
                Err(e) => {
                    warn!("cannot consume {} yet: {e}; retrying", self.queue);
                    redeclare = true;
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                        () = self.shared.closed() => return None,
                    }
                }
            }
        }
    }
}

impl AmqpConsumer {
    fn delivery(
        &self,
        d: lapin::message::Delivery,
        channel: Channel,
        local_node: Option<Arc<str>>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Delivery {
        let payload = Bytes::from(d.data);
        let raw_headers = d.properties.headers().as_ref();
        let mut headers = headers::from_table(raw_headers);
        if self.service.is_some() {
            // A delayed message looks to its consumer as it was enqueued.
            headers::strip_delay_marks(&mut headers);
        } else if !headers.contains_key(DEAD_LETTER_REASON_HEADER) {
            // Dead-lettered by the broker (delivery limit), not by a consumer. The
            // latest death is the one that brought it here: a delayed message's
            // first death is its expiry in a delay queue.
            let reason = headers::last_death_reason(raw_headers)
                .or_else(|| headers.get("x-first-death-reason").cloned());
            if let Some(reason) = reason {
                headers.insert(
                    DEAD_LETTER_REASON_HEADER.to_owned(),
                    format!("broker: {reason}"),
                );
            }
        }
        let reply_to = d.properties.reply_to().clone();
        let expects_reply = reply_to.is_some();
        let origin = Origin::of(
            &self.shared,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            &d.properties,
        );
        let settle = AmqpSettle {
            shared: self.shared.clone(),
            channel,
            acker: d.acker,
            reply_to,
            correlation_id: d.properties.correlation_id().clone(),
            message_id: d.properties.message_id().clone(),
            expiration: d.properties.expiration().clone(),
            delivery_mode: *d.properties.delivery_mode(),
            origin: origin.clone(),
            local_node,
            payload: payload.clone(),
            headers: d.properties.headers().clone(),
            queue: self.queue.clone(),
            permit: std::sync::Mutex::new(Some(permit)),
        };
        Delivery::new(
            payload,
            headers,
            d.redelivered,
            expects_reply,
            Box::new(settle),
        )
        .with_origin(origin.publisher, origin.route)
    }
}

/// Consume `queue` on `channel` with a prefetch of `window`.
async fn consume(
    channel: &Channel,
    queue: &str,
    window: u16,
) -> Result<lapin::Consumer, TransportError> {
    let queue = topology::short("queue name", queue)?;
    channel
        .basic_qos(window, BasicQosOptions::default())
        .await
        .map_err(|e| topology::error("setting the prefetch", &e))?;
    channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology::error(&format!("consuming {queue}"), &e))
}

/// Cancel `stream` and give back what the broker sent it that was not handed out yet:
/// republished, so that it is neither counted as a delivery nor marked redelivered
/// (it never reached a handler).
async fn cancel_and_requeue(
    shared: &Shared,
    channel: &Channel,
    mut stream: lapin::Consumer,
    queue: &str,
) {
    let tag: ShortString = stream.tag();
    if let Err(e) = channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await
    {
        // A dead channel: the broker requeues everything by itself.
        debug!("cancelling the consumer of {queue}: {e}");
        return;
    }
    // After cancel-ok the stream yields what was buffered, then ends.
    while let Ok(Some(item)) = tokio::time::timeout(CANCEL_GRACE, stream.next()).await {
        if let Ok(d) = item {
            let properties = copy_properties(
                d.properties.reply_to().as_ref(),
                d.properties.correlation_id().as_ref(),
                d.properties.message_id().as_ref(),
                d.properties.expiration().as_ref(),
                *d.properties.delivery_mode(),
            );
            let headers = d.properties.headers().clone().unwrap_or_default();
            let origin = Origin::of(
                shared,
                d.exchange.as_str(),
                d.routing_key.as_str(),
                &d.properties,
            );
            republish_then_ack(
                shared, queue, &d.acker, &d.data, properties, headers, &origin,
            )
            .await;
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            if self.shared.is_closed() {
                self.attached = None;
                return None;
            }
            if self.paused {
                // Nothing to take until resumed (which needs `&mut self`, so this future
                // must be dropped first) or closed.
                self.shared.closed().await;
                return None;
            }
            let requalify = self.requalify;
            let live = self
                .attached
                .as_ref()
                .is_some_and(|a| !a.link.is_lost() && (a.stream.is_some() || requalify));
            if !live {
                self.attached = None;
                self.requalify = false;
                self.consuming = None;
                let (target, redeclare, window) =
                    (self.target(), self.redeclare, self.window.size());
                let attaching = self.attaching.get_or_insert_with(|| {
                    tokio::spawn(async move { target.reattach(redeclare, window).await })
                });
                let attached = attaching.await;
                self.attaching = None;
                self.redeclare = false;
                let attached = attached.ok().flatten()?;
                // The window changed while attaching: consume again with it.
                self.requalify = attached.qos != self.window.size();
                self.attached = Some(attached);
                continue;
            }
            if self.requalify {
                // Finish the change under way, if any (also after a dropped `next`).
                if let Some(consuming) = self.consuming.as_mut() {
                    let done = match consuming.await {
                        Ok(consumed) => consumed.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    self.consuming = None;
                    match done {
                        Ok(Some((stream, qos))) => {
                            if let Some(attached) = self.attached.as_mut() {
                                attached.stream = Some(stream);
                                attached.qos = qos;
                            }
                        }
                        Ok(None) => {}
                        // The channel or link died meanwhile: attach again.
                        Err(why) => {
                            debug!("consuming {} again: {why}", self.queue);
                            self.attached = None;
                            self.requalify = false;
                            continue;
                        }
                    }
                }
                let window = self.window.size();
                let Some(attached) = self.attached.as_mut() else {
                    self.requalify = false;
                    continue;
                };
                if attached.stream.is_some() && attached.qos == window {
                    self.requalify = false;
                } else {
                    let (channel, queue) = (attached.channel.clone(), self.queue.clone());
                    let old = attached.stream.take();
                    let next = if window >= attached.qos {
                        Some(window)
                    } else if old.is_some() {
                        // Narrower: stop the old consumer first ...
                        None
                    } else {
                        // ... then wait until every delivery taken under it is
                        // settled: a new broker consumer would otherwise be sent a
                        // whole window beside them.
                        tokio::select! {
                            idle = self.window.idle() => idle?,
                            () = self.shared.closed() => return None,
                        }
                        Some(window)
                    };
                    self.consuming = Some(tokio::spawn(change_consumer(
                        self.shared.clone(),
                        channel,
                        queue,
                        old,
                        next,
                    )));
                    continue;
                }
            }
            let permit = tokio::select! {
                p = self.window.acquire() => p?,
                () = self.shared.closed() => return None,
            };
            let event = {
                let attached = self.attached.as_mut()?;
                let link = attached.link.clone();
                let stream = attached.stream.as_mut()?;
                tokio::select! {
                    item = stream.next() => match item {
                        Some(Ok(d)) => Event::Delivery(Box::new(d)),
                        Some(Err(e)) => Event::Detach(format!("consumer failed: {e}")),
                        None => Event::Detach("consumer cancelled".into()),
                    },
                    () = link.lost() => Event::Detach("connection lost".into()),
                    () = self.shared.closed() => Event::Closed,
                }
            };
            match event {
                Event::Delivery(d) => {
                    let attached = self.attached.as_ref()?;
                    let (channel, node) =
                        (attached.channel.clone(), attached.link.reply_node.clone());
                    return Some(Ok(self.delivery(*d, channel, node, permit)));
                }
                Event::Closed => return None,
                Event::Detach(why) => {
                    let link_alive = self.attached.as_ref().is_some_and(|a| !a.link.is_lost());
                    self.attached = None;
                    if link_alive && !self.shared.is_closed() {
                        // The broker cancelled us on a live connection: the queue was
                        // deleted, or the channel closed on an error. Declare it again.
                        warn!(
                            "the consumer of {} ended ({why}); consuming again",
                            self.queue
                        );
                        self.redeclare = true;
                    } else {
                        debug!("the consumer of {} detached: {why}", self.queue);
                    }
                }
            }
        }
    }

    async fn pause(&mut self) -> Result<(), TransportError> {
        if self.paused {
            return Ok(());
        }
        self.finish_consuming().await;
        if let Some(attaching) = self.attaching.take() {
            // Aborting drops its channel with it: the broker requeues whatever the
            // new consumer got. `next` attaches again after `resume`.
            attaching.abort();
            self.attached = None;
        }
        self.requalify = false;
        self.paused = true;
        if let Some(attached) = self.attached.as_mut()
            && let Some(stream) = attached.stream.take()
        {
            cancel_and_requeue(&self.shared, &attached.channel, stream, &self.queue).await;
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), TransportError> {
        if !self.paused {
            return Ok(());
        }
        self.paused = false;
        self.requalify = false;
        if let Some(attached) = self.attached.as_mut()
            && !attached.link.is_lost()
            && attached.channel.status().connected()
        {
            let window = self.window.size();
            match consume(&attached.channel, &self.queue, window).await {
                Ok(stream) => {
                    attached.stream = Some(stream);
                    attached.qos = window;
                }
                Err(e) => debug!("resuming on the old channel of {}: {e}", self.queue),
            }
        }
        // Otherwise `next` attaches on a new channel.
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    async fn set_window(&mut self, window: u16) -> Result<u16, TransportError> {
        let before = self.window.size();
        let set = self.window.resize(window);
        if set == before || self.paused {
            // Paused: `resume` consumes with the new window.
            return Ok(set);
        }
        self.finish_consuming().await;
        if let Some(attached) = self.attached.as_mut() {
            if set < attached.qos
                && let Some(stream) = attached.stream.take()
            {
                // Stop the broker sending more under the old window now (what it
                // sent and `next` has not handed out goes back to the queue).
                cancel_and_requeue(&self.shared, &attached.channel, stream, &self.queue).await;
            }
            // `next` consumes again with the new window.
            self.requalify = true;
        }
        // Attaching or detached: `next` compares the window once attached.
        Ok(set)
    }

    fn window(&self) -> u16 {
        self.window.size()
    }
}

impl AmqpConsumer {
    /// Wait for a `basic.consume` under way and keep its consumer.
    async fn finish_consuming(&mut self) {
        let Some(consuming) = self.consuming.take() else {
            return;
        };
        if let (Ok(Ok(Some((stream, qos)))), Some(attached)) =
            (consuming.await, self.attached.as_mut())
        {
            attached.stream = Some(stream);
            attached.qos = qos;
        }
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        if let Some(attaching) = self.attaching.take() {
            attaching.abort();
        }
        if let Some(consuming) = self.consuming.take()
            && let Some(attached) = self.attached.as_ref()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (channel, queue) = (attached.channel.clone(), self.queue.clone());
            let shared = self.shared.clone();
            runtime.spawn(async move {
                if let Ok(Ok(Some((stream, _)))) = consuming.await {
                    cancel_and_requeue(&shared, &channel, stream, &queue).await;
                }
            });
        }
        // Dropping the lapin consumer cancels it; what it had buffered would wait on the
        // channel until its handed-out deliveries are settled. Requeue it now instead.
        let Some(attached) = self.attached.take() else {
            return;
        };
        let (Some(stream), Ok(runtime)) = (attached.stream, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (channel, queue, shared) = (attached.channel, self.queue.clone(), self.shared.clone());
        runtime.spawn(async move { cancel_and_requeue(&shared, &channel, stream, &queue).await });
    }
}
