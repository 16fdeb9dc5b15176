//! Keel: a microservice framework for Rust services that move money.
//!
//! This facade re-exports Keel's crates and will host `App`, the one builder that takes a service
//! from its configuration file to registered, observable, gracefully stopping servers.
//!
//! - [`core`]: shared vocabulary (instances, endpoints, propagation).
//! - [`registry`]: registration and discovery (ZooKeeper, static).
//! - [`breaker`]: resilience layers.
//! - [`client`]: gRPC and REST clients over discovery.
//! - [`messaging`]: Kafka and RabbitMQ.

pub use keel_breaker as breaker;
pub use keel_client as client;
pub use keel_core as core;
pub use keel_messaging as messaging;
pub use keel_registry as registry;
