//! Keel's gRPC and REST clients.
//!
//! A client is built from a service name: discovery yields the instances, each gets its own
//! connection, a balancer (power-of-two-choices over peak-EWMA latency by default) spreads calls,
//! per-endpoint circuit breakers eject sick instances, and a budgeted, outcome-aware retry covers
//! the rest; trace context, deadline and idempotency key travel with every request. Also plain
//! base-URL clients for calling through an API gateway. Nothing is implemented yet: see the
//! project's issues.
