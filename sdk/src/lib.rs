//! Keel: a microservice framework for Rust services that move money.
//!
//! [`App`] takes a service from its configuration file to registered, observable, gracefully
//! stopping servers; the re-exported crates are the parts it is made of:
//!
//! ```no_run
//! use axum::routing::get;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), keel::Error> {
//!     // keel.toml (or $KEEL_CONFIG) + KEEL_* overrides; telemetry; the registry session.
//!     let app = keel::App::from_config("greeter").await?;
//!     let routes = axum::Router::new().route("/hello", get(|| async { "hello" }));
//!     // Binds, serves /health/*, /metrics, /registry on the admin port, registers when ready,
//!     // and on SIGTERM: not ready → deregister → drain → finish in-flight → exit.
//!     app.rest(routes).run().await
//! }
//! ```
//!
//! - [`config`]: the configuration file and its environment overrides.
//! - [`idempotency`]: the server-side layer that executes a request with an idempotency key once.
//! - [`core`]: shared vocabulary (instances, endpoints, propagation).
//! - [`registry`]: registration and discovery (ZooKeeper, static).
//! - [`breaker`]: resilience layers.
//! - [`client`]: gRPC and REST clients over discovery.
//! - [`messaging`]: Kafka and RabbitMQ (features `kafka`, `amqp`).
//!
//! Features: `kafka`, `amqp` (messaging brokers), `redis` (the shared idempotency store).

mod app;
pub mod config;
mod error;
pub mod idempotency;
mod metrics;
mod server;
mod telemetry;

pub use app::{App, Running, ShutdownHandle};
pub use error::Error;
pub use metrics::Metrics;
pub use server::{ServerBody, ServerFuture, ServerLayer, ServerService};
pub use telemetry::Telemetry;

pub use keel_breaker as breaker;
pub use keel_client as client;
pub use keel_core as core;
pub use keel_messaging as messaging;
pub use keel_registry as registry;

/// Re-exported so services need not pin their own versions to match Keel's.
pub use {axum, prometheus_client, tonic};
