//! RabbitMQ adapter against the live broker on 127.0.0.1:5672.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Seen, WAIT, publish_all};
use keel_messaging::headers::{DLQ_ATTEMPTS, DLQ_ERROR, DLQ_ORIGINAL_DESTINATION};
use keel_messaging::{
    Consumer, HandlerError, Headers, Json, OutgoingMessage, PublishErrorKind, Publisher, Received,
    RetryPolicy, typed,
};
use keel_testkit::services::AMQP;
use keel_testkit::{eventually, unique};
use lapin::options::{
    BasicCancelOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{Connection, ConnectionProperties};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tokio_util::sync::CancellationToken;

async fn cleanup(queue: &str) {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [queue.to_owned(), format!("{queue}.dlq")] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(
            format!("{queue}.dlx").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

/// A consumer of `queue` with Keel's defaults running `handler` until `stop` is cancelled.
fn consume_with_defaults(
    queue: &str,
    handler: impl keel_messaging::Handler,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), keel_messaging::Error>>,
) {
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(AMQP, queue, "g")
        .unwrap()
        .build()
        .unwrap();
    let run = tokio::spawn(consumer.run(handler, stop.clone().cancelled_owned()));
    (stop, run)
}

/// Reads up to `n` dead letters' headers from `<queue>.dlq`.
async fn dead_letters(queue: &str, n: usize) -> Vec<Headers> {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dlq = format!("{queue}.dlq");
    let out = eventually("dead letters arrive", WAIT, || {
        let (ch, dlq) = (ch.clone(), dlq.clone());
        async move {
            let mut got = Vec::new();
            while got.len() < n {
                let m = ch
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .ok()??;
                let mut h = Headers::new();
                if let Some(t) = m.delivery.properties.headers() {
                    for (k, v) in t {
                        if let lapin::types::AMQPValue::LongString(s) = v {
                            h.insert(k.as_str(), s.as_bytes());
                        }
                    }
                }
                got.push(h);
            }
            Some(got)
        }
    })
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_none_lost_key_order_kept() {
    let queue = unique("keel-msg-10k");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    publish_all(&publisher, &queue, 10_000, 16, 1_000).await;

    let seen = Seen::default();
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(AMQP, &queue, "g")
        .unwrap()
        .prefetch(200)
        .lanes(8)
        .build()
        .unwrap();
    let run = tokio::spawn(consumer.run(seen.handler(), stop.clone().cancelled_owned()));
    eventually("all 10 000 consumed", WAIT, || async {
        (seen.distinct() == 10_000).then_some(())
    })
    .await
    .unwrap();
    stop.cancel();
    run.await.unwrap().unwrap();
    seen.assert_key_order();
    assert!(seen.missing(0..10_000).is_empty());
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_exhausted_messages_are_dead_lettered_while_others_flow() {
    let queue = unique("keel-msg-poison");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    let mut batch = common::batch(&queue, 0, 20, 4);
    batch.insert(
        5,
        OutgoingMessage::new(&queue, "\u{0}not json").with_key("k1"),
    );
    batch.insert(
        9,
        OutgoingMessage::new(&queue, "{\"seq\":999}").with_key("k2"),
    );
    for r in publisher.send_batch(batch).await {
        r.unwrap();
    }
    let handled = Seen::default();
    let attempts_999 = Arc::new(Mutex::new(0u32));
    let handler = {
        let (handled, attempts_999) = (handled.clone(), attempts_999.clone());
        typed(
            Json::<serde_json::Value>::new(),
            move |v: serde_json::Value, m: Received| {
                let (handled, attempts_999) = (handled.clone(), attempts_999.clone());
                async move {
                    if v["seq"] == 999 {
                        *attempts_999.lock().unwrap() = m.attempt;
                        return Err(HandlerError::retry("downstream says no"));
                    }
                    handled.record(&m).map(|_| ())
                }
            },
        )
    };
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(AMQP, &queue, "g")
        .unwrap()
        .retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        })
        .build()
        .unwrap();
    assert_eq!(consumer.dead_letter_destination(), format!("{queue}.dlq"));
    let run = tokio::spawn(consumer.run(handler, stop.clone().cancelled_owned()));
    eventually("the 20 good ones handled", WAIT, || async {
        (handled.distinct() == 20).then_some(())
    })
    .await
    .unwrap();
    let mut letters = dead_letters(&queue, 2).await;
    letters.sort_by_key(|h| h.get_str(DLQ_ATTEMPTS).unwrap_or_default().to_owned());
    assert_eq!(
        letters[0].get_str(DLQ_ATTEMPTS),
        Some("1"),
        "poison is not retried"
    );
    assert!(
        letters[0]
            .get_str(DLQ_ERROR)
            .unwrap()
            .contains("cannot decode"),
        "{letters:?}"
    );
    assert_eq!(letters[1].get_str(DLQ_ATTEMPTS), Some("3"));
    assert_eq!(letters[1].get_str(DLQ_ERROR), Some("downstream says no"));
    for l in &letters {
        assert_eq!(l.get_str(DLQ_ORIGINAL_DESTINATION), Some(queue.as_str()));
    }
    assert_eq!(*attempts_999.lock().unwrap(), 3);
    stop.cancel();
    run.await.unwrap().unwrap();
    handled.assert_key_order();
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}

async fn connection_of(name: &str) -> Option<String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_the_server_closes_its_connection() {
    let queue = unique("keel-msg-reconnect");
    let name = unique("keel-test-conn");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    publish_all(&publisher, &queue, 100, 4, 100).await;
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(AMQP, &queue, "g")
        .unwrap()
        .connection_name(&name)
        .reconnect_backoff(Duration::from_millis(50))
        .build()
        .unwrap();
    let run = tokio::spawn(consumer.run(seen.handler(), stop.clone().cancelled_owned()));
    eventually("first 100 consumed", WAIT, || async {
        (seen.distinct() == 100).then_some(())
    })
    .await
    .unwrap();
    let conn = eventually("our connection is listed", WAIT, || connection_of(&name))
        .await
        .unwrap();
    let closed = tokio::process::Command::new("rabbitmqctl")
        .args(["close_connection", &conn, "keel test: server-side close"])
        .output()
        .await
        .unwrap();
    assert!(closed.status.success(), "{closed:?}");
    eventually("the old connection is gone", WAIT, || async {
        (connection_of(&name).await.as_deref() != Some(conn.as_str())).then_some(())
    })
    .await
    .unwrap();
    // Published after the close: only a re-established consumer can see these.
    let mut from = 100;
    let more: Vec<_> = common::batch(&queue, from, 200, 4);
    for r in publisher.send_batch(more).await {
        r.unwrap();
    }
    from = 200;
    eventually("messages after the close consumed", WAIT, || async {
        (seen.distinct() as u64 == from).then_some(())
    })
    .await
    .unwrap();
    assert!(
        connection_of(&name).await.is_some(),
        "consumer reconnected under its name"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_round_trips_and_envelope_is_stamped() {
    let queue = unique("keel-msg-trace");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let span = SpanContext::new(
        trace_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(span);
    let receipt = publisher
        .publish(
            &queue,
            Some(b"acct-1"),
            b"{\"seq\":1}".to_vec(),
            Headers::new(),
        )
        .with_context(cx)
        .await
        .unwrap();
    let got = Arc::new(Mutex::new(None));
    let handler = {
        let got = got.clone();
        move |m: Received| {
            let got = got.clone();
            async move {
                let current = opentelemetry::Context::current()
                    .span()
                    .span_context()
                    .trace_id();
                *got.lock().unwrap() = Some((
                    current,
                    m.traceparent().map(str::to_owned),
                    m.message_id().map(str::to_owned),
                    m.idempotency_key().map(str::to_owned),
                    m.key_str().map(str::to_owned),
                ));
                Ok(())
            }
        }
    };
    let (stop, run) = consume_with_defaults(&queue, handler);
    let (current, traceparent, id, key, msg_key) =
        eventually("handled", WAIT, || async { got.lock().unwrap().clone() })
            .await
            .unwrap();
    assert_eq!(
        current, trace_id,
        "the handler runs in the producer's trace"
    );
    assert_eq!(
        traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(id.as_deref(), Some(receipt.message_id.as_str()));
    assert_eq!(key, id, "idempotency key defaults to the message id");
    assert_eq!(msg_key.as_deref(), Some("acct-1"));
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}

/// The envelope is on the wire once: the message id and the content type as AMQP's own
/// properties (not repeated in the headers table), the idempotency key only when the producer
/// set one — a bare message carries no headers table at all, so the broker has none to store.
/// Consumers see all three under Keel's header names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envelope_travels_once_in_native_properties() {
    let queue = unique("keel-msg-wire");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    let bare = publisher
        .publish(&queue, None, b"{}".to_vec(), Headers::new())
        .await
        .unwrap();
    let typed_publisher = keel_messaging::TypedPublisher::new(
        publisher.clone(),
        &queue,
        Json::<serde_json::Value>::new(),
    );
    let typed_receipt = typed_publisher
        .publisher()
        .send(
            typed_publisher
                .message(
                    Some(b"acct-9"),
                    &serde_json::json!({"seq": 1}),
                    Headers::new().with("idempotency-key", "pay-7"),
                )
                .unwrap(),
        )
        .await
        .unwrap();

    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = common::amqp_get(&ch, &queue).await;
        got.push(m.delivery.properties.clone());
    }
    let (first, second) = (&got[0], &got[1]);
    assert_eq!(
        first.message_id().as_ref().map(|s| s.as_str()),
        Some(bare.message_id.as_str())
    );
    assert!(
        first.headers().is_none(),
        "a bare message has no headers table: {:?}",
        first.headers()
    );
    assert_eq!(first.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        second.message_id().as_ref().map(|s| s.as_str()),
        Some(typed_receipt.message_id.as_str())
    );
    assert_eq!(
        second.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    let table = second.headers().as_ref().unwrap();
    let mut names: Vec<&str> = table.inner().keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["idempotency-key", "keel-key"],
        "only what has no native property"
    );

    // Keel's consumer reads them back under its header names.
    for m in [
        OutgoingMessage::new(&queue, b"{}".to_vec()),
        OutgoingMessage::new(&queue, b"{}".to_vec()).with_header("idempotency-key", "pay-8"),
    ] {
        publisher.send(m).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let seen = seen.clone();
        move |m: Received| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((
                    m.message_id().map(str::to_owned),
                    m.idempotency_key().map(str::to_owned),
                ));
                Ok::<(), HandlerError>(())
            }
        }
    };
    let (stop, run) = consume_with_defaults(&queue, handler);
    let seen = eventually("both handled", WAIT, || async {
        let seen = seen.lock().unwrap().clone();
        (seen.len() == 2).then_some(seen)
    })
    .await
    .unwrap();
    // Handled in either order (keyless messages are spread over the consumer's lanes).
    let (own, plain): (Vec<_>, Vec<_>) = seen
        .iter()
        .partition(|(_, key)| key.as_deref() == Some("pay-8"));
    assert_eq!(own.len(), 1, "{seen:?}");
    assert!(own[0].0.is_some() && own[0].0 != own[0].1, "{seen:?}");
    let (id, key) = plain[0];
    assert!(id.is_some());
    assert_eq!(
        key, id,
        "no idempotency-key header: the key is the message id"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_cannot_be_confirmed_hands_the_message_back() {
    let queue = unique("keel-msg-closed");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    let clone = publisher.clone();
    publisher.close().await.unwrap();
    // The closed publisher reconnects lazily; a broker that is unreachable cannot confirm.
    let unreachable = Publisher::builder("amqp://guest:guest@127.0.0.1:1/%2f")
        .unwrap()
        .build()
        .await;
    assert!(unreachable.is_err(), "connecting to a closed port fails");
    let receipt = clone
        .publish(&queue, None, b"{\"seq\":1}".to_vec(), Headers::new())
        .await
        .expect("a closed publisher re-opens its connection");
    assert_eq!(receipt.destination, queue);
    // A name AMQP cannot carry is refused (not a panic): the error hands the message back intact.
    let long = "x".repeat(300);
    let err = clone
        .publish(
            &long,
            Some(b"k"),
            b"payload".to_vec(),
            Headers::new().with("a", "b"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), PublishErrorKind::Invalid, "{err}");
    let back = err.into_message();
    assert_eq!(
        (back.destination.as_str(), back.payload.as_slice()),
        (long.as_str(), &b"payload"[..])
    );
    assert_eq!(back.headers.get_str("a"), Some("b"));
    assert!(back.message_id().is_some());
    clone.close().await.unwrap();
    cleanup(&queue).await;
}

/// Shutdown with a handler in flight: the consumer stops taking deliveries, waits for the
/// handler, acknowledges its message and returns; the messages it had prefetched but not
/// handled go back to the queue, and the next consumer gets exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_handler_in_flight_and_acknowledges_it() {
    let queue = unique("keel-msg-shutdown");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publish_all(&publisher, &queue, 10, 1, 10).await;

    let held = common::Held::new(4);
    let (stop, run) = consume_with_defaults(&queue, held.handler());
    common::shut_down_with_a_handler_in_flight(&held, &stop, run).await;
    assert_eq!(
        held.handled(),
        [0, 1, 2, 3, 4],
        "in key order, up to the held one"
    );

    let next = common::Held::new(u64::MAX);
    let (stop, run) = consume_with_defaults(&queue, next.handler());
    next.wait_for(5).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let mut rest = next.handled();
    rest.sort_unstable();
    assert_eq!(rest, [5, 6, 7, 8, 9], "the held message was acknowledged");
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}

/// The first message of `queue` on a fresh channel of `conn`, acknowledged; `None` when the
/// queue is empty or does not exist (a missing queue closes only that channel).
async fn take(conn: &Connection, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    let ch = conn.create_channel().await.ok()?;
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .ok()
        .flatten();
    let _ = ch.close(200, "bye".into()).await;
    got
}

fn header_str(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        _ => None,
    }
}

/// A handler that fails every message permanently, counting the calls.
fn always_failing(calls: &Arc<std::sync::atomic::AtomicU32>) -> impl keel_messaging::Handler {
    let calls = calls.clone();
    move |_m: Received| {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Err::<(), _>(HandlerError::permanent("ledger refuses it")) }
    }
}

/// Someone deletes `<q>.dlq` while the consumer runs: the dead-letter publish comes back
/// unroutable. The delivery is not settled negatively (the queue's own dead-lettering would
/// drop it, with no queue bound to `<q>.dlx`): the consumer re-declares the topology and the
/// message lands in the re-created dead-letter queue, with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_to_a_deleted_dlq_is_not_lost() {
    let queue = unique("keel-msg-dlq-gone");
    let dlq = format!("{queue}.dlq");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (stop, run) = consume_with_defaults(&queue, always_failing(&calls));
    let side = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    // The consumer is up once a first message is dead-lettered the ordinary way.
    publisher
        .publish(&queue, None, b"first".to_vec(), Headers::new())
        .await
        .unwrap();
    eventually("the first dead letter", WAIT, || take(&side, &dlq))
        .await
        .unwrap();

    let ch = side.create_channel().await.unwrap();
    ch.queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    publisher
        .publish(&queue, None, b"second".to_vec(), Headers::new())
        .await
        .unwrap();
    let letter = eventually("the second message, kept", WAIT, || async {
        if let Some(m) = take(&side, &dlq).await {
            return Some(("dlq", m));
        }
        take(&side, &queue).await.map(|m| ("queue", m))
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: the message vanished ({} handler calls)",
            calls.load(std::sync::atomic::Ordering::SeqCst)
        )
    });
    assert_eq!(letter.0, "dlq", "dead-lettered once the topology is back");
    assert_eq!(letter.1.delivery.data, b"second");
    assert_eq!(
        header_str(&letter.1, DLQ_ERROR).as_deref(),
        Some("ledger refuses it")
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    let _ = side.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

/// The dead-letter queue refuses everything (`max-length=0`, `overflow=reject-publish`): the
/// dead-letter publish is nacked. The delivery stays unacknowledged while the consumer keeps
/// trying, and is back in the queue once the consumer stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_dlq_refuses_stays_in_the_queue() {
    let queue = unique("keel-msg-dlq-full");
    let dlq = format!("{queue}.dlq");
    let policy = unique("keel-test-full");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    let set = tokio::process::Command::new("rabbitmqctl")
        .args([
            "set_policy",
            &policy,
            &format!("^{}$", dlq.replace('.', "\\.")),
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
            "--apply-to",
            "queues",
        ])
        .output()
        .await
        .unwrap();
    assert!(set.status.success(), "{set:?}");
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (stop, run) = consume_with_defaults(&queue, always_failing(&calls));
    publisher
        .publish(&queue, None, b"refused".to_vec(), Headers::new())
        .await
        .unwrap();
    eventually("the handler ran", WAIT, || async {
        (calls.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await
    .unwrap();
    stop.cancel();
    run.await.unwrap().unwrap();

    let side = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let kept = eventually("the message, back in the queue", WAIT, || {
        take(&side, &queue)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: the message vanished"));
    assert_eq!(kept.delivery.data, b"refused");
    assert!(take(&side, &dlq).await.is_none(), "the dlq took nothing");
    let cleared = tokio::process::Command::new("rabbitmqctl")
        .args(["clear_policy", &policy])
        .output()
        .await
        .unwrap();
    assert!(cleared.status.success(), "{cleared:?}");
    publisher.close().await.unwrap();
    let _ = side.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

/// A handler that panics on seq 1 (one key, so one lane): the panic was not caught, killed the
/// lane's task, and every later delivery of that lane was dropped unacknowledged. Now it is a
/// permanent failure: seq 1 is dead-lettered with the panic's message and the lane goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_dead_letters_its_message_and_the_lane_goes_on() {
    let queue = unique("keel-msg-panic");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    publish_all(&publisher, &queue, 10, 1, 10).await;

    let handled = Seen::default();
    let (stop, run) = consume_with_defaults(&queue, common::panicking_on(1, &handled));
    handled
        .wait_distinct("the other nine handled", 9, WAIT)
        .await;
    assert_eq!(handled.missing(0..10), [1]);
    handled.assert_key_order();
    let letters = dead_letters(&queue, 1).await;
    assert_eq!(
        letters[0].get_str(DLQ_ERROR),
        Some("handler panicked: seq 1 is cursed")
    );
    assert_eq!(letters[0].get_str(DLQ_ATTEMPTS), Some("1"));
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}

/// A lane that dies (here: the handler's error panics when Keel prints it, outside the handler)
/// ends the consumer with an error instead of dropping the lane's later deliveries in silence;
/// the unacknowledged ones are back in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_that_dies_ends_the_consumer_with_an_error() {
    let queue = unique("keel-msg-deadlane");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    publish_all(&publisher, &queue, 10, 1, 10).await;

    let handled = Seen::default();
    let (_stop, run) = consume_with_defaults(&queue, common::unprintable_on(1, &handled));
    let error = tokio::time::timeout(WAIT, run)
        .await
        .expect("the consumer ends on its own")
        .unwrap()
        .expect_err("with an error");
    assert!(
        error.to_string().contains("a delivery lane failed"),
        "{error}"
    );
    assert_eq!(handled.missing(0..10), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let side = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let mut back = Vec::new();
    while back.len() < 9 {
        let m = eventually("the rest, back in the queue", WAIT, || take(&side, &queue))
            .await
            .unwrap();
        back.push(String::from_utf8(m.delivery.data).unwrap());
    }
    back.sort_unstable();
    let rest: Vec<String> = (1..10).map(|i| format!("{{\"seq\":{i}}}")).collect();
    assert_eq!(back, rest, "the failed one and the ones after it");
    publisher.close().await.unwrap();
    let _ = side.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

/// Counts the consumer's "RabbitMQ connection lost; reconnecting" events for one queue.
#[derive(Clone, Default)]
struct Reconnects {
    queue: String,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl Reconnects {
    fn new(queue: &str) -> Self {
        Self {
            queue: queue.to_owned(),
            count: Arc::default(),
        }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A subscriber that counts this queue's reconnects, for `WithSubscriber::with_subscriber`.
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        use tracing_subscriber::layer::SubscriberExt as _;
        tracing_subscriber::registry().with(self.clone())
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Reconnects {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            message: String,
            queue: String,
        }
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "message" => self.message = format!("{value:?}"),
                    "queue" => self.queue = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields
            .message
            .starts_with("RabbitMQ connection lost; reconnecting")
            && fields.queue == self.queue
        {
            self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A consumer of `queue` (Keel's defaults) whose reconnects `reconnects` counts.
fn consume_counting_reconnects(
    queue: &str,
    handler: impl keel_messaging::Handler,
    reconnects: &Reconnects,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), keel_messaging::Error>>,
) {
    use tracing::instrument::WithSubscriber as _;
    let stop = CancellationToken::new();
    let consumer = Consumer::builder(AMQP, queue, "g")
        .unwrap()
        .build()
        .unwrap();
    let run = tokio::spawn(
        consumer
            .run(handler, stop.clone().cancelled_owned())
            .with_subscriber(reconnects.subscriber()),
    );
    (stop, run)
}

/// Another client holds an exclusive consumer on the queue, so every `basic.consume` of Keel's
/// consumer is refused at once: it reconnected without any pause, hundreds of connections a
/// second. A session that ends before it settled anything now backs off (doubling from
/// `reconnect_backoff`, 200 ms), and the consumer still takes over once the queue is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_basic_consume_reconnects_with_backoff() {
    let queue = unique("keel-msg-exclusive");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    let side = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let side_ch = side.create_channel().await.unwrap();
    let _exclusive = side_ch
        .basic_consume(
            queue.as_str().into(),
            "side-exclusive".into(),
            lapin::options::BasicConsumeOptions {
                exclusive: true,
                ..lapin::options::BasicConsumeOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();

    let reconnects = Reconnects::new(&queue);
    let seen = Seen::default();
    let (stop, run) = consume_counting_reconnects(&queue, seen.handler(), &reconnects);
    eventually("the consumer was refused", WAIT, || async {
        (reconnects.count() >= 1).then_some(())
    })
    .await
    .unwrap();
    // An observation window, not a synchronisation: how often it reconnects in 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let in_window = reconnects.count();
    assert!(
        in_window <= 8,
        "{in_window} reconnects in about 3 s: no backoff"
    );

    // The queue is free again: the consumer gets it and handles what arrives.
    side_ch
        .basic_cancel("side-exclusive".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish_all(&publisher, &queue, 1, 1, 1).await;
    seen.wait_distinct("the message handled once the queue is free", 1, WAIT)
        .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    let _ = side.close(200, "bye".into()).await;
    cleanup(&queue).await;
}

/// A handler fails permanently with a 200 000-byte error. The dead letter carried it whole in
/// its headers, above RabbitMQ's frame size (128 KiB): the broker closed the connection
/// (`frame_too_large`), the message was redelivered and killed the next connection too, for
/// ever. The reason is now cut to `DLQ_ERROR_MAX_BYTES`: the message is dead-lettered, the
/// connection lives, and the next message is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_handler_error_is_truncated_in_the_dead_letter() {
    let queue = unique("keel-msg-hugeerr");
    let publisher = Publisher::connect(AMQP).await.unwrap();
    publisher.declare(&queue, 1).await.unwrap();
    publish_all(&publisher, &queue, 2, 1, 2).await;
    let handled = Seen::default();
    let handler = {
        let handled = handled.clone();
        move |m: Received| {
            let handled = handled.clone();
            async move {
                if m.payload.as_ref() == b"{\"seq\":0}" {
                    return Err(HandlerError::permanent("x".repeat(200_000)));
                }
                handled.record(&m).map(|_| ())
            }
        }
    };
    let reconnects = Reconnects::new(&queue);
    let (stop, run) = consume_counting_reconnects(&queue, handler, &reconnects);
    eventually("the message after it handled", WAIT, || async {
        (handled.distinct() == 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {} reconnects", reconnects.count()));
    let letters = dead_letters(&queue, 1).await;
    let error = letters[0].get_str(DLQ_ERROR).unwrap();
    assert!(
        error.len() <= keel_messaging::headers::DLQ_ERROR_MAX_BYTES,
        "{} bytes",
        error.len()
    );
    assert!(error.starts_with("xxxxxxxx"), "{error:.80}");
    assert!(error.contains("200000 bytes"), "says it was cut: {error:?}");
    assert_eq!(reconnects.count(), 0, "the connection was never lost");
    stop.cancel();
    run.await.unwrap().unwrap();
    publisher.close().await.unwrap();
    cleanup(&queue).await;
}
