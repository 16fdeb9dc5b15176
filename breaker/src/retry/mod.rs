//! Retries with a budget, backoff with full jitter, and outcome awareness.
//!
//! Every failed attempt is classified (see [`classify`](crate::classify)):
//!
//! * NOT_SENT (never left: connect refused, no endpoint, a local breaker / bulkhead / rate limit
//!   refusal) and REJECTED (the server says it did not execute: 429, 503 with `Retry-After`,
//!   `UNAVAILABLE`, `RESOURCE_EXHAUSTED`) are retried by default;
//! * UNKNOWN (may have executed: a timeout or reset after the request was written, 500, a 503
//!   without `Retry-After`, `INTERNAL`) is retried only when the request is marked [`Idempotent`](crate::request::Idempotent)
//!   or carries an idempotency key ([`IdempotencyKey`](crate::request::IdempotencyKey) or the
//!   `idempotency-key` header), and the same key goes with every attempt. A key that breaks
//!   [`check_idempotency_key`](crate::request::check_idempotency_key) fails the call before
//!   anything is sent ([`InvalidIdempotencyKey`](crate::request::InvalidIdempotencyKey)).
//!
//! A retry also needs: an attempt left ([`RetryPolicy::max_attempts`]), a token from the shared
//! [`RetryBudget`], a replayable body (buffered whole, at most
//! [`RetryPolicy::max_replay_body`] bytes; streaming bodies are sent once and never replayed),
//! and time left before the request's [`Deadline`]. Between attempts
//! it sleeps a random time in `[0, min(max_backoff, base × 2^retry))` ("full jitter"), and the
//! deadline header is re-stamped with the time actually left.
//!
//! Outcomes are judged from the response head ([`Classify::classify_response`]): a gRPC status
//! that arrives in the trailers after a body (not a trailers-only response) is not retried, since
//! by then the response is streaming to the caller. The circuit breaker does wait for such a
//! status ([`Classify::classify_head`]); the caller sees it as the call's `tonic::Status`.

mod body;
mod budget;
mod future;
mod layer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use tower_service::Service;

pub use body::ReplayBody;
pub use budget::RetryBudget;
pub use future::ResponseFuture;
pub use layer::RetryLayer;

use crate::BoxError;
use crate::classify::{Classify, DefaultClassifier, FailureClass, Outcome};
use crate::deadline::{Deadline, Protocol};
use crate::request::{is_replay_safe, stamp_idempotency_key};
use body::{Collected, collect};

/// What to retry and how often.
#[derive(Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_backoff: Duration,
    max_backoff: Duration,
    max_replay_body: usize,
    retry_not_sent: bool,
    retry_rejected: bool,
    attempt_extensions: Option<CopyExtensions>,
    budget: Arc<RetryBudget>,
}

/// Copies the request extensions an attempt needs; see [`RetryPolicy::attempt_extensions`].
pub type CopyExtensions = fn(&http::Extensions, &mut http::Extensions);

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("base_backoff", &self.base_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_replay_body", &self.max_replay_body)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new(Arc::new(RetryBudget::default()))
    }
}

impl RetryPolicy {
    /// Defaults: 3 attempts, backoff 25 ms doubling up to 1 s, bodies up to 64 KiB replayed,
    /// NOT_SENT and REJECTED retried; `budget` shared with every other user of it.
    pub fn new(budget: Arc<RetryBudget>) -> Self {
        Self {
            max_attempts: 3,
            base_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            max_replay_body: 64 * 1024,
            retry_not_sent: true,
            retry_rejected: true,
            attempt_extensions: None,
            budget,
        }
    }

    /// Attempts in total, the first included (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Backoff before the first retry, doubling each retry up to `max`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_backoff = base;
        self.max_backoff = max.max(base);
        self
    }

    /// Largest request body buffered for replay.
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.max_replay_body = bytes;
        self
    }

    /// Whether NOT_SENT failures are retried (default true).
    pub fn retry_not_sent(mut self, yes: bool) -> Self {
        self.retry_not_sent = yes;
        self
    }

    /// Whether REJECTED failures are retried (default true).
    pub fn retry_rejected(mut self, yes: bool) -> Self {
        self.retry_rejected = yes;
        self
    }

    /// Which request extensions every attempt carries to the inner service. By default each
    /// attempt carries a clone of all of them. A stack whose inner services read only some of
    /// them can name those with a function that copies them: each attempt then carries only
    /// the copies, and the request's own extensions are kept for replay without being cloned
    /// (per call one map and one box per other extension less). The layer itself reads the
    /// request's own extensions ([`Idempotent`](crate::request::Idempotent), keys, deadline)
    /// either way.
    ///
    /// ```
    /// use keel_breaker::retry::RetryPolicy;
    ///
    /// /// The only extension the services below the retry layer read.
    /// #[derive(Clone, Copy)]
    /// struct RouteKey(u64);
    ///
    /// let policy = RetryPolicy::default().attempt_extensions(|from, to| {
    ///     if let Some(key) = from.get::<RouteKey>() {
    ///         to.insert(*key);
    ///     }
    /// });
    /// # drop(policy);
    /// ```
    pub fn attempt_extensions(mut self, copy: CopyExtensions) -> Self {
        self.attempt_extensions = Some(copy);
        self
    }

    /// The shared budget.
    pub fn budget(&self) -> &Arc<RetryBudget> {
        &self.budget
    }

    fn wants_retry(&self, outcome: Outcome, replay_safe: bool) -> bool {
        match outcome.retry_class() {
            Some(FailureClass::NotSent) => self.retry_not_sent,
            Some(FailureClass::Rejected) => self.retry_rejected,
            Some(FailureClass::Unknown) => replay_safe,
            None => false,
        }
    }

    /// Full-jitter backoff before retry number `retry` (1-based).
    fn backoff_for(&self, retry: u32) -> Duration {
        let exp = self.base_backoff.saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let ceiling = exp.min(self.max_backoff);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::random_range(0..nanos))
    }
}

/// Retries requests per a [`RetryPolicy`]; see the [module docs](self).
///
/// The inner service receives `http::Request<ReplayBody<B>>`.
#[derive(Clone)]
pub struct Retry<S, C = DefaultClassifier> {
    inner: S,
    policy: Arc<RetryPolicy>,
    classifier: C,
}

impl<S: fmt::Debug, C> fmt::Debug for Retry<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<S> Retry<S> {
    /// Wraps `inner` with `policy` and the default classifier.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self::with_classifier(inner, Arc::new(policy), DefaultClassifier)
    }
}

impl<S, C> Retry<S, C> {
    /// Wraps `inner` with `policy`, classifying with `classifier`.
    pub fn with_classifier(inner: S, policy: Arc<RetryPolicy>, classifier: C) -> Self {
        Self {
            inner,
            policy,
            classifier,
        }
    }
}

/// The deadline headers a [`Template`] left out.
#[derive(Default, Clone, Copy)]
struct Restamp {
    grpc: bool,
    rest: bool,
}

/// What a retry rebuilds each attempt from.
pub(crate) struct Template {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    /// The head's headers in order, a name once per value. Kept as pairs rather than a second
    /// `HeaderMap` (the first attempt is sent with the caller's map; only a retry rebuilds one
    /// from these): one allocation instead of two per call, and no hash index or links.
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The call's deadline, when the head carried a deadline header to re-stamp.
    deadline: Option<Deadline>,
    /// Which deadline headers a retry re-stamps with the time then left (their first values
    /// are not kept: they would be stale).
    restamp: Restamp,
    extensions: http::Extensions,
    data: Bytes,
    /// Boxed: request trailers are rare, and the template lives in every call's future.
    trailers: Option<Box<http::HeaderMap>>,
}

impl Template {
    /// Keeps what to replay of `parts` (whose body is `data` and `trailers`, buffered): a copy
    /// of the head, and the call's own extensions (`parts` is left with what an attempt carries,
    /// see [`attempt_extensions`]).
    fn new(
        parts: &mut http::request::Parts,
        copy: Option<CopyExtensions>,
        data: Bytes,
        trailers: Option<Box<http::HeaderMap>>,
        deadline: Option<Deadline>,
    ) -> Self {
        // The call's own extensions stay here; the first attempt gets what every attempt gets.
        let first = attempt_extensions(&parts.extensions, copy);
        let extensions = std::mem::replace(&mut parts.extensions, first);
        // One pass, no lookups: the deadline headers (re-stamped by a retry) are left out.
        // Sized for one of them when there is a deadline (a call without the header merely
        // grows the vector).
        let mut restamp = Restamp::default();
        let mut headers = Vec::with_capacity(
            parts
                .headers
                .len()
                .saturating_sub(usize::from(deadline.is_some())),
        );
        for (name, value) in &parts.headers {
            match deadline.and_then(|_| crate::deadline::stamped_by(name)) {
                Some(Protocol::Grpc) => restamp.grpc = true,
                Some(Protocol::Rest) => restamp.rest = true,
                _ => headers.push((name.clone(), value.clone())),
            }
        }
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers,
            deadline: deadline.filter(|_| restamp.grpc || restamp.rest),
            restamp,
            extensions,
            data,
            trailers,
        }
    }

    /// What one attempt carries of the call's extensions (`copy`: the policy's
    /// [`attempt_extensions`](RetryPolicy::attempt_extensions)).
    fn build<B>(
        &self,
        copy: Option<CopyExtensions>,
        deadline: Option<Deadline>,
    ) -> http::Request<ReplayBody<B>> {
        let mut req = http::Request::new(
            ReplayBody::buffered(self.data.clone(), self.trailers.clone()).with_deadline(deadline),
        );
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        let headers = req.headers_mut();
        headers.reserve(self.headers.len());
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        *req.extensions_mut() = attempt_extensions(&self.extensions, copy);
        if let Some(deadline) = self.deadline {
            if self.restamp.grpc {
                crate::deadline::stamp(req.headers_mut(), deadline, Protocol::Grpc);
            }
            if self.restamp.rest {
                crate::deadline::stamp(req.headers_mut(), deadline, Protocol::Rest);
            }
        }
        req
    }
}

/// What one attempt carries of the call's extensions `from`: what `copy` (the policy's
/// [`attempt_extensions`](RetryPolicy::attempt_extensions)) copies, else a clone of them all.
fn attempt_extensions(from: &http::Extensions, copy: Option<CopyExtensions>) -> http::Extensions {
    match copy {
        Some(copy) => {
            let mut attempt = http::Extensions::new();
            copy(from, &mut attempt);
            attempt
        }
        None => from.clone(),
    }
}

impl<S, C, B, ResB> Service<http::Request<B>> for Retry<S, C>
where
    S: Service<http::Request<ReplayBody<B>>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    C: Classify<http::Response<ResB>> + Clone,
    ResB: Body,
{
    type Response = http::Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future, B, C, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service that was made ready takes this call (its first attempt and every replay:
        // it may keep per-call state between attempts, e.g. the endpoint to avoid); a clone
        // stays here for the next call, to be made ready then.
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        let (mut parts, mut body) = req.into_parts();
        if let Err(invalid) = stamp_idempotency_key(&mut parts.headers, &parts.extensions) {
            return ResponseFuture::refused(Box::new(invalid));
        }
        let deadline = parts.extensions.get::<Deadline>().copied();
        self.policy.budget.deposit();
        if self.policy.max_attempts <= 1 {
            // Never retried: the body goes as it is, unbuffered.
            let body = ReplayBody::once(body).with_deadline(deadline);
            return ResponseFuture::once(service.call(http::Request::from_parts(parts, body)));
        }
        let (data, trailers) = match collect(&mut body, self.policy.max_replay_body) {
            Collected::Whole { data, trailers } => (data, trailers),
            partial => {
                let body = partial.into_body(body).with_deadline(deadline);
                return ResponseFuture::once(service.call(http::Request::from_parts(parts, body)));
            }
        };
        drop(body);
        let replay_safe = is_replay_safe(&parts.headers, &parts.extensions);
        let template = Template::new(
            &mut parts,
            self.policy.attempt_extensions,
            data.clone(),
            trailers.clone(),
            deadline,
        );
        let body = ReplayBody::buffered(data, trailers).with_deadline(deadline);
        let fut = service.call(http::Request::from_parts(parts, body));
        ResponseFuture::retrying(
            fut,
            future::Retrying {
                service,
                policy: Arc::clone(&self.policy),
                classifier: self.classifier.clone(),
                template,
                attempts: 1,
                replay_safe,
                deadline,
                budget_refused: false,
                maybe_executed: false,
            },
        )
    }
}

#[cfg(test)]
mod tests;
