//! Service registration and discovery for Keel.
//!
//! A [`Registry`] registers this process's instances and watches the services it consumes, as a
//! [`Stream`](futures::Stream) of [`Change`]s over an in-memory snapshot. Two implementations:
//!
//! * [`ZkRegistry`]: ZooKeeper, reading and writing the two layouts Java fleets already use
//!   ([`dialect::spring`]: Curator / Spring Cloud JSON under `/services`; [`dialect::dubbo`]:
//!   Dubbo interface-level URLs under `/dubbo`), so a Rust service can join an existing estate.
//!   One session per registry, shared by every registration and watch; re-registration and
//!   watch re-arming after session expiry; owner fencing; a mass-removal hold; digest ACLs.
//! * [`StaticRegistry`]: instances from configuration, for local development.
//!
//! ```
//! use futures::StreamExt;
//! use keel_core::{Endpoint, ServiceInstance};
//! use keel_registry::{Change, Registry, StaticRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keel_registry::Error> {
//! let registry = StaticRegistry::new().with_endpoints("account", ["127.0.0.1:50051"])?;
//! let mut changes = registry.watch("account")?;
//! assert!(matches!(changes.next().await, Some(Change::Reset(all)) if all.len() == 1));
//!
//! let me = ServiceInstance::new("account", "a-2", Endpoint::new("127.0.0.1", 50052));
//! let registration = registry.register(me.clone()).await?;
//! assert_eq!(changes.next().await, Some(Change::Add(me.clone())));
//!
//! registration.deregister().await?;
//! assert_eq!(changes.next().await, Some(Change::Remove(me)));
//! # Ok(()) }
//! ```
//!
//! Against ZooKeeper (the connect call starts the registry's background session task):
//!
//! ```no_run
//! use keel_core::{Endpoint, ServiceInstance};
//! use keel_registry::{Registry, ZkConfig, ZkRegistry};
//!
//! # async fn run() -> Result<(), keel_registry::Error> {
//! let registry = ZkRegistry::connect(ZkConfig::new("127.0.0.1:2181")).await?;
//! let me = ServiceInstance::new("account", "a-1", Endpoint::new("10.0.0.5", 50051));
//! let registration = registry.register(me).await?;   // /services/account/a-1, EPHEMERAL
//! let accounts = registry.snapshot("account").await?; // every UP instance, sorted by id
//! # drop((registration, accounts)); Ok(()) }
//! ```
//!
//! Readers only ever see `UP` instances: an instance set `OUT_OF_SERVICE` disappears from
//! watchers (as a [`Change::Remove`]) and comes back when set `UP` again. Node data that does not
//! parse is skipped with a `tracing` warning and counted ([`ZkRegistry::stats`]); it never
//! poisons the rest of the snapshot.
//!
//! This crate has no feature flags. It needs a tokio runtime with the time driver.

pub mod dialect;
mod error;
mod hold;
mod registration;
mod static_registry;
mod watch;
mod zk;

use futures::future::BoxFuture;
use keel_core::ServiceInstance;

pub use dialect::Dialect;
pub use error::{BoxError, Error};
pub use hold::MassRemovalPolicy;
pub use registration::Registration;
pub use static_registry::StaticRegistry;
pub use watch::{Change, Watch, diff};
pub use zk::{RegistryStats, ZkConfig, ZkRegistry};
/// The ZooKeeper client Keel uses, for [`ZkRegistry::zookeeper_client`].
pub use zookeeper_client;

/// Registration and discovery. Object safe: `Arc<dyn Registry>` works.
pub trait Registry: Send + Sync + std::fmt::Debug {
    /// Registers `instance` (its `service` names the service, or the interface for Dubbo) and
    /// returns the handle that keeps it registered.
    ///
    /// # Errors
    /// The instance cannot be written ([`Error::InvalidInstance`]), its node belongs to another
    /// live process ([`Error::Conflict`]) or to another live registration of this registry
    /// ([`Error::Duplicate`]), the root holds another framework's instances
    /// ([`Error::ForeignPayload`]), or the registry is unreachable ([`Error::is_unavailable`]).
    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<Registration, Error>>;

    /// Watches `service`: a [`Change::Reset`] with every UP instance once known, then changes.
    ///
    /// Not free of background work: an implementation may start what keeps the service's
    /// snapshot current. [`ZkRegistry`] spawns, for a service not watched yet, a watch task on
    /// the runtime its `connect` ran on and adds a server-side watch; both are shared by every
    /// `Watch` and `snapshot` of the service and released once it has been unused for the
    /// linger ([`ZkConfig::with_watch_linger`]). [`StaticRegistry`] spawns nothing.
    ///
    /// # Errors
    /// An invalid service name, or a registry that has shut down.
    fn watch(&self, service: &str) -> Result<Watch, Error>;

    /// The UP instances of `service`, sorted by id; waits for the first load of a service not
    /// watched yet (and keeps watching it for a while: [`ZkConfig::with_watch_linger`], so
    /// repeated calls are served from memory). While ZooKeeper is unreachable, the last known
    /// snapshot is served.
    ///
    /// # Errors
    /// As [`watch`](Self::watch), or [`Error::Timeout`] when the first load does not complete.
    fn snapshot<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>, Error>>;
}
