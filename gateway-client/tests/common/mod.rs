//! Helpers for the client integration tests.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_breaker::breaker::{BreakerConfig, State};
use keel_breaker::request::Idempotent;
use keel_client::GrpcChannel;
use keel_testkit::echo::{EchoRequest, echo_client::EchoClient};
use tokio::task::JoinHandle;

use keel_core::{Endpoint, ServiceInstance};
use keel_registry::dialect::SpringOptions;
use keel_registry::{Dialect, ZkConfig, ZkRegistry};
use keel_testkit::echo::{EchoProvider, Faults};

/// `n` echo providers (`p-0`, `p-1`, …) with their fault switches.
pub async fn providers(n: usize) -> (Vec<EchoProvider>, Vec<Faults>) {
    let mut ps = Vec::new();
    let mut fs = Vec::new();
    for i in 0..n {
        let faults = Faults::default();
        ps.push(
            EchoProvider::start_with(&format!("p-{i}"), faults.clone())
                .await
                .unwrap(),
        );
        fs.push(faults);
    }
    (ps, fs)
}

/// An instance of `service` with id `id` at `addr`.
pub fn instance(service: &str, id: &str, addr: SocketAddr) -> ServiceInstance {
    ServiceInstance::new(
        service,
        id,
        Endpoint::new(addr.ip().to_string(), addr.port()),
    )
}

/// The ZooKeeper connect string (`KEEL_ZK`, default the local ensemble's first server).
pub use keel_testkit::zk::servers;

/// A unique ZooKeeper root, deleted with everything under it when dropped.
pub struct ZkRoot {
    pub path: String,
    _root: keel_testkit::zk::TestRoot,
}

impl ZkRoot {
    pub async fn new() -> Self {
        let root = keel_testkit::zk::TestRoot::new();
        Self {
            path: root.path.clone(),
            _root: root,
        }
    }

    /// A registry writing and reading the Spring layout under this root.
    pub async fn registry(&self) -> ZkRegistry {
        ZkRegistry::connect(
            ZkConfig::new(servers())
                .with_session_timeout(Duration::from_secs(6))
                .with_dialect(Dialect::Spring(
                    SpringOptions::default().with_root(self.path.clone()),
                )),
        )
        .await
        .expect("connect to ZooKeeper on 127.0.0.1 (is `scripts/services up` running?)")
    }
}

/// Faults a [`RestProvider`] injects: every n-th call answers `status`; a call to a path ending
/// in `/held` waits for a permit ([`RestFaults::release`]).
#[derive(Debug)]
pub struct RestFaults {
    every: std::sync::atomic::AtomicU32,
    status: std::sync::atomic::AtomicU32,
    /// Whether an injected failure says when to come back (`Retry-After: 1`).
    retry_after: std::sync::atomic::AtomicBool,
    pub calls: std::sync::atomic::AtomicU64,
    /// Calls to `…/held` that arrived (held or not).
    pub held: std::sync::atomic::AtomicU64,
    gate: tokio::sync::Semaphore,
}

impl Default for RestFaults {
    fn default() -> Self {
        Self {
            every: Default::default(),
            status: Default::default(),
            retry_after: Default::default(),
            calls: Default::default(),
            held: Default::default(),
            gate: tokio::sync::Semaphore::new(0),
        }
    }
}

impl RestFaults {
    pub fn fail_every(&self, n: u32, status: u16) {
        use std::sync::atomic::Ordering::Relaxed;
        self.status.store(u32::from(status), Relaxed);
        self.every.store(n, Relaxed);
    }
    /// Injected failures carry `Retry-After: 1` (a server shedding load), or not.
    pub fn retry_after(&self, yes: bool) {
        self.retry_after
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn heal(&self) {
        self.every.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Lets `n` held calls answer.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

/// A JSON echo server over HTTP/1.1 whose connections all die with [`RestProvider::kill`].
pub struct RestProvider {
    pub addr: SocketAddr,
    pub faults: std::sync::Arc<RestFaults>,
    task: tokio::task::JoinHandle<()>,
}

impl RestProvider {
    pub async fn start(id: &str) -> Self {
        Self::start_tls(id, None).await
    }

    pub async fn start_tls(id: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        use axum::extract::State;
        use std::sync::atomic::Ordering::Relaxed;

        let faults = std::sync::Arc::new(RestFaults::default());
        let state = (id.to_owned(), faults.clone());
        let app = axum::Router::new()
            .fallback(
                |State((id, faults)): State<(String, std::sync::Arc<RestFaults>)>,
                 method: http::Method,
                 uri: http::Uri,
                 headers: http::HeaderMap,
                 body: bytes::Bytes| async move {
                    use axum::response::IntoResponse;
                    let n = faults.calls.fetch_add(1, Relaxed) + 1;
                    let every = u64::from(faults.every.load(Relaxed));
                    if every != 0 && n.is_multiple_of(every) {
                        let status =
                            http::StatusCode::from_u16(faults.status.load(Relaxed) as u16).unwrap();
                        let mut response = (status, "injected failure").into_response();
                        if faults.retry_after.load(Relaxed) {
                            response.headers_mut().insert(
                                http::header::RETRY_AFTER,
                                http::HeaderValue::from_static("1"),
                            );
                        }
                        return response;
                    }
                    if uri.path().ends_with("/held") {
                        faults.held.fetch_add(1, Relaxed);
                        let _pass = faults.gate.acquire().await;
                    }
                    if uri.path().ends_with("/missing") {
                        return (http::StatusCode::NOT_FOUND, "no such account").into_response();
                    }
                    // A repeated header's values joined with ", ".
                    let mut joined = std::collections::BTreeMap::<String, String>::new();
                    for (k, v) in &headers {
                        let Ok(v) = v.to_str() else { continue };
                        joined
                            .entry(k.to_string())
                            .and_modify(|all| {
                                all.push_str(", ");
                                all.push_str(v);
                            })
                            .or_insert_with(|| v.to_owned());
                    }
                    let headers = joined;
                    let body: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    axum::Json(serde_json::json!({
                        "server": id, "method": method.as_str(), "path": uri.to_string(),
                        "headers": headers, "body": body,
                    }))
                    .into_response()
                },
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let service = hyper_util::service::TowerToHyperService::new(app.clone());
                        let tls = tls.clone();
                        connections.spawn(async move {
                            let builder = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            match tls {
                                Some(tls) => {
                                    let Ok(stream) = tls.accept(stream).await else { return };
                                    let _ = builder
                                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                        .await;
                                }
                                None => {
                                    let _ = builder
                                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                        .await;
                                }
                            }
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Self { addr, faults, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops the listener and every connection at once.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for RestProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test CA and a server certificate for `localhost` and `127.0.0.1`:
/// `(ca_pem, cert_pem, key_pem)`.
pub fn test_pki() -> (String, String, String) {
    test_pki_for(&["localhost", "127.0.0.1"])
}

/// A test CA and a server certificate for `names` only: `(ca_pem, cert_pem, key_pem)`.
pub fn test_pki_for(names: &[&str]) -> (String, String, String) {
    keel_testkit::tls::test_pki(names).unwrap()
}

/// A breaker that decides quickly: 50 % of a 10-call window, after 4 calls; 2 half-open probes
/// after `wait`.
pub fn quick_breaker(wait: Duration) -> BreakerConfig {
    BreakerConfig {
        failure_rate_threshold: 50.0,
        sliding_window_size: 10,
        minimum_number_of_calls: 4,
        wait_duration_in_open_state: wait,
        permitted_number_of_calls_in_half_open_state: 2,
        enable_exponential_backoff: false,
        ..BreakerConfig::default()
    }
}

/// A breaker that never opens within a test (its window and minimum are far beyond the calls
/// made): for tests of what happens to calls, not of ejection.
pub fn never_opening_breaker() -> BreakerConfig {
    BreakerConfig {
        minimum_number_of_calls: 100_000,
        sliding_window_size: 100_000,
        ..quick_breaker(Duration::from_secs(60))
    }
}

/// A retry budget no test exhausts (1 000 retries a second, and one per call).
pub fn ample_budget() -> Arc<keel_breaker::retry::RetryBudget> {
    Arc::new(keel_breaker::retry::RetryBudget::new(
        Duration::from_secs(10),
        1_000,
        1.0,
    ))
}

/// `(state, calls)` of endpoint `id`, `None` once discovery has removed it.
pub fn state_of(channel: &GrpcChannel, id: &str) -> Option<(State, u64)> {
    channel
        .endpoints()
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| (e.state, e.calls))
}

/// Steady load: `callers` tasks making echo calls through a channel until stopped, counting the
/// calls that succeeded and those that failed (printed).
pub struct EchoLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl EchoLoad {
    /// Idempotent calls (replayed after an unknown outcome).
    pub fn start(channel: &GrpcChannel, callers: usize) -> Self {
        Self::calls(channel, callers, true)
    }

    /// Plain calls: not idempotent, so only a call that was certainly not executed is sent
    /// again.
    pub fn plain(channel: &GrpcChannel, callers: usize) -> Self {
        Self::calls(channel, callers, false)
    }

    fn calls(channel: &GrpcChannel, callers: usize, idempotent: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = (0..callers)
            .map(|_| {
                let mut client = EchoClient::new(channel.clone());
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let mut req = tonic::Request::new(EchoRequest {
                            message: "load".into(),
                            payload: Vec::new(),
                        });
                        if idempotent {
                            req.extensions_mut().insert(Idempotent);
                        }
                        match client.echo(req).await {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(status) => {
                                eprintln!("failed call: {status:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Calls that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the callers and waits for them; returns `(ok, failed)`.
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Accepts on a new port and forwards every connection to `to`, counting the connections.
pub async fn counting_proxy(to: SocketAddr) -> (SocketAddr, Arc<AtomicU64>) {
    let (addr, accepted, _open) = tracking_proxy(to).await;
    (addr, accepted)
}

/// [`counting_proxy`], also counting the connections still open (a connection is closed once
/// both sides have finished).
pub async fn tracking_proxy(to: SocketAddr) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let (count, live) = (Arc::clone(&accepted), Arc::clone(&open));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            live.fetch_add(1, Ordering::SeqCst);
            let live = Arc::clone(&live);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                live.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, open)
}

/// Waits (up to 10 s) until `count` (a client's endpoint count) is `n`.
pub async fn endpoints_become(what: &str, n: usize, count: impl Fn() -> usize) {
    keel_testkit::eventually(what, Duration::from_secs(10), || {
        let now = count();
        async move { (now == n).then_some(()) }
    })
    .await
    .unwrap();
}

/// Two instances of `service` registered under a fresh ZooKeeper root: `leaving` (reached
/// through a [`tracking_proxy`], whose accepted and open connection counts are returned) and
/// `staying`. Returns the root (keep it), the registry, the leaving instance's registration and
/// the counters.
pub async fn leaving_and_staying(
    service: &str,
    leaving: SocketAddr,
    staying: SocketAddr,
) -> (
    ZkRoot,
    ZkRegistry,
    keel_registry::Registration,
    keel_registry::Registration,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
    use keel_registry::Registry as _;
    let root = ZkRoot::new().await;
    let registry = root.registry().await;
    let (proxy, accepted, open) = tracking_proxy(leaving).await;
    let leaving = registry
        .register(instance(service, "leaving", proxy))
        .await
        .unwrap();
    let staying = registry
        .register(instance(service, "staying", staying))
        .await
        .unwrap();
    (root, registry, leaving, staying, accepted, open)
}

/// A server (HTTP/1.1 and h2c) that answers `GET /ok` with `{"ok":true}` and every other
/// request with `content_type`, status 200, and a body that never ends: a provider that hangs
/// after its response head.
pub async fn stalling_server(content_type: &'static str) -> (SocketAddr, JoinHandle<()>) {
    use futures::StreamExt as _;
    type Frames = futures::stream::BoxStream<
        'static,
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| async move {
                    let (frames, content_type): (Frames, _) = if req.uri().path() == "/ok" {
                        let ok =
                            http_body::Frame::data(bytes::Bytes::from_static(b"{\"ok\":true}"));
                        (futures::stream::iter([Ok(ok)]).boxed(), "application/json")
                    } else {
                        (futures::stream::pending().boxed(), content_type)
                    };
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", content_type)
                            .body(http_body_util::StreamBody::new(frames))
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (addr, task)
}

/// A provider that accepts connections, reads whatever comes and never answers (not even an
/// HTTP/2 PING): a stuck process. Its `http://` URL, and the task to abort at the end.
pub async fn silent_provider() -> (String, JoinHandle<()>) {
    let (addr, task) = keel_testkit::silent_server().await.unwrap();
    (format!("http://{addr}"), task)
}

/// What [`refusing_h2_server`] does with each request it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `RST_STREAM` with `REFUSED_STREAM` on the request's stream; the connection stays open.
    ResetRefusedStream,
    /// `GOAWAY` (`NO_ERROR`) whose last-stream-id is below the request's stream, then the end of
    /// the connection: a server going away without taking the request, as in a rolling deploy.
    GoAway,
}

/// An HTTP/2 server, written frame by frame, that takes no request: each one is refused as
/// `refusal` says. Its address, the number of requests that reached it, and its task.
pub async fn refusing_h2_server(refusal: Refusal) -> (SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    const REFUSED_STREAM: u32 = 0x7;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    async fn serve(mut stream: tokio::net::TcpStream, refusal: Refusal, requests: Arc<AtomicU64>) {
        let mut preface = [0u8; PREFACE.len()];
        if stream.read_exact(&mut preface).await.is_err() || preface != PREFACE {
            return;
        }
        if stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_err() {
            return;
        }
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            let reply = match kind {
                SETTINGS if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
                HEADERS => {
                    requests.fetch_add(1, Ordering::SeqCst);
                    match refusal {
                        Refusal::ResetRefusedStream => {
                            frame(RST_STREAM, 0, id, &REFUSED_STREAM.to_be_bytes())
                        }
                        Refusal::GoAway => {
                            let mut goaway = id.saturating_sub(2).to_be_bytes().to_vec();
                            goaway.extend_from_slice(&0u32.to_be_bytes());
                            let _ = stream.write_all(&frame(GOAWAY, 0, 0, &goaway)).await;
                            // Read until the client closes (closing with its frames unread would
                            // reset the connection, and the client might never read the GOAWAY).
                            let mut sink = [0u8; 4096];
                            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                            return;
                        }
                    }
                }
                _ => continue,
            };
            if stream.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn({
        let requests = Arc::clone(&requests);
        async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, refusal, Arc::clone(&requests)));
            }
        }
    });
    (addr, requests, task)
}
