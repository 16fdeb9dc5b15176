//! The Kafka adapter, on rdkafka (librdkafka).
//!
//! Publishing uses the idempotent producer with `acks=all`: a publish completes on its delivery
//! report. Consuming dispatches each assigned partition to its own task (partitions run
//! concurrently, each in offset order, so a key — which maps to one partition — is never
//! reordered, retries included). The fetch loop never waits on a partition: one whose worker is
//! behind (its queue full) is paused until the queue drains, so a slow or stuck handler holds
//! up only its own partition, and rebalances are still served. After a message is handled (or
//! dead-lettered with a confirmed publish) its offset is *stored*; librdkafka commits stored
//! offsets periodically, and Keel commits them synchronously when partitions are revoked and at
//! shutdown. Because each partition is handled strictly in order and a worker stops at the
//! first message it could not finish, stored offsets are always contiguous: nothing unhandled
//! is ever committed.
//!
//! A revoke waits up to the revoke drain timeout for the revoked partitions' handlers (on a
//! multi-thread runtime only: on a `current_thread` runtime it cannot, and does not wait). A
//! handler still running after that keeps running, but its worker's assignment is over: it
//! stores no offset any more (that would move the partition's stored offset back under a later
//! worker), and a later worker of the same partition handles nothing until it has finished, so
//! one partition's messages are never handled concurrently or out of order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{Broker, check_replication};
use crate::consumer::{ConsumerBuilder, Handler};
use crate::error::{Error, PublishError, PublishErrorKind};
use crate::headers::{self, Headers};
use crate::message::{OutgoingMessage, Receipt, Received};
use crate::publisher::PublisherBuilder;
use crate::retry::{Outcome, RetryPolicy, dead_letter_backoff, process};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn bootstrap(broker: &Broker) -> &str {
    match broker {
        Broker::Kafka { bootstrap } => bootstrap,
        Broker::Amqp { url } => url,
    }
}

/// librdkafka properties only a consumer takes (`C` in librdkafka's CONFIGURATION.md): left
/// out when the consumer's options configure its dead-letter producer and admin client.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "auto.offset.reset",
    "consume.callback.max.messages",
];

/// The consumer's options that apply to its dead-letter producer and admin client (security,
/// SASL / TLS, timeouts, everything but [`CONSUMER_ONLY`]), after Keel's own default for them:
/// no topic auto-creation by a metadata request (Keel creates the dead-letter topic itself,
/// with its replication factor), unless the options say otherwise.
fn dead_letter_options(consumer_options: &[(String, String)]) -> Vec<(String, String)> {
    let mut options = vec![("allow.auto.create.topics".to_owned(), "false".to_owned())];
    options.extend(
        consumer_options
            .iter()
            .filter(|(k, _)| !CONSUMER_ONLY.contains(&k.trim()))
            .cloned(),
    );
    options
}

/// A client configuration for `bootstrap` with `options` applied over it.
fn client_config(
    bootstrap: &str,
    name: Option<&str>,
    options: &[(String, String)],
) -> ClientConfig {
    let mut config = base_config(bootstrap, name);
    set_all(&mut config, options);
    config
}

/// The caller's librdkafka `options`, over what `config` has so far.
fn set_all(config: &mut ClientConfig, options: &[(String, String)]) {
    for (k, v) in options {
        config.set(k, v);
    }
}

fn base_config(bootstrap: &str, name: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    if let Some(name) = name {
        config.set("client.id", name);
    }
    config
}

// ------------------------------------------------------------------------------------------
// Publisher

/// Kafka publisher: an idempotent `acks=all` producer.
#[derive(Clone)]
pub(crate) struct KafkaPublisher {
    producer: FutureProducer,
    timeout: Duration,
    bootstrap: String,
    replication: i32,
    /// The caller's librdkafka options, for the admin client that creates topics.
    options: Arc<[(String, String)]>,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn classify(error: &KafkaError) -> PublishErrorKind {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => PublishErrorKind::Timeout,
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::QueueFull,
        ) => PublishErrorKind::Unavailable,
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidArgument) => {
            PublishErrorKind::Invalid
        }
        _ => PublishErrorKind::Rejected,
    }
}

impl KafkaPublisher {
    pub(crate) fn new(builder: &PublisherBuilder) -> Result<Self, Error> {
        let mut config = base_config(
            bootstrap(&builder.broker),
            builder.connection_name.as_deref(),
        );
        config.set("linger.ms", "5");
        set_all(&mut config, &builder.kafka_options);
        let timeout_ms = builder.confirm_timeout.as_millis().max(1).to_string();
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", timeout_ms);
        let producer = config
            .create()
            .map_err(|e| Error::new("create Kafka producer", e))?;
        Ok(Self {
            producer,
            timeout: builder.confirm_timeout,
            bootstrap: bootstrap(&builder.broker).to_owned(),
            replication: builder.kafka_replication,
            options: builder.kafka_options.clone().into(),
        })
    }

    pub(crate) async fn declare(&self, topic: &str, partitions: i32) -> Result<(), Error> {
        ensure_topic(
            &self.bootstrap,
            &self.options,
            topic,
            partitions,
            self.replication,
        )
        .await
    }

    /// Whether the broker knows `topic`: `Ok(false)` only when it says the topic is unknown.
    async fn topic_exists(&self, topic: &str) -> Result<bool, Error> {
        use rdkafka::producer::Producer as _;
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))
        })
        .await
        .map_err(|e| Error::new(format!("read metadata of topic {topic}"), e))?
        .map_err(|e| Error::new(format!("read metadata of topic {topic}"), e))?;
        let known = metadata.topics().iter().find(|t| t.name() == topic);
        match known.map(|t| t.error().map(RDKafkaErrorCode::from)) {
            None | Some(Some(RDKafkaErrorCode::UnknownTopicOrPartition)) => Ok(false),
            Some(None) => Ok(true),
            Some(Some(code)) => Err(Error::new(format!("read metadata of topic {topic}"), code)),
        }
    }

    /// Hands `m` to librdkafka, waiting (up to the confirm timeout) while its queue is full.
    async fn enqueue(&self, m: &OutgoingMessage) -> Result<DeliveryFuture, KafkaError> {
        // Capped (100 years): `Duration::MAX` as "wait forever" must not overflow the clock.
        let deadline = Instant::now() + self.timeout.min(keel_breaker::deadline::MAX_TIMEOUT);
        loop {
            let mut kheaders = OwnedHeaders::new_with_capacity(m.headers.len());
            for (key, value) in m.headers.iter() {
                kheaders = kheaders.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&m.destination)
                .payload(&m.payload[..])
                .headers(kheaders);
            if let Some(key) = &m.key {
                record = record.key(&key[..]);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    async fn confirmed(&self, delivery: DeliveryFuture) -> Result<(i32, i64), KafkaError> {
        // librdkafka reports every message within message.timeout.ms; the outer bound only
        // guards against a lost report.
        let bound = self.timeout + Duration::from_secs(5);
        match tokio::time::timeout(bound, delivery).await {
            Ok(Ok(Ok(d))) => Ok((d.partition, d.offset)),
            Ok(Ok(Err((error, _)))) => Err(error),
            Ok(Err(_canceled)) => Err(KafkaError::Canceled),
            Err(_elapsed) => Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )),
        }
    }

    fn receipt(m: &OutgoingMessage, (partition, offset): (i32, i64)) -> Receipt {
        Receipt {
            destination: m.destination.clone(),
            message_id: m.message_id().unwrap_or_default().to_owned(),
            partition: Some(partition),
            offset: Some(offset),
        }
    }

    fn failed(error: KafkaError, m: OutgoingMessage) -> PublishError {
        let kind = match error {
            KafkaError::Canceled => PublishErrorKind::Closed,
            ref e => classify(e),
        };
        PublishError::new(kind, error, m)
    }

    pub(crate) async fn send(&self, m: OutgoingMessage) -> Result<Receipt, PublishError> {
        let result = match self.enqueue(&m).await {
            Ok(delivery) => self.confirmed(delivery).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(at) => Ok(Self::receipt(&m, at)),
            Err(e) => Err(Self::failed(e, m)),
        }
    }

    pub(crate) async fn send_batch(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Vec<Result<Receipt, PublishError>> {
        // Enqueue strictly in order (per-partition order), then await the reports.
        let mut pending = Vec::with_capacity(messages.len());
        for m in &messages {
            pending.push(self.enqueue(m).await);
        }
        let mut results = Vec::with_capacity(messages.len());
        for (m, p) in messages.into_iter().zip(pending) {
            let r = match p {
                Ok(delivery) => self.confirmed(delivery).await,
                Err(e) => Err(e),
            };
            results.push(match r {
                Ok(at) => Ok(Self::receipt(&m, at)),
                Err(e) => Err(Self::failed(e, m)),
            });
        }
        results
    }

    pub(crate) async fn flush(&self) -> Result<(), Error> {
        use rdkafka::producer::Producer as _;
        let producer = self.producer.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| Error::new("flush Kafka producer", e))?
            .map_err(|e| Error::new("flush Kafka producer", e))
    }
}

// ------------------------------------------------------------------------------------------
// Consumer

type PartitionKey = (String, i32);

/// Messages a partition worker's queue holds before the fetch loop pauses the partition.
const WORKER_QUEUE: usize = 1024;
/// Free room in a paused partition's worker queue before the partition is resumed (half of it:
/// resuming at the first free place would pause and resume it on every message).
const RESUME_ROOM: usize = WORKER_QUEUE / 2;

/// How long the fetch loop waits for room in a full worker queue before it pauses the
/// partition. A pause throws away what librdkafka prefetched for the partition and costs a
/// fetch round trip on resume: pausing at once whenever a fast handler was a moment behind cut
/// consumption to a sixth (D2). A handler stuck for longer gets its partition paused, and the
/// loop has waited at most this long.
const PAUSE_GRACE: Duration = Duration::from_millis(100);

fn partition_list(key: &PartitionKey) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&key.0, key.1);
    tpl
}

/// The messages of one paused partition not yet in its worker's queue, in offset order.
#[derive(Debug)]
struct HeldPartition {
    /// Tells this hold from a later one of the same partition (after a rebalance).
    generation: u64,
    /// The queue of the worker they are for.
    tx: mpsc::Sender<OwnedMessage>,
    messages: VecDeque<OwnedMessage>,
}

/// A wait for room in a held partition's worker queue: its key, generation, and whether the
/// queue is still open.
type Room = BoxFuture<'static, (PartitionKey, u64, bool)>;

/// Back-pressure without blocking the fetch loop: a partition whose worker queue is full is
/// paused (librdkafka stops fetching it and, on resume, fetches again after the last message
/// it handed over), the message in hand is held, and the partition is resumed once its queue
/// has [`RESUME_ROOM`] free. The loop keeps polling meanwhile, so the other partitions flow and
/// rebalances are served while one partition's handler is slow or stuck.
#[derive(Debug, Default)]
struct Held {
    partitions: HashMap<PartitionKey, HeldPartition>,
    next_generation: u64,
}

impl Held {
    /// Whether messages of `key` for the worker queue `tx` are held (they go after those).
    fn holds(&self, key: &PartitionKey, tx: &mpsc::Sender<OwnedMessage>) -> bool {
        self.partitions
            .get(key)
            .is_some_and(|held| held.tx.same_channel(tx))
    }

    /// Hands `message` to its partition's worker queue `tx`, or holds it (pausing the
    /// partition) when that queue is full; `rooms` gets the wait for room.
    fn dispatch<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
        key: PartitionKey,
        tx: &mpsc::Sender<OwnedMessage>,
        message: OwnedMessage,
        rooms: &mut FuturesUnordered<Room>,
    ) {
        if let Some(held) = self.partitions.get_mut(&key) {
            if held.tx.same_channel(tx) {
                // Fetched before the pause took effect: after the held ones, in order.
                held.messages.push_back(message);
                return;
            }
            // Held for a worker of an earlier assignment: the partition was revoked since, and
            // librdkafka fetches those messages again from the committed offset.
            self.partitions.remove(&key);
        }
        match tx.try_send(message) {
            Ok(()) => {}
            // The worker stopped (its partition revoked): left uncommitted for the next owner.
            Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(message)) => {
                if let Err(error) = consumer.pause(&partition_list(&key)) {
                    tracing::warn!(%error, topic = %key.0, partition = key.1, "could not pause a partition whose queue is full");
                }
                tracing::debug!(topic = %key.0, partition = key.1, "partition paused: its handler is behind");
                self.next_generation += 1;
                let generation = self.next_generation;
                rooms.push(Self::room(key.clone(), generation, tx.clone()));
                self.partitions.insert(
                    key,
                    HeldPartition {
                        generation,
                        tx: tx.clone(),
                        messages: VecDeque::from([message]),
                    },
                );
            }
        }
    }

    /// Waits until `tx` has [`RESUME_ROOM`] free (only the fetch loop sends, so it stays free
    /// until the loop fills it); false if the worker is gone.
    fn room(key: PartitionKey, generation: u64, tx: mpsc::Sender<OwnedMessage>) -> Room {
        Box::pin(async move {
            let open = tx.reserve_many(RESUME_ROOM).await.is_ok();
            (key, generation, open)
        })
    }

    /// The worker queue of `key` has room (or is closed, `open` false): moves the held
    /// messages into it and resumes the partition once none are left.
    fn drained<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
        (key, generation, open): (PartitionKey, u64, bool),
        rooms: &mut FuturesUnordered<Room>,
    ) {
        let Some(held) = self
            .partitions
            .get_mut(&key)
            .filter(|held| held.generation == generation)
        else {
            return;
        };
        if !open {
            // The worker stopped (revoked): the held messages stay uncommitted.
            self.partitions.remove(&key);
            return;
        }
        while let Some(message) = held.messages.pop_front() {
            match held.tx.try_send(message) {
                Ok(()) => {}
                Err(TrySendError::Full(message)) => {
                    held.messages.push_front(message);
                    rooms.push(Self::room(key, generation, held.tx.clone()));
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.partitions.remove(&key);
                    return;
                }
            }
        }
        self.partitions.remove(&key);
        if let Err(error) = consumer.resume(&partition_list(&key)) {
            tracing::warn!(%error, topic = %key.0, partition = key.1, "could not resume a partition");
        }
        tracing::debug!(topic = %key.0, partition = key.1, "partition resumed");
    }
}

/// A partition worker's state as a revoke sees it.
#[derive(Debug, Default)]
struct BusyState {
    /// Inside a handler.
    busy: bool,
    /// The worker's assignment is over: its partition was revoked and the revoke's drain ended.
    /// Its offsets are not stored any more (the partition may be ours again by then, under a
    /// later worker whose stored offset this one's would move back).
    revoked: bool,
}

/// Whether a partition worker is inside a handler, so a revoke can wait for it, and whether
/// its assignment is still current, so a late handler stores no offset.
#[derive(Debug, Default)]
struct Busy {
    state: Mutex<BusyState>,
    idle: Condvar,
}

impl Busy {
    /// Marks busy unless `stop` was cancelled (checked under the lock a revoke waits on).
    fn enter(&self, stop: &CancellationToken) -> bool {
        let mut state = lock(&self.state);
        if stop.is_cancelled() {
            return false;
        }
        state.busy = true;
        true
    }

    /// Marks idle, running `store` first unless the assignment is over ([`Busy::revoke`]);
    /// under the lock, so a store either happens before the revoke's commit or not at all.
    fn leave(&self, store: impl FnOnce()) {
        let mut state = lock(&self.state);
        if !state.revoked {
            store();
        }
        state.busy = false;
        drop(state);
        self.idle.notify_all();
    }

    /// Ends the worker's assignment: it stores no offset from now on.
    fn revoke(&self) {
        lock(&self.state).revoked = true;
    }

    fn wait_idle(&self, deadline: Instant) -> bool {
        let mut state = lock(&self.state);
        while state.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .idle
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

#[derive(Debug)]
struct Slot {
    tx: mpsc::Sender<OwnedMessage>,
    stop: CancellationToken,
    busy: Arc<Busy>,
    /// Cancelled when the worker has ended (its task finished or was dropped).
    finished: CancellationToken,
}

#[derive(Debug, Default)]
struct Shared {
    assigned: Mutex<HashSet<PartitionKey>>,
    slots: Mutex<HashMap<PartitionKey, Slot>>,
    /// The revoked workers that may still be running (their `finished` tokens): the partition's
    /// next worker waits for its one before it handles anything.
    draining: Mutex<HashMap<PartitionKey, CancellationToken>>,
    drain_timeout: Duration,
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let keys: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let revoked: Vec<(PartitionKey, Slot)> = {
            let mut assigned = lock(&self.shared.assigned);
            let mut slots = lock(&self.shared.slots);
            keys.iter()
                .filter_map(|k| {
                    assigned.remove(k);
                    slots.remove(k).map(|slot| (k.clone(), slot))
                })
                .collect()
        };
        {
            // A partition's later worker waits for this one before it handles anything. (A
            // worker ends only after the one it waited for: the latest is the one to wait for.)
            let mut draining = lock(&self.shared.draining);
            draining.retain(|_, finished| !finished.is_cancelled());
            for (key, slot) in &revoked {
                slot.stop.cancel();
                draining.insert(key.clone(), slot.finished.clone());
            }
        }
        // Drain: let in-flight handlers of the revoked partitions finish so their offsets are
        // stored, then commit before the partitions are given away. Workers run on other
        // threads only on a multi-thread runtime; elsewhere, do not wait (what is in flight is
        // redelivered to the next owner instead).
        let multi = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .unwrap_or(false);
        let deadline = Instant::now()
            + if multi {
                self.shared.drain_timeout
            } else {
                Duration::ZERO
            };
        let wait = || {
            revoked
                .iter()
                .all(|(_, slot)| slot.busy.wait_idle(deadline))
        };
        let drained = if multi {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        };
        // What is done is stored now and committed below. A handler still running stores
        // nothing when it ends: by then the partition may be ours again, its offset stored past
        // this one by the next worker, which handles it again once this one has finished.
        for (_, slot) in &revoked {
            slot.busy.revoke();
        }
        if !drained {
            tracing::warn!(
                "rebalance: in-flight handlers did not finish in time; they will be redelivered"
            );
        }
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => tracing::warn!(%error, "commit on revoke failed"),
        }
        tracing::info!(partitions = keys.len(), "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // A partition paused while it was ours before (its queue was full) stays paused in
            // librdkafka across a revoke; its new worker starts with an empty queue.
            if let Err(error) = consumer.resume(tpl) {
                tracing::warn!(%error, "could not resume the assigned partitions");
            }
            let mut assigned = lock(&self.shared.assigned);
            for e in tpl.elements() {
                assigned.insert((e.topic().to_owned(), e.partition()));
            }
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// Moves messages to `<topic>.<group>.dlq`.
#[derive(Debug, Clone)]
struct DeadLetters {
    /// Set once the dead-letter topic is known to exist (created on first use).
    ensured: Arc<std::sync::atomic::AtomicBool>,
    /// Built with the consumer's options that apply to a producer / admin client, and its
    /// replication factor for the topics it creates.
    publisher: KafkaPublisher,
    topic: String,
    group: String,
    backoff: RetryPolicy,
}

impl DeadLetters {
    /// Makes sure the dead-letter topic exists, once: created only when the broker says it is
    /// unknown. Best effort: whatever fails here (no CREATE permission on a cluster where
    /// operations created the topic, no metadata) is logged, and the publish is tried anyway.
    async fn ensure(&self) {
        if self.ensured.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let created = match self.publisher.topic_exists(&self.topic).await {
            Ok(true) => Ok(()),
            Ok(false) => self.publisher.declare(&self.topic, 1).await,
            Err(error) => Err(error),
        };
        match created {
            Ok(()) => self
                .ensured
                .store(true, std::sync::atomic::Ordering::Release),
            Err(error) => {
                tracing::warn!(%error, topic = %self.topic, "cannot make sure the dead-letter topic exists; publishing anyway");
            }
        }
    }

    /// Publishes the dead letter, retrying until confirmed or `stop`; true once confirmed.
    async fn send(
        &self,
        m: &OwnedMessage,
        attempts: u32,
        error: &str,
        stop: &CancellationToken,
    ) -> bool {
        let (mut headers, _) = kafka_headers(m);
        headers
            .insert(headers::DLQ_ORIGINAL_DESTINATION, m.topic())
            .insert(headers::DLQ_ORIGINAL_PARTITION, m.partition().to_string())
            .insert(headers::DLQ_ORIGINAL_OFFSET, m.offset().to_string())
            .insert(headers::DLQ_GROUP, self.group.as_str())
            .insert(headers::DLQ_ATTEMPTS, attempts.to_string())
            .insert(
                headers::DLQ_ERROR,
                headers::dead_letter_error(error).as_ref(),
            );
        let mut letter = OutgoingMessage {
            destination: self.topic.clone(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            tokio::select! {
                () = self.ensure() => {}
                () = stop.cancelled() => return false,
            }
            match self.publisher.send(letter).await {
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, kind = ?e.kind(), topic = %self.topic, "dead-letter publish failed; retrying");
                    letter = e.into_message();
                }
            }
            tokio::select! {
                () = tokio::time::sleep(dead_letter_backoff(&self.backoff, attempt)) => {}
                () = stop.cancelled() => return false,
            }
        }
    }
}

/// The record's headers, and why the record is malformed if it is.
///
/// A header name that is not UTF-8 makes the record a poison message: Keel's headers are
/// string-named, and a payments handler must not act on a record whose headers it cannot read
/// as they were written. The record is dead-lettered without running the handler, with a
/// reason naming the header; the dead letter (and these headers) carry the name decoded lossily
/// (invalid bytes as U+FFFD).
fn kafka_headers(m: &OwnedMessage) -> (Headers, Option<String>) {
    let mut out = Headers::new();
    let mut malformed = None;
    if let Some(h) = m.headers() {
        for header in crate::kafka_native::raw_headers(h.as_borrowed()) {
            let name = match std::str::from_utf8(header.name) {
                Ok(name) => name.to_owned(),
                Err(_) => {
                    malformed.get_or_insert_with(|| {
                        format!(
                            "record header name b\"{}\" is not UTF-8",
                            header.name.escape_ascii()
                        )
                    });
                    String::from_utf8_lossy(header.name).into_owned()
                }
            };
            out.append(name, header.value.unwrap_or_default());
        }
    }
    (out, malformed)
}

/// The message as handlers see it, and why it is malformed if it is (see [`kafka_headers`]).
fn received(m: &OwnedMessage) -> (Received, Option<String>) {
    let (headers, malformed) = kafka_headers(m);
    let received = Received {
        destination: m.topic().to_owned(),
        key: m.key().map(Bytes::copy_from_slice),
        payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
        partition: Some(m.partition()),
        offset: Some(m.offset()),
        redelivered: false,
        attempt: 0,
    };
    (received, malformed)
}

struct Worker<H> {
    consumer: Arc<StreamConsumer<Ctx>>,
    handler: Arc<H>,
    policy: RetryPolicy,
    dead: DeadLetters,
}

impl<H: Handler> Worker<H> {
    /// Handles the partition's messages from `rx` in order. Waits first for `previous`, the
    /// partition's worker of an earlier assignment, to end (it may still be inside a handler
    /// after its revoke's drain timed out); `finished` is dropped (signalling the next worker)
    /// when this one ends.
    async fn run(
        self,
        mut rx: mpsc::Receiver<OwnedMessage>,
        stop: CancellationToken,
        busy: Arc<Busy>,
        previous: Option<CancellationToken>,
        finished: DropGuard,
    ) {
        let _finished = finished;
        if let Some(previous) = previous {
            // Not cut short by `stop`: a later worker waits for this one, so this one may end
            // only after its predecessor.
            tracing::debug!("partition worker waits for the revoked one still in its handler");
            previous.cancelled().await;
        }
        loop {
            let m = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                m = rx.recv() => match m { Some(m) => m, None => break },
            };
            if !busy.enter(&stop) {
                break;
            }
            let outcome = match received(&m) {
                (_, Some(malformed)) => {
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), reason = %malformed, "malformed record dead-lettered");
                    Outcome::DeadLetter {
                        attempts: 0,
                        error: malformed,
                    }
                }
                (message, None) => {
                    process(&*self.handler, message, &self.policy, &stop, "kafka").await
                }
            };
            let done = match outcome {
                Outcome::Handled => true,
                Outcome::DeadLetter { attempts, error } => {
                    self.dead.send(&m, attempts, &error, &stop).await
                }
                Outcome::Abandoned => false,
            };
            busy.leave(|| {
                if done
                    && let Err(error) =
                        self.consumer
                            .store_offset(m.topic(), m.partition(), m.offset())
                {
                    // The partition is no longer ours: the next owner handles it again.
                    tracing::warn!(%error, topic = m.topic(), partition = m.partition(), offset = m.offset(), "could not store offset");
                }
            });
            if !done {
                // Never handle past a message that was not finished: that would commit it.
                break;
            }
        }
    }
}

/// What Keel asks the broker to create: `partitions` partitions (at least 1), `replication`
/// replicas each ([`crate::KAFKA_BROKER_DEFAULT_REPLICATION`] or at least 1).
fn new_topic(topic: &str, partitions: i32, replication: i32) -> Result<NewTopic<'_>, Error> {
    check_replication(replication)?;
    Ok(NewTopic::new(
        topic,
        partitions.max(1),
        TopicReplication::Fixed(replication),
    ))
}

async fn ensure_topic(
    bootstrap: &str,
    options: &[(String, String)],
    topic: &str,
    partitions: i32,
    replication: i32,
) -> Result<(), Error> {
    let spec = new_topic(topic, partitions, replication)?;
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap, None, options)
        .create()
        .map_err(|e| Error::new("create Kafka admin client", e))?;
    let results = admin
        .create_topics(
            &[spec],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .map_err(|e| Error::new(format!("create topic {topic}"), e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(Error::new(format!("create topic {t}"), code)),
        }
    }
    Ok(())
}

pub(crate) async fn run<H: Handler>(
    config: ConsumerBuilder,
    handler: H,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let bootstrap = bootstrap(&config.broker).to_owned();
    let dlq_topic = format!("{}.{}.dlq", config.destination, config.group);
    let dlq_options = dead_letter_options(&config.kafka_options);
    let dlq_publisher = KafkaPublisher::new(&PublisherBuilder {
        broker: config.broker.clone(),
        confirm_timeout: Duration::from_secs(30),
        connection_name: config.connection_name.as_ref().map(|n| format!("{n}-dlq")),
        kafka_options: dlq_options,
        kafka_replication: config.kafka_replication,
    })?;
    let dead = DeadLetters {
        ensured: Arc::default(),
        publisher: dlq_publisher,
        topic: dlq_topic,
        group: config.group.clone(),
        backoff: config.retry,
    };

    let shared = Arc::new(Shared {
        drain_timeout: config.revoke_drain_timeout,
        ..Shared::default()
    });
    let mut cc = base_config(&bootstrap, config.connection_name.as_deref());
    cc.set("group.id", &config.group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("auto.commit.interval.ms", "1000");
    set_all(&mut cc, &config.kafka_options);
    cc.set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    let consumer: Arc<StreamConsumer<Ctx>> = Arc::new(
        cc.create_with_context(Ctx {
            shared: shared.clone(),
        })
        .map_err(|e| Error::new("create Kafka consumer", e))?,
    );
    consumer
        .subscribe(&[config.destination.as_str()])
        .map_err(|e| Error::new(format!("subscribe to {}", config.destination), e))?;

    let handler = Arc::new(handler);
    let mut workers = JoinSet::new();
    let all_stop = CancellationToken::new();
    // A worker that ends with a panic (a bug in Keel: handler panics are caught in `process`)
    // ends the consumer with an error: its partition's later messages would otherwise be
    // dropped on the floor, the partition stalled for good without a word.
    let mut failed = None;
    let mut held = Held::default();
    let mut rooms: FuturesUnordered<Room> = FuturesUnordered::new();
    tokio::pin!(shutdown);
    'fetch: loop {
        let message = tokio::select! {
            biased;
            () = &mut shutdown => break 'fetch,
            Some(joined) = workers.join_next() => {
                if let Err(error) = joined {
                    tracing::error!(%error, topic = %config.destination, "a partition worker failed; stopping the consumer");
                    failed = Some(error);
                    break 'fetch;
                }
                continue 'fetch;
            }
            Some(room) = rooms.next(), if !rooms.is_empty() => {
                held.drained(&consumer, room, &mut rooms);
                continue 'fetch;
            }
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m.detach(),
            Err(error) => {
                tracing::warn!(%error, "Kafka consumer error");
                tokio::select! {
                    () = &mut shutdown => break 'fetch,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue 'fetch,
                }
            }
        };
        let key = (message.topic().to_owned(), message.partition());
        tracing::trace!(topic = %key.0, partition = key.1, offset = message.offset(), "fetched");
        let tx = {
            let assigned = lock(&shared.assigned);
            let mut slots = lock(&shared.slots);
            if let Some(slot) = slots.get(&key) {
                Some(slot.tx.clone())
            } else if assigned.contains(&key) {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                let stop = all_stop.child_token();
                let busy = Arc::new(Busy::default());
                let finished = CancellationToken::new();
                // The partition's revoked worker, if still running: the new one waits for it
                // (the fetch loop does not; it fills the queue and pauses the partition).
                let previous = lock(&shared.draining)
                    .remove(&key)
                    .filter(|previous| !previous.is_cancelled());
                let worker = Worker {
                    consumer: consumer.clone(),
                    handler: handler.clone(),
                    policy: config.retry,
                    dead: dead.clone(),
                };
                workers.spawn(worker.run(
                    rx,
                    stop.clone(),
                    busy.clone(),
                    previous,
                    finished.clone().drop_guard(),
                ));
                slots.insert(
                    key.clone(),
                    Slot {
                        tx: tx.clone(),
                        stop,
                        busy,
                        finished,
                    },
                );
                Some(tx)
            } else {
                None
            }
        };
        // A message for a partition that is not (or no longer) ours is dropped uncommitted: its
        // owner receives it. Waits at most PAUSE_GRACE for room: then a full queue pauses its
        // partition (see `Held`).
        if let Some(tx) = tx {
            let message = if held.holds(&key, &tx) {
                message
            } else {
                match tx.try_send(message) {
                    Ok(()) | Err(TrySendError::Closed(_)) => continue 'fetch,
                    Err(TrySendError::Full(message)) => {
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break 'fetch,
                            room = tokio::time::timeout(PAUSE_GRACE, tx.reserve()) => match room {
                                Ok(Ok(permit)) => {
                                    permit.send(message);
                                    continue 'fetch;
                                }
                                // The worker stopped (revoked): left uncommitted.
                                Ok(Err(_)) => continue 'fetch,
                                Err(_) => message,
                            },
                        }
                    }
                }
            };
            held.dispatch(&consumer, key, &tx, message, &mut rooms);
        }
    }

    // Shutdown: stop fetching, let in-flight handlers finish (queued messages stay uncommitted),
    // commit what was handled, leave the group.
    all_stop.cancel();
    lock(&shared.slots).clear();
    lock(&shared.draining).clear();
    while workers.join_next().await.is_some() {}
    let committed = {
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync)).await
    };
    match committed {
        Ok(Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {}
        Ok(Err(error)) => tracing::warn!(%error, "final commit failed"),
        Err(error) => tracing::warn!(%error, "final commit task failed"),
    }
    consumer.unsubscribe();
    lock(&shared.assigned).clear();
    // Closing the consumer blocks while it leaves the group.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    match failed {
        None => Ok(()),
        Some(error) => Err(Error::new(
            format!("consume {}", config.destination),
            format!("a partition worker failed: {error}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_letter_producer_gets_the_consumers_options_but_consumer_only_ones() {
        let own = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let consumer = own(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "ledger"),
            ("ssl.ca.location", "/etc/ca.pem"),
            ("group.instance.id", "ledger-1"),
            ("session.timeout.ms", "6000"),
            ("auto.offset.reset", "latest"),
            ("socket.timeout.ms", "5000"),
        ]);
        assert_eq!(
            dead_letter_options(&consumer),
            own(&[
                ("allow.auto.create.topics", "false"),
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "ledger"),
                ("ssl.ca.location", "/etc/ca.pem"),
                ("socket.timeout.ms", "5000"),
            ])
        );
        // They make a valid producer configuration (librdkafka refuses unknown or misplaced
        // properties only at creation).
        let options = dead_letter_options(&own(&[("group.id", "g"), ("linger.ms", "1")]));
        let producer: Result<FutureProducer, _> =
            client_config("127.0.0.1:9092", None, &options).create();
        assert!(producer.is_ok());
    }

    #[test]
    fn topics_are_created_with_the_brokers_default_replication_unless_configured() {
        let default = new_topic("t", 3, crate::KAFKA_BROKER_DEFAULT_REPLICATION).unwrap();
        assert!(matches!(default.replication, TopicReplication::Fixed(-1)));
        assert_eq!(default.num_partitions, 3);
        let three = new_topic("t", 0, 3).unwrap();
        assert!(matches!(three.replication, TopicReplication::Fixed(3)));
        assert_eq!(three.num_partitions, 1);
        for bad in [0, -2] {
            let error = new_topic("t", 1, bad).unwrap_err().to_string();
            assert!(error.contains("replication factor"), "{error}");
        }
    }
}
