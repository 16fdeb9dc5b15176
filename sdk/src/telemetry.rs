//! Logs and traces for an App: a `tracing` subscriber (pretty or JSON) and, when an OTLP
//! endpoint is configured, OpenTelemetry traces exported over OTLP/HTTP.
//!
//! Spans always carry OpenTelemetry ids (an SDK tracer provider is installed even without an
//! exporter), so the trace id of an incoming request flows into every outgoing call and message.
//! Nothing is exported unless `telemetry.otlp_endpoint` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryConfig};
use crate::error::Error;

/// The installed telemetry; flushes and shuts the trace exporter down on [`Telemetry::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the subscriber and tracer provider described by `config` for `service`; the
    /// provider also becomes OpenTelemetry's global one, through which Keel's clients and
    /// consumers make their spans (clients resolve it when they are built).
    ///
    /// When a global subscriber is already installed (e.g. by a test harness, or a second App in
    /// one process) Keel keeps it and logs nothing about it.
    ///
    /// # Errors
    /// When the OTLP exporter cannot be built or the log filter does not parse.
    pub fn install(service: &str, config: &TelemetryConfig) -> Result<Self, Error> {
        if config.format == LogFormat::None {
            return Ok(Self { provider: None });
        }
        let filter = match std::env::var("RUST_LOG") {
            Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive),
            _ => EnvFilter::try_new(&config.level),
        }
        .map_err(|e| Error::config("telemetry.level", e.to_string()))?;

        let mut builder = SdkTracerProvider::builder().with_resource(
            Resource::builder_empty()
                .with_service_name(service.to_owned())
                .build(),
        );
        if let Some(endpoint) = &config.otlp_endpoint {
            let exporter = SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| Error::config("telemetry.otlp_endpoint", e.to_string()))?;
            builder = builder.with_batch_exporter(exporter);
        }
        let provider = builder.build();
        let tracer = provider.tracer("keel");
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_context_activation(true);

        // The log filter applies to log output only: spans that carry trace context (info level,
        // e.g. Keel's server and client spans) exist whatever the log level, or a `warn` log
        // level would silently break trace propagation.
        let otel = otel.with_filter(LevelFilter::INFO);
        let registry = tracing_subscriber::registry().with(otel);
        let installed = match config.format {
            LogFormat::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_filter(filter),
                )
                .try_init()
                .is_ok(),
            _ => registry
                .with(tracing_subscriber::fmt::layer().with_filter(filter))
                .try_init()
                .is_ok(),
        };
        if installed {
            // Keel's clients and consumers make their spans through the OpenTelemetry API
            // (`opentelemetry::global::tracer`): they go to this provider too.
            opentelemetry::global::set_tracer_provider(provider.clone());
        }
        Ok(Self {
            provider: installed.then_some(provider),
        })
    }

    /// The tracer provider installed (also the global one), if any: `App` hands it to its
    /// clients, whose spans then skip the global API's box.
    pub fn tracer_provider(&self) -> Option<&SdkTracerProvider> {
        self.provider.as_ref()
    }

    /// Telemetry that installed nothing.
    pub fn none() -> Self {
        Self { provider: None }
    }

    /// Flushes pending spans and stops the exporter (blocking: call it off the async workers,
    /// e.g. in `spawn_blocking`).
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider {
            if let Err(e) = provider.force_flush() {
                tracing::warn!(error = %e, "flushing traces failed");
            }
            let _ = provider.shutdown();
        }
    }
}
