//! Keel's shared vocabulary.
//!
//! Every other Keel crate speaks in the types defined here: a [`ServiceInstance`] is one running
//! copy of a service as a registry knows it, an [`Endpoint`] is where to reach it. Propagation of
//! W3C trace context, baggage, deadlines and idempotency keys over any header map will live here
//! too (it depends only on the OpenTelemetry *API*, never on an SDK).
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

mod instance;

pub use instance::{Endpoint, InstanceStatus, ParseEndpointError, ServiceInstance};
