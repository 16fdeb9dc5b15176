//! Telemetry of an App (its own process: the App installs the global subscriber): the server
//! span continues the caller's trace into the App's outgoing calls, and spans are exported over
//! OTLP/HTTP when an endpoint is configured.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use keel::App;
use keel::client::{GrpcChannel, RestClient};
use keel::config::Config;
use keel_testkit::echo::echo_client::EchoClient;
use keel_testkit::echo::{EchoProvider, EchoRequest};
use keel_testkit::eventually;

#[tokio::test]
async fn the_callers_trace_continues_downstream_and_spans_are_exported() {
    // A stand-in OTLP/HTTP collector counting trace exports.
    let exports = Arc::new(AtomicU64::new(0));
    let collector = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                |State(n): State<Arc<AtomicU64>>, body: axum::body::Bytes| async move {
                    if !body.is_empty() {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    ""
                },
            ),
        )
        .with_state(Arc::clone(&exports));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await });

    // Downstream: an echo server that reports the headers it received.
    let echo = EchoProvider::start("downstream").await.unwrap();
    let config = Config::from_toml(&format!(
        r#"
        [registry]
        static = {{ echo = ["{}"] }}
        [telemetry]
        format = "json"
        level = "warn"
        otlp_endpoint = "http://{collector_addr}"
        [server]
        drain = "10ms"
        "#,
        echo.addr()
    ))
    .unwrap();
    let app = App::with_config("tracer", config).await.unwrap();
    let channel: GrpcChannel = app.grpc("echo").unwrap();
    let routes = axum::Router::new()
        .route(
            "/relay",
            get(|State(channel): State<GrpcChannel>| async move {
                let reply = EchoClient::new(channel)
                    .echo(EchoRequest {
                        message: "relay".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                reply
                    .metadata
                    .get("traceparent")
                    .cloned()
                    .unwrap_or_default()
            }),
        )
        .with_state(channel);
    let running = app.rest(routes).start().await.unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = RestClient::builder("tracer")
        .max_attempts(1)
        .base_url(&format!("http://{}", running.rest_addr().unwrap()))
        .unwrap();
    let res = client
        .request(http::Method::GET, "/relay")
        .header("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    let downstream = String::from_utf8_lossy(res.body()).into_owned();
    let parts: Vec<&str> = downstream.split('-').collect();
    assert_eq!(parts.len(), 4, "downstream traceparent {downstream:?}");
    assert_eq!(
        parts[1], trace_id,
        "the caller's trace continues downstream"
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the downstream parent is the App's own span, not the caller's"
    );

    // Stopping flushes the exporter: the collector received spans.
    running.stop().await.unwrap();
    eventually("spans exported over OTLP", Duration::from_secs(30), || {
        let n = exports.load(Ordering::Relaxed);
        async move { (n > 0).then_some(()) }
    })
    .await
    .unwrap();
}
