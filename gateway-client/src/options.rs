//! Settings shared by the gRPC and REST builders, and the per-call work both clients do
//! around their stack (propagation, metrics, error classification).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Extensions, HeaderMap, HeaderName, HeaderValue};
use keel_breaker::BoxError;
use keel_breaker::breaker::BreakerConfig;
use keel_breaker::bulkhead::Bulkhead;
use keel_breaker::deadline::{Deadline, GRPC_TIMEOUT, parse_grpc_timeout};
use keel_breaker::retry::{RetryBudget, RetryPolicy};
use keel_core::header::{per_call_value, per_call_values};
use keel_core::propagation::{REQUEST_ID, inject_span_headers_with};
use opentelemetry::{Context, KeyValue};
use tokio::sync::oneshot;

use crate::balance::{BalanceConfig, HashKey, Set};
use crate::error::Error;
use crate::metrics::ClientMetrics;
use crate::span::CallSpan;

/// TLS settings: the CAs that sign the servers' certificates — given as PEM, the platform's
/// store, or both — and optionally the name to verify them against (default: the instance's
/// host). Keel trusts no CA unless told.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) system_roots: bool,
    pub(crate) domain: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_pem_len", &self.ca_pem.len())
            .field("system_roots", &self.system_roots)
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsConfig {
    /// Trust the CA certificate(s) in `pem` (an internal CA).
    pub fn with_ca_pem(pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: pem.into(),
            system_roots: false,
            domain: None,
        }
    }

    /// Trust the platform's CA store: on Linux the system bundle (Debian's `ca-certificates`,
    /// `/etc/ssl/certs`), or the file named by `SSL_CERT_FILE` / the directory named by
    /// `SSL_CERT_DIR` when set — for a public endpoint such as an API gateway or a payment
    /// provider. Loaded when the client is built; a client built while no CA can be loaded
    /// fails to build ([`Error::is_config`](crate::Error::is_config)).
    pub fn system_roots() -> Self {
        Self {
            ca_pem: Vec::new(),
            system_roots: true,
            domain: None,
        }
    }

    /// Trust the platform's CA store as well (see [`system_roots`](Self::system_roots)).
    pub fn and_system_roots(mut self) -> Self {
        self.system_roots = true;
        self
    }

    /// Verify server certificates against `name` (also sent as SNI) instead of the instance's
    /// host, for gRPC and REST alike: for instances registered by IP address whose certificates
    /// name a service DNS name. A REST client with a `name` that is no valid DNS name or IP
    /// address fails to build ([`Error::is_config`](crate::Error::is_config)).
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }
}

/// `x-request-id` as a [`HeaderName`]: inserting by `&'static str` copies a custom name into a
/// new allocation on every call.
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);

/// The default of the builders' `tcp_keepalive`.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The values the builders' `tcp_keepalive` accepts: whole seconds as the kernel counts them
/// (`TCP_KEEPIDLE` is at least 1 s and at most 32 767 s).
pub const TCP_KEEPALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(32_767);

/// Settings common to both clients.
#[derive(Clone)]
pub(crate) struct Options {
    pub(crate) service: String,
    pub(crate) balance: BalanceConfig,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) budget: Arc<RetryBudget>,
    pub(crate) breaker: BreakerConfig,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) connect_timeout: Duration,
    /// See `tcp_keepalive` of the builders; `None`: the system's defaults.
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) request_id: bool,
    /// `(max concurrent calls, longest wait for a slot)`; `None`: no bulkhead.
    pub(crate) bulkhead: Option<(usize, Duration)>,
    /// The SDK tracer of the client spans; `None`: the global provider's.
    pub(crate) tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// Headers sent with every request unless the request has its own of that name.
    pub(crate) default_headers: HeaderMap,
    /// The first default header whose name or value is invalid (reported by the build).
    pub(crate) invalid_header: Option<String>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("service", &self.service)
            .field("balance", &self.balance)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("breaker", &self.breaker)
            .field("tls", &self.tls)
            .field("bulkhead", &self.bulkhead)
            .finish_non_exhaustive()
    }
}

impl Options {
    pub(crate) fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            balance: BalanceConfig::default(),
            timeout: None,
            max_attempts: 3,
            backoff: (Duration::from_millis(10), Duration::from_millis(500)),
            budget: Arc::new(RetryBudget::default()),
            breaker: default_endpoint_breaker(),
            tls: None,
            connect_timeout: Duration::from_secs(2),
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            request_id: true,
            bulkhead: None,
            tracer: None,
            default_headers: HeaderMap::new(),
            invalid_header: None,
        }
    }

    /// Checks what the builder methods could not report.
    ///
    /// # Errors
    /// [`Error::is_config`] for an invalid default header, TCP keep-alive or breaker
    /// configuration.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let Some(name) = &self.invalid_header {
            return Err(Error::config(format!(
                "invalid default header {name:?} (name or value)"
            )));
        }
        if let Some(idle) = self.tcp_keepalive
            && !TCP_KEEPALIVE_RANGE.contains(&idle)
        {
            return Err(Error::config(format!(
                "tcp_keepalive must be between 1 s and {} s, not {idle:?}",
                TCP_KEEPALIVE_RANGE.end().as_secs()
            )));
        }
        self.breaker
            .validate()
            .map_err(|e| Error::config(e.to_string()))
    }

    /// `inner` behind the client's bulkhead: one slot per call (all attempts included), shared
    /// by every clone of the client. Without a configured bulkhead calls pass straight through
    /// (no semaphore per call).
    pub(crate) fn bulkhead<S>(&self, inner: S) -> Bulkhead<S> {
        match self.bulkhead {
            Some((permits, wait)) => {
                Bulkhead::new(inner, Arc::new(tokio::sync::Semaphore::new(permits)), wait)
            }
            None => Bulkhead::unbounded(inner),
        }
    }

    pub(crate) fn policy(&self) -> RetryPolicy {
        RetryPolicy::new(Arc::clone(&self.budget))
            .max_attempts(self.max_attempts)
            .backoff(self.backoff.0, self.backoff.1)
            .attempt_extensions(balancer_extensions)
    }
}

/// `name: value` as a header, or why it is not one (naming the header, not echoing the value,
/// which may be a secret).
pub(crate) fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|e| format!("invalid header name {name:?}: {e}"))?;
    let value = HeaderValue::from_str(value)
        .map_err(|e| format!("invalid value of header {name:?}: {e}"))?;
    Ok((header, value))
}

/// Adds each of the client's `defaults` (all its values) that `headers` has no value of: the
/// call's own headers win.
pub(crate) fn add_defaults(defaults: &HeaderMap, headers: &mut HeaderMap) {
    if defaults.is_empty() {
        return;
    }
    for name in defaults.keys() {
        if let http::header::Entry::Vacant(slot) = headers.entry(name) {
            let mut values = defaults.get_all(name).iter();
            if let Some(first) = values.next() {
                let mut entry = slot.insert_entry(first.clone());
                for value in values {
                    entry.append(value.clone());
                }
            }
        }
    }
}

/// What each attempt carries below the retry layer: only the balancer reads extensions there
/// (the call's hash key); the rest stay with the call, uncloned.
fn balancer_extensions(from: &Extensions, to: &mut Extensions) {
    if let Some(key) = from.get::<HashKey>() {
        to.insert(*key);
    }
}

/// The per-endpoint breaker used unless configured otherwise: eject an endpoint that fails half
/// of at least 5 of its last 20 calls, probe it with 3 calls after 2 s (growing up to 60 s while
/// it keeps failing).
pub fn default_endpoint_breaker() -> BreakerConfig {
    BreakerConfig {
        failure_rate_threshold: 50.0,
        sliding_window_size: 20,
        minimum_number_of_calls: 5,
        wait_duration_in_open_state: Duration::from_secs(2),
        permitted_number_of_calls_in_half_open_state: 3,
        ..BreakerConfig::default()
    }
}

/// State shared by every clone of one client.
pub(crate) struct Shared<C> {
    /// The downstream service's name (shared with the span attributes, not copied per call).
    pub(crate) service: opentelemetry::StringValue,
    /// The tracer of the client spans.
    pub(crate) tracer: crate::span::ClientTracer,
    pub(crate) set: Arc<Set<C>>,
    pub(crate) metrics: ClientMetrics,
    pub(crate) request_id: bool,
    /// Headers sent with every request unless it has its own of that name.
    pub(crate) default_headers: HeaderMap,
    id_prefix: u64,
    id_counter: AtomicU64,
    pub(crate) _closed: Option<oneshot::Sender<()>>,
}

impl<C> fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("service", &self.service.as_str())
            .field("set", &self.set)
            .finish_non_exhaustive()
    }
}

impl<C> Shared<C> {
    pub(crate) fn new(
        options: &Options,
        set: Arc<Set<C>>,
        closed: Option<oneshot::Sender<()>>,
    ) -> Self {
        Self {
            service: opentelemetry::StringValue::from(Arc::<str>::from(options.service.as_str())),
            tracer: crate::span::ClientTracer::new(options.tracer.as_ref()),
            set,
            metrics: ClientMetrics::default(),
            request_id: options.request_id,
            default_headers: options.default_headers.clone(),
            id_prefix: rand::random(),
            id_counter: AtomicU64::new(0),
            _closed: closed,
        }
    }

    /// A new request id: the client's random prefix and a counter, in hex.
    fn request_id(&self) -> [u8; 32] {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        keel_core::header::hex_into(&mut buf[..16], &self.id_prefix.to_be_bytes());
        keel_core::header::hex_into(&mut buf[16..], &n.to_be_bytes());
        buf
    }

    /// Starts one call: its client span `name` (with `attributes`) under the caller's context,
    /// whose trace context (and the caller's baggage) it stamps on the outgoing headers, with the
    /// request id; a deadline given as `grpc-timeout` goes into the extensions.
    pub(crate) fn begin<const N: usize>(
        &self,
        parts: &mut http::request::Parts,
        name: &'static str,
        attributes: impl FnOnce() -> [KeyValue; N],
    ) -> CallSpan {
        let parent = crate::span::parent(&parts.headers);
        let span = CallSpan::start(&self.tracer, name, &parent, attributes);
        self.prepare(&mut parts.headers, &mut parts.extensions, &span, &parent);
        span
    }

    fn prepare(
        &self,
        headers: &mut HeaderMap,
        extensions: &mut Extensions,
        span: &CallSpan,
        parent: &Context,
    ) {
        let sc = span.span_context();
        let traceparent = sc
            .is_valid()
            .then(|| keel_core::propagation::traceparent(sc));
        let traceparent = match headers.entry(REQUEST_ID_HEADER) {
            // The request id and the `traceparent` share one allocation (which the retry
            // layer's copy shares too); both are sent never indexed over HTTP/2.
            http::header::Entry::Vacant(slot) if self.request_id => {
                let id = self.request_id();
                match &traceparent {
                    Some(tp) => per_call_values([&id[..], &tp[..]]).map(|[id, tp]| {
                        slot.insert(id);
                        tp
                    }),
                    None => {
                        if let Some(id) = per_call_value(&id) {
                            slot.insert(id);
                        }
                        None
                    }
                }
            }
            _ => traceparent.and_then(|tp| per_call_value(&tp)),
        };
        inject_span_headers_with(sc, traceparent, parent, headers);
        if extensions.get::<Deadline>().is_none()
            && let Some(timeout) = headers
                .get(GRPC_TIMEOUT)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
        {
            extensions.insert(Deadline::after(timeout));
        }
    }

    /// Turns a failed call into the client's [`Error`]; `budget_refused` (from the retry layer)
    /// says the failure would have been retried but for an empty retry budget.
    pub(crate) fn failure(&self, error: BoxError, budget_refused: bool) -> Error {
        let error = Error::from_box(error);
        if budget_refused
            && !error.is_deadline_exceeded()
            && !error.is_no_endpoints()
            && !error.is_all_ejected()
            && !error.is_bulkhead_full()
        {
            return Error::budget_exhausted(Box::new(error));
        }
        error
    }
}

/// The future of a client's stack inside its bulkhead.
type DeadlineFuture<S, F, B, C, R> =
    keel_breaker::deadline::ResponseFuture<keel_breaker::retry::ResponseFuture<S, F, B, C, R>>;

/// Whether the call of `fut` (complete) ended on a failure the retry layer would have retried
/// but for an empty budget.
pub(crate) fn budget_refused<S, F, B, C, R>(
    fut: &keel_breaker::bulkhead::ResponseFuture<DeadlineFuture<S, F, B, C, R>>,
) -> bool {
    fut.get_ref()
        .and_then(keel_breaker::deadline::ResponseFuture::get_ref)
        .is_some_and(keel_breaker::retry::ResponseFuture::budget_refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_and_never_indexed_and_travel_with_the_traceparent() {
        use http::HeaderValue;
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let options = Options::new("svc");
        let shared: Shared<()> =
            Shared::new(&options, Arc::new(Set::new(options.balance.clone())), None);
        let sc = SpanContext::new(
            TraceId::from(7),
            SpanId::from(9),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let parent = Context::new().with_remote_span_context(sc);
        let stamp = |parent: &Context| {
            let (mut headers, mut extensions) = (HeaderMap::new(), Extensions::new());
            let span = CallSpan::start(&shared.tracer, "t", parent, || []);
            shared.prepare(&mut headers, &mut extensions, &span, parent);
            headers
        };
        let (a, b) = (stamp(&parent), stamp(&parent));
        let (id_a, id_b) = (&a[REQUEST_ID], &b[REQUEST_ID]);
        assert_ne!(id_a, id_b);
        assert_eq!(id_a.len(), 32);
        assert!(id_a.is_sensitive() && id_b.is_sensitive());
        let tp = &a["traceparent"];
        assert_eq!(
            tp,
            "00-00000000000000000000000000000007-0000000000000009-01"
        );
        assert!(tp.is_sensitive());
        // Without a trace context: the request id alone.
        let alone = stamp(&Context::new());
        assert_eq!(alone[REQUEST_ID].len(), 32);
        assert!(!alone.contains_key("traceparent"));
        // A request id of the caller's stays.
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("mine"));
        let span = CallSpan::start(&shared.tracer, "t", &parent, || []);
        shared.prepare(&mut headers, &mut Extensions::new(), &span, &parent);
        assert_eq!(headers[REQUEST_ID], "mine");
        assert!(headers.contains_key("traceparent"));
    }

    #[test]
    fn defaults_fill_in_only_names_the_request_lacks_with_all_their_values() {
        let mut defaults = http::HeaderMap::new();
        defaults.append("x-api-key", http::HeaderValue::from_static("k"));
        defaults.append("x-tag", http::HeaderValue::from_static("a"));
        defaults.append("x-tag", http::HeaderValue::from_static("b"));
        let mut headers = http::HeaderMap::new();
        headers.insert("x-api-key", http::HeaderValue::from_static("mine"));
        add_defaults(&defaults, &mut headers);
        assert_eq!(
            headers.get_all("x-api-key").iter().collect::<Vec<_>>(),
            ["mine"]
        );
        assert_eq!(
            headers.get_all("x-tag").iter().collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}
