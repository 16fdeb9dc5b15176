//! Keeps a client's endpoint set in step with a registry watch.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures::{FutureExt, StreamExt};
use keel_breaker::BoxError;
use keel_breaker::breaker::{Breaker, BreakerConfig};
use keel_core::ServiceInstance;
use keel_registry::{Change, Watch};
use tokio::sync::oneshot;

use crate::balance::{EndpointState, Set};

/// Builds the connection to one instance.
pub(crate) type Connect<C> = Arc<dyn Fn(&ServiceInstance) -> Result<C, BoxError> + Send + Sync>;

/// A connection to one instance, told when the instance leaves discovery.
pub(crate) trait Retire: Clone {
    /// The instance left: close what is idle, dial no more, and let the calls in flight finish.
    /// (Old endpoint lists may keep the endpoint itself alive a while; its connections do not
    /// wait for that.)
    fn retire(&self);
}

/// What the endpoint set needs to add an instance.
pub(crate) struct Factory<C> {
    pub(crate) connect: Connect<C>,
    pub(crate) breaker: BreakerConfig,
}

impl<C> Clone for Factory<C> {
    fn clone(&self) -> Self {
        Self {
            connect: Arc::clone(&self.connect),
            breaker: self.breaker.clone(),
        }
    }
}

/// The current endpoints by instance id, and how to make more.
pub(crate) struct Members<C> {
    set: Arc<Set<C>>,
    factory: Factory<C>,
    by_id: BTreeMap<String, Arc<EndpointState<C>>>,
}

impl<C: Retire> Members<C> {
    pub(crate) fn new(set: Arc<Set<C>>, factory: Factory<C>) -> Self {
        Self {
            set,
            factory,
            by_id: BTreeMap::new(),
        }
    }

    fn make(&self, instance: ServiceInstance) -> Option<Arc<EndpointState<C>>> {
        let conn = match (self.factory.connect)(&instance) {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, id = %instance.id, endpoint = %instance.endpoint, "cannot connect to instance; skipped");
                return None;
            }
        };
        let breaker = match Breaker::new(self.factory.breaker.clone()) {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(%error, "invalid breaker configuration");
                return None;
            }
        };
        Some(self.set.endpoint(instance, conn, breaker))
    }

    fn upsert(&mut self, instance: ServiceInstance) {
        if let Some(existing) = self.by_id.get(&instance.id) {
            let known = existing.instance();
            if known.endpoint == instance.endpoint
                && known.tls == instance.tls
                && !restarted(&known, &instance)
            {
                // At most its metadata changed: it stays the same endpoint (connection, breaker
                // — an ejected instance is not readmitted by a metadata change — and load).
                if known.metadata != instance.metadata {
                    existing.update_metadata(instance);
                }
                return;
            }
        }
        let id = instance.id.clone();
        if let Some(ep) = self.make(instance)
            && let Some(old) = self.by_id.insert(id, ep)
        {
            retire(&old);
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            retire(&old);
        }
    }

    /// Applies one change (without publishing).
    pub(crate) fn apply(&mut self, change: Change) {
        match change {
            Change::Reset(all) => {
                let keep: std::collections::BTreeSet<&str> =
                    all.iter().map(|i| i.id.as_str()).collect();
                let gone: Vec<String> = self
                    .by_id
                    .keys()
                    .filter(|id| !keep.contains(id.as_str()))
                    .cloned()
                    .collect();
                for id in gone {
                    self.remove(&id);
                }
                for instance in all {
                    self.upsert(instance);
                }
            }
            Change::Add(instance) | Change::Update(instance) => self.upsert(instance),
            Change::Remove(instance) => self.remove(&instance.id),
        }
    }

    /// Publishes the current members to the balancers.
    pub(crate) fn publish(&self) {
        self.set.publish(self.by_id.values().cloned().collect());
    }

    fn close(&mut self) {
        for ep in self.by_id.values() {
            retire(ep);
        }
    }
}

/// Metadata that a provider process sets anew when it starts (Dubbo URLs carry `timestamp` and
/// `pid`; a Dubbo instance's id is its `host:port`, the same across restarts).
const RESTART_MARKERS: [&str; 2] = ["timestamp", "pid"];

/// Whether `new` is another process than `old` at the same address: a fresh endpoint then
/// (its own breaker and warm-up), not a metadata update.
fn restarted(old: &ServiceInstance, new: &ServiceInstance) -> bool {
    RESTART_MARKERS
        .iter()
        .any(|k| old.metadata.get(*k) != new.metadata.get(*k))
}

/// Marks `ep` removed (balancers skip it) and retires its connection.
fn retire<C: Retire>(ep: &EndpointState<C>) {
    ep.removed.store(true, Ordering::Relaxed);
    ep.conn.retire();
}

/// The discovery task of a client built from a registry watch: a future to spawn (e.g.
/// `tokio::spawn(discovery)`). It applies every change of the watched service to the client's
/// endpoint set, opening a connection per new instance and dropping the connection of a removed
/// one, and ends when every clone of the client is dropped or the registry shuts down.
#[must_use = "the client sees no endpoints unless its discovery future runs"]
pub struct Discovery {
    fut: Pin<Box<dyn Future<Output = ()> + Send>>,
    service: String,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    pub(crate) fn new<C: Retire + Send + Sync + 'static>(
        mut members: Members<C>,
        mut watch: Watch,
        mut closed: oneshot::Receiver<()>,
    ) -> Self {
        let service = watch.service().to_owned();
        let fut = async move {
            loop {
                tokio::select! {
                    _ = &mut closed => break,
                    change = watch.next() => {
                        let Some(change) = change else { break };
                        members.apply(change);
                        // Apply whatever else is already queued before publishing once.
                        while let Some(Some(change)) = watch.next().now_or_never() {
                            members.apply(change);
                        }
                        members.publish();
                    }
                }
            }
            members.close();
        };
        Self {
            fut: Box::pin(fut),
            service,
        }
    }
}

impl Future for Discovery {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.fut.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::AtomicBool;

    use keel_core::Endpoint;

    use super::*;
    use crate::balance::BalanceConfig;

    /// A connection that remembers being retired.
    #[derive(Clone)]
    struct Conn(Arc<AtomicBool>);

    impl Retire for Conn {
        fn retire(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_metadata_change_keeps_the_connection_breaker_and_load() {
        let set = Arc::new(Set::new(BalanceConfig::default()));
        let retired = Arc::new(AtomicBool::new(false));
        let factory = Factory {
            connect: Arc::new({
                let retired = Arc::clone(&retired);
                move |_: &ServiceInstance| Ok(Conn(Arc::clone(&retired)))
            }),
            breaker: crate::options::default_endpoint_breaker(),
        };
        let mut members = Members::new(Arc::clone(&set), factory);
        let a = ServiceInstance::new("s", "a", Endpoint::new("127.0.0.1", 1))
            .with_metadata("weight", "100");
        members.apply(Change::Add(a.clone()));
        members.publish();
        let before = Arc::clone(&set.snapshot().endpoints[0]);
        before.calls.store(7, Ordering::Relaxed);

        before.load.start(); // a call in flight
        members.apply(Change::Update(a.clone().with_metadata("weight", "300")));
        members.publish();
        let after = Arc::clone(&set.snapshot().endpoints[0]);
        assert!(
            Arc::ptr_eq(&before, &after),
            "the same endpoint: connection, breaker (an ejected instance stays ejected), load"
        );
        assert_eq!(after.weight(), 300, "what the metadata decides changes");
        assert_eq!(after.instance().metadata["weight"], "300");
        assert_eq!(after.calls.load(Ordering::Relaxed), 7);
        assert_eq!(
            after.load.pending(),
            1,
            "the call in flight still counts, and will finish on it"
        );
        assert!(!retired.load(Ordering::Relaxed), "its connection goes on");
        assert!(!after.removed.load(Ordering::Relaxed));
        after.load.finish();

        // A restarted process at the same address (Dubbo: new `timestamp`) is a new endpoint.
        let restarted = Arc::clone(&set.snapshot().endpoints[0]);
        members.apply(Change::Update(
            a.clone()
                .with_metadata("weight", "300")
                .with_metadata("timestamp", "1764300000000"),
        ));
        members.publish();
        let fresh = Arc::clone(&set.snapshot().endpoints[0]);
        assert!(!std::ptr::eq(
            restarted.breaker.config(),
            fresh.breaker.config()
        ));
        assert_eq!(fresh.calls.load(Ordering::Relaxed), 0);
        assert!(
            retired.swap(false, Ordering::Relaxed),
            "the old process's connection"
        );

        // A new address is a new endpoint: the old one's connection is retired.
        members.apply(Change::Update(ServiceInstance::new(
            "s",
            "a",
            Endpoint::new("127.0.0.1", 2),
        )));
        members.publish();
        let moved = Arc::clone(&set.snapshot().endpoints[0]);
        assert!(!std::ptr::eq(
            before.breaker.config(),
            moved.breaker.config()
        ));
        assert!(retired.load(Ordering::Relaxed));
    }
}
