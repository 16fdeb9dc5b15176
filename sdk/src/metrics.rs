//! Prometheus metrics of an App, served at the admin port's `/metrics`.
//!
//! - `keel_server_requests_total{protocol,method,status}`,
//!   `keel_server_errors_total{protocol,method}`,
//!   `keel_server_request_duration_seconds{protocol,method}`, `keel_server_in_flight`:
//!   RED metrics of every gRPC method and REST route served (`method` is the gRPC path, or
//!   `VERB /route` with a method outside the nine standard ones labelled `_OTHER`). A gRPC path
//!   no served method answers is labelled `unknown`; past 1 000 `method` series of a protocol,
//!   new ones are counted under `unknown` (gRPC) or `_OTHER` (REST).
//! - `keel_client_requests_total{service,method}`, `keel_client_errors_total{…}`,
//!   `keel_client_request_duration_seconds{…}`: RED metrics of every client the App built.
//! - `keel_ready`: 1 while the instance is registered and serving.
//! - `keel_idempotency_*`: executions, replays (duplicates prevented), conflicts, store errors.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::server::Protocol;

/// The `method` label of a gRPC path that no served method answers.
pub(crate) const UNKNOWN_GRPC: &str = "unknown";

/// The `method` label of REST requests once
/// [`MAX_METHODS`](keel_client::metrics::MAX_METHODS) REST series exist: the clients' own.
const OVERFLOW_REST: &str = keel_client::metrics::OVERFLOW_METHOD;

/// Upper bounds of the server duration histogram buckets, in seconds.
pub(crate) const BUCKETS: [f64; 11] = keel_client::metrics::BUCKETS;

/// Labels of one server request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) protocol: &'static str,
    pub(crate) method: String,
    pub(crate) status: String,
}

/// Labels of one server method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    pub(crate) protocol: &'static str,
    pub(crate) method: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The server-side RED metrics.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) errors: Family<MethodLabels, Counter>,
    pub(crate) duration: HistogramFamily,
    pub(crate) in_flight: Gauge<i64, AtomicI64>,
    /// Each method's handles into the families above, per protocol, found by name without
    /// allocating.
    methods: [RwLock<HashMap<Box<str>, Arc<MethodMetrics>>>; 2],
}

/// One served method's metrics: resolved once per request, recorded into without a label
/// lookup (the families hash and allocate their label sets only when a series is created).
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    protocol: &'static str,
    /// `/pkg.Service/Method`, or `VERB /route`.
    pub(crate) name: Box<str>,
    duration: Histogram,
    errors: Counter,
    /// The requests counter of each status seen (a handful per method).
    statuses: RwLock<Vec<(Box<str>, Counter)>>,
}

impl MethodMetrics {
    /// Counts one request that ended with `status` after `secs`.
    pub(crate) fn record(&self, family: &ServerMetrics, status: &str, error: bool, secs: f64) {
        self.duration.observe(secs);
        if error {
            self.errors.inc();
        }
        if let Some((_, counter)) = self
            .statuses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(s, _)| **s == *status)
        {
            counter.inc();
            return;
        }
        let mut statuses = self
            .statuses
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, counter)) = statuses.iter().find(|(s, _)| **s == *status) {
            counter.inc();
            return;
        }
        let counter = family
            .requests
            .get_or_create(&RequestLabels {
                protocol: self.protocol,
                method: self.name.to_string(),
                status: status.to_owned(),
            })
            .clone();
        counter.inc();
        statuses.push((status.into(), counter));
    }
}

impl ServerMetrics {
    pub(crate) fn new() -> Self {
        Self {
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(histogram as fn() -> Histogram),
            in_flight: Gauge::default(),
            methods: Default::default(),
        }
    }

    /// The metrics of `method` served over `protocol`, created on first use (its duration
    /// and error series appear then, the error count at zero). Once
    /// [`MAX_METHODS`](keel_client::metrics::MAX_METHODS) methods of
    /// `protocol` exist, a new one gets the metrics of the protocol's overflow label (`unknown`
    /// for gRPC, `_OTHER` for REST), so that whatever callers send, the metrics stay bounded
    /// (OpenTelemetry's SDK caps a metric's series in the same way).
    pub(crate) fn method(&self, protocol: Protocol, method: &str) -> Arc<MethodMetrics> {
        let methods = &self.methods[protocol as usize];
        let overflow = match protocol {
            Protocol::Grpc => UNKNOWN_GRPC,
            Protocol::Rest => OVERFLOW_REST,
        };
        keel_client::metrics::capped_series(methods, method, overflow, |name| {
            let labels = MethodLabels {
                protocol: protocol.label(),
                method: name.to_owned(),
            };
            MethodMetrics {
                protocol: protocol.label(),
                name: name.into(),
                duration: self.duration.get_or_create(&labels).clone(),
                errors: self.errors.get_or_create(&labels).clone(),
                statuses: RwLock::default(),
            }
        })
    }

    /// Counts one request of `method` (see [`MethodMetrics::record`]).
    #[cfg(test)]
    pub(crate) fn record(
        &self,
        protocol: Protocol,
        method: &str,
        status: &str,
        error: bool,
        secs: f64,
    ) {
        self.method(protocol, method)
            .record(self, status, error, secs);
    }
}

/// Every metric of an App, and the registry that renders them.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) server: Arc<ServerMetrics>,
    pub(crate) ready: Gauge<i64, AtomicI64>,
    registry: Arc<Mutex<Registry>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty set with the server metrics registered.
    pub fn new() -> Self {
        let server = Arc::new(ServerMetrics::new());
        let ready = Gauge::<i64, AtomicI64>::default();
        let mut registry = Registry::with_prefix("keel");
        registry.register(
            "server_requests",
            "Requests served, by protocol, method and status",
            server.requests.clone(),
        );
        registry.register(
            "server_errors",
            "Requests that failed (gRPC error status, HTTP 5xx)",
            server.errors.clone(),
        );
        registry.register(
            "server_request_duration_seconds",
            "Time to respond",
            server.duration.clone(),
        );
        registry.register(
            "server_in_flight",
            "Requests being served",
            server.in_flight.clone(),
        );
        registry.register(
            "ready",
            "1 while the instance is registered and serving",
            ready.clone(),
        );
        Self {
            server,
            ready,
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    /// Adds a collector read on every scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(collector);
    }

    /// A counter of the service's own, exported as `keel_<name>_total`.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register(name, help, counter.clone());
        counter
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "rendering metrics failed");
        }
        out
    }
}

/// Exports a client's [`ClientMetrics`](keel_client::metrics::ClientMetrics) snapshot.
#[derive(Debug)]
pub(crate) struct ClientCollector {
    pub(crate) service: String,
    pub(crate) metrics: keel_client::metrics::ClientMetrics,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    service: String,
    method: String,
}

impl Collector for ClientCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let snapshot = self.metrics.snapshot();
        let labels: Vec<ClientLabels> = snapshot
            .iter()
            .map(|m| ClientLabels {
                service: self.service.clone(),
                method: m.method.clone(),
            })
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "client_requests",
                "Calls made, by downstream service and method",
                None,
                MetricType::Counter,
            )?;
            for (m, l) in snapshot.iter().zip(&labels) {
                ConstCounter::new(m.requests).encode(family.encode_family(l)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "client_errors",
                "Calls that failed, by downstream service and method",
                None,
                MetricType::Counter,
            )?;
            for (m, l) in snapshot.iter().zip(&labels) {
                ConstCounter::new(m.errors).encode(family.encode_family(l)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "client_request_duration_seconds",
            "Call duration, by downstream service and method",
            None,
            MetricType::Histogram,
        )?;
        for (m, l) in snapshot.iter().zip(&labels) {
            let mut cumulative = 0;
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .zip(m.buckets)
                .map(|(upper, n)| {
                    cumulative += n;
                    (*upper, cumulative)
                })
                .chain(std::iter::once((f64::INFINITY, m.requests)))
                .collect();
            family.encode_family(l)?.encode_histogram::<NoLabelSet>(
                m.duration_sum.as_secs_f64(),
                m.requests,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

/// Exports counters read from closures at scrape time (idempotency, registry).
pub(crate) struct FnCounters {
    pub(crate) counters: Vec<FnCounter>,
}

/// A counter read at scrape time: (name, help, read).
pub(crate) type FnCounter = (
    &'static str,
    &'static str,
    Box<dyn Fn() -> u64 + Send + Sync>,
);

impl fmt::Debug for FnCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.counters.iter().map(|c| c.0))
            .finish()
    }
}

impl Collector for FnCounters {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        for (name, help, read) in &self.counters {
            let metric = ConstCounter::new(read());
            let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(e)?;
        }
        Ok(())
    }
}

pub(crate) fn inc_in_flight(m: &ServerMetrics) {
    m.in_flight.inc();
}

pub(crate) fn dec_in_flight(m: &ServerMetrics) {
    m.in_flight.dec();
}

#[cfg(test)]
mod tests {
    use keel_client::metrics::MAX_METHODS;

    use super::*;

    /// The value of the series `line` (its name and labels, as rendered) in `text`.
    fn value(text: &str, line: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
    }

    #[test]
    fn methods_past_the_cap_share_the_overflow_series() {
        let metrics = ServerMetrics::new();
        for protocol in [Protocol::Grpc, Protocol::Rest] {
            for n in 0..MAX_METHODS {
                let name = format!("/svc/m{n}");
                assert_eq!(&*metrics.method(protocol, &name).name, name);
            }
            let overflow = match protocol {
                Protocol::Grpc => UNKNOWN_GRPC,
                Protocol::Rest => OVERFLOW_REST,
            };
            // A new method gets the overflow series; the methods already seen keep theirs.
            assert_eq!(&*metrics.method(protocol, "/svc/new").name, overflow);
            assert_eq!(&*metrics.method(protocol, "/svc/other").name, overflow);
            assert_eq!(&*metrics.method(protocol, "/svc/m7").name, "/svc/m7");
            assert_eq!(&*metrics.method(protocol, overflow).name, overflow);
        }
        for methods in &metrics.methods {
            assert_eq!(methods.read().unwrap().len(), MAX_METHODS + 1);
        }
    }

    #[test]
    fn requests_are_counted_per_method_and_status_through_the_cached_handles() {
        let metrics = Metrics::new();
        let server = &metrics.server;
        for (status, error) in [("Ok", false), ("Ok", false), ("Internal", true)] {
            server.record(Protocol::Grpc, "/a.B/C", status, error, 0.002);
        }
        server.record(Protocol::Rest, "GET /accounts/{id}", "200", false, 0.02);
        // The same name under the other protocol is another method.
        server.record(Protocol::Rest, "/a.B/C", "200", false, 0.02);
        let text = metrics.render();
        let grpc = r#"protocol="grpc",method="/a.B/C""#;
        assert_eq!(
            value(
                &text,
                &format!("keel_server_requests_total{{{grpc},status=\"Ok\"}}")
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &format!("keel_server_requests_total{{{grpc},status=\"Internal\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("keel_server_errors_total{{{grpc}}}")),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("keel_server_request_duration_seconds_count{{{grpc}}}")
            ),
            Some(3.0)
        );
        let rest = r#"protocol="http",method="GET /accounts/{id}""#;
        assert_eq!(
            value(
                &text,
                &format!("keel_server_requests_total{{{rest},status=\"200\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("keel_server_errors_total{{{rest}}}")),
            Some(0.0),
            "a method's error series starts at zero"
        );
        assert_eq!(
            value(
                &text,
                r#"keel_server_requests_total{protocol="http",method="/a.B/C",status="200"}"#
            ),
            Some(1.0)
        );
    }
}
