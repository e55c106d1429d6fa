//! The in-memory transport: the mesh inside one process.
//!
//! It is a product feature, not a test double: it keeps the semantics of the AMQP
//! transport (routing by handler name to service queues, competing consumers,
//! prefetch, ack/requeue/reject, per-message expiry at the deadline, fanout) so that a
//! handler behaves the same embedded and distributed.
//!
//! Delayed background work ([`Transport::enqueue`] with a delay) waits in a timer task
//! of its own, then is routed as if published then: like a message the AMQP broker
//! dead-letters out of a delay queue to a route nobody binds, one whose route has no
//! queue at that moment is lost (with a warning in the log, which the broker cannot
//! give). Closing the transport drops the delayed messages still waiting.

use super::lease::{Fence, Lease, check_lease_name};
use super::memory_lease::{Leases, MemoryLease};
use super::window::Window;
use super::{
    Consumer, DEAD_LETTER_REASON_HEADER, Delivery, Headers, MAX_ENQUEUE_DELAY, Message, Outcome,
    Publisher, RequestError, ServiceSpec, Settle, Subscription, Transport, TransportError,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::warn;

const DEAD_LETTER_QUEUE: &str = "\u{0}dead-letter";

/// An in-process transport. Clones share the same queues.
#[derive(Debug, Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    replies: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    next_reply_id: AtomicU64,
    closed: AtomicBool,
    closed_notify: Notify,
    /// Flips to true on close (the lease candidates wait on it).
    closed_watch: watch::Sender<bool>,
    leases: Arc<Leases>,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Arc<Queue>>,
    routes: HashMap<String, Vec<Arc<Queue>>>,
    fanouts: HashMap<String, Vec<mpsc::UnboundedSender<Message>>>,
}

#[derive(Debug, Default)]
struct Queue {
    messages: Mutex<VecDeque<Queued>>,
    notify: Notify,
}

#[derive(Debug)]
struct Queued {
    message: Message,
    /// The route it was published on (`None` for a dead letter).
    route: Option<String>,
    expires_at: Option<Instant>,
    reply_to: Option<u64>,
    redelivered: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated
    // (every critical section is a single collection operation), so poisoning is
    // safe to ignore.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Queue {
    fn push_back(&self, q: Queued) {
        lock(&self.messages).push_back(q);
        self.notify.notify_one();
    }

    fn push_front(&self, q: Queued) {
        lock(&self.messages).push_front(q);
        self.notify.notify_one();
    }

    /// The first message that has not expired; expired ones are dropped, as a broker
    /// drops a message whose per-message TTL ran out.
    fn pop_live(&self) -> Option<Queued> {
        let now = Instant::now();
        let mut messages = lock(&self.messages);
        while let Some(q) = messages.pop_front() {
            if q.expires_at.is_none_or(|at| at > now) {
                // More may be waiting for other consumers: pass the wake-up on.
                if !messages.is_empty() {
                    self.notify.notify_one();
                }
                return Some(q);
            }
        }
        None
    }
}

impl MemoryTransport {
    /// A new, empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        lock(&self.inner.state).queues.get(name).cloned()
    }

    fn dead_letter_queue(&self) -> Arc<Queue> {
        lock(&self.inner.state)
            .queues
            .entry(DEAD_LETTER_QUEUE.to_owned())
            .or_default()
            .clone()
    }

    fn check_open(&self) -> Result<(), TransportError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(TransportError::Closed)
        } else {
            Ok(())
        }
    }

    /// Put background work on every queue bound to `route`; false when none is.
    fn put(&self, route: &str, message: Message) -> bool {
        let queues = lock(&self.inner.state)
            .routes
            .get(route)
            .cloned()
            .unwrap_or_default();
        for queue in &queues {
            queue.push_back(Queued {
                message: message.clone(),
                route: Some(route.to_owned()),
                expires_at: None,
                reply_to: None,
                redelivered: false,
            });
        }
        !queues.is_empty()
    }

    /// [`MemoryTransport::put`] after `delay`, unless the transport closes first.
    async fn put_after(self, route: String, message: Message, delay: Duration) {
        let inner = &self.inner;
        let closed = inner.closed_notify.notified();
        tokio::pin!(closed);
        // Registered before the flag is read: a close in between still wakes it.
        closed.as_mut().enable();
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = closed => return,
        }
        if !self.put(&route, message) {
            warn!(
                route,
                "a delayed message was lost: no queue is bound to its route"
            );
        }
    }

    fn consumer_for(&self, queue: Arc<Queue>, prefetch: u16) -> Box<dyn Consumer> {
        Box::new(MemoryConsumer {
            transport: self.clone(),
            queue,
            window: Window::new(prefetch),
            paused: false,
        })
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn declare_service(&self, service: &ServiceSpec) -> Result<(), TransportError> {
        self.check_open()?;
        let mut state = lock(&self.inner.state);
        let queue = state
            .queues
            .entry(service.name.clone())
            .or_default()
            .clone();
        for route in &service.routes {
            let bound = state.routes.entry(route.clone()).or_default();
            if !bound.iter().any(|q| Arc::ptr_eq(q, &queue)) {
                bound.push(queue.clone());
            }
        }
        Ok(())
    }

    async fn request(
        &self,
        route: &str,
        message: Message,
        deadline: Instant,
    ) -> Result<Bytes, RequestError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(RequestError::Unavailable("transport closed".into()));
        }
        let queues = lock(&self.inner.state)
            .routes
            .get(route)
            .cloned()
            .unwrap_or_default();
        if queues.is_empty() {
            return Err(RequestError::Unroutable(route.to_owned()));
        }
        let id = self.inner.next_reply_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.replies).insert(id, tx);
        // Removes the reply slot however this future ends (reply, timeout, or the
        // caller dropping it), so late replies find nothing and nothing leaks.
        let _slot = ReplySlot {
            inner: &self.inner,
            id,
        };
        for queue in &queues {
            queue.push_back(Queued {
                message: message.clone(),
                route: Some(route.to_owned()),
                expires_at: Some(deadline),
                reply_to: Some(id),
                redelivered: false,
            });
        }
        tokio::select! {
            reply = tokio::time::timeout_at(deadline, rx) => match reply {
                Ok(Ok(bytes)) => Ok(bytes),
                Ok(Err(_)) => Err(RequestError::Unavailable("transport closed".into())),
                Err(_) => Err(RequestError::Timeout),
            },
            () = self.inner.closed_notify.notified() => {
                Err(RequestError::Unavailable("transport closed".into()))
            }
        }
    }

    async fn enqueue(
        &self,
        route: &str,
        message: Message,
        delay: Duration,
    ) -> Result<(), RequestError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(RequestError::Unavailable("transport closed".into()));
        }
        let delay = delay.min(MAX_ENQUEUE_DELAY);
        if delay.is_zero() {
            return if self.put(route, message) {
                Ok(())
            } else {
                Err(RequestError::Unroutable(route.to_owned()))
            };
        }
        tokio::spawn(self.clone().put_after(route.to_owned(), message, delay));
        Ok(())
    }

    async fn consume(
        &self,
        service: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        self.check_open()?;
        let queue = self
            .queue(service)
            .ok_or_else(|| TransportError::UnknownService(service.to_owned()))?;
        Ok(self.consumer_for(queue, prefetch))
    }

    async fn broadcast(&self, channel: &str, message: Message) -> Result<(), TransportError> {
        self.check_open()?;
        let mut state = lock(&self.inner.state);
        if let Some(subscribers) = state.fanouts.get_mut(channel) {
            subscribers.retain(|s| s.send(message.clone()).is_ok());
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Box<dyn Subscription>, TransportError> {
        self.check_open()?;
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.state)
            .fanouts
            .entry(channel.to_owned())
            .or_default()
            .push(tx);
        Ok(Box::new(MemorySubscription { rx }))
    }

    async fn consume_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        self.check_open()?;
        Ok(self.consumer_for(self.dead_letter_queue(), prefetch))
    }

    async fn dead_letters_waiting(&self) -> Result<Option<u64>, TransportError> {
        self.check_open()?;
        let queue = self.dead_letter_queue();
        let waiting = lock(&queue.messages).len();
        Ok(Some(u64::try_from(waiting).unwrap_or(u64::MAX)))
    }

    async fn lease(&self, name: &str) -> Result<Box<dyn Lease>, TransportError> {
        self.check_open()?;
        check_lease_name(name).map_err(TransportError::Refused)?;
        let fence = Fence::new();
        let (id, grant) = self.inner.leases.join(name, &fence);
        Ok(Box::new(MemoryLease {
            leases: self.inner.leases.clone(),
            name: name.to_owned(),
            id: Some(id),
            grant,
            fence,
            announced: None,
            closed: self.inner.closed_watch.subscribe(),
        }))
    }

    fn publisher(&self) -> Publisher {
        Publisher::Local
    }

    fn is_ready(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire)
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.closed_notify.notify_waiters();
        self.inner.closed_watch.send_replace(true);
        let mut state = lock(&self.inner.state);
        for queue in state.queues.values() {
            queue.notify.notify_waiters();
        }
        // Dropping the senders ends every subscription.
        state.fanouts.clear();
    }
}

struct ReplySlot<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for ReplySlot<'_> {
    fn drop(&mut self) {
        lock(&self.inner.replies).remove(&self.id);
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    transport: MemoryTransport,
    queue: Arc<Queue>,
    window: Window,
    paused: bool,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        let inner = &self.transport.inner;
        if self.paused {
            // A paused consumer takes nothing until resumed (which needs `&mut self`,
            // so this future must be dropped first) or the transport closes.
            let closed = inner.closed_notify.notified();
            if inner.closed.load(Ordering::Acquire) {
                return None;
            }
            closed.await;
            return None;
        }
        let permit = tokio::select! {
            p = self.window.acquire() => p?,
            () = inner.closed_notify.notified() => return None,
        };
        loop {
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if inner.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(q) = self.queue.pop_live() {
                return Some(Ok(self.deliver(q, permit)));
            }
            notified.await;
        }
    }

    async fn pause(&mut self) -> Result<(), TransportError> {
        self.paused = true;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), TransportError> {
        self.paused = false;
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    async fn set_window(&mut self, window: u16) -> Result<u16, TransportError> {
        // Messages stay in the queue until a consumer with a free place pops one, so
        // the window alone keeps a consumer from taking more than it may.
        Ok(self.window.resize(window))
    }

    fn window(&self) -> u16 {
        self.window.size()
    }
}

impl MemoryConsumer {
    fn deliver(&self, q: Queued, permit: OwnedSemaphorePermit) -> Delivery {
        let expects_reply = q.reply_to.is_some();
        let payload = q.message.payload.clone();
        let headers = q.message.headers.clone();
        let redelivered = q.redelivered;
        let route = q.route.clone();
        Delivery::new(
            payload,
            headers,
            redelivered,
            expects_reply,
            Box::new(MemorySettle {
                transport: self.transport.clone(),
                queue: self.queue.clone(),
                reply_to: q.reply_to,
                queued: Mutex::new(Some(q)),
                permit: Mutex::new(Some(permit)),
            }),
        )
        // One process: whoever published it is this process, trusted by construction.
        .with_origin(Publisher::Local, route)
    }
}

#[derive(Debug)]
struct MemorySettle {
    transport: MemoryTransport,
    queue: Arc<Queue>,
    /// Who awaits the reply, kept apart from the message so that a delivery acked
    /// first is still answered ([`Delivery::ack_then_reply`]).
    reply_to: Option<u64>,
    /// The original message, kept until settled so it can be requeued.
    queued: Mutex<Option<Queued>>,
    /// Held until this delivery is settled: the prefetch slot it occupies.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl MemorySettle {
    fn requeue(&self) {
        if let Some(mut q) = lock(&self.queued).take() {
            q.redelivered = true;
            self.queue.push_front(q);
        }
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn reply(&self, payload: Bytes) -> Result<(), TransportError> {
        let waiting = self
            .reply_to
            .and_then(|id| lock(&self.transport.inner.replies).remove(&id));
        if let Some(tx) = waiting {
            // The requester may have given up just now; that is a late reply.
            let _ = tx.send(payload);
        }
        Ok(())
    }

    async fn settle(&self, outcome: Outcome) -> Result<(), TransportError> {
        match outcome {
            Outcome::Ack => {
                lock(&self.queued).take();
            }
            Outcome::Requeue => self.requeue(),
            Outcome::Republish { headers } => {
                if let Some(mut q) = lock(&self.queued).take() {
                    q.message.headers = headers;
                    q.redelivered = false;
                    self.queue.push_back(q);
                }
            }
            Outcome::Reject { reason } => {
                if let Some(q) = lock(&self.queued).take() {
                    let mut headers: Headers = q.message.headers;
                    headers.insert(DEAD_LETTER_REASON_HEADER.to_owned(), reason);
                    self.transport.dead_letter_queue().push_back(Queued {
                        message: Message {
                            payload: q.message.payload,
                            headers,
                        },
                        route: None,
                        expires_at: None,
                        reply_to: None,
                        redelivered: false,
                    });
                }
            }
        }
        // Settled: its prefetch slot is free (a delivery acked before its reply
        // holds none while it answers, as on a broker).
        lock(&self.permit).take();
        Ok(())
    }

    fn abandon(&self) {
        self.requeue();
    }
}

#[derive(Debug)]
struct MemorySubscription {
    rx: mpsc::UnboundedReceiver<Message>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}
