//! Prometheus metrics of an App, served at the admin port's `/metrics`.
//!
//! - `keel_server_requests_total{protocol,method,status}`,
//!   `keel_server_errors_total{protocol,method}`,
//!   `keel_server_request_duration_seconds{protocol,method}`, `keel_server_in_flight`:
//!   RED metrics of every gRPC method and REST route served.
//! - `keel_client_requests_total{service,method}`, `keel_client_errors_total{…}`,
//!   `keel_client_request_duration_seconds{…}`: RED metrics of every client the App built.
//! - `keel_ready`: 1 while the instance is registered and serving.
//! - `keel_idempotency_*`: executions, replays (duplicates prevented), conflicts, store errors.

use std::fmt;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
}

impl ServerMetrics {
    pub(crate) fn record(
        &self,
        protocol: &'static str,
        method: &str,
        status: &str,
        error: bool,
        secs: f64,
    ) {
        let method_labels = MethodLabels {
            protocol,
            method: method.to_owned(),
        };
        self.duration.get_or_create(&method_labels).observe(secs);
        if error {
            self.errors.get_or_create(&method_labels).inc();
        }
        self.requests
            .get_or_create(&RequestLabels {
                protocol,
                method: method_labels.method,
                status: status.to_owned(),
            })
            .inc();
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
        let server = Arc::new(ServerMetrics {
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(histogram as fn() -> Histogram),
            in_flight: Gauge::default(),
        });
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
