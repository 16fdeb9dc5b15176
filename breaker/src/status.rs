//! The one place where any Keel error becomes a protocol status.

use std::error::Error;

use http::StatusCode;
use tonic::Code;

use crate::classify::{FailureClass, Outcome};

/// Maps any error to a gRPC code and an HTTP status, walking the source chain; the first link
/// that is recognised decides:
///
/// | error | gRPC | HTTP |
/// |---|---|---|
/// | [`BreakerError`](crate::breaker::BreakerError) | `UNAVAILABLE` | 503 |
/// | [`BulkheadFull`](crate::bulkhead::BulkheadFull) | `RESOURCE_EXHAUSTED` | 503 |
/// | [`RateLimited`](crate::rate_limit::RateLimited) | `RESOURCE_EXHAUSTED` | 429 |
/// | [`DeadlineExceeded`](crate::deadline::DeadlineExceeded) | `DEADLINE_EXCEEDED` | 504 |
/// | [`InvalidIdempotencyKey`](crate::request::InvalidIdempotencyKey) | `INVALID_ARGUMENT` | 400 |
/// | [`tonic::Status`] | its code | per [`http_status_for_code`] |
/// | [`NotSent`](crate::classify::NotSent), a connect-time [`std::io::Error`] (refused, unreachable; the error itself, not a transport error's cause) | `UNAVAILABLE` | 502 |
/// | any other [`std::io::Error`] (reset, broken pipe, end of stream: the request may have been executed) | `UNKNOWN` | 502 |
/// | anything else | `UNKNOWN` | 500 |
///
/// `UNAVAILABLE` is kept for what certainly was not executed: gRPC callers — Keel's own
/// [classifier](crate::classify::classify_grpc_code) among them — retry it even when the call
/// is not idempotent. A failure after the request may have reached the server must not read as
/// that when a service hands its downstream's status back to its own caller. Over HTTP, Keel's
/// clients retry a plain call only after a 429 or a 503 with `Retry-After`: a service that
/// refuses a call before executing any of it says so with that header.
pub fn status_of(error: &(dyn Error + 'static)) -> (Code, StatusCode) {
    let mut next = Some(error);
    while let Some(err) = next {
        if err.is::<crate::breaker::BreakerError>() {
            return (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE);
        }
        if err.is::<crate::bulkhead::BulkheadFull>() {
            return (Code::ResourceExhausted, StatusCode::SERVICE_UNAVAILABLE);
        }
        if err.is::<crate::rate_limit::RateLimited>() {
            return (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS);
        }
        if err.is::<crate::deadline::DeadlineExceeded>() {
            return (Code::DeadlineExceeded, StatusCode::GATEWAY_TIMEOUT);
        }
        if err.is::<crate::request::InvalidIdempotencyKey>() {
            return (Code::InvalidArgument, StatusCode::BAD_REQUEST);
        }
        if let Some(status) = err.downcast_ref::<tonic::Status>() {
            return (status.code(), http_status_for_code(status.code()));
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            next = Some(inner);
            continue;
        }
        if err.is::<crate::classify::NotSent>() || err.is::<std::io::Error>() {
            // The classifier's judgement of the whole error: it walks the same chain to this
            // link (`NotSent`, or a bare I/O error at connect time, is "not sent"; an I/O error
            // under a transport's error is not).
            let not_sent =
                crate::classify::classify_error(error) == Outcome::Failure(FailureClass::NotSent);
            let code = if not_sent {
                Code::Unavailable
            } else {
                Code::Unknown
            };
            return (code, StatusCode::BAD_GATEWAY);
        }
        next = err.source();
    }
    (Code::Unknown, StatusCode::INTERNAL_SERVER_ERROR)
}

/// [`status_of`] as a [`tonic::Status`] whose message is the error's `Display`.
pub fn to_grpc_status(error: &(dyn Error + 'static)) -> tonic::Status {
    tonic::Status::new(status_of(error).0, error.to_string())
}

/// The HTTP status conventionally paired with a gRPC code (as grpc-gateway maps them).
pub fn http_status_for_code(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    #[derive(Debug, thiserror::Error)]
    #[error("connection error")]
    struct Transport(#[source] std::io::Error);

    #[test]
    fn maps_keel_errors_through_the_chain() {
        let cases: Vec<(BoxError, Code, u16)> = vec![
            (
                crate::breaker::BreakerError::open().into(),
                Code::Unavailable,
                503,
            ),
            (
                crate::bulkhead::BulkheadFull::new().into(),
                Code::ResourceExhausted,
                503,
            ),
            (
                crate::rate_limit::RateLimited::new().into(),
                Code::ResourceExhausted,
                429,
            ),
            (
                crate::deadline::DeadlineExceeded::elapsed().into(),
                Code::DeadlineExceeded,
                504,
            ),
            (
                Box::new(std::io::Error::other(crate::rate_limit::RateLimited::new())),
                Code::ResourceExhausted,
                429,
            ),
            (tonic::Status::not_found("x").into(), Code::NotFound, 404),
            (
                crate::request::check_idempotency_key(b"")
                    .unwrap_err()
                    .into(),
                Code::InvalidArgument,
                400,
            ),
            // Nothing was sent: safe to call UNAVAILABLE.
            (
                crate::classify::NotSent::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))
                .into(),
                Code::Unavailable,
                502,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
                Code::Unavailable,
                502,
            ),
            // The request may have been executed: never UNAVAILABLE, which reads as "not
            // executed" to whoever gets this status handed back.
            (
                std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
                Code::Unknown,
                502,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
                Code::Unknown,
                502,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::BrokenPipe).into(),
                Code::Unknown,
                502,
            ),
            ("opaque".into(), Code::Unknown, 500),
            // A "refused" or "unreachable" kind under a transport's error may come from an
            // established connection that carried the request.
            (
                Box::new(Transport(std::io::Error::from(
                    std::io::ErrorKind::HostUnreachable,
                ))),
                Code::Unknown,
                502,
            ),
        ];
        for (err, code, http) in cases {
            let (c, h) = status_of(err.as_ref());
            assert_eq!((c, h.as_u16()), (code, http), "{err}");
        }
        let status = to_grpc_status(crate::breaker::BreakerError::open().into_boxed().as_ref());
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "circuit breaker is open");
    }
}
