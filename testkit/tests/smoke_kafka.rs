#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The Kafka-protocol broker on 127.0.0.1 (tansu): topics, `acks=all`, group commits — and
//! after a broker restart the data and the committed offsets are still there.

use keel_testkit::{services, smoke, unique};

#[tokio::test]
async fn produce_consume_commit() {
    let steps = smoke::kafka(services::KAFKA)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        steps.iter().any(|s| s.contains("committed offset 10")),
        "{steps:?}"
    );
}

/// Starts Kafka again if the test fails half way through a restart.
struct KafkaUp;

impl Drop for KafkaUp {
    fn drop(&mut self) {
        let _ = std::process::Command::new(services::script())
            .args(["up", "kafka"])
            .status();
    }
}

#[tokio::test]
#[ignore = "disruptive: restarts the shared Kafka broker; run serially by scripts/test"]
async fn restart_keeps_data_and_committed_offsets() {
    let _guard = KafkaUp;
    let bootstrap = services::KAFKA;
    let topic = unique("keel-restart");
    let group = unique("keel-restart-group");
    smoke::kafka_create_topic(bootstrap, &topic, 1)
        .await
        .unwrap();

    let values: Vec<String> = (0..10).map(|i| format!("{{\"seq\":{i}}}")).collect();
    let producer = smoke::kafka_producer(bootstrap).unwrap();
    smoke::kafka_produce(&producer, &topic, &values)
        .await
        .unwrap();
    drop(producer);

    // Handle and commit the first half, then let the group go.
    let consumer = smoke::kafka_consumer(bootstrap, &group, &topic).unwrap();
    let first = smoke::kafka_consume_and_commit(&consumer, 5).await.unwrap();
    assert_eq!(first, values[..5]);
    drop(consumer);
    assert_eq!(
        smoke::kafka_committed(bootstrap, &group, &topic)
            .await
            .unwrap(),
        Some(5)
    );

    services::run(&["restart", "kafka"]).await.unwrap();

    // The committed offset survived: the group resumes exactly at message 5.
    assert_eq!(
        smoke::kafka_committed(bootstrap, &group, &topic)
            .await
            .unwrap(),
        Some(5)
    );
    let consumer = smoke::kafka_consumer(bootstrap, &group, &topic).unwrap();
    let rest = smoke::kafka_consume_and_commit(&consumer, 5).await.unwrap();
    assert_eq!(rest, values[5..]);
    drop(consumer);

    // The data survived: a new group reads all ten from the beginning.
    let fresh = smoke::kafka_consumer(bootstrap, &unique("keel-restart-fresh"), &topic).unwrap();
    let all = smoke::kafka_consume_and_commit(&fresh, 10).await.unwrap();
    assert_eq!(all, values);
    drop(fresh);

    smoke::kafka_delete_topic(bootstrap, &topic).await;
}
