//! Keel messaging over Kafka and RabbitMQ.
//!
//! One publish / consume API over both brokers, built for money: a publish returns only once
//! the broker has durably accepted the message (Kafka `acks=all` delivery report from the
//! idempotent producer, RabbitMQ publisher confirm of a persistent message to a durable queue),
//! and a failed publish hands the message back ([`PublishError::into_message`]). Consumption is
//! at-least-once: a message is acknowledged / committed only after its handler returned `Ok` or
//! after it was moved, with its failure reason, to a dead-letter destination. Retries back off
//! with full jitter and never reorder a key.
//!
//! Every message carries an envelope in its headers: a message id, an idempotency key, a content
//! type (typed publishers) and W3C trace context; the consumer handles each message in a span that
//! continues the producer's trace. Nothing is sent twice: the idempotency key is the message id
//! unless the producer set one (only then is the `idempotency-key` header sent), and RabbitMQ
//! carries the message id and content type in its native `message_id` and `content_type`
//! properties. Each extra header is broker work per message (tansu stores each as a row).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keel_messaging::{Consumer, HandlerError, Headers, Publisher, Received};
//!
//! let broker = "kafka://127.0.0.1:9092"; // or "amqp://guest:guest@127.0.0.1:5672/%2f"
//! let publisher = Publisher::connect(broker).await?;
//! let receipt = publisher
//!     .publish("payments", Some(b"acct-1"), br#"{"amount_minor":1250}"#.to_vec(), Headers::new())
//!     .await
//!     .map_err(|e| {
//!         let unconfirmed = e.message().clone(); // handed back: retry it, park it, report it
//!         format!("{e}; message {:?} not confirmed", unconfirmed.message_id())
//!     })?;
//! println!("confirmed at {:?}/{:?}", receipt.partition, receipt.offset);
//!
//! let consumer = Consumer::builder(broker, "payments", "ledger")?.build()?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! consumer
//!     .run(
//!         |m: Received| async move {
//!             println!("{:?} attempt {}", m.key_str(), m.attempt);
//!             Ok::<(), HandlerError>(())
//!         },
//!         shutdown,
//!     )
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Features
//! - `kafka`: the Kafka adapter on rdkafka (builds the vendored librdkafka; needs a C compiler).
//! - `amqp`: the RabbitMQ adapter on lapin.
//!
//! Without either, the API compiles but every broker URL is refused at build time of the
//! publisher / consumer.

mod broker;
pub mod codec;
mod consumer;
mod error;
pub mod headers;
mod message;
mod publisher;
mod retry;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "kafka")]
mod kafka_native;

pub use broker::{Broker, KAFKA_BROKER_DEFAULT_REPLICATION};
pub use codec::{Codec, Json, Protobuf, TypedPublisher, typed};
pub use consumer::{Consumer, ConsumerBuilder, Handler};
pub use error::{BoxError, Error, HandlerError, PublishError, PublishErrorKind};
pub use headers::Headers;
pub use message::{OutgoingMessage, Receipt, Received};
pub use publisher::{Publisher, PublisherBuilder};
pub use retry::RetryPolicy;
