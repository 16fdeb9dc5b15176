//! Consumes JSON messages `{"seq":i}` and prints one JSON line per handled message:
//! `{"seq":…,"key":…,"traceparent":…,"attempt":…}`; exits after `--max` messages.
//! `--fail-every K` makes every K-th message fail once (to show the retry); a message that does
//! not decode goes to the dead-letter destination.
//!
//! ```text
//! cargo run -p keel-messaging --example consume -- \
//!     --broker kafka://127.0.0.1:9092 --destination payments --group ledger --max 100
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use keel_messaging::{Consumer, HandlerError, Json, Received, RetryPolicy, typed};
use tokio::sync::Notify;

#[derive(Parser, Debug)]
#[command(about = "Consume JSON messages {\"seq\":i} at least once")]
struct Args {
    /// kafka://host:port or amqp://user:pass@host:port/vhost
    #[arg(long)]
    broker: String,
    /// Kafka topic or RabbitMQ queue.
    #[arg(long)]
    destination: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Exit after handling this many messages (default: run until Ctrl-C).
    #[arg(long)]
    max: Option<u64>,
    /// Every K-th message fails once, then succeeds on retry.
    #[arg(long)]
    fail_every: Option<u64>,
    /// Extra librdkafka consumer property `key=value` (repeatable).
    #[arg(long = "kafka-option", value_parser = parse_kv)]
    kafka_options: Vec<(String, String)>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Seq {
    seq: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut builder = Consumer::builder(&args.broker, &args.destination, &args.group)?;
    for (k, v) in &args.kafka_options {
        builder = builder.kafka_option(k, v);
    }
    let consumer = builder
        .retry(RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        })
        .build()?;
    eprintln!("dead letters go to {}", consumer.dead_letter_destination());
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (max, fail_every) = (args.max, args.fail_every);
    let handler = {
        let (handled, done) = (handled.clone(), done.clone());
        typed(Json::<Seq>::new(), move |value: Seq, m: Received| {
            let (handled, done) = (handled.clone(), done.clone());
            async move {
                if let Some(k) = fail_every
                    && k > 0
                    && (value.seq + 1).is_multiple_of(k)
                    && m.attempt == 1
                {
                    return Err(HandlerError::retry(format!("seq {} fails once", value.seq)));
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "seq": value.seq,
                        "key": m.key_str(),
                        "traceparent": m.traceparent(),
                        "attempt": m.attempt,
                    })
                );
                let n = handled.fetch_add(1, Ordering::SeqCst) + 1;
                if max.is_some_and(|max| n >= max) {
                    done.notify_one();
                }
                Ok(())
            }
        })
    };
    let shutdown = async move {
        tokio::select! {
            () = done.notified() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    consumer.run(handler, shutdown).await?;
    Ok(())
}
