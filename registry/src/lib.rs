//! Service registration and discovery for Keel.
//!
//! A `Registry` registers this process's instances and watches the services it consumes, as a
//! stream of changes over an in-memory snapshot. The ZooKeeper implementation reads and writes the
//! two layouts Java fleets already use (Curator / Spring Cloud JSON under `/services`, Dubbo
//! interface-level URLs under `/dubbo`), so a Rust service can join an existing estate; a static
//! registry serves local development. Nothing is implemented yet: see the project's issues.
