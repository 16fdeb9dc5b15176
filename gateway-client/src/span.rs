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
use opentelemetry_sdk::trace::SdkTracer;

/// `traceparent` as a [`http::HeaderName`] (a lookup by `&str` parses the name first).
const TRACEPARENT_HEADER: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);

/// The name of the tracer (instrumentation scope) of the client spans.
pub(crate) const TRACER_NAME: &str = "keel-client";

/// The tracer client spans are made with, resolved once per client.
pub(crate) enum ClientTracer {
    /// An SDK tracer handed to the builder: its spans are not boxed.
    Sdk(SdkTracer),
    /// The global provider's tracer.
    Global(BoxedTracer),
}

impl ClientTracer {
    /// `sdk`, or else the global provider's tracer.
    pub(crate) fn new(sdk: Option<&SdkTracer>) -> Self {
        match sdk {
            Some(tracer) => Self::Sdk(tracer.clone()),
            None => Self::Global(opentelemetry::global::tracer(TRACER_NAME)),
        }
    }
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
#[allow(
    clippy::large_enum_variant,
    reason = "the SDK span is held in place on purpose: boxing it is the allocation per call this avoids"
)]
pub(crate) enum CallSpan {
    /// A span of an SDK tracer, held in place.
    Sdk(opentelemetry_sdk::trace::Span),
    /// A span of the global tracer (boxed by OpenTelemetry's global API).
    Global(BoxedSpan),
}

/// `$body` with `$span` bound to the span inside a [`CallSpan`], whichever its kind.
macro_rules! with_span {
    ($call:expr, $span:ident => $body:expr) => {
        match $call {
            CallSpan::Sdk($span) => $body,
            CallSpan::Global($span) => $body,
        }
    };
}

impl CallSpan {
    /// Starts a client span named `name` under `parent` with `attributes` (built only when the
    /// span records).
    pub(crate) fn start<const N: usize>(
        tracer: &ClientTracer,
        name: &'static str,
        parent: &Context,
        attributes: impl FnOnce() -> [KeyValue; N],
    ) -> Self {
        let builder = SpanBuilder::from_name(name).with_kind(SpanKind::Client);
        let mut span = match tracer {
            ClientTracer::Sdk(tracer) => Self::Sdk(tracer.build_with_context(builder, parent)),
            ClientTracer::Global(tracer) => {
                Self::Global(tracer.build_with_context(builder, parent))
            }
        };
        with_span!(&mut span, s => if s.is_recording() {
            s.set_attributes(attributes());
        });
        span
    }

    /// The span's context (what goes downstream in `traceparent`).
    pub(crate) fn span_context(&self) -> &SpanContext {
        with_span!(self, s => s.span_context())
    }

    /// Marks the call failed and ends the span.
    pub(crate) fn fail(mut self, description: impl Into<Cow<'static, str>>) {
        with_span!(&mut self, s => {
            if s.is_recording() {
                s.set_status(Status::error(description));
            }
            s.end();
        });
    }

    /// Marks the call failed with `key` = `value` (e.g. the gRPC status code) and ends the span.
    pub(crate) fn fail_with(mut self, description: String, key: &'static str, value: i64) {
        with_span!(&mut self, s => {
            if s.is_recording() {
                s.set_attribute(KeyValue::new(key, value));
                s.set_status(Status::error(description));
            }
            s.end();
        });
    }

    /// Ends the span of a successful call.
    pub(crate) fn succeed(mut self) {
        with_span!(&mut self, s => s.end());
    }
}

/// An attribute value shared between calls (no copy per call).
pub(crate) fn shared(value: &StringValue) -> opentelemetry::Value {
    opentelemetry::Value::String(value.clone())
}
