//! The server side of propagation: a tower layer every App server runs its requests through.
//!
//! Per request: the caller's W3C trace context becomes the parent of a server span
//! (`grpc.server` / `http.server`); the incoming deadline (`grpc-timeout` or `x-keel-deadline`),
//! capped by `server.request_timeout`, is put in the request's extensions as a
//! [`Deadline`] (outgoing Keel client calls made with those extensions inherit it) and
//! enforced for REST (for gRPC tonic enforces it: `grpc-timeout` and the App's
//! `Server::timeout`); the idempotency key, when present,
//! is put in the extensions as an [`IdempotencyKey`]; RED metrics are recorded per method.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use keel_breaker::classify::grpc_status;
use keel_breaker::deadline::Deadline;
use keel_breaker::request::{IDEMPOTENCY_KEY_HEADER, IdempotencyKey};
use keel_core::propagation::{HeaderExtractor, extract};
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{MethodMetrics, ServerMetrics, UNKNOWN_GRPC, dec_in_flight, inc_in_flight};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which protocol a [`ServerLayer`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Grpc,
    Rest,
}

impl Protocol {
    /// The `protocol` label of the server metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Rest => "http",
        }
    }
}

/// Extracts trace context, deadline and idempotency key; records a server span and RED metrics.
#[derive(Debug, Clone)]
pub struct ServerLayer {
    metrics: Arc<ServerMetrics>,
    protocol: Protocol,
    timeout: Option<Duration>,
    /// The gRPC paths that get their own metric series; any other is labelled `unknown`.
    grpc_names: Arc<GrpcNames>,
}

/// The gRPC methods an App serves, so that the server metrics label a path no service answers
/// `unknown` (a client sending made-up paths must not grow the metrics without bound).
///
/// A method of a service whose descriptor was registered
/// ([`App::file_descriptor_set`](crate::App::file_descriptor_set)) is known exactly; for a
/// service without one, any `/pkg.Service/…` path counts, and [`ServerMetrics`] caps how many
/// series those can create.
#[derive(Debug, Default)]
pub(crate) struct GrpcNames {
    /// Services served, by full name (`pkg.Service`).
    services: HashSet<String>,
    /// `/pkg.Service/Method` of every method the registered descriptors describe.
    methods: HashSet<String>,
    /// The services those descriptors describe: paths of theirs not in `methods` are unknown.
    described: HashSet<String>,
    /// `/pkg.Service/Method` of every streaming method (server, client or both) described.
    streaming: HashSet<String>,
}

impl GrpcNames {
    /// The services served and the encoded `FileDescriptorSet`s registered.
    ///
    /// # Errors
    /// A descriptor set that does not decode.
    pub(crate) fn new<'a>(
        services: impl IntoIterator<Item = &'a str>,
        descriptors: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, prost::DecodeError> {
        let mut names = Self {
            services: services.into_iter().map(str::to_owned).collect(),
            ..Self::default()
        };
        for encoded in descriptors {
            let set = <prost_types::FileDescriptorSet as prost::Message>::decode(encoded)?;
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for method in &service.method {
                        let path = format!("/{service_name}/{}", method.name());
                        if method.server_streaming() || method.client_streaming() {
                            names.streaming.insert(path.clone());
                        }
                        names.methods.insert(path);
                    }
                    names.described.insert(service_name);
                }
            }
        }
        Ok(names)
    }

    /// The paths of the streaming methods the registered descriptors describe.
    pub(crate) fn streaming(&self) -> impl Iterator<Item = &str> {
        self.streaming.iter().map(String::as_str)
    }

    /// Whether `path` is a method worth a series of its own.
    pub(crate) fn is_known(&self, path: &str) -> bool {
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return false;
        };
        if method.is_empty() || method.contains('/') || !self.services.contains(service) {
            return false;
        }
        !self.described.contains(service) || self.methods.contains(path)
    }
}

impl ServerLayer {
    pub(crate) fn new(
        metrics: Arc<ServerMetrics>,
        protocol: Protocol,
        timeout: Option<Duration>,
        grpc_names: Arc<GrpcNames>,
    ) -> Self {
        Self {
            metrics,
            protocol,
            timeout,
            grpc_names,
        }
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = ServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of a [`ServerLayer`].
#[derive(Debug, Clone)]
pub struct ServerService<S> {
    inner: S,
    layer: ServerLayer,
}

impl<S, B, ResBody> Service<http::Request<B>> for ServerService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<ServerBody<ResBody>>;
    type Error = S::Error;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let layer = &self.layer;
        let method = match layer.protocol {
            Protocol::Grpc => {
                let path = req.uri().path();
                let known = layer.grpc_names.is_known(path);
                layer
                    .metrics
                    .method(Protocol::Grpc, if known { path } else { UNKNOWN_GRPC })
            }
            Protocol::Rest => {
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map_or("unmatched", |p| p.as_str());
                rest_method(&layer.metrics, req.method(), route)
            }
        };
        let span = match layer.protocol {
            Protocol::Grpc => tracing::info_span!(
                "grpc.server",
                otel.kind = "server",
                otel.name = %method.name,
                rpc.system = "grpc",
                rpc.method = %method.name,
            ),
            Protocol::Rest => tracing::info_span!(
                "http.server",
                otel.kind = "server",
                otel.name = %method.name,
                http.request.method = %req.method(),
                http.route = %method.name,
            ),
        };
        let parent = extract(&HeaderExtractor(req.headers()));
        let _ = span.set_parent(parent);

        let own = layer.timeout.map(Deadline::after);
        let deadline = match (own, Deadline::from_headers(req.headers())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(d) = deadline {
            req.extensions_mut().insert(d);
        }
        if let Some(key) = req
            .headers()
            .get(IDEMPOTENCY_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            let key = IdempotencyKey(key.to_owned());
            req.extensions_mut().insert(key);
        }
        // tonic enforces grpc-timeout itself; REST deadlines are enforced here.
        let sleep = match (layer.protocol, deadline) {
            (Protocol::Rest, Some(d)) => Some(Box::pin(tokio::time::sleep_until(d.0))),
            _ => None,
        };
        inc_in_flight(&layer.metrics);
        let recorder = Recorder {
            metrics: Arc::clone(&layer.metrics),
            method,
            start: Instant::now(),
            done: false,
        };
        let fut = span.in_scope(|| self.inner.call(req));
        ServerFuture {
            fut: fut.instrument(span),
            sleep,
            recorder: Some(recorder),
        }
    }
}

/// Records one request's RED metrics exactly once: when its status is known, or, if the
/// request is abandoned first, as `cancelled` on drop.
#[derive(Debug)]
struct Recorder {
    metrics: Arc<ServerMetrics>,
    method: Arc<MethodMetrics>,
    start: Instant,
    done: bool,
}

impl Recorder {
    fn record(&mut self, status: &str, error: bool) {
        if self.done {
            return;
        }
        self.done = true;
        dec_in_flight(&self.metrics);
        self.method.record(
            &self.metrics,
            status,
            error,
            self.start.elapsed().as_secs_f64(),
        );
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record("cancelled", false);
    }
}

pin_project_lite::pin_project! {
    /// The response future of a [`ServerService`].
    pub struct ServerFuture<F> {
        #[pin]
        fut: tracing::instrument::Instrumented<F>,
        sleep: Option<Pin<Box<Sleep>>>,
        recorder: Option<Recorder>,
    }
}

impl<F> std::fmt::Debug for ServerFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerFuture").finish_non_exhaustive()
    }
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The metrics of REST route `route` called with `method` (`GET /accounts/{id}`), the name
/// joined on the stack when it fits.
fn rest_method(metrics: &ServerMetrics, method: &http::Method, route: &str) -> Arc<MethodMetrics> {
    const STACK: usize = 128;
    // Any token is a valid HTTP method: one a client makes up is labelled `_OTHER` (as the
    // OpenTelemetry conventions do), so callers cannot grow the metrics without bound.
    let verb = match *method {
        http::Method::GET
        | http::Method::POST
        | http::Method::PUT
        | http::Method::DELETE
        | http::Method::PATCH
        | http::Method::HEAD
        | http::Method::OPTIONS
        | http::Method::CONNECT
        | http::Method::TRACE => method.as_str(),
        _ => "_OTHER",
    };
    let len = verb.len() + 1 + route.len();
    if len > STACK {
        return metrics.method(Protocol::Rest, &format!("{verb} {route}"));
    }
    let mut buf = [0u8; STACK];
    buf[..verb.len()].copy_from_slice(verb.as_bytes());
    buf[verb.len()] = b' ';
    buf[verb.len() + 1..len].copy_from_slice(route.as_bytes());
    // Two `str`s and a space: UTF-8.
    let name = std::str::from_utf8(&buf[..len]).unwrap_or_default();
    metrics.method(Protocol::Rest, name)
}

/// gRPC codes counted as server errors in the RED metrics (the caller's mistakes are not).
fn grpc_is_error(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
            | Code::Unimplemented
    )
}

impl<F, ResBody, E> Future for ServerFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<ServerBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.fut.poll(cx) {
            let mut recorder = this.recorder.take();
            return Poll::Ready(match result {
                Ok(res) => {
                    let (parts, body) = res.into_parts();
                    let grpc = parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    if let Some(r) = recorder.as_mut() {
                        if grpc {
                            // Trailers-only: the status is in the headers; otherwise the body's
                            // trailers carry it.
                            if let Some(code) = grpc_status(&parts.headers) {
                                r.record(grpc_code_name(code), grpc_is_error(code));
                            }
                        } else {
                            let status = parts.status;
                            r.record(status.as_str(), status.is_server_error());
                        }
                    }
                    let body = ServerBody::inner(body, recorder.filter(|r| !r.done));
                    Ok(http::Response::from_parts(parts, body))
                }
                Err(e) => {
                    if let Some(r) = recorder.as_mut() {
                        r.record("error", true);
                    }
                    Err(e)
                }
            });
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            if let Some(r) = this.recorder.as_mut() {
                r.record(StatusCode::GATEWAY_TIMEOUT.as_str(), true);
            }
            let mut res = http::Response::new(ServerBody::full(Bytes::from_static(
                b"{\"error\":\"deadline exceeded\"}",
            )));
            *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Poll::Ready(Ok(res));
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// The response body of a [`ServerService`]: the inner body (watched for gRPC trailers) or
    /// Keel's own error body.
    pub struct ServerBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

impl<B> ServerBody<B> {
    fn inner(body: B, recorder: Option<Recorder>) -> Self {
        Self {
            kind: BodyKind::Inner { body, recorder },
        }
    }

    fn full(data: Bytes) -> Self {
        Self {
            kind: BodyKind::Full { data: Some(data) },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Inner {
            #[pin]
            body: B,
            recorder: Option<Recorder>,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> std::fmt::Debug for ServerBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBody").finish_non_exhaustive()
    }
}

impl<B> Body for ServerBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            BodyKindProj::Inner { body, recorder } => {
                let frame = ready!(body.poll_frame(cx));
                if let Some(r) = recorder.as_mut() {
                    match &frame {
                        Some(Ok(f)) => {
                            if let Some(trailers) = f.trailers_ref() {
                                let code = grpc_status(trailers).unwrap_or(tonic::Code::Ok);
                                r.record(grpc_code_name(code), grpc_is_error(code));
                            }
                        }
                        Some(Err(_)) => r.record("error", true),
                        None => r.record("Ok", false),
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            BodyKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Inner { body, .. } => body.is_end_stream(),
            BodyKind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Inner { body, .. } => body.size_hint(),
            BodyKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_labels_are_the_code_names() {
        for n in 0..=16 {
            let code = tonic::Code::from_i32(n);
            assert_eq!(grpc_code_name(code), format!("{code:?}"));
        }
    }

    #[test]
    fn grpc_paths_are_known_by_service_or_by_descriptor() {
        let names = GrpcNames::new(
            [
                "keel.echo.v1.Echo",
                tonic_health::pb::health_server::SERVICE_NAME,
            ],
            [tonic_health::pb::FILE_DESCRIPTOR_SET],
        )
        .unwrap();
        // Described: exactly its methods.
        assert!(names.is_known("/grpc.health.v1.Health/Check"));
        assert!(names.is_known("/grpc.health.v1.Health/Watch"));
        assert!(!names.is_known("/grpc.health.v1.Health/MadeUp"));
        // Served without a descriptor: any method name (the series cap bounds them).
        assert!(names.is_known("/keel.echo.v1.Echo/Echo"));
        assert!(names.is_known("/keel.echo.v1.Echo/Whatever"));
        // Not served, or not a method path.
        for path in [
            "/made.up.Service/Echo",
            "/keel.echo.v1.Echo",
            "/keel.echo.v1.Echo/",
            "/keel.echo.v1.Echo/Echo/extra",
            "keel.echo.v1.Echo/Echo",
            "/",
            "",
        ] {
            assert!(!names.is_known(path), "{path:?}");
        }
        // A described service that is not served is not known either.
        let names = GrpcNames::new([], [tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
        assert!(!names.is_known("/grpc.health.v1.Health/Check"));
        // A descriptor set that does not decode is an error, not a panic.
        assert!(GrpcNames::new([], [&b"\xff\xff\xff"[..]]).is_err());
    }

    #[test]
    fn rest_method_names_join_verb_and_route_however_long() {
        let metrics = ServerMetrics::new();
        let m = rest_method(&metrics, &http::Method::GET, "/accounts/{id}");
        assert_eq!(&*m.name, "GET /accounts/{id}");
        let long = format!("/{}", "x".repeat(200));
        let m = rest_method(&metrics, &http::Method::DELETE, &long);
        assert_eq!(&*m.name, format!("DELETE {long}"));
        let edge = format!("/{}", "y".repeat(128 - "PUT /".len()));
        let m = rest_method(&metrics, &http::Method::PUT, &edge);
        assert_eq!(&*m.name, format!("PUT {edge}"));
        // Made-up methods share one label.
        for made_up in ["FROBNICATE", "X-1", "PURGE"] {
            let method = http::Method::from_bytes(made_up.as_bytes()).unwrap();
            let m = rest_method(&metrics, &method, "unmatched");
            assert_eq!(&*m.name, "_OTHER unmatched");
        }
    }
}
