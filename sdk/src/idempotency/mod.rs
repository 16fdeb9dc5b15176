//! Server-side idempotency: a request carrying an idempotency key executes once.
//!
//! Keel's clients send the same `idempotency-key` header
//! ([`IDEMPOTENCY_KEY_HEADER`]) with every attempt
//! of a call, so a retry after a lost response, a timeout or a failover to another instance
//! must not debit an account twice. [`IdempotencyLayer`] is the server half of that contract,
//! as a tower layer for tonic servers and axum routers alike:
//!
//! - **Once.** The first request with a key claims it in an [`IdempotencyStore`], executes,
//!   and its whole response (status, headers, body and, for gRPC, trailers) is stored for the
//!   TTL (default 24 h). A repeat gets the stored response without executing, marked with the
//!   header `idempotent-replayed: true` ([`REPLAYED_HEADER`]).
//! - **Scope.** A key counts per HTTP method and path (for gRPC: per method), per the layer's
//!   [`namespace`](IdempotencyLayer::namespace) and per the optional caller
//!   [`scope`](IdempotencyLayer::scope) (e.g. the authenticated client), so two clients or two
//!   methods never share a key by accident.
//! - **Same request.** The claim records a SHA-256 [`Fingerprint`] of the query string and the
//!   request body (buffered up to 1 MiB by default). A repeat of a key with a different
//!   request is rejected: HTTP **422** / gRPC **`INVALID_ARGUMENT`** (the client reused a key
//!   for another request: a bug that retrying cannot fix).
//! - **Concurrent duplicates** wait (default up to 10 s) for the first to finish and then get
//!   its response. If it is still running at the deadline they get HTTP **409** / gRPC
//!   **`ABORTED`** with `retry-after: 1`. A key never executes twice at the same time.
//! - **Failures release the key.** A response that says the call did not (or did not fully)
//!   execute releases the key so that a retry with the same key can finish the work; everything
//!   else is stored. Defaults ([`default_disposition`], replaceable with
//!   [`IdempotencyLayer::classify`]): HTTP 408, 429 and every 5xx, and gRPC `CANCELLED`,
//!   `UNKNOWN`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`,
//!   `UNAVAILABLE`, `DATA_LOSS` (and a gRPC response without `grpc-status`) release; success
//!   and definite client errors (`INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`,
//!   `FAILED_PRECONDITION`, …, HTTP 4xx) are stored. This is right for handlers whose side
//!   effects are guarded themselves — one transaction, or downstream calls with keys derived
//!   from this one (Keel's clients carry them), as the demo's payment service does: its 502
//!   for an in-doubt debit is released, and the caller's retry completes the payment without
//!   debiting twice. A handler that may fail after a side effect it cannot guard (a write,
//!   then a 500) should use [`store_failures`], which releases only answers that say "not
//!   executed" (408, 429, 503; `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `ABORTED`).
//! - **Executions run to their end.** Once a request has claimed its key, the handler runs on
//!   a task of its own (spawned per keyed request, in the request's tracing span), which
//!   stores the outcome: a caller that goes away (a dropped connection, a reset stream, its
//!   deadline passing, which tonic enforces by dropping the request) does not stop a handler
//!   half-way and free the key while side effects may have happened; a repeat waits for the
//!   stored response. An execution is bounded by
//!   [`max_execution`](IdempotencyLayer::max_execution) (60 s; the App uses
//!   `server.request_timeout` when set): one that outlives it is stopped, as a request timeout
//!   would, and its outcome is unknown. The caller gets its answer before the outcome is
//!   stored. An execution whose outcome cannot be known — the handler panicked, the
//!   service returned an error, the response body failed after its head — is classified as
//!   HTTP 500 / gRPC `UNKNOWN` (released by default; with [`store_failures`], stored and
//!   replayed as such, `idempotency_outcome_unknown`).
//! - **Fail closed.** When the store cannot be reached the request is answered HTTP **503** /
//!   gRPC **`UNAVAILABLE`** (with `retry-after: 1`) and not executed: executing without the
//!   guarantee could execute twice. If the store fails when the response is to be stored, the
//!   response is still returned (it executed) and storing it is retried for up to a lease while
//!   the claim is kept renewed; only a store outage longer than that leaves the key to lapse.
//! - **Leases.** A claim is a lease (default 30 s) renewed every third of it while the handler
//!   runs (every 200 ms after a failed renewal, beside the handler, never holding it up), so a
//!   crashed instance blocks its keys for at most one lease, and a slow handler keeps its claim
//!   through store outages shorter than a lease. A process that stops mid-execution (a crash,
//!   or a runtime shut down) leaves its keys to lapse after the lease: the one case in which a
//!   retry executes again.
//!
//! - **Bounded.** A keyed response is buffered whole for replay, up to
//!   [`max_response_bytes`](IdempotencyLayer::max_response_bytes) (4 MiB); for a larger one the
//!   caller's body fails and repeats are refused (the handler ran). Streams cannot be replayed: paths given to
//!   [`pass_through`](IdempotencyLayer::pass_through) (the App gives every streaming gRPC
//!   method it has a descriptor of, health's `Watch` and reflection included) are not guarded,
//!   and a keyed REST response that never ends (server-sent events) never answers.
//!
//! Requests without the header pass straight through: one header lookup, no allocation.
//!
//! Other rejections: an empty key, one longer than 255 bytes, a key that is not visible ASCII
//! or a request with several keys get 400 / `INVALID_ARGUMENT`; a keyed request body above the
//! cap gets 413 / `RESOURCE_EXHAUSTED`; a body that cannot be read 400 / `INVALID_ARGUMENT`.
//! HTTP rejections carry an RFC 9457 `application/problem+json` body; gRPC ones are proper
//! trailers-only gRPC responses (HTTP 200, `grpc-status`, `grpc-message`). gRPC is recognised
//! by the request's `content-type: application/grpc…`.
//!
//! # Stores
//!
//! - [`MemoryStore`]: in-process, lazy expiry plus a bounded sweep on every operation, no
//!   background task. De-duplicates only what reaches this process.
//! - `RedisStore` (feature `redis`): shared by every instance, so a retry that lands on another
//!   instance is still answered from the first one's response. Claims are `SET key <claim> NX
//!   PX <lease>`; renewing, completing and releasing are compare-and-set Lua scripts, so one
//!   instance never deletes or overwrites another's claim.
//!
//! # Attaching
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keel::idempotency::{IdempotencyLayer, MemoryStore};
//! use std::time::Duration;
//!
//! let layer = IdempotencyLayer::new(MemoryStore::new())
//!     .namespace("payment")
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .wait_timeout(Duration::from_secs(10));
//! let stats = layer.stats(); // executed / replayed / conflicts / store errors, for metrics
//!
//! // axum
//! let app: axum::Router = axum::Router::new()
//!     .route("/payments", axum::routing::post(|| async { "ok" }))
//!     .layer(layer.clone());
//!
//! // tonic
//! let grpc = tonic::transport::Server::builder().layer(layer);
//! # let _ = (app, grpc, stats);
//! # Ok(())
//! # }
//! ```

mod body;
#[cfg(any(feature = "redis", test))]
mod codec;
mod memory;
mod record;
#[cfg(feature = "redis")]
mod redis;
mod store;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use keel_breaker::request::IDEMPOTENCY_KEY_HEADER;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

pub use self::body::IdempotencyBody;
pub use self::memory::{DEFAULT_MEMORY_MAX_BYTES, MemoryStore};
pub use self::record::{Fingerprint, Lease, StoredResponse};
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
pub use self::store::{BoxError, Claim, IdempotencyStore, StoreError, StoreFuture};

/// The response header that marks a replayed response: `idempotent-replayed: true`.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest idempotency key accepted, in bytes.
pub const MAX_KEY_LEN: usize = keel_breaker::request::MAX_IDEMPOTENCY_KEY_LEN;

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const MAX_WAIT_STEP: Duration = Duration::from_millis(200);
const FIRST_WAIT_STEP: Duration = Duration::from_millis(5);
const MIN_LEASE: Duration = Duration::from_secs(1);

/// The most headers and trailers a kept response may have (a store reads back no more).
const MAX_STORED_HEADERS: usize = 4096;

/// The default of [`IdempotencyLayer::max_execution`]: 60 s.
pub const DEFAULT_MAX_EXECUTION: Duration = Duration::from_secs(60);

/// The default of [`IdempotencyLayer::max_response_bytes`]: 4 MiB (tonic's default message cap).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The longest [`ttl`](IdempotencyLayer::ttl) and [`lease`](IdempotencyLayer::lease): ten years.
/// Longer ones are cut to it (a store's clock, and Redis's expiry, cannot go further; ten years
/// is "for ever" for a payment's key).
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a handler answered, as the layer classifies it to decide whether to keep the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A non-gRPC response, or a gRPC request answered with an HTTP status other than 200.
    Http(StatusCode),
    /// A gRPC response with this `grpc-status` (from the trailers or a trailers-only header).
    Grpc(tonic::Code),
    /// A gRPC response that ended without a `grpc-status`.
    GrpcMissingStatus,
}

/// Whether a response is stored for replay or the key is released for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The call executed with a definite answer: store it, replay it to repeats.
    Store,
    /// The call did not execute, or not fully: free the key so that a retry executes.
    Release,
}

/// The default classification (see the [module docs](self)): HTTP 408, 429 and 5xx and the
/// "did not complete" gRPC codes release the key; everything else is stored.
///
/// Releasing a failure lets the caller's retry (with the same key) finish what the first
/// attempt left undone, which is safe when the handler's side effects are themselves guarded:
/// done in one transaction, or made downstream with a key derived from this one (Keel's clients
/// carry it). A handler with side effects that a retry must never repeat after a failure (a
/// non-transactional write before a later error) needs [`store_failures`] instead.
pub fn default_disposition(outcome: Outcome) -> Disposition {
    use tonic::Code;
    match outcome {
        Outcome::Http(status) => {
            if status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
            {
                Disposition::Release
            } else {
                Disposition::Store
            }
        }
        Outcome::Grpc(
            Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated,
        ) => Disposition::Store,
        Outcome::Grpc(
            Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss,
        )
        | Outcome::GrpcMissingStatus => Disposition::Release,
    }
}

/// The strict classification: only an answer that says the request was *not* executed releases
/// the key — HTTP 408, 429 and 503, gRPC `UNAVAILABLE`, `RESOURCE_EXHAUSTED` and `ABORTED`;
/// every other outcome is stored and replayed, failures included (a 500 may come after a side
/// effect). For handlers whose side effects are not guarded against a re-run; their callers
/// must then treat a replayed failure as final for the key. Use with
/// [`IdempotencyLayer::classify`].
pub fn store_failures(outcome: Outcome) -> Disposition {
    use tonic::Code;
    match outcome {
        Outcome::Http(
            StatusCode::REQUEST_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS
            | StatusCode::SERVICE_UNAVAILABLE,
        )
        | Outcome::Grpc(Code::Unavailable | Code::ResourceExhausted | Code::Aborted) => {
            Disposition::Release
        }
        Outcome::Http(_) | Outcome::Grpc(_) | Outcome::GrpcMissingStatus => Disposition::Store,
    }
}

/// Counters of an [`IdempotencyLayer`]; cheap to clone, shared by every service the layer
/// built, read at any time (e.g. by a metrics exporter at scrape time).
#[derive(Debug, Clone, Default)]
pub struct IdempotencyStats {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    executed: AtomicU64,
    replayed: AtomicU64,
    conflicts: AtomicU64,
    mismatches: AtomicU64,
    released: AtomicU64,
    store_errors: AtomicU64,
}

impl IdempotencyStats {
    /// Keyed requests that executed (claimed their key and reached the handler).
    pub fn executed(&self) -> u64 {
        self.inner.executed.load(Ordering::Relaxed)
    }

    /// Repeats answered with the stored response instead of executing again.
    pub fn replayed(&self) -> u64 {
        self.inner.replayed.load(Ordering::Relaxed)
    }

    /// Duplicates refused (409 / `ABORTED`) because the first was still in flight at the wait
    /// deadline.
    pub fn conflicts(&self) -> u64 {
        self.inner.conflicts.load(Ordering::Relaxed)
    }

    /// Duplicates prevented: [`replayed`](Self::replayed) plus [`conflicts`](Self::conflicts).
    pub fn duplicates_prevented(&self) -> u64 {
        self.replayed() + self.conflicts()
    }

    /// Repeats of a key with a different request, rejected (422 / `INVALID_ARGUMENT`).
    pub fn mismatches(&self) -> u64 {
        self.inner.mismatches.load(Ordering::Relaxed)
    }

    /// Executions whose key was released (a failure a retry may repair, an error, a cancel).
    pub fn released(&self) -> u64 {
        self.inner.released.load(Ordering::Relaxed)
    }

    /// Store operations that failed (requests refused with 503 / `UNAVAILABLE`, responses not
    /// stored, claims not released).
    pub fn store_errors(&self) -> u64 {
        self.inner.store_errors.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Extracts the caller scope of a request (e.g. an authenticated client id from the
/// extensions); `None` means no scope.
type ScopeFn = dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
struct Config {
    store: Arc<dyn IdempotencyStore>,
    namespace: String,
    scope: Option<Arc<ScopeFn>>,
    classify: fn(Outcome) -> Disposition,
    ttl: Duration,
    lease: Duration,
    wait_timeout: Duration,
    max_body_bytes: usize,
    max_response_bytes: usize,
    max_execution: Duration,
    /// Paths whose requests pass through untouched, key or not (streaming methods).
    pass_through: Arc<std::collections::HashSet<String>>,
    stats: IdempotencyStats,
    /// The executions running on tasks of their own, so that a shutdown can wait for them.
    executions: tokio_util::task::TaskTracker,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store", &self.store)
            .field("namespace", &self.namespace)
            .field("scope", &self.scope.as_ref().map(|_| "fn"))
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("wait_timeout", &self.wait_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("max_execution", &self.max_execution)
            .field("pass_through", &self.pass_through)
            .finish_non_exhaustive()
    }
}

/// The idempotency [`Layer`]: wraps a tonic server (`Server::builder().layer(..)`) or an axum
/// router (`Router::layer(..)`) so that keyed requests execute once. See the
/// [module docs](self) for the semantics.
///
/// Cloning is cheap and shares the store and the [`stats`](Self::stats).
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl IdempotencyLayer {
    /// A layer over `store` with the defaults: TTL 24 h, lease 30 s, wait 10 s, request body cap
    /// 1 MiB, empty namespace, no caller scope, [`default_disposition`].
    pub fn new(store: impl IdempotencyStore) -> Self {
        Self::with_store(Arc::new(store))
    }

    /// Like [`new`](Self::new) with a shared store.
    pub fn with_store(store: Arc<dyn IdempotencyStore>) -> Self {
        Self {
            config: Arc::new(Config {
                store,
                namespace: String::new(),
                scope: None,
                classify: default_disposition,
                ttl: Duration::from_secs(24 * 3600),
                lease: Duration::from_secs(30),
                wait_timeout: Duration::from_secs(10),
                max_body_bytes: 1024 * 1024,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
                max_execution: DEFAULT_MAX_EXECUTION,
                pass_through: Arc::default(),
                stats: IdempotencyStats::default(),
                executions: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// How long a completed response is kept for replay (default 24 h; at least 1 s, at most
    /// [`MAX_TTL`]).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.edit(|c| c.ttl = ttl.clamp(MIN_LEASE, MAX_TTL))
    }

    /// How long a claim lasts without renewal (default 30 s; at least 1 s). The layer renews it
    /// every third of this while the handler runs; a crashed instance blocks its keys for at
    /// most this long. At most [`MAX_TTL`].
    pub fn lease(self, lease: Duration) -> Self {
        self.edit(|c| c.lease = lease.clamp(MIN_LEASE, MAX_TTL))
    }

    /// How long a duplicate waits for the first request with its key to finish before it gets
    /// 409 / `ABORTED` (default 10 s; zero: no wait).
    pub fn wait_timeout(self, wait: Duration) -> Self {
        self.edit(|c| c.wait_timeout = wait)
    }

    /// The largest keyed request body buffered for fingerprinting (default 1 MiB); larger ones
    /// get 413 / `RESOURCE_EXHAUSTED`.
    pub fn max_body_bytes(self, max: usize) -> Self {
        self.edit(|c| c.max_body_bytes = max)
    }

    /// The largest response kept for replay (default 4 MiB). For a response that grows past it
    /// the caller's body fails, and a repeat is answered 500 / `INTERNAL`
    /// (`idempotency_response_too_large`) whatever the classification: the handler ran, and
    /// must not run again.
    pub fn max_response_bytes(self, max: usize) -> Self {
        self.edit(|c| c.max_response_bytes = max)
    }

    /// How long a keyed execution may run (default 60 s; at least 1 ms). Executions run on
    /// tasks of their own, beyond their callers; one that outlives this is stopped (its future
    /// dropped, as a request timeout would) and counts as an unknown outcome, so a hung handler
    /// does not hold its key, and its lease renewals, for ever. The App sets it to
    /// `server.request_timeout` when that is configured.
    pub fn max_execution(self, max: Duration) -> Self {
        self.edit(|c| c.max_execution = max.clamp(Duration::from_millis(1), MAX_TTL))
    }

    /// Requests to these paths pass through untouched, with a key or not: streaming methods,
    /// whose responses cannot be buffered for replay (a keyed stream would never answer). The
    /// App passes every streaming method of the descriptors it knows (health's `Watch` and
    /// reflection included). Adds to the paths given before.
    pub fn pass_through<P: Into<String>>(self, paths: impl IntoIterator<Item = P>) -> Self {
        let paths: Vec<String> = paths.into_iter().map(Into::into).collect();
        self.edit(|c| Arc::make_mut(&mut c.pass_through).extend(paths))
    }

    /// A fixed namespace for every key (e.g. the service name), so services sharing one store
    /// never share keys.
    pub fn namespace(self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.edit(|c| c.namespace = namespace)
    }

    /// A per-request caller scope (e.g. the authenticated client id from the request's
    /// extensions): keys of different callers never collide.
    pub fn scope<F>(self, scope: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        let scope: Arc<ScopeFn> = Arc::new(scope);
        self.edit(|c| c.scope = Some(scope))
    }

    /// Replaces [`default_disposition`]: which outcomes are stored and which release the key.
    pub fn classify(self, classify: fn(Outcome) -> Disposition) -> Self {
        self.edit(|c| c.classify = classify)
    }

    /// The layer's counters (shared by clones of the layer and every service it built).
    pub fn stats(&self) -> IdempotencyStats {
        self.config.stats.clone()
    }

    /// Resolves when no keyed execution is running (on any service this layer, or a clone,
    /// built). Executions run on tasks of their own, beyond their callers: a graceful shutdown
    /// waits for this after the servers stopped (the App does, within its shutdown timeout), so
    /// that the process does not end a handler half-way and leave its key to lapse.
    pub async fn executions_done(&self) {
        // A closed tracker still takes new tasks; its wait ends whenever none runs.
        self.config.executions.close();
        self.config.executions.wait().await;
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`IdempotencyLayer`] builds around `S`.
#[derive(Debug, Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, B, ResB> Service<Request<B>> for Idempotency<S>
where
    S: Service<Request<IdempotencyBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<IdempotencyBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !request.headers().contains_key(IDEMPOTENCY_KEY_HEADER)
            || self.config.pass_through.contains(request.uri().path())
        {
            return ResponseFuture {
                kind: FutureKind::Passthrough {
                    future: self.inner.call(request.map(IdempotencyBody::new)),
                },
            };
        }
        // Take the service that was driven to readiness; leave a clone for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            kind: FutureKind::Keyed {
                future: Box::pin(keyed(inner, Arc::clone(&self.config), request)),
            },
        }
    }
}

type KeyedFuture<ResB, E> =
    Pin<Box<dyn Future<Output = Result<Response<IdempotencyBody<ResB>>, E>> + Send>>;

pin_project! {
    /// The response future of [`Idempotency`].
    pub struct ResponseFuture<F, ResB, E> {
        #[pin]
        kind: FutureKind<F, ResB, E>,
    }
}

pin_project! {
    #[project = FutureKindProj]
    enum FutureKind<F, ResB, E> {
        Passthrough { #[pin] future: F },
        Keyed { future: KeyedFuture<ResB, E> },
    }
}

impl<F, ResB, E> fmt::Debug for ResponseFuture<F, ResB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FutureKind::Passthrough { .. } => "passthrough",
            FutureKind::Keyed { .. } => "keyed",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, ResB, E> Future for ResponseFuture<F, ResB, E>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<IdempotencyBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureKindProj::Passthrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(IdempotencyBody::new))),
            FutureKindProj::Keyed { future } => future.as_mut().poll(cx),
        }
    }
}

/// Why the layer answered instead of the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    InvalidKey(&'static str),
    BodyTooLarge,
    BodyUnreadable,
    Mismatch,
    Conflict,
    StoreUnavailable,
    /// Stored and answered for an execution whose outcome the layer cannot know.
    OutcomeUnknown,
    /// Stored for an execution whose response was too large to keep.
    ResponseTooLarge,
}

impl Rejection {
    fn http_status(self) -> StatusCode {
        match self {
            Self::InvalidKey(_) | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict => StatusCode::CONFLICT,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::OutcomeUnknown | Self::ResponseTooLarge => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidKey(_) | Self::BodyUnreadable | Self::Mismatch => {
                tonic::Code::InvalidArgument
            }
            Self::BodyTooLarge => tonic::Code::ResourceExhausted,
            Self::Conflict => tonic::Code::Aborted,
            Self::StoreUnavailable => tonic::Code::Unavailable,
            Self::OutcomeUnknown => tonic::Code::Unknown,
            Self::ResponseTooLarge => tonic::Code::Internal,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::InvalidKey(_) => "idempotency_key_invalid",
            Self::BodyTooLarge => "idempotency_body_too_large",
            Self::BodyUnreadable => "idempotency_body_unreadable",
            Self::Mismatch => "idempotency_key_reused",
            Self::Conflict => "idempotency_key_in_flight",
            Self::StoreUnavailable => "idempotency_store_unavailable",
            Self::OutcomeUnknown => "idempotency_outcome_unknown",
            Self::ResponseTooLarge => "idempotency_response_too_large",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::InvalidKey(why) => why,
            Self::BodyTooLarge => "the request body is too large for an idempotent request",
            Self::BodyUnreadable => "the request body could not be read",
            Self::Mismatch => "the idempotency key was already used with a different request",
            Self::Conflict => "a request with this idempotency key is still being processed",
            Self::StoreUnavailable => "idempotency cannot be guaranteed right now; retry later",
            Self::OutcomeUnknown => {
                "the request with this idempotency key failed while it executed; its outcome is unknown"
            }
            Self::ResponseTooLarge => {
                "the request with this idempotency key executed, but its response was too large to keep for a repeat"
            }
        }
    }

    /// The response, as a store would keep it.
    fn stored(self, grpc: bool) -> StoredResponse {
        let (status, mut headers, body) = if grpc {
            let (parts, ()) = tonic::Status::new(self.grpc_code(), self.message())
                .into_http::<()>()
                .into_parts();
            (parts.status, parts.headers, Bytes::new())
        } else {
            let status = self.http_status();
            let body = serde_json::json!({
                "type": "about:blank",
                "title": status.canonical_reason().unwrap_or_default(),
                "status": status.as_u16(),
                "detail": self.message(),
                "code": self.code(),
            });
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            (status, headers, Bytes::from(body.to_string()))
        };
        if matches!(self, Self::Conflict | Self::StoreUnavailable) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        StoredResponse {
            status,
            headers,
            body,
            trailers: None,
        }
    }

    fn response<ResB>(self, grpc: bool) -> Response<IdempotencyBody<ResB>> {
        respond(self.stored(grpc))
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The validated key of a request, or why it is not acceptable.
fn request_key(headers: &HeaderMap) -> Result<&str, Rejection> {
    // The rule Keel's clients check before sending.
    match keel_breaker::request::idempotency_key_of(headers) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(Rejection::InvalidKey(
            "a request must carry exactly one idempotency-key header",
        )),
        Err(invalid) => Err(Rejection::InvalidKey(invalid.reason())),
    }
}

/// The store key: the hex SHA-256 of namespace, scope, method, path and key, each length
/// prefixed so that no two different tuples hash the same input.
fn store_key(config: &Config, parts: &http::request::Parts, key: &str) -> String {
    let scope = config.scope.as_ref().and_then(|scope| scope(parts));
    let mut hash = Sha256::new();
    for part in [
        config.namespace.as_str(),
        scope.as_deref().unwrap_or_default(),
        parts.method.as_str(),
        parts.uri.path(),
        key,
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    record::hex(&hash.finalize())
}

/// Headers that describe one connection, not the response: never stored.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te"
    )
}

fn outcome(
    grpc: bool,
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Outcome {
    if !grpc || status != StatusCode::OK {
        return Outcome::Http(status);
    }
    trailers
        .and_then(|t| t.get(GRPC_STATUS))
        .or_else(|| headers.get(GRPC_STATUS))
        .map_or(Outcome::GrpcMissingStatus, |v| {
            Outcome::Grpc(tonic::Code::from_bytes(v.as_bytes()))
        })
}

/// `stored` as a response.
fn respond<ResB>(stored: StoredResponse) -> Response<IdempotencyBody<ResB>> {
    let mut response = Response::new(IdempotencyBody::buffered(stored.body, stored.trailers));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;
    response
}

/// `stored` as the response to a repeat.
fn replay<ResB>(stored: StoredResponse) -> Response<IdempotencyBody<ResB>> {
    let mut response = respond(stored);
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

async fn release(store: &dyn IdempotencyStore, stats: &IdempotencyStats, key: &str, lease: &Lease) {
    IdempotencyStats::add(&stats.inner.released);
    match store.release(key, lease).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(key, "idempotency claim was lost before it was released"),
        Err(error) => {
            IdempotencyStats::add(&stats.inner.store_errors);
            tracing::warn!(%error, key, "idempotency claim not released; it expires with its lease");
        }
    }
}

/// After a renewal or a completion the store failed, the next try comes this soon (at most).
const STORE_RETRY: Duration = Duration::from_millis(200);

/// Drives `future` while renewing `lease` every third of its length, and after a failed renewal
/// every [`STORE_RETRY`] (so a short store outage does not cost the claim); the renewal runs
/// beside the future, never holding it up.
async fn leased<F: Future>(
    future: F,
    store: &dyn IdempotencyStore,
    key: &str,
    lease: &Lease,
    length: Duration,
) -> F::Output {
    let mut future = std::pin::pin!(future);
    let period = length / 3;
    let mut timer = Box::pin(tokio::time::sleep(period));
    let mut renewal: Option<StoreFuture<'_, bool>> = None;
    let mut lost = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        loop {
            if let Some(renew) = renewal.as_mut() {
                // A renewal gets a period to answer (the timer runs meanwhile), then counts as
                // failed and is tried again: one that hangs must not stop every later one.
                let result = match renew.as_mut().poll(cx) {
                    Poll::Ready(result) => result,
                    Poll::Pending if timer.as_mut().poll(cx).is_ready() => {
                        Err(StoreError::new("the renewal did not answer in time"))
                    }
                    Poll::Pending => return Poll::Pending,
                };
                let next = match result {
                    Ok(true) => period,
                    Ok(false) => {
                        lost = true;
                        tracing::warn!(key, "idempotency claim lost while the request ran");
                        period
                    }
                    Err(error) => {
                        tracing::warn!(%error, key, "idempotency claim not renewed; retrying");
                        STORE_RETRY.min(period)
                    }
                };
                renewal = None;
                timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
            if lost || timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Taken before the call: a store may renew eagerly, inside `renew` itself.
            let sent = tokio::time::Instant::now();
            renewal = Some(store.renew(key, lease, length));
            timer.as_mut().reset(sent + period);
        }
    })
    .await
}

/// Stores `stored` as the outcome of the key's execution. A store failure is retried (every
/// [`STORE_RETRY`] at most) for up to a lease, while the caller keeps renewing the claim beside
/// it: giving up at once would leave the key to lapse one lease later and a retry to execute
/// again.
async fn complete(config: &Config, key: &str, lease: &Lease, stored: &StoredResponse) {
    let stats = &config.stats;
    let give_up = tokio::time::Instant::now() + config.lease;
    let mut step = Duration::from_millis(25);
    loop {
        match config.store.complete(key, lease, stored, config.ttl).await {
            Ok(true) => return,
            Ok(false) => {
                tracing::warn!(key, "idempotency claim lost before the response was stored");
                return;
            }
            Err(error) => {
                IdempotencyStats::add(&stats.inner.store_errors);
                if tokio::time::Instant::now() + step >= give_up {
                    tracing::error!(
                        %error,
                        key,
                        "response not stored: once the claim's lease runs out, a retry with this key may execute again"
                    );
                    return;
                }
                tracing::warn!(%error, key, "response not stored yet; retrying");
                tokio::time::sleep(step).await;
                step = (step * 2).min(STORE_RETRY);
            }
        }
    }
}

/// What is stored (and answered) for an execution whose outcome the layer cannot know: the
/// handler panicked, the service failed, or the response body failed after its head.
/// Classified as 500 / `UNKNOWN` by the layer's classifier.
fn unknown_outcome(config: &Config, grpc: bool) -> (Disposition, StoredResponse) {
    let outcome = if grpc {
        Outcome::Grpc(tonic::Code::Unknown)
    } else {
        Outcome::Http(StatusCode::INTERNAL_SERVER_ERROR)
    };
    (
        (config.classify)(outcome),
        Rejection::OutcomeUnknown.stored(grpc),
    )
}

/// Runs a claimed request to its end, answers `answer` and stores (or releases) its outcome: the
/// half of a keyed request that [`keyed`] spawns, so that nothing the caller does
/// (disconnecting, resetting the stream, its deadline passing) stops a handler half-way and
/// frees its key while side effects may have happened. The run is bounded by the layer's
/// [`max_execution`](IdempotencyLayer::max_execution); a handler that panics or outlives it
/// counts as an unknown outcome.
async fn execute<S, B, ResB>(
    mut inner: S,
    config: Arc<Config>,
    key: String,
    lease: Lease,
    grpc: bool,
    request: Request<IdempotencyBody<B>>,
    answer: tokio::sync::oneshot::Sender<Result<Response<IdempotencyBody<ResB>>, S::Error>>,
) where
    S: Service<Request<IdempotencyBody<B>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    use futures::FutureExt;
    let store = &*config.store;
    let run = async {
        let response = inner.call(request).await?;
        let (parts, body) = response.into_parts();
        let collected = Limited::new(body, config.max_response_bytes)
            .collect()
            .await;
        Ok::<_, S::Error>((parts, collected))
    };
    let run = tokio::time::timeout(
        config.max_execution,
        std::panic::AssertUnwindSafe(run).catch_unwind(),
    );
    let ran = leased(run, store, &key, &lease, config.lease).await;
    // A handler that did not finish (it panicked, or was stopped at the limit): the caller and
    // repeats get the unknown outcome.
    let stopped = || {
        let (disposition, stored) = unknown_outcome(&config, grpc);
        (Ok(respond(stored.clone())), disposition, stored)
    };
    // What the caller gets, and what is kept for a repeat: per the classification, except that
    // an execution that ran to its end with a response too large to keep is never re-run.
    let (reply, disposition, stored) = match ran {
        Ok(Ok(Ok((parts, Ok(collected))))) => {
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            let (disposition, stored) = if parts.headers.len()
                + trailers.as_ref().map_or(0, HeaderMap::len)
                > MAX_STORED_HEADERS
            {
                tracing::warn!(key, "response has too many headers to keep for replay");
                (Disposition::Store, Rejection::ResponseTooLarge.stored(grpc))
            } else {
                let outcome = outcome(grpc, parts.status, &parts.headers, trailers.as_ref());
                let mut headers = HeaderMap::with_capacity(parts.headers.len());
                for (name, value) in &parts.headers {
                    if !is_hop_by_hop(name) {
                        headers.append(name.clone(), value.clone());
                    }
                }
                let stored = StoredResponse {
                    status: parts.status,
                    headers,
                    body: body.clone(),
                    trailers: trailers.clone(),
                };
                ((config.classify)(outcome), stored)
            };
            let reply = Ok(Response::from_parts(
                parts,
                IdempotencyBody::buffered(body, trailers),
            ));
            (reply, disposition, stored)
        }
        Ok(Ok(Ok((parts, Err(error))))) if error.downcast_ref::<LengthLimitError>().is_some() => {
            tracing::warn!(
                key,
                max = config.max_response_bytes,
                "response too large to keep for replay; repeats are refused"
            );
            let stored = Rejection::ResponseTooLarge.stored(grpc);
            let reply = Ok(Response::from_parts(parts, IdempotencyBody::failed(error)));
            (reply, Disposition::Store, stored)
        }
        Ok(Ok(Ok((parts, Err(error))))) => {
            tracing::warn!(%error, key, "response body failed; the outcome is unknown");
            let (disposition, stored) = unknown_outcome(&config, grpc);
            let reply = Ok(Response::from_parts(parts, IdempotencyBody::failed(error)));
            (reply, disposition, stored)
        }
        Ok(Ok(Err(error))) => {
            tracing::warn!(key, "the service failed; the outcome is unknown");
            let (disposition, stored) = unknown_outcome(&config, grpc);
            (Err(error), disposition, stored)
        }
        Ok(Err(_panic)) => {
            tracing::error!(key, "the handler panicked; the outcome is unknown");
            stopped()
        }
        Err(_elapsed) => {
            tracing::error!(
                key,
                limit = ?config.max_execution,
                "the handler outlived the execution limit and was stopped; the outcome is unknown"
            );
            stopped()
        }
    };
    // The caller has its answer before the outcome is stored: a store that is slow or failing
    // does not hold up a call that succeeded. A repeat meanwhile finds the key in flight and
    // waits for the record.
    let _ = answer.send(reply);
    match disposition {
        Disposition::Release => release(store, &config.stats, &key, &lease).await,
        Disposition::Store => {
            let storing = complete(&config, &key, &lease, &stored);
            leased(storing, store, &key, &lease, config.lease).await;
        }
    }
}

async fn keyed<S, B, ResB>(
    inner: S,
    config: Arc<Config>,
    request: Request<B>,
) -> Result<Response<IdempotencyBody<ResB>>, S::Error>
where
    S: Service<Request<IdempotencyBody<B>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let stats = &config.stats;
    let (parts, body) = request.into_parts();
    let grpc = is_grpc(&parts.headers);
    let key = match request_key(&parts.headers) {
        Ok(key) => store_key(&config, &parts, key),
        Err(rejection) => return Ok(rejection.response(grpc)),
    };

    let (body, request_trailers) = match Limited::new(body, config.max_body_bytes).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        Err(error) => {
            let rejection = if error.downcast_ref::<LengthLimitError>().is_some() {
                Rejection::BodyTooLarge
            } else {
                Rejection::BodyUnreadable
            };
            return Ok(rejection.response(grpc));
        }
    };
    let fingerprint = Fingerprint::of(parts.uri.query(), &body);

    let store = &*config.store;
    // Capped (100 years): `Duration::MAX` as "wait forever" must not overflow the clock.
    let deadline = keel_breaker::deadline::Deadline::after(config.wait_timeout).0;
    let mut step = FIRST_WAIT_STEP;
    let lease = loop {
        let claim = match store.claim(&key, fingerprint, config.lease).await {
            Ok(claim) => claim,
            Err(error) => {
                IdempotencyStats::add(&stats.inner.store_errors);
                tracing::warn!(%error, key, "idempotency store unavailable; request refused");
                return Ok(Rejection::StoreUnavailable.response(grpc));
            }
        };
        match claim {
            Claim::Acquired(lease) => break lease,
            Claim::Completed {
                fingerprint: stored,
                ..
            }
            | Claim::InFlight {
                fingerprint: stored,
            } if stored != fingerprint => {
                IdempotencyStats::add(&stats.inner.mismatches);
                return Ok(Rejection::Mismatch.response(grpc));
            }
            Claim::Completed { response, .. } => {
                IdempotencyStats::add(&stats.inner.replayed);
                tracing::debug!(key, "idempotent request replayed");
                return Ok(replay(response));
            }
            Claim::InFlight { .. } => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    IdempotencyStats::add(&stats.inner.conflicts);
                    return Ok(Rejection::Conflict.response(grpc));
                }
                store.changed(&key, step.min(deadline - now)).await;
                step = (step * 2).min(MAX_WAIT_STEP);
            }
        }
    };

    IdempotencyStats::add(&stats.inner.executed);
    let request = Request::from_parts(parts, IdempotencyBody::buffered(body, request_trailers));
    // The execution owns the claim from here: spawned, it runs to its end even when this
    // request's future is dropped (see `execute`).
    let (tx, rx) = tokio::sync::oneshot::channel();
    let execution = execute(inner, Arc::clone(&config), key, lease, grpc, request, tx);
    drop(
        config
            .executions
            .spawn(tracing::Instrument::in_current_span(execution)),
    );
    match rx.await {
        Ok(answer) => answer,
        // The task ended without answering: the runtime is shutting down, or the classifier or
        // the store panicked. The claim stays until its lease runs out.
        Err(_) => Ok(Rejection::OutcomeUnknown.response(grpc)),
    }
}

#[cfg(test)]
mod tests;
