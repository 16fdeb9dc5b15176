//! The App's configuration: a TOML file plus `KEEL_`-prefixed environment overrides.
//!
//! The file is `keel.toml` in the working directory, or the path in `KEEL_CONFIG`. Every key
//! can be overridden from the environment: `KEEL_` + the key path in upper case with `__`
//! between levels, e.g. `KEEL_SERVER__GRPC=0.0.0.0:50051` or
//! `KEEL_CLIENTS__ACCOUNT__TIMEOUT=2s`. Values are read as TOML scalars (`true`, `3`, `"x"`),
//! falling back to plain strings.
//!
//! Unknown keys are errors (a misspelt `failure_rate_treshold` must not silently fall back to a
//! default), and every error names the offending key and where its value came from:
//!
//! ```text
//! invalid duration "soon": expected e.g. "800ms", "60s", "1m30s" for key "server.drain"
//! in /srv/payment/keel.toml TOML file
//! ```
//!
//! A complete file, every section optional:
//!
//! ```toml
//! [service]
//! zone = "sh-a"                       # metadata `zone`, and the clients' preferred zone
//! advertise_host = "127.0.0.1"       # the address registered (default: the bind address)
//! metadata = { version = "1.4.2" }
//!
//! [registry]
//! zookeeper = "127.0.0.1:2181"        # or: static = { account = ["127.0.0.1:50051"] }
//! root = "/services"                  # Spring (Curator) layout root
//! session_timeout = "10s"
//!
//! [server]
//! grpc = "127.0.0.1:0"
//! rest = "127.0.0.1:0"
//! admin = "127.0.0.1:0"
//! drain = "1s"                        # after deregistering, before closing listeners
//! shutdown_timeout = "30s"            # bound on finishing in-flight work
//!
//! [telemetry]
//! format = "pretty"                   # pretty | json | none
//! level = "info"                      # an EnvFilter directive; RUST_LOG wins when set
//! otlp_endpoint = "http://127.0.0.1:4318"   # OTLP/HTTP; traces exported only when set
//!
//! [clients.account]
//! # urls = ["http://egress:8080/account"]  # instead of discovery; see ClientConfig::urls
//! balancer = "p2c"                    # p2c | round_robin | weighted | consistent_hash
//! timeout = "800ms"
//! retry = { max_attempts = 3, budget_ratio = 0.1, min_per_second = 10 }
//! breaker = { failureRateThreshold = 50, slidingWindowSize = 20 }  # others: the client's defaults
//! bulkhead = { max_concurrent = 64, max_wait = "0ms" }
//! pool = { idle_timeout = "90s", max_idle = 256 }   # REST keep-alive pool, per endpoint
//! keep_alive = { interval = "300s", timeout = "20s" } # gRPC: HTTP/2 PINGs while calls are in flight
//! tcp_keepalive = "30s"               # dead-peer detection at the TCP level; "0s": system defaults
//! tls = { ca_file = "/etc/keel/ca.pem", domain = "account.internal" } # https; domain optional
//! # tls = { system_roots = true }     # a public endpoint: the platform's CA store (with or without ca_file)
//!
//! [messaging.payments]
//! broker = "kafka://127.0.0.1:9092"
//!
//! [app]                               # the service's own settings, read with Config::app_str
//! greeting = "hello"
//!
//! [idempotency]
//! store = "memory"                    # or "redis://127.0.0.1:6379" (feature `redis`)
//! ttl = "24h"
//! failures = "release"                # a failed execution frees its key; "store": replayed
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use keel_breaker::breaker::BreakerConfig;
use serde::{Deserialize, Deserializer};

/// The top-level sections the environment may override.
const SECTIONS: [&str; 8] = [
    "app",
    "service",
    "registry",
    "server",
    "telemetry",
    "clients",
    "messaging",
    "idempotency",
];

/// A configuration that could not be read; its message names the key and the source.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {message}")]
pub struct ConfigError {
    message: String,
    key: Option<String>,
}

impl ConfigError {
    pub(crate) fn new(key: Option<String>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            key,
        }
    }

    /// The dotted key path at fault (e.g. `server.drain`), when one is known.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        let key = (!e.path.is_empty()).then(|| e.path.join("."));
        // figment's Display names the key and the source ("… for key "default.a.b" in FILE").
        // (Keel uses no figment profiles: drop the "default." profile prefix from key paths.)
        let message = e.to_string().replace("key \"default.", "key \"");
        Self { message, key }
    }
}

/// The whole configuration of one App.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity and registration details.
    pub service: ServiceConfig,
    /// Where instances are registered and discovered.
    pub registry: RegistryConfig,
    /// Listen addresses and the shutdown sequence.
    pub server: ServerConfig,
    /// Logs, traces.
    pub telemetry: TelemetryConfig,
    /// Downstream services, by name.
    pub clients: BTreeMap<String, ClientConfig>,
    /// Messaging destinations, by name.
    pub messaging: BTreeMap<String, MessagingConfig>,
    /// The server-side idempotency store.
    pub idempotency: IdempotencyConfig,
    /// The service's own settings (free-form; Keel does not read them), e.g.
    /// `[app] redis = "redis://127.0.0.1:6379"`, overridable as `KEEL_APP__REDIS`.
    pub app: BTreeMap<String, serde_json::Value>,
}

impl Config {
    /// The `[app]` setting `key` as text (strings as they are, numbers and booleans printed).
    pub fn app_str(&self, key: &str) -> Option<String> {
        match self.app.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

impl Config {
    /// Reads `path` (a missing file is an empty configuration) and overlays `KEEL_*` variables
    /// from the process environment.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the file (or variable) of a bad value.
    /// A `KEEL_*` variable whose value is not UTF-8 is an error naming it; other variables are
    /// not looked at (whatever their encoding).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            if !key.as_encoded_bytes().starts_with(b"KEEL_") {
                continue;
            }
            match (key.into_string(), value.into_string()) {
                (Ok(key), Ok(value)) => vars.push((key, value)),
                (key, _) => {
                    let name = key.unwrap_or_else(|k| k.to_string_lossy().into_owned());
                    return Err(ConfigError::new(
                        None,
                        format!("environment variable {name} is not valid UTF-8"),
                    ));
                }
            }
        }
        Self::load_with_env(path, vars)
    }

    /// [`load`](Self::load) with the environment given explicitly (for tests and tools).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        if path.exists() {
            std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(None, format!("cannot read {}: {e}", path.display()))
            })?;
        }
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("KEEL_"))
            .collect();
        let figment = Figment::new().merge(Toml::file(path)).merge(EnvVars(vars));
        let config: Self = figment.extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses `text` as the configuration file (no environment).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key at fault.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = Figment::new().merge(Toml::string(text)).extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values a type cannot: ranges, zeros that mean nothing, formats. [`load`]
    /// and [`from_toml`] call it, and so does `App::with_config` (a configuration built in
    /// code).
    ///
    /// [`load`]: Self::load
    /// [`from_toml`]: Self::from_toml
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first key whose value is out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The key in the message too: what an operator sees is the Display.
        let bad = |key: &str, why: &str| {
            Err(ConfigError::new(
                Some(key.to_owned()),
                format!("{key}: {why}"),
            ))
        };
        const DAY: Duration = Duration::from_secs(24 * 3600);
        let registry = &self.registry;
        if registry.session_timeout < Duration::from_secs(1) || registry.session_timeout > DAY {
            // ZooKeeper takes it in milliseconds as an i32: "30d" wrapped to a negative number
            // and the server silently gave its minimum (a few seconds).
            return bad(
                "registry.session_timeout",
                "must be between 1 s and 24 h (ZooKeeper then negotiates it within its bounds)",
            );
        }
        if registry.connect_timeout.is_zero() {
            return bad("registry.connect_timeout", "must be more than zero");
        }
        if registry.zookeeper.is_some() && !registry.root.starts_with('/') {
            return bad(
                "registry.root",
                "must be an absolute ZooKeeper path, e.g. /services",
            );
        }
        if registry
            .digest
            .as_deref()
            .is_some_and(|d| d.split_once(':').is_none_or(|(user, _)| user.is_empty()))
        {
            return bad("registry.digest", "must be user:password");
        }
        if self.telemetry.format == LogFormat::None && self.telemetry.otlp_endpoint.is_some() {
            // With format = "none" Keel installs no telemetry at all, so the endpoint was
            // silently never exported to.
            return bad(
                "telemetry.otlp_endpoint",
                "has no effect with telemetry.format = \"none\" (Keel then installs nothing; \
                 export from the subscriber the application installs)",
            );
        }
        let server = &self.server;
        if server.shutdown_timeout.is_zero() {
            return bad("server.shutdown_timeout", "must be more than zero");
        }
        if server.drain > server.shutdown_timeout {
            // The whole shutdown is bounded by the two; a drain of days kept a stopping
            // instance alive that long.
            return bad(
                "server.drain",
                "must not be longer than server.shutdown_timeout",
            );
        }
        if server.request_timeout.is_some_and(|t| t.is_zero()) {
            return bad(
                "server.request_timeout",
                "must be more than zero (leave it out for no timeout)",
            );
        }
        let idempotency = &self.idempotency;
        let (min, max) = (Duration::from_secs(1), crate::idempotency::MAX_TTL);
        if !(min..=max).contains(&idempotency.ttl) {
            return bad(
                "idempotency.ttl",
                "must be between 1 s and 10 years (a bare number is milliseconds)",
            );
        }
        if !(min..=max).contains(&idempotency.lease) {
            return bad(
                "idempotency.lease",
                "must be between 1 s and 10 years (a bare number is milliseconds)",
            );
        }
        for (name, client) in &self.clients {
            if client.retry.max_attempts == 0 {
                return bad(
                    &format!("clients.{name}.retry.max_attempts"),
                    "must be at least 1 (the first attempt counts)",
                );
            }
            let ratio = client.retry.budget_ratio;
            if !(0.0..=1000.0).contains(&ratio) {
                // NaN included: a budget that allowed every retry (a retry storm).
                return bad(
                    &format!("clients.{name}.retry.budget_ratio"),
                    "must be a number from 0 to 1000",
                );
            }
            for (i, url) in client.urls.iter().enumerate() {
                let uri = check_url(url).map_err(|why| {
                    ConfigError::new(
                        Some(format!("clients.{name}.urls")),
                        format!("clients.{name}.urls[{i}]: {why}"),
                    )
                })?;
                if client.tls.is_none() && uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                    // Keel trusts no CA by default: every handshake would fail.
                    return bad(
                        &format!("clients.{name}.tls"),
                        &format!(
                            "needed for urls[{i}] (https): the CA that signs its \
                             certificate, tls = {{ ca_file = \"ca.pem\" }}, or for a public \
                             endpoint tls = {{ system_roots = true }}"
                        ),
                    );
                }
            }
            if client
                .bulkhead
                .as_ref()
                .is_some_and(|b| b.max_concurrent == 0)
            {
                // The builder raises it to 1: a zero meant as "unlimited" admitted one call
                // at a time.
                return bad(
                    &format!("clients.{name}.bulkhead.max_concurrent"),
                    "must be at least 1 (leave the bulkhead out for no limit)",
                );
            }
        }
        Ok(())
    }
}

/// Checks one of `[clients.NAME] urls`: `http` or `https`, a host, and nothing a client would
/// silently drop (a query, a fragment) or that does not belong in a URL (credentials: they would
/// also show in logs and in `/registry`). The path is checked where the protocol is known
/// (`App::grpc`, `App::rest_client`). The message quotes no part of the URL that may hold a
/// secret.
fn check_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. http://host:port"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must be an http:// or https:// URL".to_owned());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(
            "holds credentials (user:password@): give them as a header, e.g. \
             headers = { authorization = \"…\" }"
                .to_owned(),
        );
    }
    if uri.query().is_some() {
        return Err(
            "has a query string, which no call would send: give the parameters per call, or \
             as headers"
                .to_owned(),
        );
    }
    if url.contains('#') {
        return Err("has a fragment, which no call would send".to_owned());
    }
    Ok(uri)
}

/// The path of one of `[clients.NAME] urls` without its trailing `/` (`None` for none, or
/// `/`), once [`check_url`] accepts it.
pub(crate) fn url_path(url: &str) -> Result<Option<String>, String> {
    let uri = check_url(url)?;
    let path = uri.path().trim_end_matches('/');
    Ok((!path.is_empty()).then(|| path.to_owned()))
}

/// The `KEEL_*` variables as a figment provider: `KEEL_A__B=v` sets key `a.b`; errors name the
/// variable.
struct EnvVars(Vec<(String, String)>);

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable").interpolater(|_, keys: &[&str]| {
            let path: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("KEEL_{}", path.join("__"))
        })
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (name, value) in &self.0 {
            let Some(rest) = name.strip_prefix("KEEL_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if !path.first().is_some_and(|s| SECTIONS.contains(&s.as_str()))
                || path.iter().any(String::is_empty)
            {
                continue;
            }
            let value: Value = match value.parse() {
                Ok(v) => v,
                Err(never) => match never {},
            };
            let nested = path.iter().rev().fold(value, |acc, key| {
                let mut d = Dict::new();
                d.insert(key.clone(), acc);
                Value::from(d)
            });
            if let Value::Dict(_, d) = nested {
                merge(&mut dict, d);
            }
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// Merges `from` into `into`, `from` winning on conflicts.
fn merge(into: &mut Dict, from: Dict) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Dict(_, existing)), Value::Dict(_, incoming)) => merge(existing, incoming),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// `[service]`: identity and registration details.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The instance id registered (default: a random UUID per start).
    pub instance_id: Option<String>,
    /// The host registered for this instance (default: the servers' bind address, or
    /// `127.0.0.1` when that is unspecified).
    pub advertise_host: Option<String>,
    /// The zone: registered as metadata `zone`, and the clients' preferred zone.
    pub zone: Option<String>,
    /// Extra metadata registered with the instance.
    pub metadata: BTreeMap<String, String>,
}

/// `[registry]`: ZooKeeper or static instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// ZooKeeper connect string (`host:port[,host:port…]`). Without it the registry is static.
    pub zookeeper: Option<String>,
    /// Root of the Spring (Curator) layout.
    pub root: String,
    /// ZooKeeper session timeout.
    #[serde(deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// Digest ACL credentials `user:password` (created nodes get CREATOR_ALL).
    pub digest: Option<String>,
    /// Static instances by service name (`host:port` each), used when `zookeeper` is unset.
    #[serde(rename = "static")]
    pub static_instances: BTreeMap<String, Vec<String>>,
    /// How long to wait, at most, for ZooKeeper at start.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            zookeeper: None,
            root: "/services".to_owned(),
            session_timeout: Duration::from_secs(10),
            digest: None,
            static_instances: BTreeMap::new(),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// `[server]`: listen addresses and the shutdown sequence.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The gRPC listener (served when gRPC services were added).
    pub grpc: SocketAddr,
    /// The REST listener (served when REST routes were added).
    pub rest: SocketAddr,
    /// The admin listener: `/health/live`, `/health/ready`, `/metrics`, `/registry`.
    pub admin: SocketAddr,
    /// After deregistering, how long to keep serving before closing the listeners (lets
    /// consumers' discovery catch up).
    #[serde(deserialize_with = "duration")]
    pub drain: Duration,
    /// Bound on finishing in-flight requests and message handlers at shutdown.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// Requests that exceed this (or their incoming deadline) fail: REST with 504, gRPC with the
    /// status tonic gives a server-side timeout (`CANCELLED`; the caller's own deadline passing
    /// shows as `DEADLINE_EXCEEDED` there).
    #[serde(deserialize_with = "opt_duration")]
    pub request_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            grpc: local(0),
            rest: local(0),
            admin: local(0),
            drain: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            request_timeout: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable, one line per event.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
    /// No subscriber is installed (the application installs its own, or none).
    None,
}

/// `[telemetry]`: logs and traces.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log output format.
    pub format: LogFormat,
    /// The log filter (an `EnvFilter` directive); `RUST_LOG` wins when set.
    pub level: String,
    /// The OTLP/HTTP endpoint traces are exported to (`/v1/traces` is appended; a collector's
    /// HTTP port, 4318 by default, not its gRPC port 4317); none by default. An error with
    /// `format = "none"`, under which Keel installs no telemetry.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
            otlp_endpoint: None,
        }
    }
}

/// How a client spreads calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Power of two choices over peak-EWMA latency.
    #[default]
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
    /// Random, weighted by the `weight` metadata.
    Weighted,
    /// Sticky by a per-call key.
    ConsistentHash,
}

/// A client's retry settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Retries allowed as a fraction of requests (the budget).
    pub budget_ratio: f32,
    /// Retries allowed per second regardless of traffic.
    pub min_per_second: u32,
    /// First backoff.
    #[serde(deserialize_with = "duration")]
    pub backoff_base: Duration,
    /// Backoff cap.
    #[serde(deserialize_with = "duration")]
    pub backoff_max: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_ratio: 0.2,
            min_per_second: 10,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
        }
    }
}

/// `[clients.NAME]`: one downstream service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// The registered service name (default: the section name).
    pub service: Option<String>,
    /// Fixed URLs (e.g. an API gateway) instead of discovery: `http://host:port` or
    /// `https://host:port`. A REST client given one URL with a path
    /// (`http://egress:8080/psp-sandbox`) sends every request under that path; several URLs,
    /// and a gRPC client's, have none. A query string, a fragment or credentials
    /// (`user:pass@`) are errors: give credentials as `headers`.
    pub urls: Vec<String>,
    /// Headers sent on every call that has none of that name (e.g. an API key); gRPC and REST.
    pub headers: BTreeMap<String, String>,
    /// The balancer.
    pub balancer: BalancerKind,
    /// Per-call timeout (the deadline sent downstream).
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Connect timeout per endpoint.
    #[serde(deserialize_with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// A new instance's share ramps up over this period.
    #[serde(deserialize_with = "opt_duration")]
    pub warm_up: Option<Duration>,
    /// Retries.
    pub retry: RetryConfig,
    /// The per-endpoint breaker (resilience4j field names). The fields a section leaves out
    /// keep the client's own per-endpoint defaults
    /// ([`default_endpoint_breaker`](keel_client::default_endpoint_breaker): eject after 5
    /// calls, probe after 2 s), not [`BreakerConfig::default`]'s.
    #[serde(deserialize_with = "endpoint_breaker")]
    pub breaker: Option<BreakerConfig>,
    /// A cap on this client's concurrent calls (all its endpoints together).
    pub bulkhead: Option<BulkheadConfig>,
    /// REST clients: the keep-alive pool of each endpoint (an error for a gRPC client, which
    /// keeps one HTTP/2 connection per endpoint).
    pub pool: Option<PoolConfig>,
    /// gRPC clients: HTTP/2 keep-alive PINGs while calls are in flight (an error for a REST
    /// client).
    pub keep_alive: Option<KeepAliveConfig>,
    /// TLS: the CAs that sign the providers' certificates (Keel trusts no CA by default), for
    /// `https://` URLs and for discovered instances that serve TLS (a Spring `sslPort`).
    pub tls: Option<TlsConfig>,
    /// Dead-peer detection at the TCP level, gRPC and REST: connections are probed after this
    /// long idle and closed once data or probes stay unacknowledged three times this long
    /// (default 30 s; zero: the system's defaults; else 1 s to 32767 s). See `tcp_keepalive` of
    /// the client builders.
    #[serde(deserialize_with = "opt_duration")]
    pub tcp_keepalive: Option<Duration>,
}

/// `[clients.NAME] tls = { ca_file = "/etc/keel/ca.pem", domain = "account.internal" }`: a
/// client's TLS settings, for gRPC and REST. `tls = { system_roots = true }` trusts the
/// platform's CA store instead (a public endpoint: an API gateway, a payment provider), or as
/// well, with a `ca_file`.
///
/// The CA file is read when the client is built (`App::grpc`, `App::rest_client`); a file that
/// cannot be read or holds no valid PEM certificate is an error naming
/// `clients.NAME.tls.ca_file`; neither a `ca_file` nor `system_roots` is an error naming
/// `clients.NAME.tls`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM file of the CA certificate(s) that sign the providers' (or the gateway's)
    /// certificates; a relative path is taken from the working directory.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Trust the platform's CA store too (on Linux the system bundle, or `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` when set); default false.
    #[serde(default)]
    pub system_roots: bool,
    /// The name certificates are verified against (also sent as SNI) instead of each URL's or
    /// instance's host: for instances registered by IP address whose certificates name a
    /// service DNS name. A DNS name or an IP address.
    #[serde(default)]
    pub domain: Option<String>,
}

/// `[clients.NAME] keep_alive = { interval = "300s", timeout = "20s" }`: a gRPC client sends a
/// PING after `interval` without a frame from a provider while calls are in flight, and closes
/// the connection (failing its calls) when it is not answered within `timeout`. The defaults
/// are those (grpc-java and grpc-go servers refuse clients that ping more often than every
/// 5 minutes); an interval of zero turns keep-alive off; a zero timeout is an error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepAliveConfig {
    /// Silence before a PING (default 5 min; zero: no keep-alive).
    #[serde(deserialize_with = "opt_duration")]
    pub interval: Option<Duration>,
    /// How long a PING may go unanswered (default 20 s).
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
}

/// `[clients.NAME] pool = { idle_timeout = "90s", max_idle = 256 }`: a REST client's keep-alive
/// connections per endpoint (gRPC keeps one HTTP/2 connection per endpoint).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// An idle connection is not reused after this long (default 90 s; zero: never reused).
    #[serde(deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// At most this many idle connections are kept (default 256).
    pub max_idle: Option<usize>,
}

/// `[clients.NAME] bulkhead = { max_concurrent = 64, max_wait = "0ms" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls in flight at most (at least 1); one more fails at once (unsent) with
    /// RESOURCE_EXHAUSTED / 503.
    pub max_concurrent: usize,
    /// How long a call may wait for a free slot before failing (default: not at all).
    #[serde(default, deserialize_with = "duration")]
    pub max_wait: Duration,
}

/// `[messaging.NAME]`: a destination.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// The broker URL: `kafka://host:port` or `amqp://user:pass@host:port/vhost`.
    pub broker: String,
    /// The topic or queue (default: the section name).
    pub destination: Option<String>,
    /// The consumer group (default: the service name).
    pub group: Option<String>,
    /// Handler attempts before a message is dead-lettered.
    pub max_attempts: Option<u32>,
    /// Partitions to create a Kafka topic with when declaring it.
    pub partitions: Option<i32>,
}

/// `[idempotency]`: the server-side idempotency store.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// `memory`, or a `redis://` URL (feature `redis`).
    pub store: String,
    /// How long a key's response is kept.
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
    /// How long a duplicate waits for the first call with its key to finish.
    #[serde(deserialize_with = "duration")]
    pub wait: Duration,
    /// How long a claim on a key lasts without renewal (renewed while the handler runs): after
    /// an instance dies mid-request, its keys are free again after this long.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// What a failed execution (5xx, `INTERNAL`, a panic…) does to its key: `release` (the
    /// default; a retry with the key runs again, right when the handler's side effects are
    /// guarded by a transaction or by keys downstream) or `store` (it is replayed to every
    /// retry; only "not executed" answers release). See `keel::idempotency::store_failures`.
    pub failures: FailurePolicy,
    /// With `store = "memory"`: the most its entries may take, in bytes (default 1 GiB). Past it
    /// new keyed requests are refused with 503 until entries expire.
    pub memory_max_bytes: usize,
}

/// `idempotency.failures`: what a failed execution does to its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Free the key: a retry executes again ([`default_disposition`](crate::idempotency::default_disposition)).
    #[default]
    Release,
    /// Keep the failure: a retry gets it replayed ([`store_failures`](crate::idempotency::store_failures)).
    Store,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            store: "memory".to_owned(),
            ttl: Duration::from_secs(24 * 3600),
            wait: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            failures: FailurePolicy::Release,
            memory_max_bytes: crate::idempotency::DEFAULT_MEMORY_MAX_BYTES,
        }
    }
}

/// Where the configuration file is: `KEEL_CONFIG`, else `keel.toml`.
pub(crate) fn default_path(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    env("KEEL_CONFIG").map_or_else(|| PathBuf::from("keel.toml"), PathBuf::from)
}

struct DurationVisitor;

impl serde::de::Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration like \"800ms\"")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
        keel_breaker::duration::parse_duration(v).map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_millis(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_millis)
            .map_err(|_| E::custom("a negative duration"))
    }
}

/// `[clients.NAME] breaker`: the fields the section gives, over the client's per-endpoint
/// defaults ([`keel_client::default_endpoint_breaker`]). Read as a whole, a partial section
/// took the rest from [`BreakerConfig::default`] (10 calls before ejecting, 5 s open), twice
/// as slow to eject as a client without the section.
///
/// The section is read by [`BreakerConfig`] itself (every spelling and form it takes, its
/// errors); the fields it gave are those named in it, in any of the spellings `BreakerConfig`
/// takes (see [`given`]). The result is checked again as a whole.
fn endpoint_breaker<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BreakerConfig>, D::Error> {
    use serde::de::Error as _;
    // The message only: the key is the section's (BreakerConfig names the field).
    let err = |e: figment::Error| D::Error::custom(e.kind);
    let dict = |config: &BreakerConfig| match Value::serialize(config) {
        Ok(Value::Dict(_, dict)) => Ok(dict),
        Ok(_) => Err(D::Error::custom("a breaker configuration is not a table")),
        Err(e) => Err(err(e)),
    };
    let section = Dict::deserialize(d)?;
    let own: BreakerConfig = Value::from(section.clone()).deserialize().map_err(err)?;
    let own = dict(&own)?;
    let mut merged = dict(&keel_client::default_endpoint_breaker())?;
    // BreakerConfig ignores what it does not know: a misspelt field fell back to its default.
    if let Some(unknown) = section.keys().find(|key| {
        !WINDOW.contains(&key.as_str()) && !merged.keys().any(|f| names(f).contains(key))
    }) {
        return Err(D::Error::custom(format_args!(
            "unknown breaker field `{unknown}`: expected a resilience4j field (camelCase, \
             snake_case or kebab-case, e.g. failureRateThreshold) or sliding_window"
        )));
    }
    for (field, value) in &mut merged {
        if given(&section, field)
            && let Some(own) = own.get(field)
        {
            *value = own.clone();
        }
    }
    Value::from(merged).deserialize().map(Some).map_err(err)
}

/// Whether a `breaker` section sets the field `BreakerConfig` serialises as `camel` (e.g.
/// `failureRateThreshold`): under that name, its snake_case or kebab-case form, or (the
/// window's type and size) as `kind` or `size` of `sliding_window = { kind, size }`.
fn given(section: &Dict, camel: &str) -> bool {
    if names(camel).iter().any(|name| section.contains_key(name)) {
        return true;
    }
    let nested = match camel {
        "slidingWindowType" => "kind",
        "slidingWindowSize" => "size",
        _ => return false,
    };
    WINDOW.iter().any(|name| match section.get(*name) {
        Some(Value::Dict(_, window)) => window.contains_key(nested),
        _ => false,
    })
}

/// The names of the nested window form in a `breaker` section.
const WINDOW: [&str; 3] = ["sliding_window", "slidingWindow", "sliding-window"];

/// The names `BreakerConfig` reads the field it serialises as `camel` under: that, its
/// snake_case and its kebab-case form.
fn names(camel: &str) -> [String; 3] {
    let mut snake = String::with_capacity(camel.len() + 8);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
        }
        snake.push(c.to_ascii_lowercase());
    }
    let kebab = snake.replace('_', "-");
    [camel.to_owned(), snake, kebab]
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    d.deserialize_any(DurationVisitor).map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn write(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = std::env::temp_dir().join(format!("keel-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        (path.clone(), Rm(path))
    }

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Any variable of the environment may be non-UTF-8 (a deploy tool's Latin-1 value):
    /// loading ignores it unless it is a `KEEL_*` one, and then names it in an error; it used to
    /// panic (`std::env::vars`). The process environment cannot be changed safely in a test, so
    /// the test runs itself as a child with such an environment.
    #[test]
    fn a_non_utf8_environment_variable_is_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        const NAME: &str = "config::tests::a_non_utf8_environment_variable_is_not_a_panic";
        let missing = Path::new("/nonexistent/keel.toml");
        match std::env::var_os("KEEL_TEST_CHILD")
            .as_deref()
            .map(|v| v.as_bytes())
        {
            Some(b"unrelated") => {
                let config = Config::load(missing).unwrap();
                assert!(config.clients.is_empty());
                return;
            }
            Some(b"keel") => {
                let error = Config::load(missing).unwrap_err();
                assert!(error.to_string().contains("KEEL_SERVER__DRAIN"), "{error}");
                return;
            }
            _ => {}
        }
        for (child, name) in [("unrelated", "UNRELATED"), ("keel", "KEEL_SERVER__DRAIN")] {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture"])
                .env("KEEL_TEST_CHILD", child)
                .env(name, std::ffi::OsStr::from_bytes(b"\xff"))
                .status()
                .unwrap();
            assert!(status.success(), "{child}: {status}");
        }
    }

    /// Values no type refuses but that make no sense, or are unsafe, are errors naming their
    /// key; each was accepted before (and silently clamped, wrapped or obeyed).
    #[test]
    fn out_of_range_values_are_errors_naming_the_key() {
        for (toml, key) in [
            // Keel installs no telemetry with format = "none": the endpoint was ignored.
            (
                "[telemetry]\nformat = \"none\"\notlp_endpoint = \"http://127.0.0.1:4318\"",
                "telemetry.otlp_endpoint",
            ),
            // Sent to ZooKeeper as an i32 of milliseconds: wrapped to a few seconds.
            (
                "[registry]\nsession_timeout = \"30d\"",
                "registry.session_timeout",
            ),
            (
                "[registry]\nsession_timeout = \"0s\"",
                "registry.session_timeout",
            ),
            (
                "[registry]\nzookeeper = \"127.0.0.1:2181\"\nroot = \"services\"",
                "registry.root",
            ),
            ("[registry]\ndigest = \"nocolon\"", "registry.digest"),
            (
                "[registry]\nconnect_timeout = \"0s\"",
                "registry.connect_timeout",
            ),
            ("[server]\ndrain = \"365d\"", "server.drain"),
            (
                "[server]\nshutdown_timeout = \"0s\"",
                "server.shutdown_timeout",
            ),
            (
                "[server]\nrequest_timeout = \"0s\"",
                "server.request_timeout",
            ),
            // Silently raised to 1 s: every retry after a second executed again.
            ("[idempotency]\nttl = \"0s\"", "idempotency.ttl"),
            ("[idempotency]\nttl = 60", "idempotency.ttl"),
            ("[idempotency]\nlease = 0", "idempotency.lease"),
            ("[idempotency]\nttl = \"20000d\"", "idempotency.ttl"),
            (
                "[clients.a]\nretry = { max_attempts = 0 }",
                "clients.a.retry.max_attempts",
            ),
            // NaN allowed every retry: a retry storm.
            (
                "[clients.a]\nretry = { budget_ratio = nan }",
                "clients.a.retry.budget_ratio",
            ),
            (
                "[clients.a]\nretry = { budget_ratio = -1.0 }",
                "clients.a.retry.budget_ratio",
            ),
            // Raised to 1 by the builder: one call at a time.
            (
                "[clients.a]\nbulkhead = { max_concurrent = 0 }",
                "clients.a.bulkhead.max_concurrent",
            ),
        ] {
            let error = Config::from_toml(toml).unwrap_err();
            assert_eq!(error.key(), Some(key), "{toml}: {error}");
            // What an operator sees names the key too.
            assert!(error.to_string().contains(key), "{toml}: {error}");
        }
        let fine = Config::from_toml(
            "[registry]\nsession_timeout = \"6s\"\n[server]\ndrain = \"500ms\"\n[idempotency]\nlease = \"3s\"\nfailures = \"store\"",
        )
        .unwrap();
        assert_eq!(fine.idempotency.failures, FailurePolicy::Store);
        let error = Config::from_toml("[idempotency]\nfailures = \"forget\"").unwrap_err();
        assert_eq!(error.key(), Some("idempotency.failures"), "{error}");
    }

    /// A partial `breaker` section keeps the client's per-endpoint defaults for the fields it
    /// leaves out, whatever the spelling of those it gives; it took `BreakerConfig::default`'s
    /// (10 calls before ejecting instead of 5, 5 s open instead of 2 s).
    #[test]
    fn a_partial_breaker_section_keeps_the_client_defaults() {
        use keel_breaker::breaker::SlidingWindowType;
        let client = keel_client::default_endpoint_breaker();
        let breaker = |section: &str| {
            let config = Config::from_toml(&format!("[clients.a]\nbreaker = {{ {section} }}"))
                .unwrap_or_else(|e| panic!("{section}: {e}"));
            config.clients["a"].breaker.clone().unwrap()
        };
        for section in [
            "failure_rate_threshold = 40",
            "failureRateThreshold = 40",
            "failure-rate-threshold = 40",
        ] {
            let expected = BreakerConfig {
                failure_rate_threshold: 40.0,
                ..client.clone()
            };
            assert_eq!(breaker(section), expected, "{section}");
        }
        // Given, so kept, though equal to BreakerConfig::default's.
        let given = breaker("minimumNumberOfCalls = 10, wait_duration_in_open_state = \"5s\"");
        assert_eq!(given.minimum_number_of_calls, 10);
        assert_eq!(given.wait_duration_in_open_state, Duration::from_secs(5));
        assert_eq!(
            given.permitted_number_of_calls_in_half_open_state,
            client.permitted_number_of_calls_in_half_open_state
        );
        // The window, nested: each of its keys on its own.
        let time = breaker("sliding_window = { kind = \"time\" }");
        assert_eq!(time.sliding_window_type, SlidingWindowType::TimeBased);
        assert_eq!(time.sliding_window_size, client.sliding_window_size);
        assert_eq!(time.minimum_number_of_calls, client.minimum_number_of_calls);
        let size = breaker("sliding_window = { size = 7 }");
        assert_eq!(
            (size.sliding_window_type, size.sliding_window_size),
            (client.sliding_window_type, 7)
        );
        // Still read and checked by BreakerConfig.
        for bad in [
            "failure_rate_threshold = 0",
            "sliding_window = { size = 7 }, slidingWindowSize = 8",
            "sliding_window = { kind = \"hourly\" }",
            "minimumNumberOfCalls = \"many\"",
        ] {
            let error =
                Config::from_toml(&format!("[clients.a]\nbreaker = {{ {bad} }}")).unwrap_err();
            assert_eq!(error.key(), Some("clients.a.breaker"), "{bad}: {error}");
        }
    }

    #[test]
    fn file_and_environment_overrides() {
        let (path, _rm) = write(
            r#"
            [registry]
            zookeeper = "127.0.0.1:2181"
            [server]
            drain = "2s"
            [clients.account]
            timeout = "800ms"
            retry = { max_attempts = 3, budget_ratio = 0.1 }
            breaker = { failureRateThreshold = 40, slidingWindowSize = 20 }
            bulkhead = { max_concurrent = 64 }
            pool = { idle_timeout = "30s", max_idle = 16 }
            keep_alive = { interval = "20s" }
            tcp_keepalive = "45s"
            [messaging.payments]
            broker = "kafka://127.0.0.1:9092"
            "#,
        );
        let config = Config::load_with_env(
            &path,
            vars(&[
                ("KEEL_SERVER__GRPC", "127.0.0.1:50051"),
                ("KEEL_CLIENTS__ACCOUNT__TIMEOUT", "2s"),
                ("KEEL_CLIENTS__ACCOUNT__RETRY__MAX_ATTEMPTS", "5"),
                ("KEEL_SERVICE__ZONE", "sh-a"),
                ("KEEL_RUN_KNOWN_BUGS", "1"), // not a section: ignored
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.grpc.port(), 50051);
        assert_eq!(config.server.drain, Duration::from_secs(2));
        let account = &config.clients["account"];
        assert_eq!(account.timeout, Some(Duration::from_secs(2)));
        assert_eq!(account.retry.max_attempts, 5);
        assert!((account.retry.budget_ratio - 0.1).abs() < 1e-6);
        assert!((account.breaker.as_ref().unwrap().failure_rate_threshold - 40.0).abs() < 1e-6);
        assert_eq!(account.bulkhead.as_ref().unwrap().max_concurrent, 64);
        assert_eq!(account.bulkhead.as_ref().unwrap().max_wait, Duration::ZERO);
        let pool = account.pool.as_ref().unwrap();
        assert_eq!(pool.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(pool.max_idle, Some(16));
        let keep_alive = account.keep_alive.as_ref().unwrap();
        assert_eq!(
            (keep_alive.interval, keep_alive.timeout),
            (Some(Duration::from_secs(20)), None)
        );
        assert_eq!(account.tcp_keepalive, Some(Duration::from_secs(45)));
        assert_eq!(config.service.zone.as_deref(), Some("sh-a"));
        assert_eq!(
            config.messaging["payments"].broker,
            "kafka://127.0.0.1:9092"
        );
        assert_eq!(config.registry.zookeeper.as_deref(), Some("127.0.0.1:2181"));
    }

    #[test]
    fn a_bad_file_value_names_the_key_and_the_file() {
        let (path, _rm) = write("[server]\ndrain = \"soon\"\n");
        let err = Config::load_with_env(&path, vars(&[])).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.key(), Some("server.drain"), "{text}");
        assert!(text.contains("drain"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("soon"), "{text}");
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let (path, _rm) = write("");
        let err = Config::load_with_env(&path, vars(&[("KEEL_SERVER__ADMIN", "not-an-address")]))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("KEEL_SERVER__ADMIN"), "{text}");
        assert_eq!(err.key(), Some("server.admin"), "{text}");
    }

    #[test]
    fn unknown_keys_and_malformed_toml_are_errors() {
        let err = Config::from_toml("[server]\ngrcp = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("grcp"), "{err}");
        let (path, _rm) = write("[server\n");
        let err = Config::load_with_env(&path, vars(&[])).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let err = Config::from_toml("[telemetry]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("xml"), "{err}");
        let err = Config::from_toml("[clients.account]\npool = { max_idel = 4 }\n").unwrap_err();
        assert!(err.to_string().contains("max_idel"), "{err}");
        // BreakerConfig itself ignores unknown fields: this one fell back to a default.
        let err = Config::from_toml("[clients.account]\nbreaker = { failure_rate_treshold = 40 }")
            .unwrap_err();
        assert!(err.to_string().contains("failure_rate_treshold"), "{err}");
        assert_eq!(err.key(), Some("clients.account.breaker"), "{err}");
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::default();
        assert!(c.server.admin.ip().is_loopback());
        assert_eq!(c.idempotency.store, "memory");
        assert_eq!(c.registry.root, "/services");
    }
}
