//! Resilience layers for Keel, as [tower] middleware.
//!
//! Circuit breaker (resilience4j semantics, so a Java team can port its configuration field by
//! field), retry with a budget and outcome awareness, deadlines that travel downstream, bulkhead
//! and rate limit. Nothing is implemented yet: see the project's issues.
//!
//! [tower]: https://docs.rs/tower
