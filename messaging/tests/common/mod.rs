//! Shared helpers for the broker tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_messaging::{HandlerError, Received};

/// What a recording handler saw: per key, the `seq` values in the order handled.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    inner: Arc<Mutex<SeenInner>>,
}

#[derive(Debug, Default)]
struct SeenInner {
    by_key: HashMap<String, Vec<u64>>,
    handled: u64,
}

impl Seen {
    /// A handler that records every message it handles here.
    pub fn handler(&self) -> impl keel_messaging::Handler + use<> {
        let seen = self.clone();
        move |m: Received| {
            let seen = seen.clone();
            async move { seen.record(&m).map(|_| ()) }
        }
    }

    pub fn record(&self, m: &Received) -> Result<u64, HandlerError> {
        let v: serde_json::Value =
            serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
        let seq = v["seq"]
            .as_u64()
            .ok_or_else(|| HandlerError::permanent("no seq"))?;
        let mut inner = self.inner.lock().unwrap();
        inner
            .by_key
            .entry(m.key_str().unwrap_or_default().to_owned())
            .or_default()
            .push(seq);
        inner.handled += 1;
        Ok(seq)
    }

    pub fn handled(&self) -> u64 {
        self.inner.lock().unwrap().handled
    }

    /// Distinct seqs handled.
    pub fn distinct(&self) -> usize {
        let inner = self.inner.lock().unwrap();
        let mut all: Vec<u64> = inner.by_key.values().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }

    /// Waits up to `within` until exactly `n` distinct seqs were handled (`what` names the wait
    /// in the failure).
    pub async fn wait_distinct(&self, what: &str, n: usize, within: Duration) {
        keel_testkit::eventually(what, within, || async {
            (self.distinct() == n).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {} handled", self.distinct()));
    }

    pub fn missing(&self, expected: impl Iterator<Item = u64>) -> Vec<u64> {
        let inner = self.inner.lock().unwrap();
        let all: std::collections::HashSet<u64> =
            inner.by_key.values().flatten().copied().collect();
        expected.filter(|s| !all.contains(s)).collect()
    }

    /// Asserts that within each key, first deliveries are in increasing seq order.
    pub fn assert_key_order(&self) {
        let inner = self.inner.lock().unwrap();
        for (key, seqs) in &inner.by_key {
            let mut first_seen = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for s in seqs {
                if seen.insert(*s) {
                    first_seen.push(*s);
                }
            }
            assert!(
                first_seen.windows(2).all(|w| w[0] < w[1]),
                "key {key} out of order: {:?}",
                &first_seen[..first_seen.len().min(50)]
            );
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(90);

/// Messages `{"seq":i}` for `from..to`, keyed `k{i % keys}`.
pub fn batch(
    destination: &str,
    from: u64,
    to: u64,
    keys: u64,
) -> Vec<keel_messaging::OutgoingMessage> {
    (from..to)
        .map(|i| {
            keel_messaging::OutgoingMessage::new(destination, format!("{{\"seq\":{i}}}"))
                .with_key(format!("k{}", i % keys))
                .with_header("content-type", "application/json")
        })
        .collect()
}

/// Publishes in chunks, asserting every message was confirmed.
pub async fn publish_all(
    publisher: &keel_messaging::Publisher,
    destination: &str,
    n: u64,
    keys: u64,
    chunk: u64,
) {
    let mut from = 0;
    while from < n {
        let to = (from + chunk).min(n);
        for r in publisher
            .send_batch(batch(destination, from, to, keys))
            .await
        {
            r.unwrap();
        }
        from = to;
    }
}

/// Publishes `destination` in batches of 50 (8 keys) until 20 batches after `restarted` turns
/// true, publishing again whatever was handed back unconfirmed; returns the confirmed sequence
/// numbers and how many publishes failed (and were retried).
pub fn publish_through_restart(
    publisher: keel_messaging::Publisher,
    destination: String,
    restarted: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(std::collections::HashSet<u64>, u32)> {
    tokio::spawn(async move {
        let mut confirmed = std::collections::HashSet::new();
        let mut failures = 0u32;
        let mut after = 0;
        for from in (0..u64::MAX).step_by(50) {
            if restarted.load(std::sync::atomic::Ordering::SeqCst) {
                after += 1;
                if after > 20 {
                    break;
                }
            }
            let mut pending: Vec<(u64, _)> = (from..)
                .zip(batch(&destination, from, from + 50, 8))
                .collect();
            while !pending.is_empty() {
                let (seqs, messages): (Vec<u64>, Vec<_>) = pending.into_iter().unzip();
                let mut again = Vec::new();
                for (r, seq) in publisher.send_batch(messages).await.into_iter().zip(seqs) {
                    match r {
                        Ok(_) => {
                            confirmed.insert(seq);
                        }
                        Err(e) => {
                            failures += 1;
                            again.push((seq, e.into_message()));
                        }
                    }
                }
                if !again.is_empty() {
                    // Back off while the broker is away (not synchronisation: pacing).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                pending = again;
            }
        }
        (confirmed, failures)
    })
}

/// A handler that records the `seq` of each message it handles, in order, and holds message
/// `hold` until [`Held::release`]: a handler in flight at a chosen moment.
#[derive(Clone)]
pub struct Held {
    hold: u64,
    handled: Arc<Mutex<Vec<u64>>>,
    entered: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Held {
    pub fn new(hold: u64) -> Self {
        Self {
            hold,
            handled: Arc::default(),
            entered: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }

    pub fn handler(&self) -> impl keel_messaging::Handler + use<> {
        let held = self.clone();
        move |m: Received| {
            let held = held.clone();
            async move {
                let v: serde_json::Value =
                    serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
                let seq = v["seq"]
                    .as_u64()
                    .ok_or_else(|| HandlerError::permanent("no seq"))?;
                if seq == held.hold {
                    held.entered.notify_one();
                    let _pass = held.gate.acquire().await;
                }
                held.handled.lock().unwrap().push(seq);
                Ok(())
            }
        }
    }

    /// Waits until the held message's handler is running.
    pub async fn entered(&self) {
        tokio::time::timeout(WAIT, self.entered.notified())
            .await
            .expect("the held message reaches its handler");
    }

    pub fn release(&self) {
        self.gate.add_permits(1);
    }

    pub fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages were handled.
    pub async fn wait_for(&self, n: usize) {
        keel_testkit::eventually("the messages handled", WAIT, || async {
            (self.handled().len() >= n).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", self.handled()));
    }
}

/// The next message of `queue`, taken without acknowledgement (waits for one).
pub async fn amqp_get(ch: &lapin::Channel, queue: &str) -> lapin::message::BasicGetMessage {
    keel_testkit::eventually("a message to get", WAIT, || async {
        ch.basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .ok()?
    })
    .await
    .unwrap()
}

/// Asserts that `run` (a consumer told to stop while a handler is held) has not returned while
/// the handler is held, releases it, and returns what `run` returned.
pub async fn shut_down_with_a_handler_in_flight<E: std::fmt::Debug>(
    held: &Held,
    stop: &tokio_util::sync::CancellationToken,
    mut run: tokio::task::JoinHandle<Result<(), E>>,
) {
    held.entered().await;
    stop.cancel();
    // Not a synchronisation: the consumer must still be waiting for its handler after this.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut run)
            .await
            .is_err(),
        "the consumer returned with a handler still in flight"
    );
    held.release();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the consumer stops once its handler is done")
        .unwrap()
        .unwrap();
}

/// A handler that panics on message `seq` and records every other message in `seen`.
pub fn panicking_on(seq: u64, seen: &Seen) -> impl keel_messaging::Handler + use<> {
    let seen = seen.clone();
    move |m: Received| {
        let seen = seen.clone();
        async move {
            let v: serde_json::Value =
                serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
            if v["seq"].as_u64() == Some(seq) {
                panic!("seq {seq} is cursed");
            }
            seen.record(&m).map(|_| ())
        }
    }
}

/// An error whose `Display` panics: a handler bug that Keel meets outside the handler's own
/// future (it formats the error to log it and to put it in the dead letter).
#[derive(Debug)]
pub struct UnprintableError;

impl std::fmt::Display for UnprintableError {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("UnprintableError cannot be printed")
    }
}

impl std::error::Error for UnprintableError {}

/// A handler that fails message `seq` with an [`UnprintableError`] and records the others.
pub fn unprintable_on(seq: u64, seen: &Seen) -> impl keel_messaging::Handler + use<> {
    let seen = seen.clone();
    move |m: Received| {
        let seen = seen.clone();
        async move {
            let v: serde_json::Value =
                serde_json::from_slice(&m.payload).map_err(HandlerError::permanent)?;
            if v["seq"].as_u64() == Some(seq) {
                return Err(HandlerError::permanent(UnprintableError));
            }
            seen.record(&m).map(|_| ())
        }
    }
}
