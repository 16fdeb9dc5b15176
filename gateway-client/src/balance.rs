//! Load balancing: which endpoint takes a call.
//!
//! The endpoint set is an immutable [`Snapshot`] rebuilt when discovery changes and published
//! behind a version counter: a balancer reads one atomic per call to learn that its cached
//! snapshot is still current, so picking takes no lock. Per-endpoint load (in-flight calls and
//! a peak-EWMA of latency) lives in atomics on the endpoint.
//!
//! * [`Balance::P2c`] (default): power of two choices over peak-EWMA (Finagle's
//!   `PeakEwma`, as tower and linkerd use it): two random endpoints, the one with the lower
//!   `latency × (in-flight + 1)` wins. O(1), and it reacts to a slow endpoint within a few calls.
//! * [`Balance::RoundRobin`].
//! * [`Balance::Weighted`]: random, proportional to the `weight` metadata (default 100).
//! * [`Balance::ConsistentHash`]: a ring of virtual nodes; a call's [`HashKey`] sticks to one
//!   endpoint, and when an endpoint leaves only its keys move.
//!
//! On top of any of these: zone preference (endpoints whose `zone` metadata matches are tried
//! first; the rest only when none of them is available) and warm-up (a new endpoint's share
//! ramps up linearly over the warm-up period, for p2c and weighted). Endpoints whose breaker is
//! open are skipped (outlier ejection); a retry avoids the endpoint of the previous attempt.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use keel_breaker::breaker::{Breaker, CircuitBreakerLayer, Mode};
use keel_core::ServiceInstance;
use tokio::time::Instant;

/// How calls are spread over the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Power of two choices over peak-EWMA latency.
    #[default]
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
    /// Random, proportional to the `weight` metadata (a positive integer, default 100).
    Weighted,
    /// Sticky by the call's [`HashKey`] (calls without one are spread at random).
    ConsistentHash,
}

/// The key a [`Balance::ConsistentHash`] client routes a call by (insert it into the request's
/// extensions; for REST, set it on the call builder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashKey(pub u64);

impl HashKey {
    /// A key from any hashable value (e.g. an account id).
    pub fn of<T: Hash + ?Sized>(value: &T) -> Self {
        let mut h = Fnv::default();
        value.hash(&mut h);
        Self(mix(h.finish()))
    }
}

/// FNV-1a: stable across processes and releases (unlike `DefaultHasher`).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// splitmix64 finaliser: spreads FNV's output over the ring.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Balancer settings shared by the gRPC and REST builders.
#[derive(Debug, Clone)]
pub(crate) struct BalanceConfig {
    pub(crate) balance: Balance,
    pub(crate) zone: Option<String>,
    pub(crate) warm_up: Duration,
    pub(crate) vnodes: u32,
    pub(crate) default_rtt: Duration,
    pub(crate) decay: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            balance: Balance::P2c,
            zone: None,
            warm_up: Duration::ZERO,
            vnodes: 64,
            default_rtt: Duration::from_millis(1),
            decay: Duration::from_secs(10),
        }
    }
}

/// Peak-EWMA latency and in-flight count of one endpoint, in atomics (races only blur the
/// estimate, they never corrupt it). Laid out as declared (see [`EndpointState`]).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Load {
    cost_ns: AtomicU64,
    stamp_ns: AtomicU64,
    pending: AtomicU32,
}

impl Load {
    fn new(default_rtt: Duration) -> Self {
        Self {
            cost_ns: AtomicU64::new(f64::to_bits(default_rtt.as_nanos() as f64)),
            stamp_ns: AtomicU64::new(0),
            pending: AtomicU32::new(0),
        }
    }

    /// Calls in flight.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    fn cost(&self) -> f64 {
        let pending = f64::from(self.pending.load(Ordering::Relaxed));
        f64::from_bits(self.cost_ns.load(Ordering::Relaxed)) * (pending + 1.0)
    }

    pub(crate) fn start(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a call that took `rtt`, ending `now_ns` after the set's epoch.
    pub(crate) fn observe(&self, rtt: Duration, now_ns: u64, decay_ns: f64) {
        let rtt = rtt.as_nanos() as f64;
        let cost = f64::from_bits(self.cost_ns.load(Ordering::Relaxed));
        let last = self.stamp_ns.swap(now_ns, Ordering::Relaxed);
        let next = if rtt > cost {
            rtt
        } else {
            let elapsed = now_ns.saturating_sub(last) as f64;
            let w = (-elapsed / decay_ns).exp();
            cost * w + rtt * (1.0 - w)
        };
        self.cost_ns.store(next.to_bits(), Ordering::Relaxed);
    }
}

/// One endpoint: its instance, connection, breaker and load.
///
/// Cache-line aligned, so that the `Arc`'s reference counts sit on a line of their own: every
/// snapshot rebuild clones each endpoint's `Arc` (on discovery's thread), and that must not evict
/// the fields every pick reads from the calling threads' caches. Laid out as declared, so that
/// everything a pick reads of a candidate — its load, `skip_until_ns`, `uid`, `removed` and the
/// breaker handle of `gate` — is on the first of those lines: with thousands of endpoints a
/// pick's candidates are rarely in the cache, and each line read is a miss.
#[repr(C, align(64))]
pub(crate) struct EndpointState<C> {
    pub(crate) load: Load,
    /// While the breaker refuses calls: skip this endpoint until this many ns after the epoch.
    pub(crate) skip_until_ns: AtomicU64,
    pub(crate) uid: u64,
    pub(crate) removed: AtomicBool,
    /// Builds the per-call breaker guard (built once: it holds the breaker's per-CPU stripes).
    pub(crate) gate: CircuitBreakerLayer,
    pub(crate) added_ns: u64,
    pub(crate) calls: AtomicU64,
    pub(crate) conn: C,
    pub(crate) breaker: Breaker,
    /// The instance as discovery last reported it: its id, address and TLS never change (an
    /// instance that moves is a new endpoint), its metadata may
    /// ([`update_metadata`](Self::update_metadata)).
    instance: RwLock<Arc<ServiceInstance>>,
}

impl<C> EndpointState<C> {
    /// The instance as discovery last reported it.
    pub(crate) fn instance(&self) -> Arc<ServiceInstance> {
        Arc::clone(&self.instance.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The instance now has `instance`'s metadata (same id, address and TLS: a new weight or
    /// zone). The endpoint stays what it is — connection, breaker (an ejected endpoint stays
    /// ejected), load estimate with the calls in flight, call count, warm-up start — and only
    /// what the metadata decides changes, in the snapshot published next.
    pub(crate) fn update_metadata(&self, instance: ServiceInstance) {
        *self
            .instance
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(instance);
    }

    /// Its balancing weight, from the instance's metadata (see [`weight_of`]); read when a
    /// snapshot is built.
    pub(crate) fn weight(&self) -> u64 {
        weight_of(&self.instance())
    }
}

impl<C> fmt::Debug for EndpointState<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let instance = self.instance();
        f.debug_struct("Endpoint")
            .field("id", &instance.id)
            .field("endpoint", &instance.endpoint)
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

/// The largest `weight` an instance's metadata can give it (2^32): a larger one is taken as
/// this.
pub(crate) const MAX_WEIGHT: u64 = 1 << 32;

/// The balancing weight in `instance`'s metadata (`weight`, default 100), capped at
/// [`MAX_WEIGHT`] so that a pool's running total cannot overflow however many endpoints carry a
/// huge one.
fn weight_of(instance: &ServiceInstance) -> u64 {
    instance
        .metadata
        .get("weight")
        .and_then(|w| w.trim().parse::<u64>().ok())
        .filter(|w| *w > 0)
        .map_or(100, |w| w.min(MAX_WEIGHT))
}

/// A group of endpoints to pick from (all, or those of the local zone).
#[derive(Debug, Default)]
struct Pool {
    /// The members' indices in the snapshot; `None` for all of them (no array to read per pick).
    members: Option<Vec<u32>>,
    len: usize,
    cumulative: Vec<u64>,
    ring: Vec<(u64, u32)>,
}

impl Pool {
    /// A pool of the endpoints at `members`, or of all `endpoints` when `None`.
    fn build<C>(
        endpoints: &[Arc<EndpointState<C>>],
        members: Option<Vec<u32>>,
        config: &BalanceConfig,
    ) -> Self {
        let len = members.as_ref().map_or(endpoints.len(), Vec::len);
        let mut pool = Self {
            members,
            len,
            cumulative: Vec::new(),
            ring: Vec::new(),
        };
        match config.balance {
            Balance::Weighted => {
                let mut total = 0u64;
                for i in 0..len {
                    total += endpoints[pool.member(i)].weight();
                    pool.cumulative.push(total);
                }
            }
            Balance::ConsistentHash => {
                for i in 0..len {
                    let m = pool.member(i);
                    let id = &endpoints[m].instance().id;
                    for v in 0..config.vnodes {
                        pool.ring.push((HashKey::of(&(id.as_str(), v)).0, m as u32));
                    }
                }
                pool.ring.sort_unstable();
            }
            Balance::P2c | Balance::RoundRobin => {}
        }
        pool
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The snapshot index of the `i`-th member.
    fn member(&self, i: usize) -> usize {
        match &self.members {
            Some(m) => m[i] as usize,
            None => i,
        }
    }
}

/// An immutable view of the endpoint set.
pub(crate) struct Snapshot<C> {
    pub(crate) endpoints: Vec<Arc<EndpointState<C>>>,
    local: Option<Pool>,
    all: Pool,
}

impl<C> fmt::Debug for Snapshot<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl<C> Snapshot<C> {
    pub(crate) fn build(endpoints: Vec<Arc<EndpointState<C>>>, config: &BalanceConfig) -> Self {
        let local = config.zone.as_ref().map(|zone| {
            let members = (0..endpoints.len() as u32)
                .filter(|&i| {
                    endpoints[i as usize]
                        .instance()
                        .metadata
                        .get("zone")
                        .map(String::as_str)
                        == Some(zone.as_str())
                })
                .collect();
            Pool::build(&endpoints, Some(members), config)
        });
        let all = Pool::build(&endpoints, None, config);
        Self {
            endpoints,
            local,
            all,
        }
    }
}

/// The shared, versioned endpoint set of one client.
pub(crate) struct Set<C> {
    version: AtomicU64,
    current: RwLock<Arc<Snapshot<C>>>,
    pub(crate) config: BalanceConfig,
    rr: AtomicUsize,
    epoch: Instant,
    next_uid: AtomicU64,
    /// Snapshots replaced but possibly still held by a balancer's cache or a call. Each is
    /// dropped by a later [`Set::publish`] once nothing else holds it, so that dropping a large
    /// snapshot (one reference count per endpoint) falls to discovery, never to a call.
    retired: Mutex<Vec<Arc<Snapshot<C>>>>,
    /// Woken whenever a snapshot is published.
    pub(crate) changed: tokio::sync::watch::Sender<u64>,
}

impl<C> fmt::Debug for Set<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Set")
            .field("version", &self.version.load(Ordering::Relaxed))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C> Set<C> {
    pub(crate) fn new(config: BalanceConfig) -> Self {
        Self {
            version: AtomicU64::new(0),
            current: RwLock::new(Arc::new(Snapshot::build(Vec::new(), &config))),
            config,
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            next_uid: AtomicU64::new(1),
            retired: Mutex::new(Vec::new()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn decay_ns(&self) -> f64 {
        self.config.decay.as_nanos() as f64
    }

    /// A new endpoint state (not yet published).
    pub(crate) fn endpoint(
        &self,
        instance: ServiceInstance,
        conn: C,
        breaker: Breaker,
    ) -> Arc<EndpointState<C>> {
        Arc::new(EndpointState {
            uid: self.next_uid.fetch_add(1, Ordering::Relaxed),
            instance: RwLock::new(Arc::new(instance)),
            conn,
            gate: CircuitBreakerLayer::new(breaker.clone()).mode(Mode::Gate),
            breaker,
            load: Load::new(self.config.default_rtt),
            added_ns: self.now_ns(),
            skip_until_ns: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            calls: AtomicU64::new(0),
        })
    }

    /// Publishes a new endpoint list, and drops the replaced snapshots nothing holds any more.
    pub(crate) fn publish(&self, endpoints: Vec<Arc<EndpointState<C>>>) {
        let snapshot = Arc::new(Snapshot::build(endpoints, &self.config));
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(PoisonError::into_inner),
            snapshot,
        );
        let v = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.send_replace(v);
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.push(old);
        // A count of 1 is the list's own reference: no other holder is left to clone it from
        // (the snapshot is no longer current), so it is dropped here.
        retired.retain(|s| Arc::strong_count(s) > 1);
    }

    /// The current snapshot, refreshing `cache` only when the version moved.
    pub(crate) fn load(&self, cache: &mut Option<(u64, Arc<Snapshot<C>>)>) -> Arc<Snapshot<C>> {
        let v = self.version.load(Ordering::Acquire);
        if let Some((cv, snap)) = cache
            && *cv == v
        {
            return Arc::clone(snap);
        }
        let snap = Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner));
        *cache = Some((v, Arc::clone(&snap)));
        snap
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot<C>> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn warm_factor(&self, ep: &EndpointState<C>, now_ns: u64) -> f64 {
        if self.config.warm_up.is_zero() {
            return 1.0;
        }
        let age = now_ns.saturating_sub(ep.added_ns) as f64;
        (age / self.config.warm_up.as_nanos() as f64).clamp(0.05, 1.0)
    }

    /// The endpoints to try for one call, in preference order (see [`Candidates`]).
    pub(crate) fn candidates<'a>(
        &'a self,
        snap: &'a Snapshot<C>,
        key: Option<HashKey>,
        avoid: u64,
    ) -> Candidates<'a, C> {
        Candidates {
            set: self,
            snap,
            key,
            avoid,
            pool: if snap.local.as_ref().is_some_and(|p| p.len() > 0) {
                0
            } else {
                1
            },
            step: 0,
            start: 0,
            avoided: false,
        }
    }
}

/// Endpoint indices to try, best first: in the local zone's pool (if configured and not
/// empty), then in all endpoints. Within a pool: the balancer's choice(s), then every member
/// from a random (or, for consistent hash, the ring's) position. The endpoint of the previous
/// attempt (`avoid`) comes only at the very end. Duplicates are possible.
pub(crate) struct Candidates<'a, C> {
    set: &'a Set<C>,
    snap: &'a Snapshot<C>,
    key: Option<HashKey>,
    avoid: u64,
    pool: u8,
    step: usize,
    start: usize,
    avoided: bool,
}

impl<'a, C> Candidates<'a, C> {
    fn pool(&self) -> Option<&'a Pool> {
        let snap: &'a Snapshot<C> = self.snap;
        match self.pool {
            0 => snap.local.as_ref(),
            1 => Some(&snap.all),
            _ => None,
        }
    }

    fn first(&mut self, pool: &Pool) -> Option<usize> {
        let n = pool.len();
        let set = self.set;
        match set.config.balance {
            Balance::P2c => {
                self.start = fastrand::usize(0..n);
                if n == 1 {
                    return Some(pool.member(0));
                }
                let a = self.start;
                let mut b = fastrand::usize(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (
                    &self.snap.endpoints[pool.member(a)],
                    &self.snap.endpoints[pool.member(b)],
                );
                let (skip_a, skip_b) = (
                    ea.skip_until_ns.load(Ordering::Relaxed),
                    eb.skip_until_ns.load(Ordering::Relaxed),
                );
                // The clock is read only when a candidate is warming up or was refused.
                let now = if set.config.warm_up.is_zero() && skip_a == 0 && skip_b == 0 {
                    0
                } else {
                    set.now_ns()
                };
                // An endpoint that refused a call recently (ejected) loses every comparison until
                // its recheck time; then it competes again, so its breaker sees the calls that
                // probe it half-open and readmit it.
                let cost = |e: &EndpointState<C>, skip: u64| {
                    if skip != 0 && now < skip {
                        f64::INFINITY
                    } else {
                        e.load.cost() / set.warm_factor(e, now)
                    }
                };
                let (ca, cb) = (cost(ea, skip_a), cost(eb, skip_b));
                let pick = if (ca <= cb && ea.uid != self.avoid) || eb.uid == self.avoid {
                    a
                } else {
                    b
                };
                // If the pick is refused, scan from a random place, not from beside it.
                self.start = fastrand::usize(0..n);
                Some(pool.member(pick))
            }
            Balance::RoundRobin => {
                self.start = set.rr.fetch_add(1, Ordering::Relaxed) % n;
                Some(pool.member(self.start))
            }
            Balance::Weighted => {
                let total = pool.cumulative.last().copied().unwrap_or(0).max(1);
                let now = if set.config.warm_up.is_zero() {
                    0
                } else {
                    set.now_ns()
                };
                let mut idx = 0;
                for _ in 0..4 {
                    let r = fastrand::u64(0..total);
                    idx = pool.cumulative.partition_point(|c| *c <= r).min(n - 1);
                    let ep = &self.snap.endpoints[pool.member(idx)];
                    if set.warm_factor(ep, now) >= 1.0 || fastrand::f64() < set.warm_factor(ep, now)
                    {
                        break;
                    }
                }
                self.start = idx;
                Some(pool.member(idx))
            }
            Balance::ConsistentHash => match self.key {
                Some(HashKey(k)) if !pool.ring.is_empty() => {
                    self.start = pool.ring.partition_point(|(h, _)| *h < k) % pool.ring.len();
                    Some(pool.ring[self.start].1 as usize)
                }
                _ => {
                    self.start = fastrand::usize(0..n);
                    Some(pool.member(self.start))
                }
            },
        }
    }
}

impl<C> Iterator for Candidates<'_, C> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        loop {
            let Some(pool) = self.pool() else {
                if !self.avoided && self.avoid != 0 {
                    self.avoided = true;
                    return self.snap.endpoints.iter().position(|e| e.uid == self.avoid);
                }
                return None;
            };
            let n = pool.len();
            if n == 0 {
                self.pool += 1;
                self.step = 0;
                continue;
            }
            let step = self.step;
            self.step += 1;
            let hashed = self.set.config.balance == Balance::ConsistentHash
                && self.key.is_some()
                && !pool.ring.is_empty();
            let idx = if step == 0 {
                self.first(pool)
            } else if hashed && step < pool.ring.len() {
                Some(pool.ring[(self.start + step) % pool.ring.len()].1 as usize)
            } else if !hashed && step <= n {
                Some(pool.member((self.start + step) % n))
            } else {
                self.pool += 1;
                self.step = 0;
                continue;
            };
            if let Some(i) = idx
                && self.snap.endpoints[i].uid != self.avoid
            {
                return Some(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use keel_breaker::breaker::BreakerConfig;
    use keel_core::Endpoint;

    use super::*;

    fn set(balance: Balance, warm_up: Duration) -> Set<()> {
        Set::new(BalanceConfig {
            balance,
            warm_up,
            ..BalanceConfig::default()
        })
    }

    fn add(set: &Set<()>, id: &str, weight: Option<&str>) -> Arc<EndpointState<()>> {
        let mut instance = ServiceInstance::new("s", id, Endpoint::new("127.0.0.1", 1));
        if let Some(w) = weight {
            instance = instance.with_metadata("weight", w);
        }
        set.endpoint(
            instance,
            (),
            Breaker::new(BreakerConfig::default()).unwrap(),
        )
    }

    fn first_pick(set: &Set<()>, key: Option<HashKey>, avoid: u64) -> String {
        let snap = set.snapshot();
        let i = set.candidates(&snap, key, avoid).next().unwrap();
        snap.endpoints[i].instance().id.clone()
    }

    fn shares(set: &Set<()>, n: usize) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            *out.entry(first_pick(set, None, 0)).or_default() += 1;
        }
        out
    }

    /// What a pick reads of a candidate is on the endpoint's first cache line.
    #[test]
    fn a_pick_reads_one_line_of_each_candidate() {
        use std::mem::{offset_of, size_of};
        type E = EndpointState<crate::conn::GrpcConn>;
        let hot_end = [
            offset_of!(E, load) + size_of::<Load>(),
            offset_of!(E, skip_until_ns) + size_of::<AtomicU64>(),
            offset_of!(E, uid) + size_of::<u64>(),
            offset_of!(E, removed) + size_of::<AtomicBool>(),
            // The breaker handle, the layer's first field.
            offset_of!(E, gate) + size_of::<Breaker>(),
        ];
        assert!(hot_end.iter().all(|end| *end <= 64), "{hot_end:?}");
    }

    /// A replaced snapshot is never dropped by a balancer refreshing its cache (for a large set
    /// that is one reference count per endpoint, on a call's path): the next publish drops it.
    #[test]
    fn replaced_snapshots_are_dropped_by_a_later_publish() {
        let s = set(Balance::P2c, Duration::ZERO);
        let (a, b) = (add(&s, "a", None), add(&s, "b", None));
        s.publish(vec![a.clone()]);
        let mut cache = None;
        drop(s.load(&mut cache));
        assert_eq!(Arc::strong_count(&a), 2, "the test's, the snapshot's");
        s.publish(vec![b.clone()]);
        drop(s.load(&mut cache));
        assert_eq!(
            Arc::strong_count(&a),
            2,
            "the cache let go, the retired snapshot still holds it"
        );
        s.publish(vec![b.clone()]);
        assert_eq!(Arc::strong_count(&a), 1, "dropped by the publish");
    }

    #[test]
    fn weighted_follows_the_weight_metadata() {
        let s = set(Balance::Weighted, Duration::ZERO);
        s.publish(vec![add(&s, "a", Some("100")), add(&s, "b", Some("300"))]);
        let shares = shares(&s, 20_000);
        let ratio = shares["b"] as f64 / shares["a"] as f64;
        assert!((2.6..3.4).contains(&ratio), "{shares:?}");
    }

    #[test]
    fn huge_weights_are_capped_and_do_not_overflow() {
        let s = set(Balance::Weighted, Duration::ZERO);
        let max = u64::MAX.to_string();
        let (a, b, c) = (
            add(&s, "a", Some(&max)),
            add(&s, "b", Some(&max)),
            add(&s, "c", Some("18446744073709551616")), // u64::MAX + 1: not a u64, default
        );
        assert_eq!(
            (a.weight(), b.weight(), c.weight()),
            (MAX_WEIGHT, MAX_WEIGHT, 100)
        );
        // Would overflow the running total (a panic in a debug build) without the cap.
        s.publish(vec![a, b, c]);
        let shares = shares(&s, 2_000);
        let ratio = shares["b"] as f64 / shares["a"] as f64;
        assert!((0.8..1.25).contains(&ratio), "{shares:?}");
    }

    #[test]
    fn round_robin_takes_turns() {
        let s = set(Balance::RoundRobin, Duration::ZERO);
        s.publish(vec![
            add(&s, "a", None),
            add(&s, "b", None),
            add(&s, "c", None),
        ]);
        let shares = shares(&s, 300);
        assert!(shares.values().all(|n| *n == 100), "{shares:?}");
    }

    #[test]
    fn p2c_prefers_the_less_loaded_and_a_retry_avoids_the_last_endpoint() {
        let s = set(Balance::P2c, Duration::ZERO);
        let (a, b) = (add(&s, "a", None), add(&s, "b", None));
        for _ in 0..10 {
            a.load.start();
        }
        s.publish(vec![a.clone(), b.clone()]);
        assert_eq!(shares(&s, 100).get("b"), Some(&100));
        assert_eq!(first_pick(&s, None, b.uid), "a", "a retry goes elsewhere");
    }

    /// An endpoint skipped after a refusal loses every p2c comparison only until its recheck
    /// time: then it is picked again, so its breaker can be probed half-open and readmit it.
    #[tokio::test(start_paused = true)]
    async fn a_refused_endpoint_competes_again_after_its_recheck() {
        let s = set(Balance::P2c, Duration::ZERO);
        let (a, b) = (add(&s, "a", None), add(&s, "b", None));
        s.publish(vec![a.clone(), b.clone()]);
        a.skip_until_ns.store(
            s.now_ns() + crate::lb::RECHECK.as_nanos() as u64,
            Ordering::Relaxed,
        );
        assert_eq!(shares(&s, 200).get("a"), None, "skipped until its recheck");
        tokio::time::advance(crate::lb::RECHECK + Duration::from_millis(1)).await;
        let later = shares(&s, 1000);
        assert!(later.get("a").copied().unwrap_or(0) > 300, "{later:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn warm_up_ramps_a_new_endpoint_in() {
        let s = set(Balance::P2c, Duration::from_secs(10));
        let old = add(&s, "old", None);
        tokio::time::advance(Duration::from_secs(60)).await;
        let new = add(&s, "new", None);
        s.publish(vec![old, new]);
        let early = shares(&s, 1000);
        assert!(early.get("new").copied().unwrap_or(0) < 50, "{early:?}");
        tokio::time::advance(Duration::from_secs(10)).await;
        let later = shares(&s, 1000);
        assert!(later["new"] > 350, "{later:?}");
    }

    #[test]
    fn consistent_hash_moves_only_the_keys_of_a_removed_endpoint() {
        let s = set(Balance::ConsistentHash, Duration::ZERO);
        let eps: Vec<_> = (0..10).map(|i| add(&s, &format!("e{i}"), None)).collect();
        s.publish(eps.clone());
        let before: Vec<String> = (0..2000u32)
            .map(|k| first_pick(&s, Some(HashKey::of(&k)), 0))
            .collect();
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for owner in &before {
            *per.entry(owner.as_str()).or_default() += 1;
        }
        assert!(per.values().all(|n| *n > 60), "keys spread out: {per:?}");
        s.publish(
            eps.iter()
                .filter(|e| e.instance().id != "e3")
                .cloned()
                .collect(),
        );
        for (k, owner) in (0..2000u32).zip(&before) {
            let now = first_pick(&s, Some(HashKey::of(&k)), 0);
            if owner == "e3" {
                assert_ne!(now, "e3");
            } else {
                assert_eq!(&now, owner, "key {k} moved");
            }
        }
    }

    #[test]
    fn zone_pool_first_then_everyone() {
        let s = Set::new(BalanceConfig {
            zone: Some("sh-a".into()),
            ..BalanceConfig::default()
        });
        let local = s.endpoint(
            ServiceInstance::new("s", "l", Endpoint::new("127.0.0.1", 1))
                .with_metadata("zone", "sh-a"),
            (),
            Breaker::new(BreakerConfig::default()).unwrap(),
        );
        let remote = add(&s, "r", None);
        s.publish(vec![local.clone(), remote]);
        assert_eq!(shares(&s, 100).get("l"), Some(&100));
        let snap = s.snapshot();
        let order: Vec<String> = s
            .candidates(&snap, None, 0)
            .map(|i| snap.endpoints[i].instance().id.clone())
            .collect();
        assert_eq!(order.first().map(String::as_str), Some("l"));
        assert!(
            order.contains(&"r".to_owned()),
            "falls back to the other zone: {order:?}"
        );
    }
}
