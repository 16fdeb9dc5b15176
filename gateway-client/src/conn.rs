//! Connections to one endpoint: the TLS-capable connector both clients dial with, and gRPC's
//! HTTP/2 connection, held directly on hyper (REST's HTTP/1.1 pool is in `h1`).
//!
//! A [`GrpcConn`] is one lazily dialled HTTP/2 connection shared by every call to its endpoint.
//! A call takes a handle to the open connection (a lock held for one clone) and hands its
//! request straight to hyper's connection task: no `tower::buffer` worker in between, as a
//! `tonic::transport::Channel` has, so a call costs one task hop less. The first call dials;
//! calls arriving meanwhile wait for that dial instead of starting their own, and when it fails
//! they fail with it ([`NotSent`], `UNAVAILABLE`: retried elsewhere, counted by the endpoint's
//! breaker). A closed connection (server gone, GOAWAY) is dialled again by the next call. A call
//! the server did not take — refused (`REFUSED_STREAM`), above the last stream of its `GOAWAY`,
//! or still queued when the connection closed — is [`NotSent`] too, so it moves to another
//! endpoint even when it is not idempotent; anything else that breaks a call after it was handed
//! to the connection leaves its outcome unknown. When the
//! endpoint leaves discovery the connection is retired: it is never dialled again, and it closes
//! once its last in-flight call completes — even while a client clone that has been idle since
//! still holds the old endpoint list.
//!
//! A call waiting for its connection (its own dial, or another call's) has sent nothing: when
//! its deadline passes, or the endpoint is retired, meanwhile, it fails [`NotSent`] at once
//! ([`before_send`]) rather than as a deadline that passed in flight, an unknown outcome.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use keel_breaker::BoxError;
use keel_breaker::classify::NotSent;
use keel_breaker::retry::ReplayBody;
use keel_core::ServiceInstance;
use tonic::body::Body;
use tower_service::Service;

use crate::discovery::Retire;
use crate::error::Error;
use crate::grpc::KeepAlive;
use crate::options::TlsConfig;

/// The connector of both clients: TCP (`TCP_NODELAY`, connect timeout), and rustls for `https`.
pub(crate) type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// Which protocol the TLS handshake offers (ALPN).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Alpn {
    /// `http/1.1` (REST).
    Http1,
    /// `h2` (gRPC).
    H2,
}

/// The connector for `tls` (the CA to trust, the name to verify), dialling with
/// `connect_timeout`; with `tcp_keepalive`, its connections are probed after that long idle and
/// closed once data or probes stay unacknowledged three times that long (see the builders'
/// `tcp_keepalive`, which checks its range).
pub(crate) fn https_connector(
    tls: Option<&TlsConfig>,
    connect_timeout: Duration,
    tcp_keepalive: Option<Duration>,
    alpn: Alpn,
) -> Result<Https, Error> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(tls) = tls {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
            let cert = cert.map_err(|e| Error::config(format!("invalid CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::config(format!("invalid CA certificate: {e}")))?;
        }
        if roots.is_empty() && !tls.system_roots {
            // It would trust nothing: every handshake would fail.
            return Err(Error::config(
                "the TLS CA PEM holds no certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        if tls.system_roots {
            let system = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(system.certs);
            if added == 0 {
                let why: Vec<String> = system.errors.iter().map(ToString::to_string).collect();
                return Err(Error::config(format!(
                    "TLS system roots: no CA certificate could be loaded from the platform's \
                     store{}{}",
                    if why.is_empty() { "" } else { ": " },
                    why.join("; ")
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    if let Some(idle) = tcp_keepalive {
        http.set_keepalive(Some(idle));
        http.set_keepalive_interval(Some((idle / 3).max(Duration::from_secs(1))));
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        http.set_tcp_user_timeout(Some(idle * 3));
    }
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let builder = match tls.and_then(|t| t.domain.as_deref()) {
        Some(domain) => {
            let name = rustls::pki_types::ServerName::try_from(domain.to_owned())
                .map_err(|e| Error::config(format!("invalid TLS domain {domain:?}: {e}")))?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(match alpn {
        Alpn::Http1 => builder.enable_http1().wrap_connector(http),
        Alpn::H2 => builder.enable_http2().wrap_connector(http),
    })
}

/// Where an instance is reached.
pub(crate) struct Origin {
    pub(crate) scheme: Scheme,
    /// `host:port` (IPv6 hosts bracketed).
    pub(crate) authority: Authority,
    /// `scheme://authority/`, what the connector dials.
    pub(crate) target: Uri,
}

/// The [`Origin`] of an instance.
pub(crate) fn origin(instance: &ServiceInstance) -> Result<Origin, BoxError> {
    let scheme = if instance.tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let host = &instance.endpoint.host;
    let authority: Authority = if host.contains(':') {
        format!("[{host}]:{}", instance.endpoint.port)
    } else {
        format!("{host}:{}", instance.endpoint.port)
    }
    .parse()?;
    let target = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()?;
    Ok(Origin {
        scheme,
        authority,
        target,
    })
}

/// Runs `dial` (connect and handshake) to `target` within `timeout`; a failure comes back as
/// the message that names the target and the cause.
pub(crate) async fn dial_within<T>(
    target: &Uri,
    timeout: Duration,
    dial: impl Future<Output = Result<T, BoxError>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, dial).await {
        Ok(Ok(connected)) => Ok(connected),
        Ok(Err(error)) => Err(format!(
            "connecting to {target} failed: {}",
            chain(error.as_ref())
        )),
        Err(_) => Err(format!(
            "connecting to {target} timed out after {timeout:?}"
        )),
    }
}

/// Set once an endpoint has left discovery; calls waiting for a connection to it are woken.
#[derive(Default)]
pub(crate) struct Retired {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Retired {
    /// Marks the endpoint retired and wakes every call waiting in [`before_send`].
    pub(crate) fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Returns once the endpoint is retired.
    async fn wait(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read: a `set` in between still wakes it.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

/// `wait` — a call waiting for a connection to `target`, before anything of its request was
/// written — given up when the call's `deadline` passes or the endpoint is `retired` first.
/// Either way the call fails [`NotSent`]: safe to send elsewhere even when not idempotent, and
/// counted against the endpoint (a dial that outlasts every caller's deadline still ejects it).
/// Left to the deadline layer, the same wait would end as a deadline that passed in flight: an
/// unknown outcome, which a caller moving money must treat as possibly executed.
pub(crate) async fn before_send<T>(
    deadline: Option<tokio::time::Instant>,
    retired: &Retired,
    target: &Uri,
    wait: impl Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    let expired = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        done = wait => done,
        () = retired.wait() => Err(unavailable(format!(
            "{target} left discovery before the request was sent"
        ))),
        () = expired => Err(Box::new(NotSent::new(
            keel_breaker::deadline::DeadlineExceeded::before_send(),
        ))),
    }
}

/// Spawns hyper's task for one connection to `target`, logging how it ended (`protocol` names
/// it in the log).
pub(crate) fn drive<F>(target: &Uri, protocol: &'static str, connection: F)
where
    F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let target = target.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%target, %error, "{protocol} connection ended");
        }
    });
}

/// The `user-agent` of Keel's gRPC calls (unless the caller set one).
const USER_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("keel-client/", env!("CARGO_PKG_VERSION")));

/// A connected byte stream (TCP or TLS), type-erased.
pub(crate) trait Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send {}

impl<T: hyper::rt::Read + hyper::rt::Write + Unpin + Send> Io for T {}

/// Dials `target` (`scheme://authority/`) with `connector`. Boxed: hyper's connection task (and
/// for HTTP/2 every per-request task, whose type is the same enum) would otherwise hold the TLS
/// stream inline, kilobytes copied per call.
pub(crate) async fn connect_io(connector: &Https, target: &Uri) -> Result<Box<dyn Io>, BoxError> {
    let mut connector = connector.clone();
    std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
    Ok(Box::new(connector.call(target.clone()).await?))
}

/// Spawns hyper's per-request tasks (the one streaming a request body) boxed: hyper's task type
/// is an enum as large as a whole HTTP/2 connection, which tokio would otherwise copy into every
/// call's task (measured: ~2 000 instructions more per call than a box and a small task).
#[derive(Debug, Clone, Copy)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}

pin_project_lite::pin_project! {
    /// What a gRPC call sends: tonic's encoded body as the retry layer keeps it for replay,
    /// handed to hyper without boxing it again. Its size is not announced: gRPC requests carry
    /// no `content-length`, which hyper would otherwise add (a header value allocated per call)
    /// for a body whose size it knows.
    pub(crate) struct Wire {
        #[pin]
        inner: ReplayBody<Body>,
    }
}

impl Wire {
    pub(crate) fn new(inner: ReplayBody<Body>) -> Self {
        Self { inner }
    }
}

/// A request body that knows its call's deadline (the retry layer's [`ReplayBody`] does).
pub(crate) trait CallDeadline {
    /// The call's deadline, if it has one.
    fn call_deadline(&self) -> Option<tokio::time::Instant>;
}

impl<B> CallDeadline for ReplayBody<B> {
    fn call_deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline()
    }
}

impl CallDeadline for Wire {
    fn call_deadline(&self) -> Option<tokio::time::Instant> {
        self.inner.deadline()
    }
}

/// For a request that waited for its connection (dialled, or being dialled by another call):
/// its deadline header, stamped before the wait, is stamped again with the time left now — a
/// propagated deadline must never overstate it. Fails (nothing sent) if no time is left.
pub(crate) fn restamp_after_wait<B: CallDeadline>(
    req: &mut http::Request<B>,
) -> Result<(), BoxError> {
    match req.body().call_deadline() {
        Some(deadline) => keel_breaker::deadline::restamp(
            req.headers_mut(),
            keel_breaker::deadline::Deadline(deadline),
        )
        .map_err(BoxError::from),
        None => Ok(()),
    }
}

impl http_body::Body for Wire {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// One endpoint's HTTP/2 connection for gRPC; clones share it. Responses come back with
/// hyper's body as it is.
#[derive(Clone)]
pub(crate) struct GrpcConn(Arc<Inner>);

struct Inner {
    scheme: Scheme,
    authority: Authority,
    /// `scheme://authority/`, what the connector dials.
    target: Uri,
    connector: Https,
    connect_timeout: Duration,
    keep_alive: Option<KeepAlive>,
    /// The open connection, if any (a handle is cloned out per call).
    open: Mutex<Option<SendRequest<Wire>>>,
    /// Held by the one call that dials; the others wait on it.
    dialling: tokio::sync::Mutex<()>,
    /// Dials that failed so far, and the last one's error.
    failures: Mutex<(u64, String)>,
    /// Set when the endpoint left discovery: no more dials.
    retired: Retired,
}

impl fmt::Debug for GrpcConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcConn")
            .field("target", &self.0.target)
            .finish_non_exhaustive()
    }
}

impl GrpcConn {
    /// A connection to `instance`, dialled by the first call.
    pub(crate) fn new(
        instance: &ServiceInstance,
        connector: Https,
        connect_timeout: Duration,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Self, BoxError> {
        let Origin {
            scheme,
            authority,
            target,
        } = origin(instance)?;
        Ok(Self(Arc::new(Inner {
            scheme,
            authority,
            target,
            connector,
            connect_timeout,
            keep_alive,
            open: Mutex::new(None),
            dialling: tokio::sync::Mutex::new(()),
            failures: Mutex::new((0, String::new())),
            retired: Retired::default(),
        })))
    }

    fn open(&self) -> Option<SendRequest<Wire>> {
        let open = self.0.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// A handle to the open connection, dialling it first when there is none; whether this
    /// call dialled it.
    async fn sender(&self) -> Result<(SendRequest<Wire>, bool), BoxError> {
        if let Some(sender) = self.open() {
            return Ok((sender, false));
        }
        let failed_before = self.failures().0;
        let _dialling = self.0.dialling.lock().await;
        if let Some(sender) = self.open() {
            return Ok((sender, false));
        }
        let waited_for_failed_dial = {
            let (failed, last) = &*self.failures();
            (*failed != failed_before).then(|| last.clone())
        };
        if let Some(error) = waited_for_failed_dial {
            // The dial this call waited for failed: fail with it rather than dial again.
            return Err(unavailable(error));
        }
        if self.0.retired.is_set() {
            return Err(unavailable(format!("{} left discovery", self.0.target)));
        }
        match dial_within(&self.0.target, self.0.connect_timeout, self.dial()).await {
            Ok(sender) => {
                let mut open = self.0.open.lock().unwrap_or_else(PoisonError::into_inner);
                // Retired meanwhile: this call uses the connection, nobody keeps it.
                if !self.0.retired.is_set() {
                    *open = Some(sender.clone());
                }
                Ok((sender, true))
            }
            Err(message) => Err(self.failed(message)),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, (u64, String)> {
        self.0
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self, message: String) -> BoxError {
        let mut failures = self.failures();
        failures.0 += 1;
        failures.1.clone_from(&message);
        unavailable(message)
    }

    /// TCP (and TLS), then the HTTP/2 handshake; the connection's task is spawned here.
    async fn dial(&self) -> Result<SendRequest<Wire>, BoxError> {
        let io = connect_io(&self.0.connector, &self.0.target).await?;
        let mut builder = hyper::client::conn::http2::Builder::new(BoxingExecutor);
        if let Some(keep_alive) = self.0.keep_alive {
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(keep_alive.interval)
                .keep_alive_timeout(keep_alive.timeout);
        }
        let (sender, connection) = builder.handshake(io).await?;
        drive(&self.0.target, "HTTP/2", connection);
        Ok(sender)
    }

    /// The request's absolute URI on this endpoint, and Keel's `user-agent` unless set.
    fn prepare(&self, req: &mut http::Request<Wire>) -> Result<(), BoxError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.0.scheme.clone());
        parts.authority = Some(self.0.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts)?;
        req.headers_mut()
            .entry(http::header::USER_AGENT)
            .or_insert(USER_AGENT);
        Ok(())
    }

    /// Hands `req` to the connection of `sender` (HTTP/2 is ready whenever it is open); the
    /// future waits for the response.
    fn send_on(
        &self,
        mut sender: SendRequest<Wire>,
        req: http::Request<Wire>,
    ) -> Result<impl Future<Output = Result<http::Response<Incoming>, BoxError>> + use<>, BoxError>
    {
        if sender.is_closed() {
            // Closed since it was taken: nothing was sent, the next call dials again.
            return Err(unavailable(format!(
                "the connection to {} closed",
                self.0.target
            )));
        }
        Ok(futures::TryFutureExt::map_err(
            sender.send_request(req),
            unsent_or_not,
        ))
    }
}

impl Retire for GrpcConn {
    /// The endpoint left discovery: drop the shared handle, so the connection closes when the
    /// calls in flight on it are done, and dial no more.
    fn retire(&self) {
        let mut open = self.0.open.lock().unwrap_or_else(PoisonError::into_inner);
        self.0.retired.set();
        open.take();
    }
}

/// The headers Keel stamps on every call with a value of that call's own.
const PROPAGATED: [HeaderName; 3] = [
    HeaderName::from_static(keel_core::propagation::TRACEPARENT),
    HeaderName::from_static(keel_core::propagation::REQUEST_ID),
    keel_breaker::deadline::GRPC_TIMEOUT,
];

/// Lets HPACK index the names of the per-call headers with the first request on a new
/// connection: their values are made per call and sent never indexed, and HPACK (RFC 7541
/// 6.2.3) can then refer to an indexed name, but only to a name the table holds; h2 puts a name
/// there only with a value sent indexed. So the first request sends its own values indexed
/// (they stay in both ends' tables, about a hundred bytes), and every later request on the
/// connection sends an index for each of these names instead of encoding it again (HPACK
/// Huffman-codes every literal, about twenty instructions a byte, on both ends).
fn index_propagated_names(headers: &mut HeaderMap) {
    for name in &PROPAGATED {
        if let Some(value) = headers.get_mut(name) {
            value.set_sensitive(false);
        }
    }
}

/// Judges a failed HTTP/2 call: [`NotSent`] when the server cannot have processed the request,
/// else the error as it is (an unknown outcome). Not sent are:
/// - a request hyper cancelled: its connection closed before the request reached it (hyper's
///   HTTP/2 client makes a "canceled" error only then; `try_send_request` would say the same by
///   handing the request back, but its response channel is a few hundred bytes larger per call);
/// - a stream the server refused with `RST_STREAM` `REFUSED_STREAM` (RFC 9113 8.7: "closed
///   prior to any processing");
/// - a stream ended by the server's `GOAWAY`: h2 gives a stream the peer's `GOAWAY` only when the
///   stream's id is above the frame's last-stream-id, which the server has not processed and
///   never will (RFC 9113 6.8), or when the stream was opened after the `GOAWAY` came. A stream
///   at or below that id that fails later (the connection drops before it is answered) fails
///   with an I/O error instead, and stays unknown.
///
/// So a rolling deploy's graceful shutdown (`GOAWAY`, then close) moves the calls it did not take
/// to another endpoint, the plain ones too, instead of failing them as possibly executed.
///
/// One race remains, which no error tells apart: when the `GOAWAY` is read between hyper
/// opening a call's stream and its next readiness check, hyper fails that call with the
/// connection's `GOAWAY` error before sending any of its body, and h2 resets the stream. Its
/// headers may have reached the server, but not its message: a unary or server-streaming gRPC
/// method cannot run without it (tonic, grpc-java and grpc-go read it before the handler runs);
/// only a client-streaming or bidirectional handler, invoked on the headers, sees a cancelled
/// stream with no message, and only a fully buffered (replayable) body is then retried.
fn unsent_or_not(error: hyper::Error) -> BoxError {
    if error.is_canceled() || refused_by_peer(&error) {
        Box::new(NotSent::new(error))
    } else {
        Box::new(error)
    }
}

/// Whether `error` is (or wraps) an h2 error received from the peer that says the stream was
/// not processed: a `GOAWAY`, or a `RST_STREAM` with `REFUSED_STREAM` (see [`unsent_or_not`]).
fn refused_by_peer(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(err) = next {
        if let Some(peer) = err.downcast_ref::<h2::Error>() {
            return peer.is_remote()
                && (peer.is_go_away()
                    || (peer.is_reset() && peer.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        next = err.source();
    }
    false
}

/// A connect failure: nothing was sent (retried elsewhere); `UNAVAILABLE` to the caller.
fn unavailable(message: String) -> BoxError {
    Box::new(NotSent::new(tonic::Status::unavailable(message)))
}

/// `error` and its sources, `: `-separated.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(err) = next {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = err.source();
    }
    out
}

/// Response future of [`GrpcConn`].
pub(crate) type ConnFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, BoxError>> + Send>>;

impl Service<http::Request<Wire>> for GrpcConn {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = ConnFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The call dials when needed; its failure is the call's (and the breaker's) outcome.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Wire>) -> Self::Future {
        if let Err(error) = self.prepare(&mut req) {
            return Box::pin(std::future::ready(Err(error)));
        }
        // The usual case, the connection open: the request goes to hyper's connection here, and
        // the future only waits for the response (the dial's future — TLS and handshake,
        // kilobytes — is part of the call's only when it dials).
        match self.open() {
            Some(sender) => match self.send_on(sender, req) {
                Ok(response) => Box::pin(response),
                Err(error) => Box::pin(std::future::ready(Err(error))),
            },
            None => {
                let conn = self.clone();
                Box::pin(async move {
                    let (sender, dialled) = before_send(
                        req.body().call_deadline(),
                        &conn.0.retired,
                        &conn.0.target,
                        conn.sender(),
                    )
                    .await?;
                    restamp_after_wait(&mut req)?;
                    if dialled {
                        index_propagated_names(req.headers_mut());
                    }
                    conn.send_on(sender, req)?.await
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA PEM without a certificate would trust nothing (every handshake failing): a
    /// configuration error, for both clients.
    #[tokio::test]
    async fn a_ca_pem_without_a_certificate_is_a_config_error() {
        for pem in [&b""[..], b"not a certificate\n"] {
            let tls = crate::TlsConfig::with_ca_pem(pem);
            let grpc = crate::GrpcChannel::builder("s")
                .tls(tls.clone())
                .endpoints(["https://127.0.0.1:9"])
                .unwrap_err();
            assert!(grpc.to_string().contains("no certificate"), "{grpc}");
            let rest = crate::RestClient::builder("s")
                .tls(tls)
                .endpoints(["https://127.0.0.1:9"])
                .unwrap_err();
            assert!(rest.is_config(), "{rest:?}");
        }
    }

    /// A keep-alive the kernel cannot take is a configuration error, for both clients.
    #[tokio::test]
    async fn tcp_keepalive_out_of_range_is_a_config_error() {
        for idle in [Duration::from_millis(500), Duration::from_secs(32_768)] {
            let grpc = crate::GrpcChannel::builder("s")
                .tcp_keepalive(Some(idle))
                .endpoints(["http://127.0.0.1:9"])
                .unwrap_err();
            assert!(grpc.is_config(), "{grpc:?}");
            assert!(grpc.to_string().contains("tcp_keepalive"), "{grpc}");
            let rest = crate::RestClient::builder("s")
                .tcp_keepalive(Some(idle))
                .endpoints(["http://127.0.0.1:9"])
                .unwrap_err();
            assert!(rest.is_config(), "{rest:?}");
        }
        for idle in [None, Some(Duration::ZERO), Some(Duration::from_secs(1))] {
            crate::GrpcChannel::builder("s")
                .tcp_keepalive(idle)
                .endpoints(["http://127.0.0.1:9"])
                .unwrap();
        }
    }

    /// The connections both clients open are probed after `tcp_keepalive` idle and closed when
    /// unacknowledged three times that long; without it they keep the system's defaults.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connections_get_the_dead_peer_timeouts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        for alpn in [Alpn::H2, Alpn::Http1] {
            for idle in [Some(Duration::from_secs(30)), None] {
                let mut connector =
                    https_connector(None, Duration::from_secs(2), idle, alpn).unwrap();
                let stream = connector.call(uri.clone()).await.unwrap();
                let hyper_rustls::MaybeHttpsStream::Http(io) = stream else {
                    panic!("plain TCP expected");
                };
                let socket = socket2::SockRef::from(io.inner());
                assert_eq!(socket.keepalive().unwrap(), idle.is_some(), "{alpn:?}");
                if let Some(idle) = idle {
                    assert_eq!(socket.tcp_keepalive_time().unwrap(), idle);
                    assert_eq!(
                        socket.tcp_keepalive_interval().unwrap(),
                        Duration::from_secs(10)
                    );
                    assert_eq!(socket.tcp_user_timeout().unwrap(), Some(idle * 3));
                } else {
                    assert_eq!(socket.tcp_user_timeout().unwrap(), None);
                }
            }
        }
    }

    #[test]
    fn the_first_request_sends_the_propagated_values_indexable_and_nothing_else() {
        let mut headers = HeaderMap::new();
        for name in &PROPAGATED {
            headers.insert(
                name.clone(),
                keel_core::header::per_call_value(b"v").unwrap_or(HeaderValue::from_static("v")),
            );
        }
        let mut secret = HeaderValue::from_static("token");
        secret.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, secret);
        assert!(headers.values().all(HeaderValue::is_sensitive));
        index_propagated_names(&mut headers);
        for name in &PROPAGATED {
            assert!(!headers[name].is_sensitive(), "{name}");
        }
        assert!(headers[http::header::AUTHORIZATION].is_sensitive());
    }
}
