//! Keel's gRPC and REST clients.
//!
//! A client is built from a service name: discovery yields the instances, each gets its own
//! connections (gRPC: one HTTP/2 connection; REST: a pool of HTTP/1.1 keep-alive connections,
//! one per call in flight, reused once a response has been read to its end, idle ones kept per
//! `RestBuilder::pool_idle_timeout` and `pool_max_idle`), a balancer
//! (power-of-two-choices over peak-EWMA latency by default) spreads calls, per-endpoint circuit
//! breakers eject sick instances, and a budgeted, outcome-aware retry covers the rest; trace
//! context, deadline, idempotency key and a request id travel with every request. The deadline
//! bounds the whole call, the response body included. Connections to an instance that leaves
//! discovery are retired at once: idle ones close, busy ones when their call is done, and none
//! is dialled again. Also plain base-URL clients for calling through an API gateway, with
//! default headers (e.g. an API key) on every call.
//!
//! ```
//! use std::time::Duration;
//! use keel_client::GrpcChannel;
//! use keel_testkit::echo::{EchoProvider, EchoRequest, echo_client::EchoClient};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let provider = EchoProvider::start("p-1").await?;
//! let channel = GrpcChannel::builder("echo")
//!     .timeout(Duration::from_secs(2))
//!     .endpoints([format!("http://{}", provider.addr())])?;
//! let mut client = EchoClient::new(channel.clone());
//! let reply = client
//!     .echo(EchoRequest { message: "hi".into(), payload: Vec::new() })
//!     .await?
//!     .into_inner();
//! assert_eq!(reply.server_id, "p-1");
//! // The server saw the propagated deadline and a request id.
//! assert!(reply.metadata.contains_key("grpc-timeout"));
//! assert!(reply.metadata.contains_key("x-request-id"));
//! assert_eq!(channel.metrics().get("/keel.echo.v1.Echo/Echo").map(|m| m.requests), Some(1));
//! # Ok(()) }
//! ```
//!
//! From a registry (the discovery future is returned, never spawned behind your back):
//!
//! ```no_run
//! # use std::time::Duration;
//! # use keel_client::{Balance, GrpcChannel};
//! # async fn run(registry: keel_registry::ZkRegistry) -> Result<(), keel_client::Error> {
//! let (channel, discovery) = GrpcChannel::builder("account")
//!     .balance(Balance::P2c)
//!     .zone("sh-a")
//!     .timeout(Duration::from_millis(800))
//!     .discover(&registry)?;
//! tokio::spawn(discovery);
//! channel.ready(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! Marking calls: insert [`keel_breaker::request::Idempotent`] or
//! [`keel_breaker::request::IdempotencyKey`] into a request's extensions to let a call that may
//! have executed be retried (with the same key on every attempt), and a [`HashKey`] to route by
//! key with [`Balance::ConsistentHash`]. Without either, a call whose outcome is unknown is never
//! replayed. A call whose key a Keel server could not use (empty, longer than 255 bytes, not
//! visible ASCII; see [`keel_breaker::request::check_idempotency_key`]) is not sent at all: it
//! fails with [`Error::is_config`] (`INVALID_ARGUMENT`, 400).
//!
//! What counts as certainly not executed, and is therefore sent to another endpoint even when
//! the call is plain: a failed dial, a connection that closed before the request reached it, and
//! on gRPC a stream the provider refused (`REFUSED_STREAM`) or did not take before going away
//! (`GOAWAY`). So a provider shutting down gracefully in a rolling deploy fails no call. A
//! connection that breaks after the request may have reached the provider (a reset, an end of
//! stream) leaves the outcome unknown: `UNKNOWN` (gRPC) or 502, never `UNAVAILABLE`; a deadline
//! that passes in flight is `DEADLINE_EXCEEDED` (504).
//!
//! Dead providers: HTTP/2 keep-alive ([`KeepAlive`]) and TCP keep-alive with a user timeout
//! (`tcp_keepalive` on the builders, [`DEFAULT_TCP_KEEPALIVE`]) end the calls to a provider
//! whose host vanished without closing its connections, even calls without a deadline.
//!
//! Tracing: every call makes an OpenTelemetry client span (`grpc.client` / `http.client`) under
//! the caller's context and sends the span's context downstream. Spans go to OpenTelemetry's
//! global provider, resolved when the client is built, or to the SDK provider given to
//! `tracer_provider` on the builder, which also spares the global API's allocation per span
//! (`keel::App` gives its clients the provider it installed).
//!
//! This crate has no feature flags; it needs a tokio runtime with the time driver.

mod balance;
#[doc(hidden)]
pub mod bench;
mod builder;
mod conn;
mod discovery;
mod error;
mod grpc;
mod h1;
mod lb;
pub mod metrics;
mod options;
mod rest;
mod span;

pub use balance::{Balance, HashKey};
pub use discovery::Discovery;
pub use error::{AllEjected, Error, NoEndpoints, RetryBudgetExhausted};
pub use grpc::{EndpointInfo, GrpcBuilder, GrpcChannel, KeepAlive, ResponseBody, ResponseFuture};
pub use metrics::ClientMetrics;
pub use options::{
    DEFAULT_TCP_KEEPALIVE, TCP_KEEPALIVE_RANGE, TlsConfig, default_endpoint_breaker,
};
pub use rest::{DEFAULT_MAX_RESPONSE_BODY, RestBuilder, RestClient, RestRequest};
