//! The session task: owns the ZooKeeper session and every registration.
//!
//! All writes go through this one task (an actor), so a registration can never race with the
//! re-registration sweep that follows a session expiry.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_core::{InstanceStatus, ServiceInstance};
use tokio::sync::{mpsc, oneshot, watch};
use zookeeper_client::{
    self as zk, Acl, Acls, Client, CreateMode, Permission, SessionState, StateWatcher,
};

use super::root_check::{self, Probe};
use super::{Stats, ZkConfig};
use crate::Error;
use crate::dialect::{Dialect, dubbo, spring, validate_segment};

/// ALL for the creator, READ for everyone: parents stay listable by other fleets' users.
static PARENT_ACL: [Acl; 2] = [
    Acl::new_const(Permission::ALL, "auth", ""),
    Acl::new_const(Permission::READ, "world", "anyone"),
];

/// The current session, as published to the watch tasks.
#[derive(Debug, Clone)]
pub(crate) struct SessionSlot {
    /// Incremented for each new session.
    pub(crate) generation: u64,
    pub(crate) client: Client,
}

#[derive(Debug)]
pub(crate) enum Command {
    Register {
        key: u64,
        dialect: Dialect,
        instance: ServiceInstance,
        reply: oneshot::Sender<Result<String, Error>>,
    },
    SetStatus {
        key: u64,
        status: InstanceStatus,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Deregister {
        key: u64,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
}

#[derive(Debug)]
struct Record {
    dialect: Dialect,
    instance: ServiceInstance,
    registered_at_ms: u64,
    /// Session id and path of the node, once created in that session.
    created: Option<(i64, String)>,
    /// A `register` call waiting for the first creation.
    waiting: Option<oneshot::Sender<Result<String, Error>>>,
}

/// Where and what a record's node is.
struct Node {
    parent: String,
    path: String,
    data: Vec<u8>,
}

impl Record {
    /// The path of the record's node as of its current status (Dubbo names the node by a URL
    /// that carries the status); `None` when the instance cannot be written in its dialect.
    fn path(&self) -> Option<String> {
        let parent = self.dialect.service_path(&self.instance.service);
        match &self.dialect {
            Dialect::Spring(_) => Some(format!("{parent}/{}", self.instance.id)),
            Dialect::Dubbo(o) => dubbo::provider_url(&self.instance, o.protocol())
                .ok()
                .map(|url| format!("{parent}/{}", dubbo::encode_node_name(&url))),
        }
    }

    /// Whether this record's node is, or would be, at `path`.
    fn claims(&self, path: &str) -> bool {
        matches!(&self.created, Some((_, p)) if p == path) || self.path().is_some_and(|p| p == path)
    }

    fn node(&self) -> Result<Node, Error> {
        let invalid = |path: String, reason: String| Error::InvalidInstance { path, reason };
        match &self.dialect {
            Dialect::Spring(_) => {
                let parent = self.dialect.service_path(&self.instance.service);
                let path = format!("{parent}/{}", self.instance.id);
                validate_segment("service", &self.instance.service)
                    .and_then(|()| validate_segment("id", &self.instance.id))
                    .map_err(|r| invalid(path.clone(), r))?;
                let data = spring::encode(&self.instance, self.registered_at_ms)
                    .map_err(|r| invalid(path.clone(), r))?;
                Ok(Node { parent, path, data })
            }
            Dialect::Dubbo(o) => {
                let parent = self.dialect.service_path(&self.instance.service);
                validate_segment("interface", &self.instance.service)
                    .map_err(|r| invalid(parent.clone(), r))?;
                let url = dubbo::provider_url(&self.instance, o.protocol())
                    .map_err(|r| invalid(parent.clone(), r))?;
                let path = format!("{parent}/{}", dubbo::encode_node_name(&url));
                Ok(Node {
                    parent,
                    path,
                    data: Vec::new(),
                })
            }
        }
    }
}

/// Opens a session with `config`.
pub(crate) async fn connect(config: &ZkConfig) -> Result<Client, Error> {
    let mut connector = Client::connector().with_session_timeout(config.session_timeout);
    if let Some(digest) = &config.digest {
        connector = connector.with_auth("digest", digest.as_bytes());
    }
    let failed = |source: crate::BoxError| Error::Connect {
        servers: config.servers.clone(),
        source,
    };
    match tokio::time::timeout(config.request_timeout, connector.connect(&config.servers)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(failed(Box::new(e))),
        Err(_) => Err(failed(
            format!("no session within {:?}", config.request_timeout).into(),
        )),
    }
}

pub(crate) struct Supervisor {
    config: ZkConfig,
    client: Client,
    generation: u64,
    /// Our earlier sessions: a node they own may be replaced.
    past_sessions: HashSet<i64>,
    records: BTreeMap<u64, Record>,
    sessions: watch::Sender<SessionSlot>,
    stats: Arc<Stats>,
    checked_roots: HashSet<String>,
    /// Nodes of ours that must go but whose delete failed: retried by every sweep until they
    /// are gone (with their session at the latest), unless a live record claims one again.
    tombstones: Vec<String>,
}

impl Supervisor {
    pub(crate) fn new(
        config: ZkConfig,
        client: Client,
        stats: Arc<Stats>,
    ) -> (Self, watch::Receiver<SessionSlot>) {
        let (sessions, rx) = watch::channel(SessionSlot {
            generation: 0,
            client: client.clone(),
        });
        let supervisor = Self {
            config,
            client,
            generation: 0,
            past_sessions: HashSet::new(),
            records: BTreeMap::new(),
            sessions,
            stats,
            checked_roots: HashSet::new(),
            tombstones: Vec::new(),
        };
        (supervisor, rx)
    }

    fn session_id(&self) -> i64 {
        self.client.session_id().0
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut state = self.client.state_watcher();
        let mut backlog: VecDeque<Command> = VecDeque::new();
        loop {
            while let Some(command) = backlog.pop_front() {
                self.handle(command).await;
            }
            // A watcher taken after the session ended never reports it (`changed` waits for a
            // later state), so the state itself is checked too.
            let ended = self.client.state();
            if ended.is_terminated() {
                tracing::warn!(session = %self.client.session_id(), state = %ended, "zookeeper session ended; opening a new one");
                match self.renew(&mut commands, &mut backlog).await {
                    Some(watcher) => state = watcher,
                    None => return,
                }
                continue;
            }
            let unsatisfied = self.unsatisfied();
            tokio::select! {
                s = state.changed() => match s {
                    // The check at the top of the loop renews it (the backlog is empty here:
                    // only a renewal fills it, and the loop drained it before waiting).
                    SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {}
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                        self.ensure_all().await;
                    }
                    SessionState::Disconnected => {
                        tracing::info!(session = %self.client.session_id(), "zookeeper disconnected; serving last known state");
                    }
                },
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                () = tokio::time::sleep(Duration::from_secs(2)), if unsatisfied => {
                    self.ensure_all().await;
                }
            }
        }
        self.shutdown().await;
    }

    /// Replaces an ended session, applies the commands queued meanwhile, re-creates every
    /// registration left, then tells the watch tasks. Returns the new session's state watcher,
    /// taken before any operation ran on it so that it reports an end of the new session during
    /// re-registration; `None` when every handle is gone.
    async fn renew(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        backlog: &mut VecDeque<Command>,
    ) -> Option<StateWatcher> {
        Stats::bump(&self.stats.session_expiries);
        self.past_sessions.insert(self.session_id());
        let mut backoff = Duration::from_millis(100);
        let client = loop {
            let config = self.config.clone();
            let attempt = connect(&config);
            // `None`: every handle is gone.
            match drain_while(attempt, commands, backlog).await? {
                Ok(client) => break client,
                Err(error) => {
                    tracing::warn!(%error, "zookeeper reconnect failed; retrying");
                    drain_while(tokio::time::sleep(backoff), commands, backlog).await?;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(session = %client.session_id(), "new zookeeper session");
        let state = client.state_watcher();
        self.client = client;
        self.generation += 1;
        for record in self.records.values_mut() {
            record.created = None;
        }
        // What arrived while there was no session comes first: a registration deregistered
        // (or taken out of service) meanwhile must not be re-created as it was, not even briefly.
        while let Some(command) = backlog.pop_front() {
            self.handle(command).await;
        }
        let reregistered = self.ensure_all().await;
        for _ in 0..reregistered {
            Stats::bump(&self.stats.reregistrations);
        }
        self.sessions.send_replace(SessionSlot {
            generation: self.generation,
            client: self.client.clone(),
        });
        Some(state)
    }

    /// Whether a record other than `key` has its node at `path`.
    fn claimed_by_other(&self, key: u64, path: &str) -> bool {
        self.records
            .iter()
            .any(|(k, r)| *k != key && r.claims(path))
    }

    fn unsatisfied(&self) -> bool {
        let sid = self.session_id();
        !self.tombstones.is_empty()
            || self
                .records
                .values()
                .any(|r| !matches!(&r.created, Some((s, _)) if *s == sid))
    }

    /// Deletes the tombstoned nodes, then creates every record not yet created in this
    /// session; returns how many it created.
    async fn ensure_all(&mut self) -> usize {
        self.clear_tombstones().await;
        let sid = self.session_id();
        let keys: Vec<u64> = self
            .records
            .iter()
            .filter(|(_, r)| !matches!(&r.created, Some((s, _)) if *s == sid))
            .map(|(k, _)| *k)
            .collect();
        let mut created = 0;
        for key in keys {
            if self.ensure_key(key).await {
                created += 1;
            }
        }
        created
    }

    /// Ensures one record's node and settles a waiting `register` call. Returns success.
    async fn ensure_key(&mut self, key: u64) -> bool {
        let Some(record) = self.records.get(&key) else {
            return false;
        };
        let result = self.ensure(record).await;
        let Some(record) = self.records.get_mut(&key) else {
            return false;
        };
        match result {
            Ok(path) => {
                record.created = Some((self.client.session_id().0, path.clone()));
                if let Some(reply) = record.waiting.take() {
                    let _ = reply.send(Ok(path));
                }
                true
            }
            Err(error) if error.is_unavailable() => {
                tracing::warn!(%error, "registration pending until zookeeper answers");
                false
            }
            Err(error) => {
                if let Some(reply) = record.waiting.take() {
                    // A registration that never existed fails for good.
                    self.records.remove(&key);
                    let _ = reply.send(Err(error));
                } else {
                    tracing::error!(%error, "cannot re-create registration; will retry");
                }
                false
            }
        }
    }

    /// Creates the record's node with owner fencing; returns its path.
    async fn ensure(&self, record: &Record) -> Result<String, Error> {
        let node = record.node()?;
        if let Dialect::Spring(_) = &record.dialect {
            self.check_root(record.dialect.root(), &record.instance.service)
                .await?;
        }
        let sid = self.session_id();
        let acl = self.node_acls();
        let options = CreateMode::Ephemeral.with_acls(acl);
        for _ in 0..5 {
            match self
                .op(self.client.create(&node.path, &node.data, &options))
                .await
            {
                Ok(_) => return Ok(node.path),
                Err(zk::Error::NoNode) => self.mkdir(&node.parent).await?,
                Err(zk::Error::NodeExists) => {
                    let stat = match self.op(self.client.check_stat(&node.path)).await {
                        Ok(Some(stat)) => stat,
                        Ok(None) => continue,
                        Err(e) => return Err(Error::zk("exists", &node.path, e)),
                    };
                    if stat.ephemeral_owner == sid {
                        // Ours already (a retried create whose answer was lost): refresh data.
                        self.op(self.client.set_data(&node.path, &node.data, None))
                            .await
                            .map_err(|e| Error::zk("set_data", &node.path, e))?;
                        return Ok(node.path);
                    }
                    if stat.ephemeral_owner == 0
                        || !self.past_sessions.contains(&stat.ephemeral_owner)
                    {
                        return Err(Error::Conflict {
                            path: node.path,
                            owner: stat.ephemeral_owner,
                        });
                    }
                    tracing::info!(path = %node.path, owner = stat.ephemeral_owner, "replacing node of an earlier session of ours");
                    match self.replace(&node, stat.version, &options).await {
                        Ok(()) => return Ok(node.path),
                        // Changed or gone meanwhile: look again.
                        Err(zk::Error::NoNode | zk::Error::BadVersion) => {}
                        Err(e) => return Err(Error::zk("replace", &node.path, e)),
                    }
                }
                Err(e) => return Err(Error::zk("create", &node.path, e)),
            }
        }
        Err(Error::zk(
            "create",
            &node.path,
            zk::Error::UnexpectedError("node keeps changing under us".into()),
        ))
    }

    /// Replaces the node at `node.path` (at `version`, an earlier session's) by ours in one
    /// transaction: readers never see the path empty in between, so a single-instance service
    /// does not flap to no instances while its node changes owner.
    async fn replace(
        &self,
        node: &Node,
        version: i32,
        options: &zk::CreateOptions<'_>,
    ) -> Result<(), zk::Error> {
        let mut txn = self.client.new_multi_writer();
        txn.add_delete(&node.path, Some(version))?;
        txn.add_create(&node.path, &node.data, options)?;
        self.op(async { txn.commit().await.map(drop).map_err(zk::Error::from) })
            .await
    }

    fn node_acls(&self) -> Acls<'static> {
        if self.config.digest.is_some() {
            Acls::creator_all()
        } else {
            Acls::anyone_all()
        }
    }

    async fn mkdir(&self, path: &str) -> Result<(), Error> {
        let acls = if self.config.digest.is_some() {
            Acls::new(&PARENT_ACL)
        } else {
            Acls::anyone_all()
        };
        let options = CreateMode::Container.with_acls(acls);
        self.op(self.client.mkdir(path, &options))
            .await
            .map_err(|e| Error::zk("mkdir", path, e))
    }

    /// Refuses a Spring root that holds another framework's payload class (checked once per
    /// root, before its first registration). Bounded so that it cannot keep the service from
    /// starting (see `root_check`): services we may not read are skipped with a warning, the
    /// registering service is checked first, and the rest only within a third of the request
    /// timeout (the registration itself must still fit in it).
    async fn check_root(&self, root: &str, own_service: &str) -> Result<(), Error> {
        if self.checked_roots.contains(root) {
            return Ok(());
        }
        let services = match self.op(self.client.list_children(root)).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(()),
            Err(zk::Error::NoAuth) => {
                tracing::warn!(%root, "cannot list the root with our credentials; foreign-payload check skipped");
                return Ok(());
            }
            Err(e) => return Err(Error::zk("list", root, e)),
        };
        let services = root_check::first_things_first(services, own_service);
        let budget = self.config.request_timeout / 3;
        let probe = |service: String| self.probe_service(root, service);
        let scanned =
            match root_check::scan(services, root_check::CONCURRENCY, budget, probe).await? {
                Ok(scanned) => scanned,
                Err((path, class)) => {
                    return Err(Error::ForeignPayload {
                        root: root.to_owned(),
                        path,
                        class,
                    });
                }
            };
        if !scanned.unreadable.is_empty() {
            tracing::warn!(
                %root,
                skipped = scanned.unreadable.len(),
                examples = ?scanned.unreadable.iter().take(5).collect::<Vec<_>>(),
                "services not readable with our credentials were skipped by the foreign-payload check"
            );
        }
        if !scanned.complete() {
            tracing::warn!(
                %root,
                checked = scanned.checked,
                total = scanned.total,
                ?budget,
                "foreign-payload check stopped at its time budget; registering anyway"
            );
        }
        Ok(())
    }

    /// Reads one instance (the first by name) of `service` under `root` for the root check.
    async fn probe_service(&self, root: &str, service: String) -> Result<Probe, Error> {
        let parent = format!("{root}/{service}");
        let children = match self.op(self.client.list_children(&parent)).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(Probe::Clean),
            Err(zk::Error::NoAuth) => return Ok(Probe::Unreadable(parent)),
            Err(e) => return Err(Error::zk("list", parent, e)),
        };
        let Some(first) = children.into_iter().min() else {
            return Ok(Probe::Clean);
        };
        let path = format!("{parent}/{first}");
        let data = match self.op(self.client.get_data(&path)).await {
            Ok((data, _)) => data,
            Err(zk::Error::NoNode) => return Ok(Probe::Clean),
            Err(zk::Error::NoAuth) => return Ok(Probe::Unreadable(path)),
            Err(e) => return Err(Error::zk("get_data", path, e)),
        };
        Ok(match spring::payload_class(&data) {
            Some(class) if class != spring::SPRING_PAYLOAD_CLASS => Probe::Foreign { path, class },
            _ => Probe::Clean,
        })
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Register {
                key,
                dialect,
                instance,
                reply,
            } => {
                let mut record = Record {
                    dialect,
                    instance,
                    registered_at_ms: now_ms(),
                    created: None,
                    waiting: None,
                };
                // Two records on one node would alias: deleting either one's node would
                // remove the other's registration. The node belongs to the first.
                if let Some(path) = record.path()
                    && self.claimed_by_other(key, &path)
                {
                    let _ = reply.send(Err(Error::Duplicate { path }));
                    return;
                }
                record.waiting = Some(reply);
                let root = record.dialect.root().to_owned();
                let is_spring = matches!(record.dialect, Dialect::Spring(_));
                self.records.insert(key, record);
                if self.ensure_key(key).await && is_spring {
                    self.checked_roots.insert(root);
                }
            }
            Command::SetStatus { key, status, reply } => {
                let result = self.set_status(key, status).await;
                let _ = reply.send(result);
            }
            Command::Deregister { key, reply } => {
                let result = match self.records.remove(&key) {
                    Some(record) => self.remove_nodes(&record).await,
                    None => Ok(()),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                } else if let Err(error) = result {
                    tracing::warn!(%error, "background deregistration failed; retrying until the node is gone");
                }
            }
        }
    }

    async fn set_status(&mut self, key: u64, status: InstanceStatus) -> Result<(), Error> {
        let sid = self.session_id();
        let Some(record) = self.records.get_mut(&key) else {
            return Err(Error::Closed);
        };
        let old_status = record.instance.status;
        record.instance.status = status;
        // Dubbo: the new status may name the node of another registration of the same endpoint.
        if let Some(path) = record.path()
            && self.claimed_by_other(key, &path)
        {
            if let Some(record) = self.records.get_mut(&key) {
                record.instance.status = old_status;
            }
            return Err(Error::Duplicate { path });
        }
        let Some(record) = self.records.get_mut(&key) else {
            return Err(Error::Closed);
        };
        let old_created = record.created.take();
        let Some(record) = self.records.get(&key) else {
            return Err(Error::Closed);
        };
        let result = match self.ensure(record).await {
            Ok(path) => match &old_created {
                // Dubbo: the status is part of the node name; remove the old name.
                Some((_, old_path)) if *old_path != path => {
                    match self.delete_path(old_path).await {
                        Ok(()) => Ok(path),
                        Err(error) => Err((error, Some(path))),
                    }
                }
                _ => Ok(path),
            },
            // The new node may exist all the same (a create whose reply was lost).
            Err(error) => Err((error, self.records.get(&key).and_then(Record::path))),
        };
        match result {
            Ok(path) => {
                if let Some(record) = self.records.get_mut(&key) {
                    record.created = Some((sid, path));
                }
                Ok(())
            }
            Err((error, new_path)) => {
                // Undone: the registration keeps its old status, the sweep re-checks its node
                // and deletes the new one (never tracked, it would outlive a deregistration).
                let old_path = self.records.get_mut(&key).and_then(|record| {
                    record.instance.status = old_status;
                    record.created = None;
                    record.path()
                });
                if let Some(new_path) = new_path
                    && old_path.as_ref() != Some(&new_path)
                {
                    self.tombstone(new_path);
                }
                Err(error)
            }
        }
    }

    /// Every node a removed record may have left: its node at its current status (it may exist
    /// although `created` does not say so: a create whose reply was lost, a register that timed
    /// out) and the one it created.
    fn paths_of(record: &Record) -> Vec<String> {
        let mut paths: Vec<String> = record.path().into_iter().collect();
        if let Some((_, path)) = &record.created
            && !paths.contains(path)
        {
            paths.push(path.clone());
        }
        paths
    }

    /// Deletes the nodes of a removed record; a delete that fails is tombstoned (retried by
    /// the sweep until the node is gone). Returns the first error.
    async fn remove_nodes(&mut self, record: &Record) -> Result<(), Error> {
        let mut result = Ok(());
        for path in Self::paths_of(record) {
            if let Err(error) = self.delete_path(&path).await {
                self.tombstone(path);
                if result.is_ok() {
                    result = Err(error);
                }
            }
        }
        result
    }

    fn tombstone(&mut self, path: String) {
        if !self.tombstones.contains(&path) {
            self.tombstones.push(path);
        }
    }

    /// Retries the tombstoned deletes. A node a live record claims again is that record's
    /// (re-registered, or a status changed back) and is kept. Stops at the first failure that
    /// says ZooKeeper is unreachable, keeping the rest for the next sweep.
    async fn clear_tombstones(&mut self) {
        let mut pending = std::mem::take(&mut self.tombstones).into_iter();
        while let Some(path) = pending.next() {
            if self.records.values().any(|r| r.claims(&path)) {
                continue;
            }
            match self.delete_path(&path).await {
                Ok(()) => tracing::info!(%path, "deleted a node left by a failed deregistration"),
                Err(error) => {
                    tracing::warn!(%error, "node still to be deleted; retrying");
                    let unavailable = error.is_unavailable();
                    self.tombstones.push(path);
                    if unavailable {
                        self.tombstones.extend(pending);
                        return;
                    }
                }
            }
        }
    }

    /// Deletes `path` only if a session of ours (this one, or an earlier one whose node the
    /// server still keeps) owns it; a node that is gone, or another session's, is left alone.
    async fn delete_path(&self, path: &str) -> Result<(), Error> {
        let stat = match self.op(self.client.check_stat(path)).await {
            Ok(Some(stat)) => stat,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Error::zk("exists", path, e)),
        };
        let owner = stat.ephemeral_owner;
        if owner != self.session_id() && !self.past_sessions.contains(&owner) {
            return Ok(());
        }
        match self.op(self.client.delete(path, Some(stat.version))).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) => Err(Error::zk("delete", path, e)),
        }
    }

    async fn shutdown(&mut self) {
        let records = std::mem::take(&mut self.records);
        let tombstones = std::mem::take(&mut self.tombstones);
        let paths = records.values().flat_map(Self::paths_of).chain(tombstones);
        for path in paths {
            if let Err(error) = self.delete_path(&path).await {
                tracing::debug!(%error, "deregistration at shutdown failed; the session close removes it");
            }
        }
    }

    /// Bounds a ZooKeeper operation by the request timeout.
    async fn op<T>(&self, fut: impl Future<Output = Result<T, zk::Error>>) -> Result<T, zk::Error> {
        tokio::time::timeout(self.config.request_timeout, fut)
            .await
            .unwrap_or(Err(zk::Error::Timeout))
    }
}

/// Runs `fut` while queueing commands that arrive; `None` when every handle is gone.
async fn drain_while<T>(
    fut: impl Future<Output = T>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    backlog: &mut VecDeque<Command>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            command = commands.recv() => match command {
                Some(command) => backlog.push_back(command),
                None => return None,
            },
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
