//! W3C trace context and baggage over any header map.
//!
//! [`inject`] writes `traceparent`, `tracestate` and `baggage` for a context; [`extract`] reads
//! them back into a context whose parent is the remote span. Both work through OpenTelemetry's
//! [`Injector`] / [`Extractor`] traits, so the same code serves HTTP headers ([`HeaderInjector`],
//! [`HeaderExtractor`]), gRPC metadata, Kafka and AMQP message headers. Only the OpenTelemetry
//! *API* is used: which SDK (if any) records spans is the application's choice.
//!
//! Malformed incoming headers are ignored (the call simply starts a new trace); they never fail a
//! request.
//!
//! ```
//! use keel_core::propagation::{extract, inject, HeaderExtractor, HeaderInjector, TRACEPARENT};
//! use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
//! use opentelemetry::Context;
//!
//! let remote = SpanContext::new(
//!     TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736_u128),
//!     SpanId::from(0x00f067aa0ba902b7_u64),
//!     TraceFlags::SAMPLED,
//!     true,
//!     TraceState::default(),
//! );
//! let cx = Context::new().with_remote_span_context(remote.clone());
//!
//! let mut headers = http::HeaderMap::new();
//! inject(&cx, &mut HeaderInjector(&mut headers));
//! assert_eq!(
//!     headers[TRACEPARENT],
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
//! );
//!
//! let back = extract(&HeaderExtractor(&headers));
//! assert_eq!(back.span().span_context(), &remote);
//! ```

use std::fmt::Write as _;
use std::str::FromStr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::baggage::{BaggageExt, BaggageMetadata};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{KeyValue, StringValue};

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";
/// The W3C `baggage` header.
pub const BAGGAGE: &str = "baggage";
/// The request id header Keel stamps on every outgoing request.
pub const REQUEST_ID: &str = "x-request-id";

/// Writes the W3C trace context and baggage of `cx` through `injector`.
///
/// Nothing is written for a context without a valid span; no `baggage` header for empty baggage.
pub fn inject(cx: &Context, injector: &mut dyn Injector) {
    inject_span(cx.span().span_context(), cx, injector);
}

/// Writes `sc` as the W3C trace context (e.g. a client span started under `cx`) and the baggage
/// of `cx` through `injector`.
///
/// Nothing is written for an invalid `sc`; no `baggage` header for empty baggage.
pub fn inject_span(sc: &SpanContext, cx: &Context, injector: &mut dyn Injector) {
    if sc.is_valid() {
        // Only ASCII hex digits and dashes were written: the conversion cannot fail.
        let value = String::from_utf8(traceparent(sc).to_vec()).unwrap_or_default();
        injector.set(TRACEPARENT, value);
        let state = sc.trace_state().header();
        if !state.is_empty() {
            injector.set(TRACESTATE, state);
        }
    }
    inject_baggage(cx, injector);
}

fn inject_baggage(cx: &Context, injector: &mut dyn Injector) {
    let baggage = cx.baggage();
    if !baggage.is_empty() {
        let mut header = String::new();
        for (key, (value, metadata)) in baggage.iter() {
            if !header.is_empty() {
                header.push(',');
            }
            header.push_str(key.as_str());
            header.push('=');
            percent_encode_into(&mut header, value.as_str());
            if !metadata.as_str().is_empty() {
                let _ = write!(header, ";{}", metadata.as_str());
            }
        }
        injector.set(BAGGAGE, header);
    }
}

/// [`inject`] for the current context ([`Context::current`]).
pub fn inject_current(injector: &mut dyn Injector) {
    inject(&Context::current(), injector);
}

/// The `traceparent` value of `sc` (`00-{trace id}-{span id}-{flags}`), formatted on the stack
/// without the formatting machinery (this runs on every outgoing call).
///
/// ```
/// use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
/// let sc = SpanContext::new(
///     TraceId::from(0x0af7651916cd43dd8448eb211c80319c),
///     SpanId::from(0xb7ad6b7169203331),
///     TraceFlags::SAMPLED,
///     false,
///     TraceState::default(),
/// );
/// assert_eq!(
///     &keel_core::propagation::traceparent(&sc),
///     b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
/// );
/// ```
pub fn traceparent(sc: &SpanContext) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    crate::header::hex_into(&mut out[3..35], &sc.trace_id().to_bytes());
    crate::header::hex_into(&mut out[36..52], &sc.span_id().to_bytes());
    let flags = sc.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8();
    crate::header::hex_into(&mut out[53..], &[flags]);
    out
}

/// [`inject_span`] straight into an [`http::HeaderMap`]: the `traceparent` value is made with
/// [`per_call_value`](crate::header::per_call_value) (one allocation that clones share, sent
/// never-indexed over HTTP/2) rather than through a `String`.
pub fn inject_span_headers(sc: &SpanContext, cx: &Context, headers: &mut HeaderMap) {
    let value = if sc.is_valid() {
        crate::header::per_call_value(&traceparent(sc))
    } else {
        None
    };
    inject_span_headers_with(sc, value, cx, headers);
}

/// [`inject_span_headers`] with the `traceparent` value of `sc` already made (by
/// [`traceparent`], e.g. into one allocation with other per-call values through
/// [`per_call_values`](crate::header::per_call_values)); `None` sends no `traceparent`.
pub fn inject_span_headers_with(
    sc: &SpanContext,
    traceparent: Option<HeaderValue>,
    cx: &Context,
    headers: &mut HeaderMap,
) {
    if let Some(value) = traceparent {
        headers.insert(HeaderName::from_static(TRACEPARENT), value);
        let state = sc.trace_state().header();
        if !state.is_empty() {
            HeaderInjector(headers).set(TRACESTATE, state);
        }
    }
    inject_baggage(cx, &mut HeaderInjector(headers));
}

/// Reads W3C trace context and baggage through `extractor` into a new context.
///
/// The returned context carries the remote span context (when `traceparent` is valid) and the
/// baggage (when `baggage` is present); anything malformed is ignored.
pub fn extract(extractor: &dyn Extractor) -> Context {
    extract_with_context(&Context::new(), extractor)
}

/// Like [`extract`], layered over `cx` (e.g. [`Context::current`]).
pub fn extract_with_context(cx: &Context, extractor: &dyn Extractor) -> Context {
    let mut cx = cx.clone();
    if let Some(sc) = extractor
        .get(TRACEPARENT)
        .and_then(|tp| parse_traceparent(tp, extractor.get(TRACESTATE).unwrap_or_default()))
    {
        cx = cx.with_remote_span_context(sc);
    }
    if let Some(header) = extractor.get(BAGGAGE) {
        let entries: Vec<_> = parse_baggage(header).collect();
        if !entries.is_empty() {
            cx = cx.with_baggage(entries);
        }
    }
    cx
}

/// Parses a `traceparent` (and its `tracestate`) into a remote span context.
///
/// Returns `None` for anything that is not a valid W3C version-00 (or later, forward compatible)
/// header, including the all-zero trace and span ids.
pub fn parse_traceparent(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if version.len() != 2 || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    if trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
        return None;
    }
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(trace_id) || !lower_hex(span_id) || !lower_hex(flags) {
        return None;
    }
    let trace_id = TraceId::from(u128::from_str_radix(trace_id, 16).ok()?);
    let span_id = SpanId::from(u64::from_str_radix(span_id, 16).ok()?);
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = TraceState::from_str(tracestate).unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

fn parse_baggage(
    header: &str,
) -> impl Iterator<Item = opentelemetry::baggage::KeyValueMetadata> + '_ {
    header.split(',').filter_map(|member| {
        let (kv, metadata) = member.split_once(';').unwrap_or((member, ""));
        let (key, value) = kv.split_once('=')?;
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        let value = percent_decode(value.trim())?;
        Some(opentelemetry::baggage::KeyValueMetadata::new(
            key.to_owned(),
            StringValue::from(value),
            BaggageMetadata::from(metadata.trim()),
        ))
    })
}

fn percent_encode_into(out: &mut String, value: &str) {
    for b in value.bytes() {
        // W3C baggage-octet: printable ASCII except space, '"', ',', ';', '\\' and '%'.
        let keep = (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b',' | b';' | b'\\' | b'%');
        if keep {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Writes into an [`http::HeaderMap`]; values that are not valid header values are skipped.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The W3C names as static header names, and the value's buffer reused: no copies.
        let name = match key {
            TRACEPARENT => Ok(HeaderName::from_static(TRACEPARENT)),
            TRACESTATE => Ok(HeaderName::from_static(TRACESTATE)),
            BAGGAGE => Ok(HeaderName::from_static(BAGGAGE)),
            _ => HeaderName::from_bytes(key.as_bytes()),
        };
        // A `traceparent` is new on every request: a per-call value, which HTTP/2 sends "never
        // indexed" instead of adding it to (and evicting useful entries from) both ends' HPACK
        // tables.
        let value = if key == TRACEPARENT {
            crate::header::per_call_value(value.as_bytes())
        } else {
            HeaderValue::try_from(value).ok()
        };
        if let (Ok(name), Some(value)) = (name, value) {
            self.0.insert(name, value);
        }
    }
}

/// Reads from an [`http::HeaderMap`]; non-UTF-8 values read as absent.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Baggage entries of `cx` as key/value pairs (e.g. for log fields or span attributes).
pub fn baggage_of(cx: &Context) -> Vec<KeyValue> {
    cx.baggage()
        .iter()
        .map(|(k, (v, _))| KeyValue::new(k.clone(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> SpanContext {
        SpanContext::new(
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            SpanId::from(0xb7ad6b7169203331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_str("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7").unwrap(),
        )
    }

    #[test]
    fn round_trips_trace_context_and_state() {
        let cx = Context::new().with_remote_span_context(remote());
        let mut headers = HeaderMap::new();
        inject(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers[TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(
            headers[TRACESTATE],
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        let back = extract(&HeaderExtractor(&headers));
        assert_eq!(back.span().span_context(), &remote());
    }

    #[test]
    fn traceparent_is_never_indexed_and_formats_unsampled_flags() {
        let sc = SpanContext::new(
            TraceId::from(0x0000000000000000000000000000a0ff_u128),
            SpanId::from(0x0100000000000000_u64),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        let mut headers = HeaderMap::new();
        inject_span(&sc, &Context::new(), &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers[TRACEPARENT],
            "00-0000000000000000000000000000a0ff-0100000000000000-00"
        );
        assert!(headers[TRACEPARENT].is_sensitive());
    }

    #[test]
    fn header_map_injection_matches_the_injector_path() {
        let cx = Context::new()
            .with_remote_span_context(remote())
            .with_baggage([KeyValue::new("tenant", "a b")]);
        let mut generic = HeaderMap::new();
        inject(&cx, &mut HeaderInjector(&mut generic));
        let mut direct = HeaderMap::new();
        inject_span_headers(&remote(), &cx, &mut direct);
        assert_eq!(generic, direct);
        assert_eq!(direct.len(), 3, "{direct:?}");
        assert!(direct[TRACEPARENT].is_sensitive());
        let mut none = HeaderMap::new();
        inject_span_headers(&SpanContext::empty_context(), &Context::new(), &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn no_span_no_headers() {
        let mut headers = HeaderMap::new();
        inject(&Context::new(), &mut HeaderInjector(&mut headers));
        assert!(headers.is_empty());
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031ñ-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad, "").is_none(), "{bad:?} parsed");
        }
        // A future version may append fields.
        assert!(
            parse_traceparent(
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
                ""
            )
            .is_some()
        );
    }

    #[test]
    fn baggage_round_trips_with_encoding() {
        let cx = Context::new().with_baggage([
            KeyValue::new("account", "acc 42"),
            KeyValue::new("tenant", "bank;a,b%"),
        ]);
        let mut headers = HeaderMap::new();
        inject(&cx, &mut HeaderInjector(&mut headers));
        let header = headers[BAGGAGE].to_str().unwrap().to_owned();
        assert!(header.contains("account=acc%2042"), "{header}");
        let back = extract(&HeaderExtractor(&headers));
        let mut kvs: Vec<_> = baggage_of(&back)
            .into_iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        kvs.sort();
        assert_eq!(
            kvs,
            [
                ("account".to_owned(), "acc 42".to_owned()),
                ("tenant".to_owned(), "bank;a,b%".to_owned())
            ]
        );
    }

    #[test]
    fn malformed_baggage_members_are_skipped() {
        let mut headers = HeaderMap::new();
        headers.insert(BAGGAGE, HeaderValue::from_static("=x,ok=1,bad=%zz,also"));
        let back = extract(&HeaderExtractor(&headers));
        let kvs = baggage_of(&back);
        assert_eq!(kvs.len(), 1);
        assert_eq!(kvs[0].key.as_str(), "ok");
    }
}
