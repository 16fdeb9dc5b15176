//! [`App`]: one builder from configuration to registered, observable, gracefully stopping
//! servers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::response::IntoResponse;
use futures::future::BoxFuture;
use keel_client::{Balance, GrpcChannel, KeepAlive, RestClient};
use keel_core::{Endpoint, ServiceInstance};
use keel_registry::{Registration, Registry, StaticRegistry, ZkConfig, ZkRegistry};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{BalancerKind, ClientConfig, Config, ConfigError, default_path, url_path};
use crate::error::Error;
use crate::idempotency::{IdempotencyLayer, IdempotencyStats};
use crate::metrics::{ClientCollector, FnCounters, Metrics};
use crate::server::{GrpcNames, Protocol, ServerLayer};
use crate::telemetry::Telemetry;

type Check = Box<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
type ConsumerTask =
    Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, Result<(), Error>> + Send>;
type EndpointsView = Box<dyn Fn() -> Vec<keel_client::EndpointInfo> + Send + Sync>;

/// A Keel service: configuration, telemetry, registry, clients, servers and their lifecycle.
///
/// Build it with [`App::from_config`], create the clients and publishers the service needs,
/// add gRPC services, REST routes and message consumers, then [`run`](App::run) it:
///
/// ```no_run
/// # async fn example() -> Result<(), keel::Error> {
/// let app = keel::App::from_config("payment").await?; // keel.toml + KEEL_* overrides
/// let accounts = app.grpc("account")?;                 // discovery + p2c + breaker + retry
/// let routes = axum::Router::new()
///     .route("/ping", axum::routing::get(|| async { "pong" }));
/// # drop(accounts);
/// app.rest(routes).run().await // health, metrics, register when ready, graceful drain
/// # }
/// ```
///
/// [`run`](App::run) binds every listener, serves `/health/live`, `/health/ready`, `/metrics`
/// and `/registry` on the admin port, runs the readiness checks, then starts the message
/// consumers and registers the instance (only then do health and readiness say SERVING), and
/// on SIGTERM / SIGINT (or
/// [`ShutdownHandle::shutdown`]): reports not ready → deregisters → waits the drain window →
/// stops accepting → finishes in-flight requests and message handlers → flushes publishers →
/// returns `Ok(())`.
pub struct App {
    name: String,
    config: Config,
    metrics: Metrics,
    telemetry: Telemetry,
    registry: Arc<dyn Registry>,
    grpc_routes: Option<tonic::service::RoutesBuilder>,
    grpc_names: Vec<String>,
    descriptors: Vec<&'static [u8]>,
    rest: Option<axum::Router>,
    consumers: Vec<ConsumerTask>,
    publishers: Arc<Mutex<Vec<keel_messaging::Publisher>>>,
    checks: Vec<(String, Check)>,
    clients: Arc<Mutex<Vec<(String, EndpointsView)>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    idempotency: IdempotencyLayer,
    shutdown: CancellationToken,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field("grpc_services", &self.grpc_names)
            .field("rest", &self.rest.is_some())
            .field("consumers", &self.consumers.len())
            .finish_non_exhaustive()
    }
}

/// Triggers an App's graceful shutdown (as SIGTERM would); cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts the graceful shutdown sequence.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

impl App {
    /// Loads the configuration (`keel.toml`, or the file named by `KEEL_CONFIG`, plus `KEEL_*`
    /// overrides), installs telemetry and connects to the registry.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and source of a bad value; [`Error::Registry`] when
    /// ZooKeeper cannot be reached within `registry.connect_timeout`.
    pub async fn from_config(name: &str) -> Result<Self, Error> {
        let path = default_path(|k| std::env::var_os(k));
        if std::env::var_os("KEEL_CONFIG").is_some() && !path.exists() {
            return Err(ConfigError::new(
                None,
                format!("KEEL_CONFIG names {}, which does not exist", path.display()),
            )
            .into());
        }
        Self::with_config(name, Config::load(&path)?).await
    }

    /// [`from_config`](Self::from_config) reading `path` (plus `KEEL_*` overrides).
    ///
    /// # Errors
    /// As [`from_config`](Self::from_config); also when `path` does not exist.
    pub async fn from_file(name: &str, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(ConfigError::new(
                None,
                format!("configuration file {} does not exist", path.display()),
            )
            .into());
        }
        Self::with_config(name, Config::load(path)?).await
    }

    /// An App over an already-built configuration.
    ///
    /// # Errors
    /// As [`from_config`](Self::from_config).
    pub async fn with_config(name: &str, config: Config) -> Result<Self, Error> {
        config.validate()?;
        let telemetry = Telemetry::install(name, &config.telemetry)?;
        let metrics = Metrics::new();
        let registry: Arc<dyn Registry> = match &config.registry.zookeeper {
            Some(servers) => {
                let mut zk = ZkConfig::new(servers.clone())
                    .with_session_timeout(config.registry.session_timeout)
                    .with_dialect(keel_registry::Dialect::Spring(
                        keel_registry::dialect::SpringOptions::default()
                            .with_root(config.registry.root.clone()),
                    ));
                if let Some(digest) = &config.registry.digest {
                    zk = zk.with_digest_auth(digest.clone());
                }
                let zk =
                    tokio::time::timeout(config.registry.connect_timeout, ZkRegistry::connect(zk))
                        .await
                        .map_err(|_| Error::RegistryTimeout {
                            servers: servers.clone(),
                            timeout: config.registry.connect_timeout,
                        })??;
                let stats = zk.clone();
                metrics.register_collector(Box::new(FnCounters {
                    counters: vec![(
                        "registry_malformed_nodes",
                        "Registry nodes skipped because their data did not parse",
                        Box::new(move || stats.stats().malformed_nodes),
                    )],
                }));
                Arc::new(zk)
            }
            None => {
                let mut registry = StaticRegistry::new();
                for (service, endpoints) in &config.registry.static_instances {
                    registry = registry.with_endpoints(service, endpoints).map_err(|e| {
                        Error::config(&format!("registry.static.{service}"), e.to_string())
                    })?;
                }
                Arc::new(registry)
            }
        };
        let mut idempotency = idempotency_layer(name, &config.idempotency).await?;
        if let Some(limit) = config.server.request_timeout {
            // A keyed handler runs beyond its caller, but not beyond what the server allows.
            idempotency = idempotency.max_execution(limit);
        }
        register_idempotency_metrics(&metrics, idempotency.stats());
        Ok(Self {
            name: name.to_owned(),
            config,
            metrics,
            telemetry,
            registry,
            grpc_routes: None,
            grpc_names: Vec::new(),
            descriptors: Vec::new(),
            rest: None,
            consumers: Vec::new(),
            publishers: Arc::default(),
            checks: Vec::new(),
            clients: Arc::default(),
            tasks: Mutex::default(),
            idempotency,
            shutdown: CancellationToken::new(),
        })
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The registry this App registers in and discovers from.
    pub fn registry(&self) -> Arc<dyn Registry> {
        Arc::clone(&self.registry)
    }

    /// The App's metrics (rendered at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The server-side idempotency layer's counters (executions, duplicates prevented, …).
    pub fn idempotency_stats(&self) -> IdempotencyStats {
        self.idempotency.stats()
    }

    /// A handle that starts the graceful shutdown, as SIGTERM does.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// `[clients.NAME]` (the defaults without one), with the checks that need the key's name.
    fn client_config(&self, name: &str) -> Result<ClientConfig, Error> {
        let cfg = self.config.clients.get(name).cloned().unwrap_or_default();
        if let Some(idle) = cfg.tcp_keepalive
            && !idle.is_zero()
            && !keel_client::TCP_KEEPALIVE_RANGE.contains(&idle)
        {
            return Err(Error::Config(ConfigError::new(
                Some(format!("clients.{name}.tcp_keepalive")),
                "must be zero (the system's defaults) or between 1 s and 32767 s",
            )));
        }
        Ok(cfg)
    }

    /// A gRPC channel to the service configured as `[clients.NAME]` (or, without such a
    /// section, the service `name` with defaults), for a tonic client:
    /// `AccountClient::new(app.grpc("account")?)`. Discovery runs on the current runtime for
    /// as long as the channel (or a clone) lives.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key of a bad `[clients.NAME]` value (e.g.
    /// `clients.NAME.urls` for a URL with a path: gRPC has none); [`Error::Client`] when the
    /// client refuses its configuration.
    pub fn grpc(&self, name: &str) -> Result<GrpcChannel, Error> {
        let cfg = self.client_config(name)?;
        let service = cfg.service.clone().unwrap_or_else(|| name.to_owned());
        let client_err = |source| Error::Client {
            name: name.to_owned(),
            source,
        };
        if cfg.pool.is_some() {
            return Err(Error::Config(ConfigError::new(
                Some(format!("clients.{name}.pool")),
                format!(
                    "clients.{name}.pool applies to REST clients: a gRPC client keeps one HTTP/2 \
                     connection per endpoint"
                ),
            )));
        }
        let tls = client_tls(name, &cfg)?;
        let mut b = configure!(
            GrpcChannel::builder(&service),
            cfg,
            tls,
            self.config.service.zone,
            self.telemetry.tracer_provider()
        );
        if let Some(k) = &cfg.keep_alive {
            if k.timeout.is_some_and(|t| t.is_zero()) {
                return Err(Error::Config(ConfigError::new(
                    Some(format!("clients.{name}.keep_alive.timeout")),
                    "must be more than zero (it would fail every PING)",
                )));
            }
            let default = KeepAlive::default();
            let interval = k.interval.unwrap_or(default.interval);
            b = b.keep_alive((!interval.is_zero()).then_some(KeepAlive {
                interval,
                timeout: k.timeout.unwrap_or(default.timeout),
            }));
        }
        let channel = if cfg.urls.is_empty() {
            let (channel, discovery) = b.discover(&*self.registry).map_err(client_err)?;
            self.spawn(discovery);
            channel
        } else {
            if let Some(i) = url_paths(name, &cfg.urls)?.iter().position(Option::is_some) {
                // gRPC calls `/package.Service/Method` on the host: a prefix would be dropped,
                // sending the calls to whatever the gateway routes at the root.
                return Err(urls_error(
                    name,
                    format!(
                        "urls[{i}] has a path: a gRPC client's URLs are http(s)://host:port \
                         (gRPC calls /package.Service/Method on the host)"
                    ),
                ));
            }
            b.endpoints(&cfg.urls).map_err(client_err)?
        };
        let view = channel.clone();
        self.track(
            service,
            channel.metrics().clone(),
            Box::new(move || view.endpoints()),
        );
        Ok(channel)
    }

    /// A REST client to the service configured as `[clients.NAME]`; see [`grpc`](Self::grpc).
    /// With `urls` configured it calls those (e.g. an API gateway) with the configured headers;
    /// a single URL with a path is a base URL, request paths going under it
    /// (`http://egress:8080/psp-sandbox` + `/payments`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key of a bad `[clients.NAME]` value (e.g.
    /// `clients.NAME.urls` when several URLs have a path); [`Error::Client`] when the client
    /// refuses its configuration.
    pub fn rest_client(&self, name: &str) -> Result<RestClient, Error> {
        let cfg = self.client_config(name)?;
        let service = cfg.service.clone().unwrap_or_else(|| name.to_owned());
        let client_err = |source| Error::Client {
            name: name.to_owned(),
            source,
        };
        if cfg.keep_alive.is_some() {
            return Err(Error::Config(ConfigError::new(
                Some(format!("clients.{name}.keep_alive")),
                format!(
                    "clients.{name}.keep_alive applies to gRPC clients (HTTP/2 PINGs); a REST \
                     client's idle connections are bounded by its pool"
                ),
            )));
        }
        let tls = client_tls(name, &cfg)?;
        let mut b = configure!(
            RestClient::builder(&service),
            cfg,
            tls,
            self.config.service.zone,
            self.telemetry.tracer_provider()
        );
        if let Some(pool) = &cfg.pool {
            if let Some(t) = pool.idle_timeout {
                b = b.pool_idle_timeout(t);
            }
            if let Some(n) = pool.max_idle {
                b = b.pool_max_idle(n);
            }
        }
        let paths = url_paths(name, &cfg.urls)?;
        let client = match (cfg.urls.as_slice(), paths.as_slice()) {
            ([], _) => {
                let (client, discovery) = b.discover(&*self.registry).map_err(client_err)?;
                self.spawn(discovery);
                client
            }
            // A gateway's route (`http://egress:8080/psp-sandbox`): every request goes under it.
            ([url], [Some(_)]) => b.base_url(url).map_err(client_err)?,
            (urls, paths) => {
                if let Some(i) = paths.iter().position(Option::is_some) {
                    // The client keeps a path prefix for one base URL only; `endpoints` would
                    // drop it and send every request to the host's root.
                    return Err(urls_error(
                        name,
                        format!(
                            "urls[{i}] has a path, which only a single URL may have (a base \
                             URL): give one URL, or http(s)://host:port URLs"
                        ),
                    ));
                }
                b.endpoints(urls).map_err(client_err)?
            }
        };
        let view = client.clone();
        self.track(
            service,
            client.metrics().clone(),
            Box::new(move || view.endpoints()),
        );
        Ok(client)
    }

    /// A publisher to the broker of `[messaging.NAME]`; flushed at shutdown.
    ///
    /// # Errors
    /// [`Error::Config`] when the section is missing; [`Error::Messaging`] when the broker
    /// cannot be reached.
    pub async fn publisher(&self, name: &str) -> Result<keel_messaging::Publisher, Error> {
        let cfg = self
            .config
            .messaging
            .get(name)
            .ok_or_else(|| Error::config(&format!("messaging.{name}"), "no such section"))?;
        let publisher = keel_messaging::Publisher::builder(&cfg.broker)
            .map_err(|e| Error::config(&format!("messaging.{name}.broker"), e.to_string()))?
            .connection_name(format!("{}-publisher", self.name))
            .build()
            .await
            .map_err(|source| Error::Messaging {
                name: name.to_owned(),
                source,
            })?;
        if let Some(partitions) = cfg.partitions {
            let destination = cfg.destination.clone().unwrap_or_else(|| name.to_owned());
            publisher
                .declare(&destination, partitions)
                .await
                .map_err(|source| Error::Messaging {
                    name: name.to_owned(),
                    source,
                })?;
        }
        self.publishers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(publisher.clone());
        Ok(publisher)
    }

    /// The destination `[messaging.NAME]` names (its `destination`, or `NAME`).
    pub fn destination(&self, name: &str) -> String {
        self.config
            .messaging
            .get(name)
            .and_then(|c| c.destination.clone())
            .unwrap_or_else(|| name.to_owned())
    }

    /// Consumes `[messaging.NAME]` with `handler` while the App runs (at-least-once; see
    /// [`keel_messaging::Consumer`]), from the moment the readiness checks pass (a message
    /// handled while a dependency is still unready would fail and be dead-lettered). At
    /// shutdown the consumer stops fetching, finishes in-flight handlers and commits before
    /// the App returns.
    ///
    /// # Errors
    /// [`Error::Config`] when the section is missing or its broker URL is malformed.
    pub fn consumer<H: keel_messaging::Handler>(
        mut self,
        name: &str,
        handler: H,
    ) -> Result<Self, Error> {
        let cfg = self
            .config
            .messaging
            .get(name)
            .cloned()
            .ok_or_else(|| Error::config(&format!("messaging.{name}"), "no such section"))?;
        let destination = cfg.destination.clone().unwrap_or_else(|| name.to_owned());
        let group = cfg.group.clone().unwrap_or_else(|| self.name.clone());
        let mut builder = keel_messaging::Consumer::builder(&cfg.broker, destination, group)
            .map_err(|e| Error::config(&format!("messaging.{name}.broker"), e.to_string()))?
            .connection_name(format!("{}-consumer", self.name));
        if let Some(n) = cfg.max_attempts {
            builder = builder.retry(keel_messaging::RetryPolicy {
                max_attempts: n,
                ..keel_messaging::RetryPolicy::default()
            });
        }
        let consumer = builder.build().map_err(|source| Error::Messaging {
            name: name.to_owned(),
            source,
        })?;
        let name = name.to_owned();
        self.consumers
            .push(Box::new(move |stop: CancellationToken| {
                Box::pin(async move {
                    consumer
                        .run(handler, stop.cancelled_owned())
                        .await
                        .map_err(|source| Error::Messaging { name, source })
                })
            }));
        Ok(self)
    }

    /// Serves a tonic service on the gRPC port (health and reflection are added by Keel).
    pub fn grpc_service<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Error = Infallible,
                Response = http::Response<tonic::body::Body>,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.grpc_names.push(S::NAME.to_owned());
        self.grpc_routes
            .get_or_insert_with(tonic::service::RoutesBuilder::default)
            .add_service(service);
        self
    }

    /// Registers an encoded `FileDescriptorSet` with the reflection service (e.g. the one
    /// `tonic-prost-build` wrote), so tools like `grpcurl` can list and call its services.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptors.push(encoded);
        self
    }

    /// Serves `router` on the REST port (merged with earlier routes).
    pub fn rest(mut self, router: axum::Router) -> Self {
        self.rest = Some(match self.rest.take() {
            Some(r) => r.merge(router),
            None => router,
        });
        self
    }

    /// A check that must pass before the instance registers (retried until it does, up to
    /// `server.shutdown_timeout`), e.g. "the database answers". A stop asked for meanwhile
    /// drops a check in progress, so a check must tolerate being cancelled.
    pub fn readiness_check<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name.to_owned(), Box::new(move || Box::pin(check()))));
        self
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tokio::spawn(fut));
    }

    /// Exports a client's metrics and shows its endpoints at `/registry`.
    fn track(&self, service: String, metrics: keel_client::ClientMetrics, view: EndpointsView) {
        self.metrics.register_collector(Box::new(ClientCollector {
            service: service.clone(),
            metrics,
        }));
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((service, view));
    }

    /// Starts, waits for SIGTERM / SIGINT (or a [`ShutdownHandle`]), then stops gracefully.
    ///
    /// # Errors
    /// Any [`start`](Self::start) error; a consumer or server that failed while running.
    ///
    /// A signal (or the handle) while the readiness checks still fail stops the App at once:
    /// nothing was registered, so there is nothing to drain, and `run` returns `Ok`.
    pub async fn run(self) -> Result<(), Error> {
        // One listener for the whole life of the App: once it is polled, SIGTERM no longer ends
        // the process by itself, so there must be no moment without one.
        let mut signalled = std::pin::pin!(signal());
        match self.start_until(signalled.as_mut()).await? {
            Some(running) => running.wait_until(signalled).await,
            None => Ok(()),
        }
    }

    /// Binds every listener, serves, runs the readiness checks and registers; returns the
    /// running App (its addresses, and [`Running::stop`] for the graceful shutdown).
    ///
    /// # Errors
    /// [`Error::Bind`], [`Error::NotReady`], [`Error::Registry`]; [`Error::Stopped`] when the
    /// [`ShutdownHandle`] was used before the readiness checks passed (what was started is
    /// stopped; a check in progress is dropped, so a check must tolerate being cancelled).
    pub async fn start(self) -> Result<Running, Error> {
        match self
            .start_until(std::pin::pin!(std::future::pending()))
            .await?
        {
            Some(running) => Ok(running),
            None => Err(Error::Stopped),
        }
    }

    /// [`start`](Self::start), stopped early (`None`) when `interrupt` completes or the
    /// [`ShutdownHandle`] is used before the readiness checks pass.
    async fn start_until<F: Future<Output = ()>>(
        self,
        interrupt: Pin<&mut F>,
    ) -> Result<Option<Running>, Error> {
        let App {
            name,
            config,
            metrics,
            telemetry,
            registry,
            grpc_routes,
            grpc_names,
            descriptors,
            rest,
            consumers,
            publishers,
            checks,
            clients,
            tasks,
            idempotency,
            shutdown,
        } = self;
        let tasks = tasks.into_inner().unwrap_or_else(PoisonError::into_inner);
        let stop_accepting = CancellationToken::new();
        let stop_consuming = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));
        let registered: Arc<Mutex<Vec<ServiceInstance>>> = Arc::default();
        let mut servers: Vec<(&'static str, JoinHandle<Result<(), Error>>)> = Vec::new();

        // Admin first: live at once, ready only once registered.
        let admin = bind("admin", config.server.admin).await?;
        let admin_addr = local_addr("admin", &admin)?;
        let admin_router = admin_routes(AdminState {
            ready: Arc::clone(&ready),
            metrics: metrics.clone(),
            registered: Arc::clone(&registered),
            clients: Arc::clone(&clients),
        });
        let admin_stop = CancellationToken::new();
        {
            let stop = admin_stop.clone();
            servers.push((
                "admin",
                tokio::spawn(async move {
                    axum::serve(admin, admin_router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                        .map_err(|e| Error::Serve {
                            what: "admin",
                            source: e.into(),
                        })
                }),
            ));
        }

        let mut health: Option<HealthReporter> = None;
        let mut grpc_addr = None;
        if let Some(mut routes) = grpc_routes {
            let (reporter, health_service) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for n in &grpc_names {
                reporter
                    .set_service_status(n, ServingStatus::NotServing)
                    .await;
            }
            routes.add_service(health_service);
            let mut reflection = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
            for &d in &descriptors {
                reflection = reflection.register_encoded_file_descriptor_set(d);
            }
            match reflection.build_v1() {
                Ok(svc) => {
                    routes.add_service(svc);
                }
                Err(e) => return Err(Error::config("grpc descriptors", e.to_string())),
            }
            let listener = bind("grpc", config.server.grpc).await?;
            grpc_addr = Some(local_addr("grpc", &listener)?);
            let known = GrpcNames::new(
                grpc_names
                    .iter()
                    .map(String::as_str)
                    .chain([tonic_health::pb::health_server::SERVICE_NAME]),
                descriptors
                    .iter()
                    .copied()
                    .chain([tonic_health::pb::FILE_DESCRIPTOR_SET]),
            )
            .map_err(|e| Error::config("grpc descriptors", e.to_string()))?;
            // Streams (health's Watch, reflection, the services' own streaming methods) are not
            // buffered for replay: a keyed one would never answer.
            let streams = GrpcNames::new(
                [],
                [
                    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                ],
            )
            .map_err(|e| Error::config("grpc descriptors", e.to_string()))?;
            let idempotency = idempotency
                .clone()
                .pass_through(known.streaming().chain(streams.streaming()));
            let layer = tower::ServiceBuilder::new()
                .layer(ServerLayer::new(
                    Arc::clone(&metrics.server),
                    Protocol::Grpc,
                    config.server.request_timeout,
                    Arc::new(known),
                ))
                .layer(idempotency.clone());
            let stop = stop_accepting.clone();
            let routes = routes.routes();
            let mut server = tonic::transport::Server::builder();
            if let Some(timeout) = config.server.request_timeout {
                // tonic enforces the shorter of this and the call's `grpc-timeout`.
                server = server.timeout(timeout);
            }
            servers.push((
                "grpc",
                tokio::spawn(async move {
                    server
                        .layer(layer)
                        .add_routes(routes)
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::TcpListenerStream::new(listener),
                            stop.cancelled_owned(),
                        )
                        .await
                        .map_err(|e| Error::Serve {
                            what: "grpc",
                            source: e.into(),
                        })
                }),
            ));
            health = Some(reporter);
        }

        let mut rest_addr = None;
        if let Some(router) = rest {
            let listener = bind("rest", config.server.rest).await?;
            rest_addr = Some(local_addr("rest", &listener)?);
            let router = router.layer(idempotency.clone()).layer(ServerLayer::new(
                Arc::clone(&metrics.server),
                Protocol::Rest,
                config.server.request_timeout,
                Arc::default(),
            ));
            let stop = stop_accepting.clone();
            servers.push((
                "rest",
                tokio::spawn(async move {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                        .map_err(|e| Error::Serve {
                            what: "rest",
                            source: e.into(),
                        })
                }),
            ));
        }

        let mut running = Running {
            name,
            config,
            registry,
            registration: None,
            grpc_addr,
            rest_addr,
            admin_addr,
            ready,
            metrics,
            health,
            grpc_names,
            servers,
            consumer_tasks: Vec::new(),
            publishers,
            tasks,
            telemetry,
            stop_accepting,
            stop_consuming,
            admin_stop,
            shutdown,
            registered,
            idempotency,
        };
        match running.become_ready(checks, consumers, interrupt).await {
            Ok(true) => Ok(Some(running)),
            Ok(false) => running.stop().await.map(|()| None),
            Err(e) => {
                let _ = running.stop().await;
                Err(e)
            }
        }
    }
}

/// `[clients.NAME] tls` as the builders take it. The CA file is read and its certificates
/// checked here, so that a missing or unusable file is an error naming
/// `clients.NAME.tls.ca_file` (a file without a certificate would otherwise trust nothing, and
/// every handshake would fail); `system_roots` adds the platform's CA store.
fn client_tls(name: &str, cfg: &ClientConfig) -> Result<Option<keel_client::TlsConfig>, Error> {
    use rustls::pki_types::ServerName;
    let Some(tls) = &cfg.tls else {
        return Ok(None);
    };
    let mut config = match &tls.ca_file {
        Some(file) => keel_client::TlsConfig::with_ca_pem(ca_pem(name, file)?),
        None if tls.system_roots => keel_client::TlsConfig::system_roots(),
        None => {
            return Err(Error::Config(ConfigError::new(
                Some(format!("clients.{name}.tls")),
                format!(
                    "clients.{name}.tls: says no CA to trust (ca_file, system_roots = true, or \
                     both)"
                ),
            )));
        }
    };
    if tls.system_roots {
        config = config.and_system_roots();
    }
    if let Some(domain) = &tls.domain {
        ServerName::try_from(domain.as_str()).map_err(|e| {
            Error::Config(ConfigError::new(
                Some(format!("clients.{name}.tls.domain")),
                format!("clients.{name}.tls.domain: {domain:?} is no DNS name or IP address: {e}"),
            ))
        })?;
        config = config.domain(domain.clone());
    }
    Ok(Some(config))
}

/// The PEM of `[clients.NAME] tls.ca_file`, checked to hold valid certificates.
fn ca_pem(name: &str, file: &std::path::Path) -> Result<Vec<u8>, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let key = format!("clients.{name}.tls.ca_file");
    let path = file.display();
    let bad = |why: String| Error::Config(ConfigError::new(Some(key.clone()), why));
    let pem = std::fs::read(file).map_err(|e| bad(format!("{key}: cannot read {path}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("{key}: {path} is not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("{key}: {path} holds an invalid certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad(format!(
            "{key}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )));
    }
    Ok(pem)
}

/// The path of each of `[clients.NAME] urls` (`None`: none), or an error naming the key.
fn url_paths(name: &str, urls: &[String]) -> Result<Vec<Option<String>>, Error> {
    urls.iter()
        .enumerate()
        .map(|(i, url)| url_path(url).map_err(|why| urls_error(name, format!("urls[{i}]: {why}"))))
        .collect()
}

/// A configuration error naming `clients.NAME.urls`.
fn urls_error(name: &str, why: String) -> Error {
    Error::Config(ConfigError::new(
        Some(format!("clients.{name}.urls")),
        format!("clients.{name}.{why}"),
    ))
}

/// Applies a `[clients.NAME]` section (and the App's tracer provider, if any) to a gRPC or
/// REST builder.
macro_rules! configure {
    ($b:expr, $cfg:expr, $tls:expr, $zone:expr, $tracer_provider:expr) => {{
        let cfg = &$cfg;
        let mut b = $b.balance(match cfg.balancer {
            BalancerKind::P2c => Balance::P2c,
            BalancerKind::RoundRobin => Balance::RoundRobin,
            BalancerKind::Weighted => Balance::Weighted,
            BalancerKind::ConsistentHash => Balance::ConsistentHash,
        });
        if let Some(zone) = &$zone {
            b = b.zone(zone.clone());
        }
        for (k, v) in &cfg.headers {
            b = b.default_header(k, v);
        }
        if let Some(provider) = $tracer_provider {
            b = b.tracer_provider(provider);
        }
        if let Some(t) = cfg.timeout {
            b = b.timeout(t);
        }
        if let Some(t) = cfg.connect_timeout {
            b = b.connect_timeout(t);
        }
        if let Some(t) = cfg.warm_up {
            b = b.warm_up(t);
        }
        if let Some(idle) = cfg.tcp_keepalive {
            b = b.tcp_keepalive(Some(idle));
        }
        if let Some(tls) = $tls {
            b = b.tls(tls);
        }
        if let Some(breaker) = &cfg.breaker {
            b = b.breaker(breaker.clone());
        }
        if let Some(bulkhead) = &cfg.bulkhead {
            b = b
                .max_concurrent(bulkhead.max_concurrent)
                .max_concurrent_wait(bulkhead.max_wait);
        }
        b.max_attempts(cfg.retry.max_attempts)
            .backoff(cfg.retry.backoff_base, cfg.retry.backoff_max)
            .retry_budget(Arc::new(keel_breaker::retry::RetryBudget::new(
                Duration::from_secs(10),
                cfg.retry.min_per_second,
                cfg.retry.budget_ratio,
            )))
    }};
}
use configure;

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

fn local_addr(what: &'static str, l: &TcpListener) -> Result<SocketAddr, Error> {
    l.local_addr().map_err(|source| Error::Bind {
        what,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// The server-side idempotency layer `[idempotency]` describes.
async fn idempotency_layer(
    service: &str,
    config: &crate::config::IdempotencyConfig,
) -> Result<IdempotencyLayer, Error> {
    let layer = match config.store.as_str() {
        "memory" => IdempotencyLayer::new(crate::idempotency::MemoryStore::with_max_bytes(
            config.memory_max_bytes,
        )),
        #[cfg(feature = "redis")]
        url if url.starts_with("redis://") || url.starts_with("rediss://") => {
            let store = crate::idempotency::RedisStore::connect(url)
                .await
                .map_err(|e| Error::config("idempotency.store", e.to_string()))?;
            IdempotencyLayer::new(store)
        }
        other => {
            return Err(Error::config(
                "idempotency.store",
                format!(
                    "{other:?} is not a store: expected \"memory\" or a redis:// URL (feature `redis`)"
                ),
            ));
        }
    };
    let layer = match config.failures {
        crate::config::FailurePolicy::Release => layer,
        crate::config::FailurePolicy::Store => layer.classify(crate::idempotency::store_failures),
    };
    Ok(layer
        .namespace(service)
        .ttl(config.ttl)
        .lease(config.lease)
        .wait_timeout(config.wait))
}

fn register_idempotency_metrics(metrics: &Metrics, stats: IdempotencyStats) {
    let (a, b, c, d) = (stats.clone(), stats.clone(), stats.clone(), stats);
    metrics.register_collector(Box::new(FnCounters {
        counters: vec![
            (
                "idempotency_executed",
                "Requests with an idempotency key that executed",
                Box::new(move || a.executed()),
            ),
            (
                "idempotency_replayed",
                "Repeated idempotency keys answered from the store (duplicates prevented)",
                Box::new(move || b.replayed()),
            ),
            (
                "idempotency_conflicts",
                "Repeated keys refused (in flight too long, or a different request body)",
                Box::new(move || c.conflicts()),
            ),
            (
                "idempotency_store_errors",
                "Requests refused because the idempotency store failed",
                Box::new(move || d.store_errors()),
            ),
        ],
    }));
}

#[derive(Clone)]
struct AdminState {
    ready: Arc<AtomicBool>,
    metrics: Metrics,
    registered: Arc<Mutex<Vec<ServiceInstance>>>,
    clients: Arc<Mutex<Vec<(String, EndpointsView)>>>,
}

fn admin_routes(state: AdminState) -> axum::Router {
    use axum::routing::get;
    let ready = Arc::clone(&state.ready);
    let metrics = state.metrics.clone();
    let view = state.clone();
    axum::Router::new()
        .route("/health/live", get(|| async { "live" }))
        .route(
            "/health/ready",
            get(move || {
                let ready = ready.load(Ordering::Acquire);
                async move {
                    if ready {
                        (http::StatusCode::OK, "ready")
                    } else {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route(
            "/registry",
            get(move || {
                let body = registry_view(&view);
                async move { axum::Json(body).into_response() }
            }),
        )
}

fn instance_json(i: &ServiceInstance) -> serde_json::Value {
    serde_json::json!({
        "service": i.service,
        "id": i.id,
        "address": i.endpoint.host,
        "port": i.endpoint.port,
        "status": i.status.as_str(),
        "metadata": i.metadata,
    })
}

fn registry_view(state: &AdminState) -> serde_json::Value {
    let registered: Vec<serde_json::Value> = state
        .registered
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(instance_json)
        .collect();
    let mut discovered = BTreeMap::new();
    for (service, view) in state
        .clients
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        let endpoints: Vec<serde_json::Value> = view()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "address": e.endpoint.host,
                    "port": e.endpoint.port,
                    "calls": e.calls,
                    "breaker": format!("{:?}", e.state),
                })
            })
            .collect();
        discovered.insert(service.clone(), endpoints);
    }
    serde_json::json!({ "registered": registered, "discovered": discovered })
}

/// A started [`App`]: serving, registered, ready.
pub struct Running {
    name: String,
    config: Config,
    registry: Arc<dyn Registry>,
    registration: Option<Registration>,
    grpc_addr: Option<SocketAddr>,
    rest_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
    health: Option<HealthReporter>,
    grpc_names: Vec<String>,
    servers: Vec<(&'static str, JoinHandle<Result<(), Error>>)>,
    consumer_tasks: Vec<JoinHandle<Result<(), Error>>>,
    publishers: Arc<Mutex<Vec<keel_messaging::Publisher>>>,
    tasks: Vec<JoinHandle<()>>,
    telemetry: Telemetry,
    stop_accepting: CancellationToken,
    stop_consuming: CancellationToken,
    admin_stop: CancellationToken,
    shutdown: CancellationToken,
    registered: Arc<Mutex<Vec<ServiceInstance>>>,
    idempotency: IdempotencyLayer,
}

/// A `Running` dropped without [`stop`](Running::stop) (an error path, a test) stops serving:
/// not ready at once, listeners and consumers told to stop (they finish on their tasks; the
/// registration's own drop deregisters). It used to keep serving, and reporting ready, after
/// its instance had left the registry.
impl Drop for Running {
    fn drop(&mut self) {
        self.ready.store(false, Ordering::Release);
        self.stop_accepting.cancel();
        self.stop_consuming.cancel();
        self.admin_stop.cancel();
    }
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("name", &self.name)
            .field("grpc", &self.grpc_addr)
            .field("rest", &self.rest_addr)
            .field("admin", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The gRPC listener's address, when gRPC services are served.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// The REST listener's address, when REST routes are served.
    pub fn rest_addr(&self) -> Option<SocketAddr> {
        self.rest_addr
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The instance registered, once registered.
    pub fn instance(&self) -> Option<&ServiceInstance> {
        self.registration.as_ref().map(Registration::instance)
    }

    /// A handle that starts the graceful shutdown (as SIGTERM does) of
    /// [`wait_for_signal`](Self::wait_for_signal).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    fn instance_for(&self) -> ServiceInstance {
        let svc = &self.config.service;
        let main = self.grpc_addr.or(self.rest_addr).unwrap_or(self.admin_addr);
        let host = svc.advertise_host.clone().unwrap_or_else(|| {
            if main.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                main.ip().to_string()
            }
        });
        let id = svc
            .instance_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let mut instance = ServiceInstance::new(&self.name, id, Endpoint::new(host, main.port()))
            .with_metadata("admin_port", self.admin_addr.port().to_string());
        if let Some(a) = self.grpc_addr {
            instance = instance.with_metadata("grpc_port", a.port().to_string());
        }
        if let Some(a) = self.rest_addr {
            instance = instance.with_metadata("http_port", a.port().to_string());
        }
        if let Some(zone) = &svc.zone {
            instance = instance.with_metadata("zone", zone.clone());
        }
        for (k, v) in &svc.metadata {
            instance = instance.with_metadata(k.clone(), v.clone());
        }
        instance
    }

    /// Runs the readiness checks; once they pass, starts the `consumers` (a message handled
    /// while, say, the database is still unready would fail its attempts and be dead-lettered),
    /// registers the instance and reports ready. `Ok(false)` when `interrupt` completed or the
    /// shutdown handle was used first (nothing consumed or registered then).
    async fn become_ready<F: Future<Output = ()>>(
        &mut self,
        checks: Vec<(String, Check)>,
        consumers: Vec<ConsumerTask>,
        interrupt: Pin<&mut F>,
    ) -> Result<bool, Error> {
        let deadline = tokio::time::Instant::now() + self.config.server.shutdown_timeout;
        let passed = async {
            for (name, check) in &checks {
                let mut backoff = Duration::from_millis(50);
                loop {
                    match check().await {
                        Ok(()) => break,
                        Err(why) if tokio::time::Instant::now() + backoff < deadline => {
                            tracing::info!(check = %name, reason = %why, "not ready yet");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                        Err(why) => return Err(Error::NotReady(format!("{name}: {why}"))),
                    }
                }
            }
            Ok(())
        };
        tokio::select! {
            // In this order: the signal listener is installed by its first poll, before the
            // checks run and the instance registers; a stop asked for already wins over checks
            // that pass at once.
            biased;
            () = interrupt => {
                tracing::info!(service = %self.name, "stop requested before ready");
                return Ok(false);
            }
            () = self.shutdown.cancelled() => {
                tracing::info!(service = %self.name, "shutdown requested before ready");
                return Ok(false);
            }
            passed = passed => passed?,
        }
        self.consumer_tasks = consumers
            .into_iter()
            .map(|c| tokio::spawn(c(self.stop_consuming.clone())))
            .collect();
        let instance = self.instance_for();
        let registration = self.registry.register(instance.clone()).await?;
        self.registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(instance.clone());
        self.registration = Some(registration);
        if let Some(health) = &self.health {
            health.set_service_status("", ServingStatus::Serving).await;
            for n in &self.grpc_names {
                health.set_service_status(n, ServingStatus::Serving).await;
            }
        }
        self.ready.store(true, Ordering::Release);
        self.metrics.ready.set(1);
        tracing::info!(
            service = %self.name,
            id = %instance.id,
            endpoint = %instance.endpoint,
            admin = %self.admin_addr,
            "registered and ready"
        );
        Ok(true)
    }

    /// Waits for SIGTERM, SIGINT, a [`ShutdownHandle`], or a server or consumer failing, then
    /// [`stop`](Self::stop)s.
    ///
    /// # Errors
    /// The failure that ended the wait, if any, or one from [`stop`](Self::stop).
    pub async fn wait_for_signal(self) -> Result<(), Error> {
        self.wait_until(std::pin::pin!(signal())).await
    }

    /// [`wait_for_signal`](Self::wait_for_signal) with `signalled` for the signal.
    async fn wait_until<F: Future<Output = ()>>(
        mut self,
        signalled: Pin<&mut F>,
    ) -> Result<(), Error> {
        let failure = tokio::select! {
            () = signalled => None,
            () = self.shutdown.cancelled() => None,
            (server, i, e) = first_failure(&mut self.servers, &mut self.consumer_tasks) => {
                // That task has ended: never await its handle again.
                if server {
                    self.servers.remove(i);
                } else {
                    self.consumer_tasks.remove(i);
                }
                tracing::error!(error = %e, "a server or consumer failed; shutting down");
                Some(e)
            }
        };
        let stopped = self.stop().await;
        match failure {
            Some(e) => Err(e),
            None => stopped,
        }
    }

    /// The graceful shutdown: not ready → deregister → drain window → stop accepting → finish
    /// in-flight requests and message handlers → flush publishers.
    ///
    /// # Errors
    /// The first failure among deregistration, servers and consumers (every step still runs).
    pub async fn stop(mut self) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        let timeout = self.config.server.shutdown_timeout;
        tracing::info!(service = %self.name, "shutting down: not ready");
        self.ready.store(false, Ordering::Release);
        self.metrics.ready.set(0);
        if let Some(health) = &self.health {
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for n in &self.grpc_names {
                health
                    .set_service_status(n, ServingStatus::NotServing)
                    .await;
            }
        }
        if let Some(registration) = self.registration.take() {
            if let Err(e) = registration.deregister().await {
                tracing::warn!(error = %e, "deregistration failed (the session's end removes it)");
                first.get_or_insert(e.into());
            }
            self.registered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            tracing::info!(drain = ?self.config.server.drain, "deregistered; draining");
            // The drain window is a deliberate wait: callers' discovery needs it to see the
            // removal before the listener closes.
            tokio::time::sleep(self.config.server.drain).await;
        }
        self.stop_accepting.cancel();
        self.stop_consuming.cancel();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut admin = None;
        for (what, handle) in self.servers.drain(..) {
            if what == "admin" {
                admin = Some(handle);
                continue;
            }
            join_until(what, handle, deadline, &mut first).await;
        }
        for handle in self.consumer_tasks.drain(..) {
            join_until("consumer", handle, deadline, &mut first).await;
        }
        // Keyed executions whose callers went away run on; they may still publish.
        if tokio::time::timeout_at(deadline, self.idempotency.executions_done())
            .await
            .is_err()
        {
            tracing::warn!("idempotent executions still running at the shutdown deadline");
        }
        let publishers: Vec<_> = std::mem::take(
            &mut *self
                .publishers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for p in publishers {
            if let Err(e) = p.flush().await {
                tracing::warn!(error = %e, "flushing a publisher failed");
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.admin_stop.cancel();
        if let Some(handle) = admin {
            join_until("admin", handle, deadline, &mut first).await;
        }
        tracing::info!(service = %self.name, "stopped");
        // Flushing the exporter blocks (an HTTP export): off the async workers.
        let telemetry = std::mem::replace(&mut self.telemetry, Telemetry::none());
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

async fn join_until(
    what: &'static str,
    handle: JoinHandle<Result<(), Error>>,
    deadline: tokio::time::Instant,
    first: &mut Option<Error>,
) {
    match tokio::time::timeout_at(deadline, handle).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            first.get_or_insert(e);
        }
        Ok(Err(join)) => {
            first.get_or_insert(Error::Serve {
                what,
                source: join.to_string().into(),
            });
        }
        Err(_) => {
            tracing::warn!(what, "did not finish within the shutdown timeout");
        }
    }
}

/// Waits for the first server or consumer task to end (which, before shutdown, is a failure);
/// returns which one (server?, index) and why.
async fn first_failure(
    servers: &mut [(&'static str, JoinHandle<Result<(), Error>>)],
    consumers: &mut [JoinHandle<Result<(), Error>>],
) -> (bool, usize, Error) {
    fn why(what: &'static str, r: Result<Result<(), Error>, tokio::task::JoinError>) -> Error {
        match r {
            Ok(Err(e)) => e,
            Ok(Ok(())) => Error::Serve {
                what,
                source: "stopped unexpectedly".into(),
            },
            Err(e) => Error::Serve {
                what,
                source: e.to_string().into(),
            },
        }
    }
    let mut all: Vec<BoxFuture<'_, (bool, usize, Error)>> = Vec::new();
    for (i, (what, h)) in servers.iter_mut().enumerate() {
        let what = *what;
        all.push(Box::pin(async move { (true, i, why(what, h.await)) }));
    }
    for (i, h) in consumers.iter_mut().enumerate() {
        all.push(Box::pin(
            async move { (false, i, why("consumer", h.await)) },
        ));
    }
    if all.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(all).await.0
}

/// SIGTERM or SIGINT.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
