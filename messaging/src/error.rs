//! Errors: publishing hands the message back, handlers say whether to retry.

use std::fmt;

use crate::message::OutgoingMessage;

/// A boxed error from a broker client or a handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a publish was not confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The broker was not reachable or the connection dropped before the confirm.
    Unavailable,
    /// No confirm arrived within the configured timeout.
    Timeout,
    /// The broker refused the message (Kafka error / RabbitMQ nack).
    Rejected,
    /// RabbitMQ returned the message: no queue is bound to take it.
    Unroutable,
    /// The publisher was closed.
    Closed,
    /// The message or configuration is invalid for this broker.
    Invalid,
}

/// A publish the broker did not confirm. It hands the message back (like tokio's `SendError`):
/// nothing is dropped silently.
///
/// Whether the broker stored the message anyway is unknown for [`Self::is_timeout`] and
/// [`Self::is_unavailable`]: republishing it is safe because the idempotency key stays the same.
pub struct PublishError {
    kind: PublishErrorKind,
    source: BoxError,
    message: Box<OutgoingMessage>,
}

impl PublishError {
    pub(crate) fn new(
        kind: PublishErrorKind,
        source: impl Into<BoxError>,
        message: OutgoingMessage,
    ) -> Self {
        Self {
            kind,
            source: source.into(),
            message: Box::new(message),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> PublishErrorKind {
        self.kind
    }

    /// The broker could not be reached or the connection dropped.
    pub fn is_unavailable(&self) -> bool {
        self.kind == PublishErrorKind::Unavailable
    }

    /// No confirm arrived in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == PublishErrorKind::Timeout
    }

    /// The message that was not confirmed.
    pub fn message(&self) -> &OutgoingMessage {
        &self.message
    }

    /// Takes the message back.
    pub fn into_message(self) -> OutgoingMessage {
        *self.message
    }
}

impl fmt::Debug for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("destination", &self.message.destination)
            .field("message_id", &self.message.message_id())
            .finish()
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            PublishErrorKind::Unavailable => "broker unavailable",
            PublishErrorKind::Timeout => "no confirm in time",
            PublishErrorKind::Rejected => "rejected by the broker",
            PublishErrorKind::Unroutable => "unroutable",
            PublishErrorKind::Closed => "publisher closed",
            PublishErrorKind::Invalid => "invalid",
        };
        write!(
            f,
            "publish to {} not confirmed: {what}: {}",
            self.message.destination, self.source
        )
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// An error that is not tied to one message: connecting, configuring, declaring, consuming.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct Error {
    context: String,
    #[source]
    source: BoxError,
}

impl Error {
    pub(crate) fn new(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// What a handler returns when it could not handle a message.
#[derive(Debug)]
pub struct HandlerError {
    retryable: bool,
    source: BoxError,
}

impl HandlerError {
    /// A transient failure: the message is retried with backoff, then dead-lettered after the
    /// configured number of attempts.
    pub fn retry(source: impl Into<BoxError>) -> Self {
        Self {
            retryable: true,
            source: source.into(),
        }
    }

    /// A failure retrying cannot fix (bad data, a poison message): dead-lettered at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            retryable: false,
            source: source.into(),
        }
    }

    /// Whether a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}
