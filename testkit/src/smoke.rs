//! One check per live service, each touching the service for real with names of its own and
//! cleaning up after itself. The smoke tests assert on them and `keel-smoke` prints them.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use zookeeper_client as zk;

use crate::{eventually, unique};

/// Why a smoke check failed: the step and the underlying error.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct SmokeError {
    step: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Attaches the step being performed to an error.
pub trait Step<T> {
    /// Names the step.
    fn step(self, step: impl Into<String>) -> Result<T, SmokeError>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Step<T> for Result<T, E> {
    fn step(self, step: impl Into<String>) -> Result<T, SmokeError> {
        self.map_err(|e| SmokeError {
            step: step.into(),
            source: e.into(),
        })
    }
}

fn check(ok: bool, step: impl Into<String>) -> Result<(), SmokeError> {
    if ok {
        Ok(())
    } else {
        Err(SmokeError {
            step: step.into(),
            source: "check failed".into(),
        })
    }
}

const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------
// ZooKeeper

/// Connects a ZooKeeper session to `connect` (6 s session timeout).
///
/// # Errors
/// When no session can be established.
pub async fn zk_connect(connect: &str) -> Result<zk::Client, SmokeError> {
    zk::Client::connector()
        .with_session_timeout(Duration::from_secs(6))
        .connect(connect)
        .await
        .step(format!("connect to ZooKeeper at {connect}"))
}

/// ZooKeeper: an EPHEMERAL node owned by one session fires a child watch held by another, and
/// disappears once its session closes. Returns what it did, one line per step.
///
/// # Errors
/// The first step that did not behave.
pub async fn zookeeper(connect: &str) -> Result<Vec<String>, SmokeError> {
    let mut done = Vec::new();
    let root = format!("/{}", unique("keel-smoke"));
    let watcher = zk_connect(connect).await?;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    watcher
        .create(&root, b"", &persistent)
        .await
        .step(format!("create {root}"))?;
    let result = async {
        let (children, _, watch) = watcher
            .get_and_watch_children(&root)
            .await
            .step("watch children")?;
        check(children.is_empty(), "new root has no children")?;
        done.push(format!("created {root} and set a child watch"));

        let owner = zk_connect(connect).await?;
        let node = format!("{root}/instance-1");
        let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        owner
            .create(&node, b"{\"smoke\":true}", &ephemeral)
            .await
            .step(format!("create EPHEMERAL {node}"))?;
        let event = tokio::time::timeout(WAIT, watch.changed())
            .await
            .step("child watch fires")?;
        check(
            event.event_type == zk::EventType::NodeChildrenChanged,
            format!(
                "child watch event is NodeChildrenChanged, got {:?}",
                event.event_type
            ),
        )?;
        let stat = watcher
            .check_stat(&node)
            .await
            .step("stat the ephemeral node")?
            .ok_or("ephemeral node missing")
            .step("stat the ephemeral node")?;
        check(
            stat.ephemeral_owner == owner.session_id().0,
            "ephemeral node is owned by its creator's session",
        )?;
        done.push(format!(
            "session {} created EPHEMERAL {node}; the child watch fired",
            owner.session_id()
        ));

        drop(owner);
        eventually("ephemeral node removed", WAIT, || async {
            matches!(watcher.check_stat(&node).await, Ok(None)).then_some(())
        })
        .await
        .step("closing the owner's session removes its node")?;
        done.push("closed that session; ZooKeeper removed the node".to_owned());
        Ok::<_, SmokeError>(())
    }
    .await;
    let _ = crate::zk::delete_tree(&watcher, &root).await;
    result?;
    done.push(format!("deleted {root}"));
    Ok(done)
}

// ------------------------------------------------------------------------------------------
// Kafka

fn kafka_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4");
    config
}

/// Creates `topic` with `partitions` partitions.
///
/// # Errors
/// When the broker refuses or does not answer.
pub async fn kafka_create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> Result<(), SmokeError> {
    let admin: AdminClient<DefaultClientContext> = kafka_config(bootstrap)
        .create()
        .step("create admin client")?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(WAIT)),
        )
        .await
        .step(format!("create topic {topic}"))?;
    for r in results {
        r.map_err(|(t, e)| format!("{t}: {e}"))
            .step(format!("create topic {topic}"))?;
    }
    Ok(())
}

/// Deletes `topic` (best effort) — except on tansu, where it leaves the topic in place; true if
/// a deletion was requested.
///
/// tansu 0.6.0 deletes *every* topic of the cluster on a DeleteTopics request for one (its
/// `topic_delete_by.sql` selects topics by cluster, not by name), and a later produce to any of
/// them panics its storage task, which leaves the broker answering ApiVersions but failing
/// everything else. Tests use unique topic names, so leaving theirs costs only disk.
pub async fn kafka_delete_topic(bootstrap: &str, topic: &str) -> bool {
    if kafka_is_tansu(bootstrap).await {
        return false;
    }
    match kafka_config(bootstrap).create::<AdminClient<DefaultClientContext>>() {
        Ok(admin) => admin
            .delete_topics(&[topic], &AdminOptions::new())
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// Whether the broker at `bootstrap` is tansu (its cluster id starts with `tansu`, as tansu's
/// default `tansu_cluster` does). Unknown counts as tansu: the caller then deletes nothing.
pub async fn kafka_is_tansu(bootstrap: &str) -> bool {
    let config = kafka_config(bootstrap);
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = config.create().ok()?;
        consumer
            .client()
            .fetch_cluster_id(rdkafka::util::Timeout::After(WAIT))
    })
    .await
    .ok()
    .flatten()
    .is_none_or(|id| id.starts_with("tansu"))
}

/// An idempotent producer with `acks=all`.
///
/// # Errors
/// When the client cannot be created.
pub fn kafka_producer(bootstrap: &str) -> Result<FutureProducer, SmokeError> {
    kafka_config(bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .step("create producer")
}

/// Produces `values` to `topic` (key `k`), waiting for each delivery report; returns the offsets.
///
/// # Errors
/// The first message the broker did not acknowledge.
pub async fn kafka_produce(
    producer: &FutureProducer,
    topic: &str,
    values: &[String],
) -> Result<Vec<i64>, SmokeError> {
    let mut offsets = Vec::with_capacity(values.len());
    for value in values {
        let delivery = producer
            .send(
                FutureRecord::to(topic).key("k").payload(value.as_str()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .step(format!("produce {value:?} to {topic}"))?;
        offsets.push(delivery.offset);
    }
    Ok(offsets)
}

/// A group consumer with manual commits that starts at the earliest offset when the group has
/// none, subscribed to `topic`.
///
/// # Errors
/// When the client cannot be created or subscribed.
pub fn kafka_consumer(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> Result<StreamConsumer, SmokeError> {
    let consumer: StreamConsumer = kafka_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .step("create consumer")?;
    consumer
        .subscribe(&[topic])
        .step(format!("subscribe to {topic}"))?;
    Ok(consumer)
}

/// Receives `n` messages, committing each (synchronously) after it was handled; returns their
/// payloads.
///
/// # Errors
/// When fewer than `n` arrive within the wait, or a commit fails.
pub async fn kafka_consume_and_commit(
    consumer: &StreamConsumer,
    n: usize,
) -> Result<Vec<String>, SmokeError> {
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .step(format!("receive message {} of {n}", seen.len() + 1))?
            .step("receive")?;
        let payload = message
            .payload_view::<str>()
            .transpose()
            .step("payload is UTF-8")?
            .unwrap_or_default()
            .to_owned();
        consumer
            .commit_message(&message, CommitMode::Sync)
            .step("commit")?;
        seen.push(payload);
    }
    Ok(seen)
}

/// The offset `group` has committed on partition 0 of `topic`, if any.
///
/// # Errors
/// When the broker does not answer.
pub async fn kafka_committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
) -> Result<Option<i64>, SmokeError> {
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: StreamConsumer = kafka_config(&bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .step("create consumer")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let committed = consumer
            .committed_offsets(tpl, WAIT)
            .step(format!("read committed offsets of {group}"))?;
        let offset = committed
            .find_partition(&topic, 0)
            .map(|p| p.offset())
            .unwrap_or(Offset::Invalid);
        Ok(match offset {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
    })
    .await
    .step("join")?
}

/// Kafka: create a topic, produce with `acks=all`, consume in a group, commit, read the
/// committed offset back, delete the topic (not on tansu: see [`kafka_delete_topic`]).
///
/// # Errors
/// The first step that did not behave.
pub async fn kafka(bootstrap: &str) -> Result<Vec<String>, SmokeError> {
    let mut done = Vec::new();
    let topic = unique("keel-smoke");
    let group = unique("keel-smoke-group");
    kafka_create_topic(bootstrap, &topic, 1).await?;
    let result = async {
        done.push(format!("created topic {topic}"));
        let values: Vec<String> = (0..10).map(|i| format!("{{\"seq\":{i}}}")).collect();
        let producer = kafka_producer(bootstrap)?;
        let offsets = kafka_produce(&producer, &topic, &values).await?;
        check(offsets == (0..10).collect::<Vec<_>>(), "offsets 0..10")?;
        done.push("produced 10 messages with acks=all (idempotent producer)".to_owned());
        let consumer = kafka_consumer(bootstrap, &group, &topic)?;
        let seen = kafka_consume_and_commit(&consumer, values.len()).await?;
        check(seen == values, "consumed what was produced, in order")?;
        drop(consumer);
        let committed = kafka_committed(bootstrap, &group, &topic).await?;
        check(
            committed == Some(10),
            format!("committed offset is 10, got {committed:?}"),
        )?;
        done.push(format!(
            "consumed them in group {group} and committed offset 10"
        ));
        Ok::<_, SmokeError>(())
    }
    .await;
    let deleted = kafka_delete_topic(bootstrap, &topic).await;
    result?;
    done.push(if deleted {
        format!("deleted topic {topic}")
    } else {
        format!("left topic {topic} in place (tansu's DeleteTopics would delete every topic)")
    });
    Ok(done)
}

// ------------------------------------------------------------------------------------------
// RabbitMQ

/// RabbitMQ: declare a durable queue, publish a persistent message with a publisher confirm,
/// consume it, ack it, delete the queue.
///
/// # Errors
/// The first step that did not behave.
pub async fn rabbitmq(url: &str) -> Result<Vec<String>, SmokeError> {
    let mut done = Vec::new();
    let queue = unique("keel-smoke");
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .step("connect to RabbitMQ")?;
    let channel = connection.create_channel().await.step("open channel")?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .step(format!("declare durable queue {queue}"))?;
    let result = async {
        done.push(format!("declared durable queue {queue}"));
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .step("enable publisher confirms")?;
        let body = b"{\"smoke\":true}";
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .step("publish")?
            .await
            .step("await the publisher confirm")?;
        check(confirm.is_ack(), "broker acked the publish")?;
        done.push("published a persistent message; the broker confirmed it".to_owned());
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "keel-smoke".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .step("consume")?;
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .step("receive the message")?
            .ok_or("consumer ended")
            .step("receive the message")?
            .step("receive the message")?;
        check(delivery.data == body, "received what was published")?;
        delivery.ack(BasicAckOptions::default()).await.step("ack")?;
        done.push("consumed it and acked it".to_owned());
        Ok::<_, SmokeError>(())
    }
    .await;
    let deleted = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "bye".into()).await;
    result?;
    let left = deleted.step(format!("delete queue {queue}"))?;
    done.push(format!("deleted queue {queue} ({left:?} messages left)"));
    Ok(done)
}
