//! Messages going out and coming in.

use bytes::Bytes;

use crate::headers::{self, Headers};

/// A message to publish: destination, optional key, payload and headers.
///
/// This is also what a failed publish hands back ([`crate::PublishError::into_message`]), so the
/// caller can retry, park or report it: a message the broker did not confirm is never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Kafka topic or RabbitMQ queue.
    pub destination: String,
    /// Partitioning key (Kafka) / ordering key (RabbitMQ lanes).
    pub key: Option<Vec<u8>>,
    /// The encoded payload.
    pub payload: Vec<u8>,
    /// Headers, including Keel's envelope once stamped.
    pub headers: Headers,
}

impl OutgoingMessage {
    /// A message for `destination` carrying `payload`, with no key and no headers.
    pub fn new(destination: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            destination: destination.into(),
            key: None,
            payload: payload.into(),
            headers: Headers::new(),
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The message id header, once stamped.
    pub fn message_id(&self) -> Option<&str> {
        self.headers.get_str(headers::MESSAGE_ID)
    }

    /// The idempotency key: the header when the caller set one, else the message id (once
    /// stamped).
    pub fn idempotency_key(&self) -> Option<&str> {
        idempotency_key(&self.headers)
    }

    /// Stamps the envelope: a message id when absent, and the current W3C trace context when
    /// the headers carry none. The idempotency key is not written: unless the caller set one, it
    /// is the message id, and consumers read it so ([`Received::idempotency_key`]).
    pub(crate) fn stamp(&mut self) {
        if !self.headers.contains(headers::MESSAGE_ID) {
            let id = uuid::Uuid::new_v4().to_string();
            self.headers.insert(headers::MESSAGE_ID, id);
        }
        if !self.headers.contains(keel_core::propagation::TRACEPARENT) {
            keel_core::propagation::inject_current(&mut self.headers);
        }
    }
}

/// The `idempotency-key` header, else the message id.
fn idempotency_key(h: &Headers) -> Option<&str> {
    h.get_str(headers::IDEMPOTENCY_KEY)
        .or_else(|| h.get_str(headers::MESSAGE_ID))
}

/// What the broker confirmed for one published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Where it went.
    pub destination: String,
    /// Its message id.
    pub message_id: String,
    /// Kafka: the partition it was written to.
    pub partition: Option<i32>,
    /// Kafka: its offset in that partition.
    pub offset: Option<i64>,
}

/// A consumed message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Kafka topic or RabbitMQ queue it came from.
    pub destination: String,
    /// Its key, if any.
    pub key: Option<Bytes>,
    /// The encoded payload.
    pub payload: Bytes,
    /// Its headers.
    pub headers: Headers,
    /// Kafka: its partition.
    pub partition: Option<i32>,
    /// Kafka: its offset.
    pub offset: Option<i64>,
    /// RabbitMQ: whether the broker redelivered it (it may have been handled before).
    pub redelivered: bool,
    /// Which attempt of the handler this is, from 1.
    pub attempt: u32,
}

impl Received {
    /// The message id header.
    pub fn message_id(&self) -> Option<&str> {
        self.headers.get_str(headers::MESSAGE_ID)
    }

    /// The key to de-duplicate on: the `idempotency-key` header when the producer set one, else
    /// the message id (Keel sends the header only when the two differ).
    pub fn idempotency_key(&self) -> Option<&str> {
        idempotency_key(&self.headers)
    }

    /// The W3C `traceparent` the producer sent.
    pub fn traceparent(&self) -> Option<&str> {
        self.headers.get_str(keel_core::propagation::TRACEPARENT)
    }

    /// The key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The producer's trace context, to continue its trace.
    pub fn trace_context(&self) -> opentelemetry::Context {
        keel_core::propagation::extract(&self.headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_key_is_the_message_id_unless_set() {
        let mut m = OutgoingMessage::new("d", b"x".to_vec());
        m.stamp();
        let id = m.message_id().map(str::to_owned);
        assert!(id.is_some());
        assert_eq!(m.idempotency_key().map(str::to_owned), id);
        assert!(
            !m.headers.contains(headers::IDEMPOTENCY_KEY),
            "not sent when it is the message id"
        );

        let mut m =
            OutgoingMessage::new("d", b"x".to_vec()).with_header("Idempotency-Key", "pay-1");
        m.stamp();
        assert_eq!(m.idempotency_key(), Some("pay-1"));
        assert_ne!(m.message_id(), Some("pay-1"));
    }
}
