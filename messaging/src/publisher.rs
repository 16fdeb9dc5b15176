//! Confirmed publishing, one API over both brokers.

use std::time::Duration;

use crate::broker::{Broker, KAFKA_BROKER_DEFAULT_REPLICATION, check_replication};
use crate::error::{Error, PublishError};
use crate::headers::Headers;
use crate::message::{OutgoingMessage, Receipt};

/// How a [`Publisher`] is set up. Build with [`Publisher::builder`].
#[derive(Debug, Clone)]
pub struct PublisherBuilder {
    pub(crate) broker: Broker,
    pub(crate) confirm_timeout: Duration,
    pub(crate) connection_name: Option<String>,
    pub(crate) kafka_options: Vec<(String, String)>,
    pub(crate) kafka_replication: i32,
}

impl PublisherBuilder {
    /// How long a publish waits for the broker's confirmation before failing with
    /// [`PublishError::is_timeout`] (default 30 s; Kafka's `message.timeout.ms`).
    #[must_use]
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The connection name the broker shows (RabbitMQ `connection_name`, Kafka `client.id`).
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// A librdkafka producer property (e.g. `linger.ms`). Keel's safety settings
    /// (`acks=all`, `enable.idempotence=true`) cannot be overridden.
    #[must_use]
    pub fn kafka_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka_options.push((key.into(), value.into()));
        self
    }

    /// Kafka: the replication factor of the topics [`Publisher::declare`] creates (default
    /// [`KAFKA_BROKER_DEFAULT_REPLICATION`]: the broker's `default.replication.factor`, which
    /// needs Kafka 2.4 or later). Set it explicitly on older brokers, or to ask for more
    /// replicas than the broker's default.
    #[must_use]
    pub fn kafka_replication_factor(mut self, factor: i32) -> Self {
        self.kafka_replication = factor;
        self
    }

    /// Creates the publisher (RabbitMQ: connects; Kafka: starts the client).
    ///
    /// # Errors
    /// When the broker's feature is not built in, the Kafka replication factor is neither -1
    /// nor at least 1, or the client cannot be created.
    pub async fn build(self) -> Result<Publisher, Error> {
        check_replication(self.kafka_replication)?;
        match &self.broker {
            #[cfg(feature = "kafka")]
            Broker::Kafka { .. } => Ok(Publisher {
                inner: Inner::Kafka(crate::kafka::KafkaPublisher::new(&self)?),
            }),
            #[cfg(feature = "amqp")]
            Broker::Amqp { .. } => Ok(Publisher {
                inner: Inner::Amqp(crate::amqp::AmqpPublisher::connect(&self).await?),
            }),
            #[allow(unreachable_patterns)]
            other => Err(other.not_built(match other {
                Broker::Kafka { .. } => "kafka",
                Broker::Amqp { .. } => "amqp",
            })),
        }
    }
}

#[derive(Debug, Clone)]
enum Inner {
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaPublisher),
    #[cfg(feature = "amqp")]
    Amqp(crate::amqp::AmqpPublisher),
}

/// Publishes messages and returns only once the broker has durably accepted them.
///
/// Kafka: the idempotent producer with `acks=all`, a publish completes on its delivery report.
/// RabbitMQ: a persistent message to a durable queue (declared on first use, with its
/// dead-letter exchange), `mandatory`, completed on its publisher confirm; an unroutable message
/// is an error, not a silent drop.
///
/// Every message gets Keel's envelope: a message id, an idempotency key (the message id unless
/// set; see [`crate::Received::idempotency_key`]) and the current W3C trace context. Cloning is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct Publisher {
    inner: Inner,
}

impl Publisher {
    /// A builder for a publisher to `broker` (a URL, see [`Broker`]).
    ///
    /// # Errors
    /// When the URL names no supported broker.
    pub fn builder(broker: &str) -> Result<PublisherBuilder, Error> {
        Ok(PublisherBuilder {
            broker: broker.parse()?,
            confirm_timeout: Duration::from_secs(30),
            connection_name: None,
            kafka_options: Vec::new(),
            kafka_replication: KAFKA_BROKER_DEFAULT_REPLICATION,
        })
    }

    /// A publisher to `broker` with the defaults.
    ///
    /// # Errors
    /// As [`Publisher::builder`] and [`PublisherBuilder::build`].
    pub async fn connect(broker: &str) -> Result<Self, Error> {
        Self::builder(broker)?.build().await
    }

    /// Publishes `payload` to `destination` and waits for the broker's confirmation.
    ///
    /// # Errors
    /// A [`PublishError`] that hands the message back when it was not confirmed.
    pub async fn publish(
        &self,
        destination: &str,
        key: Option<&[u8]>,
        payload: impl Into<Vec<u8>>,
        headers: Headers,
    ) -> Result<Receipt, PublishError> {
        self.send(OutgoingMessage {
            destination: destination.to_owned(),
            key: key.map(<[u8]>::to_vec),
            payload: payload.into(),
            headers,
        })
        .await
    }

    /// Publishes a prepared message and waits for the broker's confirmation.
    ///
    /// # Errors
    /// A [`PublishError`] that hands the message back when it was not confirmed.
    pub async fn send(&self, mut message: OutgoingMessage) -> Result<Receipt, PublishError> {
        message.stamp();
        match &self.inner {
            #[cfg(feature = "kafka")]
            Inner::Kafka(p) => p.send(message).await,
            #[cfg(feature = "amqp")]
            Inner::Amqp(p) => p.send(message).await,
            #[allow(unreachable_patterns)]
            _ => unreachable_publisher(message),
        }
    }

    /// Publishes every message, pipelined (all are in flight before the first confirm is
    /// awaited), and returns one result per message, in order. Per destination and key, messages
    /// are written in the order given.
    pub async fn send_batch(
        &self,
        mut messages: Vec<OutgoingMessage>,
    ) -> Vec<Result<Receipt, PublishError>> {
        for m in &mut messages {
            m.stamp();
        }
        match &self.inner {
            #[cfg(feature = "kafka")]
            Inner::Kafka(p) => p.send_batch(messages).await,
            #[cfg(feature = "amqp")]
            Inner::Amqp(p) => p.send_batch(messages).await,
            #[allow(unreachable_patterns)]
            _ => messages.into_iter().map(unreachable_publisher).collect(),
        }
    }

    /// Creates `destination` if it does not exist: a Kafka topic with `partitions` partitions
    /// and the replication factor of [`PublisherBuilder::kafka_replication_factor`] (by default
    /// the broker's `default.replication.factor`; an existing topic is left as it is), or the
    /// RabbitMQ durable queue with its dead-letter exchange and queue (`partitions` is ignored).
    ///
    /// Kafka brokers that do not auto-create topics reject a publish to a missing topic; RabbitMQ
    /// publishes are `mandatory`, so a missing queue is an error too, never a silent drop.
    ///
    /// # Errors
    /// When the broker refuses or cannot be reached.
    pub async fn declare(&self, destination: &str, partitions: i32) -> Result<(), Error> {
        let _ = (destination, partitions);
        match &self.inner {
            #[cfg(feature = "kafka")]
            Inner::Kafka(p) => p.declare(destination, partitions).await,
            #[cfg(feature = "amqp")]
            Inner::Amqp(p) => p.declare(destination).await,
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// Waits until everything published so far is confirmed (or failed).
    ///
    /// # Errors
    /// When the wait itself fails (Kafka: messages still queued after the confirm timeout).
    pub async fn flush(&self) -> Result<(), Error> {
        match &self.inner {
            #[cfg(feature = "kafka")]
            Inner::Kafka(p) => p.flush().await,
            #[cfg(feature = "amqp")]
            Inner::Amqp(p) => p.flush().await,
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// Flushes, then closes the connection. Clones of this publisher fail afterwards
    /// (RabbitMQ) or keep their own handle (Kafka).
    ///
    /// # Errors
    /// As [`Publisher::flush`].
    pub async fn close(self) -> Result<(), Error> {
        self.flush().await?;
        match self.inner {
            #[cfg(feature = "kafka")]
            Inner::Kafka(_) => Ok(()),
            #[cfg(feature = "amqp")]
            Inner::Amqp(p) => p.close().await,
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }
}

#[allow(dead_code)]
fn unreachable_publisher(message: OutgoingMessage) -> Result<Receipt, PublishError> {
    Err(PublishError::new(
        crate::error::PublishErrorKind::Invalid,
        "no broker feature enabled",
        message,
    ))
}
