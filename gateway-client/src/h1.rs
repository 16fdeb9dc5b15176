//! REST's connections to one endpoint: a pool of HTTP/1.1 keep-alive connections held directly
//! on hyper.
//!
//! A call takes an idle connection (the most recently used first) or dials a new one, sends its
//! request on it, and puts the connection back once the response body has been read to its end;
//! a response dropped before its end takes its connection with it (hyper closes it), so a
//! connection is only reused in a clean state. Compared with `hyper_util`'s pooled client this
//! skips the per-call pool-key hashing, the `Host` formatting and the task spawned per call to
//! wait for the connection to become idle again.
//!
//! An idle connection the server has closed is skipped; a request that found its connection
//! closed before anything was written is sent on another one (it was [`NotSent`]). A failed dial
//! is `NotSent` as well, so the retry layer may try another endpoint and the endpoint's breaker
//! counts it. Connections left idle longer than the pool's idle timeout are not reused (they are
//! closed by the next call that takes a connection), and at most its `max_idle` are kept ([`PoolConfig`]; `RestBuilder::pool_idle_timeout`,
//! `RestBuilder::pool_max_idle`). When the endpoint leaves discovery the pool is retired: idle
//! connections close at once, busy ones when their call completes, and nothing is dialled again.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use keel_breaker::BoxError;
use keel_breaker::classify::NotSent;
use keel_core::ServiceInstance;
use tokio::time::Instant;
use tower_service::Service;

use crate::conn::{
    CallDeadline, Https, Origin, Retired, before_send, connect_io, dial_within, drive, origin,
    restamp_after_wait,
};
use crate::discovery::Retire;

/// How an endpoint's pool keeps idle connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolConfig {
    /// An idle connection is not reused after this long.
    pub(crate) idle_timeout: Duration,
    /// At most this many idle connections are kept.
    pub(crate) max_idle: usize,
}

impl Default for PoolConfig {
    /// hyper-util's defaults: 90 s, and 256 idle connections per endpoint.
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(90),
            max_idle: 256,
        }
    }
}

/// One endpoint's HTTP/1.1 connections; clones share them.
pub(crate) struct RestConn<B>(Arc<Pool<B>>);

impl<B> Clone for RestConn<B> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

struct Pool<B> {
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    /// The `Host` header of every request (the port only when it is not the scheme's default).
    host: HeaderValue,
    /// The base URL's path (gateway mode), without a trailing `/`; empty when none.
    prefix: Arc<str>,
    connector: Https,
    connect_timeout: Duration,
    config: PoolConfig,
    /// Idle connections, the most recently used last; `None` once retired.
    idle: Mutex<Option<Vec<Idle<B>>>>,
    /// Set when the endpoint left discovery (wakes the calls still dialling it).
    retired: Retired,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<B> fmt::Debug for RestConn<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestConn")
            .field("target", &self.0.target)
            .finish_non_exhaustive()
    }
}

impl<B> RestConn<B>
where
    B: http_body::Body<Data = Bytes> + CallDeadline + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// The connections to `instance`, dialled as calls need them. `prefix` is prepended to every
    /// request path (a gateway's base path; empty for none).
    pub(crate) fn new(
        instance: &ServiceInstance,
        connector: Https,
        connect_timeout: Duration,
        prefix: Arc<str>,
        config: PoolConfig,
    ) -> Result<Self, BoxError> {
        let Origin {
            scheme,
            authority,
            target,
        } = origin(instance)?;
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => HeaderValue::from_str(authority.as_str())?,
            _ => HeaderValue::from_str(authority.host())?,
        };
        Ok(Self(Arc::new(Pool {
            target,
            host,
            prefix,
            connector,
            connect_timeout,
            config,
            idle: Mutex::new(Some(Vec::new())),
            retired: Retired::default(),
        })))
    }

    /// The most recently used idle connection that is still open and not too old; an error
    /// once the pool is retired. Connections idle for the idle timeout are closed here, the
    /// least recently used included: a pool in use at a lower concurrency than an earlier burst
    /// does not keep the burst's connections open on the server for ever.
    fn checkout(&self) -> Result<Option<SendRequest<B>>, BoxError> {
        let mut idle = self.0.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(idle) = idle.as_mut() else {
            return Err(not_sent(format!("{} left discovery", self.0.target)));
        };
        let now = Instant::now();
        let timeout = self.0.config.idle_timeout;
        // Oldest first (each was pushed when it went idle): the expired ones are a prefix.
        let expired = idle.partition_point(|c| now.saturating_duration_since(c.since) >= timeout);
        idle.drain(..expired);
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() {
                return Ok(Some(conn.sender));
            }
        }
        Ok(None)
    }

    /// TCP (and TLS), then the HTTP/1.1 handshake; the connection's task is spawned here.
    async fn dial(&self) -> Result<SendRequest<B>, BoxError> {
        let dial = async {
            let io = connect_io(&self.0.connector, &self.0.target).await?;
            let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
            drive(&self.0.target, "HTTP/1.1", connection);
            Ok::<_, BoxError>(sender)
        };
        dial_within(&self.0.target, self.0.connect_timeout, dial)
            .await
            .map_err(not_sent)
    }

    /// The request's URI in origin form (`/path?query`, behind the gateway prefix if any), and
    /// its `Host` header unless the caller set one.
    fn prepare(&self, req: &mut http::Request<B>) -> Result<(), BoxError> {
        let path = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        if !self.0.prefix.is_empty() {
            let joined = format!("{}{}", self.0.prefix, path);
            *req.uri_mut() = Uri::from(PathAndQuery::from_maybe_shared(Bytes::from(joined))?);
        } else if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }
        if let http::header::Entry::Vacant(host) = req.headers_mut().entry(HOST) {
            host.insert(self.0.host.clone());
        }
        Ok(())
    }

    async fn send(self, mut req: http::Request<B>) -> Result<http::Response<Body<B>>, BoxError> {
        self.prepare(&mut req)?;
        loop {
            let (mut sender, reused) = match self.checkout()? {
                Some(sender) => (sender, true),
                // Boxed: the dial's future (TLS and handshake, kilobytes) would otherwise be part
                // of every call's, which is boxed and moved.
                None => {
                    // Given up (not sent) when the call's deadline passes or the endpoint
                    // leaves discovery first.
                    let deadline = req.body().call_deadline();
                    let dial = Box::pin(self.dial());
                    let sender =
                        before_send(deadline, &self.0.retired, &self.0.target, dial).await?;
                    restamp_after_wait(&mut req)?;
                    (sender, false)
                }
            };
            if sender.ready().await.is_err() {
                if reused {
                    // Closed while idle: nothing was sent on it; take another.
                    continue;
                }
                return Err(not_sent(format!(
                    "the new connection to {} closed before the request was sent",
                    self.0.target
                )));
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let slot = Some(Slot {
                        sender,
                        pool: Arc::clone(&self.0),
                    });
                    return Ok(response.map(|inner| Body { inner, slot }));
                }
                Err(mut error) => match error.take_message() {
                    // Not written: the connection closed first. Another one may take it.
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(Box::new(NotSent::new(error.into_error()))),
                    None => return Err(Box::new(error.into_error())),
                },
            }
        }
    }
}

impl<B> Retire for RestConn<B> {
    /// The endpoint left discovery: close the idle connections, keep none that comes back,
    /// dial no more.
    fn retire(&self) {
        let idle = self
            .0
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(idle);
        self.0.retired.set();
    }
}

/// Nothing was sent: retried elsewhere, counted by the breaker; `UNAVAILABLE` (502) to the
/// caller.
fn not_sent(message: String) -> BoxError {
    Box::new(NotSent::new(message))
}

/// Response future of [`RestConn`].
pub(crate) type RestFuture<B> =
    Pin<Box<dyn Future<Output = Result<http::Response<Body<B>>, BoxError>> + Send>>;

impl<B> Service<http::Request<B>> for RestConn<B>
where
    B: http_body::Body<Data = Bytes> + CallDeadline + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body<B>>;
    type Error = BoxError;
    type Future = RestFuture<B>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The call dials when needed; its failure is the call's (and the breaker's) outcome.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// The connection a response came on, going back to its pool at the end of the body.
struct Slot<B> {
    sender: SendRequest<B>,
    pool: Arc<Pool<B>>,
}

impl<B> Slot<B> {
    fn put_back(self) {
        let mut idle = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(idle) = idle.as_mut()
            && idle.len() < self.pool.config.max_idle
        {
            idle.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A REST response body: hyper's, returning its connection to the pool once read to the end.
    pub(crate) struct Body<B> {
        #[pin]
        inner: Incoming,
        slot: Option<Slot<B>>,
    }
}

impl<B> fmt::Debug for Body<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body").finish_non_exhaustive()
    }
}

impl<B> http_body::Body for Body<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !this.inner.is_end_stream() => {}
            Some(Err(_)) => drop(this.slot.take()),
            Some(Ok(_)) | None => {
                if let Some(slot) = this.slot.take() {
                    slot.put_back();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
