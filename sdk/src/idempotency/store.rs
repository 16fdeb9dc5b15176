//! The storage contract behind the idempotency layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::record::{Fingerprint, Lease, StoredResponse};

/// An error of the type-erased kind tower middleware passes around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future an [`IdempotencyStore`] operation returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What [`IdempotencyStore::claim`] found.
#[allow(clippy::large_enum_variant)] // built and moved once per request
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key was free and is now held by this lease: execute the request.
    Acquired(Lease),
    /// Another request with the key is executing (it was sent with this fingerprint).
    InFlight {
        /// The fingerprint of the executing request.
        fingerprint: Fingerprint,
    },
    /// A request with the key executed; this is its response.
    Completed {
        /// The fingerprint of the request that executed.
        fingerprint: Fingerprint,
        /// Its response.
        response: StoredResponse,
    },
}

/// Where the idempotency layer keeps claims and responses.
///
/// A key moves from absent to *in flight* ([`claim`](Self::claim)) and then either to
/// *completed* ([`complete`](Self::complete), kept for the record TTL) or back to absent
/// ([`release`](Self::release), or the lease running out). Renewing, completing and releasing
/// act only while the stored claim is the caller's own [`Lease`], so one instance never
/// overwrites or deletes another's claim.
///
/// Implementations: [`MemoryStore`](super::MemoryStore) (one process) and, with the feature
/// `redis`, `RedisStore` (every instance of a service). The trait is object safe; the layer
/// holds an `Arc<dyn IdempotencyStore>`.
pub trait IdempotencyStore: fmt::Debug + Send + Sync + 'static {
    /// Atomically claims `key` for a request with `fingerprint` for `lease` unless the key is
    /// in flight or completed, in which case that state is returned.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> StoreFuture<'a, Claim>;

    /// Extends the caller's claim to `lease` from now; `false` if the claim is no longer the
    /// caller's (it expired and may be held by someone else).
    fn renew<'a>(&'a self, key: &'a str, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool>;

    /// Replaces the caller's claim with the completed `response`, kept for `ttl`; `false` if
    /// the claim is no longer the caller's (nothing is written then).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, bool>;

    /// Deletes the caller's claim so that a retry can execute; `false` if the claim was no
    /// longer the caller's (nothing is deleted then).
    fn release<'a>(&'a self, key: &'a str, lease: &'a Lease) -> StoreFuture<'a, bool>;

    /// Resolves when `key` may have changed state, or after `within` at the latest.
    ///
    /// A waiting duplicate calls this between claims. The default simply sleeps `within` (the
    /// layer passes a growing back-off step); a store that can notify may return earlier.
    fn changed<'a>(
        &'a self,
        key: &'a str,
        within: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let _ = key;
        Box::pin(tokio::time::sleep(within))
    }
}

/// A store operation failed (e.g. Redis unreachable or timed out, or a record unreadable).
///
/// The layer fails closed on it: a request it cannot guard is answered 503 / `UNAVAILABLE`
/// rather than executed without the guarantee.
#[derive(Debug)]
pub struct StoreError {
    source: BoxError,
}

impl StoreError {
    /// Wraps the cause.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "idempotency store failed: {}", self.source)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
