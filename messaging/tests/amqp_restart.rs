//! RabbitMQ broker restart in the middle of publishing and consuming (disruptive).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Seen;
use keel_messaging::{Consumer, Publisher};
use keel_testkit::services::{AMQP, run, script};
use keel_testkit::{eventually, unique};
use tokio_util::sync::CancellationToken;

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
    // This once stalled in about one run in three: an ack issued as the connection died never
    // completed in lapin, the session waited for it before reconnecting, and the consumer
    // stopped for good. `RUST_LOG=keel_messaging=debug` shows abandoned acks
    // ("connection lost while acknowledging").
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let _up = Up("rabbitmq");
    let queue = unique("keel-msg-restart");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();

    let seen = Seen::default();
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(AMQP, &queue, "g")
        .unwrap()
        .reconnect_backoff(Duration::from_millis(100))
        .build()
        .unwrap();
    let consuming = tokio::spawn(consumer.run(seen.handler(), stop.clone().cancelled_owned()));

    // Publish in batches of 50 until well after the restart; a message handed back unconfirmed
    // is published again.
    let restarted = Arc::new(AtomicBool::new(false));
    let publishing =
        common::publish_through_restart(publisher.clone(), queue.clone(), restarted.clone());
    eventually(
        "a third published and consumed",
        Duration::from_secs(60),
        || async { (seen.distinct() >= 1_000).then_some(()) },
    )
    .await
    .unwrap();
    run(&["restart", "rabbitmq"]).await.unwrap();
    restarted.store(true, Ordering::SeqCst);
    let (confirmed, failures) = publishing.await.unwrap();
    assert!(failures > 0, "the restart interrupted publishing");
    let published = confirmed.len() as u64;
    assert_eq!(
        confirmed,
        (0..published).collect(),
        "every message eventually confirmed"
    );
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
        panic!(
            "{e}: {} consumed, {failures} publish failures",
            seen.distinct()
        )
    });
    stop.cancel();
    consuming.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.clone(), format!("{queue}.dlq")] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
}
