//! Response classification: success, failure (and of which class), or ignored.
//!
//! The circuit breaker counts [`Outcome::Failure`]s; the retry layer replays a failure according
//! to its [`FailureClass`]:
//!
//! | class | meaning | examples | retried |
//! |---|---|---|---|
//! | [`FailureClass::NotSent`] | the request never left | connect refused, no endpoint | always |
//! | [`FailureClass::Rejected`] | the server says it did not execute it | HTTP 429, HTTP 503 with `Retry-After`, gRPC `UNAVAILABLE`, `RESOURCE_EXHAUSTED` | always |
//! | [`FailureClass::Unknown`] | it may have executed | timeout or reset after the request was written, HTTP 500, HTTP 503 without `Retry-After`, gRPC `INTERNAL`, `CANCELLED` | only if idempotent or keyed |
//!
//! An HTTP 503 alone does not say the request was not executed: a gateway (Envoy, nginx)
//! answers 503 when its upstream connection breaks after it forwarded the request. A server
//! shedding load says when to come back (`Retry-After`, as Keel's own servers do); only then is
//! a 503 taken as a refusal.
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

/// What a response's head says about its outcome.
#[derive(Debug, Clone, Copy)]
pub enum Verdict {
    /// The outcome is known from the head (the circuit breaker records it once the body is
    /// done with, or as a failure if the body fails or is abandoned past the call's deadline).
    Now(Outcome),
    /// The outcome is only known at the end of the body (a gRPC status in trailers after the
    /// messages): the function classifies the trailers, or `None` when the body ended without
    /// any.
    AtEnd(fn(Option<&http::HeaderMap>) -> Outcome),
}

/// Classifies responses and errors of a service whose response type is `Res`.
///
/// Implement it to override the defaults ([`DefaultClassifier`]).
pub trait Classify<Res> {
    /// Classifies a response from its head (what the retry layer acts on: once a body streams
    /// to the caller, the call is not replayed).
    fn classify_response(&self, response: &Res) -> Outcome;

    /// Classifies a response for the circuit breaker, which can wait for the end of the body;
    /// by default [`Verdict::Now`] of [`classify_response`](Self::classify_response).
    fn classify_head(&self, response: &Res) -> Verdict {
        Verdict::Now(self.classify_response(response))
    }

    /// Classifies an error; by default [`classify_error`].
    fn classify_error(&self, error: &(dyn Error + 'static)) -> Outcome {
        classify_error(error)
    }
}

/// The default classifier: gRPC status from the `grpc-status` header (trailers-only responses)
/// or, for the circuit breaker, from the trailers; otherwise the HTTP status; errors through
/// [`classify_error`].
///
/// A gRPC response (`content-type: application/grpc…`, HTTP 200) without `grpc-status` in its
/// headers carries its status in the trailers, after the messages: [`classify_head`] defers to
/// them ([`classify_http_head`], [`classify_grpc_trailers`]); [`classify_response`] (head only,
/// used by the retry layer) calls it a success.
///
/// [`classify_head`]: Classify::classify_head
/// [`classify_response`]: Classify::classify_response
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<B> Classify<http::Response<B>> for DefaultClassifier {
    fn classify_response(&self, response: &http::Response<B>) -> Outcome {
        classify_http_response(response.status(), response.headers())
    }

    fn classify_head(&self, response: &http::Response<B>) -> Verdict {
        classify_http_head(response.status(), response.headers())
    }
}

/// The `grpc-status` header (or trailer) name.
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` in `headers` (a trailers-only response's headers, or trailers), if any.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Classifies an HTTP response head, deferring to the trailers when it is a gRPC response whose
/// status comes after the body: `grpc-status` in the headers (a trailers-only response) decides;
/// else a 200 with a gRPC content type is [`Verdict::AtEnd`] with [`classify_grpc_trailers`];
/// else the HTTP status.
pub fn classify_http_head(status: http::StatusCode, headers: &http::HeaderMap) -> Verdict {
    if headers.is_empty() {
        return Verdict::Now(classify_http_status(status));
    }
    if let Some(code) = grpc_status(headers) {
        return Verdict::Now(classify_grpc_code(code));
    }
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc && status == http::StatusCode::OK {
        return Verdict::AtEnd(classify_grpc_trailers);
    }
    Verdict::Now(classify_http_status_with(status, headers))
}

/// Classifies the trailers of a gRPC response: by their `grpc-status`
/// ([`classify_grpc_code`]); a body that ended without trailers, or trailers without a status,
/// is a protocol error (the client reports `INTERNAL`), an UNKNOWN failure.
pub fn classify_grpc_trailers(trailers: Option<&http::HeaderMap>) -> Outcome {
    match trailers.and_then(grpc_status) {
        Some(code) => classify_grpc_code(code),
        None => Outcome::Failure(FailureClass::Unknown),
    }
}

impl<T> Classify<tonic::Response<T>> for DefaultClassifier {
    fn classify_response(&self, _response: &tonic::Response<T>) -> Outcome {
        Outcome::Success
    }
}

/// Classifies an HTTP response head: `grpc-status` if present, else the HTTP status, where a
/// 503 with `Retry-After` is a refusal (see [`classify_http_status`]).
pub fn classify_http_response(status: http::StatusCode, headers: &http::HeaderMap) -> Outcome {
    if headers.is_empty() {
        return classify_http_status(status);
    }
    if let Some(code) = grpc_status(headers) {
        return classify_grpc_code(code);
    }
    classify_http_status_with(status, headers)
}

/// [`classify_http_status`], and a 503 that says when to come back (`Retry-After`) is REJECTED.
fn classify_http_status_with(status: http::StatusCode, headers: &http::HeaderMap) -> Outcome {
    if status == http::StatusCode::SERVICE_UNAVAILABLE
        && headers.contains_key(http::header::RETRY_AFTER)
    {
        return Outcome::Failure(FailureClass::Rejected);
    }
    classify_http_status(status)
}

/// gRPC codes: `UNAVAILABLE` and `RESOURCE_EXHAUSTED` are REJECTED; `DEADLINE_EXCEEDED`,
/// `CANCELLED`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS` are UNKNOWN failures; every other code is a
/// success of the endpoint.
///
/// A `CANCELLED` that reaches a classifier came from the server: it is what a tonic server
/// answers when its own request timeout (or the caller's `grpc-timeout`) ends a handler, so a
/// provider whose handlers hang answers it to every call, and it may have executed. (A caller
/// that gives up drops its call, which the breaker does not count.)
pub fn classify_grpc_code(code: Code) -> Outcome {
    match code {
        Code::Unavailable | Code::ResourceExhausted => Outcome::Failure(FailureClass::Rejected),
        Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss => Outcome::Failure(FailureClass::Unknown),
        _ => Outcome::Success,
    }
}

/// HTTP statuses alone: 429 is REJECTED (a rate limit refuses before anything runs), every 5xx
/// an UNKNOWN failure — 503 too, which a gateway also answers when its upstream broke after it
/// forwarded the request ([`classify_http_response`] takes a 503 with `Retry-After` as a
/// refusal) — and the rest succeed.
pub fn classify_http_status(status: http::StatusCode) -> Outcome {
    match status.as_u16() {
        429 => Outcome::Failure(FailureClass::Rejected),
        500..=599 => Outcome::Failure(FailureClass::Unknown),
        _ => Outcome::Success,
    }
}

/// An error that wraps a failure which happened before any byte of the request was written
/// (connecting, resolving, no endpoint). Transports wrap such errors in it so that the retry
/// layer knows they are safe to replay.
#[derive(Debug, thiserror::Error)]
#[error("request was not sent: {0}")]
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
/// available, not connected, unreachable) are NOT_SENT — an I/O error only when it is the error
/// itself (possibly in `io::Error::other` wrappers), not the cause of another error: wrapped by a
/// transport's error it may come from a connection that carried the request; anything else is
/// UNKNOWN.
pub fn classify_error(error: &(dyn Error + 'static)) -> Outcome {
    let mut next = Some(error);
    // Whether every link so far was an `io::Error` (or none): only then does an I/O error's kind
    // say when it happened. Under a transport's error (hyper's, h2's, tonic's) a "refused" or
    // "unreachable" kind can come from an established connection that the kernel ended after
    // the request was written (a keep-alive or user timeout reports the last ICMP error it got,
    // e.g. EHOSTUNREACH, instead of ETIMEDOUT), so there it proves nothing: the transports wrap
    // their own connect failures in `NotSent`.
    let mut bare_io = true;
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
                | io::ErrorKind::NetworkUnreachable
                    if bare_io =>
                {
                    Outcome::Failure(FailureClass::NotSent)
                }
                _ => Outcome::Failure(FailureClass::Unknown),
            };
        }
        bare_io = false;
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
            Code::Cancelled,
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
        // A 503 may come from a gateway whose upstream broke after the request went through;
        // one that says when to come back is a server refusing (shedding load).
        let unavailable = http::StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            classify_http_response(unavailable, &headers),
            Outcome::Failure(FailureClass::Unknown)
        );
        let mut shedding = http::HeaderMap::new();
        shedding.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        assert_eq!(
            classify_http_response(unavailable, &shedding),
            Outcome::Failure(FailureClass::Rejected)
        );
        assert!(matches!(
            classify_http_head(unavailable, &shedding),
            Verdict::Now(Outcome::Failure(FailureClass::Rejected))
        ));
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(
            classify_http_response(http::StatusCode::OK, &headers),
            Outcome::Failure(FailureClass::Rejected)
        );
    }

    #[test]
    fn grpc_status_after_a_body_is_deferred_to_the_trailers() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        let Verdict::AtEnd(at_end) = classify_http_head(http::StatusCode::OK, &headers) else {
            panic!("a gRPC 200 without grpc-status must wait for the trailers");
        };
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(
            at_end(Some(&trailers)),
            Outcome::Failure(FailureClass::Rejected)
        );
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(at_end(Some(&trailers)), Outcome::Success);
        assert_eq!(at_end(None), Outcome::Failure(FailureClass::Unknown));
        // Head-only classification (the retry layer's) is unchanged.
        assert_eq!(
            classify_http_response(http::StatusCode::OK, &headers),
            Outcome::Success
        );
        // Trailers-only, non-gRPC and non-200 responses are decided at the head.
        headers.insert("grpc-status", http::HeaderValue::from_static("4"));
        assert!(matches!(
            classify_http_head(http::StatusCode::OK, &headers),
            Verdict::Now(Outcome::Failure(FailureClass::Unknown))
        ));
        let mut json = http::HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        assert!(matches!(
            classify_http_head(http::StatusCode::OK, &json),
            Verdict::Now(Outcome::Success)
        ));
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
        // Under another error (a transport's), the kind says nothing about when it happened:
        // an established connection's timeout reports the last ICMP error, e.g. unreachable.
        #[derive(Debug, thiserror::Error)]
        #[error("connection error")]
        struct Transport(#[source] io::Error);
        for kind in [
            io::ErrorKind::HostUnreachable,
            io::ErrorKind::ConnectionRefused,
        ] {
            assert_eq!(
                classify_error(&Transport(io::Error::from(kind))),
                Outcome::Failure(FailureClass::Unknown),
                "{kind:?}"
            );
            assert_eq!(
                classify_error(&io::Error::other(io::Error::from(kind))),
                Outcome::Failure(FailureClass::NotSent),
                "{kind:?}"
            );
        }
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
