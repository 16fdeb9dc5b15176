//! The operators' examples (`publish`, `consume`), run as the programs they are against the live
//! brokers, with the command lines: what they print is checked line by line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::WAIT;
use keel_messaging::{Headers, Publisher};
use keel_testkit::services::{AMQP, KAFKA};
use keel_testkit::smoke::{kafka_consumer, kafka_delete_topic};
use keel_testkit::unique;
use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};

/// The example program `name`, built by `cargo test` beside this test (built here when only this
/// test target was asked for).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join(name);
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "keel-messaging", "--examples"])
            .status()
            .unwrap();
        assert!(status.success(), "building the examples failed");
    }
    path
}

/// Runs example `name` with `args` to its end (within the wait); its stdout lines.
async fn run(name: &str, args: &[&str]) -> Vec<String> {
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(example(name))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} {args:?} did not finish"))
    .unwrap();
    assert!(
        output.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A poison message, then `publish --count 20 --key acct-1`; then `consume --max 20
/// --fail-every 5`: every message handled once in order, seq 4, 9, 14 and 19 on their second
/// attempt, all in the publisher's trace. (The poison message goes to the dead-letter
/// destination: the callers read it there.)
async fn publish_then_consume(broker: &str, destination: &str, group: &str, extra: &[&str]) {
    let publisher = Publisher::connect(broker).await.unwrap();
    publisher.declare(destination, 4).await.unwrap();
    publisher
        .publish(
            destination,
            Some(b"acct-1"),
            b"\0not json".to_vec(),
            Headers::new(),
        )
        .await
        .unwrap();
    publisher.close().await.unwrap();

    let summary = run(
        "publish",
        &[
            "--broker",
            broker,
            "--destination",
            destination,
            "--count",
            "20",
            "--key",
            "acct-1",
        ],
    )
    .await;
    let summary: serde_json::Value = serde_json::from_str(summary.last().unwrap()).unwrap();
    assert_eq!(summary, serde_json::json!({"published": 20, "failed": 0}));

    let mut args = vec![
        "--broker",
        broker,
        "--destination",
        destination,
        "--group",
        group,
        "--max",
        "20",
        "--fail-every",
        "5",
    ];
    args.extend_from_slice(extra);
    let lines = run("consume", &args).await;
    let handled: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = handled.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>(), "once each, in key order");
    let trace = |m: &serde_json::Value| m["traceparent"].as_str().unwrap()[3..35].to_owned();
    for m in &handled {
        assert_eq!(m["key"], "acct-1");
        assert_eq!(trace(m), trace(&handled[0]), "one trace for the run: {m}");
        let seq = m["seq"].as_u64().unwrap();
        let attempt = if (seq + 1) % 5 == 0 { 2 } else { 1 };
        assert_eq!(m["attempt"], attempt, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_publish_and_consume_over_rabbitmq() {
    let queue = unique("keel-msg-example");
    publish_then_consume(AMQP, &queue, "ledger", &[]).await;

    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dlq = format!("{queue}.dlq");
    let letter = common::amqp_get(&ch, &dlq).await;
    assert_eq!(letter.delivery.data, b"\0not json");
    for q in [queue.as_str(), dlq.as_str()] {
        let _ = ch
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_publish_and_consume_over_kafka() {
    let topic = unique("keel-msg-example");
    let group = unique("ledger");
    publish_then_consume(
        KAFKA_URL,
        &topic,
        &group,
        &[
            "--kafka-option",
            "session.timeout.ms=6000",
            "--kafka-option",
            "heartbeat.interval.ms=1000",
        ],
    )
    .await;

    let dlq = format!("{topic}.{group}.dlq");
    let reader = kafka_consumer(KAFKA, &unique("dlq-reader"), &dlq).unwrap();
    let letter = tokio::time::timeout(WAIT, reader.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rdkafka::Message::payload(&letter), Some(&b"\0not json"[..]));
    drop(letter);
    drop(reader);
    kafka_delete_topic(KAFKA, &topic).await;
    kafka_delete_topic(KAFKA, &dlq).await;
}

/// Kafka as the examples' `--broker` takes it.
const KAFKA_URL: &str = "kafka://127.0.0.1:9092";
