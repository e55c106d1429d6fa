//! `keelson dlq`: the operator's view of the dead-letter queue, and a way to re-drive
//! a dead letter once what killed it is fixed.
//!
//! Dead letters are read with the same [`Transport::consume_dead_letters`] consumer
//! any peer would use: every message is taken (held unsettled, so none comes twice),
//! the queue is taken as read once no message came for `--wait-ms`, intake is paused,
//! and every message but the ones the command removes is given back. Giving back is a
//! requeue (`basic.nack`, the message unchanged) except on quorum queues, where a
//! requeue counts toward the delivery limit that RabbitMQ 4 sets on every quorum
//! queue by default (and past it the dead letter would be dropped, the dead-letter
//! queue having no dead-letter exchange of its own): there it is handed back as a
//! copy, which the broker does not count.
//!
//! Another process's in-memory transport cannot be reached: on `kind = "memory"` the
//! queue this command sees is its own, and empty.

mod letter;

use letter::json_text;
pub use letter::{DeadLetter, FirstDeath, RequestView, render_one, render_table};

use crate::settings::KeelsonConfig;
use keelson_protocol::transport::{
    Consumer, DEAD_LETTER_REASON_HEADER, DELIVERIES_HEADER, Delivery, Message, QueueType,
    RequestError, TransportError,
};
use keelson_protocol::{
    ProtocolVersion, Reply, ReplyStatus, Request, Transport, TransportConfig, decode, encode,
};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// At most this many dead letters are held at once (the consumer's prefetch).
const MAX_HELD: u16 = u16::MAX;

/// `keelson dlq`: list, show, replay or purge dead letters.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub action: DlqAction,
    /// How long to wait for one more dead letter before taking the queue as read, in
    /// milliseconds.
    #[arg(long, default_value_t = 1000, global = true)]
    pub wait_ms: u64,
}

/// What to do with the dead-letter queue.
#[derive(Debug, clap::Subcommand)]
pub enum DlqAction {
    /// List every dead letter, removing none: id, handler, user, deliveries, reason.
    List {
        /// Print JSON (every field, headers and body included) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one dead letter in full: headers, envelope fields and body.
    Show {
        /// The dead letter's id (the request id, or a hash of an undecodable message).
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish a dead request again to its handler and print the reply.
    ///
    /// The request keeps its id, user and idempotency key (effects it already made are
    /// answered from their record, not made twice) and gets a fresh deadline and no
    /// delivery count. The dead letter is removed once the request is answered; it
    /// stays when the route is unroutable, no reply comes in time, or the reply says
    /// the request was not run and may be later (overloaded, timeout, unknown handler,
    /// key busy, deadline beyond the server's limit). Exit status 2 when the reply is
    /// not `ok`.
    Replay {
        /// The dead letter's id.
        id: String,
        /// The request's new deadline, from now, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
    /// Remove every dead letter for good (needs --yes).
    Purge {
        /// Yes, remove them all.
        #[arg(long)]
        yes: bool,
    },
}

/// Why a `keelson dlq` command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// The transport could not be built or the queue read.
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: TransportError,
    },
    /// No dead letter has this id.
    #[error("no dead letter has the id `{0}` (see `keelson dlq list`)")]
    UnknownId(String),
    /// None of the first [`MAX_HELD`] dead letters has this id.
    #[error("none of the first {MAX_HELD} dead letters has the id `{0}`; more wait behind them")]
    UnknownIdAmongFirst(String),
    /// The dead letter is not a request this build can read.
    #[error("dead letter `{id}` cannot be replayed: {reason}")]
    NotARequest { id: String, reason: String },
    /// The request could not be re-driven; the dead letter stays.
    #[error("dead letter `{id}` was not replayed: {reason}; it stays in the dead-letter queue")]
    NotReplayed { id: String, reason: String },
    /// `purge` without `--yes`.
    #[error(
        "refusing to purge without --yes: it removes every dead letter for good (look first with `keelson dlq list`)"
    )]
    NotConfirmed,
    /// Output could not be written.
    #[error("cannot print: {0}")]
    Output(#[from] serde_json::Error),
}

/// How held dead letters go back to the queue (see the module doc).
#[derive(Debug, Clone, Copy)]
enum GiveBack {
    Requeue,
    HandBack,
}

impl GiveBack {
    async fn give(self, d: Delivery) {
        let result = match self {
            GiveBack::Requeue => d.requeue().await,
            GiveBack::HandBack => d.hand_back().await,
        };
        // The broker requeues it anyway when the connection closes.
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not give a dead letter back; the broker will");
        }
    }
}

/// The dead-letter queue, every message of it held.
struct Held {
    transport: Arc<dyn Transport>,
    consumer: Box<dyn Consumer>,
    letters: Vec<Delivery>,
    give_back: GiveBack,
    /// As many as [`MAX_HELD`] were taken: there may be more.
    full: bool,
}

impl Held {
    /// Connect and take every dead letter (see the module doc).
    async fn take(config: &KeelsonConfig, wait: Duration) -> Result<Self, DlqError> {
        let node = format!("dlq-{}", std::process::id());
        let transport =
            config
                .transport
                .build(&node)
                .await
                .map_err(|source| DlqError::Transport {
                    what: format!("cannot connect the {} transport", config.transport.kind()),
                    source,
                })?;
        let give_back = match &config.transport {
            TransportConfig::Amqp(amqp) if amqp.queue_type == QueueType::Quorum => {
                GiveBack::HandBack
            }
            _ => GiveBack::Requeue,
        };
        let read_error = |source| DlqError::Transport {
            what: "cannot read the dead-letter queue".to_owned(),
            source,
        };
        let mut consumer = match transport.consume_dead_letters(MAX_HELD).await {
            Ok(c) => c,
            Err(e) => {
                transport.close().await;
                return Err(read_error(e));
            }
        };
        let mut letters = Vec::new();
        let mut failed = None;
        while letters.len() < usize::from(MAX_HELD) {
            match tokio::time::timeout(wait, consumer.next()).await {
                Ok(Some(Ok(d))) => letters.push(d),
                Ok(Some(Err(e))) => {
                    failed = Some(e);
                    break;
                }
                Ok(None) => {
                    failed = Some(TransportError::Closed);
                    break;
                }
                // Quiet for `wait`: everything there was is held.
                Err(_) => break,
            }
        }
        // No more intake: what is given back must not come straight back to us.
        if let Err(e) = consumer.pause().await {
            failed.get_or_insert(e);
        }
        let full = letters.len() >= usize::from(MAX_HELD);
        let held = Self {
            transport,
            consumer,
            letters,
            give_back,
            full,
        };
        match failed {
            None => Ok(held),
            Some(e) => {
                held.close().await;
                Err(read_error(e))
            }
        }
    }

    fn read(&self) -> Vec<DeadLetter> {
        self.letters
            .iter()
            .map(|d| DeadLetter::read(&d.payload, &d.headers))
            .collect()
    }

    /// Where the first held dead letter with this id is.
    fn position(&self, id: &str) -> Result<usize, DlqError> {
        let at = self
            .letters
            .iter()
            .position(|d| DeadLetter::read(&d.payload, &d.headers).id == id);
        match at {
            Some(at) => Ok(at),
            None if self.full => Err(DlqError::UnknownIdAmongFirst(id.to_owned())),
            None => Err(DlqError::UnknownId(id.to_owned())),
        }
    }

    /// Give every held dead letter back, and disconnect.
    async fn close(self) {
        for d in self.letters {
            self.give_back.give(d).await;
        }
        drop(self.consumer);
        self.transport.close().await;
    }
}

/// Run `keelson dlq`; prints its output, and returns the exit status.
pub async fn run(config: &KeelsonConfig, args: DlqArgs) -> Result<ExitCode, DlqError> {
    if let DlqAction::Purge { yes: false } = args.action {
        return Err(DlqError::NotConfirmed);
    }
    if matches!(config.transport, TransportConfig::Memory(_)) {
        eprintln!(
            "keelson dlq: the memory transport's queues live in the process that made them; this command sees only its own, empty one"
        );
    }
    let wait = Duration::from_millis(args.wait_ms.max(1));
    let mut held = Held::take(config, wait).await?;
    match args.action {
        DlqAction::List { json } => {
            let letters = held.read();
            let full = held.full;
            held.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print!("{}", render_table(&letters));
            }
            if full {
                eprintln!("keelson dlq: only the first {MAX_HELD} dead letters are listed");
            }
        }
        DlqAction::Show { id, json } => {
            let letter = held
                .position(&id)
                .map(|at| DeadLetter::read(&held.letters[at].payload, &held.letters[at].headers));
            held.close().await;
            let letter = letter?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            } else {
                print!("{}", render_one(&letter));
            }
        }
        DlqAction::Replay { id, timeout_ms } => {
            let target = match held.position(&id) {
                Ok(at) => held.letters.remove(at),
                Err(e) => {
                    held.close().await;
                    return Err(e);
                }
            };
            let Held {
                transport,
                consumer,
                letters,
                give_back,
                ..
            } = held;
            // Only the one being replayed stays held while its reply is awaited.
            for d in letters {
                give_back.give(d).await;
            }
            let outcome = replay(transport.as_ref(), &target, timeout_ms).await;
            match &outcome {
                Ok(reply) if removes(reply) => {
                    if let Err(e) = target.ack().await {
                        tracing::warn!(error = %e, "could not remove the replayed dead letter");
                    }
                }
                _ => give_back.give(target).await,
            }
            drop(consumer);
            transport.close().await;
            let reply = outcome?;
            print!("{}", render_reply(&id, &reply));
            if !matches!(&reply, Answer::Reply(r) if r.status == ReplyStatus::Ok) {
                return Ok(ExitCode::from(2));
            }
        }
        DlqAction::Purge { .. } => {
            let mut purged = 0_usize;
            loop {
                let full = held.full;
                for d in std::mem::take(&mut held.letters) {
                    match d.ack().await {
                        Ok(()) => purged += 1,
                        Err(e) => tracing::warn!(error = %e, "could not remove a dead letter"),
                    }
                }
                held.close().await;
                if !full {
                    break;
                }
                held = Held::take(config, wait).await?;
            }
            println!("purged {purged} dead letters");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a replayed request got back.
#[derive(Debug)]
enum Answer {
    Reply(Reply),
    /// A reply this build cannot read (a peer of another version answered).
    Unreadable {
        size: usize,
        why: String,
    },
}

/// Whether the dead letter goes once its replay got `answer`: not when the reply
/// says the request was not run and a later replay may run it (the server was
/// overloaded or out of time, its handler missing, its key busy or exhausted, the
/// deadline beyond the server's limit).
fn removes(answer: &Answer) -> bool {
    let Answer::Reply(r) = answer else {
        return true;
    };
    let code = r.error.as_ref().map(|e| e.code.as_str());
    let retryable = matches!(
        r.status,
        ReplyStatus::Overloaded
            | ReplyStatus::Timeout
            | ReplyStatus::TooManyRequests
            | ReplyStatus::NotFound
    ) || matches!(code, Some("deadline_out_of_range" | "request_in_progress"));
    !retryable
}

fn render_reply(id: &str, answer: &Answer) -> String {
    let kept = if removes(answer) {
        "removed from the dead-letter queue"
    } else {
        "kept in the dead-letter queue"
    };
    match answer {
        Answer::Reply(r) => {
            let status = serde_json::to_value(r.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", r.status));
            let mut out = format!(
                "replayed {id}: {status} (served by {}; {kept})\n",
                r.served_by
            );
            if let Some(e) = &r.error {
                out.push_str(&format!("error: {}: {}\n", e.code, e.message));
            }
            if !r.body.is_empty() {
                let body = json_text(&r.body)
                    .unwrap_or_else(|| format!("({} bytes, not UTF-8 JSON)", r.body.len()));
                out.push_str(&format!("{body}\n"));
            }
            out
        }
        Answer::Unreadable { size, why } => {
            format!(
                "replayed {id}: a reply of {size} bytes this build cannot read ({why}; {kept})\n"
            )
        }
    }
}

/// Publish the dead request `d` again to its handler, with a deadline `timeout_ms`
/// from now and no delivery count, and wait for the answer.
async fn replay(
    transport: &dyn Transport,
    d: &Delivery,
    timeout_ms: u64,
) -> Result<Answer, DlqError> {
    let letter = DeadLetter::read(&d.payload, &d.headers);
    let id = letter.id.clone();
    // A request refused for where it came from (a forged user, a route that does not
    // match its handler) must not come back under the operator's own trusted name.
    if let Some(reason) = letter.reason.as_deref().filter(|r| {
        [
            keelson_logic_server::ROUTE_MISMATCH,
            keelson_logic_server::UNTRUSTED_PUBLISHER,
        ]
        .iter()
        .any(|refused| r.starts_with(refused))
    }) {
        return Err(DlqError::NotARequest {
            id,
            reason: format!(
                "it was refused for its origin ({reason}); replaying it would vouch for it"
            ),
        });
    }
    let mut request = decode::<Request>(&d.payload).map_err(|e| DlqError::NotARequest {
        id: id.clone(),
        reason: format!("undecodable request: {e}"),
    })?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    request.v = ProtocolVersion::CURRENT;
    request.deadline_unix_ms = now_ms.saturating_add(timeout_ms);
    // An operator's retry: the same id and idempotency key, so that effects it had
    // already made are answered from their record rather than made twice.
    request.attempt = request.attempt.saturating_add(1);
    let payload = encode(&request).map_err(|e| DlqError::NotARequest {
        id: id.clone(),
        reason: e.to_string(),
    })?;
    // The dead letter's own marks (reason, count, the broker's death records) stay
    // behind; propagated headers (`traceparent`, ...) go along.
    let headers = d
        .headers
        .iter()
        .filter(|(k, _)| {
            !(k.as_str() == DEAD_LETTER_REASON_HEADER
                || k.as_str() == DELIVERIES_HEADER
                || k.starts_with("x-first-death-")
                || k.starts_with("x-last-death-")
                || k.as_str() == "x-delivery-count")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let not_replayed = |reason: String| DlqError::NotReplayed {
        id: id.clone(),
        reason,
    };
    match transport
        .request(
            &request.handler,
            Message {
                payload: payload.into(),
                headers,
            },
            deadline,
        )
        .await
    {
        Ok(bytes) => Ok(match decode::<Reply>(&bytes) {
            Ok(reply) => Answer::Reply(reply),
            Err(e) => Answer::Unreadable {
                size: bytes.len(),
                why: e.to_string(),
            },
        }),
        Err(RequestError::Unroutable(route)) => Err(not_replayed(format!(
            "no queue is bound for the route `{route}` (no logic server serves that handler)"
        ))),
        Err(RequestError::Timeout) => Err(not_replayed(format!(
            "no reply within {timeout_ms} ms (the request may still run before its deadline)"
        ))),
        Err(e) => Err(not_replayed(e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::letter::{truncate, utc};
    use super::*;
    use std::collections::BTreeMap;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_dead_request_is_read_with_its_reason_count_and_fields() {
        let mut request = Request::new(
            "r-1",
            "counter.increment",
            b"{\"by\":2}".to_vec(),
            86_400_000,
        );
        request.user = Some("alice".to_owned());
        let payload = encode(&request).unwrap();
        let d = DeadLetter::read(
            &payload,
            &headers(&[
                (DEAD_LETTER_REASON_HEADER, "poison"),
                (DELIVERIES_HEADER, "6"),
            ]),
        );
        assert_eq!(d.id, "r-1");
        assert_eq!(d.reason.as_deref(), Some("poison"));
        assert_eq!(d.deliveries, 6);
        assert_eq!(d.first_death, None);
        let r = d.request.as_ref().unwrap();
        assert_eq!(r.handler, "counter.increment");
        assert_eq!(r.user.as_deref(), Some("alice"));
        assert_eq!(r.body.as_deref(), Some("{\"by\":2}"));
        assert_eq!(r.deadline, "1970-01-02T00:00:00.000Z");
        let table = render_table(std::slice::from_ref(&d));
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row, ["r-1", "counter.increment", "alice", "6", "poison"]);
        assert!(render_one(&d).contains("user            alice\n"));
    }

    #[test]
    fn garbage_gets_a_stable_id_from_its_bytes_and_the_broker_reason() {
        let d = DeadLetter::read(
            b"\xc1garbage",
            &headers(&[
                ("x-first-death-reason", "delivery_limit"),
                ("x-first-death-queue", "q"),
            ]),
        );
        assert_eq!(d.id.len(), 12);
        assert_eq!(d.id, DeadLetter::read(b"\xc1garbage", &BTreeMap::new()).id);
        assert_ne!(d.id, DeadLetter::read(b"\xc1garbagf", &BTreeMap::new()).id);
        assert!(d.undecodable.is_some() && d.request.is_none());
        assert_eq!(
            d.first_death.as_ref().unwrap().reason.as_deref(),
            Some("delivery_limit")
        );
        assert_eq!(d.deliveries, 1);
        let table = render_table(&[d]);
        assert!(table.lines().nth(1).unwrap().contains(" ?  "), "{table}");
        assert_eq!(render_table(&[]), "(no dead letters)\n");
    }

    #[test]
    fn a_replay_answered_without_running_keeps_the_dead_letter() {
        let reply =
            |status, code: &str| Answer::Reply(Reply::error("r-1", status, code, "why", "logic-1"));
        assert!(removes(&Answer::Reply(Reply::ok(
            "r-1",
            b"{}".to_vec(),
            "logic-1"
        ))));
        assert!(removes(&reply(ReplyStatus::HandlerError, "delivery_limit")));
        assert!(removes(&reply(ReplyStatus::BadRequest, "bad_request")));
        assert!(!removes(&reply(ReplyStatus::Overloaded, "not_replicated")));
        assert!(!removes(&reply(ReplyStatus::Timeout, "deadline_passed")));
        assert!(!removes(&reply(
            ReplyStatus::BadRequest,
            "deadline_out_of_range"
        )));
        assert!(!removes(&reply(
            ReplyStatus::Conflict,
            "request_in_progress"
        )));
        let kept = render_reply("r-1", &reply(ReplyStatus::Overloaded, "not_replicated"));
        assert!(
            kept.starts_with("replayed r-1: overloaded (served by logic-1; kept"),
            "{kept}"
        );
    }

    #[test]
    fn dates_reasons_and_bodies_are_shown_safely() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
        assert_eq!(truncate("ééé", 3), "ééé");
        assert_eq!(truncate("éééé", 3), "éé…");
        assert_eq!(json_text(b"{\"a\":1}").as_deref(), Some("{\"a\":1}"));
        assert_eq!(json_text(b"not json"), None);
        assert_eq!(json_text(b"\xff"), None);
    }
}
