//! Kafka broker restart in the middle of publishing and consuming (disruptive).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Seen;
use keel_messaging::{Consumer, Publisher};
use keel_testkit::services::{KAFKA, run, script};
use keel_testkit::smoke::kafka_delete_topic;
use keel_testkit::{eventually, unique};
use tokio_util::sync::CancellationToken;

const BROKER: &str = "kafka://127.0.0.1:9092";

/// Brings the broker back up whatever happens to the test.
struct Up(&'static str);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script())
            .args(["up", self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "disruptive: restarts the shared broker; run serially by scripts/test"]
async fn restart_mid_publish_and_mid_consume_loses_no_confirmed_message() {
    let _up = Up("kafka");
    let topic = unique("keel-msg-krestart");
    let publisher = Publisher::builder(BROKER)
        .unwrap()
        .confirm_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    publisher.declare(&topic, 4).await.unwrap();

    let seen = Seen::default();
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(BROKER, &topic, unique("g"))
        .unwrap()
        .kafka_option("session.timeout.ms", "6000")
        .kafka_option("heartbeat.interval.ms", "1000")
        .build()
        .unwrap();
    let consuming = tokio::spawn(consumer.run(seen.handler(), stop.clone().cancelled_owned()));

    // Publish in batches of 50 until well after the restart; a message handed back unconfirmed
    // is published again.
    let restarted = Arc::new(AtomicBool::new(false));
    let publishing =
        common::publish_through_restart(publisher.clone(), topic.clone(), restarted.clone());
    eventually(
        "1 000 published and consumed before the restart",
        Duration::from_secs(90),
        || async { (seen.distinct() >= 1_000).then_some(()) },
    )
    .await
    .unwrap();
    let before = seen.distinct();
    let t = Instant::now();
    run(&["restart", "kafka"]).await.unwrap();
    eprintln!("restarted in {:?} with {before} consumed", t.elapsed());
    restarted.store(true, Ordering::SeqCst);
    let (confirmed, failures) = tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .expect("publishing finished within 180 s of the restart")
        .unwrap();
    let published = confirmed.len() as u64;
    assert_eq!(
        confirmed,
        (0..published).collect(),
        "every message eventually confirmed"
    );
    eprintln!("{published} confirmed, {failures} publish failures retried");
    eventually(
        "every confirmed message consumed",
        Duration::from_secs(120),
        || async {
            seen.missing(confirmed.iter().copied())
                .is_empty()
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        let missing = seen.missing(confirmed.iter().copied());
        panic!(
            "{e}: {} consumed, {} missing (first {:?}), {failures} publish failures",
            seen.distinct(),
            missing.len(),
            &missing[..missing.len().min(10)]
        )
    });
    assert!(
        seen.distinct() as u64 > before as u64,
        "consumption went on after the restart"
    );
    seen.assert_key_order();
    eprintln!(
        "{} handled ({} redelivered)",
        seen.handled(),
        seen.handled() - seen.distinct() as u64
    );
    stop.cancel();
    consuming.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
}
