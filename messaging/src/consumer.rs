//! At-least-once consumption, one API over both brokers.

use std::future::Future;
use std::time::Duration;

use crate::broker::{Broker, KAFKA_BROKER_DEFAULT_REPLICATION, check_replication};
use crate::error::{Error, HandlerError};
use crate::message::Received;
use crate::retry::RetryPolicy;

/// Handles one message. Return `Ok` only once the message's effect is durable: that is when
/// Keel acknowledges (RabbitMQ) or commits (Kafka) it.
///
/// Closures `Fn(Received) -> impl Future<Output = Result<(), HandlerError>>` are handlers.
/// A message may be delivered more than once (at-least-once): de-duplicate on
/// [`Received::idempotency_key`].
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`; [`HandlerError::retry`] to retry it, [`HandlerError::permanent`] to
    /// dead-letter it at once. A handler that panics fails permanently: the message is
    /// dead-lettered with the reason `handler panicked: <message>`, and consumption goes on.
    fn handle(&self, message: Received) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(&self, message: Received) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message)
    }
}

/// How a [`Consumer`] is set up. Build with [`Consumer::builder`].
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    pub(crate) broker: Broker,
    pub(crate) destination: String,
    pub(crate) group: String,
    pub(crate) retry: RetryPolicy,
    pub(crate) prefetch: u16,
    pub(crate) lanes: usize,
    pub(crate) connection_name: Option<String>,
    pub(crate) reconnect_backoff: Duration,
    pub(crate) revoke_drain_timeout: Duration,
    pub(crate) kafka_options: Vec<(String, String)>,
    pub(crate) kafka_replication: i32,
}

impl ConsumerBuilder {
    /// Retries and backoff before a message is dead-lettered (default: 5 attempts, 100 ms to
    /// 10 s, full jitter).
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// RabbitMQ: unacknowledged messages the broker may send ahead (default 64).
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// RabbitMQ: messages handled concurrently, in lanes by key so one key stays in order
    /// (default 8).
    #[must_use]
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// The connection name the broker shows (RabbitMQ `connection_name`, Kafka `client.id`).
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// RabbitMQ: the first pause before reconnecting (default 200 ms, at least 50 ms), doubling
    /// to 30 s, after a failed connect or a session that ended before it settled a delivery (a
    /// refused `basic.consume`, say, from another client's exclusive consumer). A session that
    /// settled one, or lived 30 s, is followed by an immediate reconnect and resets the pause.
    #[must_use]
    pub fn reconnect_backoff(mut self, delay: Duration) -> Self {
        self.reconnect_backoff = delay;
        self
    }

    /// Kafka: how long a rebalance waits for in-flight handlers of revoked partitions before
    /// committing what is done (default 10 s). What is not done by then is redelivered.
    #[must_use]
    pub fn revoke_drain_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_drain_timeout = timeout;
        self
    }

    /// A librdkafka consumer property (e.g. `session.timeout.ms`). Keel's commit settings
    /// (`enable.auto.offset.store=false`) cannot be overridden. Every property that is not
    /// consumer-only (security, SASL / TLS, timeouts…) applies to the consumer's dead-letter
    /// producer and admin client too.
    #[must_use]
    pub fn kafka_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_options.push((key.into(), value.into()));
        self
    }

    /// Kafka: the replication factor of the dead-letter topic, when Keel creates it (default
    /// [`KAFKA_BROKER_DEFAULT_REPLICATION`]: the broker's `default.replication.factor`, which
    /// needs Kafka 2.4 or later). Set it explicitly on older brokers, or to ask for more
    /// replicas than the broker's default.
    #[must_use]
    pub fn kafka_replication_factor(mut self, factor: i32) -> Self {
        self.kafka_replication = factor;
        self
    }

    /// The consumer. Nothing connects until [`Consumer::run`].
    ///
    /// # Errors
    /// When the broker's feature is not built in, or the Kafka replication factor is neither -1
    /// nor at least 1.
    pub fn build(self) -> Result<Consumer, Error> {
        check_replication(self.kafka_replication)?;
        match &self.broker {
            #[cfg(feature = "kafka")]
            Broker::Kafka { .. } => Ok(Consumer { config: self }),
            #[cfg(feature = "amqp")]
            Broker::Amqp { .. } => Ok(Consumer { config: self }),
            #[allow(unreachable_patterns)]
            other => Err(other.not_built(match other {
                Broker::Kafka { .. } => "kafka",
                Broker::Amqp { .. } => "amqp",
            })),
        }
    }
}

/// Consumes a destination at least once: a message is acknowledged / committed only after its
/// handler returned `Ok`, or after it was moved to the dead-letter destination.
///
/// - Retryable failures are retried in place with backoff (so a key is never reordered), then
///   dead-lettered after [`RetryPolicy::max_attempts`]; permanent failures are dead-lettered at
///   once. Dead letters carry the original destination, the attempt count and the error text in
///   headers ([`crate::headers`]); consumption continues.
/// - Kafka: group `group`; partitions are handled concurrently, each in offset order; offsets are
///   committed only up to the last contiguous handled message; on a rebalance, in-flight
///   handlers of revoked partitions are drained and their offsets committed before the
///   partitions are released. Dead letters go to topic `<topic>.<group>.dlq`, created on first
///   use, when the broker says it is unknown, with [`ConsumerBuilder::kafka_replication_factor`]
///   replicas (a failed creation does not keep Keel from publishing to the topic). Their
///   error text is cut to [`crate::headers::DLQ_ERROR_MAX_BYTES`]. A record with a
///   header name that is not UTF-8 is a poison message: it is dead-lettered without running the
///   handler, with a reason naming the header (the dead letter carries that name decoded
///   lossily, invalid bytes as U+FFFD).
/// - RabbitMQ: consumers of the same destination compete on its durable queue (`group` names the
///   consumer); prefetch bounds what is in flight; a dropped connection is re-established with
///   backoff and consumption resumes (unacknowledged messages are redelivered by the broker).
///   Dead letters go through exchange `<queue>.dlx` to queue `<queue>.dlq`.
#[derive(Debug)]
pub struct Consumer {
    config: ConsumerBuilder,
}

impl Consumer {
    /// A builder for a consumer of `destination` in `group` on `broker` (a URL, see [`Broker`]).
    ///
    /// # Errors
    /// When the URL names no supported broker.
    pub fn builder(
        broker: &str,
        destination: impl Into<String>,
        group: impl Into<String>,
    ) -> Result<ConsumerBuilder, Error> {
        Ok(ConsumerBuilder {
            broker: broker.parse()?,
            destination: destination.into(),
            group: group.into(),
            retry: RetryPolicy::default(),
            prefetch: 64,
            lanes: 8,
            connection_name: None,
            reconnect_backoff: Duration::from_millis(200),
            revoke_drain_timeout: Duration::from_secs(10),
            kafka_options: Vec::new(),
            kafka_replication: KAFKA_BROKER_DEFAULT_REPLICATION,
        })
    }

    /// The dead-letter destination of this consumer.
    pub fn dead_letter_destination(&self) -> String {
        match self.config.broker {
            Broker::Kafka { .. } => {
                format!("{}.{}.dlq", self.config.destination, self.config.group)
            }
            Broker::Amqp { .. } => format!("{}.dlq", self.config.destination),
        }
    }

    /// Consumes until `shutdown` completes, then stops fetching, lets in-flight handlers finish,
    /// commits what was handled and closes. The caller drives this future; Keel spawns the
    /// per-partition / per-lane tasks it needs inside it and joins them before returning.
    ///
    /// # Errors
    /// When the consumer cannot start (Kafka client, subscription), or one of its partition
    /// workers / delivery lanes failed (a bug: handler panics are caught, see [`Handler`]); what
    /// was handled is committed first and the rest is redelivered. RabbitMQ connection losses
    /// are retried, not returned.
    pub async fn run<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let _ = (&handler, &shutdown);
        match &self.config.broker {
            #[cfg(feature = "kafka")]
            Broker::Kafka { .. } => crate::kafka::run(self.config, handler, shutdown).await,
            #[cfg(feature = "amqp")]
            Broker::Amqp { .. } => crate::amqp::run(self.config, handler, shutdown).await,
            #[allow(unreachable_patterns)]
            other => Err(other.not_built("kafka/amqp")),
        }
    }
}
