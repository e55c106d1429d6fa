//! `bench-lapin-server` (configuration B): the broker-bound limit. Consumes a service
//! queue bound to a direct exchange (Keelson's topology, without its arguments), and
//! for each delivery spawns a task that publishes the body back to `reply_to` with
//! the correlation id, then acks.
//!
//! Prints `bench lapin server ready` when consuming; stops on SIGTERM or SIGINT.

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use std::process::ExitCode;

/// Raw lapin RPC server.
#[derive(Debug, Parser)]
struct Cli {
    /// Broker URL.
    #[arg(long)]
    amqp_url: String,
    /// Exchange to bind the queue to (declared direct and durable).
    #[arg(long)]
    exchange: String,
    /// Queue to consume (declared durable, classic).
    #[arg(long)]
    queue: String,
    /// Routing key binding the queue.
    #[arg(long)]
    routing_key: String,
    /// Most unacked deliveries (basic.qos).
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-lapin-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let connection = Connection::connect(&cli.amqp_url, ConnectionProperties::default())
        .await
        .context("cannot connect to the broker")?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            cli.exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the exchange")?;
    channel
        .queue_declare(
            cli.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the queue")?;
    channel
        .queue_bind(
            cli.queue.as_str().into(),
            cli.exchange.as_str().into(),
            cli.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding the queue")?;
    channel
        .basic_qos(cli.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            cli.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming the queue")?;
    println!("bench lapin server ready");
    let stop = keelson_bench::procs::terminated();
    tokio::pin!(stop);
    loop {
        let delivery = tokio::select! {
            d = deliveries.next() => d,
            () = &mut stop => break,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => anyhow::bail!("the consumer failed: {e}"),
            None => anyhow::bail!("the consumer ended"),
        };
        let channel = channel.clone();
        tokio::spawn(async move {
            let Some(reply_to) = delivery.properties.reply_to().clone() else {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                return;
            };
            let mut properties = BasicProperties::default();
            if let Some(id) = delivery.properties.correlation_id().clone() {
                properties = properties.with_correlation_id(id);
            }
            let published = channel
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await;
            if let Err(e) = published {
                eprintln!("bench-lapin-server: cannot publish a reply: {e}");
            }
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                eprintln!("bench-lapin-server: cannot ack: {e}");
            }
        });
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}
