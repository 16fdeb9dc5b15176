//! Kafka adapter against the live Kafka-protocol broker (tansu) on 127.0.0.1:9092.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Seen, WAIT, publish_all};
use keel_messaging::headers::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_GROUP, DLQ_ORIGINAL_DESTINATION, IDEMPOTENCY_KEY, MESSAGE_ID,
};
use keel_messaging::{
    Consumer, Headers, Json, OutgoingMessage, Publisher, Received, RetryPolicy, typed,
};
use keel_testkit::services::KAFKA;
use keel_testkit::smoke::{kafka_consumer, kafka_delete_topic};
use keel_testkit::{eventually, unique};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::Message as _;
use rdkafka::message::Headers as _;
use tokio_util::sync::CancellationToken;

const BROKER: &str = "kafka://127.0.0.1:9092";

/// The tests in this file take turns (test coordination only). This was added when concurrent
/// runs timed out on admin and group operations and once crashed with SIGSEGV; the timeouts are
/// explained by each test's cleanup then deleting *every* topic on tansu (see
/// `keel_testkit::smoke::kafka_delete_topic`), which also killed the broker's storage. Without
/// the lock, three concurrent runs passed since; the SIGSEGV was never reproduced or explained,
/// so the lock stays until it is.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn consumer(topic: &str, group: &str) -> keel_messaging::ConsumerBuilder {
    Consumer::builder(BROKER, topic, group)
        .unwrap()
        .kafka_option("session.timeout.ms", "6000")
        .kafka_option("heartbeat.interval.ms", "1000")
}

/// The issue's volume test. It once stalled here (nothing consumed in 150 s): tansu 0.6.0 had no
/// index on its header table, so each fetched record scanned every header ever stored, and one
/// fetch of 10 000 records outlasted librdkafka's request timeout. `scripts/services` now adds
/// the index; this runs in a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_none_lost_key_order_kept() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-10k");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 16).await.unwrap();
    publish_all(&publisher, &topic, 10_000, 64, 2_000).await;

    let seen = Seen::default();
    let stop = CancellationToken::new();
    let c = consumer(&topic, &unique("g")).build().unwrap();
    let run = tokio::spawn(c.run(seen.handler(), stop.clone().cancelled_owned()));
    eventually("all 10 000 consumed", WAIT, || async {
        (seen.distinct() == 10_000).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {} of 10 000 consumed", seen.distinct()));
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        seen.handled(),
        10_000,
        "nothing handled twice in a quiet run"
    );
    seen.assert_key_order();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_dead_lettered_with_reason_trace_continues_others_flow() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-poison");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 2).await.unwrap();
    let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let cx = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let mut batch = common::batch(&topic, 0, 20, 4);
    batch.insert(
        3,
        OutgoingMessage::new(&topic, "\u{0}not json").with_key("k1"),
    );
    let results = publisher.send_batch(batch).with_context(cx).await;
    assert!(results.iter().all(Result::is_ok));

    let handled = Seen::default();
    let traces = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let (handled, traces) = (handled.clone(), traces.clone());
        typed(Json::<serde_json::Value>::new(), move |_v, m: Received| {
            let (handled, traces) = (handled.clone(), traces.clone());
            async move {
                let current = opentelemetry::Context::current()
                    .span()
                    .span_context()
                    .trace_id();
                traces
                    .lock()
                    .unwrap()
                    .push((current, m.traceparent().map(str::to_owned)));
                handled.record(&m).map(|_| ())
            }
        })
    };
    let stop = CancellationToken::new();
    let c = consumer(&topic, &group)
        .retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        })
        .build()
        .unwrap();
    let dlq = c.dead_letter_destination();
    assert_eq!(dlq, format!("{topic}.{group}.dlq"));
    let run = tokio::spawn(c.run(handler, stop.clone().cancelled_owned()));
    eventually("the 20 good ones handled", WAIT, || async {
        (handled.distinct() == 20).then_some(())
    })
    .await
    .unwrap();
    for (current, traceparent) in traces.lock().unwrap().iter() {
        assert_eq!(*current, trace_id, "handler runs in the producer's trace");
        assert!(
            traceparent
                .as_deref()
                .unwrap()
                .contains("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
    // The dead letter, read back from `<topic>.<group>.dlq`.
    let (letter, h) = read_dead_letter(&dlq).await;
    assert_eq!(letter.payload(), Some(&b"\0not json"[..]));
    assert_eq!(h.get_str(DLQ_ORIGINAL_DESTINATION), Some(topic.as_str()));
    assert_eq!(h.get_str(DLQ_GROUP), Some(group.as_str()));
    assert_eq!(h.get_str(DLQ_ATTEMPTS), Some("1"));
    assert!(
        h.get_str(DLQ_ERROR).unwrap().contains("cannot decode"),
        "{h:?}"
    );
    // The envelope is on the wire once: the message id, and no `idempotency-key` header since
    // the producer set none (the key is the message id).
    assert!(h.get_str(MESSAGE_ID).is_some(), "{h:?}");
    assert_eq!(h.get_str(IDEMPOTENCY_KEY), None, "{h:?}");
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
    kafka_delete_topic(KAFKA, &dlq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_share_partitions_and_a_member_leaving_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-group");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 4).await.unwrap();
    publish_all(&publisher, &topic, 1_000, 16, 1_000).await;

    let (a, b, c) = (Seen::default(), Seen::default(), Seen::default());
    let all = Seen::default();
    let both = |s: &Seen| {
        let (s, all) = (s.clone(), all.clone());
        move |m: Received| {
            let (s, all) = (s.clone(), all.clone());
            async move {
                all.record(&m)?;
                s.record(&m).map(|_| ())
            }
        }
    };
    let stop_ab = CancellationToken::new();
    let run_a = tokio::spawn(
        consumer(&topic, &group)
            .build()
            .unwrap()
            .run(both(&a), stop_ab.clone().cancelled_owned()),
    );
    let run_b = tokio::spawn(
        consumer(&topic, &group)
            .build()
            .unwrap()
            .run(both(&b), stop_ab.clone().cancelled_owned()),
    );
    eventually("first 1 000 consumed", WAIT, || async {
        (all.distinct() == 1_000).then_some(())
    })
    .await
    .unwrap();

    // A third member joins, takes partitions, handles some, then leaves.
    let stop_c = CancellationToken::new();
    let run_c = tokio::spawn(
        consumer(&topic, &group)
            .build()
            .unwrap()
            .run(both(&c), stop_c.clone().cancelled_owned()),
    );
    let mut next = 1_000;
    eventually("the third member handles messages", WAIT, || {
        let (publisher, topic, c) = (publisher.clone(), topic.clone(), c.clone());
        let from = next;
        next += 50;
        async move {
            for r in publisher
                .send_batch(common::batch(&topic, from, from + 50, 16))
                .await
            {
                r.unwrap();
            }
            (c.handled() > 0).then_some(())
        }
    })
    .await
    .unwrap();
    stop_c.cancel();
    run_c.await.unwrap().unwrap();
    publish_all(&publisher, &topic, 0, 16, 1).await;
    for r in publisher
        .send_batch(common::batch(&topic, next, next + 500, 16))
        .await
    {
        r.unwrap();
    }
    let total = next + 500;
    eventually(
        "everything consumed after the third member left",
        WAIT,
        || async { (all.distinct() as u64 == total).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; missing {:?}",
            &all.missing(0..total)[..10.min(all.missing(0..total).len())]
        )
    });
    assert!(
        a.handled() > 0 && b.handled() > 0,
        "both members got partitions: {} / {}",
        a.handled(),
        b.handled()
    );
    all.assert_key_order();
    stop_ab.cancel();
    run_a.await.unwrap().unwrap();
    run_b.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
}

/// Shutdown with a handler in flight: the consumer stops fetching, waits for the handler,
/// commits what was handled — the held message included — and returns; the group's next
/// consumer starts right after it (nothing handled twice, nothing skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_handler_in_flight_and_commits_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-shutdown");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 1).await.unwrap();
    publish_all(&publisher, &topic, 10, 1, 10).await;

    let held = common::Held::new(4);
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        consumer(&topic, &group)
            .build()
            .unwrap()
            .run(held.handler(), stop.clone().cancelled_owned()),
    );
    common::shut_down_with_a_handler_in_flight(&held, &stop, run).await;
    assert_eq!(
        held.handled(),
        [0, 1, 2, 3, 4],
        "in key order, up to the held one"
    );
    assert_eq!(
        keel_testkit::smoke::kafka_committed(KAFKA, &group, &topic)
            .await
            .unwrap(),
        Some(5),
        "committed through the message that was in flight"
    );

    let next = common::Held::new(u64::MAX);
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        consumer(&topic, &group)
            .build()
            .unwrap()
            .run(next.handler(), stop.clone().cancelled_owned()),
    );
    next.wait_for(5).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(next.handled(), [5, 6, 7, 8, 9]);
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
}

/// Produces `payload` (key `k`) to `topic` with a header whose name is the bytes `name`, which
/// rdkafka's safe API cannot write (it takes `&str` names): added through librdkafka's C API.
async fn produce_with_raw_header_name(topic: &str, name: &[u8], payload: &str) {
    let headers = rdkafka::message::OwnedHeaders::new();
    let native = std::ptr::from_ref(headers.as_borrowed())
        .cast_mut()
        .cast::<rdkafka::bindings::rd_kafka_headers_t>();
    let value = b"acme";
    // SAFETY: `native` is the headers object `headers` owns (nothing else refers to it yet);
    // name and value are valid for their lengths, which librdkafka copies.
    #[allow(unsafe_code)]
    let err = unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            isize::try_from(name.len()).unwrap(),
            value.as_ptr().cast(),
            isize::try_from(value.len()).unwrap(),
        )
    };
    assert_eq!(
        err,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    let producer = keel_testkit::smoke::kafka_producer(KAFKA).unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topic)
                .key("k")
                .payload(payload)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// A record whose header name is not UTF-8 (rdkafka's header reader panics on it, which killed
/// the partition's worker and stalled the partition) is dead-lettered without running the
/// handler, with a reason naming the header; the record after it on the partition is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_and_the_partition_goes_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-badheader");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 1).await.unwrap();
    produce_with_raw_header_name(&topic, b"tenant-\xff\xfe", "{\"seq\":0}").await;
    for r in publisher.send_batch(common::batch(&topic, 1, 2, 1)).await {
        r.unwrap();
    }

    let handled = Seen::default();
    let stop = CancellationToken::new();
    let c = consumer(&topic, &group).build().unwrap();
    let dlq = c.dead_letter_destination();
    let run = tokio::spawn(c.run(handled.handler(), stop.clone().cancelled_owned()));
    handled
        .wait_distinct("the record after the malformed one handled", 1, WAIT)
        .await;
    assert_eq!(handled.missing(1..2), Vec::<u64>::new());
    assert_eq!(
        handled.handled(),
        1,
        "the malformed record never reached the handler"
    );

    let (letter, h) = read_dead_letter(&dlq).await;
    assert_eq!(letter.payload(), Some(&b"{\"seq\":0}"[..]));
    assert_eq!(
        h.get_str(DLQ_ERROR),
        Some(r#"record header name b"tenant-\xff\xfe" is not UTF-8"#),
        "{h:?}"
    );
    assert_eq!(h.get_str(DLQ_ATTEMPTS), Some("0"), "the handler never ran");
    assert_eq!(
        h.get_str("tenant-\u{fffd}\u{fffd}"),
        Some("acme"),
        "the header, its name decoded lossily: {h:?}"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
    kafka_delete_topic(KAFKA, &dlq).await;
}

/// A handler that panics on seq 1 (one key, one partition): the panic was not caught, killed the
/// partition's worker and stalled the partition. Now it is a permanent failure: seq 1 is
/// dead-lettered with the panic's message and the partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_dead_letters_its_message_and_the_partition_goes_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-panic");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 1).await.unwrap();
    publish_all(&publisher, &topic, 10, 1, 10).await;

    let handled = Seen::default();
    let stop = CancellationToken::new();
    let c = consumer(&topic, &group).build().unwrap();
    let dlq = c.dead_letter_destination();
    let run = tokio::spawn(c.run(
        common::panicking_on(1, &handled),
        stop.clone().cancelled_owned(),
    ));
    handled
        .wait_distinct("the other nine handled", 9, WAIT)
        .await;
    assert_eq!(handled.missing(0..10), [1]);
    handled.assert_key_order();

    let (letter, h) = read_dead_letter(&dlq).await;
    assert_eq!(letter.payload(), Some(&b"{\"seq\":1}"[..]));
    assert_eq!(
        h.get_str(DLQ_ERROR),
        Some("handler panicked: seq 1 is cursed")
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
    kafka_delete_topic(KAFKA, &dlq).await;
}

/// A partition worker that dies (here: the handler's error panics when Keel prints it, outside
/// the handler) ends the consumer with an error instead of leaving the partition stalled in
/// silence; what was handled before it is committed, nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_worker_that_dies_ends_the_consumer_with_an_error() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-deadworker");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 1).await.unwrap();
    publish_all(&publisher, &topic, 10, 1, 10).await;

    let handled = Seen::default();
    let stop = CancellationToken::new();
    let run = tokio::spawn(consumer(&topic, &group).build().unwrap().run(
        common::unprintable_on(1, &handled),
        stop.clone().cancelled_owned(),
    ));
    let error = tokio::time::timeout(WAIT, run)
        .await
        .expect("the consumer ends on its own")
        .unwrap()
        .expect_err("with an error");
    assert!(
        error.to_string().contains("a partition worker failed"),
        "{error}"
    );
    assert_eq!(handled.missing(0..10), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(
        keel_testkit::smoke::kafka_committed(KAFKA, &group, &topic)
            .await
            .unwrap(),
        Some(1),
        "committed through seq 0, not past the message that failed"
    );
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
}

/// Partitions and replicas per partition of `topic`, from the broker's metadata.
async fn topic_layout(topic: &str) -> Option<Vec<usize>> {
    use rdkafka::consumer::Consumer as _;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .create()
            .ok()?;
        let metadata = client
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .ok()?;
        let t = metadata.topics().first()?;
        (t.error().is_none() && !t.partitions().is_empty())
            .then(|| t.partitions().iter().map(|p| p.replicas().len()).collect())
    })
    .await
    .unwrap()
}

/// Topics Keel creates (declared ones and dead-letter topics) ask for the broker's default
/// replication factor (-1, KIP-464) rather than 1, which tansu accepts; an explicit factor is
/// used as given, and one that is neither -1 nor at least 1 is refused when building.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_keel_creates_get_the_brokers_default_replication() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-rf");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 3).await.unwrap();
    let layout = eventually("the declared topic's metadata", WAIT, || {
        topic_layout(&topic)
    })
    .await
    .unwrap();
    assert_eq!(layout.len(), 3, "{layout:?}");
    assert!(layout.iter().all(|&r| r >= 1), "{layout:?}");

    // The dead-letter topic is created on first use, with the broker's default too.
    let mut poison = OutgoingMessage::new(&topic, "not json").with_key("k");
    poison.headers.insert("content-type", "application/json");
    publisher.send(poison).await.unwrap();
    let stop = CancellationToken::new();
    let c = consumer(&topic, &group).build().unwrap();
    let dlq = c.dead_letter_destination();
    let handler = typed(Json::<serde_json::Value>::new(), |_v, _m: Received| async {
        Ok::<(), keel_messaging::HandlerError>(())
    });
    let run = tokio::spawn(c.run(handler, stop.clone().cancelled_owned()));
    let layout = eventually("the dead-letter topic's metadata", WAIT, || {
        topic_layout(&dlq)
    })
    .await
    .unwrap();
    assert_eq!(layout.len(), 1, "{layout:?}");
    stop.cancel();
    run.await.unwrap().unwrap();

    let explicit = unique("keel-msg-rf1");
    let one = Publisher::builder(BROKER)
        .unwrap()
        .kafka_replication_factor(1)
        .build()
        .await
        .unwrap();
    one.declare(&explicit, 1).await.unwrap();
    assert_eq!(
        eventually("the explicit topic's metadata", WAIT, || topic_layout(
            &explicit
        ))
        .await
        .unwrap(),
        [1]
    );
    for bad in [0, -2] {
        let error = Publisher::builder(BROKER)
            .unwrap()
            .kafka_replication_factor(bad)
            .build()
            .await
            .unwrap_err();
        assert!(error.to_string().contains("replication factor"), "{error}");
        let error = consumer(&topic, &group)
            .kafka_replication_factor(bad)
            .build()
            .unwrap_err();
        assert!(error.to_string().contains("replication factor"), "{error}");
    }
    one.close().await.unwrap();
    publisher.close().await.unwrap();
    for t in [&topic, &dlq, &explicit] {
        kafka_delete_topic(KAFKA, t).await;
    }
}

/// A handler fails permanently with a 2 000 000-byte error. The dead letter carried it whole in
/// a header, above the producer's `message.max.bytes` (1 MB): the publish failed as too large,
/// was retried for ever and the partition stalled behind it. The reason is now cut to
/// `DLQ_ERROR_MAX_BYTES`: the dead letter arrives and the messages after it are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_handler_error_is_truncated_and_the_partition_goes_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-hugeerr");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 1).await.unwrap();
    publish_all(&publisher, &topic, 6, 1, 6).await;

    let handled = Seen::default();
    let handler = {
        let handled = handled.clone();
        move |m: Received| {
            let handled = handled.clone();
            async move {
                if m.payload.as_ref() == b"{\"seq\":0}" {
                    return Err(keel_messaging::HandlerError::permanent(
                        "e".repeat(2_000_000),
                    ));
                }
                handled.record(&m).map(|_| ())
            }
        }
    };
    let stop = CancellationToken::new();
    let c = consumer(&topic, &group)
        .retry(RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        })
        .build()
        .unwrap();
    let dlq = c.dead_letter_destination();
    let run = tokio::spawn(c.run(handler, stop.clone().cancelled_owned()));
    handled
        .wait_distinct("the five after it handled", 5, WAIT)
        .await;
    assert_eq!(handled.missing(1..6), Vec::<u64>::new());

    let (letter, h) = read_dead_letter(&dlq).await;
    assert_eq!(letter.payload(), Some(&b"{\"seq\":0}"[..]));
    let error = h.get_str(DLQ_ERROR).unwrap();
    assert!(
        error.len() <= keel_messaging::headers::DLQ_ERROR_MAX_BYTES,
        "{} bytes",
        error.len()
    );
    assert!(error.starts_with("eeeeeeee"), "{error:.80}");
    assert!(
        error.contains("2000000 bytes"),
        "says it was cut: {error:?}"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
    kafka_delete_topic(KAFKA, &dlq).await;
}

/// Produces `{"seq":i}` for `seqs` to partition `partition` of `topic` (key `p<partition>`),
/// waiting for every report.
async fn produce_to_partition(topic: &str, partition: i32, seqs: std::ops::Range<u64>) {
    let producer = keel_testkit::smoke::kafka_producer(KAFKA).unwrap();
    let mut reports = Vec::new();
    for seq in seqs {
        let payload = format!("{{\"seq\":{seq}}}");
        let key = format!("p{partition}");
        let record = rdkafka::producer::FutureRecord::to(topic)
            .partition(partition)
            .key(&key)
            .payload(&payload);
        reports.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for report in reports {
        report.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Partition 0's handler is stuck: its worker's queue (1024) filled and the fetch loop waited
/// on it, so partition 1 got nothing more (and rebalances were not served). Now a partition
/// whose queue is full is paused, its next message held, and resumed once the queue drains:
/// partition 1 is handled while partition 0 is stuck, and partition 0 loses nothing and keeps
/// its order once it moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_partition_does_not_stop_the_others() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-stuck");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 2).await.unwrap();
    produce_to_partition(&topic, 0, 0..2000).await;

    let handled = Seen::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (handled, gate, entered) = (handled.clone(), gate.clone(), entered.clone());
        move |m: Received| {
            let (handled, gate, entered) = (handled.clone(), gate.clone(), entered.clone());
            async move {
                if m.partition == Some(0) {
                    entered.notify_one();
                    let _pass = gate.acquire().await;
                }
                handled.record(&m).map(|_| ())
            }
        }
    };
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        consumer(&topic, &group)
            .build()
            .unwrap()
            .run(handler, stop.clone().cancelled_owned()),
    );
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .expect("partition 0's handler runs");
    produce_to_partition(&topic, 1, 10_000..10_005).await;
    handled
        .wait_distinct(
            "partition 1 handled while partition 0 is stuck",
            5,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(handled.missing(10_000..10_005), Vec::<u64>::new());

    gate.add_permits(1);
    handled
        .wait_distinct("partition 0 handled once it moves", 2005, WAIT)
        .await;
    assert_eq!(handled.missing(0..2000), Vec::<u64>::new());
    assert_eq!(handled.handled(), 2005, "none handled twice");
    handled.assert_key_order();
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
}

/// One execution of a handler: the offset, when it started and when it ended.
type Execution = (i64, std::time::Instant, std::time::Instant);

/// A revoke whose drain times out while a handler is running: the partition comes back to the
/// same consumer (an eager rebalance when a second member joins the group), and its new worker
/// used to handle the partition next to the old one still in its handler: the same offset
/// handled twice at once, the key's effects applied out of order (0, 1, .., 0), and the old
/// worker's late offset store moving the committed offset back. Now the new worker waits for
/// the old one, which stores nothing after its revoke: offset 0 is handled twice (at-least-once),
/// one after the other, and then the rest in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_worker_still_in_its_handler_is_not_run_next_to_the_new_one() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let topic = unique("keel-msg-revoke");
    let other = unique("keel-msg-revoke-other");
    let group = unique("g");
    let publisher = Publisher::connect(BROKER).await.unwrap();
    publisher.declare(&topic, 1).await.unwrap();
    publisher.declare(&other, 1).await.unwrap();
    produce_to_partition(&topic, 0, 0..5).await;

    // A: holds offset 0's first execution until B is in the group (the rebalance is over),
    // then for one more second, long past A's revoke drain timeout.
    let executions: Arc<Mutex<Vec<Execution>>> = Arc::default();
    let entered = Arc::new(tokio::sync::Notify::new());
    let b_in_group = CancellationToken::new();
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let (executions, entered, b_in_group, held) = (
            executions.clone(),
            entered.clone(),
            b_in_group.clone(),
            held.clone(),
        );
        move |m: Received| {
            let (executions, entered, b_in_group, held) = (
                executions.clone(),
                entered.clone(),
                b_in_group.clone(),
                held.clone(),
            );
            async move {
                let start = std::time::Instant::now();
                let offset = m.offset.unwrap();
                if offset == 0 && !held.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    entered.notify_one();
                    let _ = tokio::time::timeout(WAIT, b_in_group.cancelled()).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                executions
                    .lock()
                    .unwrap()
                    .push((offset, start, std::time::Instant::now()));
                Ok::<(), keel_messaging::HandlerError>(())
            }
        }
    };
    let stop = CancellationToken::new();
    let run_a = tokio::spawn(
        consumer(&topic, &group)
            .revoke_drain_timeout(Duration::from_millis(100))
            .build()
            .unwrap()
            .run(handler, stop.clone().cancelled_owned()),
    );
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .expect("offset 0 reaches A's handler");

    // The committed offset, sampled throughout.
    let committed: Arc<Mutex<Vec<i64>>> = Arc::default();
    let sampling = CancellationToken::new();
    let sampler = {
        let (committed, sampling, group, topic) = (
            committed.clone(),
            sampling.clone(),
            group.clone(),
            topic.clone(),
        );
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                if let Ok(Some(offset)) =
                    keel_testkit::smoke::kafka_committed(KAFKA, &group, &topic).await
                {
                    committed.lock().unwrap().push(offset);
                }
                tokio::select! {
                    () = sampling.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };

    // B joins the same group, subscribed to another topic: every partition is revoked (eager
    // protocol) and the topic's only partition goes back to A.
    produce_to_partition(&other, 0, 0..1).await;
    let run_b = {
        let b_in_group = b_in_group.clone();
        tokio::spawn(consumer(&other, &group).build().unwrap().run(
            move |_m: Received| {
                b_in_group.cancel();
                async { Ok::<(), keel_messaging::HandlerError>(()) }
            },
            stop.clone().cancelled_owned(),
        ))
    };
    eventually(
        "offset 0 handled again after the rebalance, and the rest",
        WAIT,
        || async {
            let executions = executions.lock().unwrap();
            let zero = executions.iter().filter(|e| e.0 == 0).count();
            let rest = (1..5).all(|o| executions.iter().any(|e| e.0 == o));
            (zero >= 2 && rest).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", executions.lock().unwrap()));
    // Both executions of offset 0 are over: stopping commits what A stored.
    stop.cancel();
    run_a.await.unwrap().unwrap();
    run_b.await.unwrap().unwrap();
    sampling.cancel();
    sampler.await.unwrap();

    let mut executions = executions.lock().unwrap().clone();
    for (i, a) in executions.iter().enumerate() {
        for b in &executions[i + 1..] {
            assert!(
                a.0 != b.0 || a.2 <= b.1 || b.2 <= a.1,
                "offset {} handled twice at once: {executions:?}",
                a.0
            );
        }
    }
    executions.sort_by_key(|e| e.2);
    let completed: Vec<i64> = executions.iter().map(|e| e.0).collect();
    assert!(
        completed.is_sorted(),
        "the key's messages completed out of order: {completed:?}"
    );
    let committed = committed.lock().unwrap().clone();
    assert!(
        committed.is_sorted(),
        "the committed offset went back: {committed:?}"
    );
    assert_eq!(
        keel_testkit::smoke::kafka_committed(KAFKA, &group, &topic)
            .await
            .unwrap(),
        Some(5),
        "committed through the last message once both consumers stopped (sampled before: \
         {committed:?})"
    );
    publisher.close().await.unwrap();
    kafka_delete_topic(KAFKA, &topic).await;
    kafka_delete_topic(KAFKA, &other).await;
}

/// The first dead letter in `dlq`, read by a group of its own: the record and its headers.
async fn read_dead_letter(dlq: &str) -> (rdkafka::message::OwnedMessage, Headers) {
    let reader = kafka_consumer(KAFKA, &unique("dlq-reader"), dlq).unwrap();
    let letter = tokio::time::timeout(WAIT, reader.recv())
        .await
        .unwrap()
        .unwrap()
        .detach();
    let mut headers = Headers::new();
    for header in letter.headers().unwrap().iter() {
        headers.insert(header.key, header.value.unwrap_or_default());
    }
    (letter, headers)
}
