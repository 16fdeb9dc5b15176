//! Resilience layers for Keel, as [tower] middleware.
//!
//! * [`breaker`]: circuit breaker with resilience4j semantics (so a Java team can port its
//!   configuration field by field), per endpoint (not ready when open) or per service (fail
//!   fast).
//! * [`retry`]: retries with a budget, exponential backoff with full jitter and outcome
//!   awareness (NOT_SENT / REJECTED / UNKNOWN, idempotency).
//! * [`deadline`]: a per-call timeout that travels downstream (`grpc-timeout`,
//!   `x-keel-deadline`) and shrinks as time is spent.
//! * [`bulkhead`] (concurrency limit with an optional bounded wait) and [`rate_limit`] (token
//!   bucket).
//! * [`classify`]: how responses and errors count; [`status`]: the one mapping of any Keel error
//!   to a gRPC and an HTTP status.
//!
//! No layer spawns tasks; every layer reads time through `tokio::time`, so tests run with paused
//! time.
//!
//! # Example
//!
//! ```
//! use keel_breaker::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
//! use tower_layer::Layer;
//! use tower_service::Service;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_breaker::BoxError> {
//! let config: BreakerConfig = serde_json::from_str(
//!     r#"{ "failureRateThreshold": 50, "slidingWindowSize": 10,
//!          "minimumNumberOfCalls": 4, "waitDurationInOpenState": "800ms" }"#,
//! )?;
//! let breaker = Breaker::new(config)?;
//! let backend = tower::service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(
//!         http::Response::builder().status(503).body(()).unwrap_or_default(),
//!     )
//! });
//! let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer(backend);
//! for _ in 0..4 {
//!     std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
//!     let response = svc.call(http::Request::new(())).await?;
//!     assert_eq!(response.status(), 503);
//! }
//! // Four failures out of four calls: the breaker is open and fails fast.
//! std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
//! let err = svc.call(http::Request::new(())).await.unwrap_err();
//! let (code, http_status) = keel_breaker::status::status_of(err.as_ref());
//! assert_eq!((code, http_status.as_u16()), (tonic::Code::Unavailable, 503));
//! # Ok(())
//! # }
//! ```
//!
//! [tower]: https://docs.rs/tower

pub mod breaker;
pub mod bulkhead;
pub mod classify;
pub mod clock;
pub mod deadline;
pub mod duration;
pub mod rate_limit;
pub mod request;
pub mod retry;
pub mod status;

/// The error type of every layer: callers downcast or walk the source chain (see [`status`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
