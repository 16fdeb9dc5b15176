//! Helpers for the ZooKeeper integration tests: unique roots that clean up after themselves,
//! bounded polling, and change-stream collectors.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use keel_core::ServiceInstance;
use keel_registry::zookeeper_client as zk;
use keel_registry::{Change, Watch};
use tokio::time::Instant;

/// The connect string of the shared ZooKeeper (`KEEL_ZK`, default `127.0.0.1:2181`).
pub fn servers() -> String {
    std::env::var("KEEL_ZK").unwrap_or_else(|_| "127.0.0.1:2181".to_owned())
}

pub async fn raw_client() -> zk::Client {
    zk::Client::connect(&servers())
        .await
        .expect("connect a raw ZooKeeper client to 127.0.0.1 (is `scripts/services up` running?)")
}

/// A unique root (`/keel-test-<uuid>`) deleted, with everything under it, when dropped —
/// also when the test fails.
pub struct TestRoot {
    pub path: String,
    auth: Option<String>,
}

impl TestRoot {
    pub fn new() -> Self {
        Self {
            path: format!("/keel-test-{}", uuid::Uuid::new_v4()),
            auth: None,
        }
    }

    /// Cleans up authenticated as this digest user (for ACL tests).
    pub fn with_auth(mut self, user_password: &str) -> Self {
        self.auth = Some(user_password.to_owned());
        self
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let path = self.path.clone();
        let auth = self.auth.clone();
        // A fresh runtime on a plain thread: Drop cannot await, and may run inside a runtime.
        let cleaner = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut connector = zk::Client::connector();
                if let Some(auth) = &auth {
                    connector = connector.with_auth("digest", auth.as_bytes());
                }
                let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(10), connector.connect(&servers()))
                        .await
                else {
                    return;
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), delete_tree(&client, &path))
                    .await;
            });
        });
        let _ = cleaner.join();
    }
}

fn delete_tree<'a>(
    client: &'a zk::Client,
    path: &'a str,
) -> futures::future::BoxFuture<'a, Result<(), zk::Error>> {
    Box::pin(async move {
        let children = match client.list_children(path).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(()),
            Err(e) => return Err(e),
        };
        for child in children {
            delete_tree(client, &format!("{path}/{child}")).await?;
        }
        match client.delete(path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => Ok(()),
            Err(e) => Err(e),
        }
    })
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows a change stream, keeping the resulting set and every change seen.
pub struct Follower {
    pub watch: Watch,
    pub instances: BTreeMap<String, ServiceInstance>,
    pub seen: Vec<Change>,
}

impl Follower {
    pub fn new(watch: Watch) -> Self {
        Self {
            watch,
            instances: BTreeMap::new(),
            seen: Vec::new(),
        }
    }

    pub fn ids(&self) -> Vec<String> {
        self.instances.keys().cloned().collect()
    }

    /// Consumes changes until `condition` holds for the set; panics after `within`.
    pub async fn until(
        &mut self,
        within: Duration,
        what: &str,
        condition: impl Fn(&BTreeMap<String, ServiceInstance>) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while self.seen.is_empty() || !condition(&self.instances) {
            match tokio::time::timeout_at(deadline, self.watch.next()).await {
                Ok(Some(change)) => self.apply(change),
                Ok(None) => panic!("watch stream ended while waiting for: {what}"),
                Err(_) => panic!(
                    "not within {within:?}: {what}; have {:?}; seen {:?}",
                    self.ids(),
                    self.seen
                ),
            }
        }
    }

    /// Consumes changes until one seen at index `from` or later matches `wanted`.
    pub async fn until_seen(
        &mut self,
        from: usize,
        within: Duration,
        what: &str,
        wanted: impl Fn(&Change) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !self.seen.iter().skip(from).any(&wanted) {
            match tokio::time::timeout_at(deadline, self.watch.next()).await {
                Ok(Some(change)) => self.apply(change),
                Ok(None) => panic!("watch stream ended while waiting for: {what}"),
                Err(_) => panic!(
                    "not within {within:?}: {what}; seen {:?}",
                    &self.seen[from..]
                ),
            }
        }
    }

    /// Consumes whatever changes arrive during `period` (used to assert that nothing happens).
    pub async fn drain_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while let Ok(Some(change)) = tokio::time::timeout_at(deadline, self.watch.next()).await {
            self.apply(change);
        }
    }

    fn apply(&mut self, change: Change) {
        match &change {
            Change::Reset(all) => {
                self.instances = all.iter().map(|i| (i.id.clone(), i.clone())).collect();
            }
            Change::Add(i) | Change::Update(i) => {
                self.instances.insert(i.id.clone(), i.clone());
            }
            Change::Remove(i) => {
                self.instances.remove(&i.id);
            }
        }
        self.seen.push(change);
    }
}

/// Runs `scripts/services ARGS…` from the workspace root; returns stdout, panics on failure.
pub fn services(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("run scripts/services");
    assert!(
        out.status.success(),
        "scripts/services {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `scripts/services status` without asserting (status is non-zero when something is down).
pub fn services_status() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    Command::new(script)
        .arg("status")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Starts `service` again when dropped if it is down — also when the test fails.
pub struct StartOnDrop(pub &'static str);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        let status = services_status();
        let down = status
            .lines()
            .any(|l| l.split_whitespace().next() == Some(self.0) && l.contains("DOWN"));
        if down {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
            let _ = Command::new(script).args(["start", self.0]).status();
        }
    }
}
