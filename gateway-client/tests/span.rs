//! Client spans: one per call, a child of the caller's context, whose own context is what goes
//! downstream in `traceparent`; failures mark it. (Own test binary: it installs OpenTelemetry's
//! global tracer provider.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_client::GrpcChannel;
use keel_testkit::echo::{EchoRequest, echo_client::EchoClient};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, Key, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanProcessor};

use common::{RestProvider, providers};

/// Keeps every ended span.
#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Collect {
    fn client_spans(&self) -> Vec<SpanData> {
        self.named("grpc.client")
    }

    fn named(&self, name: &str) -> Vec<SpanData> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == Key::from(key.to_owned()))
        .map(|kv| &kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_makes_a_client_span_whose_context_goes_downstream() {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Built after the provider was installed: clients resolve the global tracer when built.
    client_spans_are_made_and_propagated(GrpcChannel::builder("echo"), &spans).await;
    let _ = provider.shutdown();
}

/// A client given an SDK provider makes its spans there, whatever the global provider is
/// (what `keel::App` does with the provider it installs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_a_provider_makes_its_spans_there() {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    client_spans_are_made_and_propagated(
        GrpcChannel::builder("echo").tracer_provider(&provider),
        &spans,
    )
    .await;
    let _ = provider.shutdown();
}

/// Three calls through a channel from `builder` (one continuing a remote trace, one failing,
/// one outside any trace) each make one client span, collected by `spans`, whose context goes
/// downstream.
async fn client_spans_are_made_and_propagated(builder: keel_client::GrpcBuilder, spans: &Collect) {
    let (ps, faults) = providers(1).await;
    let channel = builder
        .max_attempts(1)
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel);

    let trace_id = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128);
    let caller = SpanId::from(0x00f0_67aa_0ba9_02b7_u64);
    let remote = SpanContext::new(
        trace_id,
        caller,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let cx = Context::new().with_remote_span_context(remote);
    let call = |message: &str| {
        tonic::Request::new(EchoRequest {
            message: message.into(),
            payload: Vec::new(),
        })
    };

    let reply = {
        let _guard = cx.clone().attach();
        client.echo(call("traced")).await.unwrap().into_inner()
    };
    let ended = spans.client_spans();
    assert_eq!(ended.len(), 1, "one client span per call: {ended:?}");
    let span = &ended[0];
    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(
        span.span_context.trace_id(),
        trace_id,
        "continues the trace"
    );
    assert_eq!(span.parent_span_id, caller, "a child of the caller's span");
    assert_eq!(
        reply.metadata["traceparent"],
        format!("00-{trace_id}-{}-01", span.span_context.span_id()),
        "the server's parent is the client span"
    );
    assert_eq!(
        attribute(span, "rpc.method"),
        Some(&Value::from("/keel.echo.v1.Echo/Echo"))
    );
    assert_eq!(attribute(span, "rpc.service"), Some(&Value::from("echo")));
    assert_eq!(attribute(span, "rpc.system"), Some(&Value::from("grpc")));
    assert_eq!(span.status, Status::Unset);

    // A failed call marks its span, with the gRPC status code.
    faults[0].fail_every(1, tonic::Code::InvalidArgument);
    let status = {
        let _guard = cx.attach();
        client.echo(call("refused")).await.unwrap_err()
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let ended = spans.client_spans();
    assert_eq!(ended.len(), 2, "{ended:?}");
    let failed = &ended[1];
    assert!(
        matches!(failed.status, Status::Error { .. }),
        "{:?}",
        failed.status
    );
    assert_eq!(
        attribute(failed, "rpc.grpc.status_code"),
        Some(&Value::I64(tonic::Code::InvalidArgument as i64))
    );

    // A call outside any trace starts one.
    faults[0].heal();
    let reply = client.echo(call("root")).await.unwrap().into_inner();
    let ended = spans.client_spans();
    assert_eq!(ended.len(), 3);
    let root = &ended[2];
    assert_ne!(root.span_context.trace_id(), trace_id);
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_eq!(
        reply.metadata["traceparent"],
        format!(
            "00-{}-{}-01",
            root.span_context.trace_id(),
            root.span_context.span_id()
        )
    );
}

/// REST calls make `http.client` spans too, here through a provider handed to the builder: the
/// route, method and peer service as attributes, the span's context downstream, a failed call
/// marked with its HTTP status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_calls_make_client_spans_in_the_given_provider() {
    let spans = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    let p = RestProvider::start("r-0").await;
    let client = keel_client::RestClient::builder("accounts")
        .tracer_provider(&provider)
        .max_attempts(1)
        .endpoints([p.url()])
        .unwrap();

    let got: serde_json::Value = client.get("/accounts/7").await.unwrap();
    let ended = spans.named("http.client");
    assert_eq!(ended.len(), 1, "{ended:?}");
    let span = &ended[0];
    assert_eq!(span.span_kind, SpanKind::Client);
    assert_eq!(
        got["headers"]["traceparent"],
        format!(
            "00-{}-{}-01",
            span.span_context.trace_id(),
            span.span_context.span_id()
        ),
        "the server's parent is the client span"
    );
    assert_eq!(
        attribute(span, "http.route"),
        Some(&Value::from("GET /accounts/{id}"))
    );
    assert_eq!(
        attribute(span, "http.request.method"),
        Some(&Value::from("GET"))
    );
    assert_eq!(
        attribute(span, "peer.service"),
        Some(&Value::from("accounts"))
    );
    assert_eq!(span.status, Status::Unset);

    let err = client
        .get::<serde_json::Value>("/accounts/missing")
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));
    let ended = spans.named("http.client");
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(matches!(ended[1].status, Status::Error { .. }));
    assert_eq!(
        attribute(&ended[1], "http.response.status_code"),
        Some(&Value::I64(404))
    );
    let _ = provider.shutdown();
}
