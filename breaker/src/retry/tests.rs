use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_test::mock;

use super::*;
use crate::classify::NotSent;
use crate::request::{IDEMPOTENCY_KEY_HEADER, IdempotencyKey, Idempotent};

type Req = http::Request<ReplayBody<Full<Bytes>>>;
/// The mock servers' response body.
type Res = http_body_util::Empty<Bytes>;
type Handle = mock::Handle<Req, http::Response<Res>>;

fn policy() -> RetryPolicy {
    RetryPolicy::new(Arc::new(RetryBudget::new(
        Duration::from_secs(10),
        100,
        0.2,
    )))
    .max_attempts(3)
    .backoff(Duration::from_millis(10), Duration::from_millis(100))
}

fn status(code: u16) -> http::Response<Res> {
    let mut res = http::Response::new(Res::new());
    *res.status_mut() = http::StatusCode::from_u16(code).unwrap();
    res
}

/// A server refusing the call (shedding load): 503 with `Retry-After`.
fn refused() -> http::Response<Res> {
    let mut res = status(503);
    res.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    res
}

fn request(body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post("http://account/transfer")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Spawns the call through a retry layer over a mock; returns its join handle and the mock.
fn spawn_call(
    policy: RetryPolicy,
    req: http::Request<Full<Bytes>>,
) -> (
    tokio::task::JoinHandle<Result<http::Response<Res>, BoxError>>,
    Handle,
) {
    let (svc, mut handle) = mock::pair::<Req, http::Response<Res>>();
    handle.allow(100);
    let svc = Retry::new(svc, policy);
    let task = tokio::spawn(async move { svc.oneshot(req).await });
    (task, handle)
}

async fn body_of(req: Req) -> Bytes {
    req.into_body().collect().await.unwrap().to_bytes()
}

/// No further request arrives (the paused clock runs far ahead while waiting).
async fn assert_no_more_requests(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await;
    assert!(
        matches!(next, Err(_) | Ok(None)),
        "unexpected extra attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn not_sent_is_retried_and_the_body_replayed() {
    let (task, mut handle) = spawn_call(policy(), request("pay 10"));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(body_of(req).await, "pay 10");
    send.send_error(NotSent::new(std::io::Error::from(
        std::io::ErrorKind::ConnectionRefused,
    )));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(body_of(req).await, "pay 10", "the same body, replayed");
    send.send_response(status(200));
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_retry_carries_the_same_head_with_every_header_value() {
    let mut req = request("pay 10");
    *req.version_mut() = http::Version::HTTP_2;
    let h = req.headers_mut();
    h.append("x-tag", http::HeaderValue::from_static("a"));
    h.insert("x-request-id", http::HeaderValue::from_static("r-1"));
    h.append("x-tag", http::HeaderValue::from_static("b"));
    let mut secret = http::HeaderValue::from_static("k");
    secret.set_sensitive(true);
    h.insert("x-api-key", secret);
    let (task, mut handle) = spawn_call(policy(), req);
    let head = |req: &Req| {
        let pairs: Vec<(String, String, bool)> = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.to_str().unwrap().to_owned(),
                    v.is_sensitive(),
                )
            })
            .collect();
        (
            req.method().clone(),
            req.uri().clone(),
            req.version(),
            pairs,
        )
    };
    let (first, send) = handle.next_request().await.unwrap();
    let sent = head(&first);
    send.send_response(refused());
    let (second, send) = handle.next_request().await.unwrap();
    assert_eq!(head(&second), sent);
    assert_eq!(
        second.headers().get_all("x-tag").iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(body_of(second).await, "pay 10");
    send.send_response(status(200));
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn rejected_is_retried() {
    for rejected in [refused(), status(429)] {
        let code = rejected.status();
        let (task, mut handle) = spawn_call(policy(), request("x"));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(rejected);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(status(200));
        assert_eq!(task.await.unwrap().unwrap().status(), 200, "{code}");
    }
    // A 503 without `Retry-After` may come from a gateway after the request went through: a
    // plain call is not replayed.
    let (task, mut handle) = spawn_call(policy(), request("pay 10"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(503));
    assert_eq!(task.await.unwrap().unwrap().status(), 503);
    assert_no_more_requests(&mut handle).await;
    // gRPC UNAVAILABLE as an error.
    let (task, mut handle) = spawn_call(policy(), request("x"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(tonic::Status::unavailable("draining"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(200));
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn unknown_is_not_retried_unless_idempotent() {
    let (task, mut handle) = spawn_call(policy(), request("pay 10"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(500));
    assert_eq!(task.await.unwrap().unwrap().status(), 500);
    assert_no_more_requests(&mut handle).await;

    let (task, mut handle) = spawn_call(policy(), request("pay 10"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let err = task.await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<std::io::Error>().is_some());
    assert_no_more_requests(&mut handle).await;

    let mut req = request("get");
    req.extensions_mut().insert(Idempotent);
    let (task, mut handle) = spawn_call(policy(), req);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(500));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(200));
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn unknown_with_idempotency_key_reuses_the_key() {
    let mut req = request("pay 10");
    req.extensions_mut()
        .insert(IdempotencyKey("7f1c-pay".to_owned()));
    let (task, mut handle) = spawn_call(policy(), req);
    for _ in 0..2 {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.headers()[IDEMPOTENCY_KEY_HEADER], "7f1c-pay");
        send.send_error(std::io::Error::from(std::io::ErrorKind::TimedOut));
    }
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()[IDEMPOTENCY_KEY_HEADER], "7f1c-pay");
    send.send_response(status(200));
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_idempotency_key_the_server_could_not_use_is_not_sent() {
    // Without its key (a line break cannot be a header value), or with one a Keel server
    // refuses (empty, too long, not ASCII), the call could not be de-duplicated: it fails with
    // `InvalidIdempotencyKey` before any attempt, whatever the retry policy.
    let long = "k".repeat(256);
    for key in ["7f1c-pay\n", "", "  ", long.as_str(), "caf\u{e9}"] {
        for max_attempts in [1, 3] {
            let mut req = request("pay 10");
            req.extensions_mut().insert(IdempotencyKey(key.to_owned()));
            let (task, mut handle) = spawn_call(policy().max_attempts(max_attempts), req);
            let error = task.await.unwrap().unwrap_err();
            assert!(
                error.is::<crate::request::InvalidIdempotencyKey>(),
                "{key:?}: {error}"
            );
            assert_no_more_requests(&mut handle).await;
        }
    }
    // A caller's own header is held to the same rule.
    let mut req = request("pay 10");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, http::HeaderValue::from_static(""));
    let (task, mut handle) = spawn_call(policy(), req);
    assert!(task.await.unwrap().is_err());
    assert_no_more_requests(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn max_attempts_bounds_retries() {
    let (task, mut handle) = spawn_call(policy().max_attempts(3), request("x"));
    for _ in 0..3 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(refused());
    }
    assert_eq!(task.await.unwrap().unwrap().status(), 503);
    assert_no_more_requests(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn spent_budget_stops_retries() {
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.0));
    let (task, mut handle) = spawn_call(RetryPolicy::new(budget).max_attempts(5), request("x"));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(refused());
    assert_eq!(task.await.unwrap().unwrap().status(), 503);
    assert_no_more_requests(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn bodies_over_the_cap_are_not_replayed() {
    let (task, mut handle) = spawn_call(policy().max_replay_body(4), request("too long"));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(!req.body().is_buffered());
    assert_eq!(body_of(req).await, "too long", "sent whole, once");
    send.send_response(refused());
    assert_eq!(task.await.unwrap().unwrap().status(), 503);
    assert_no_more_requests(&mut handle).await;
}

/// A body that is not ready on its first poll: a stream still being produced.
struct Streaming(Option<Bytes>, bool);

impl Body for Streaming {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(start_paused = true)]
async fn streaming_bodies_are_never_replayed() {
    let (svc, mut handle) =
        mock::pair::<http::Request<ReplayBody<Streaming>>, http::Response<Res>>();
    handle.allow(10);
    let svc = Retry::new(svc, policy());
    let req = http::Request::new(Streaming(Some(Bytes::from_static(b"chunk")), false));
    let task = tokio::spawn(svc.oneshot(req));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(!req.body().is_buffered());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "chunk", "the stream is still delivered whole");
    send.send_response(refused());
    assert_eq!(task.await.unwrap().unwrap().status(), 503);
    let next = tokio::time::timeout(Duration::from_secs(60), handle.next_request()).await;
    assert!(matches!(next, Err(_) | Ok(None)));
}

#[tokio::test(start_paused = true)]
async fn a_retry_restamps_the_rest_deadline_and_both_when_both_are_sent() {
    use crate::deadline::{Deadline, GRPC_TIMEOUT, KEEL_DEADLINE, parse_grpc_timeout};
    for both in [false, true] {
        let mut req = request("x");
        req.extensions_mut()
            .insert(Deadline::after(Duration::from_millis(800)));
        req.headers_mut()
            .insert(KEEL_DEADLINE, http::HeaderValue::from_static("800"));
        if both {
            req.headers_mut()
                .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("800m"));
        }
        let (task, mut handle) = spawn_call(policy(), req);
        let (first, send) = handle.next_request().await.unwrap();
        assert_eq!(first.headers()[KEEL_DEADLINE], "800");
        tokio::time::advance(Duration::from_millis(100)).await;
        send.send_response(refused());
        let (second, send) = handle.next_request().await.unwrap();
        let left: u64 = second.headers()[KEEL_DEADLINE]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(left < 700, "re-stamped with the time left: {left}");
        assert_eq!(second.headers().get_all(KEEL_DEADLINE).iter().count(), 1);
        if both {
            let grpc = second.headers()[GRPC_TIMEOUT].to_str().unwrap();
            let left = parse_grpc_timeout(grpc).unwrap();
            assert!(left < Duration::from_millis(700), "{grpc}");
        } else {
            assert!(!second.headers().contains_key(GRPC_TIMEOUT));
        }
        send.send_response(status(200));
        assert_eq!(task.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn retries_restamp_the_deadline_and_stop_before_it() {
    use crate::deadline::{Deadline, GRPC_TIMEOUT, parse_grpc_timeout};
    let mut req = request("x");
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(800)));
    req.headers_mut()
        .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("800m"));
    let policy = policy()
        .max_attempts(10)
        .backoff(Duration::from_millis(300), Duration::from_millis(300));
    let (task, mut handle) = spawn_call(policy, req);
    let mut last = Duration::from_millis(801);
    let mut attempts = 0;
    while let Ok(Some((req, send))) =
        tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
    {
        let sent = req.headers()[GRPC_TIMEOUT].to_str().unwrap().to_owned();
        let remaining = parse_grpc_timeout(&sent).unwrap();
        assert!(remaining < last || attempts == 0, "{sent} must shrink");
        last = remaining;
        attempts += 1;
        tokio::time::advance(Duration::from_millis(50)).await;
        send.send_response(refused());
    }
    assert_eq!(task.await.unwrap().unwrap().status(), 503);
    assert!(
        (1..10).contains(&attempts),
        "stopped by the deadline: {attempts}"
    );
}

/// A refusal in the deadline's last millisecond is not retried: timers fire on whole
/// milliseconds, so the retry would go out in the deadline's own tick with nothing left
/// (`grpc-timeout: 0n`), and the caller would get an unknown outcome instead of the refusal.
#[tokio::test(start_paused = true)]
async fn no_retry_is_sent_in_the_deadlines_last_millisecond() {
    use crate::deadline::{Deadline, GRPC_TIMEOUT};
    for _ in 0..20 {
        let mut req = request("x");
        req.extensions_mut()
            .insert(Deadline::after(Duration::from_millis(100)));
        req.headers_mut()
            .insert(GRPC_TIMEOUT, http::HeaderValue::from_static("100m"));
        let policy = policy().backoff(Duration::from_micros(900), Duration::from_micros(900));
        let (task, mut handle) = spawn_call(policy, req);
        let (_, send) = handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_micros(99_050)).await;
        send.send_response(refused());
        // Any retry would be due within the backoff (under 1 ms), before the deadline.
        let retry = tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await;
        let sent = retry.ok().flatten().map(|(req, _)| {
            req.headers()[GRPC_TIMEOUT]
                .to_str()
                .unwrap_or("?")
                .to_owned()
        });
        assert_eq!(sent, None, "a retry went out with {sent:?} left");
        assert_eq!(task.await.unwrap().unwrap().status(), 503);
    }
}

/// A retry whose task is polled only past the deadline (a busy runtime) is not sent. The call
/// fails with the deadline passed: before anything was sent when the earlier attempt was
/// refused, in flight when it may have executed (an UNKNOWN outcome of an idempotent call).
#[tokio::test(start_paused = true)]
async fn a_retry_polled_after_the_deadline_is_not_sent() {
    use crate::deadline::{Deadline, DeadlineExceeded};
    for (answer, idempotent, executed) in [(refused(), false, false), (status(500), true, true)] {
        let mut req = request("x");
        req.extensions_mut()
            .insert(Deadline::after(Duration::from_millis(100)));
        if idempotent {
            req.extensions_mut().insert(Idempotent);
        }
        let (svc, mut handle) = mock::pair::<Req, http::Response<Res>>();
        handle.allow(100);
        let policy = policy().backoff(Duration::from_millis(10), Duration::from_millis(10));
        let mut svc = Retry::new(svc, policy);
        svc.ready().await.unwrap();
        let mut call = std::pin::pin!(svc.call(req));
        assert!(futures::poll!(call.as_mut()).is_pending());
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(answer);
        assert!(futures::poll!(call.as_mut()).is_pending(), "backing off");
        // Not polled again until well past the deadline.
        tokio::time::advance(Duration::from_millis(150)).await;
        let error = tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .expect("the call ends at once, sending nothing")
            .unwrap_err();
        let late = error.downcast_ref::<DeadlineExceeded>().unwrap();
        assert_eq!(late.is_elapsed(), executed, "{late:?}");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), handle.next_request())
                .await
                .is_err(),
            "no attempt after the deadline"
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Route(u8);

#[derive(Clone, Debug)]
struct Private;

/// With `attempt_extensions`, every attempt (first and replayed) carries only what the copy
/// function forwards, while the layer still decides on the call's own markings (`Idempotent`
/// here, not forwarded: the UNKNOWN outcome is retried).
#[tokio::test(start_paused = true)]
async fn attempts_carry_only_the_forwarded_extensions() {
    let policy = policy().attempt_extensions(|from, to| {
        if let Some(route) = from.get::<Route>() {
            to.insert(*route);
        }
    });
    let mut req = request("get");
    req.extensions_mut().insert(Idempotent);
    req.extensions_mut().insert(Route(7));
    req.extensions_mut().insert(Private);
    let (task, mut handle) = spawn_call(policy, req);
    for code in [500, 200] {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.extensions().get::<Route>(), Some(&Route(7)));
        assert!(req.extensions().get::<Private>().is_none());
        assert!(req.extensions().get::<Idempotent>().is_none());
        send.send_response(status(code));
    }
    assert_eq!(task.await.unwrap().unwrap().status(), 200);
    assert_no_more_requests(&mut handle).await;
}

/// The future tells an empty budget apart from the other reasons a call stops being retried.
#[tokio::test(start_paused = true)]
async fn the_future_reports_a_refusal_by_the_budget() {
    async fn run(policy: RetryPolicy, answers: usize) -> (u16, bool, u32) {
        let (svc, mut handle) = mock::pair::<Req, http::Response<Res>>();
        handle.allow(100);
        let mut svc = Retry::new(svc, policy);
        let mut fut = std::pin::pin!(svc.ready().await.unwrap().call(request("x")));
        let respond = async {
            for _ in 0..answers {
                let (_, send) = handle.next_request().await.unwrap();
                send.send_response(refused());
            }
        };
        let (result, ()) = tokio::join!(fut.as_mut(), respond);
        let status = result.unwrap().status().as_u16();
        (status, fut.budget_refused(), fut.attempts())
    }
    let empty = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.0));
    assert_eq!(
        run(RetryPolicy::new(empty).max_attempts(5), 1).await,
        (503, true, 1)
    );
    assert_eq!(
        run(policy().max_attempts(2), 2).await,
        (503, false, 2),
        "out of attempts, not of budget"
    );
}

/// Every attempt of one call goes through the same service instance (the one made ready), so
/// the service can carry per-call state from one attempt to the next.
#[tokio::test(start_paused = true)]
async fn every_attempt_uses_the_service_made_ready() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Tagged {
        id: u64,
        next: Arc<AtomicU64>,
        seen: Arc<Mutex<Vec<u64>>>,
    }
    impl Clone for Tagged {
        fn clone(&self) -> Self {
            Self {
                id: self.next.fetch_add(1, Ordering::Relaxed),
                next: Arc::clone(&self.next),
                seen: Arc::clone(&self.seen),
            }
        }
    }
    impl tower_service::Service<Req> for Tagged {
        type Response = http::Response<Res>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<http::Response<Res>, BoxError>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: Req) -> Self::Future {
            self.seen.lock().unwrap().push(self.id);
            std::future::ready(Ok(refused()))
        }
    }

    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = Tagged {
        id: 0,
        next: Arc::new(AtomicU64::new(1)),
        seen: Arc::clone(&seen),
    };
    let mut svc = Retry::new(svc, policy().max_attempts(3));
    for _ in 0..2 {
        let res = svc.ready().await.unwrap().call(request("x")).await.unwrap();
        assert_eq!(res.status(), 503);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen[..3].iter().all(|id| *id == seen[0]), "{seen:?}");
    assert!(seen[3..].iter().all(|id| *id == seen[3]), "{seen:?}");
    assert_ne!(
        seen[0], seen[3],
        "each call gets its own instance: {seen:?}"
    );
}

/// A response body that counts what was read of it and whether it was dropped.
struct Tracked {
    /// Chunks of 1 000 bytes still to yield; `None` for no end.
    chunks: Option<usize>,
    /// Yield nothing, ever (a stalled body).
    stall: bool,
    /// Bytes per chunk.
    size: usize,
    read: Arc<std::sync::atomic::AtomicUsize>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.stall {
            return Poll::Pending;
        }
        match &mut self.chunks {
            Some(0) => return Poll::Ready(None),
            Some(n) => *n -= 1,
            None => {}
        }
        let size = self.size;
        self.read
            .fetch_add(size.max(1), std::sync::atomic::Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0; size])))))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The response of an attempt that is retried is read to its end (so its connection can be
/// reused) while the retry waits, but at most about 64 KiB of it, and a body that does not end
/// never delays the retry beyond its backoff.
#[tokio::test(start_paused = true)]
async fn a_retried_response_is_drained_within_bounds() {
    use std::sync::atomic::Ordering::SeqCst;
    // (chunks, stall, bytes a chunk); an endless body of empty frames is given up too.
    for (chunks, stall, size) in [
        (Some(3), false, 1_000),
        (None, false, 1_000),
        (None, true, 1_000),
        (None, false, 0),
    ] {
        let (svc, mut handle) = mock::pair::<Req, http::Response<Tracked>>();
        handle.allow(10);
        let svc = Retry::new(svc, policy());
        let task = tokio::spawn(svc.oneshot(request("x")));
        let (read, dropped) = (Arc::default(), Arc::default());
        let body = |chunks, stall| Tracked {
            chunks,
            stall,
            size,
            read: Arc::clone(&read),
            dropped: Arc::clone(&dropped),
        };
        let (_, send) = handle.next_request().await.unwrap();
        let refused_at = tokio::time::Instant::now();
        let (parts, _) = refused().into_parts();
        send.send_response(http::Response::from_parts(parts, body(chunks, stall)));
        let (_, send) = handle.next_request().await.unwrap();
        assert!(
            refused_at.elapsed() <= Duration::from_millis(100),
            "retried within the backoff's cap ({chunks:?}, stall {stall})"
        );
        assert!(dropped.load(SeqCst), "the refused response is done with");
        let read = read.load(SeqCst);
        match (chunks, stall, size) {
            (Some(n), _, _) => assert_eq!(read, n * 1_000, "read to its end"),
            (None, false, 0) => assert!((1_000..=1_025).contains(&read), "{read} frames"),
            (None, false, _) => assert!((64_000..=66_536).contains(&read), "{read}"),
            (None, true, _) => assert_eq!(read, 0),
        }
        send.send_response(http::Response::new(body(Some(0), false)));
        assert_eq!(task.await.unwrap().unwrap().status(), 200);
    }
}
