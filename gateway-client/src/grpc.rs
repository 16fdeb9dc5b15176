//! [`GrpcChannel`]: a drop-in channel for tonic-generated clients.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::body::Incoming;
use keel_breaker::BoxError;
use keel_breaker::bulkhead::Bulkhead;
use keel_breaker::classify::{DefaultClassifier, GRPC_STATUS, grpc_status};
use keel_breaker::deadline::{DeadlineLayer, DeadlineService};
use keel_breaker::retry::{ReplayBody, Retry};
use keel_core::{Endpoint, ServiceInstance};
use keel_registry::Registry;
use opentelemetry::KeyValue;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::balance::Set;
use crate::builder::common_builder_methods;
use crate::conn::{Alpn, GrpcConn, Wire, https_connector};
use crate::discovery::{Connect, Discovery, Factory, Members};
use crate::error::Error;
use crate::lb::Balancer;
use crate::metrics::{ClientMetrics, MethodMetrics};
use crate::options::{Options, Shared, add_defaults, budget_refused};
use crate::span::{self, CallSpan};

type Bal = Balancer<GrpcConn, Body, Wire>;
type Stack = Bulkhead<DeadlineService<Retry<Bal>>>;
type StackFuture = keel_breaker::bulkhead::ResponseFuture<
    keel_breaker::deadline::ResponseFuture<
        keel_breaker::retry::ResponseFuture<
            Bal,
            <Bal as Service<http::Request<ReplayBody<Body>>>>::Future,
            Body,
            DefaultClassifier,
            keel_breaker::breaker::ResponseBody<Incoming>,
        >,
    >,
>;

fn wire(body: ReplayBody<Body>) -> Wire {
    Wire::new(body)
}

/// The body of a [`GrpcChannel`] response: tonic's body, through which the endpoint's breaker
/// sees the `grpc-status` that arrives in the trailers, and which fails with
/// `DEADLINE_EXCEEDED` if the provider stops sending before the body ends (not boxed again per
/// call).
pub type ResponseBody = http_body_util::combinators::MapErr<
    keel_breaker::deadline::ResponseBody<keel_breaker::breaker::ResponseBody<Incoming>>,
    fn(BoxError) -> tonic::Status,
>;

/// A body error as tonic reports it; the deadline passing while the body is read is
/// `DEADLINE_EXCEEDED` (tonic would call an error it does not know `UNKNOWN`).
fn body_status(error: BoxError) -> tonic::Status {
    if error.is::<keel_breaker::deadline::DeadlineExceeded>() {
        Error::from_box(error).into_status()
    } else {
        tonic::Status::from_error(error)
    }
}

/// A gRPC channel over every instance of a service: give it to a tonic-generated client
/// (`EchoClient::new(channel)`). Cheap to clone; clones share connections, balancer state,
/// breakers, retry budget and metrics.
///
/// Per call, outermost first: the bulkhead when configured
/// ([`max_concurrent`](GrpcBuilder::max_concurrent)) → propagation (`traceparent`, `tracestate`, `baggage` from the
/// current OpenTelemetry context, `x-request-id`) and a client span and RED metrics → deadline
/// (`grpc-timeout`) → budgeted, outcome-aware retry (a retry goes to another endpoint when
/// there is one) → balancer → per-endpoint circuit breaker (an open one ejects the endpoint)
/// → the endpoint's HTTP/2 connection.
///
/// Errors reach the tonic client as a [`tonic::Status`] with the right code; the client-side
/// cause is in its source ([`Error::from_status`]).
#[derive(Clone)]
pub struct GrpcChannel {
    stack: Stack,
    shared: Arc<Shared<GrpcConn>>,
    /// The metrics of the method this clone called last: a clone that keeps calling one
    /// method skips the shared map's lock and lookup.
    last_method: Option<Arc<MethodMetrics>>,
}

impl fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("service", &self.shared.service.as_str())
            .finish_non_exhaustive()
    }
}

/// Builds a [`GrpcChannel`]; see [`GrpcChannel::builder`].
#[derive(Debug)]
pub struct GrpcBuilder {
    options: Options,
    keep_alive: Option<KeepAlive>,
}

/// HTTP/2 keep-alive of a [`GrpcChannel`]'s connections; see [`GrpcBuilder::keep_alive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// A PING goes out after this long without a frame from the provider while calls are in
    /// flight.
    pub interval: Duration,
    /// The connection is closed (its calls fail) when the PING is not answered within this.
    pub timeout: Duration,
}

impl Default for KeepAlive {
    /// A PING after 5 minutes of silence, answered within 20 s. Not more often: grpc-java and
    /// grpc-go servers by default answer a client that pings more often than every 5 minutes
    /// with `GOAWAY` (`too_many_pings`), failing every call on the connection.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            timeout: Duration::from_secs(20),
        }
    }
}

impl GrpcChannel {
    /// A builder for a channel to `service`.
    pub fn builder(service: &str) -> GrpcBuilder {
        GrpcBuilder {
            options: Options::new(service),
            keep_alive: Some(KeepAlive::default()),
        }
    }

    /// The RED metrics of this channel (per gRPC method path).
    pub fn metrics(&self) -> &ClientMetrics {
        &self.shared.metrics
    }

    /// The endpoints currently in the balancer: `(instance id, calls routed to it, breaker
    /// state)`.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        endpoint_info(&self.shared.set)
    }

    /// Waits until discovery has produced at least one endpoint, or `timeout` passes.
    ///
    /// # Errors
    /// An error for which [`Error::is_no_endpoints`] holds, after `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<(), Error> {
        wait_ready(&self.shared.set, timeout).await
    }
}

/// What [`GrpcChannel::endpoints`] reports about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The instance id.
    pub id: String,
    /// Where it is.
    pub endpoint: Endpoint,
    /// Attempts routed to it so far.
    pub calls: u64,
    /// Its breaker's state.
    pub state: keel_breaker::breaker::State,
}

pub(crate) fn endpoint_info<C>(set: &Set<C>) -> Vec<EndpointInfo> {
    set.snapshot()
        .endpoints
        .iter()
        .map(|e| {
            let instance = e.instance();
            EndpointInfo {
                id: instance.id.clone(),
                endpoint: instance.endpoint.clone(),
                calls: e.calls.load(std::sync::atomic::Ordering::Relaxed),
                state: e.breaker.state(),
            }
        })
        .collect()
}

pub(crate) async fn wait_ready<C>(set: &Set<C>, timeout: Duration) -> Result<(), Error> {
    let mut rx = set.changed.subscribe();
    let wait = async {
        loop {
            if !set.snapshot().endpoints.is_empty() {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| Error::from_box(Error::no_endpoints()))
}

/// Whether a fixed URL may carry a path (a REST base URL's prefix) or must be an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UrlPath {
    /// `scheme://host[:port][/]` only.
    Origin,
    /// A path is allowed (it becomes the prefix of every request path).
    Prefix,
}

/// Parses `http://host:port` / `https://host:port` into an instance (id = the URL). What the
/// client would not send is refused rather than dropped: a query, credentials in the URL
/// (`user:password@`; send them as a default header), and a path where only an origin is
/// taken — a gateway routing by path would otherwise get every request at the wrong route. An
/// `https` URL needs the client's TLS configuration (`has_tls`), which says what CA to trust.
pub(crate) fn instance_from_url(
    service: &str,
    url: &str,
    path: UrlPath,
    has_tls: bool,
) -> Result<ServiceInstance, Error> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::config(format!("invalid URL {url:?}: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(Error::config(format!("URL {url:?} must be http or https"))),
    };
    let host = uri
        .host()
        .ok_or_else(|| Error::config(format!("URL {url:?} has no host")))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(Error::config(format!(
            "URL {url:?} carries credentials; send them as a default header"
        )));
    }
    if uri.query().is_some() {
        return Err(Error::config(format!(
            "URL {url:?} has a query, which would not be sent"
        )));
    }
    if path == UrlPath::Origin && !matches!(uri.path(), "" | "/") {
        return Err(Error::config(format!(
            "URL {url:?} has a path, which would not be sent (only scheme, host and port are \
             taken here; a REST client takes a path prefix through base_url)"
        )));
    }
    if tls && !has_tls {
        return Err(Error::config(format!(
            "URL {url:?} is https but the client has no TLS configuration saying which CA to \
             trust (tls: a CA's PEM, or TlsConfig::system_roots for a public endpoint)"
        )));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(ServiceInstance::new(service, url, Endpoint::new(host, port)).with_tls(tls))
}

impl GrpcBuilder {
    common_builder_methods!();

    /// HTTP/2 keep-alive while calls are in flight (default [`KeepAlive::default`]: 5 min,
    /// 20 s); `None`, or an interval of zero, turns it off; a zero timeout is a configuration
    /// error. It finds a provider that vanished without closing its connections (a host
    /// powered off, a network partition): the calls in flight on it fail (counting against it,
    /// as an `UNKNOWN` outcome) instead of waiting for TCP to give up, some fifteen minutes on
    /// Linux, and the connection is dialled afresh. Mind the provider's limit on PINGs (see
    /// [`KeepAlive::default`]) before shortening the interval. Durations are capped at
    /// [`MAX_TIMEOUT`](keel_breaker::deadline::MAX_TIMEOUT) (a century), so `Duration::MAX`
    /// means "never".
    pub fn keep_alive(mut self, keep_alive: Option<KeepAlive>) -> Self {
        // hyper adds both to the current time unchecked (a panic in the connection's task).
        let cap = keel_breaker::deadline::MAX_TIMEOUT;
        self.keep_alive = keep_alive
            .filter(|k| !k.interval.is_zero())
            .map(|k| KeepAlive {
                interval: k.interval.min(cap),
                timeout: k.timeout.min(cap),
            });
        self
    }

    fn connector(&self) -> Result<Connect<GrpcConn>, Error> {
        if self.keep_alive.is_some_and(|k| k.timeout.is_zero()) {
            return Err(Error::config(
                "keep-alive timeout must be more than zero (it would fail every PING)",
            ));
        }
        let https = https_connector(
            self.options.tls.as_ref(),
            self.options.connect_timeout,
            self.options.tcp_keepalive,
            Alpn::H2,
        )?;
        let has_tls = self.options.tls.is_some();
        let connect_timeout = self.options.connect_timeout;
        let keep_alive = self.keep_alive;
        Ok(Arc::new(move |instance: &ServiceInstance| {
            if instance.tls && !has_tls {
                return Err(
                    "the instance serves TLS but the client has no TLS configuration".into(),
                );
            }
            GrpcConn::new(instance, https.clone(), connect_timeout, keep_alive)
        }))
    }

    fn finish(
        self,
        closed: Option<oneshot::Sender<()>>,
    ) -> Result<(GrpcChannel, Members<GrpcConn>), Error> {
        let set = Arc::new(Set::new(self.options.balance.clone()));
        let factory = Factory {
            connect: self.connector()?,
            breaker: self.options.breaker.clone(),
        };
        let members = Members::new(Arc::clone(&set), factory);
        let deadline = match self.options.timeout {
            Some(t) => DeadlineLayer::new(t),
            None => DeadlineLayer::propagate_only(),
        };
        let stack = self.options.bulkhead(deadline.layer(Retry::new(
            Balancer::new(Arc::clone(&set), wire as fn(ReplayBody<Body>) -> Wire),
            self.options.policy(),
        )));
        let shared = Arc::new(Shared::new(&self.options, set, closed));
        Ok((
            GrpcChannel {
                stack,
                shared,
                last_method: None,
            },
            members,
        ))
    }

    /// A channel over fixed endpoints (`http://host:port` or `https://host:port`), e.g. an API
    /// gateway (with its API key as a [`default_header`](Self::default_header)) or a local
    /// development set-up.
    ///
    /// Nothing is dialled or spawned here: the first call to an endpoint opens its HTTP/2
    /// connection (and spawns the connection's task on the caller's tokio runtime).
    ///
    /// # Errors
    /// [`Error::is_config`] for a malformed URL, breaker or TLS configuration; for a URL with a
    /// path, a query or credentials (`user:password@`), none of which would be sent; and for
    /// an `https` URL without a [`tls`](Self::tls) configuration (Keel trusts no CA by
    /// default).
    pub fn endpoints<I, S>(self, urls: I) -> Result<GrpcChannel, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.options.validate()?;
        let service = self.options.service.clone();
        let has_tls = self.options.tls.is_some();
        let instances = urls
            .into_iter()
            .map(|u| instance_from_url(&service, u.as_ref(), UrlPath::Origin, has_tls))
            .collect::<Result<Vec<_>, _>>()?;
        let (channel, mut members) = self.finish(None)?;
        members.apply(keel_registry::Change::Reset(instances));
        members.publish();
        Ok(channel)
    }

    /// A channel over the instances `registry` discovers for the service, and the
    /// [`Discovery`] future that keeps it up to date: spawn it (`tokio::spawn(discovery)`).
    /// The discovery task is not spawned here, but the registry's `watch` may start background
    /// work of its own: a [`keel_registry::ZkRegistry`] spawns a watch task for a service it
    /// does not watch yet (see [`Registry::watch`]).
    ///
    /// # Errors
    /// [`Error::is_config`] when the breaker configuration is invalid or the registry refuses
    /// the watch.
    pub fn discover(self, registry: &dyn Registry) -> Result<(GrpcChannel, Discovery), Error> {
        self.options.validate()?;
        let watch = registry
            .watch(&self.options.service)
            .map_err(|e| Error::config(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        let (channel, members) = self.finish(Some(tx))?;
        Ok((channel, Discovery::new(members, watch, rx)))
    }

    /// [`discover`](Self::discover), then spawns the discovery task on the current tokio
    /// runtime (it ends when the last clone of the channel is dropped) and waits up to
    /// `wait` for the first endpoint.
    ///
    /// # Errors
    /// As [`discover`](Self::discover); [`Error::is_no_endpoints`] when no instance appeared
    /// in time (the channel is then dropped; discovery stops).
    pub async fn connect(
        self,
        registry: &dyn Registry,
        wait: Duration,
    ) -> Result<GrpcChannel, Error> {
        let (channel, discovery) = self.discover(registry)?;
        tokio::spawn(discovery);
        channel.ready(wait).await?;
        Ok(channel)
    }
}

impl Service<http::Request<Body>> for GrpcChannel {
    type Response = http::Response<ResponseBody>;
    type Error = tonic::Status;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.stack
            .poll_ready(cx)
            .map_err(|e| Error::from_box(e).into_status())
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let shared = &self.shared;
        let method = match &self.last_method {
            Some(last) if last.name.as_str() == parts.uri.path() => Arc::clone(last),
            _ => {
                let method = shared.metrics.method(parts.uri.path());
                self.last_method = Some(Arc::clone(&method));
                method
            }
        };
        add_defaults(&shared.default_headers, &mut parts.headers);
        let span = shared.begin(&mut parts, "grpc.client", || {
            [
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", span::shared(&shared.service)),
                KeyValue::new("rpc.method", span::shared(&method.name)),
            ]
        });
        let fut = self.stack.call(http::Request::from_parts(parts, body));
        ResponseFuture {
            fut,
            span: Some(span),
            start: Instant::now(),
            method,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A response to a gRPC call that is not one (an HTTP error without `grpc-status`, e.g. from a
/// proxy in between) gets the gRPC status Keel's classifier gives it, instead of the one tonic
/// would infer from the HTTP status (`UNAVAILABLE` for 502, 503, 504): `UNAVAILABLE` only for a
/// refusal (429, 503 with `Retry-After`), else `UNKNOWN` — a proxy answers 502 or 503 also when
/// its upstream broke after it forwarded the call, so the call may have run, and a service
/// handing the status back must not tell its own callers "not executed".
#[cold]
fn not_grpc<B>(response: &mut http::Response<B>) {
    let refused =
        keel_breaker::classify::classify_http_response(response.status(), response.headers())
            == keel_breaker::classify::Outcome::Failure(
                keel_breaker::classify::FailureClass::Rejected,
            );
    let code = if refused {
        tonic::Code::Unavailable
    } else {
        tonic::Code::Unknown
    };
    let message = format!(
        "the provider answered HTTP {} without a gRPC status",
        response.status().as_u16()
    );
    let headers = response.headers_mut();
    headers.insert(GRPC_STATUS, http::HeaderValue::from(code as i32));
    if let Ok(message) = http::HeaderValue::from_str(&message) {
        headers.insert(http::HeaderName::from_static("grpc-message"), message);
    }
}

pin_project! {
    /// Response future of [`GrpcChannel`].
    pub struct ResponseFuture {
        #[pin]
        fut: StackFuture,
        span: Option<CallSpan>,
        start: Instant,
        method: Arc<MethodMetrics>,
        shared: Arc<Shared<GrpcConn>>,
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ResponseBody>, tonic::Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = ready!(this.fut.as_mut().poll(cx));
        let refused = budget_refused(this.fut.as_ref().get_ref());
        let elapsed = this.start.elapsed();
        let span = this.span.take();
        Poll::Ready(match result {
            Ok(mut response) => {
                if response.status() != http::StatusCode::OK
                    && !response.headers().contains_key(GRPC_STATUS)
                {
                    not_grpc(&mut response);
                }
                let failed = response
                    .headers()
                    .get(GRPC_STATUS)
                    .is_some_and(|s| s.as_bytes() != b"0");
                this.method.record(elapsed, failed);
                match span {
                    Some(span) if failed => {
                        let code =
                            grpc_status(response.headers()).unwrap_or(tonic::Code::Unknown) as i64;
                        span.fail_with(format!("grpc-status {code}"), "rpc.grpc.status_code", code);
                    }
                    Some(span) => span.succeed(),
                    None => {}
                }
                if failed
                    && refused
                    && let Some(status) = tonic::Status::from_header_map(response.headers())
                {
                    let error = Error::budget_exhausted(Box::new(status));
                    tracing::debug!(%error, "grpc call failed");
                    return Poll::Ready(Err(error.into_status()));
                }
                Ok(response
                    .map(|body| http_body_util::BodyExt::map_err(body, body_status as fn(_) -> _)))
            }
            Err(error) => {
                this.method.record(elapsed, true);
                let error = this.shared.failure(error, refused);
                tracing::debug!(%error, "grpc call failed");
                if let Some(span) = span {
                    span.fail(error.to_string());
                }
                Err(error.into_status())
            }
        })
    }
}
