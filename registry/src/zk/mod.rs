//! The ZooKeeper registry.

mod discovery;
mod lease;
mod root_check;
mod session;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use keel_core::{InstanceStatus, ServiceInstance};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dialect::{Dialect, validate_segment};
use crate::hold::MassRemovalPolicy;
use crate::registration::{Backend, Registration};
use crate::watch::Published;
use crate::{Error, Registry, Watch};

use lease::Services;
use session::{Command, SessionSlot, Supervisor};

/// How to reach ZooKeeper and how to behave there. By-value builder; validated by
/// [`ZkRegistry::connect`].
#[derive(Clone)]
pub struct ZkConfig {
    servers: String,
    session_timeout: Duration,
    request_timeout: Duration,
    digest: Option<String>,
    dialect: Dialect,
    mass_removal: MassRemovalPolicy,
    debounce: Duration,
    watch_linger: Duration,
}

impl fmt::Debug for ZkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkConfig")
            .field("servers", &self.servers)
            .field("session_timeout", &self.session_timeout)
            .field("request_timeout", &self.request_timeout)
            .field(
                "digest_user",
                &self
                    .digest
                    .as_deref()
                    .and_then(|d| d.split_once(':'))
                    .map(|(u, _)| u),
            )
            .field("dialect", &self.dialect)
            .field("mass_removal", &self.mass_removal)
            .field("debounce", &self.debounce)
            .field("watch_linger", &self.watch_linger)
            .finish()
    }
}

impl ZkConfig {
    /// A configuration for the connect string `servers` (`host:port[,host:port…][/chroot]`):
    /// session timeout 10 s, request timeout 15 s, the Spring dialect under `/services`, no ACL,
    /// the default [`MassRemovalPolicy`], no debounce, a watch linger of 60 s.
    pub fn new(servers: impl Into<String>) -> Self {
        Self {
            servers: servers.into(),
            session_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            digest: None,
            dialect: Dialect::default(),
            mass_removal: MassRemovalPolicy::default(),
            debounce: Duration::ZERO,
            watch_linger: Duration::from_secs(60),
        }
    }

    /// The session timeout to negotiate: how long after a provider dies its nodes vanish.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// How long `connect`, `register`, `deregister`, `set_status` and the first load of a
    /// `snapshot` may take before they fail with [`Error::Timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Authenticates with the `digest` scheme (`user:password`); created nodes then carry
    /// CREATOR_ALL, and created parents CREATOR_ALL plus world READ.
    pub fn with_digest_auth(mut self, user_password: impl Into<String>) -> Self {
        self.digest = Some(user_password.into());
        self
    }

    /// The default dialect of the registry (see [`ZkRegistry::with_dialect`] for others).
    pub fn with_dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// When and how long a mass removal is held.
    pub fn with_mass_removal(mut self, policy: MassRemovalPolicy) -> Self {
        self.mass_removal = policy;
        self
    }

    /// After a watch event, wait this long for more before reading ZooKeeper (events already
    /// queued are always batched; the default, zero, adds no delay).
    ///
    /// The window opens at the first event and nothing is applied before it closes, so a
    /// change spread over several transactions (many providers' sessions expiring, one
    /// transaction each) reaches the [`MassRemovalPolicy`] as a whole. Applying the first event at
    /// once and batching only what follows would let the first removal of such a change
    /// through unheld. A window longer than 100 years (such as `Duration::MAX`) is capped
    /// at 100 years instead of overflowing the clock.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// How long a service stays watched after its last [`Watch`] was dropped and its last
    /// [`snapshot`](Registry::snapshot) returned: then its watch task and its server-side watch
    /// are released (the next user of the service starts them again, with a full read). Repeated
    /// `snapshot` calls within the linger are served from memory; zero releases at once;
    /// `Duration::MAX` keeps every service watched until the registry is dropped.
    pub fn with_watch_linger(mut self, linger: Duration) -> Self {
        self.watch_linger = linger;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.servers.trim().is_empty() {
            return Err(Error::Config("empty ZooKeeper connect string".into()));
        }
        if let Some(d) = &self.digest {
            match d.split_once(':') {
                Some((user, _)) if !user.is_empty() => {}
                _ => {
                    return Err(Error::Config(
                        "digest auth must be \"user:password\"".into(),
                    ));
                }
            }
        }
        if self.session_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::Config("timeouts must be positive".into()));
        }
        self.dialect.validate().map_err(Error::Config)?;
        self.mass_removal.validate().map_err(Error::Config)
    }
}

/// Counters of what the registry had to cope with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegistryStats {
    /// Nodes skipped because their data (or Dubbo URL) did not parse.
    pub malformed_nodes: u64,
    /// ZooKeeper sessions that expired (each followed by a new session).
    pub session_expiries: u64,
    /// Registrations re-created on a new session.
    pub reregistrations: u64,
    /// Mass removals that were held.
    pub held_removals: u64,
    /// Full re-reads of a service (start, reconnection, new session).
    pub resyncs: u64,
    /// Watches added again after a reconnection within the same session.
    pub rearmed_watches: u64,
    /// Services watched right now, each with its watch task and server-side watch (a gauge:
    /// it falls when a service is released, see [`ZkConfig::with_watch_linger`]).
    pub watched_services: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    malformed_nodes: AtomicU64,
    session_expiries: AtomicU64,
    reregistrations: AtomicU64,
    held_removals: AtomicU64,
    resyncs: AtomicU64,
    rearmed_watches: AtomicU64,
    watched_services: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RegistryStats {
        RegistryStats {
            malformed_nodes: self.malformed_nodes.load(Ordering::Relaxed),
            session_expiries: self.session_expiries.load(Ordering::Relaxed),
            reregistrations: self.reregistrations.load(Ordering::Relaxed),
            held_removals: self.held_removals.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            rearmed_watches: self.rearmed_watches.load(Ordering::Relaxed),
            watched_services: self.watched_services.load(Ordering::Relaxed),
        }
    }
}

/// A [`Registry`] on ZooKeeper.
///
/// One ZooKeeper session per `ZkRegistry` (clones and [`with_dialect`](Self::with_dialect)
/// views share it), shared by every registration and every watch. Registrations are EPHEMERAL
/// nodes; after a session expiry a new session re-creates each of them and re-arms each watch,
/// and every [`Watch`] emits a [`Change::Reset`](crate::Change::Reset).
///
/// # Foreign-payload check (Spring dialect)
/// Before the first registration under a Spring root, the registry looks at one instance of
/// each service there and refuses the root ([`Error::ForeignPayload`]) if one carries another
/// framework's payload class (Dubbo 3 application-level discovery and Spring Cloud crash on
/// each other's). The check never keeps a service from starting for reasons other than a
/// foreign payload it has seen: services it may not read (a restrictive ACL) are skipped with a
/// warning; the registering service is checked first and the others 32 at a time, for at most
/// a third of the request timeout, after which the registration goes ahead with a warning
/// saying how many services were checked. It runs once per root and registry.
///
/// # Background tasks
/// [`connect`](Self::connect) spawns the session task on the current tokio runtime; it stops
/// when the registry, every [`Registration`] and every [`Watch`] from it are dropped.
/// [`watch`](Registry::watch) and [`snapshot`](Registry::snapshot) of a service not watched yet
/// spawn that service's watch task on the runtime `connect` ran on, and add a persistent
/// recursive watch on the server. Both are shared by every user of the service and released
/// once it has had no [`Watch`] and no `snapshot` call for the linger
/// ([`ZkConfig::with_watch_linger`], 60 s by default), so watching arbitrary service names does
/// not accumulate tasks or server-side watches ([`RegistryStats::watched_services`] counts the
/// live ones).
#[derive(Clone)]
pub struct ZkRegistry {
    inner: Arc<Inner>,
    dialect: Dialect,
}

impl fmt::Debug for ZkRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkRegistry")
            .field("servers", &self.inner.config.servers)
            .field("dialect", &self.dialect)
            .field("generation", &self.inner.sessions.borrow().generation)
            .finish()
    }
}

#[derive(Debug)]
struct Inner {
    config: ZkConfig,
    commands: mpsc::UnboundedSender<Command>,
    sessions: watch::Receiver<SessionSlot>,
    services: Services,
    stats: Arc<Stats>,
    runtime: tokio::runtime::Handle,
    next_key: AtomicU64,
}

impl ZkRegistry {
    /// Opens the ZooKeeper session and spawns the session task that keeps it (and, after an
    /// expiry, replaces it and re-creates every registration).
    ///
    /// # Errors
    /// An invalid configuration, no tokio runtime, or no session within the request timeout.
    pub async fn connect(config: ZkConfig) -> Result<Self, Error> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("ZkRegistry::connect needs a tokio runtime".into()))?;
        let client = session::connect(&config).await?;
        let stats = Arc::new(Stats::default());
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (supervisor, sessions) = Supervisor::new(config.clone(), client, stats.clone());
        runtime.spawn(supervisor.run(command_rx));
        let dialect = config.dialect.clone();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                commands,
                sessions,
                services: Arc::default(),
                stats,
                runtime,
                next_key: AtomicU64::new(1),
            }),
            dialect,
        })
    }

    /// A view of the same registry (same session) that reads and writes `dialect`.
    pub fn with_dialect(&self, dialect: Dialect) -> Result<Self, Error> {
        dialect.validate().map_err(Error::Config)?;
        Ok(Self {
            inner: self.inner.clone(),
            dialect,
        })
    }

    /// This view's dialect.
    pub fn dialect(&self) -> &Dialect {
        &self.dialect
    }

    /// Counters since `connect`.
    pub fn stats(&self) -> RegistryStats {
        self.inner.stats.snapshot()
    }

    /// The current ZooKeeper session id (changes after an expiry).
    pub fn session_id(&self) -> i64 {
        self.inner.sessions.borrow().client.session_id().0
    }

    /// The current raw ZooKeeper client (it changes after a session expiry): an escape hatch
    /// for operations Keel does not wrap. Nodes created through it are not re-created on a new
    /// session.
    pub fn zookeeper_client(&self) -> zookeeper_client::Client {
        self.inner.sessions.borrow().client.clone()
    }

    fn service_rx(&self, service: &str) -> Result<watch::Receiver<Published>, Error> {
        validate_segment("service", service).map_err(|reason| Error::InvalidInstance {
            path: self.dialect.service_path(service),
            reason,
        })?;
        if self.inner.commands.is_closed() {
            return Err(Error::Closed);
        }
        let key = (self.dialect.clone(), service.to_owned());
        let mut services = lease::lock(&self.inner.services);
        if let Some(rx) = lease::subscribe(&mut services, &key) {
            return Ok(rx);
        }
        let (tx, _) = watch::channel(Published::default());
        let task = discovery::ServiceWatch::new(
            self.dialect.clone(),
            service.to_owned(),
            self.inner.sessions.clone(),
            tx.clone(),
            self.inner.stats.clone(),
            &self.inner.config,
        );
        let (lease, rx) = lease::enter(
            &self.inner.services,
            &mut services,
            key,
            &tx,
            self.inner.config.watch_linger,
            &self.inner.stats,
        );
        // Unlocked first: a lease dropped at once (its runtime is gone) locks the map to take
        // its entry out.
        drop(services);
        self.inner.runtime.spawn(async move {
            tokio::select! {
                () = task.run() => {}
                () = lease.released() => {}
            }
            drop(lease);
        });
        Ok(rx)
    }
}

impl Inner {
    /// Sends a command to the session task and waits for its reply, up to the request timeout
    /// (`path` names what timed out).
    async fn request<T>(
        &self,
        path: String,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(make(reply)).map_err(|_| Error::Closed)?;
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout { path, timeout }),
        }
    }
}

impl Backend for Inner {
    fn set_status(&self, key: u64, status: InstanceStatus) -> BoxFuture<'_, Result<(), Error>> {
        self.request(format!("status of registration {key}"), move |reply| {
            Command::SetStatus { key, status, reply }
        })
        .boxed()
    }

    fn deregister(&self, key: u64) -> BoxFuture<'_, Result<(), Error>> {
        self.request(format!("deregistration {key}"), move |reply| {
            Command::Deregister {
                key,
                reply: Some(reply),
            }
        })
        .boxed()
    }

    fn deregister_detached(&self, key: u64) {
        // If the session task is gone, so is the session and with it the EPHEMERAL node.
        let _ = self.commands.send(Command::Deregister { key, reply: None });
    }
}

impl Registry for ZkRegistry {
    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<Registration, Error>> {
        async move {
            let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
            let dialect = self.dialect.clone();
            let described = format!(
                "{}/{}",
                dialect.service_path(&instance.service),
                instance.id
            );
            let result = self
                .inner
                .request(described, |reply| Command::Register {
                    key,
                    dialect,
                    instance: instance.clone(),
                    reply,
                })
                .await;
            match result {
                Ok(path) => Ok(Registration::new(key, path, instance, self.inner.clone())),
                Err(e) => {
                    // It may still complete later: make sure it does not outlive this failure.
                    self.inner.deregister_detached(key);
                    Err(e)
                }
            }
        }
        .boxed()
    }

    fn watch(&self, service: &str) -> Result<Watch, Error> {
        let rx = self.service_rx(service)?;
        Ok(Watch::new(service, rx, Some(self.inner.clone())))
    }

    fn snapshot<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>, Error>> {
        async move {
            let mut rx = self.service_rx(service)?;
            let timeout = self.inner.config.request_timeout;
            match tokio::time::timeout(timeout, rx.wait_for(|p| p.ready)).await {
                Ok(Ok(published)) => Ok(published.sorted()),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Timeout {
                    path: self.dialect.service_path(service),
                    timeout,
                }),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_and_debug_hides_password() {
        assert!(ZkConfig::new("127.0.0.1:2181").validate().is_ok());
        assert!(ZkConfig::new(" ").validate().is_err());
        assert!(
            ZkConfig::new("h:1")
                .with_digest_auth("nopassword")
                .validate()
                .is_err()
        );
        let c = ZkConfig::new("h:1").with_digest_auth("keel:s3cret");
        assert!(c.validate().is_ok());
        let shown = format!("{c:?}");
        assert!(
            shown.contains("keel") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
