//! The idempotency layer on real servers (axum and tonic on loopback) with the real Redis on
//! 127.0.0.1:6379 (`scripts/services up`). Each test uses its own key prefix and deletes its
//! keys; records are written with a short TTL so that even a failed test leaves nothing for long.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keel::idempotency::{IdempotencyLayer, MemoryStore, REPLAYED_HEADER, RedisStore};
use keel_testkit::echo::echo_client::EchoClient;
use keel_testkit::echo::echo_server::EchoServer;
use keel_testkit::echo::{EchoReply, EchoRequest, EchoService, Faults};
use keel_testkit::unique;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const REDIS: &str = "redis://127.0.0.1:6379";
const TTL: Duration = Duration::from_secs(300);

/// A Redis store under a prefix of its own; `cleanup` deletes every key under it.
struct Redis {
    prefix: String,
}

impl Redis {
    fn new() -> Self {
        Self {
            prefix: format!("{}:", unique("keel-idem-test")),
        }
    }

    async fn store(&self) -> RedisStore {
        RedisStore::connect(REDIS)
            .await
            .expect("Redis on 127.0.0.1:6379 (scripts/services up)")
            .prefix(self.prefix.clone())
    }

    /// One layer instance (as one service instance would have) over its own connection.
    async fn layer(&self) -> IdempotencyLayer {
        IdempotencyLayer::new(self.store().await)
            .namespace("test")
            .ttl(TTL)
    }

    async fn keys(&self) -> Vec<String> {
        let client = redis::Client::open(REDIS).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        let keys = self.keys().await;
        if keys.is_empty() {
            return;
        }
        let client = redis::Client::open(REDIS).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(self.keys().await.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// axum

/// A payments router whose handler counts executions; `status` decides each answer.
fn payments(calls: Arc<AtomicUsize>, status: fn(usize) -> StatusCode, work: Duration) -> Router {
    Router::new().route(
        "/payments",
        post(move |body: Bytes| {
            let calls = Arc::clone(&calls);
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(work).await;
                let body = format!(
                    r#"{{"execution":{n},"request":{}}}"#,
                    String::from_utf8_lossy(&body)
                );
                (
                    status(n),
                    [(http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    )
}

fn always_created(_: usize) -> StatusCode {
    StatusCode::CREATED
}

struct HttpServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl HttpServer {
    async fn start(router: Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get(REPLAYED_HEADER)
            .is_some_and(|v| v == "true")
    }
}

async fn pay(server: &HttpServer, key: &str, body: &'static str) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{}/payments", server.addr))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn axum_the_same_key_twice_executes_once_and_replays_the_response() {
    let redis = Redis::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = redis.layer().await;
    let stats = layer.stats();
    let server =
        HttpServer::start(payments(calls.clone(), always_created, Duration::ZERO).layer(layer))
            .await;

    let first = pay(&server, "pay-1", r#"{"amount":10}"#).await;
    let second = pay(&server, "pay-1", r#"{"amount":10}"#).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert!(second.replayed());
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers["content-type"], "application/json");
    assert_eq!((stats.executed(), stats.replayed()), (1, 1));

    // A different body under the same key is refused, not executed.
    let other = pay(&server, "pay-1", r#"{"amount":99}"#).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(stats.mismatches(), 1);
    assert_eq!(redis.keys().await.len(), 1);
    redis.cleanup().await;
}

#[tokio::test]
async fn axum_a_retry_on_another_instance_is_answered_from_the_first() {
    let redis = Redis::new();
    let (calls_a, calls_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = HttpServer::start(
        payments(calls_a.clone(), always_created, Duration::ZERO).layer(redis.layer().await),
    )
    .await;
    let b = HttpServer::start(
        payments(calls_b.clone(), always_created, Duration::ZERO).layer(redis.layer().await),
    )
    .await;

    let first = pay(&a, "transfer-7", r#"{"amount":10}"#).await;
    let retry = pay(&b, "transfer-7", r#"{"amount":10}"#).await;
    assert_eq!(
        (
            calls_a.load(Ordering::SeqCst),
            calls_b.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
    assert!(retry.replayed());
    assert_eq!((retry.status, &retry.body), (first.status, &first.body));
    redis.cleanup().await;
}

#[tokio::test]
async fn axum_concurrent_duplicates_on_two_instances_execute_once() {
    let redis = Redis::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let work = Duration::from_millis(300);
    let (layer_a, layer_b) = (redis.layer().await, redis.layer().await);
    let (stats_a, stats_b) = (layer_a.stats(), layer_b.stats());
    let servers = Arc::new([
        HttpServer::start(payments(calls.clone(), always_created, work).layer(layer_a)).await,
        HttpServer::start(payments(calls.clone(), always_created, work).layer(layer_b)).await,
    ]);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let servers = Arc::clone(&servers);
        tasks.spawn(async move { pay(&servers[i % 2], "dup", r#"{"amount":1}"#).await });
    }
    let replies = tasks.join_all().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(replies.iter().all(|r| r.status == StatusCode::CREATED));
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    assert_eq!(stats_a.executed() + stats_b.executed(), 1);
    assert_eq!(stats_a.replayed() + stats_b.replayed(), 7);
    redis.cleanup().await;
}

#[tokio::test]
async fn axum_a_503_releases_the_key_so_the_retry_executes() {
    let redis = Redis::new();
    let calls = Arc::new(AtomicUsize::new(0));
    fn unavailable_first(n: usize) -> StatusCode {
        if n == 1 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::CREATED
        }
    }
    let layer = redis.layer().await;
    let stats = layer.stats();
    let server =
        HttpServer::start(payments(calls.clone(), unavailable_first, Duration::ZERO).layer(layer))
            .await;
    assert_eq!(
        pay(&server, "k", "{}").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(redis.keys().await.is_empty(), "the 503 left its claim");
    let retry = pay(&server, "k", "{}").await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (StatusCode::CREATED, false)
    );
    let again = pay(&server, "k", "{}").await;
    assert!(again.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(stats.released(), 1);
    redis.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_redis_fails_closed_without_executing() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(Duration::from_millis(200)));
    let connection = redis::aio::ConnectionManager::new_lazy_with_config(client, config).unwrap();
    let layer = IdempotencyLayer::new(RedisStore::from_connection(connection));
    let stats = layer.stats();
    let calls = Arc::new(AtomicUsize::new(0));
    let server =
        HttpServer::start(payments(calls.clone(), always_created, Duration::ZERO).layer(layer))
            .await;
    let reply = pay(&server, "k", "{}").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(stats.store_errors(), 1);
}

#[tokio::test(start_paused = true)]
async fn memory_store_records_expire_after_the_ttl() {
    use tower::ServiceExt;
    let calls = Arc::new(AtomicUsize::new(0));
    let router = payments(calls.clone(), always_created, Duration::ZERO)
        .layer(IdempotencyLayer::new(MemoryStore::new()).ttl(Duration::from_secs(3600)));
    let send = |router: Router| async move {
        let request = Request::post("/payments")
            .header("idempotency-key", "k")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        response.headers().contains_key(REPLAYED_HEADER)
    };
    assert!(!send(router.clone()).await);
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert!(send(router.clone()).await);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!send(router.clone()).await, "the record outlived its TTL");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// tonic

struct GrpcServer {
    addr: SocketAddr,
    faults: Faults,
    stop: Option<oneshot::Sender<()>>,
}

impl GrpcServer {
    async fn start(id: &str, layer: IdempotencyLayer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let faults = Faults::default();
        let service = EchoServer::new(EchoService::with_faults(id, faults.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        Self {
            addr,
            faults,
            stop: Some(stop),
        }
    }

    async fn client(&self) -> EchoClient<tonic::transport::Channel> {
        EchoClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn echo(
    server: &GrpcServer,
    key: &str,
    message: &str,
) -> Result<(EchoReply, bool), tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest {
        message: message.to_owned(),
        payload: b"\x00\x01money".to_vec(),
    });
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    let response = server.client().await.echo(request).await?;
    let replayed = response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    Ok((response.into_inner(), replayed))
}

#[tokio::test]
async fn tonic_a_repeated_key_executes_once_even_across_instances() {
    let redis = Redis::new();
    let (layer_a, layer_b) = (redis.layer().await, redis.layer().await);
    let stats_b = layer_b.stats();
    let a = GrpcServer::start("a", layer_a).await;
    let b = GrpcServer::start("b", layer_b).await;

    let (first, replayed) = echo(&a, "debit-1", "debit 10").await.unwrap();
    assert!(!replayed);
    assert_eq!(first.server_id, "a");
    let (again, replayed) = echo(&a, "debit-1", "debit 10").await.unwrap();
    assert!(replayed);
    assert_eq!(again, first);
    // The retry lands on the other instance: answered with a's reply, b does not execute.
    let (retry, replayed) = echo(&b, "debit-1", "debit 10").await.unwrap();
    assert!(replayed);
    assert_eq!(retry, first);
    assert_eq!((a.faults.calls(), b.faults.calls()), (1, 0));
    assert_eq!(stats_b.replayed(), 1);

    // The same key with another message is INVALID_ARGUMENT on either instance.
    let status = echo(&b, "debit-1", "debit 99").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!((a.faults.calls(), b.faults.calls()), (1, 0));
    redis.cleanup().await;
}

#[tokio::test]
async fn tonic_unavailable_releases_the_key_and_the_retry_executes_elsewhere() {
    let redis = Redis::new();
    let a = GrpcServer::start("a", redis.layer().await).await;
    let b = GrpcServer::start("b", redis.layer().await).await;
    a.faults.fail_every(1, tonic::Code::Unavailable);
    let status = echo(&a, "debit-2", "debit 10").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let (reply, replayed) = echo(&b, "debit-2", "debit 10").await.unwrap();
    assert_eq!((reply.server_id.as_str(), replayed), ("b", false));
    // A definite error is stored like a success: FAILED_PRECONDITION replays, not re-executes.
    b.faults.fail_every(1, tonic::Code::FailedPrecondition);
    let failed = echo(&b, "debit-3", "debit 10").await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition);
    b.faults.heal();
    let replayed = echo(&a, "debit-3", "debit 10").await.unwrap_err();
    assert_eq!(replayed.code(), tonic::Code::FailedPrecondition);
    assert_eq!((a.faults.calls(), b.faults.calls()), (1, 2));
    redis.cleanup().await;
}

#[tokio::test]
async fn tonic_concurrent_duplicates_execute_once() {
    let redis = Redis::new();
    let a = Arc::new(GrpcServer::start("a", redis.layer().await).await);
    let b = Arc::new(GrpcServer::start("b", redis.layer().await).await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let server = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move { echo(&server, "debit-4", "debit 10").await.unwrap() });
    }
    let replies = tasks.join_all().await;
    assert_eq!(a.faults.calls() + b.faults.calls(), 1);
    assert!(replies.iter().all(|(reply, _)| *reply == replies[0].0));
    assert_eq!(replies.iter().filter(|(_, replayed)| !replayed).count(), 1);
    redis.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// callers that go away

/// A client whose connection drops while its keyed payment executes does not free the key:
/// the handler runs to its end, its response is stored, and the client's retry (with the same
/// key, as Keel's clients send it) is answered from it instead of paying again.
#[tokio::test]
async fn axum_a_client_that_disconnects_mid_request_does_not_free_the_key() {
    use tokio::io::AsyncWriteExt;
    let redis = Redis::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let router = payments(calls.clone(), always_created, Duration::from_millis(300))
        .layer(redis.layer().await);
    let server = HttpServer::start(router).await;

    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let body = r#"{"amount":10}"#;
    let request = format!(
        "POST /payments HTTP/1.1\r\nhost: {}\r\nidempotency-key: pay-9\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    keel_testkit::eventually("the handler runs", Duration::from_secs(5), || {
        let calls = calls.clone();
        async move { (calls.load(Ordering::SeqCst) == 1).then_some(()) }
    })
    .await
    .unwrap();
    drop(socket);

    let retry = pay(&server, "pay-9", r#"{"amount":10}"#).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "answered from the first execution");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the payment ran once");
    redis.cleanup().await;
}

/// An echo whose handler takes 300 ms, counting executions.
struct SlowEcho {
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl keel_testkit::echo::echo_server::Echo for SlowEcho {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            payload: Vec::new(),
            server_id: format!("execution {n}"),
            metadata: Default::default(),
        }))
    }
}

/// A caller's deadline passing while its keyed call executes (tonic then drops the request on
/// the server) does not free the key: the retry gets the first execution's reply.
#[tokio::test]
async fn tonic_a_caller_deadline_does_not_free_the_key() {
    let redis = Redis::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(redis.layer().await)
            .add_service(EchoServer::new(SlowEcho {
                calls: calls.clone(),
            }))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
    let call = |timeout: Option<Duration>| {
        let mut request = tonic::Request::new(EchoRequest {
            message: "debit 10".to_owned(),
            payload: Vec::new(),
        });
        request
            .metadata_mut()
            .insert("idempotency-key", "debit-9".parse().unwrap());
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        request
    };
    let late = client
        .echo(call(Some(Duration::from_millis(100))))
        .await
        .unwrap_err();
    // tonic's client gives up (CANCELLED) as its server does (DEADLINE_EXCEEDED).
    assert!(
        matches!(
            late.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{late:?}"
    );
    let retry = client.echo(call(None)).await.unwrap();
    assert_eq!(retry.get_ref().server_id, "execution 1");
    assert!(
        retry
            .metadata()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the debit ran once");
    let _ = stop.send(());
    redis.cleanup().await;
}
