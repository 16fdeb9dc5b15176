use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::Full;
use tokio::sync::Notify;
use tower::{ServiceExt, service_fn};

use super::*;

type Req = Request<IdempotencyBody<Full<Bytes>>>;

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get(REPLAYED_HEADER)
            .is_some_and(|v| v == "true")
    }
}

fn request(path: &str, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path);
    if let Some(key) = key {
        builder = builder.header(IDEMPOTENCY_KEY_HEADER, key);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn grpc_request(key: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut request = request("/pkg.Svc/Debit", Some(key), body);
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    request
}

async fn send<S, RB>(service: &S, request: Request<Full<Bytes>>) -> Reply
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone,
    S::Error: fmt::Debug,
    RB: Body<Data = Bytes>,
    RB::Error: fmt::Debug,
{
    let response = service.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    Reply {
        status: parts.status,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}

/// A handler that counts executions and answers "done" once `proceed` lets it (a permit each).
fn gated(
    calls: Arc<AtomicUsize>,
    proceed: Arc<tokio::sync::Semaphore>,
) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    service_fn(move |_: Req| {
        let (calls, proceed) = (calls.clone(), proceed.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let _pass = proceed.acquire_owned().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
        }
    })
}

/// A handler that counts executions and echoes `<count>:<body>` with status 201.
fn counting(
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |request: Req| {
        let calls = Arc::clone(&calls);
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "{n}:{}",
                String::from_utf8_lossy(&body)
            ))));
            *response.status_mut() = StatusCode::CREATED;
            response
                .headers_mut()
                .insert("x-handler", HeaderValue::from_static("yes"));
            Ok::<_, Infallible>(response)
        }
    })
}

#[tokio::test]
async fn requests_without_a_key_pass_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let service = layer.layer(counting(calls.clone()));
    for _ in 0..2 {
        let reply = send(&service, request("/pay", None, "a")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(layer.stats().executed(), 0);
}

/// `Duration::MAX` as "wait as long as it takes" does not overflow the clock (a panic on every
/// keyed request).
#[tokio::test]
async fn the_longest_wait_is_accepted() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new()).wait_timeout(Duration::MAX);
    let service = layer.layer(counting(calls.clone()));
    let first = send(&service, request("/pay", Some("k1"), "a")).await;
    let second = send(&service, request("/pay", Some("k1"), "a")).await;
    assert!(!first.replayed() && second.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_repeated_key_is_replayed_not_executed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let service = layer.layer(counting(calls.clone()));
    let first = send(&service, request("/pay?x=1", Some("k1"), "a")).await;
    let second = send(&service, request("/pay?x=1", Some("k1"), "a")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!first.replayed());
    assert!(second.replayed());
    assert_eq!((first.status, &first.body), (second.status, &second.body));
    assert_eq!(first.body, "1:a");
    assert_eq!(second.headers["x-handler"], "yes");

    // Another key, another path: executes.
    send(&service, request("/pay?x=1", Some("k2"), "a")).await;
    send(&service, request("/refund?x=1", Some("k1"), "a")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let stats = layer.stats();
    assert_eq!((stats.executed(), stats.replayed()), (3, 1));
    assert_eq!(stats.duplicates_prevented(), 1);
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_rejected() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let service = layer.layer(counting(calls.clone()));
    send(&service, request("/pay?x=1", Some("k"), "a")).await;
    let other_body = send(&service, request("/pay?x=1", Some("k"), "b")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.headers[CONTENT_TYPE], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&other_body.body).unwrap();
    assert_eq!(problem["code"], "idempotency_key_reused");
    let other_query = send(&service, request("/pay?x=2", Some("k"), "a")).await;
    assert_eq!(other_query.status, StatusCode::UNPROCESSABLE_ENTITY);

    send(&service, grpc_request("g", "a")).await;
    let grpc = send(&service, grpc_request("g", "b")).await;
    assert_eq!(grpc.status, StatusCode::OK);
    assert_eq!(grpc.headers["grpc-status"], "3"); // INVALID_ARGUMENT
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(layer.stats().mismatches(), 3);
}

#[tokio::test]
async fn caller_scopes_and_namespaces_separate_keys() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(MemoryStore::new());
    let scoped = IdempotencyLayer::with_store(store.clone()).scope(|parts| {
        parts
            .headers
            .get("x-client")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let service = scoped.layer(counting(calls.clone()));
    for client in ["alice", "bob", "alice"] {
        let mut request = request("/pay", Some("k"), "a");
        request
            .headers_mut()
            .insert("x-client", HeaderValue::from_static(client));
        send(&service, request).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let other_service = IdempotencyLayer::with_store(store)
        .namespace("ledger")
        .layer(counting(calls.clone()));
    send(&other_service, request("/pay", Some("k"), "a")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn failures_that_did_not_execute_release_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = service_fn(move |_: Req| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let status = match n {
                1 => StatusCode::SERVICE_UNAVAILABLE,
                2 => StatusCode::TOO_MANY_REQUESTS,
                3 => StatusCode::BAD_REQUEST,
                _ => StatusCode::OK,
            };
            let mut response = Response::new(Full::new(Bytes::from(n.to_string())));
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    });
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let service = layer.layer(handler);
    let statuses = [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::BAD_REQUEST,
        StatusCode::BAD_REQUEST,
    ];
    for expected in statuses {
        let reply = send(&service, request("/pay", Some("k"), "a")).await;
        assert_eq!(reply.status, expected);
    }
    // 503 and 429 released the key; the 400 is definite and stored.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(layer.stats().released(), 2);
}

fn grpc_response(code: u8, body: &'static str) -> Response<IdempotencyBody<Full<Bytes>>> {
    // A gRPC response: headers, one data frame, then grpc-status in the trailers.
    let mut trailers = HeaderMap::new();
    trailers.insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
    let mut response = Response::new(IdempotencyBody::buffered(
        Bytes::from_static(body.as_bytes()),
        Some(trailers),
    ));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

#[tokio::test]
async fn grpc_trailers_are_classified_and_replayed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = service_fn(move |_: Req| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, Infallible>(match n {
                1 => grpc_response(14, ""), // UNAVAILABLE: released
                _ => grpc_response(0, "\0\0\0\0\x02ok"),
            })
        }
    });
    let service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
    let unavailable = send(&service, grpc_request("k", "a")).await;
    assert_eq!(unavailable.trailers.unwrap()[GRPC_STATUS], "14");
    let ok = send(&service, grpc_request("k", "a")).await;
    let replay = send(&service, grpc_request("k", "a")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(replay.replayed());
    assert_eq!(replay.body, ok.body);
    assert_eq!(replay.trailers.as_ref().unwrap()[GRPC_STATUS], "0");
    assert_eq!(replay.trailers, ok.trailers);
}

#[tokio::test]
async fn a_concurrent_duplicate_waits_for_the_first_and_gets_its_response() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (entered, proceed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = {
        let (calls, entered, proceed) = (calls.clone(), entered.clone(), proceed.clone());
        service_fn(move |_: Req| {
            let (calls, entered, proceed) = (calls.clone(), entered.clone(), proceed.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                entered.notify_one();
                proceed.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(n.to_string()))))
            }
        })
    };
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let service = layer.layer(handler);
    let first = tokio::spawn({
        let service = service.clone();
        async move { send(&service, request("/pay", Some("k"), "a")).await }
    });
    entered.notified().await;
    let second = tokio::spawn({
        let service = service.clone();
        async move { send(&service, request("/pay", Some("k"), "a")).await }
    });
    // Give the duplicate time to (wrongly) execute; it must be waiting instead.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    proceed.notify_one();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.body, "1");
    assert_eq!(second.body, first.body);
    assert!(second.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_gets_a_conflict_when_the_first_outlasts_the_wait() {
    let calls = Arc::new(AtomicUsize::new(0));
    let proceed = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = gated(calls.clone(), proceed.clone());
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .wait_timeout(Duration::from_secs(2))
        .lease(Duration::from_secs(3));
    let service = layer.layer(handler);
    let first = tokio::spawn({
        let service = service.clone();
        async move { send(&service, request("/pay", Some("k"), "a")).await }
    });
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let conflict = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.headers[RETRY_AFTER], "1");
    assert!(started.elapsed() >= Duration::from_secs(2));
    // For gRPC the same conflict is a trailers-only ABORTED.
    let grpc_conflict = Rejection::Conflict.response::<Full<Bytes>>(true);
    assert_eq!(grpc_conflict.status(), StatusCode::OK);
    assert_eq!(grpc_conflict.headers()[GRPC_STATUS], "10");
    // The lease (3 s) was renewed while the first ran well past it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let still = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(still.status, StatusCode::CONFLICT);
    proceed.add_permits(1);
    assert_eq!(first.await.unwrap().body, "done");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().conflicts(), 2);
}

/// With [`store_failures`], a handler that may have had side effects is never run again for
/// its key: not when the service returned an error, not when it panicked, not when it answered
/// 500. With either classification it is not stopped when the caller goes away while it runs:
/// it runs to its end and its response is stored.
#[tokio::test]
async fn failed_panicked_and_abandoned_executions_are_not_repeated() {
    let calls = Arc::new(AtomicUsize::new(0));
    // The handler of `/pay` waits for `proceed` (an owned receiver: nothing borrowed is held
    // across an await, which the generic `Send` check of a spawned call cannot see through).
    let (proceed, gate) = tokio::sync::oneshot::channel::<()>();
    let gate = Arc::new(std::sync::Mutex::new(Some(gate)));
    let (entered, finished) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = {
        let (calls, entered, gate, finished) = (
            calls.clone(),
            entered.clone(),
            gate.clone(),
            finished.clone(),
        );
        service_fn(move |request: Req| {
            let (calls, entered, finished) = (calls.clone(), entered.clone(), finished.clone());
            let gate = Arc::clone(&gate);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                // Decided before any await: nothing borrowed is held across one.
                let path = match request.uri().path() {
                    "/error" => 1,
                    "/panic" => 2,
                    "/500" => 3,
                    _ => 0,
                };
                match path {
                    1 => Err::<Response<Full<Bytes>>, BoxError>("boom".into()),
                    2 => panic!("handler bug"),
                    3 => {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"db down")));
                        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        Ok(response)
                    }
                    _ => {
                        entered.notify_one();
                        let gate = gate.lock().unwrap().take();
                        if let Some(gate) = gate {
                            let _ = gate.await;
                        }
                        finished.notify_one();
                        Ok(Response::new(Full::new(Bytes::from_static(b"done"))))
                    }
                }
            }
        })
    };
    let layer = IdempotencyLayer::new(MemoryStore::new()).classify(store_failures);
    let service = layer.layer(handler.clone());

    let error = service
        .clone()
        .oneshot(request("/error", Some("k"), "a"))
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "boom");
    let again = send(&service, request("/error", Some("k"), "a")).await;
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(again.replayed());
    assert!(
        String::from_utf8_lossy(&again.body).contains("idempotency_outcome_unknown"),
        "{again:?}"
    );

    let panicked = send(&service, request("/panic", Some("k"), "a")).await;
    assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
    let again = send(&service, request("/panic", Some("k"), "a")).await;
    assert!(again.replayed() && again.status == StatusCode::INTERNAL_SERVER_ERROR);
    // A panic of a gRPC handler is an UNKNOWN status.
    let mut grpc = grpc_request("g", "a");
    *grpc.uri_mut() = http::Uri::from_static("/panic");
    let panicked = send(&service, grpc).await;
    assert_eq!(panicked.headers[GRPC_STATUS], "2");

    let failed = send(&service, request("/500", Some("k"), "a")).await;
    let again = send(&service, request("/500", Some("k"), "a")).await;
    assert!(!failed.replayed() && again.replayed());
    assert_eq!((again.status, again.body), (failed.status, failed.body));
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // The caller goes away while the handler runs: the handler is not stopped.
    let abandoned = tokio::spawn(service.clone().oneshot(request("/pay", Some("k"), "a")));
    entered.notified().await;
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());
    // A shutdown waits for it.
    assert!(
        futures::FutureExt::now_or_never(layer.executions_done()).is_none(),
        "the abandoned execution runs on"
    );
    proceed.send(()).unwrap();
    finished.notified().await;
    tokio::time::timeout(Duration::from_secs(5), layer.executions_done())
        .await
        .expect("no execution left once it finished");
    let reply = keel_testkit::eventually("the response is stored", Duration::from_secs(5), || {
        let service = service.clone();
        async move {
            let reply = send(&service, request("/pay", Some("k"), "a")).await;
            reply.replayed().then_some(reply)
        }
    })
    .await
    .unwrap();
    assert_eq!(reply.body, "done");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(layer.stats().released(), 0);

    // By default a failure (a 500, a panic) releases the key: the retry runs again.
    let service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
    for path in ["/500", "/500", "/panic", "/panic"] {
        let reply = send(&service, request(path, Some("d"), "a")).await;
        assert!(!reply.replayed(), "{path}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 9);
}

/// A store that fails its first `fails` completions and renewals (then works as `inner`).
#[derive(Debug)]
struct Flaky {
    inner: MemoryStore,
    complete_fails: AtomicUsize,
    renew_fails: AtomicUsize,
    /// Renewals that never answer.
    renew_hangs: AtomicUsize,
}

impl Flaky {
    fn new(complete_fails: usize, renew_fails: usize) -> Self {
        Self {
            inner: MemoryStore::new(),
            complete_fails: AtomicUsize::new(complete_fails),
            renew_fails: AtomicUsize::new(renew_fails),
            renew_hangs: AtomicUsize::new(0),
        }
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl IdempotencyStore for Flaky {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        f: Fingerprint,
        lease: Duration,
    ) -> StoreFuture<'a, Claim> {
        self.inner.claim(key, f, lease)
    }
    fn renew<'a>(&'a self, key: &'a str, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool> {
        if take_one(&self.renew_fails) {
            return Box::pin(async { Err(StoreError::new("timed out")) });
        }
        if take_one(&self.renew_hangs) {
            return Box::pin(std::future::pending());
        }
        self.inner.renew(key, lease, ttl)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        lease: &'a Lease,
        response: &'a StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        if take_one(&self.complete_fails) {
            return Box::pin(async { Err(StoreError::new("timed out")) });
        }
        self.inner.complete(key, lease, response, ttl)
    }
    fn release<'a>(&'a self, key: &'a str, lease: &'a Lease) -> StoreFuture<'a, bool> {
        self.inner.release(key, lease)
    }
}

/// A response the store failed to take is stored on a later try, so its key does not lapse
/// with the lease and a retry is answered from it.
#[tokio::test(start_paused = true)]
async fn a_failed_completion_is_retried_within_the_lease() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(Flaky::new(3, 0)).lease(Duration::from_secs(1));
    let service = layer.layer(counting(calls.clone()));
    let first = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = send(&service, request("/pay", Some("k"), "a")).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().store_errors(), 3);
}

/// A renewal the store fails is tried again soon, not a third of a lease later: a handler that
/// outlives its lease keeps its claim through a short store outage, and a duplicate waits.
#[tokio::test(start_paused = true)]
async fn a_failed_renewal_is_retried_before_the_lease_runs_out() {
    let calls = Arc::new(AtomicUsize::new(0));
    let proceed = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = gated(calls.clone(), proceed.clone());
    // Lease 3 s: renewals due every second; the first two fail.
    let layer = IdempotencyLayer::new(Flaky::new(0, 2))
        .lease(Duration::from_secs(3))
        .wait_timeout(Duration::ZERO);
    hold_through_store_trouble(layer, handler, proceed, calls).await;
    // The first renewal never answers: it is given up after a period, and the next one keeps
    // the claim.
    let calls = Arc::new(AtomicUsize::new(0));
    let proceed = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = gated(calls.clone(), proceed.clone());
    let hanging = Flaky::new(0, 0);
    hanging.renew_hangs.store(1, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(hanging)
        .lease(Duration::from_secs(3))
        .wait_timeout(Duration::ZERO);
    hold_through_store_trouble(layer, handler, proceed, calls).await;
}

/// Runs a call through `layer` whose `handler` waits for `proceed`, sends a duplicate 10 s in
/// (it must find the claim held), then lets the first finish: one execution.
async fn hold_through_store_trouble<H>(
    layer: IdempotencyLayer,
    handler: H,
    proceed: Arc<tokio::sync::Semaphore>,
    calls: Arc<AtomicUsize>,
) where
    H: Service<Req, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    let service = layer.layer(handler);
    let first = tokio::spawn({
        let service = service.clone();
        async move { send(&service, request("/pay", Some("k"), "a")).await }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    let duplicate = tokio::time::timeout(
        Duration::from_secs(5),
        send(&service, request("/pay", Some("k"), "a")),
    )
    .await
    .expect("the duplicate executed and waits for the gate");
    assert_eq!(duplicate.status, StatusCode::CONFLICT, "the claim was kept");
    proceed.add_permits(1);
    assert_eq!(first.await.unwrap().body, "done");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// `Duration::MAX` as "keep for ever" (TTL) or "hold as long as it runs" (lease) does not
/// overflow a store's clock (a panic after the handler ran).
#[tokio::test]
async fn the_longest_ttl_and_lease_are_accepted() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .ttl(Duration::MAX)
        .lease(Duration::MAX);
    let service = layer.layer(counting(calls.clone()));
    let first = send(&service, request("/pay", Some("k"), "a")).await;
    let second = send(&service, request("/pay", Some("k"), "a")).await;
    assert!(!first.replayed() && second.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[derive(Debug)]
struct BrokenStore;

impl IdempotencyStore for BrokenStore {
    fn claim<'a>(&'a self, _: &'a str, _: Fingerprint, _: Duration) -> StoreFuture<'a, Claim> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
    fn renew<'a>(&'a self, _: &'a str, _: &'a Lease, _: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
    fn complete<'a>(
        &'a self,
        _: &'a str,
        _: &'a Lease,
        _: &'a StoredResponse,
        _: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
    fn release<'a>(&'a self, _: &'a str, _: &'a Lease) -> StoreFuture<'a, bool> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
}

#[tokio::test]
async fn a_store_failure_fails_closed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(BrokenStore);
    let service = layer.layer(counting(calls.clone()));
    let reply = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers[RETRY_AFTER], "1");
    let grpc = send(&service, grpc_request("k", "a")).await;
    assert_eq!(grpc.headers[GRPC_STATUS], "14");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(layer.stats().store_errors(), 2);
    // Without a key the store is not involved.
    assert_eq!(
        send(&service, request("/pay", None, "a")).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn bad_keys_and_oversized_bodies_are_rejected_before_executing() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = IdempotencyLayer::new(MemoryStore::new())
        .max_body_bytes(4)
        .layer(counting(calls.clone()));
    let long = "k".repeat(MAX_KEY_LEN + 1);
    for key in ["", "  ", long.as_str()] {
        let reply = send(&service, request("/pay", Some(key), "a")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{key:?}");
    }
    let mut two = request("/pay", Some("a"), "a");
    two.headers_mut()
        .append(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_static("b"));
    assert_eq!(send(&service, two).await.status, StatusCode::BAD_REQUEST);
    let too_large = send(&service, request("/pay", Some("k"), "12345")).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    let grpc_too_large = send(&service, grpc_request("k", "12345")).await;
    assert_eq!(grpc_too_large.headers[GRPC_STATUS], "8");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        send(&service, request("/pay", Some("k"), "1234"))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test(start_paused = true)]
async fn memory_records_expire_after_the_ttl() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::new();
    let service = IdempotencyLayer::new(store.clone())
        .ttl(Duration::from_secs(60))
        .layer(counting(calls.clone()));
    send(&service, request("/pay", Some("k"), "a")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        send(&service, request("/pay", Some("k"), "a"))
            .await
            .replayed()
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let fresh = send(&service, request("/pay", Some("k"), "a")).await;
    assert!(!fresh.replayed());
    assert_eq!(fresh.body, "2:a");
    assert_eq!(store.len(), 1);
}

#[test]
fn default_classification() {
    use tonic::Code;
    let release = |o| default_disposition(o) == Disposition::Release;
    for status in [408, 429, 500, 502, 503, 504] {
        assert!(
            release(Outcome::Http(StatusCode::from_u16(status).unwrap())),
            "{status}"
        );
    }
    for status in [200, 201, 204, 400, 402, 404, 409, 422] {
        assert!(
            !release(Outcome::Http(StatusCode::from_u16(status).unwrap())),
            "{status}"
        );
    }
    for code in [
        Code::Unavailable,
        Code::ResourceExhausted,
        Code::Internal,
        Code::Aborted,
    ] {
        assert!(release(Outcome::Grpc(code)), "{code:?}");
    }
    for code in [
        Code::Ok,
        Code::InvalidArgument,
        Code::FailedPrecondition,
        Code::NotFound,
    ] {
        assert!(!release(Outcome::Grpc(code)), "{code:?}");
    }
    assert!(release(Outcome::GrpcMissingStatus));
    // The strict classification releases only "not executed".
    let release = |o| store_failures(o) == Disposition::Release;
    for status in [408, 429, 503] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(release(Outcome::Http(status)), "{status}");
    }
    for status in [200, 400, 500, 502, 504] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(!release(Outcome::Http(status)), "{status}");
    }
    for code in [Code::Unavailable, Code::ResourceExhausted, Code::Aborted] {
        assert!(release(Outcome::Grpc(code)), "{code:?}");
    }
    for code in [
        Code::Ok,
        Code::Internal,
        Code::Unknown,
        Code::DeadlineExceeded,
        Code::Cancelled,
        Code::DataLoss,
    ] {
        assert!(!release(Outcome::Grpc(code)), "{code:?}");
    }
    assert!(!release(Outcome::GrpcMissingStatus));
    let mut headers = HeaderMap::new();
    assert_eq!(
        outcome(true, StatusCode::OK, &headers, None),
        Outcome::GrpcMissingStatus
    );
    headers.insert(GRPC_STATUS, HeaderValue::from_static("5"));
    assert_eq!(
        outcome(true, StatusCode::OK, &headers, None),
        Outcome::Grpc(Code::NotFound)
    );
    assert_eq!(
        outcome(true, StatusCode::BAD_GATEWAY, &headers, None),
        Outcome::Http(StatusCode::BAD_GATEWAY)
    );
    assert_eq!(
        outcome(false, StatusCode::OK, &headers, None),
        Outcome::Http(StatusCode::OK)
    );
}

/// Paths passed through (streaming methods) are not guarded, key or not: each request runs.
#[tokio::test]
async fn passed_through_paths_are_not_guarded() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new()).pass_through(["/pkg.Svc/Watch"]);
    let service = layer.layer(counting(calls.clone()));
    for _ in 0..2 {
        let reply = send(&service, request("/pkg.Svc/Watch", Some("k"), "a")).await;
        assert!(!reply.replayed());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let _ = send(&service, request("/pay", Some("k"), "a")).await;
    let again = send(&service, request("/pay", Some("k"), "a")).await;
    assert!(again.replayed(), "other paths are guarded");
}

/// A response larger than the cap is not buffered without bound: the caller's body fails, and
/// repeats are refused, whatever the classification (the handler ran; re-running it on every
/// retry would execute a successful payment again and again).
#[tokio::test]
async fn a_response_over_the_cap_is_not_run_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_response_bytes(3);
    let service = layer.layer(counting(calls.clone()));
    let response = service
        .clone()
        .oneshot(request("/pay", Some("k"), "long"))
        .await
        .unwrap();
    assert!(response.into_body().collect().await.is_err());
    let again = send(&service, request("/pay", Some("k"), "long")).await;
    assert!(again.replayed());
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&again.body).contains("idempotency_response_too_large"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A keyed handler that never ends is stopped at the execution limit (it runs beyond its
/// caller, but not for ever holding its key): an unknown outcome, released by default, so the
/// next attempt executes; nothing is left running.
#[tokio::test(start_paused = true)]
async fn a_hung_execution_is_stopped_at_the_limit() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        service_fn(move |_: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        })
    };
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_execution(Duration::from_secs(5));
    let service = layer.layer(handler);
    let started = tokio::time::Instant::now();
    let hung = tokio::time::timeout(
        Duration::from_secs(600),
        send(&service, request("/pay", Some("k"), "a")),
    )
    .await
    .expect("the execution limit ends the call");
    assert_eq!(hung.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(started.elapsed() >= Duration::from_secs(5));
    layer.executions_done().await;
    let retry = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(retry.body, "done");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The caller has its answer before the outcome is stored: a store that fails (and is retried)
/// does not hold up a call that succeeded.
#[tokio::test(start_paused = true)]
async fn the_answer_does_not_wait_for_the_store() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(Flaky::new(3, 0));
    let service = layer.layer(counting(calls.clone()));
    let started = tokio::time::Instant::now();
    let first = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(started.elapsed(), Duration::ZERO, "answered at once");
    layer.executions_done().await;
    assert!(
        send(&service, request("/pay", Some("k"), "a"))
            .await
            .replayed()
    );
}

/// A response with more headers than a store reads back is not kept as it is (every repeat
/// would then fail to decode it, a 503 for the whole TTL): repeats are refused as too large,
/// and it does not run again.
#[tokio::test]
async fn a_response_with_too_many_headers_is_not_kept_as_is() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        service_fn(move |_: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                for i in 0..5000 {
                    let name = HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
                    response
                        .headers_mut()
                        .insert(name, HeaderValue::from_static("v"));
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let service = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
    let first = send(&service, request("/pay", Some("k"), "a")).await;
    assert_eq!(first.headers.len(), 5000);
    let again = send(&service, request("/pay", Some("k"), "a")).await;
    assert!(again.replayed());
    assert!(String::from_utf8_lossy(&again.body).contains("idempotency_response_too_large"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
