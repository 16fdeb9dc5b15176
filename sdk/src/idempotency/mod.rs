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
//!   execute releases the key so that a retry executes; everything else is stored. Defaults
//!   ([`default_disposition`], replaceable with [`IdempotencyLayer::classify`]): HTTP 408, 429
//!   and every 5xx, and gRPC `CANCELLED`, `UNKNOWN`, `DEADLINE_EXCEEDED`,
//!   `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS` (and a gRPC
//!   response without `grpc-status`) release; success and definite client errors
//!   (`INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION`, …, HTTP 4xx)
//!   are stored. When the inner service returns an error, or the response body fails, the key
//!   is released too, and so it is when the request's future is dropped mid-flight (the client
//!   cancelled; a drop guard releases on a spawned task). Handlers whose side effects must not
//!   be repeated after such failures should use the same key downstream (Keel's clients do)
//!   or supply a stricter classifier.
//! - **Fail closed.** When the store cannot be reached the request is answered HTTP **503** /
//!   gRPC **`UNAVAILABLE`** (with `retry-after: 1`) and not executed: executing without the
//!   guarantee could execute twice. If the store fails only when the response is to be stored,
//!   the response is still returned (it executed) and the claim stays until its lease runs out.
//! - **Leases.** A claim is a lease (default 30 s) renewed every third of it while the handler
//!   runs, so a crashed instance blocks its keys for at most one lease, and a slow handler
//!   never loses its claim to a retry.
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
pub use self::memory::MemoryStore;
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
    /// The call did not execute (or not fully): free the key so that a retry executes.
    Release,
}

/// The default classification (see the [module docs](self)): HTTP 408, 429 and 5xx and the
/// "did not complete" gRPC codes release the key; everything else is stored.
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
    stats: IdempotencyStats,
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
                stats: IdempotencyStats::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// How long a completed response is kept for replay (default 24 h; at least 1 s).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.edit(|c| c.ttl = ttl.max(MIN_LEASE))
    }

    /// How long a claim lasts without renewal (default 30 s; at least 1 s). The layer renews it
    /// every third of this while the handler runs; a crashed instance blocks its keys for at
    /// most this long.
    pub fn lease(self, lease: Duration) -> Self {
        self.edit(|c| c.lease = lease.max(MIN_LEASE))
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
    S::Future: Send,
    S::Error: Send,
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
        if !request.headers().contains_key(IDEMPOTENCY_KEY_HEADER) {
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
}

impl Rejection {
    fn http_status(self) -> StatusCode {
        match self {
            Self::InvalidKey(_) | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict => StatusCode::CONFLICT,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
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
        }
    }

    fn response<ResB>(self, grpc: bool) -> Response<IdempotencyBody<ResB>> {
        let mut response = if grpc {
            tonic::Status::new(self.grpc_code(), self.message()).into_http()
        } else {
            let status = self.http_status();
            let body = serde_json::json!({
                "type": "about:blank",
                "title": status.canonical_reason().unwrap_or_default(),
                "status": status.as_u16(),
                "detail": self.message(),
                "code": self.code(),
            });
            let mut response = Response::new(IdempotencyBody::buffered(
                Bytes::from(body.to_string()),
                None,
            ));
            *response.status_mut() = status;
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            response
        };
        if matches!(self, Self::Conflict | Self::StoreUnavailable) {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
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

fn replay<ResB>(stored: StoredResponse) -> Response<IdempotencyBody<ResB>> {
    let mut response = Response::new(IdempotencyBody::buffered(stored.body, stored.trailers));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers;
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// Releases a claim unless disarmed; if dropped armed (the request future was dropped), the
/// release runs on a spawned task (without a runtime, the claim expires with its lease).
struct ClaimGuard {
    store: Arc<dyn IdempotencyStore>,
    stats: IdempotencyStats,
    key: String,
    lease: Option<Lease>,
}

impl ClaimGuard {
    async fn release(mut self) {
        if let Some(lease) = self.lease.clone() {
            release(&*self.store, &self.stats, &self.key, &lease).await;
        }
        self.lease = None;
    }

    fn disarm(mut self) {
        self.lease = None;
    }
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

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let (store, stats, key) = (
            Arc::clone(&self.store),
            self.stats.clone(),
            std::mem::take(&mut self.key),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                tracing::debug!(
                    key,
                    "idempotent request dropped in flight; releasing its key"
                );
                drop(handle.spawn(async move { release(&*store, &stats, &key, &lease).await }));
            }
            Err(_) => tracing::warn!(
                key,
                "no runtime to release an idempotency claim; it expires with its lease"
            ),
        }
    }
}

/// Drives `future` while renewing `lease` every third of its length.
async fn leased<F: Future>(
    future: F,
    store: &dyn IdempotencyStore,
    key: &str,
    lease: &Lease,
    length: Duration,
) -> F::Output {
    let mut future = std::pin::pin!(future);
    let period = length / 3;
    loop {
        tokio::select! {
            biased;
            output = &mut future => return output,
            () = tokio::time::sleep(period) => match store.renew(key, lease, length).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(key, "idempotency claim lost while the request ran"),
                Err(error) => tracing::warn!(%error, key, "idempotency claim not renewed"),
            },
        }
    }
}

async fn keyed<S, B, ResB>(
    mut inner: S,
    config: Arc<Config>,
    request: Request<B>,
) -> Result<Response<IdempotencyBody<ResB>>, S::Error>
where
    S: Service<Request<IdempotencyBody<B>>, Response = Response<ResB>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
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
    let guard = ClaimGuard {
        store: Arc::clone(&config.store),
        stats: stats.clone(),
        key: key.clone(),
        lease: Some(lease.clone()),
    };
    let request = Request::from_parts(parts, IdempotencyBody::buffered(body, request_trailers));
    let run = async {
        let response = inner.call(request).await?;
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.map_err(Into::into);
        Ok::<_, S::Error>((parts, collected))
    };
    let (parts, collected) = match leased(run, store, &key, &lease, config.lease).await {
        Ok(done) => done,
        Err(error) => {
            guard.release().await;
            return Err(error);
        }
    };
    let (body, trailers) = match collected {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        Err(error) => {
            tracing::warn!(%error, key, "response body failed; idempotency key released");
            guard.release().await;
            return Ok(Response::from_parts(parts, IdempotencyBody::failed(error)));
        }
    };

    match (config.classify)(outcome(
        grpc,
        parts.status,
        &parts.headers,
        trailers.as_ref(),
    )) {
        Disposition::Release => guard.release().await,
        Disposition::Store => {
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
            match store.complete(&key, &lease, &stored, config.ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key, "idempotency claim lost before the response was stored");
                }
                Err(error) => {
                    IdempotencyStats::add(&stats.inner.store_errors);
                    tracing::error!(%error, key, "response not stored; its key stays claimed until the lease ends");
                }
            }
            guard.disarm();
        }
    }
    Ok(Response::from_parts(
        parts,
        IdempotencyBody::buffered(body, trailers),
    ))
}

#[cfg(test)]
mod tests;
