//! The client's error: opaque, with a predicate per failure a caller may act on.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use keel_breaker::BoxError;
use keel_breaker::classify::NotSent;

/// No instance of the service is known (discovery is empty, or not loaded yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no endpoints for the service")]
pub struct NoEndpoints;

/// Every known instance is ejected (its circuit breaker is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all endpoints of the service are ejected")]
pub struct AllEjected;

/// A failure that would have been retried, but the retry budget had no token left.
#[derive(Debug, thiserror::Error)]
#[error("retry budget exhausted; last failure: {0}")]
pub struct RetryBudgetExhausted(#[source] pub BoxError);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoEndpoints,
    AllEjected,
    DeadlineExceeded,
    BudgetExhausted,
    BulkheadFull,
    Status,
    Decode,
    Config,
    Other,
}

/// A failed call or client set-up.
///
/// Opaque: ask with the `is_*` predicates, and map it to a protocol status with
/// [`grpc_code`](Self::grpc_code) / [`http_status`](Self::http_status) (both through
/// [`keel_breaker::status::status_of`], the one mapping of Keel errors).
///
/// A gRPC call through a [`GrpcChannel`](crate::GrpcChannel) fails with a [`tonic::Status`]
/// whose source is this error: get it back with [`Error::from_status`].
#[derive(Clone)]
pub struct Error {
    kind: Kind,
    status: Option<http::StatusCode>,
    body: Bytes,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
}

impl Error {
    fn new(kind: Kind, source: Option<BoxError>) -> Self {
        Self {
            kind,
            status: None,
            body: Bytes::new(),
            source: source.map(Arc::from),
        }
    }

    pub(crate) fn no_endpoints() -> BoxError {
        Box::new(NotSent::new(NoEndpoints))
    }

    pub(crate) fn all_ejected() -> BoxError {
        Box::new(NotSent::new(AllEjected))
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::new(Kind::Config, Some(message.into().into()))
    }

    /// A configuration error whose cause is a typed error (which then decides the status).
    pub(crate) fn config_caused_by(source: impl Into<BoxError>) -> Self {
        Self::new(Kind::Config, Some(source.into()))
    }

    pub(crate) fn decode(source: impl Into<BoxError>) -> Self {
        Self::new(Kind::Decode, Some(source.into()))
    }

    pub(crate) fn http(status: http::StatusCode, body: Bytes) -> Self {
        Self {
            kind: Kind::Status,
            status: Some(status),
            body,
            source: None,
        }
    }

    /// Classifies any error a client stack returned.
    pub(crate) fn from_box(error: BoxError) -> Self {
        match error.downcast::<Error>() {
            Ok(err) => *err,
            Err(error) => Self::new(kind_of(error.as_ref()), Some(error)),
        }
    }

    /// Wraps `error` as a retry-budget exhaustion (the chain keeps the original failure).
    pub(crate) fn budget_exhausted(error: BoxError) -> Self {
        Self::new(
            Kind::BudgetExhausted,
            Some(Box::new(RetryBudgetExhausted(error))),
        )
    }

    /// This (non-2xx) error, marked as a retry-budget exhaustion; status and body are kept.
    pub(crate) fn into_budget_exhausted(self) -> Self {
        let (status, body) = (self.status, self.body.clone());
        let mut error = Self::budget_exhausted(Box::new(self));
        error.status = status;
        error.body = body;
        error
    }

    /// The client error behind a [`tonic::Status`] returned by a [`GrpcChannel`](crate::GrpcChannel)
    /// call, if the failure happened in the client (not on the server).
    pub fn from_status(status: &tonic::Status) -> Option<&Error> {
        status.source().and_then(|s| s.downcast_ref::<Error>())
    }

    /// No instance of the service is known.
    pub fn is_no_endpoints(&self) -> bool {
        self.kind == Kind::NoEndpoints
    }

    /// Every instance is ejected by its circuit breaker.
    pub fn is_all_ejected(&self) -> bool {
        self.kind == Kind::AllEjected
    }

    /// The call's deadline passed.
    pub fn is_deadline_exceeded(&self) -> bool {
        self.kind == Kind::DeadlineExceeded
    }

    /// The call failed in a retryable way but the retry budget was empty.
    pub fn is_retry_budget_exhausted(&self) -> bool {
        self.kind == Kind::BudgetExhausted
    }

    /// The client's bulkhead ([`max_concurrent`](crate::GrpcBuilder::max_concurrent)) was
    /// full: the call was never sent. Maps to `RESOURCE_EXHAUSTED` / 503.
    pub fn is_bulkhead_full(&self) -> bool {
        self.kind == Kind::BulkheadFull
    }

    /// A REST call got a non-2xx response ([`status`](Self::status), [`body`](Self::body)) —
    /// also when that response would have been retried but the retry budget was spent
    /// ([`is_retry_budget_exhausted`](Self::is_retry_budget_exhausted) is true then too).
    pub fn is_status(&self) -> bool {
        self.status.is_some()
    }

    /// A response body could not be decoded (or a request body encoded).
    pub fn is_decode(&self) -> bool {
        self.kind == Kind::Decode
    }

    /// The client was misconfigured.
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }

    /// The HTTP status of a non-2xx REST response.
    pub fn status(&self) -> Option<http::StatusCode> {
        self.status
    }

    /// The body of a non-2xx REST response (empty otherwise).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The gRPC code this error maps to.
    pub fn grpc_code(&self) -> tonic::Code {
        keel_breaker::status::status_of(self).0
    }

    /// The HTTP status this error maps to (for a non-2xx REST response: that status).
    pub fn http_status(&self) -> http::StatusCode {
        match self.status {
            Some(status) => status,
            None => keel_breaker::status::status_of(self).1,
        }
    }

    /// This error as a [`tonic::Status`] carrying it as its source.
    ///
    /// Its code says what happened to *this* call (`UNAVAILABLE`: certainly not executed).
    /// A handler that returns it to its own caller after side effects of its own (a debit made
    /// before the downstream call failed) must map it first, say to `ABORTED` or an HTTP 502:
    /// handed back unchanged, an `UNAVAILABLE` tells its caller the handler did nothing, and a
    /// Keel caller retries it even when not idempotent.
    pub fn into_status(self) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc_code(), self.to_string());
        status.set_source(Arc::new(self));
        status
    }
}

fn kind_of(error: &(dyn StdError + 'static)) -> Kind {
    let mut next = Some(error);
    while let Some(err) = next {
        if err.is::<NoEndpoints>() {
            return Kind::NoEndpoints;
        }
        if err.is::<AllEjected>() {
            return Kind::AllEjected;
        }
        if err.is::<keel_breaker::deadline::DeadlineExceeded>() {
            return Kind::DeadlineExceeded;
        }
        if err.is::<RetryBudgetExhausted>() {
            return Kind::BudgetExhausted;
        }
        if err.is::<keel_breaker::bulkhead::BulkheadFull>() {
            return Kind::BulkheadFull;
        }
        if err.is::<keel_breaker::request::InvalidIdempotencyKey>() {
            return Kind::Config;
        }
        next = err.source();
    }
    Kind::Other
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(status) = self.status {
            d.field("status", &status)
                .field("body_len", &self.body.len());
        }
        d.field("source", &self.source).finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.source) {
            (Kind::Status, _) => match self.status {
                Some(status) => write!(f, "server responded {status}"),
                None => f.write_str("server responded with an error"),
            },
            (Kind::Decode, Some(src)) => write!(f, "invalid body: {src}"),
            (Kind::Config, Some(src)) => write!(f, "invalid client configuration: {src}"),
            (_, Some(src)) => fmt::Display::fmt(src, f),
            (_, None) => f.write_str("client error"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_predicate_and_status() {
        let e = Error::from_box(Error::no_endpoints());
        assert!(e.is_no_endpoints() && !e.is_all_ejected());
        assert_eq!(e.grpc_code(), tonic::Code::Unavailable);

        let e = Error::from_box(Error::all_ejected());
        assert!(e.is_all_ejected());
        assert_eq!(e.grpc_code(), tonic::Code::Unavailable);

        let e = Error::budget_exhausted(tonic::Status::unavailable("down").into());
        assert!(e.is_retry_budget_exhausted());
        assert_eq!(e.grpc_code(), tonic::Code::Unavailable);
        assert_eq!(e.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);

        let e = Error::http(http::StatusCode::NOT_FOUND, Bytes::from_static(b"nope"));
        assert!(e.is_status());
        let spent = Error::http(
            http::StatusCode::TOO_MANY_REQUESTS,
            Bytes::from_static(b"slow"),
        )
        .into_budget_exhausted();
        assert!(spent.is_status() && spent.is_retry_budget_exhausted());
        assert_eq!(spent.status(), Some(http::StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(spent.body().as_ref(), b"slow");
        assert_eq!(e.http_status().as_u16(), 404);
        assert_eq!(e.body().as_ref(), b"nope");

        let e = Error::from_box(Box::new(keel_breaker::bulkhead::BulkheadFull::default()));
        assert!(e.is_bulkhead_full() && !e.is_retry_budget_exhausted());
        assert_eq!(e.grpc_code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            keel_breaker::classify::classify_error(&e).retry_class(),
            Some(keel_breaker::classify::FailureClass::NotSent)
        );

        let status = Error::from_box(Error::no_endpoints()).into_status();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(Error::from_status(&status).is_some_and(Error::is_no_endpoints));
    }
}
