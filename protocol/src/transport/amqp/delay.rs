//! Delayed messages on a broker without the delayed-message plugin: per-level TTL
//! queues that dead-letter to the request exchange.
//!
//! A delayed message is published to the headers exchange `{ns}.delay` with routing
//! key = its route, the header [`DELAY_HEADER`] = its level, and `expiration` = the
//! exact delay in milliseconds. The exchange routes it, by that header alone, to the
//! delay queue `{ns}.delay.{level}`, which nobody consumes; when the message expires
//! there, the broker dead-letters it to `{ns}.requests` with its own routing key (the
//! queue sets no `x-dead-letter-routing-key`), so it lands on the queue bound to its
//! route as if it had been published there, `user_id` included (checked on RabbitMQ
//! 3.10.8: `protocol/TOPOLOGY.md`, "Background work").
//!
//! Why levels: a queue expires messages only at its head, so a short delay behind a
//! longer one waits for it. Level `L` holds delays from `L` to `2L` seconds, so a
//! message is late by less than `2L - delay`: at most `L`, less than its own delay.
//! Why a headers exchange rather than publishing straight into a delay queue: through
//! the default exchange the routing key would be the delay queue's name, and the
//! dead-lettered message would carry that instead of its route.

use super::super::TransportError;
use super::config::AmqpConfig;
use super::topology::{Entity, Names, durable, durable_exchange, error, long, short};
use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

/// The levels, in seconds: level `L` holds delays from `L` (0 for the first) to `2L`.
pub(crate) const LEVELS_S: [u32; 13] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The header the delay exchange routes by: the message's level, in seconds (decimal).
pub(crate) const DELAY_HEADER: &str = "x-keelson-delay";

/// The level whose queue holds `delay`: the largest not above it, the first for a
/// delay under a second.
pub(crate) fn level_of(delay: Duration) -> u32 {
    let secs = delay.as_secs();
    LEVELS_S
        .iter()
        .rev()
        .copied()
        .find(|&level| u64::from(level) <= secs)
        .unwrap_or(1)
}

/// The arguments of a delay queue; identical on every declaration, or the broker
/// refuses it.
fn queue_args(names: &Names, config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long(config.queue_type.as_str()));
    // No `x-dead-letter-routing-key`: the broker keeps the message's own, its route.
    args.insert(
        "x-dead-letter-exchange".into(),
        long(&names.requests_exchange()),
    );
    if let Some(ms) = config.queue_expires_ms {
        let ms = i64::try_from(ms).unwrap_or(i64::MAX).max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

/// The delay exchange and queues, for a passive check that they exist.
pub(crate) fn entities(names: &Names) -> Result<Vec<Entity>, TransportError> {
    let mut entities = vec![Entity::Exchange(short(
        "namespace",
        names.delay_exchange(),
    )?)];
    for level in LEVELS_S {
        entities.push(Entity::Queue(short("namespace", names.delay_queue(level))?));
    }
    Ok(entities)
}

/// Declare the delay exchange and queues and their bindings on `ch`, and bind the
/// dead-letter queue for delayed messages the broker dead-letters later.
pub(crate) async fn declare(
    ch: &Channel,
    names: &Names,
    config: &AmqpConfig,
) -> Result<(), TransportError> {
    let exchange = short("namespace", names.delay_exchange())?;
    ch.exchange_declare(
        exchange.clone(),
        ExchangeKind::Headers,
        durable_exchange(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| error("declaring the delay exchange", &e))?;
    let dlq = short("namespace", names.dead_letter_queue())?;
    let broker_dlx = short("namespace", names.broker_dead_letter_exchange())?;
    for level in LEVELS_S {
        let queue = short("namespace", names.delay_queue(level))?;
        ch.queue_declare(queue.clone(), durable(), queue_args(names, config))
            .await
            .map_err(|e| {
                error(
                    &format!("declaring delay queue {queue} (exists with other arguments?)"),
                    &e,
                )
            })?;
        // Plain `all` ignores `x-` headers: with it every binding would match.
        let mut args = FieldTable::default();
        args.insert("x-match".into(), long("all-with-x"));
        args.insert(DELAY_HEADER.into(), long(&level.to_string()));
        ch.queue_bind(
            queue.clone(),
            exchange.clone(),
            "".into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .map_err(|e| error(&format!("binding delay queue {queue}"), &e))?;
        // A message keeps its first death's headers for good: one that expired here
        // and is dead-lettered again by a service queue (over its delivery limit)
        // still says `x-first-death-reason = expired` and would match neither binding
        // of `declare_base`.
        let mut args = FieldTable::default();
        args.insert("x-match".into(), long("all-with-x"));
        args.insert("x-first-death-reason".into(), long("expired"));
        args.insert("x-first-death-queue".into(), long(queue.as_str()));
        ch.queue_bind(
            dlq.clone(),
            broker_dlx.clone(),
            "".into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .map_err(|e| error("binding the dead-letter queue", &e))?;
    }
    Ok(())
}

/// The names `delete_topology` removes besides the base: the delay queues, then
/// the delay exchange.
pub(crate) fn names_to_delete(names: &Names) -> (Vec<String>, String) {
    (
        LEVELS_S.iter().map(|&l| names.delay_queue(l)).collect(),
        names.delay_exchange(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_delay_goes_to_the_level_below_it() {
        let ms = Duration::from_millis;
        assert_eq!(level_of(ms(1)), 1);
        assert_eq!(level_of(ms(999)), 1);
        assert_eq!(level_of(ms(1_999)), 1);
        assert_eq!(level_of(ms(2_000)), 2);
        assert_eq!(level_of(ms(3_999)), 2);
        assert_eq!(level_of(ms(4_000)), 4);
        assert_eq!(level_of(Duration::from_secs(3_600)), 2048);
        assert_eq!(level_of(Duration::from_secs(4_096)), 4096);
        assert_eq!(level_of(Duration::from_secs(7_200)), 4096);
    }

    #[test]
    fn levels_double_and_hold_the_longest_delay() {
        for pair in LEVELS_S.windows(2) {
            assert_eq!(pair[1], 2 * pair[0]);
        }
        let top = u64::from(LEVELS_S[LEVELS_S.len() - 1]);
        assert!(crate::transport::MAX_ENQUEUE_DELAY < Duration::from_secs(2 * top));
    }
}
