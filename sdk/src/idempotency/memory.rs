//! An in-process store: right for one instance, or for tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::record::{Fingerprint, Lease, Record, StoredResponse};
use super::store::{Claim, IdempotencyStore, StoreError, StoreFuture};

/// How many expired entries one store operation removes at most.
const SWEEP_BATCH: usize = 64;

/// The default of [`MemoryStore::with_max_bytes`]: 1 GiB.
pub const DEFAULT_MEMORY_MAX_BYTES: usize = 1 << 30;

/// What an entry costs beside its key and response (the maps' slots, the lease, the expiry).
const ENTRY_OVERHEAD: usize = 160;

/// An entry's size as the store counts it.
fn size_of(key: &str, record: &Record) -> usize {
    let headers = |h: &http::HeaderMap| {
        h.iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
    };
    ENTRY_OVERHEAD
        + 2 * key.len()
        + match record {
            Record::InFlight(_) => 0,
            Record::Completed { response, .. } => {
                response.body.len()
                    + headers(&response.headers)
                    + response.trailers.as_ref().map_or(0, headers)
            }
        }
}

/// `now + d`, or ten years from now when that does not fit the clock (`Duration::MAX`).
fn after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).unwrap_or_else(|| now + super::MAX_TTL)
}

/// An in-process [`IdempotencyStore`] with TTL.
///
/// Keys are private to the process: behind a load balancer, a retry that lands on another
/// instance is not de-duplicated (use `RedisStore`, feature `redis`, for that).
///
/// Expiry needs no background task: an expired entry counts as absent when it is read, and
/// every operation also removes up to 64 expired entries in expiry order, so memory follows
/// the live keys. Time is [`tokio::time::Instant`], so tests can run with paused time. Cloning
/// shares the store. Waiting duplicates are woken as soon as a key completes or is released.
///
/// Bounded: its entries (keys, in flight or completed, with their stored responses) take at
/// most [`DEFAULT_MEMORY_MAX_BYTES`] (1 GiB, [`with_max_bytes`](Self::with_max_bytes)); the keys
/// are the callers' to choose, and a completed one is kept for the TTL (at 1 KiB a response and
/// a 24 h TTL, the default holds about 12 new keys a second). A claim that would go past it
/// fails (the layer answers 503 / `UNAVAILABLE`, not executing) until entries expire: completed
/// records are never dropped early, which would let a retry execute again. A service beyond
/// that wants `RedisStore`, or a shorter TTL.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_max_bytes(DEFAULT_MEMORY_MAX_BYTES)
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// The sum of the entries' sizes ([`size_of`]).
    bytes: usize,
    /// Expiry order; an item whose `seq` no longer matches its entry is stale and skipped.
    expiries: BTreeMap<(Instant, u64), String>,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    expires: Instant,
    seq: u64,
    size: usize,
}

impl State {
    fn sweep(&mut self, now: Instant) {
        for _ in 0..SWEEP_BATCH {
            let Some(entry) = self.expiries.first_entry() else {
                return;
            };
            let (expires, seq) = *entry.key();
            if expires > now {
                return;
            }
            let key = entry.remove();
            if self.entries.get(&key).is_some_and(|e| e.seq == seq) {
                self.remove(&key);
            }
        }
    }

    /// The live entry under `key` (an expired one is removed and reads as absent).
    fn live(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        if self.entries.get(key).is_some_and(|e| e.expires <= now) {
            self.remove(key);
        }
        self.entries.get_mut(key)
    }

    fn put(&mut self, key: &str, record: Record, expires: Instant) {
        self.seq += 1;
        let seq = self.seq;
        let size = size_of(key, &record);
        self.expiries.insert((expires, seq), key.to_owned());
        let old = self.entries.insert(
            key.to_owned(),
            Entry {
                record,
                expires,
                seq,
                size,
            },
        );
        self.bytes = self.bytes + size - old.map_or(0, |e| e.size);
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= entry.size;
        }
    }

    /// Whether `key` is currently claimed by exactly `lease`.
    fn held_by(&mut self, key: &str, lease: &Lease, now: Instant) -> bool {
        matches!(self.live(key, now), Some(Entry { record: Record::InFlight(held), .. }) if held == lease)
    }
}

impl MemoryStore {
    /// An empty store of at most [`DEFAULT_MEMORY_MAX_BYTES`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose entries take at most `max` bytes (as it counts them: keys, stored
    /// responses and a fixed overhead per entry).
    pub fn with_max_bytes(max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                changed: Notify::new(),
                max_bytes: max,
            }),
        }
    }

    /// The bytes the entries take, as the store counts them.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements, so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_now(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        match state.live(key, now) {
            Some(Entry {
                record: Record::InFlight(held),
                ..
            }) => Ok(Claim::InFlight {
                fingerprint: held.fingerprint(),
            }),
            Some(Entry {
                record:
                    Record::Completed {
                        fingerprint,
                        response,
                    },
                ..
            }) => Ok(Claim::Completed {
                fingerprint: *fingerprint,
                response: response.clone(),
            }),
            None => {
                let claim = Lease::new(fingerprint);
                let record = Record::InFlight(claim.clone());
                let needed = size_of(key, &record);
                if state.bytes + needed > self.inner.max_bytes {
                    // Full: make room from what has expired, all of it, before refusing.
                    while state
                        .expiries
                        .first_key_value()
                        .is_some_and(|(k, _)| k.0 <= now)
                    {
                        state.sweep(now);
                    }
                    if state.bytes + needed > self.inner.max_bytes {
                        return Err(StoreError::new(format!(
                            "the memory store is full ({} of {} bytes)",
                            state.bytes, self.inner.max_bytes
                        )));
                    }
                }
                state.put(key, record, after(now, lease));
                Ok(Claim::Acquired(claim))
            }
        }
    }

    fn renew_now(&self, key: &str, lease: &Lease, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        state.sweep(now);
        if !state.held_by(key, lease, now) {
            return false;
        }
        state.put(key, Record::InFlight(lease.clone()), after(now, ttl));
        true
    }

    fn complete_now(
        &self,
        key: &str,
        lease: &Lease,
        response: &StoredResponse,
        ttl: Duration,
    ) -> bool {
        let now = Instant::now();
        let done = {
            let mut state = self.lock();
            state.sweep(now);
            let held = state.held_by(key, lease, now);
            if held {
                let record = Record::Completed {
                    fingerprint: lease.fingerprint(),
                    response: response.clone(),
                };
                state.put(key, record, after(now, ttl));
            }
            held
        };
        self.inner.changed.notify_waiters();
        done
    }

    fn release_now(&self, key: &str, lease: &Lease) -> bool {
        let now = Instant::now();
        let done = {
            let mut state = self.lock();
            state.sweep(now);
            let held = state.held_by(key, lease, now);
            if held {
                state.remove(key);
            }
            held
        };
        self.inner.changed.notify_waiters();
        done
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> StoreFuture<'a, Claim> {
        let claim = self.claim_now(key, fingerprint, lease);
        Box::pin(async move { claim })
    }

    fn renew<'a>(&'a self, key: &'a str, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool> {
        let renewed = self.renew_now(key, lease, ttl);
        Box::pin(async move { Ok(renewed) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let completed = self.complete_now(key, lease, response, ttl);
        Box::pin(async move { Ok(completed) })
    }

    fn release<'a>(&'a self, key: &'a str, lease: &'a Lease) -> StoreFuture<'a, bool> {
        let released = self.release_now(key, lease);
        Box::pin(async move { Ok(released) })
    }

    fn changed<'a>(
        &'a self,
        _key: &'a str,
        within: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let _ = tokio::time::timeout(within, self.inner.changed.notified()).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    fn response() -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"done"),
            trailers: None,
        }
    }

    fn acquired(claim: Claim) -> Lease {
        match claim {
            Claim::Acquired(lease) => lease,
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn claim_complete_replay_then_expire() {
        let store = MemoryStore::new();
        let fp = Fingerprint::of(None, b"a");
        let lease = acquired(store.claim("k", fp, LEASE).await.unwrap());
        assert_eq!(
            store.claim("k", fp, LEASE).await.unwrap(),
            Claim::InFlight { fingerprint: fp }
        );
        assert!(store.complete("k", &lease, &response(), TTL).await.unwrap());
        assert_eq!(
            store.claim("k", fp, LEASE).await.unwrap(),
            Claim::Completed {
                fingerprint: fp,
                response: response()
            }
        );
        tokio::time::advance(TTL).await;
        acquired(store.claim("k", fp, LEASE).await.unwrap());
    }

    /// The callers choose the keys: the store holds at most its maximum, refuses a new key past
    /// it (known keys still answer), and takes new ones again as entries expire. A key held
    /// `Duration::MAX` does not overflow the clock.
    #[tokio::test(start_paused = true)]
    async fn the_store_is_bounded_and_fails_closed_when_full() {
        // Room for two entries of one-byte keys (162 bytes in flight, 166 with "done").
        let store = MemoryStore::with_max_bytes(400);
        let fp = Fingerprint::of(None, b"a");
        let a = acquired(store.claim("a", fp, LEASE).await.unwrap());
        assert!(store.complete("a", &a, &response(), TTL).await.unwrap());
        acquired(store.claim("b", fp, Duration::MAX).await.unwrap());
        assert!(store.claim("c", fp, LEASE).await.is_err(), "full");
        assert!(matches!(
            store.claim("a", fp, LEASE).await.unwrap(),
            Claim::Completed { .. }
        ));
        assert_eq!((store.len(), store.bytes()), (2, 166 + 162));
        tokio::time::advance(TTL).await;
        acquired(store.claim("c", fp, LEASE).await.unwrap());
        assert!(store.claim("d", fp, LEASE).await.is_err(), "b is held");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_holder_renews_completes_or_releases() {
        let store = MemoryStore::new();
        let fp = Fingerprint::of(None, b"a");
        let mine = acquired(store.claim("k", fp, LEASE).await.unwrap());
        let other = Lease::new(fp);
        assert!(!store.renew("k", &other, LEASE).await.unwrap());
        assert!(!store.release("k", &other).await.unwrap());
        assert!(!store.complete("k", &other, &response(), TTL).await.unwrap());

        // A renewed lease outlives the original deadline.
        tokio::time::advance(LEASE / 2).await;
        assert!(store.renew("k", &mine, LEASE).await.unwrap());
        tokio::time::advance(LEASE * 3 / 4).await;
        assert!(matches!(
            store.claim("k", fp, LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
        // Once it runs out, someone else may claim; the old holder can no longer complete.
        tokio::time::advance(LEASE).await;
        let theirs = acquired(store.claim("k", fp, LEASE).await.unwrap());
        assert!(!store.complete("k", &mine, &response(), TTL).await.unwrap());
        assert!(store.release("k", &theirs).await.unwrap());
        assert!(store.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_in_bounded_batches() {
        let store = MemoryStore::new();
        let fp = Fingerprint::of(None, b"");
        for i in 0..200 {
            acquired(store.claim(&format!("k{i}"), fp, LEASE).await.unwrap());
        }
        assert_eq!(store.len(), 200);
        tokio::time::advance(LEASE).await;
        acquired(store.claim("fresh", fp, LEASE).await.unwrap());
        assert_eq!(store.len(), 200 - SWEEP_BATCH + 1);
        for _ in 0..3 {
            let _ = store.claim("fresh", fp, LEASE).await.unwrap();
        }
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_on_release() {
        let store = MemoryStore::new();
        let fp = Fingerprint::of(None, b"");
        let lease = acquired(store.claim("k", fp, LEASE).await.unwrap());
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                store.changed("k", Duration::from_secs(60)).await;
                start.elapsed()
            })
        };
        tokio::task::yield_now().await;
        assert!(store.release("k", &lease).await.unwrap());
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }
}
