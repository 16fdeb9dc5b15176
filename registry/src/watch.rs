//! Discovery as a stream of changes over a shared in-memory snapshot.
//!
//! Each watched service has one snapshot, published through a `tokio::sync::watch` channel by
//! whoever maintains it (the ZooKeeper watch task, or the static registry). Every [`Watch`] keeps
//! the last snapshot it reported and, when woken, reports the difference. A slow consumer
//! therefore never makes the registry buffer without bound: intermediate states it did not poll
//! in time are coalesced, and the final state is always reported exactly.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use keel_core::ServiceInstance;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

/// One change to the set of instances of a watched service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The complete set, sorted by id. Always the first item of a stream, and emitted again after
    /// the registry had to rebuild its view (a new ZooKeeper session): replace, do not merge.
    Reset(Vec<ServiceInstance>),
    /// A new instance.
    Add(ServiceInstance),
    /// An instance is gone (the value is the last one known).
    Remove(ServiceInstance),
    /// An instance with a known id changed (endpoint, TLS or metadata).
    Update(ServiceInstance),
}

/// The instances map a snapshot holds: UP instances by id.
pub(crate) type Instances = BTreeMap<String, ServiceInstance>;

/// A published snapshot of one service.
#[derive(Debug, Clone, Default)]
pub(crate) struct Published {
    /// Bumped when the view was rebuilt from scratch (new session): watchers emit a Reset.
    pub(crate) epoch: u64,
    /// False until the first complete load.
    pub(crate) ready: bool,
    pub(crate) instances: Arc<Instances>,
    /// Bumped on every publication.
    pub(crate) version: u64,
    /// The ids that changed since `version - 1` within the same epoch (`None`: unknown, e.g.
    /// a new epoch), so a watcher that saw the previous version diffs only those.
    pub(crate) delta: Option<Arc<BTreeSet<String>>>,
}

impl Published {
    pub(crate) fn sorted(&self) -> Vec<ServiceInstance> {
        self.instances.values().cloned().collect()
    }
}

/// Publishes `instances` at `epoch` unless nothing changed; returns whether it published.
pub(crate) fn publish(tx: &watch::Sender<Published>, epoch: u64, instances: Instances) -> bool {
    tx.send_if_modified(|current| {
        let delta = if current.ready && current.epoch == epoch {
            let ids: BTreeSet<String> = changed_ids(&current.instances, &instances);
            if ids.is_empty() {
                return false;
            }
            Some(Arc::new(ids))
        } else {
            None
        };
        *current = Published {
            epoch,
            ready: true,
            instances: Arc::new(instances),
            version: current.version.wrapping_add(1),
            delta,
        };
        true
    })
}

/// Publishes at `epoch` the new values of the given ids only (`None`: gone). When the current
/// snapshot is not ready or is of another epoch, `full` is called for the complete set instead.
/// Returns whether it published (nothing is published when no value actually changed).
///
/// The snapshot is updated in place when no one else holds it (watchers keep their own copy),
/// so the cost is proportional to the change.
pub(crate) fn publish_changes<'a>(
    tx: &watch::Sender<Published>,
    epoch: u64,
    changes: impl IntoIterator<Item = (&'a String, Option<&'a ServiceInstance>)>,
    full: impl FnOnce() -> Instances,
) -> bool {
    tx.send_if_modified(|current| {
        if !(current.ready && current.epoch == epoch) {
            *current = Published {
                epoch,
                ready: true,
                instances: Arc::new(full()),
                version: current.version.wrapping_add(1),
                delta: None,
            };
            return true;
        }
        let mut ids = BTreeSet::new();
        for (id, value) in changes {
            if current.instances.get(id) == value {
                continue;
            }
            let instances = Arc::make_mut(&mut current.instances);
            match value {
                Some(value) => instances.insert(id.clone(), value.clone()),
                None => instances.remove(id),
            };
            ids.insert(id.clone());
        }
        if ids.is_empty() {
            return false;
        }
        current.version = current.version.wrapping_add(1);
        current.delta = Some(Arc::new(ids));
        true
    })
}

/// The ids whose value differs between `old` and `new`.
fn changed_ids(old: &Instances, new: &Instances) -> BTreeSet<String> {
    let mut ids: BTreeSet<String> = old
        .keys()
        .filter(|id| !new.contains_key(*id))
        .cloned()
        .collect();
    ids.extend(
        new.iter()
            .filter(|(id, i)| old.get(*id) != Some(*i))
            .map(|(id, _)| id.clone()),
    );
    ids
}

/// [`diff`] restricted to `ids` (the only ids that may differ).
fn diff_ids(old: &Instances, new: &Instances, ids: &BTreeSet<String>) -> Vec<Change> {
    let mut changes = Vec::new();
    changes.extend(
        ids.iter()
            .filter_map(|id| match (old.get(id), new.get(id)) {
                (Some(before), None) => Some(Change::Remove(before.clone())),
                _ => None,
            }),
    );
    changes.extend(
        ids.iter()
            .filter_map(|id| match (old.get(id), new.get(id)) {
                (None, Some(after)) => Some(Change::Add(after.clone())),
                _ => None,
            }),
    );
    changes.extend(
        ids.iter()
            .filter_map(|id| match (old.get(id), new.get(id)) {
                (Some(before), Some(after)) if before != after => {
                    Some(Change::Update(after.clone()))
                }
                _ => None,
            }),
    );
    changes
}

/// The changes that turn `old` into `new`: removals, then additions, then updates, each in id
/// order.
pub fn diff(
    old: &BTreeMap<String, ServiceInstance>,
    new: &BTreeMap<String, ServiceInstance>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    changes.extend(
        old.iter()
            .filter(|(id, _)| !new.contains_key(*id))
            .map(|(_, i)| Change::Remove(i.clone())),
    );
    changes.extend(
        new.iter()
            .filter(|(id, _)| !old.contains_key(*id))
            .map(|(_, i)| Change::Add(i.clone())),
    );
    changes.extend(new.iter().filter_map(|(id, i)| match old.get(id) {
        Some(before) if before != i => Some(Change::Update(i.clone())),
        _ => None,
    }));
    changes
}

/// A stream of [`Change`]s for one service: a [`Change::Reset`] first, then differences.
///
/// Created by [`Registry::watch`](crate::Registry::watch). The stream ends only when the
/// registry behind it shuts down. Dropping it stops nothing the registry's other users of the
/// service rely on; with a [`ZkRegistry`](crate::ZkRegistry), the service's watch task and
/// server-side watch are released once no `Watch` and no
/// [`snapshot`](crate::Registry::snapshot) call has used the service for the linger
/// ([`ZkConfig::with_watch_linger`](crate::ZkConfig::with_watch_linger)).
pub struct Watch {
    service: String,
    updates: WatchStream<Published>,
    /// The epoch and version last reported (`None` before the first Reset).
    seen: Option<(u64, u64)>,
    /// The instances as of the last change returned (a copy: holding the published snapshot
    /// would make the publisher copy it on its next change).
    last: Instances,
    pending: VecDeque<Change>,
    _keepalive: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("service", &self.service)
            .field("instances", &self.seen.map(|_| self.last.len()))
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Watch {
    pub(crate) fn new(
        service: impl Into<String>,
        rx: watch::Receiver<Published>,
        keepalive: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Self {
        Self {
            service: service.into(),
            updates: WatchStream::new(rx),
            seen: None,
            last: Instances::new(),
            pending: VecDeque::new(),
            _keepalive: keepalive,
        }
    }

    /// The watched service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instances as of the last change this stream returned, sorted by id.
    pub fn current(&self) -> Vec<ServiceInstance> {
        self.last.values().cloned().collect()
    }

    fn absorb(&mut self, next: Published) {
        if !next.ready {
            return;
        }
        match self.seen {
            Some((epoch, version)) if epoch == next.epoch => {
                match &next.delta {
                    // The next version after ours: only the listed ids may differ.
                    Some(ids) if next.version == version.wrapping_add(1) => {
                        let changes = diff_ids(&self.last, &next.instances, ids);
                        for id in ids.iter() {
                            match next.instances.get(id) {
                                Some(i) => self.last.insert(id.clone(), i.clone()),
                                None => self.last.remove(id),
                            };
                        }
                        self.pending.extend(changes);
                    }
                    // Versions were coalesced: compare everything.
                    _ => {
                        self.pending.extend(diff(&self.last, &next.instances));
                        self.last = (*next.instances).clone();
                    }
                }
            }
            _ => {
                self.pending.push_back(Change::Reset(next.sorted()));
                self.last = (*next.instances).clone();
            }
        }
        self.seen = Some((next.epoch, next.version));
    }
}

impl Stream for Watch {
    type Item = Change;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(change));
            }
            match Pin::new(&mut self.updates).poll_next(cx) {
                Poll::Ready(Some(next)) => self.absorb(next),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use keel_core::Endpoint;

    fn inst(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance::new("s", id, Endpoint::new("127.0.0.1", port))
    }

    fn map(items: &[ServiceInstance]) -> Instances {
        items.iter().map(|i| (i.id.clone(), i.clone())).collect()
    }

    #[test]
    fn diff_orders_removes_adds_updates() {
        let old = map(&[inst("a", 1), inst("b", 2), inst("c", 3)]);
        let new = map(&[inst("b", 20), inst("c", 3), inst("d", 4)]);
        assert_eq!(
            diff(&old, &new),
            vec![
                Change::Remove(inst("a", 1)),
                Change::Add(inst("d", 4)),
                Change::Update(inst("b", 20)),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[tokio::test]
    async fn stream_resets_then_diffs_then_resets_on_new_epoch() {
        let (tx, rx) = watch::channel(Published::default());
        let mut w = Watch::new("s", rx, None);
        // Not ready: nothing is emitted.
        assert!(futures::FutureExt::now_or_never(w.next()).is_none());
        publish(&tx, 0, map(&[inst("b", 2), inst("a", 1)]));
        assert_eq!(
            w.next().await,
            Some(Change::Reset(vec![inst("a", 1), inst("b", 2)]))
        );
        publish(&tx, 0, map(&[inst("b", 2)]));
        assert_eq!(w.next().await, Some(Change::Remove(inst("a", 1))));
        // Unchanged content does not wake the stream.
        assert!(!publish(&tx, 0, map(&[inst("b", 2)])));
        publish(&tx, 1, map(&[inst("b", 2)]));
        assert_eq!(w.next().await, Some(Change::Reset(vec![inst("b", 2)])));
        assert_eq!(w.current(), vec![inst("b", 2)]);
        drop(tx);
        assert_eq!(w.next().await, None);
    }

    #[tokio::test]
    async fn slow_consumer_sees_coalesced_final_state() {
        let (tx, rx) = watch::channel(Published::default());
        let mut w = Watch::new("s", rx, None);
        publish(&tx, 0, map(&[]));
        assert_eq!(w.next().await, Some(Change::Reset(vec![])));
        for port in 1..100 {
            publish(&tx, 0, map(&[inst("a", port)]));
        }
        assert_eq!(w.next().await, Some(Change::Add(inst("a", 99))));
    }
}
