#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! RabbitMQ on 127.0.0.1: durable queue, confirmed persistent publish, consume, ack.

use keel_testkit::{services, smoke};

#[tokio::test]
async fn durable_queue_confirmed_publish_consume_ack() {
    let steps = smoke::rabbitmq(services::AMQP)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        steps.iter().any(|s| s.contains("broker confirmed")),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|s| s.contains("(0 messages left)")),
        "{steps:?}"
    );
}
