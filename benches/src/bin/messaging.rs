//! D1, D2 and D4 of `BENCHMARKS.md`: Keel's messaging against the raw client underneath, on the
//! live brokers of `scripts/services` (tansu on 127.0.0.1:9092, RabbitMQ on 127.0.0.1:5672), in
//! one process and one run, arms interleaved (the arm that goes first alternates).
//!
//! # D1: Kafka publish, Keel vs raw rdkafka (100 B and 1 KB)
//! Both arms use a `FutureProducer` with the same configuration — Keel's: `acks=all`,
//! `enable.idempotence=true`, `linger.ms=5`, `message.timeout.ms=30000` — each on its own topic
//! (4 partitions). A round publishes `D1_N` messages keyed `k{i % 16}` in chunks of 1 000, all of
//! a chunk in flight before its delivery reports are awaited: raw `send_result` then the
//! `DeliveryFuture`s; Keel `Publisher::send_batch` (which stamps the envelope: a message id
//! header, which is also the idempotency key). Value: Keel msg/s ÷ raw msg/s. Bar 0.95, goal
//! 0.98. Two rows per size. `D1-<size>`: the raw arm sends the same records as Keel — the same
//! payload, key and the one header of Keel's envelope (a fresh UUID message id): identical
//! configuration and identical messages, so the ratio is what Keel's client adds. The issue
//! requires the envelope, and a raw producer that lets consumers de-duplicate must send an id
//! too. `D1-<size>-no-envelope`: the raw arm sends the records without that header — the
//! envelope's own cost on this broker, shown for what it is: tansu stores every header as a
//! sqlite row of its own, so one 50-byte header costs about a third of its throughput (Apache
//! Kafka keeps headers inline in the record batch).
//!
//! # D2: Kafka consume, Keel (handler + commit) vs a raw consumer loop
//! One topic (4 partitions) is filled once with `D2_N` messages of 100 B through Keel (so both arms
//! read the same records, envelope included). Each round, each arm joins a fresh group and reads
//! everything: raw = `StreamConsumer::recv`, count, `store_offset`, with librdkafka committing
//! stored offsets every second (`enable.auto.offset.store=false`, as Keel); Keel = `Consumer::run`
//! with a counting handler (Keel's defaults and the same librdkafka options). Measured from the
//! first message handled to the last, so the group join (seconds on tansu, the same for both) is
//! not part of the figure. Value: Keel msg/s ÷ raw msg/s. Bar 0.90, goal 0.97.
//!
//! # D4: RabbitMQ confirmed publish, Keel vs raw lapin, confirm window 1 and 192
//! Both arms publish persistent, `mandatory` messages of 100 B through the default exchange to a
//! durable queue declared by Keel (same arguments for both), on a channel in confirm mode. Window
//! 1: publish, await its confirm, next (raw `basic_publish` + `PublisherConfirm`; Keel
//! `Publisher::publish`). Window 192: 192 publishes in flight, then their confirms awaited (raw
//! likewise; Keel `send_batch` of 192). Value: Keel msg/s ÷ raw msg/s. Bar 0.95, goal 0.98.
//! Confirms wait for RabbitMQ's disk writes, whose latency swings, so within each round the arms
//! alternate every tenth of the round's messages rather than once per round. As in D1, `D4-w*`
//! gives the raw arm the same properties as Keel's envelope (a UUID `message_id` property; Keel
//! sends no headers table for such a message), and `D4-w*-no-envelope` none.
//!
//! `target/release/messaging d1` (or `d2`, `d4`) runs one of them alone and prints its rows.
//!
//! The brokers are on the same 2 cores as the clients: the ratios compare the two clients under
//! the same broker cost, the absolute rates say more about tansu's sqlite storage than about
//! either client. Topics and queues are unique to the run; queues are deleted at the end, topics
//! are left (tansu 0.6.0's DeleteTopics deletes every topic, see `keel_testkit::smoke`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use keel::messaging::{
    Consumer, HandlerError, Headers, OutgoingMessage, Publisher, Received, headers,
};
use keel_benches::{Comparison, Report, Row, interleave};
use keel_testkit::services::{AMQP, KAFKA};
use keel_testkit::unique;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const KAFKA_URL: &str = "kafka://127.0.0.1:9092";
const ROUNDS: usize = 5;
const WARMUP: usize = 1;
const D1_N: usize = 5_000;
const D2_N: usize = 10_000;
const D4_N1: usize = 1_000;
const D4_N192: usize = 9_600;
const CHUNK: usize = 1_000;
const KEYS: usize = 16;

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // `messaging d1|d2|d4` runs one benchmark alone (a table, no JSON), for quick comparisons.
    let only = std::env::args().nth(1);
    let runs = |id: &str| only.as_deref().is_none_or(|o| o.eq_ignore_ascii_case(id));
    let mut report = Report::new("messaging");

    if runs("d1") {
        for (label, size) in [("100B", 100), ("1KB", 1_024)] {
            for (suffix, envelope, what) in [
                ("", true, "raw sending the same record"),
                ("-no-envelope", false, "raw without Keel's envelope"),
            ] {
                let cmp = d1(&rt, size, envelope)?;
                report.push(Row::ratio(
                    &format!("D1-{label}{suffix}"),
                    &format!("Kafka publish {label}: Keel / {what} (msg/s)"),
                    "ratio",
                    &cmp,
                    0.95,
                    0.98,
                ));
            }
        }
    }
    if runs("d2") {
        let cmp = d2(&rt)?;
        report.push(Row::ratio(
            "D2",
            "Kafka consume + commit: Keel / raw consumer loop (msg/s)",
            "ratio",
            &cmp,
            0.90,
            0.97,
        ));
    }
    if runs("d4") {
        for window in [1, 192] {
            for (suffix, envelope, what) in [
                ("", true, "raw sending the same message"),
                ("-no-envelope", false, "raw without Keel's envelope"),
            ] {
                let cmp = d4(&rt, window, envelope)?;
                report.push(Row::ratio(
                    &format!("D4-w{window}{suffix}"),
                    &format!("RabbitMQ confirmed publish, window {window}: Keel / {what} (msg/s)"),
                    "ratio",
                    &cmp,
                    0.95,
                    0.98,
                ));
            }
        }
    }
    if only.is_some() {
        println!("{}", report.table());
        return Ok(());
    }
    report.finish()?;
    Ok(())
}

fn payload(size: usize, i: usize) -> Vec<u8> {
    let mut p = format!("{{\"seq\":{i},\"pad\":\"").into_bytes();
    p.resize(size.saturating_sub(2), b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// Runs `f` on the runtime for its figure (a rate, or seconds); a failure aborts the benchmark.
fn rate(rt: &Runtime, what: &str, f: impl std::future::Future<Output = Result<f64>>) -> f64 {
    match rt.block_on(f) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench messaging: {what} failed: {e}");
            std::process::exit(1);
        }
    }
}

// ------------------------------------------------------------------------------------------
// D1

fn kafka_producer_config() -> ClientConfig {
    // Keel's producer configuration (messaging/src/kafka.rs), for the raw arm.
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", KAFKA)
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000");
    c
}

/// D1 with the raw arm sending bare records (`envelope` false) or records carrying the header
/// Keel's envelope adds (a fresh UUID as `keel-message-id`; the idempotency key is that id).
fn d1(rt: &Runtime, size: usize, envelope: bool) -> Result<Comparison> {
    let (raw_topic, keel_topic) = (unique("bench-d1-raw"), unique("bench-d1-keel"));
    let (raw, keel) = rt.block_on(async {
        let keel = Publisher::connect(KAFKA_URL).await?;
        keel.declare(&raw_topic, 4).await?;
        keel.declare(&keel_topic, 4).await?;
        let raw: FutureProducer = kafka_producer_config().create()?;
        Ok::<_, BoxError>((raw, keel))
    })?;
    let payloads: Vec<Vec<u8>> = (0..D1_N).map(|i| payload(size, i)).collect();
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    let cmp = interleave(
        ROUNDS,
        WARMUP,
        |_| {
            rate(rt, "D1 raw", async {
                let t = Instant::now();
                for (c, chunk) in payloads.chunks(CHUNK).enumerate() {
                    let mut pending = Vec::with_capacity(chunk.len());
                    for (j, p) in chunk.iter().enumerate() {
                        let key = &keys[(c * CHUNK + j) % KEYS];
                        let mut record = FutureRecord::to(&raw_topic).payload(p).key(key);
                        if envelope {
                            let id = uuid::Uuid::new_v4().to_string();
                            record =
                                record.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                                    key: headers::MESSAGE_ID,
                                    value: Some(&id),
                                }));
                        }
                        pending.push(raw.send_result(record).map_err(|(e, _)| e)?);
                    }
                    for d in join_all(pending).await {
                        d?.map_err(|(e, _)| e)?;
                    }
                }
                Ok(D1_N as f64 / t.elapsed().as_secs_f64())
            })
        },
        |_| {
            rate(rt, "D1 keel", async {
                let t = Instant::now();
                for (c, chunk) in payloads.chunks(CHUNK).enumerate() {
                    let batch = chunk
                        .iter()
                        .enumerate()
                        .map(|(j, p)| {
                            OutgoingMessage::new(&keel_topic, p.clone())
                                .with_key(keys[(c * CHUNK + j) % KEYS].as_bytes())
                        })
                        .collect();
                    for r in keel.send_batch(batch).await {
                        r?;
                    }
                }
                Ok(D1_N as f64 / t.elapsed().as_secs_f64())
            })
        },
    );
    rt.block_on(keel.close())?;
    Ok(cmp)
}

// ------------------------------------------------------------------------------------------
// D2

/// librdkafka consumer options both arms share (Keel's test settings for tansu).
const D2_OPTIONS: [(&str, &str); 2] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

fn d2(rt: &Runtime) -> Result<Comparison> {
    let topic = unique("bench-d2");
    rt.block_on(async {
        let p = Publisher::connect(KAFKA_URL).await?;
        p.declare(&topic, 4).await?;
        for chunk in (0..D2_N).collect::<Vec<_>>().chunks(CHUNK) {
            let batch = chunk
                .iter()
                .map(|&i| {
                    OutgoingMessage::new(&topic, payload(100, i)).with_key(format!("k{}", i % KEYS))
                })
                .collect();
            for r in p.send_batch(batch).await {
                r?;
            }
        }
        p.close().await?;
        Ok::<_, BoxError>(())
    })?;
    Ok(interleave(
        ROUNDS,
        WARMUP,
        |_| rate(rt, "D2 raw", d2_raw(&topic)),
        |_| rate(rt, "D2 keel", d2_keel(&topic)),
    ))
}

async fn d2_raw(topic: &str) -> Result<f64> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", KAFKA)
        .set("group.id", unique("bench-d2-raw"))
        .set("auto.offset.reset", "earliest")
        .set("auto.commit.interval.ms", "1000");
    for (k, v) in D2_OPTIONS {
        c.set(k, v);
    }
    c.set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = c.create()?;
    consumer.subscribe(&[topic])?;
    let mut first = None;
    for _ in 0..D2_N {
        let m = tokio::time::timeout(Duration::from_secs(120), consumer.recv()).await??;
        first.get_or_insert_with(Instant::now);
        std::hint::black_box(m.payload());
        consumer.store_offset(m.topic(), m.partition(), m.offset())?;
    }
    let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
    tokio::task::spawn_blocking(move || {
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        drop(consumer);
    })
    .await?;
    Ok(D2_N as f64 / elapsed.as_secs_f64())
}

async fn d2_keel(topic: &str) -> Result<f64> {
    let mut b = Consumer::builder(KAFKA_URL, topic, unique("bench-d2-keel"))?;
    for (k, v) in D2_OPTIONS {
        b = b.kafka_option(k, v);
    }
    let handled = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::new());
    let done = CancellationToken::new();
    let last = Arc::new(std::sync::OnceLock::new());
    let handler = {
        let (handled, first, last, done) =
            (handled.clone(), first.clone(), last.clone(), done.clone());
        move |m: Received| {
            let (handled, first, last, done) =
                (handled.clone(), first.clone(), last.clone(), done.clone());
            async move {
                first.get_or_init(Instant::now);
                std::hint::black_box(&m.payload);
                if handled.fetch_add(1, Ordering::Relaxed) + 1 == D2_N as u64 {
                    last.get_or_init(Instant::now);
                    done.cancel();
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    let run = tokio::spawn(b.build()?.run(handler, done.clone().cancelled_owned()));
    tokio::time::timeout(Duration::from_secs(300), done.cancelled())
        .await
        .map_err(|_| "Keel consumer did not handle every message within 300 s")?;
    run.await??;
    let (Some(first), Some(last)) = (first.get(), last.get()) else {
        return Err("no timing recorded".into());
    };
    Ok(D2_N as f64 / last.duration_since(*first).as_secs_f64())
}

// ------------------------------------------------------------------------------------------
// D4

/// D4 with the raw arm publishing bare messages (`envelope` false) or messages with the same
/// properties as Keel's (a fresh UUID as the `message_id` property; no headers table, as Keel
/// sends none for a message without key, trace context or headers of its own).
fn d4(rt: &Runtime, window: usize, envelope: bool) -> Result<Comparison> {
    let n = if window == 1 { D4_N1 } else { D4_N192 };
    let (raw_queue, keel_queue) = (unique("bench-d4-raw"), unique("bench-d4-keel"));
    let (keel, conn, channel) = rt.block_on(async {
        let keel = Publisher::connect(AMQP).await?;
        keel.declare(&raw_queue, 1).await?;
        keel.declare(&keel_queue, 1).await?;
        let conn = Connection::connect(AMQP, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, BoxError>((keel, conn, channel))
    })?;
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| payload(100, i)).collect();
    // Publisher confirms of persistent messages wait for RabbitMQ's disk writes, whose latency
    // swings with whatever else the disk does; so the arms alternate every block of `n / BLOCKS`
    // messages within a round (the first arm alternating too), and a round's rate per arm is
    // its messages over the sum of its blocks' times.
    const BLOCKS: usize = 10;
    let block = (n / BLOCKS).max(window);
    let raw_block = |msgs: &[Vec<u8>]| {
        rate(rt, "D4 raw", async {
            let t = Instant::now();
            for chunk in msgs.chunks(window) {
                let mut pending = Vec::with_capacity(chunk.len());
                for p in chunk {
                    let mut props = BasicProperties::default().with_delivery_mode(2);
                    if envelope {
                        let id = uuid::Uuid::new_v4().to_string();
                        props = props.with_message_id(ShortString::from(id));
                    }
                    pending.push(
                        channel
                            .basic_publish(
                                "".into(),
                                raw_queue.as_str().into(),
                                BasicPublishOptions {
                                    mandatory: true,
                                    ..BasicPublishOptions::default()
                                },
                                p,
                                props,
                            )
                            .await?,
                    );
                }
                for confirm in pending {
                    match confirm.await? {
                        Confirmation::Ack(None) => {}
                        other => return Err(format!("not confirmed: {other:?}").into()),
                    }
                }
            }
            Ok(t.elapsed().as_secs_f64())
        })
    };
    let keel_block = |msgs: &[Vec<u8>]| {
        rate(rt, "D4 keel", async {
            let t = Instant::now();
            if window == 1 {
                for p in msgs {
                    keel.publish(&keel_queue, None, p.clone(), Headers::new())
                        .await?;
                }
            } else {
                for chunk in msgs.chunks(window) {
                    let batch = chunk
                        .iter()
                        .map(|p| OutgoingMessage::new(&keel_queue, p.clone()))
                        .collect();
                    for r in keel.send_batch(batch).await {
                        r?;
                    }
                }
            }
            Ok(t.elapsed().as_secs_f64())
        })
    };
    let mut cmp = Comparison {
        a: Vec::new(),
        b: Vec::new(),
        ratios: Vec::new(),
    };
    for round in 0..WARMUP + ROUNDS {
        let (mut raw_s, mut keel_s) = (0.0, 0.0);
        for (i, msgs) in payloads.chunks(block).enumerate() {
            if (round + i) % 2 == 0 {
                raw_s += raw_block(msgs);
                keel_s += keel_block(msgs);
            } else {
                keel_s += keel_block(msgs);
                raw_s += raw_block(msgs);
            }
        }
        if round >= WARMUP {
            let (a, b) = (n as f64 / raw_s, n as f64 / keel_s);
            cmp.a.push(a);
            cmp.b.push(b);
            cmp.ratios.push(b / a);
        }
    }
    rt.block_on(async {
        for q in [&raw_queue, &keel_queue] {
            for name in [q.clone(), format!("{q}.dlq")] {
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(format!("{q}.dlx").as_str().into(), Default::default())
                .await;
        }
        let _ = conn.close(200, "bye".into()).await;
        keel.close().await
    })?;
    Ok(cmp)
}
