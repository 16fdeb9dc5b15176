//! Response classification: success, failure (and of which class), or ignored.
//!
//! The circuit breaker counts [`Outcome::Failure`]s; the retry layer replays a failure according
//! to its [`FailureClass`]:
//!
//! | class | meaning | examples | retried |
//! |---|---|---|---|
//! | [`FailureClass::NotSent`] | the request never left | connect refused, no endpoint | always |
//! | [`FailureClass::Rejected`] | the server says it did not execute it | HTTP 503 / 429, gRPC `UNAVAILABLE`, `RESOURCE_EXHAUSTED` | always |
//! | [`FailureClass::Unknown`] | it may have executed | timeout or reset after the request was written, HTTP 500, gRPC `INTERNAL` | only if idempotent or keyed |
//!
//! gRPC codes that say the *request* was wrong (`INVALID_ARGUMENT`, `NOT_FOUND`,
//! `ALREADY_EXISTS`, `FAILED_PRECONDITION`, …) are [`Outcome::Success`] for the breaker (the
//! endpoint is healthy) and are never retried. Override any of this by implementing [`Classify`].

use std::error::Error;
use std::io;

use tonic::Code;

/// What a failure says about whether the request executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The request was never sent.
    NotSent,
    /// The server refused it before executing it.
    Rejected,
    /// It may have executed.
    Unknown,
}

/// The classification of one call's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The endpoint handled the call (possibly with an application-level error).
    Success,
    /// Not recorded by the breaker and not retried (e.g. the caller cancelled).
    Ignored,
    /// A local layer (breaker, bulkhead, rate limit) refused the call before it was sent: not a
    /// failure of the endpoint, but safe to retry (elsewhere).
    LocalRejection,
    /// A failure of the endpoint.
    Failure(FailureClass),
}

impl Outcome {
    /// Whether the breaker counts this as a failure.
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Failure(_))
    }

    /// The class used by the retry layer, if this is a retry candidate.
    pub fn retry_class(self) -> Option<FailureClass> {
        match self {
            Outcome::Failure(class) => Some(class),
            Outcome::LocalRejection => Some(FailureClass::NotSent),
            Outcome::Success | Outcome::Ignored => None,
        }
    }
}

/// Classifies responses and errors of a service whose response type is `Res`.
///
/// Implement it to override the defaults ([`DefaultClassifier`]).
pub trait Classify<Res> {
    /// Classifies a response.
    fn classify_response(&self, response: &Res) -> Outcome;

    /// Classifies an error; by default [`classify_error`].
    fn classify_error(&self, error: &(dyn Error + 'static)) -> Outcome {
        classify_error(error)
    }
}

/// The default classifier: gRPC status from the `grpc-status` header (trailers-only responses),
/// otherwise the HTTP status; errors through [`classify_error`].
///
/// A gRPC response whose status travels in trailers is classified by its headers only (HTTP 200,
/// so success); errors the client turns into a [`tonic::Status`] are classified as errors.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<B> Classify<http::Response<B>> for DefaultClassifier {
    fn classify_response(&self, response: &http::Response<B>) -> Outcome {
        classify_http_response(response.status(), response.headers())
    }
}

impl<T> Classify<tonic::Response<T>> for DefaultClassifier {
    fn classify_response(&self, _response: &tonic::Response<T>) -> Outcome {
        Outcome::Success
    }
}

/// Classifies an HTTP response head: `grpc-status` if present, else the HTTP status.
pub fn classify_http_response(status: http::StatusCode, headers: &http::HeaderMap) -> Outcome {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    if headers.is_empty() {
        return classify_http_status(status);
    }
    if let Some(code) = headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i32>().ok())
    {
        return classify_grpc_code(Code::from_i32(code));
    }
    classify_http_status(status)
}

/// gRPC codes: `UNAVAILABLE` and `RESOURCE_EXHAUSTED` are REJECTED; `DEADLINE_EXCEEDED`,
/// `INTERNAL`, `UNKNOWN`, `DATA_LOSS` are UNKNOWN failures; `CANCELLED` is ignored; every other
/// code is a success of the endpoint.
pub fn classify_grpc_code(code: Code) -> Outcome {
    match code {
        Code::Unavailable | Code::ResourceExhausted => Outcome::Failure(FailureClass::Rejected),
        Code::DeadlineExceeded | Code::Internal | Code::Unknown | Code::DataLoss => {
            Outcome::Failure(FailureClass::Unknown)
        }
        Code::Cancelled => Outcome::Ignored,
        _ => Outcome::Success,
    }
}

/// HTTP statuses: 429 and 503 are REJECTED, other 5xx are UNKNOWN failures, the rest succeed.
pub fn classify_http_status(status: http::StatusCode) -> Outcome {
    match status.as_u16() {
        429 | 503 => Outcome::Failure(FailureClass::Rejected),
        500..=599 => Outcome::Failure(FailureClass::Unknown),
        _ => Outcome::Success,
    }
}

/// An error that wraps a failure which happened before any byte of the request was written
/// (connecting, resolving, no endpoint). Transports wrap such errors in it so that the retry
/// layer knows they are safe to replay.
#[derive(Debug, thiserror::Error)]
#[error("request was not sent")]
pub struct NotSent(#[source] pub crate::BoxError);

impl NotSent {
    /// Wraps `error`.
    pub fn new(error: impl Into<crate::BoxError>) -> Self {
        Self(error.into())
    }
}

/// Classifies an error by walking its source chain (the first recognised link decides):
/// Keel's local rejections ([`BreakerError`](crate::breaker::BreakerError),
/// [`BulkheadFull`](crate::bulkhead::BulkheadFull),
/// [`RateLimited`](crate::rate_limit::RateLimited)) are [`Outcome::LocalRejection`]; a deadline
/// that expired before sending is ignored, one that elapsed in flight is UNKNOWN; a
/// [`tonic::Status`] by its code; [`NotSent`] and connect-time I/O errors (refused, address not
/// available, not connected) are NOT_SENT; anything else is UNKNOWN.
pub fn classify_error(error: &(dyn Error + 'static)) -> Outcome {
    let mut next = Some(error);
    while let Some(err) = next {
        if err.is::<crate::breaker::BreakerError>()
            || err.is::<crate::bulkhead::BulkheadFull>()
            || err.is::<crate::rate_limit::RateLimited>()
        {
            return Outcome::LocalRejection;
        }
        if let Some(d) = err.downcast_ref::<crate::deadline::DeadlineExceeded>() {
            return if d.is_expired_before_send() {
                Outcome::Ignored
            } else {
                Outcome::Failure(FailureClass::Unknown)
            };
        }
        if let Some(status) = err.downcast_ref::<tonic::Status>() {
            return classify_grpc_code(status.code());
        }
        if err.is::<NotSent>() {
            return Outcome::Failure(FailureClass::NotSent);
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref() {
                // `io::Error::other(e)`: judge by what it wraps.
                next = Some(inner);
                continue;
            }
            return match io.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::NotConnected
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => Outcome::Failure(FailureClass::NotSent),
                _ => Outcome::Failure(FailureClass::Unknown),
            };
        }
        next = err.source();
    }
    Outcome::Failure(FailureClass::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_follow_the_issue() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(classify_grpc_code(code).is_failure(), "{code:?}");
        }
        for code in [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
        ] {
            assert_eq!(classify_grpc_code(code), Outcome::Success, "{code:?}");
        }
    }

    #[test]
    fn http_and_header_classification() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(
            classify_http_response(http::StatusCode::TOO_MANY_REQUESTS, &headers),
            Outcome::Failure(FailureClass::Rejected)
        );
        assert_eq!(
            classify_http_response(http::StatusCode::INTERNAL_SERVER_ERROR, &headers),
            Outcome::Failure(FailureClass::Unknown)
        );
        assert_eq!(
            classify_http_response(http::StatusCode::NOT_FOUND, &headers),
            Outcome::Success
        );
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(
            classify_http_response(http::StatusCode::OK, &headers),
            Outcome::Failure(FailureClass::Rejected)
        );
    }

    #[test]
    fn errors_walk_the_chain() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify_error(&refused),
            Outcome::Failure(FailureClass::NotSent)
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            classify_error(&reset),
            Outcome::Failure(FailureClass::Unknown)
        );
        let wrapped = io::Error::other(NotSent::new("no endpoint"));
        assert_eq!(
            classify_error(&wrapped),
            Outcome::Failure(FailureClass::NotSent)
        );
        let status = tonic::Status::unavailable("down");
        assert_eq!(
            classify_error(&status),
            Outcome::Failure(FailureClass::Rejected)
        );
        let open = crate::breaker::BreakerError::open();
        assert_eq!(classify_error(&open), Outcome::LocalRejection);
    }
}
