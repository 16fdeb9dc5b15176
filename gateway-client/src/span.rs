//! The client span of one call, made through the OpenTelemetry API directly.
//!
//! Not a `tracing` span: going through `tracing` a span costs a registry slot, the log
//! formatter's field rendering and the OpenTelemetry layer's builder and context activation on
//! every enter — several microseconds and ~14 allocations per call. Here it is one span of the
//! tracer Keel resolved when the client was built ([`opentelemetry::global::tracer`]: the
//! provider the application installed, `keel::Telemetry` does), with three attributes, ended when
//! the call completes (or is dropped). Without an installed provider the span is OpenTelemetry's
//! no-op span, which still carries the caller's trace context downstream.
//!
//! The span's parent is the caller's current OpenTelemetry context ([`Context::current`], which
//! `tracing-opentelemetry` keeps in step with the current `tracing` span), or the trace context
//! already in the request's `traceparent` header when the caller put one there; the span's own
//! context is what goes downstream, so the server's span is the client span's child.

use std::borrow::Cow;

use http::HeaderMap;
use keel_core::propagation::{HeaderExtractor, TRACEPARENT, extract_with_context};
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::trace::{Span as _, SpanBuilder, SpanContext, SpanKind, Status, Tracer as _};
use opentelemetry::{Context, KeyValue, StringValue};

/// `traceparent` as a [`http::HeaderName`] (a lookup by `&str` parses the name first).
const TRACEPARENT_HEADER: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);

/// The tracer client spans are made with: the global provider's, resolved once per client.
pub(crate) fn tracer() -> BoxedTracer {
    opentelemetry::global::tracer("keel-client")
}

/// The caller's context for a request: the current one, or the one in its `traceparent`.
pub(crate) fn parent(headers: &HeaderMap) -> Context {
    let current = Context::current();
    if headers.contains_key(TRACEPARENT_HEADER) {
        extract_with_context(&current, &HeaderExtractor(headers))
    } else {
        current
    }
}

/// One call's client span; ends when the call completes or is dropped.
pub(crate) struct CallSpan(BoxedSpan);

impl CallSpan {
    /// Starts a client span named `name` under `parent` with `attributes` (built only when the
    /// span records).
    pub(crate) fn start<const N: usize>(
        tracer: &BoxedTracer,
        name: &'static str,
        parent: &Context,
        attributes: impl FnOnce() -> [KeyValue; N],
    ) -> Self {
        let mut span = tracer.build_with_context(
            SpanBuilder::from_name(name).with_kind(SpanKind::Client),
            parent,
        );
        if span.is_recording() {
            span.set_attributes(attributes());
        }
        Self(span)
    }

    /// The span's context (what goes downstream in `traceparent`).
    pub(crate) fn span_context(&self) -> &SpanContext {
        self.0.span_context()
    }

    /// Marks the call failed and ends the span.
    pub(crate) fn fail(mut self, description: impl Into<Cow<'static, str>>) {
        if self.0.is_recording() {
            self.0.set_status(Status::error(description));
        }
        self.0.end();
    }

    /// Marks the call failed with `key` = `value` (e.g. the gRPC status code) and ends the span.
    pub(crate) fn fail_with(mut self, description: String, key: &'static str, value: i64) {
        if self.0.is_recording() {
            self.0.set_attribute(KeyValue::new(key, value));
            self.0.set_status(Status::error(description));
        }
        self.0.end();
    }

    /// Ends the span of a successful call.
    pub(crate) fn succeed(mut self) {
        self.0.end();
    }
}

/// An attribute value shared between calls (no copy per call).
pub(crate) fn shared(value: &StringValue) -> opentelemetry::Value {
    opentelemetry::Value::String(value.clone())
}
