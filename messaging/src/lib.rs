//! Keel messaging over Kafka and RabbitMQ.
//!
//! One publish / consume API over both brokers: a publish returns only once the broker has
//! durably accepted the message (Kafka `acks=all` delivery report, RabbitMQ publisher confirm), and
//! consumption is at-least-once with retries and a dead-letter destination.
//!
//! # Features
//! - `kafka`: the Kafka adapter on rdkafka (builds the vendored librdkafka; needs a C compiler).
//! - `amqp`: the RabbitMQ adapter on lapin.
//!
//! Nothing is implemented yet: see the project's issues.
