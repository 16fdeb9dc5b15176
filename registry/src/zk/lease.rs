//! How long a service stays watched: while any [`Watch`](crate::Watch) or `snapshot` call
//! uses it, then for a linger, after which its watch task and server-side watch are reclaimed.
//!
//! The registry's map of watched services holds, per service, the sender its watch task
//! publishes through; every user subscribes to it under the map's lock. The task's [`Lease`]
//! counts the subscribers under the same lock, so a service is never reclaimed while a new user
//! is joining it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Stats;
use crate::dialect::Dialect;
use crate::hold::deadline_after;
use crate::watch::Published;

/// A watched service's key: a view's dialect and the service name.
pub(crate) type ServiceKey = (Dialect, String);

/// The watched services of a registry.
pub(crate) type Services = Arc<Mutex<HashMap<ServiceKey, Entry>>>;

/// One watched service.
#[derive(Debug)]
pub(crate) struct Entry {
    /// What its watch task publishes; users subscribe here.
    tx: watch::Sender<Published>,
    /// When a user last subscribed.
    last_used: Instant,
}

/// Locks the map; a poisoned lock is still usable (the map is consistent after every step).
pub(crate) fn lock(services: &Services) -> MutexGuard<'_, HashMap<ServiceKey, Entry>> {
    services.lock().unwrap_or_else(|p| p.into_inner())
}

/// Subscribes to the service of `key` if it is watched.
pub(crate) fn subscribe(
    services: &mut HashMap<ServiceKey, Entry>,
    key: &ServiceKey,
) -> Option<watch::Receiver<Published>> {
    let entry = services.get_mut(key)?;
    entry.last_used = Instant::now();
    Some(entry.tx.subscribe())
}

/// Enters a newly watched service and returns its lease, for its watch task, and the first
/// subscription.
pub(crate) fn enter(
    services: &Services,
    map: &mut HashMap<ServiceKey, Entry>,
    key: ServiceKey,
    tx: &watch::Sender<Published>,
    linger: Duration,
    stats: &Arc<Stats>,
) -> (Lease, watch::Receiver<Published>) {
    let rx = tx.subscribe();
    map.insert(
        key.clone(),
        Entry {
            tx: tx.clone(),
            last_used: Instant::now(),
        },
    );
    stats.watched_services.fetch_add(1, Ordering::Relaxed);
    let lease = Lease {
        services: services.clone(),
        key,
        tx: tx.clone(),
        linger,
        stats: stats.clone(),
    };
    (lease, rx)
}

/// Held by a service's watch task. Dropping it (the task ended, was reclaimed, or its runtime
/// shut down) takes the service out of the map: its remaining users' streams then end.
#[derive(Debug)]
pub(crate) struct Lease {
    services: Services,
    key: ServiceKey,
    tx: watch::Sender<Published>,
    linger: Duration,
    stats: Arc<Stats>,
}

impl Lease {
    /// Resolves once the service has had no user for the linger (taking it out of the map, so
    /// that the next user starts a new task). The watch task is raced against this.
    pub(crate) async fn released(&self) {
        loop {
            self.tx.closed().await;
            let mut until = deadline_after(Instant::now(), self.linger);
            loop {
                tokio::time::sleep_until(until).await;
                let mut services = lock(&self.services);
                let Some(entry) = services.get(&self.key) else {
                    return;
                };
                if !entry.tx.same_channel(&self.tx) {
                    return;
                }
                if self.tx.receiver_count() > 0 {
                    break;
                }
                let due = deadline_after(entry.last_used, self.linger);
                if Instant::now() >= due {
                    services.remove(&self.key);
                    return;
                }
                until = due;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut services = lock(&self.services);
        if services
            .get(&self.key)
            .is_some_and(|entry| entry.tx.same_channel(&self.tx))
        {
            services.remove(&self.key);
        }
        drop(services);
        self.stats.watched_services.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::Dialect;

    fn key(name: &str) -> ServiceKey {
        (Dialect::default(), name.to_owned())
    }

    fn watched(services: &Services, name: &str) -> bool {
        lock(services).contains_key(&key(name))
    }

    /// The lease outlives its last user by the linger, and a user joining meanwhile keeps it.
    #[tokio::test(start_paused = true)]
    async fn released_a_linger_after_the_last_user() {
        let services: Services = Arc::default();
        let stats = Arc::new(Stats::default());
        let linger = Duration::from_secs(30);
        let (tx, _) = watch::channel(Published::default());
        let (lease, first) = {
            let mut map = lock(&services);
            enter(&services, &mut map, key("a"), &tx, linger, &stats)
        };
        let lease = tokio::spawn(async move {
            lease.released().await;
            lease
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!lease.is_finished(), "released while in use");
        drop(first);
        tokio::time::sleep(Duration::from_secs(20)).await;
        // A user comes and goes 20 s into the linger: the linger counts from it.
        let second = subscribe(&mut lock(&services), &key("a"));
        assert!(second.is_some());
        drop(second);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!lease.is_finished() && watched(&services, "a"));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(lease.is_finished());
        assert!(!watched(&services, "a"));
        assert_eq!(stats.snapshot().watched_services, 1);
        drop(lease.await);
        assert_eq!(stats.snapshot().watched_services, 0);
    }
}
