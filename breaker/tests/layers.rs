//! Deadline and bulkhead layers through their public API, with paused time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use keel_breaker::BoxError;
use keel_breaker::bulkhead::{BulkheadFull, BulkheadLayer};
use keel_breaker::deadline::{
    Deadline, DeadlineExceeded, DeadlineLayer, GRPC_TIMEOUT, KEEL_DEADLINE, Protocol,
};
use keel_breaker::status::status_of;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Req = http::Request<()>;

fn grpc_request() -> Req {
    http::Request::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn deadline_stamps_grpc_timeout_and_takes_the_sooner_incoming_deadline() {
    let (svc, mut handle) = mock::pair::<Req, http::Response<()>>();
    let mut svc = DeadlineLayer::new(Duration::from_millis(800)).layer(svc);
    handle.allow(2);
    let call = svc.ready().await.unwrap().call(grpc_request());
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()[GRPC_TIMEOUT], "800m");
    send.send_response(http::Response::new(()));
    call.await.unwrap();

    // An incoming deadline 300 ms away wins over the layer's 800 ms; 1 ms later 299 remain.
    let mut req = grpc_request();
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(300)));
    tokio::time::advance(Duration::from_millis(1)).await;
    let call = svc.ready().await.unwrap().call(req);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()[GRPC_TIMEOUT], "299m");
    send.send_response(http::Response::new(()));
    call.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deadline_rest_header_is_remaining_milliseconds() {
    let (svc, mut handle) = mock::pair::<Req, http::Response<()>>();
    let mut svc = DeadlineLayer::new(Duration::from_secs(2))
        .protocol(Protocol::Rest)
        .layer(svc);
    handle.allow(1);
    let call = svc.ready().await.unwrap().call(http::Request::new(()));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()[KEEL_DEADLINE], "2000");
    let incoming = Deadline::from_headers(req.headers()).unwrap();
    assert_eq!(incoming.remaining(), Duration::from_secs(2));
    send.send_response(http::Response::new(()));
    call.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn expired_deadline_fails_before_sending() {
    let (svc, mut handle) = mock::pair::<Req, http::Response<()>>();
    let mut svc = DeadlineLayer::propagate_only().layer(svc);
    handle.allow(1);
    let mut req = grpc_request();
    req.extensions_mut().insert(Deadline::after(Duration::ZERO));
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let d = err.downcast_ref::<DeadlineExceeded>().unwrap();
    assert!(d.is_expired_before_send());
    assert_eq!(status_of(err.as_ref()).0, tonic::Code::DeadlineExceeded);
    let next = tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await;
    assert!(next.is_err(), "nothing was sent");
}

#[tokio::test(start_paused = true)]
async fn deadline_elapses_in_flight() {
    let (svc, mut handle) = mock::pair::<Req, http::Response<()>>();
    let mut svc = DeadlineLayer::new(Duration::from_millis(50)).layer(svc);
    handle.allow(1);
    let call = tokio::spawn(svc.ready().await.unwrap().call(grpc_request()));
    let (_req, _send) = handle.next_request().await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<DeadlineExceeded>().unwrap().is_elapsed());
}

#[tokio::test(start_paused = true)]
async fn bulkhead_fails_fast_when_full_and_frees_the_slot_on_completion() {
    let (svc, mut handle) = mock::pair::<Req, ()>();
    handle.allow(10);
    let layer = BulkheadLayer::new(1);
    let mut a = layer.layer(svc.clone());
    let mut b = layer.layer(svc);
    let first = a.ready().await.unwrap().call(http::Request::new(()));
    assert_eq!(layer.available(), 0);
    let err: BoxError = b
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap_err();
    let full = err.downcast_ref::<BulkheadFull>().unwrap();
    assert!(full.is_full() && !full.is_wait_timeout());
    assert_eq!(status_of(err.as_ref()).0, tonic::Code::ResourceExhausted);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    first.await.unwrap();
    assert_eq!(layer.available(), 1, "slot released with the response");
    let second = b.ready().await.unwrap().call(http::Request::new(()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    second.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn bulkhead_bounded_wait() {
    let (svc, mut handle) = mock::pair::<Req, ()>();
    handle.allow(10);
    let layer = BulkheadLayer::new(1).max_wait(Duration::from_millis(100));
    let mut a = layer.layer(svc.clone());
    let mut b = layer.layer(svc.clone());
    let first = a.ready().await.unwrap().call(http::Request::new(()));
    // Nobody frees the slot: the wait times out.
    let start = tokio::time::Instant::now();
    let err = b
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap_err();
    assert!(
        err.downcast_ref::<BulkheadFull>()
            .unwrap()
            .is_wait_timeout()
    );
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    // The slot frees within the wait: the waiter gets it.
    let mut c = layer.layer(svc);
    let waiter = tokio::spawn(async move {
        c.ready().await.unwrap();
        c.call(http::Request::new(())).await
    });
    tokio::time::advance(Duration::from_millis(50)).await;
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    first.await.unwrap();
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    waiter.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn unbounded_bulkhead_passes_every_call_through() {
    use keel_breaker::bulkhead::Bulkhead;
    let (svc, mut handle) = mock::pair::<Req, ()>();
    handle.allow(100);
    let mut calls = Vec::new();
    for _ in 0..50 {
        let mut b = Bulkhead::unbounded(svc.clone());
        calls.push(b.ready().await.unwrap().call(http::Request::new(())));
    }
    for _ in 0..50 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(());
    }
    for c in calls {
        c.await.unwrap();
    }
}

type StreamingBody = http_body_util::StreamBody<
    futures::channel::mpsc::Receiver<Result<http_body::Frame<bytes::Bytes>, BoxError>>,
>;

/// Makes a call through `svc`, answers it with a streaming body, sends `first` on that body
/// and returns the response and the body's sender.
async fn streamed_response<S>(
    svc: &mut S,
    handle: &mut mock::Handle<Req, http::Response<StreamingBody>>,
    first: &'static [u8],
) -> (
    S::Response,
    futures::channel::mpsc::Sender<Result<http_body::Frame<bytes::Bytes>, BoxError>>,
)
where
    S: Service<Req, Error = BoxError>,
{
    let call = svc.ready().await.unwrap().call(grpc_request());
    let (_req, send) = handle.next_request().await.unwrap();
    let (mut tx, rx) = futures::channel::mpsc::channel(4);
    send.send_response(http::Response::new(http_body_util::StreamBody::new(rx)));
    let response = call.await.unwrap();
    tx.try_send(Ok(http_body::Frame::data(bytes::Bytes::from_static(first))))
        .unwrap();
    (response, tx)
}

/// A response whose head arrives in time but whose body does not end: reading the body fails
/// with the elapsed deadline; a body that ends in time is read whole.
#[tokio::test(start_paused = true)]
async fn deadline_bounds_the_response_body() {
    use http_body_util::BodyExt;

    let (svc, mut handle) = mock::pair::<Req, http::Response<StreamingBody>>();
    let mut svc = DeadlineLayer::new(Duration::from_millis(100)).layer(svc);
    handle.allow(2);

    let (response, _tx) = streamed_response(&mut svc, &mut handle, b"part").await;
    // Not `Unpin` (the timer is inline): pinned to be read frame by frame.
    let mut body = std::pin::pin!(response.into_body());
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "part");
    let started = tokio::time::Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<DeadlineExceeded>().unwrap().is_elapsed());
    assert_eq!(started.elapsed(), Duration::from_millis(100));

    let (response, tx) = streamed_response(&mut svc, &mut handle, b"whole").await;
    drop(tx);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, "whole");
}
