//! A runnable payments system built only on Keel's public API: `account` (gRPC balances),
//! `payment` (REST front door) and `ledger` (Kafka consumer forwarding to RabbitMQ). Not built
//! yet: see the project's issues.
