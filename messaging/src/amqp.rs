//! The RabbitMQ adapter, on lapin.
//!
//! Topology for destination `D` (declared idempotently by publishers and consumers alike, with
//! the same arguments): durable queue `D` whose `x-dead-letter-exchange` is the durable fanout
//! exchange `D.dlx`, bound to the durable queue `D.dlq`. Publishes go through the default exchange
//! to queue `D` as persistent, `mandatory` messages on a channel in confirm mode. Consumers
//! compete on `D`; deliveries are spread over lanes by key (one key → one lane → in order) and
//! acknowledged after their handler succeeded or after a confirmed dead-letter publish.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use lapin::PublisherConfirm;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::consumer::{ConsumerBuilder, Handler};
use crate::error::{BoxError, Error, PublishError, PublishErrorKind};
use crate::headers::{self, Headers};
use crate::message::{OutgoingMessage, Receipt, Received};
use crate::publisher::PublisherBuilder;
use crate::retry::{MIN_BACKOFF, Outcome, RetryPolicy, dead_letter_backoff, process};

/// Bound on opening a connection with its channels (a broker that accepts TCP but never
/// finishes the handshake must not stall a reconnect loop).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on an acknowledgement (or a dead letter and its acknowledgement) on a live connection.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on closing a channel or connection that may already be dead.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A consumer session that lived this long counts as healthy even if it settled nothing (a
/// quiet queue): its loss is followed by an immediate reconnect.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// The longest pause between reconnects.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

fn url(broker: &Broker) -> &str {
    match broker {
        Broker::Amqp { url } => url,
        Broker::Kafka { bootstrap } => bootstrap,
    }
}

/// The dead-letter exchange of queue `queue`.
pub(crate) fn dead_letter_exchange(queue: &str) -> String {
    format!("{queue}.dlx")
}

/// The dead-letter queue of queue `queue`.
pub(crate) fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares queue `queue` with its dead-letter exchange and queue (idempotent).
pub(crate) async fn declare(channel: &Channel, queue: &str) -> lapin::Result<()> {
    let dlx = dead_letter_exchange(queue);
    let dlq = dead_letter_queue(queue);
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(dlq.as_str().into(), durable_queue(), FieldTable::default())
        .await?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.into()),
    );
    channel
        .queue_declare(queue.into(), durable_queue(), args)
        .await?;
    Ok(())
}

/// AMQP short strings (names, header keys, message ids) hold at most 255 bytes; lapin panics
/// beyond that, so every one is checked first.
fn short(what: &str, s: &str) -> Result<(), String> {
    short_len(what, s.len())
}

fn short_len(what: &str, len: usize) -> Result<(), String> {
    if len > 255 {
        Err(format!("{what} is {len} bytes; AMQP allows 255"))
    } else {
        Ok(())
    }
}

fn check(m: &OutgoingMessage) -> Result<(), String> {
    // The dead-letter names add 4 bytes (".dlq").
    short_len("destination", m.destination.len() + 4)?;
    for (k, _) in m.headers.iter() {
        short("header name", k)?;
    }
    if let Some(id) = m.message_id() {
        short("message id", id)?;
    }
    if let Some(ct) = m.headers.get_str(headers::CONTENT_TYPE) {
        short("content type", ct)?;
    }
    Ok(())
}

/// The message's AMQP properties: persistent; the message id and content type as the native
/// properties (not repeated in the headers table); the other headers, and the key, in the table
/// (none at all when there are none).
fn properties(m: &OutgoingMessage) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in m.headers.iter() {
        if k.eq_ignore_ascii_case(headers::MESSAGE_ID)
            || k.eq_ignore_ascii_case(headers::CONTENT_TYPE)
        {
            continue;
        }
        table.insert(
            k.into(),
            AMQPValue::LongString(LongString::from(v.to_vec())),
        );
    }
    if let Some(key) = &m.key {
        table.insert(
            headers::KEY.into(),
            AMQPValue::LongString(LongString::from(key.clone())),
        );
    }
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if !table.inner().is_empty() {
        props = props.with_headers(table);
    }
    if let Some(id) = m.message_id() {
        props = props.with_message_id(ShortString::from(id));
    }
    if let Some(ct) = m.headers.get_str(headers::CONTENT_TYPE) {
        props = props.with_content_type(ShortString::from(ct));
    }
    props
}

/// The delivery's headers table, with its `message_id` and `content_type` properties under
/// Keel's header names.
fn amqp_headers(d: &Delivery) -> Headers {
    let mut out = Headers::new();
    if let Some(id) = d.properties.message_id() {
        out.append(headers::MESSAGE_ID, id.as_str());
    }
    if let Some(ct) = d.properties.content_type() {
        out.append(headers::CONTENT_TYPE, ct.as_str());
    }
    if let Some(table) = d.properties.headers() {
        for (k, v) in table {
            match v {
                AMQPValue::LongString(s) => {
                    out.append(k.as_str(), s.as_bytes());
                }
                AMQPValue::ShortString(s) => {
                    out.append(k.as_str(), s.as_str());
                }
                _ => {}
            }
        }
    }
    out
}

fn connection_properties(name: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(name.into())
}

async fn wait_confirm(
    confirm: PublisherConfirm,
    timeout: Duration,
) -> Result<(), (PublishErrorKind, BoxError)> {
    match tokio::time::timeout(timeout, confirm).await {
        Err(_) => Err((
            PublishErrorKind::Timeout,
            "no publisher confirm in time".into(),
        )),
        Ok(Err(e)) => Err((PublishErrorKind::Unavailable, e.into())),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)))) => Err((
            PublishErrorKind::Unroutable,
            "returned by the broker: no queue bound".into(),
        )),
        Ok(Ok(Confirmation::Nack(None))) => {
            Err((PublishErrorKind::Rejected, "nacked by the broker".into()))
        }
        Ok(Ok(Confirmation::NotRequested)) => Err((
            PublishErrorKind::Rejected,
            "channel not in confirm mode".into(),
        )),
    }
}

// ------------------------------------------------------------------------------------------
// Publisher

#[derive(Debug)]
struct Session {
    connection: Connection,
    channel: Channel,
}

#[derive(Debug)]
struct PubInner {
    url: String,
    name: String,
    timeout: Duration,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    declared: Mutex<HashSet<String>>,
}

/// RabbitMQ publisher: one connection, one channel in confirm mode, re-opened after a failure.
#[derive(Debug, Clone)]
pub(crate) struct AmqpPublisher {
    inner: Arc<PubInner>,
}

impl AmqpPublisher {
    pub(crate) async fn connect(b: &PublisherBuilder) -> Result<Self, Error> {
        let name = b
            .connection_name
            .clone()
            .unwrap_or_else(|| format!("keel-publisher-{}", uuid::Uuid::new_v4().simple()));
        let p = Self {
            inner: Arc::new(PubInner {
                url: url(&b.broker).to_owned(),
                name,
                timeout: b.confirm_timeout,
                session: tokio::sync::Mutex::new(None),
                declared: Mutex::new(HashSet::new()),
            }),
        };
        p.channel()
            .await
            .map_err(|e| Error::new("connect to RabbitMQ", e))?;
        Ok(p)
    }

    async fn channel(&self) -> lapin::Result<Channel> {
        let mut session = self.inner.session.lock().await;
        if let Some(s) = session.as_ref() {
            if s.channel.status().connected() {
                return Ok(s.channel.clone());
            }
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                s.connection.close(200, "reconnecting".into()),
            )
            .await;
        }
        *session = None;
        self.inner
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let connection =
                Connection::connect(&self.inner.url, connection_properties(&self.inner.name))
                    .await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>((connection, channel))
        })
        .await;
        let (connection, channel) = opened.map_err(|_| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no RabbitMQ connection within {CONNECT_TIMEOUT:?}"),
            ))
        })??;
        *session = Some(Arc::new(Session {
            connection,
            channel: channel.clone(),
        }));
        Ok(channel)
    }

    async fn start(
        &self,
        m: &OutgoingMessage,
    ) -> Result<PublisherConfirm, (PublishErrorKind, BoxError)> {
        check(m).map_err(|e| (PublishErrorKind::Invalid, BoxError::from(e)))?;
        let unavailable = |e: lapin::Error| (PublishErrorKind::Unavailable, BoxError::from(e));
        let channel = self.channel().await.map_err(unavailable)?;
        let known = self
            .inner
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&m.destination);
        if !known {
            declare(&channel, &m.destination)
                .await
                .map_err(unavailable)?;
            self.inner
                .declared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(m.destination.clone());
        }
        channel
            .basic_publish(
                "".into(),
                m.destination.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.payload,
                properties(m),
            )
            .await
            .map_err(unavailable)
    }

    fn receipt(m: &OutgoingMessage) -> Receipt {
        Receipt {
            destination: m.destination.clone(),
            message_id: m.message_id().unwrap_or_default().to_owned(),
            partition: None,
            offset: None,
        }
    }

    pub(crate) async fn send(&self, m: OutgoingMessage) -> Result<Receipt, PublishError> {
        let result = match self.start(&m).await {
            Ok(confirm) => wait_confirm(confirm, self.inner.timeout).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Ok(Self::receipt(&m)),
            Err((kind, e)) => Err(PublishError::new(kind, e, m)),
        }
    }

    pub(crate) async fn send_batch(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Vec<Result<Receipt, PublishError>> {
        let mut pending = Vec::with_capacity(messages.len());
        for m in &messages {
            pending.push(self.start(m).await);
        }
        let mut results = Vec::with_capacity(messages.len());
        for (m, p) in messages.into_iter().zip(pending) {
            let r = match p {
                Ok(confirm) => wait_confirm(confirm, self.inner.timeout).await,
                Err(e) => Err(e),
            };
            results.push(match r {
                Ok(()) => Ok(Self::receipt(&m)),
                Err((kind, e)) => Err(PublishError::new(kind, e, m)),
            });
        }
        results
    }

    pub(crate) async fn declare(&self, queue: &str) -> Result<(), Error> {
        short("queue name", &format!("{queue}.dlq"))
            .map_err(|e| Error::new(format!("declare queue {queue}"), e))?;
        let channel = self
            .channel()
            .await
            .map_err(|e| Error::new("connect to RabbitMQ", e))?;
        declare(&channel, queue)
            .await
            .map_err(|e| Error::new(format!("declare queue {queue}"), e))?;
        self.inner
            .declared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(queue.to_owned());
        Ok(())
    }

    pub(crate) async fn flush(&self) -> Result<(), Error> {
        // Every publish awaits its own confirm; nothing is buffered on our side.
        Ok(())
    }

    pub(crate) async fn close(&self) -> Result<(), Error> {
        let session = self.inner.session.lock().await.take();
        if let Some(s) = session.filter(|s| s.connection.status().connected()) {
            s.connection
                .close(200, "publisher closed".into())
                .await
                .map_err(|e| Error::new("close RabbitMQ connection", e))?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Consumer

/// Publishes dead letters to `<queue>.dlx` on a channel of its own, in confirm mode.
#[derive(Debug, Clone)]
struct DeadLetters {
    connection: Arc<Connection>,
    /// Re-opened when the broker closed it (a channel exception closes only the channel).
    channel: Arc<tokio::sync::Mutex<Channel>>,
    queue: String,
    exchange: String,
    group: String,
    timeout: Duration,
    backoff: RetryPolicy,
}

impl DeadLetters {
    /// Publishes the dead letter to the dead-letter exchange, retrying with backoff until the
    /// broker confirms it; true once confirmed, false only when `stop` ended the wait (the
    /// delivery then stays unacknowledged and is redelivered).
    ///
    /// A letter the broker returns as unroutable (someone deleted `<queue>.dlq` or its binding)
    /// re-declares the topology before the next attempt; a closed channel is re-opened. A nack
    /// (e.g. a full dead-letter queue with `overflow=reject-publish`) is retried as it is: the
    /// lane waits here rather than drop the message.
    async fn send(
        &self,
        d: &Delivery,
        attempts: u32,
        error: &str,
        stop: &CancellationToken,
    ) -> bool {
        let mut h = amqp_headers(d);
        h.insert(headers::DLQ_ORIGINAL_DESTINATION, self.queue.as_str())
            .insert(headers::DLQ_GROUP, self.group.as_str())
            .insert(headers::DLQ_ATTEMPTS, attempts.to_string())
            .insert(
                headers::DLQ_ERROR,
                headers::dead_letter_error(error).as_ref(),
            );
        let letter = OutgoingMessage {
            destination: self.exchange.clone(),
            key: None,
            payload: d.data.clone(),
            headers: h,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = tokio::select! {
                biased;
                () = stop.cancelled() => return false,
                r = self.publish(&letter) => r,
            };
            match sent {
                Ok(()) => return true,
                Err((kind, error)) => {
                    tracing::warn!(%error, ?kind, attempt, queue = %self.queue, "dead-letter publish not confirmed; retrying");
                    if kind == PublishErrorKind::Unroutable {
                        self.redeclare().await;
                    }
                }
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(dead_letter_backoff(&self.backoff, attempt)) => {}
            }
        }
    }

    /// One publish of `letter`, waiting for its confirm.
    async fn publish(&self, letter: &OutgoingMessage) -> Result<(), (PublishErrorKind, BoxError)> {
        let unavailable = |e: lapin::Error| (PublishErrorKind::Unavailable, BoxError::from(e));
        let channel = self.channel().await.map_err(unavailable)?;
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &letter.payload,
                properties(letter),
            )
            .await
            .map_err(unavailable)?;
        wait_confirm(confirm, self.timeout).await
    }

    /// The dead-letter channel, re-opened (in confirm mode) if the broker closed it.
    async fn channel(&self) -> lapin::Result<Channel> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            let reopened = tokio::time::timeout(CONNECT_TIMEOUT, async {
                let fresh = self.connection.create_channel().await?;
                fresh
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok::<_, lapin::Error>(fresh)
            })
            .await
            .map_err(|_| {
                lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no dead-letter channel within {CONNECT_TIMEOUT:?}"),
                ))
            })??;
            *channel = reopened;
        }
        Ok(channel.clone())
    }

    /// Re-declares the queue's topology (best effort: the next publish tells whether it worked).
    async fn redeclare(&self) {
        let declared = match self.channel().await {
            Ok(channel) => tokio::time::timeout(CONNECT_TIMEOUT, declare(&channel, &self.queue))
                .await
                .map_err(|_| BoxError::from("no answer to the declarations"))
                .and_then(|r| r.map_err(BoxError::from)),
            Err(e) => Err(e.into()),
        };
        match declared {
            Ok(()) => tracing::info!(queue = %self.queue, "dead-letter topology re-declared"),
            Err(error) => {
                tracing::warn!(%error, queue = %self.queue, "could not re-declare the dead-letter topology");
            }
        }
    }
}

fn received(d: &Delivery, queue: &str) -> Received {
    let headers = amqp_headers(d);
    Received {
        destination: queue.to_owned(),
        key: headers.get(headers::KEY).map(Bytes::copy_from_slice),
        payload: Bytes::copy_from_slice(&d.data),
        headers,
        partition: None,
        offset: None,
        redelivered: d.redelivered,
        attempt: 0,
    }
}

/// Handles the deliveries of one lane in order. `stop` ends it after the message in hand;
/// `lost` (the connection is gone) also abandons an acknowledgement under way: lapin can leave
/// the future of an ack issued just as the connection dies pending forever, and the broker
/// redelivers the message anyway.
async fn lane<H: Handler>(
    mut rx: mpsc::Receiver<Delivery>,
    handler: Arc<H>,
    policy: RetryPolicy,
    stop: CancellationToken,
    lost: CancellationToken,
    dead: DeadLetters,
    settled_any: Arc<AtomicBool>,
) {
    loop {
        let d = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            d = rx.recv() => match d { Some(d) => d, None => break },
        };
        let outcome = process(
            &*handler,
            received(&d, &dead.queue),
            &policy,
            &stop,
            "rabbitmq",
        )
        .await;
        // Only an acknowledgement is bounded by SETTLE_TIMEOUT: a dead letter waits for its
        // confirm as long as it takes (or until `stop`), because a delivery is never settled
        // before its dead letter is confirmed.
        let ack = || async {
            tokio::time::timeout(SETTLE_TIMEOUT, d.ack(BasicAckOptions::default())).await
        };
        let settle = async {
            match outcome {
                Outcome::Handled => Some(ack().await),
                Outcome::DeadLetter { attempts, error } => {
                    if dead.send(&d, attempts, &error, &stop).await {
                        Some(ack().await)
                    } else {
                        // Stopped before the dead letter was confirmed: left unacknowledged,
                        // so the broker redelivers it. Never a negative settlement: the queue's
                        // own dead-lettering is at-most-once and would drop it without a route.
                        None
                    }
                }
                // Left unacknowledged: the broker redelivers it.
                Outcome::Abandoned => None,
            }
        };
        let settled = tokio::select! {
            biased;
            () = lost.cancelled() => {
                tracing::debug!(
                    tag = d.delivery_tag,
                    "connection lost while settling; the message will be redelivered"
                );
                continue;
            }
            r = settle => r,
        };
        match settled {
            Some(Ok(Ok(_))) => settled_any.store(true, Ordering::Relaxed),
            None => {}
            // The channel is gone: the broker redelivers the message.
            Some(Ok(Err(error))) => {
                tracing::warn!(%error, "could not acknowledge; the message will be redelivered");
            }
            Some(Err(_)) => tracing::warn!(
                tag = d.delivery_tag,
                "no answer to an acknowledgement in {SETTLE_TIMEOUT:?}; the message stays unacknowledged"
            ),
        }
    }
}

/// The pause before each reconnect of a consumer: doubling from the configured first delay (at
/// least [`MIN_BACKOFF`]) up to [`MAX_RECONNECT_BACKOFF`], after a failed connect and after a
/// session that ended before it was healthy (a refused `basic.consume`, a connection the
/// broker closes as soon as a message is handled). Only a healthy session — one that settled a
/// delivery or lived [`HEALTHY_SESSION`] — is followed by an immediate reconnect, and resets it.
#[derive(Debug)]
struct Reconnect {
    first: Duration,
    next: Duration,
}

impl Reconnect {
    fn new(first: Duration) -> Self {
        let first = first.clamp(MIN_BACKOFF, MAX_RECONNECT_BACKOFF);
        Self { first, next: first }
    }

    /// The pause after a failed attempt; the one after it is twice as long.
    fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next.saturating_mul(2)).min(MAX_RECONNECT_BACKOFF);
        delay
    }

    /// The pause after a session that lived `lived` and settled a delivery or not.
    fn session_ended(&mut self, lived: Duration, settled: bool) -> Duration {
        if settled || lived >= HEALTHY_SESSION {
            self.next = self.first;
            Duration::ZERO
        } else {
            self.failed()
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost,
    /// A lane task ended while the session ran (a panic: a bug in Keel, since handler panics
    /// are caught in `process`). Fatal: the lane's later deliveries would be dropped unacked
    /// and, once `prefetch` of them piled up, the whole consumer would stall without a word.
    Failed(String),
}

pub(crate) async fn run<H: Handler>(
    config: ConsumerBuilder,
    handler: H,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    short("queue name", &format!("{}.dlq", config.destination))
        .map_err(|e| Error::new(format!("consume {}", config.destination), e))?;
    let shutdown = Box::pin(shutdown).shared();
    let handler = Arc::new(handler);
    let name = config
        .connection_name
        .clone()
        .unwrap_or_else(|| format!("keel-{}-{}", config.group, uuid::Uuid::new_v4().simple()));
    let mut backoff = Reconnect::new(config.reconnect_backoff);
    loop {
        let connected = tokio::select! {
            biased;
            () = shutdown.clone() => return Ok(()),
            c = tokio::time::timeout(CONNECT_TIMEOUT, open(&config, &name)) => c
                .map_err(|_| BoxError::from(format!("no connection within {CONNECT_TIMEOUT:?}")))
                .and_then(|c| c.map_err(BoxError::from)),
        };
        let delay = match connected {
            Ok((connection, channel, dlq_channel)) => {
                let started = tokio::time::Instant::now();
                let settled_any = Arc::new(AtomicBool::new(false));
                let connection = Arc::new(connection);
                let end = session(
                    &config,
                    &handler,
                    &connection,
                    &channel,
                    dlq_channel,
                    &settled_any,
                    shutdown.clone(),
                )
                .await;
                let _ =
                    tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "bye".into())).await;
                match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Failed(error) => {
                        return Err(Error::new(format!("consume {}", config.destination), error));
                    }
                    SessionEnd::Lost => {
                        let delay = backoff
                            .session_ended(started.elapsed(), settled_any.load(Ordering::Relaxed));
                        tracing::warn!(queue = %config.destination, ?delay, "RabbitMQ connection lost; reconnecting");
                        delay
                    }
                }
            }
            Err(error) => {
                let delay = backoff.failed();
                tracing::warn!(%error, queue = %config.destination, ?delay, "RabbitMQ connect failed; retrying");
                delay
            }
        };
        tokio::select! {
            biased;
            () = shutdown.clone() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn open(
    config: &ConsumerBuilder,
    name: &str,
) -> lapin::Result<(Connection, Channel, Channel)> {
    let connection = Connection::connect(url(&config.broker), connection_properties(name)).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    declare(&channel, &config.destination).await?;
    let dlq_channel = connection.create_channel().await?;
    dlq_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel, dlq_channel))
}

async fn session<H: Handler>(
    config: &ConsumerBuilder,
    handler: &Arc<H>,
    connection: &Arc<Connection>,
    channel: &Channel,
    dlq_channel: Channel,
    settled_any: &Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> SessionEnd {
    let tag = format!("keel-{}", uuid::Uuid::new_v4().simple());
    let mut deliveries = match channel
        .basic_consume(
            config.destination.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(%error, "basic.consume failed");
            return SessionEnd::Lost;
        }
    };
    let dead = DeadLetters {
        connection: connection.clone(),
        channel: Arc::new(tokio::sync::Mutex::new(dlq_channel)),
        queue: config.destination.clone(),
        exchange: dead_letter_exchange(&config.destination),
        group: config.group.clone(),
        timeout: Duration::from_secs(30),
        backoff: config.retry,
    };
    let stop = CancellationToken::new();
    let lost = CancellationToken::new();
    let mut lanes = JoinSet::new();
    let mut senders = Vec::with_capacity(config.lanes);
    for _ in 0..config.lanes {
        let (tx, rx) = mpsc::channel(usize::from(config.prefetch).max(1));
        senders.push(tx);
        lanes.spawn(lane(
            rx,
            handler.clone(),
            config.retry,
            stop.clone(),
            lost.clone(),
            dead.clone(),
            settled_any.clone(),
        ));
    }
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    tokio::pin!(shutdown);
    let end = loop {
        let next = tokio::select! {
            biased;
            () = &mut shutdown => break SessionEnd::Shutdown,
            Some(joined) = lanes.join_next() => {
                let error = match joined {
                    Err(error) => format!("a delivery lane failed: {error}"),
                    Ok(()) => "a delivery lane ended".to_owned(),
                };
                tracing::error!(%error, queue = %config.destination, "stopping the consumer");
                break SessionEnd::Failed(error);
            }
            d = deliveries.next() => d,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(error)) => {
                tracing::warn!(%error, "RabbitMQ consumer error");
                break SessionEnd::Lost;
            }
            None => break SessionEnd::Lost,
        };
        let lane_of = match amqp_headers(&d).get(headers::KEY) {
            Some(key) => hasher.hash_one(key),
            None => d.delivery_tag,
        };
        let n = senders.len() as u64;
        let Some(tx) = usize::try_from(lane_of % n.max(1))
            .ok()
            .and_then(|i| senders.get(i))
        else {
            continue;
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break SessionEnd::Shutdown,
            _ = tx.send(d) => {}
        }
    };
    if matches!(end, SessionEnd::Shutdown | SessionEnd::Failed(_)) {
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    // Finish in-flight handlers; queued deliveries stay unacknowledged and are redelivered. After
    // a lost connection, acknowledgements under way are abandoned too (they cannot reach the
    // broker; waiting on them could block this session — and every reconnect — for ever).
    if matches!(end, SessionEnd::Lost) {
        lost.cancel();
    }
    stop.cancel();
    drop(senders);
    while lanes.join_next().await.is_some() {}
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "bye".into())).await;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_until_a_session_is_healthy() {
        let ms = Duration::from_millis;
        let mut r = Reconnect::new(ms(200));
        // Sessions refused at once (or connects failing) double the pause up to the cap.
        let pauses: Vec<Duration> = (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    r.session_ended(ms(5), false)
                } else {
                    r.failed()
                }
            })
            .collect();
        assert_eq!(
            pauses,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000].map(ms)
        );
        // A session that settled a delivery reconnects at once and starts over.
        assert_eq!(r.session_ended(ms(5), true), Duration::ZERO);
        assert_eq!(r.session_ended(ms(5), false), ms(200));
        // So does one that lived long enough, though the queue was quiet.
        assert_eq!(r.session_ended(HEALTHY_SESSION, false), Duration::ZERO);
        assert_eq!(r.failed(), ms(200));
        // A zero first delay is no hot loop.
        assert_eq!(Reconnect::new(Duration::ZERO).failed(), MIN_BACKOFF);
    }
}
