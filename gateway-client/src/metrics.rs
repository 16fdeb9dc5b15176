//! RED metrics (rate, errors, duration) per service and method, in atomics.
//!
//! A [`ClientMetrics`] is shared by every clone of a client; [`ClientMetrics::snapshot`] reads
//! it (the application exports the snapshot, e.g. to Prometheus). Recording a call costs a
//! read-locked map lookup by method and four relaxed atomic adds.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// Upper bounds of the duration histogram buckets, in seconds (Prometheus' defaults).
pub const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of one method.
pub(crate) struct MethodMetrics {
    /// The method's name, shared with the client spans' attributes.
    pub(crate) name: opentelemetry::StringValue,
    requests: AtomicU64,
    errors: AtomicU64,
    duration_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
}

impl MethodMetrics {
    pub(crate) fn record(&self, elapsed: Duration, error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.duration_ns.fetch_add(ns, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// RED metrics of one client (one downstream service); cheap to clone.
#[derive(Clone, Default)]
pub struct ClientMetrics {
    methods: Arc<RwLock<HashMap<Box<str>, Arc<MethodMetrics>>>>,
}

impl fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientMetrics")
            .field("methods", &self.snapshot().len())
            .finish()
    }
}

/// What [`ClientMetrics::snapshot`] reports for one method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSnapshot {
    /// The method: the gRPC path (`/pkg.Service/Method`) or `VERB /path` for REST.
    pub method: String,
    /// Calls completed.
    pub requests: u64,
    /// Calls that failed (a transport or client error, a gRPC error status, an HTTP 5xx).
    pub errors: u64,
    /// Sum of call durations.
    pub duration_sum: Duration,
    /// Calls per bucket of [`BUCKETS`] (not cumulative; calls over 10 s are in none).
    pub buckets: [u64; BUCKETS.len()],
}

/// At most this many methods get series of their own per client (and per protocol on a Keel
/// server); calls of methods first seen after that are counted under [`OVERFLOW_METHOD`] (REST
/// routes come from paths, and a path segment without digits — `/users/alice` — is kept as it
/// is). See [`capped_series`].
pub const MAX_METHODS: usize = 1000;

/// The method name of the calls past [`MAX_METHODS`] (as OpenTelemetry's SDK names its
/// overflow series).
pub const OVERFLOW_METHOD: &str = "_OTHER";

/// The series of `method` in `map`, made by `make` (given the name it gets) on first use; once
/// [`MAX_METHODS`] series exist, a method first seen then gets the series of `overflow`. A
/// known method, or one past the cap once the overflow series exists, takes the read lock only.
/// Keel's client and server metrics both keep their per-method series this way.
pub fn capped_series<V>(
    map: &RwLock<HashMap<Box<str>, Arc<V>>>,
    method: &str,
    overflow: &str,
    make: impl FnOnce(&str) -> V,
) -> Arc<V> {
    {
        let map = map.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = map.get(method) {
            return Arc::clone(m);
        }
        if map.len() >= MAX_METHODS
            && let Some(m) = map.get(overflow)
        {
            return Arc::clone(m);
        }
    }
    let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
    let method = if map.len() >= MAX_METHODS && !map.contains_key(method) {
        overflow
    } else {
        method
    };
    Arc::clone(
        map.entry(method.into())
            .or_insert_with(|| Arc::new(make(method))),
    )
}

impl ClientMetrics {
    /// The counters of `method`, created on first use (see [`MAX_METHODS`]).
    pub(crate) fn method(&self, method: &str) -> Arc<MethodMetrics> {
        capped_series(&self.methods, method, OVERFLOW_METHOD, |name| {
            MethodMetrics {
                name: opentelemetry::StringValue::from(Arc::<str>::from(name)),
                requests: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                duration_ns: AtomicU64::new(0),
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            }
        })
    }

    /// Every method's counters, sorted by method.
    pub fn snapshot(&self) -> Vec<MethodSnapshot> {
        let map = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<MethodSnapshot> = map
            .iter()
            .map(|(k, m)| MethodSnapshot {
                method: k.to_string(),
                requests: m.requests.load(Ordering::Relaxed),
                errors: m.errors.load(Ordering::Relaxed),
                duration_sum: Duration::from_nanos(m.duration_ns.load(Ordering::Relaxed)),
                buckets: std::array::from_fn(|i| m.buckets[i].load(Ordering::Relaxed)),
            })
            .collect();
        out.sort_by(|a, b| a.method.cmp(&b.method));
        out
    }

    /// The counters of one method, if it was called.
    pub fn get(&self, method: &str) -> Option<MethodSnapshot> {
        self.snapshot().into_iter().find(|m| m.method == method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_past_the_cap_share_the_overflow_series() {
        let metrics = ClientMetrics::default();
        for i in 0..MAX_METHODS {
            metrics
                .method(&format!("GET /users/u{i}"))
                .record(Duration::ZERO, false);
        }
        metrics
            .method("GET /users/late")
            .record(Duration::ZERO, false);
        metrics
            .method("GET /users/later")
            .record(Duration::ZERO, true);
        metrics
            .method("GET /users/u7")
            .record(Duration::ZERO, false);
        assert_eq!(metrics.snapshot().len(), MAX_METHODS + 1);
        assert!(metrics.get("GET /users/late").is_none());
        let overflow = metrics.get(OVERFLOW_METHOD).unwrap();
        assert_eq!((overflow.requests, overflow.errors), (2, 1));
        assert_eq!(metrics.get("GET /users/u7").unwrap().requests, 2);
    }

    #[test]
    fn records_requests_errors_and_buckets() {
        let m = ClientMetrics::default();
        m.method("/a/B").record(Duration::from_millis(3), false);
        m.method("/a/B").record(Duration::from_millis(30), true);
        let s = m.get("/a/B").unwrap();
        assert_eq!((s.requests, s.errors), (2, 1));
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[3], 1);
        assert_eq!(s.duration_sum, Duration::from_millis(33));
        assert!(m.get("/a/C").is_none());
    }
}
