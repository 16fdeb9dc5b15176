//! One watched service: a persistent recursive watch on its parent node, a cache of its
//! decoded children, and the published (held) view.
//!
//! No polling: the task reads ZooKeeper only when a watch event says something changed, after a
//! reconnection (events may be lost during one, ZOOKEEPER-4698; the watch itself is added again
//! first, see `ServiceWatch::rearm`) and on a new session.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::join_all;
use keel_core::{InstanceStatus, ServiceInstance};
use tokio::sync::watch;
use tokio::time::Instant;
use zookeeper_client::{self as zk, AddWatchMode, Client, EventType, SessionState, WatchedEvent};

use super::session::SessionSlot;
use super::{Stats, ZkConfig};
use crate::dialect::{DecodeError, Dialect, dubbo, spring};
use crate::hold::{Applied, HeldView, deadline_after};
use crate::watch::{Published, publish_changes};

pub(crate) struct ServiceWatch {
    dialect: Dialect,
    service: String,
    path: String,
    sessions: watch::Receiver<SessionSlot>,
    tx: watch::Sender<Published>,
    stats: Arc<Stats>,
    request_timeout: Duration,
    debounce: Duration,
    nodes: Nodes,
    view: HeldView,
}

enum Outcome {
    /// The session ended: wait for the next one.
    SessionEnded,
    /// A newer session is available.
    NewSession,
    /// A transient failure: retry shortly on the same session.
    Retry,
    /// The registry is gone.
    Shutdown,
}

impl ServiceWatch {
    pub(crate) fn new(
        dialect: Dialect,
        service: String,
        sessions: watch::Receiver<SessionSlot>,
        tx: watch::Sender<Published>,
        stats: Arc<Stats>,
        config: &ZkConfig,
    ) -> Self {
        Self {
            path: dialect.service_path(&service),
            dialect,
            service,
            sessions,
            tx,
            stats,
            request_timeout: config.request_timeout,
            debounce: config.debounce,
            nodes: Nodes::default(),
            view: HeldView::new(config.mass_removal),
        }
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let slot = self.sessions.borrow_and_update().clone();
            match self.serve(&slot).await {
                Outcome::NewSession => backoff = Duration::from_millis(100),
                Outcome::SessionEnded => {
                    if self.sessions.changed().await.is_err() {
                        return;
                    }
                }
                Outcome::Retry => {
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        r = self.sessions.changed() => if r.is_err() { return },
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Outcome::Shutdown => return,
            }
        }
    }

    async fn serve(&mut self, slot: &SessionSlot) -> Outcome {
        let client = &slot.client;
        let epoch = slot.generation;
        let mut watcher = match self
            .op(client.watch(&self.path, AddWatchMode::PersistentRecursive))
            .await
        {
            Ok(watcher) => watcher,
            Err(error) => return self.failed("watch", error),
        };
        if let Err(error) = self.resync(client).await {
            return self.failed("resync", error);
        }
        self.publish(epoch);
        let mut disconnected = false;
        loop {
            let deadline = self.view.deadline();
            tokio::select! {
                event = watcher.changed() => {
                    let batch = self.collect(event, &mut watcher).await;
                    let mut resync = false;
                    let mut dirty = BTreeSet::new();
                    let mut deleted = BTreeSet::new();
                    for event in batch {
                        match event.event_type {
                            EventType::Session => match event.session_state {
                                SessionState::Disconnected => {
                                    tracing::debug!(path = %self.path, "zookeeper disconnected; serving last known state");
                                    disconnected = true;
                                }
                                SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                                    resync |= disconnected;
                                    disconnected = false;
                                }
                                _ => return Outcome::SessionEnded,
                            },
                            EventType::NodeCreated | EventType::NodeDataChanged => {
                                if let Some(child) = self.child_of(&event.path) {
                                    deleted.remove(child);
                                    dirty.insert(child.to_owned());
                                }
                            }
                            EventType::NodeDeleted => {
                                if let Some(child) = self.child_of(&event.path) {
                                    dirty.remove(child);
                                    deleted.insert(child.to_owned());
                                }
                            }
                            EventType::NodeChildrenChanged => {}
                        }
                    }
                    let result = if resync {
                        match self.rearm(client).await {
                            Ok(rearmed) => {
                                // The old watcher goes only now: the client keeps the path
                                // watched throughout, so its drop removes nothing on the server.
                                watcher = rearmed;
                                self.resync(client).await
                            }
                            Err(error) => return self.failed("watch", error),
                        }
                    } else {
                        match self.confirm_deleted(client, deleted, &mut dirty).await {
                            Ok(()) => self.refresh(client, dirty).await,
                            Err(error) => Err(error),
                        }
                    };
                    if let Err(error) = result {
                        // The persistent watch stays armed; re-read everything on the next try.
                        return self.failed("read", error);
                    }
                    self.publish(epoch);
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    // The hold window ended: re-read, and apply what is still true.
                    if let Err(error) = self.resync(client).await {
                        return self.failed("resync", error);
                    }
                    self.publish(epoch);
                }
                changed = self.sessions.changed() => {
                    return match changed {
                        Ok(()) => Outcome::NewSession,
                        Err(_) => Outcome::Shutdown,
                    };
                }
            }
        }
    }

    /// Adds the persistent recursive watch again after a reconnection; call before re-reading.
    ///
    /// `zookeeper-client` 0.11 re-sends only one-shot watches when it reconnects: its
    /// `WatchManager::resend_watches` never raises the request kind above `SetWatches`, so the
    /// persistent watches (which need `SetWatches2`) are dropped from the request. The server the
    /// session reconnected to, whether another member or the same one restarted, then knows no
    /// watch of ours, and without this the service would look frozen until the session expires.
    /// Adding a watch the server still has is harmless.
    async fn rearm(&self, client: &Client) -> Result<zk::PersistentWatcher, zk::Error> {
        let watcher = self
            .op(client.watch(&self.path, AddWatchMode::PersistentRecursive))
            .await?;
        Stats::bump(&self.stats.rearmed_watches);
        tracing::info!(path = %self.path, session = %client.session_id(), "zookeeper reconnected; watch re-armed, re-reading");
        Ok(watcher)
    }

    /// The first event plus whatever follows within the debounce window or is already queued.
    async fn collect(
        &self,
        first: WatchedEvent,
        watcher: &mut zk::PersistentWatcher,
    ) -> Vec<WatchedEvent> {
        let terminal = |e: &WatchedEvent| {
            e.event_type == EventType::Session && e.session_state.is_terminated()
        };
        let mut batch = vec![first];
        if batch.iter().any(terminal) {
            return batch;
        }
        if !self.debounce.is_zero() {
            let until = deadline_after(Instant::now(), self.debounce);
            while let Ok(event) = tokio::time::timeout_at(until, watcher.changed()).await {
                let stop = terminal(&event);
                batch.push(event);
                if stop {
                    return batch;
                }
            }
        }
        // `changed` panics once the session has terminated, so stop at a terminal event.
        while let Some(event) = watcher.changed().now_or_never() {
            let stop = terminal(&event);
            batch.push(event);
            if stop {
                break;
            }
        }
        batch
    }

    fn failed(&self, what: &str, error: zk::Error) -> Outcome {
        match error {
            zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed => {
                Outcome::SessionEnded
            }
            error => {
                tracing::warn!(%error, path = %self.path, what, "zookeeper read failed; serving last known state");
                Outcome::Retry
            }
        }
    }

    fn child_of<'p>(&self, path: &'p str) -> Option<&'p str> {
        let child = path.strip_prefix(self.path.as_str())?.strip_prefix('/')?;
        (!child.is_empty() && !child.contains('/')).then_some(child)
    }

    /// Re-reads every child.
    async fn resync(&mut self, client: &Client) -> Result<(), zk::Error> {
        Stats::bump(&self.stats.resyncs);
        let children = match self.op(client.list_children(&self.path)).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => Vec::new(),
            Err(e) => return Err(e),
        };
        let children: BTreeSet<String> = children.into_iter().collect();
        let gone: Vec<String> = self
            .nodes
            .by_name
            .keys()
            .filter(|name| !children.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.nodes.remove(&name);
        }
        self.refresh(client, children).await
    }

    /// Applies deletions only once a read confirms them; a child that exists again (replaced
    /// in the same transaction as its deletion, as Keel does when a new session takes over its
    /// node, whose creation event may come in a later batch) is read instead of removed, so
    /// the service does not flap to empty in between. All requests pipelined. In the Spring
    /// layout the deleted children simply join `dirty`: [`refresh`](Self::refresh) reads each
    /// of them, and removes one that is gone, in the same round trip as the others.
    async fn confirm_deleted(
        &mut self,
        client: &Client,
        deleted: BTreeSet<String>,
        dirty: &mut BTreeSet<String>,
    ) -> Result<(), zk::Error> {
        if let Dialect::Spring(_) = self.dialect {
            dirty.extend(deleted);
            return Ok(());
        }
        let paths: Vec<String> = deleted
            .iter()
            .map(|c| format!("{}/{c}", self.path))
            .collect();
        let checks = join_all(paths.iter().map(|p| client.check_stat(p)));
        let results = tokio::time::timeout(self.request_timeout, checks)
            .await
            .map_err(|_| zk::Error::Timeout)?;
        for (child, result) in deleted.into_iter().zip(results) {
            match result? {
                Some(_) => {
                    dirty.insert(child);
                }
                None => self.nodes.remove(&child),
            }
        }
        Ok(())
    }

    /// Reads and decodes the given children (all requests pipelined).
    async fn refresh(
        &mut self,
        client: &Client,
        children: BTreeSet<String>,
    ) -> Result<(), zk::Error> {
        match &self.dialect {
            Dialect::Dubbo(options) => {
                for child in children {
                    let decoded = dubbo::decode(&self.path, &self.service, &child, options);
                    let instance = self.keep(decoded);
                    self.nodes.insert(child, instance);
                }
            }
            Dialect::Spring(_) => {
                let paths: Vec<(String, String)> = children
                    .into_iter()
                    .map(|c| (format!("{}/{c}", self.path), c))
                    .collect();
                let reads = join_all(paths.iter().map(|(p, _)| client.get_data(p)));
                let results = tokio::time::timeout(self.request_timeout, reads)
                    .await
                    .map_err(|_| zk::Error::Timeout)?;
                for ((path, child), result) in paths.into_iter().zip(results) {
                    match result {
                        Ok((data, _)) => {
                            let decoded = spring::decode(&path, &self.service, &data).map(Some);
                            let instance = self.keep(decoded);
                            self.nodes.insert(child, instance);
                        }
                        Err(zk::Error::NoNode) => {
                            self.nodes.remove(&child);
                        }
                        Err(zk::Error::NoAuth) => {
                            self.keep(Err(DecodeError::new(
                                path,
                                "not readable with our credentials",
                            )));
                            self.nodes.insert(child, None);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Logs and counts a node that does not decode.
    fn keep(
        &self,
        decoded: Result<Option<ServiceInstance>, DecodeError>,
    ) -> Option<ServiceInstance> {
        match decoded {
            Ok(instance) => instance,
            Err(error) => {
                Stats::bump(&self.stats.malformed_nodes);
                tracing::warn!(path = %error.path(), reason = %error.reason(), "skipping malformed registry node");
                None
            }
        }
    }

    fn publish(&mut self, epoch: u64) {
        let ids = std::mem::take(&mut self.nodes.dirty);
        let (applied, changed) =
            self.view
                .apply_changes(|id| self.nodes.truth(id), &ids, Instant::now());
        if applied == Applied::HoldStarted {
            Stats::bump(&self.stats.held_removals);
            tracing::warn!(
                path = %self.path,
                published = self.view.published().len(),
                remaining = self.nodes.up_by_id.len(),
                "holding a mass removal; it is applied only if still true after the hold window"
            );
        }
        let published = self.view.published();
        publish_changes(
            &self.tx,
            epoch,
            changed.iter().map(|id| (id, published.get(id))),
            || published.clone(),
        );
    }

    async fn op<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, zk::Error>>,
    ) -> Result<T, zk::Error> {
        tokio::time::timeout(self.request_timeout, fut)
            .await
            .unwrap_or(Err(zk::Error::Timeout))
    }
}

/// Decoded children by node name, indexed by the id of the UP ones.
#[derive(Debug, Default)]
struct Nodes {
    /// Decoded children by node name (`None`: skipped).
    by_name: BTreeMap<String, Option<ServiceInstance>>,
    /// The names of the UP nodes carrying each id.
    up_by_id: HashMap<String, BTreeSet<String>>,
    /// The ids whose truth may have changed since the last publication.
    dirty: BTreeSet<String>,
}

impl Nodes {
    fn insert(&mut self, name: String, instance: Option<ServiceInstance>) {
        if let Some(Some(old)) = self.by_name.get(&name)
            && Some(old) == instance.as_ref()
        {
            return;
        }
        self.remove(&name);
        if let Some(instance) = &instance
            && instance.status == InstanceStatus::Up
        {
            self.dirty.insert(instance.id.clone());
            self.up_by_id
                .entry(instance.id.clone())
                .or_default()
                .insert(name.clone());
        }
        self.by_name.insert(name, instance);
    }

    fn remove(&mut self, name: &str) {
        let Some(Some(old)) = self.by_name.remove(name) else {
            return;
        };
        if old.status != InstanceStatus::Up {
            return;
        }
        if let Some(names) = self.up_by_id.get_mut(&old.id) {
            names.remove(name);
            if names.is_empty() {
                self.up_by_id.remove(&old.id);
            }
        }
        self.dirty.insert(old.id);
    }

    /// The UP instance published for `id` (the first node by name wins when two carry it).
    fn truth(&self, id: &str) -> Option<&ServiceInstance> {
        let name = self.up_by_id.get(id)?.first()?;
        self.by_name.get(name)?.as_ref()
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
