//! Publishes N JSON messages `{"seq":i}`, each carrying W3C trace context, and prints one JSON
//! summary line `{"published":N,"failed":F}`.
//!
//! ```text
//! cargo run -p keel-messaging --example publish -- \
//!     --broker kafka://127.0.0.1:9092 --destination payments --count 100 [--key acct-1]
//! ```

use clap::Parser;
use keel_messaging::{Headers, OutgoingMessage, Publisher};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rand::Rng;

#[derive(Parser, Debug)]
#[command(about = "Publish N JSON messages {\"seq\":i} with broker confirmation")]
struct Args {
    /// kafka://host:port or amqp://user:pass@host:port/vhost
    #[arg(long)]
    broker: String,
    /// Kafka topic or RabbitMQ queue.
    #[arg(long)]
    destination: String,
    /// How many messages.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Message key (Kafka partitioning / ordering); none by default.
    #[arg(long)]
    key: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let publisher = Publisher::connect(&args.broker).await?;
    // Kafka: a topic with 4 partitions unless it exists; RabbitMQ: the durable queue.
    publisher.declare(&args.destination, 4).await?;
    let mut rng = rand::rng();
    // One trace for the run, one span per message: consumers continue it.
    let trace_id = TraceId::from_bytes(rng.random::<[u8; 16]>());
    let (mut published, mut failed) = (0u64, 0u64);
    let mut seq = 0;
    while seq < args.count {
        let end = (seq + 500).min(args.count);
        let batch = (seq..end)
            .map(|i| {
                let span = SpanContext::new(
                    trace_id,
                    SpanId::from_bytes(rng.random::<[u8; 8]>()),
                    TraceFlags::SAMPLED,
                    false,
                    TraceState::default(),
                );
                let cx = opentelemetry::Context::new().with_remote_span_context(span);
                let mut headers = Headers::new().with("content-type", "application/json");
                keel_core::propagation::inject(&cx, &mut headers);
                let mut m = OutgoingMessage::new(&args.destination, format!("{{\"seq\":{i}}}"));
                m.headers = headers;
                m.key = args.key.as_ref().map(|k| k.as_bytes().to_vec());
                m
            })
            .collect();
        for result in publisher.send_batch(batch).await {
            match result {
                Ok(_) => published += 1,
                Err(e) => {
                    failed += 1;
                    eprintln!("{e}");
                }
            }
        }
        seq = end;
    }
    publisher.close().await?;
    println!(
        "{}",
        serde_json::json!({"published": published, "failed": failed})
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
