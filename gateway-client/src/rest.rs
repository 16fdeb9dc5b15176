//! [`RestClient`]: JSON over HTTP with the same balancing and resilience as gRPC.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full};
use keel_breaker::bulkhead::Bulkhead;
use keel_breaker::deadline::{Deadline, DeadlineLayer, DeadlineService, Protocol};
use keel_breaker::request::{IdempotencyKey, Idempotent};
use keel_breaker::retry::{ReplayBody, Retry};
use keel_core::ServiceInstance;
use keel_registry::Registry;
use opentelemetry::KeyValue;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::balance::{HashKey, Set};
use crate::builder::common_builder_methods;
use crate::conn::{Alpn, https_connector};
use crate::discovery::{Connect, Discovery, Factory, Members};
use crate::error::Error;
use crate::grpc::{EndpointInfo, UrlPath, endpoint_info, instance_from_url, wait_ready};
use crate::h1::{PoolConfig, RestConn};
use crate::lb::Balancer;
use crate::metrics::{ClientMetrics, MethodMetrics};
use crate::options::{Options, Shared, add_defaults, budget_refused, header_pair};
use crate::span;

type Wire = ReplayBody<Full<Bytes>>;

/// The connections to one REST endpoint.
pub(crate) type RestConnection = RestConn<Wire>;

/// The method as a span attribute value (static for the standard methods).
fn method_value(method: &Method) -> opentelemetry::Value {
    let name = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => return opentelemetry::Value::from(method.to_string()),
    };
    opentelemetry::Value::from(name)
}

type Bal = Balancer<RestConnection, Full<Bytes>, Wire>;
type Stack = Bulkhead<DeadlineService<Retry<Bal>>>;

fn wire(body: Wire) -> Wire {
    body
}

/// A JSON-over-HTTP client over every instance of a service (or one base URL, e.g. an API
/// gateway). Cheap to clone. Same stack as [`GrpcChannel`](crate::GrpcChannel): bulkhead (when
/// configured) → propagation,
/// span and metrics → deadline (`x-keel-deadline`) → budgeted retry → balancer →
/// per-endpoint breaker → pooled connection.
///
/// A non-2xx response is an [`Error`] with [`Error::is_status`], its status and its body.
#[derive(Clone)]
pub struct RestClient {
    stack: Stack,
    shared: Arc<Shared<RestConnection>>,
    max_body: usize,
}

impl fmt::Debug for RestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestClient")
            .field("service", &self.shared.service.as_str())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RestClient`]; see [`RestClient::builder`].
#[derive(Debug)]
pub struct RestBuilder {
    options: Options,
    pool: PoolConfig,
    max_body: usize,
}

/// The default of [`RestBuilder::max_response_body`]: 16 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 16 << 20;

impl RestBuilder {
    common_builder_methods!();

    /// An idle keep-alive connection is not reused after `timeout` (default 90 s); zero: never
    /// reused, a connection per call.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool.idle_timeout = timeout;
        self
    }

    /// The largest response body read into memory, in bytes (default
    /// [`DEFAULT_MAX_RESPONSE_BODY`], 16 MiB): a call whose response is larger fails with
    /// [`Error::is_decode`] once that much has arrived, instead of a provider's endless or huge
    /// body exhausting the caller's memory. A non-2xx response that large fails with its
    /// status, as any other, and an empty [`Error::body`].
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// At most `max` idle keep-alive connections are kept per endpoint (default 256); the
    /// connection of a call that ends while as many are idle is closed.
    pub fn pool_max_idle(mut self, max: usize) -> Self {
        self.pool.max_idle = max;
        self
    }

    fn connector(&self, prefix: &str) -> Result<Connect<RestConnection>, Error> {
        let https = https_connector(
            self.options.tls.as_ref(),
            self.options.connect_timeout,
            self.options.tcp_keepalive,
            Alpn::Http1,
        )?;
        let connect_timeout = self.options.connect_timeout;
        let pool = self.pool;
        let prefix: Arc<str> = Arc::from(prefix.trim_end_matches('/'));
        let has_tls = self.options.tls.is_some();
        Ok(Arc::new(move |instance: &ServiceInstance| {
            if instance.tls && !has_tls {
                // Skipped (with a warning) like gRPC's: every dial would fail its handshake.
                return Err(
                    "the instance serves TLS but the client has no TLS configuration".into(),
                );
            }
            RestConn::new(
                instance,
                https.clone(),
                connect_timeout,
                Arc::clone(&prefix),
                pool,
            )
        }))
    }

    fn finish(
        self,
        prefix: &str,
        closed: Option<oneshot::Sender<()>>,
    ) -> Result<(RestClient, Members<RestConnection>), Error> {
        self.options.validate()?;
        let connect = self.connector(prefix)?;
        let set = Arc::new(Set::new(self.options.balance.clone()));
        let factory = Factory {
            connect,
            breaker: self.options.breaker.clone(),
        };
        let members = Members::new(Arc::clone(&set), factory);
        let deadline = match self.options.timeout {
            Some(t) => DeadlineLayer::new(t),
            None => DeadlineLayer::propagate_only(),
        }
        .protocol(Protocol::Rest);
        let stack = self.options.bulkhead(deadline.layer(Retry::new(
            Balancer::new(Arc::clone(&set), wire as fn(Wire) -> Wire),
            self.options.policy(),
        )));
        let shared = Arc::new(Shared::new(&self.options, set, closed));
        let client = RestClient {
            stack,
            shared,
            max_body: self.max_body,
        };
        Ok((client, members))
    }

    /// A client calling through one base URL (`https://gateway.example.com/api/v1`): request
    /// paths are appended to its path. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::is_config`] for a malformed URL, header, CA or breaker configuration; for a URL
    /// with a query or credentials (`user:password@`), which would not be sent; and for an
    /// `https` URL without a [`tls`](Self::tls) configuration (Keel trusts no CA by default).
    pub fn base_url(self, url: &str) -> Result<RestClient, Error> {
        let has_tls = self.options.tls.is_some();
        let instance = instance_from_url(&self.options.service, url, UrlPath::Prefix, has_tls)?;
        let prefix = url
            .parse::<http::Uri>()
            .map(|u| u.path().to_owned())
            .unwrap_or_default();
        let (client, mut members) = self.finish(&prefix, None)?;
        members.apply(keel_registry::Change::Reset(vec![instance]));
        members.publish();
        Ok(client)
    }

    /// A client balancing over fixed endpoints (`http://host:port`, `https://host:port`).
    ///
    /// # Errors
    /// As [`base_url`](Self::base_url), and for a URL with a path: here only scheme, host and
    /// port are taken (a path prefix goes through [`base_url`](Self::base_url)).
    pub fn endpoints<I, S>(self, urls: I) -> Result<RestClient, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let service = self.options.service.clone();
        let has_tls = self.options.tls.is_some();
        let instances = urls
            .into_iter()
            .map(|u| instance_from_url(&service, u.as_ref(), UrlPath::Origin, has_tls))
            .collect::<Result<Vec<_>, _>>()?;
        let (client, mut members) = self.finish("", None)?;
        members.apply(keel_registry::Change::Reset(instances));
        members.publish();
        Ok(client)
    }

    /// A client over the instances `registry` discovers, and the [`Discovery`] future to spawn.
    ///
    /// # Errors
    /// As [`base_url`](Self::base_url), or the registry refuses the watch.
    pub fn discover(self, registry: &dyn Registry) -> Result<(RestClient, Discovery), Error> {
        let watch = registry
            .watch(&self.options.service)
            .map_err(|e| Error::config(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        let (client, members) = self.finish("", Some(tx))?;
        Ok((client, Discovery::new(members, watch, rx)))
    }

    /// [`discover`](Self::discover), spawn the discovery task on the current runtime, and wait
    /// up to `wait` for the first endpoint.
    ///
    /// # Errors
    /// As [`discover`](Self::discover); [`Error::is_no_endpoints`] when none appeared in time.
    pub async fn connect(
        self,
        registry: &dyn Registry,
        wait: Duration,
    ) -> Result<RestClient, Error> {
        let (client, discovery) = self.discover(registry)?;
        tokio::spawn(discovery);
        wait_ready(&client.shared.set, wait).await?;
        Ok(client)
    }
}

impl RestClient {
    /// A builder for a client of `service`.
    pub fn builder(service: &str) -> RestBuilder {
        RestBuilder {
            options: Options::new(service),
            pool: PoolConfig::default(),
            max_body: DEFAULT_MAX_RESPONSE_BODY,
        }
    }

    /// The RED metrics of this client (per `METHOD /path`, with segments holding digits
    /// replaced by `{id}` unless the call names its [`route`](RestRequest::route)).
    pub fn metrics(&self) -> &ClientMetrics {
        &self.shared.metrics
    }

    /// The endpoints currently in the balancer.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        endpoint_info(&self.shared.set)
    }

    /// A request to build and send.
    pub fn request(&self, method: Method, path: &str) -> RestRequest {
        RestRequest {
            client: self.clone(),
            method,
            path: http::uri::PathAndQuery::from_maybe_shared(keel_core::header::shared_bytes(
                path.as_bytes(),
            ))
            .map_err(|e| format!("invalid path {path:?}: {e}")),
            headers: Ok(HeaderMap::new()),
            json: false,
            body: Ok(Bytes::new()),
            extensions: http::Extensions::new(),
            route: None,
        }
    }

    /// `GET path`, decoding a JSON response.
    ///
    /// # Errors
    /// See [`RestRequest::send`]; [`Error::is_decode`] for a body that is not the JSON of `T`.
    pub fn get<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> impl Future<Output = Result<T, Error>> + Send + use<T> {
        self.request(Method::GET, path).send_json()
    }

    /// `POST path` with a JSON body, decoding a JSON response. Sent again (to another endpoint)
    /// only when it certainly did not execute: not sent, or refused with 429 or a 503 with
    /// `Retry-After`; not after an unknown outcome (a reset, a 500, a bare 503) unless marked
    /// (use [`request`](Self::request) and [`RestRequest::idempotency_key`]).
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> impl Future<Output = Result<T, Error>> + Send + use<B, T> {
        self.request(Method::POST, path).json(body).send_json()
    }

    /// `PUT path` with a JSON body (idempotent by HTTP semantics), decoding a JSON response.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> impl Future<Output = Result<T, Error>> + Send + use<B, T> {
        self.request(Method::PUT, path)
            .json(body)
            .idempotent()
            .send_json()
    }

    /// `DELETE path` (idempotent by HTTP semantics); the response body is returned raw.
    ///
    /// # Errors
    /// See [`RestRequest::send`].
    pub fn delete(&self, path: &str) -> impl Future<Output = Result<Bytes, Error>> + Send + use<> {
        self.request(Method::DELETE, path)
            .idempotent()
            .exchange(|_, body| Ok(body))
    }
}

/// One REST call being built; see [`RestClient::request`].
#[derive(Debug)]
pub struct RestRequest {
    client: RestClient,
    method: Method,
    path: Result<http::uri::PathAndQuery, String>,
    /// The call's own headers, or why one of them was refused.
    headers: Result<HeaderMap, Error>,
    /// The body is JSON: `content-type: application/json` unless the headers name another.
    json: bool,
    body: Result<Bytes, String>,
    extensions: http::Extensions,
    route: Option<String>,
}

/// The metrics of `method path` with segments holding digits masked as `{id}` (e.g.
/// `GET /accounts/{id}`), formatted on the stack when it fits.
fn route_metrics(metrics: &ClientMetrics, method: &Method, path: &str) -> Arc<MethodMetrics> {
    const STACK: usize = 128;
    let mut buf = [0u8; STACK];
    let mut len = 0;
    let mut heap = String::new();
    let mut push = |piece: &str| {
        if heap.is_empty() && len + piece.len() <= STACK {
            buf[len..len + piece.len()].copy_from_slice(piece.as_bytes());
            len += piece.len();
        } else {
            if heap.is_empty() {
                heap.push_str(std::str::from_utf8(&buf[..len]).unwrap_or_default());
            }
            heap.push_str(piece);
        }
    };
    push(method.as_str());
    push(" ");
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            push("/");
        }
        if segment.bytes().any(|b| b.is_ascii_digit()) {
            push("{id}");
        } else {
            push(segment);
        }
    }
    if heap.is_empty() {
        // Whole `str` pieces were copied in, so the bytes are UTF-8.
        metrics.method(std::str::from_utf8(&buf[..len]).unwrap_or_default())
    } else {
        metrics.method(&heap)
    }
}

impl RestRequest {
    /// A JSON body (`content-type: application/json`, unless the call sets its own content
    /// type with [`header`](Self::header)).
    pub fn json<B: Serialize + ?Sized>(mut self, body: &B) -> Self {
        self.body = serde_json::to_vec(body)
            .map(Bytes::from)
            .map_err(|e| e.to_string());
        self.json = true;
        self
    }

    /// A header for this call; a name given more than once is sent with each of its values. An
    /// invalid name or value makes the call fail with [`Error::is_config`] naming the header
    /// (nothing is sent).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let Ok(headers) = &mut self.headers {
            match header_pair(name, value) {
                Ok((n, v)) => {
                    headers.append(n, v);
                }
                Err(why) => self.headers = Err(Error::config(why)),
            }
        }
        self
    }

    /// The call may be replayed after an unknown outcome.
    pub fn idempotent(mut self) -> Self {
        self.extensions.insert(Idempotent);
        self
    }

    /// The server de-duplicates on `key`; the same key goes with every attempt. A key that
    /// breaks [`check_idempotency_key`](keel_breaker::request::check_idempotency_key) (empty,
    /// longer than 255 bytes, not visible ASCII) makes the call fail with [`Error::is_config`]
    /// (nothing is sent): without a key the server could not de-duplicate a replay, and a Keel
    /// server refuses such a key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        let key = key.into();
        if self.headers.is_ok()
            && let Err(invalid) = keel_breaker::request::check_idempotency_key(key.as_bytes())
        {
            self.headers = Err(Error::config_caused_by(invalid));
        }
        self.extensions.insert(IdempotencyKey(key));
        self
    }

    /// Route by `key` with [`Balance::ConsistentHash`](crate::Balance::ConsistentHash).
    pub fn hash_key(mut self, key: HashKey) -> Self {
        self.extensions.insert(key);
        self
    }

    /// A deadline for this call (the sooner of this and the client's timeout applies).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.extensions.insert(Deadline::after(timeout));
        self
    }

    /// The route name for metrics (default: method and path with id-like segments masked).
    pub fn route(mut self, route: impl Into<String>) -> Self {
        self.route = Some(route.into());
        self
    }

    /// Sends the call; a 2xx response is returned with its body read whole.
    ///
    /// # Errors
    /// [`Error::is_status`] for a non-2xx response (status and body kept); no endpoints, all
    /// ejected, deadline exceeded, retry budget exhausted, or a transport error.
    pub fn send(self) -> impl Future<Output = Result<http::Response<Bytes>, Error>> + Send + use<> {
        self.exchange(|head, body| Ok(http::Response::from_parts(head, body)))
    }

    /// [`send`](Self::send), then decodes the JSON body.
    ///
    /// # Errors
    /// As [`send`](Self::send); [`Error::is_decode`] for a body that is not the JSON of `T`.
    pub fn send_json<T: DeserializeOwned>(
        self,
    ) -> impl Future<Output = Result<T, Error>> + Send + use<T> {
        self.exchange(|_, body| {
            let body: &[u8] = if body.is_empty() { b"null" } else { &body };
            serde_json::from_slice(body).map_err(Error::decode)
        })
    }

    /// The call, its response (a 2xx one, body read whole) handed to `decode`: one future for
    /// `send` and `send_json` alike (a future awaiting another holds a copy of it, moved on
    /// every await). Its work before the first await is a plain function,
    /// [`prepare`](Self::prepare), run at the first poll (the span's parent is the context the
    /// call is polled in), and the round trip is written inline: an `async` function keeps
    /// its captures beside the locals made from them, and an inner `async` block or a
    /// captured future awaited would hold the request's parts a second time (the future was
    /// 2.9 KB with both).
    async fn exchange<T>(
        self,
        decode: impl FnOnce(http::response::Parts, Bytes) -> Result<T, Error> + Send,
    ) -> Result<T, Error> {
        let Prepared {
            mut client,
            req,
            span,
            metrics,
        } = self.prepare()?;
        let start = Instant::now();
        let result: Result<(http::response::Parts, Bytes), Error> = 'round_trip: {
            if let Err(error) = std::future::poll_fn(|cx| client.stack.poll_ready(cx)).await {
                break 'round_trip Err(Error::from_box(error));
            }
            // Scoped: the call's future is gone before the body is read, so the two share
            // space in this future.
            let (res, refused) = {
                let mut call = std::pin::pin!(client.stack.call(req));
                let res = call.as_mut().await;
                (res, budget_refused(&call))
            };
            let res = match res {
                Ok(res) => res,
                Err(error) => break 'round_trip Err(client.shared.failure(error, refused)),
            };
            let status = res.status();
            let (head, body) = res.into_parts();
            let bytes = match http_body_util::Limited::new(body, client.max_body)
                .collect()
                .await
            {
                Ok(collected) => collected.to_bytes(),
                // A refusal keeps its status (what the caller acts on), without its body.
                Err(error)
                    if error.is::<http_body_util::LengthLimitError>() && !status.is_success() =>
                {
                    let error = Error::http(status, Bytes::new());
                    break 'round_trip Err(if refused {
                        error.into_budget_exhausted()
                    } else {
                        error
                    });
                }
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    break 'round_trip Err(Error::decode(format!(
                        "the response body is larger than {} bytes (max_response_body)",
                        client.max_body
                    )));
                }
                Err(error) => break 'round_trip Err(Error::from_box(error)),
            };
            if status.is_success() {
                Ok((head, bytes))
            } else if refused {
                Err(Error::http(status, bytes).into_budget_exhausted())
            } else {
                Err(Error::http(status, bytes))
            }
        };
        let failed = match &result {
            Ok(_) => false,
            Err(e) => e.status().is_none_or(|s| s.is_server_error()),
        };
        metrics.record(start.elapsed(), failed);
        match &result {
            Ok(_) => span.succeed(),
            Err(e) => match e.status() {
                Some(status) => span.fail_with(
                    e.to_string(),
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ),
                None => span.fail(e.to_string()),
            },
        }
        let (head, body) = result?;
        decode(head, body)
    }

    /// The request as it goes down the stack, its client span and its route's metrics.
    fn prepare(self) -> Result<Prepared, Error> {
        let RestRequest {
            client,
            method,
            path,
            headers,
            json,
            body,
            extensions,
            route,
        } = self;
        let body = body.map_err(Error::decode)?;
        let path = path.map_err(Error::config)?;
        let headers = headers?;
        let metrics = match &route {
            Some(route) => client.shared.metrics.method(route),
            None => route_metrics(&client.shared.metrics, &method, path.path()),
        };
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = http::Uri::from(path);
        *req.extensions_mut() = extensions;
        *req.headers_mut() = headers;
        let h = req.headers_mut();
        if json {
            h.entry(CONTENT_TYPE)
                .or_insert(HeaderValue::from_static("application/json"));
        }
        add_defaults(&client.shared.default_headers, h);
        h.entry(ACCEPT)
            .or_insert(HeaderValue::from_static("application/json"));
        let (mut parts, body) = req.into_parts();
        let shared = &client.shared;
        let span = shared.begin(&mut parts, "http.client", || {
            [
                KeyValue::new("http.request.method", method_value(&method)),
                KeyValue::new("http.route", span::shared(&metrics.name)),
                KeyValue::new("peer.service", span::shared(&shared.service)),
            ]
        });
        // GET, PUT, DELETE… may be replayed by HTTP semantics; a key or marker the call carries
        // the retry layer sees itself.
        if method.is_idempotent() && parts.extensions.get::<Idempotent>().is_none() {
            parts.extensions.insert(Idempotent);
        }
        Ok(Prepared {
            req: http::Request::from_parts(parts, body),
            span,
            metrics,
            client,
        })
    }
}

/// A call ready to go down the stack; see [`RestRequest::prepare`].
struct Prepared {
    client: RestClient,
    req: http::Request<Full<Bytes>>,
    span: span::CallSpan,
    metrics: Arc<MethodMetrics>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_mask_id_segments_and_drop_the_query() {
        let metrics = ClientMetrics::default();
        let path = http::uri::PathAndQuery::from_static("/accounts/7/moves/a1b?full=1");
        let m = route_metrics(&metrics, &Method::GET, path.path());
        assert_eq!(m.name.as_str(), "GET /accounts/{id}/moves/{id}");
        let m = route_metrics(&metrics, &Method::POST, "/");
        assert_eq!(m.name.as_str(), "POST /");
    }

    #[test]
    fn routes_longer_than_the_stack_buffer() {
        let metrics = ClientMetrics::default();
        let long = "segment".repeat(30);
        let path = format!("/{long}/42/{long}");
        let m = route_metrics(&metrics, &Method::DELETE, &path);
        assert_eq!(m.name.as_str(), format!("DELETE /{long}/{{id}}/{long}"));
        let at_edge = format!("/{}", "x".repeat(128 - "GET /".len()));
        let m = route_metrics(&metrics, &Method::GET, &at_edge);
        assert_eq!(m.name.as_str(), format!("GET {at_edge}"));
        let over = format!("{at_edge}y");
        let m = route_metrics(&metrics, &Method::GET, &over);
        assert_eq!(m.name.as_str(), format!("GET {over}"));
    }

    /// The error of the call `request` makes on a client of an endpoint where nothing listens
    /// (port 9): a call refused before it is sent fails without dialling.
    fn refused(request: impl FnOnce(&RestClient) -> RestRequest) -> Error {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = RestClient::builder("x")
                .endpoints(["http://127.0.0.1:9"])
                .unwrap();
            request(&client).send().await.unwrap_err()
        })
    }

    /// What a fixed URL says and the client would not send is refused, not dropped: a query,
    /// credentials, a path where only an origin is taken; and `https` needs a TLS configuration.
    #[test]
    fn fixed_urls_the_client_would_not_honour_are_config_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for url in [
                "http://127.0.0.1:9/api",
                "http://127.0.0.1:9/?k=v",
                "http://user:pw@127.0.0.1:9",
                "https://127.0.0.1:9",
            ] {
                let err = RestClient::builder("x").endpoints([url]).unwrap_err();
                assert!(err.is_config(), "{url}: {err:?}");
                assert!(err.to_string().contains(url), "{err}");
                let err = crate::GrpcChannel::builder("x")
                    .endpoints([url])
                    .unwrap_err();
                assert!(err.is_config(), "{url}: {err:?}");
            }
            for url in [
                "http://127.0.0.1:9/api?k=v",
                "http://user:pw@127.0.0.1:9/api",
                "https://127.0.0.1:9/api",
            ] {
                let err = RestClient::builder("x").base_url(url).unwrap_err();
                assert!(err.is_config(), "{url}: {err:?}");
            }
            assert!(
                RestClient::builder("x")
                    .base_url("http://127.0.0.1:9/api")
                    .is_ok()
            );
            assert!(
                RestClient::builder("x")
                    .endpoints(["http://127.0.0.1:9/"])
                    .is_ok()
            );
        });
    }

    #[test]
    fn an_invalid_path_is_a_config_error_naming_it() {
        let err = refused(|client| client.request(Method::GET, "/a b"));
        assert!(err.is_config(), "{err:?}");
        assert!(err.to_string().contains("\"/a b\""), "{err}");
    }

    #[test]
    fn an_invalid_header_is_a_config_error_naming_it() {
        for (name, value, named) in [
            ("x-ok", "bad\nvalue", "\"x-ok\""),
            ("bad name", "v", "\"bad name\""),
        ] {
            let err = refused(|client| {
                client
                    .request(Method::GET, "/a")
                    .header("x-first", "1")
                    .header(name, value)
                    .header("x-later", "2")
            });
            assert!(err.is_config(), "{err:?}");
            assert!(err.to_string().contains(named), "{err}");
            assert!(!err.to_string().contains("bad\nvalue"), "{err}");
        }
    }

    #[test]
    fn an_idempotency_key_the_server_could_not_use_is_a_config_error() {
        let long = "k".repeat(256);
        for key in ["pay-1\n", "", long.as_str(), "caf\u{e9}"] {
            let err = refused(|client| client.request(Method::POST, "/pay").idempotency_key(key));
            assert!(err.is_config(), "{err:?}");
            assert!(err.to_string().contains("idempotency key"), "{err}");
            assert_eq!(err.http_status(), http::StatusCode::BAD_REQUEST);
        }
    }
}
