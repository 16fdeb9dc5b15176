//! Keel's shared vocabulary.
//!
//! Every other Keel crate speaks in the types defined here: a [`ServiceInstance`] is one running
//! copy of a service as a registry knows it, an [`Endpoint`] is where to reach it.
//! [`propagation`] carries W3C trace context and baggage over any header map (HTTP, gRPC
//! metadata, Kafka and AMQP headers); it depends only on the OpenTelemetry *API*, never an SDK.
//! [`header`] makes the header values Keel stamps on every request.
//!
//! ```
//! use keel_core::{Endpoint, InstanceStatus, ServiceInstance};
//!
//! let instance = ServiceInstance::new("account", "a-1", Endpoint::new("127.0.0.1", 50051))
//!     .with_metadata("zone", "sh-a");
//! assert_eq!(instance.endpoint.to_string(), "127.0.0.1:50051");
//! assert_eq!(instance.status, InstanceStatus::Up);
//! assert_eq!(instance.metadata.get("zone").map(String::as_str), Some("sh-a"));
//! ```

pub mod header;
mod instance;
pub mod propagation;

pub use instance::{Endpoint, InstanceStatus, ParseEndpointError, ServiceInstance};
