//! A registry held in memory: instances from configuration, for local development and tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt};
use keel_core::{Endpoint, InstanceStatus, ServiceInstance};
use tokio::sync::watch;

use crate::registration::{Backend, Registration};
use crate::watch::{Instances, Published, publish};
use crate::{Error, Registry, Watch};

/// A registry whose instances live in this process only.
///
/// Registering adds to the in-memory set, deregistering removes; watchers see the same
/// [`Change`](crate::Change)s a ZooKeeper registry would produce. Cloning shares the state.
///
/// ```
/// use keel_registry::{Registry, StaticRegistry};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = StaticRegistry::new().with_endpoints("account", ["127.0.0.1:50051", "127.0.0.1:50052"])?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct StaticRegistry {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    next_key: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    services: HashMap<String, Service>,
    registrations: HashMap<u64, (String, String)>,
}

#[derive(Debug)]
struct Service {
    all: BTreeMap<String, ServiceInstance>,
    tx: watch::Sender<Published>,
}

impl Service {
    fn new() -> Self {
        let (tx, _) = watch::channel(Published {
            epoch: 0,
            ready: true,
            ..Published::default()
        });
        Self {
            all: BTreeMap::new(),
            tx,
        }
    }

    fn publish(&self) {
        let up: Instances = self
            .all
            .iter()
            .filter(|(_, i)| i.status == InstanceStatus::Up)
            .map(|(id, i)| (id.clone(), i.clone()))
            .collect();
        publish(&self.tx, 0, up);
    }
}

impl StaticRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds fixed instances of `service` (their `service` field is overwritten).
    ///
    /// # Errors
    /// Two instances with the same id.
    pub fn with_instances(
        self,
        service: &str,
        instances: impl IntoIterator<Item = ServiceInstance>,
    ) -> Result<Self, Error> {
        {
            let mut state = self.inner.lock();
            let svc = state
                .services
                .entry(service.to_owned())
                .or_insert_with(Service::new);
            for mut instance in instances {
                instance.service = service.to_owned();
                if svc.all.contains_key(&instance.id) {
                    return Err(Error::Duplicate {
                        path: format!("static:{service}/{}", instance.id),
                    });
                }
                svc.all.insert(instance.id.clone(), instance);
            }
            svc.publish();
        }
        Ok(self)
    }

    /// Adds instances of `service` from `host:port` strings; each one's id is its `host:port`.
    ///
    /// # Errors
    /// A string that is not `host:port`, or the same endpoint twice.
    pub fn with_endpoints<S: AsRef<str>>(
        self,
        service: &str,
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<Self, Error> {
        let instances = endpoints
            .into_iter()
            .map(|s| {
                let endpoint: Endpoint =
                    s.as_ref().parse().map_err(|e| Error::InvalidInstance {
                        path: format!("static:{service}"),
                        reason: format!("{e}"),
                    })?;
                Ok(ServiceInstance::new(
                    service,
                    endpoint.to_string(),
                    endpoint,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.with_instances(service, instances)
    }

    fn register_now(&self, instance: ServiceInstance) -> Result<Registration, Error> {
        let path = format!("static:{}/{}", instance.service, instance.id);
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.inner.lock();
            let svc = state
                .services
                .entry(instance.service.clone())
                .or_insert_with(Service::new);
            if svc.all.contains_key(&instance.id) {
                return Err(Error::Duplicate { path });
            }
            svc.all.insert(instance.id.clone(), instance.clone());
            svc.publish();
            state
                .registrations
                .insert(key, (instance.service.clone(), instance.id.clone()));
        }
        Ok(Registration::new(key, path, instance, self.inner.clone()))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated in a way that
        // matters more than losing the registry, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, key: u64) {
        let mut state = self.lock();
        if let Some((service, id)) = state.registrations.remove(&key)
            && let Some(svc) = state.services.get_mut(&service)
        {
            svc.all.remove(&id);
            svc.publish();
        }
    }
}

impl Backend for Inner {
    fn set_status(&self, key: u64, status: InstanceStatus) -> BoxFuture<'_, Result<(), Error>> {
        let result = {
            let mut state = self.lock();
            match state.registrations.get(&key).cloned() {
                Some((service, id)) => {
                    if let Some(svc) = state.services.get_mut(&service) {
                        if let Some(i) = svc.all.get_mut(&id) {
                            i.status = status;
                        }
                        svc.publish();
                    }
                    Ok(())
                }
                None => Err(Error::Closed),
            }
        };
        futures::future::ready(result).boxed()
    }

    fn deregister(&self, key: u64) -> BoxFuture<'_, Result<(), Error>> {
        self.remove(key);
        futures::future::ready(Ok(())).boxed()
    }

    fn deregister_detached(&self, key: u64) {
        self.remove(key);
    }
}

impl Registry for StaticRegistry {
    fn register(&self, instance: ServiceInstance) -> BoxFuture<'_, Result<Registration, Error>> {
        futures::future::ready(self.register_now(instance)).boxed()
    }

    fn watch(&self, service: &str) -> Result<Watch, Error> {
        let mut state = self.inner.lock();
        let svc = state
            .services
            .entry(service.to_owned())
            .or_insert_with(Service::new);
        Ok(Watch::new(service, svc.tx.subscribe(), None))
    }

    fn snapshot<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ServiceInstance>, Error>> {
        let state = self.inner.lock();
        let instances = state
            .services
            .get(service)
            .map(|svc| svc.tx.borrow().sorted())
            .unwrap_or_default();
        futures::future::ready(Ok(instances)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Change;
    use futures::StreamExt;

    #[tokio::test]
    async fn register_watch_status_deregister() {
        let reg = StaticRegistry::new()
            .with_endpoints("account", ["127.0.0.1:2", "127.0.0.1:1"])
            .unwrap();
        let mut watch = reg.watch("account").unwrap();
        let Some(Change::Reset(all)) = watch.next().await else {
            panic!("first item must be a Reset");
        };
        let ids: Vec<_> = all.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["127.0.0.1:1", "127.0.0.1:2"]);

        let me = ServiceInstance::new("account", "me", Endpoint::new("127.0.0.1", 3));
        let mut handle = reg.register(me.clone()).await.unwrap();
        assert_eq!(watch.next().await, Some(Change::Add(me.clone())));
        assert!(reg.register(me.clone()).await.unwrap_err().is_conflict());

        handle
            .set_status(InstanceStatus::OutOfService)
            .await
            .unwrap();
        assert_eq!(watch.next().await, Some(Change::Remove(me.clone())));
        handle.set_status(InstanceStatus::Up).await.unwrap();
        assert_eq!(watch.next().await, Some(Change::Add(me.clone())));
        assert_eq!(reg.snapshot("account").await.unwrap().len(), 3);

        handle.deregister().await.unwrap();
        assert_eq!(watch.next().await, Some(Change::Remove(me.clone())));

        // Dropping a handle deregisters too.
        let handle = reg.register(me.clone()).await.unwrap();
        assert_eq!(watch.next().await, Some(Change::Add(me.clone())));
        drop(handle);
        assert_eq!(watch.next().await, Some(Change::Remove(me)));
        assert!(reg.snapshot("nothing").await.unwrap().is_empty());
    }

    #[test]
    fn bad_config_is_an_error() {
        let e = StaticRegistry::new()
            .with_endpoints("account", ["nope"])
            .unwrap_err();
        assert!(e.to_string().contains("static:account"), "{e}");
        let e = StaticRegistry::new()
            .with_endpoints("account", ["h:1", "h:1"])
            .unwrap_err();
        assert!(e.is_conflict());
    }
}
