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

pub mod proxy;

/// The connect string of the shared ZooKeeper (`KEEL_ZK`, default `127.0.0.1:2181`).
pub use keel_testkit::zk::servers;

pub async fn raw_client() -> zk::Client {
    zk::Client::connect(&servers())
        .await
        .expect("connect a raw ZooKeeper client to 127.0.0.1 (is `scripts/services up` running?)")
}

/// A unique root deleted, with everything under it, when dropped — also when the test fails.
pub use keel_testkit::zk::TestRoot;

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

/// Sends tracing output at INFO and above (Keel's and `zookeeper-client`'s: which server a
/// session connects to, disconnections, re-armed watches) to the test's captured output, so a
/// failing disruptive test shows what the sessions did.
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
}

/// The client ports of the ensemble members, member 1 first.
pub const ENSEMBLE_PORTS: [u16; 3] = [2181, 2182, 2183];

/// The ensemble member (1 to 3) that serves `session`, asked with the `cons` four-letter word;
/// `None` when no member lists it.
pub fn member_serving(session: i64) -> Option<usize> {
    use std::io::{Read, Write};
    let sid = format!("sid=0x{session:x},");
    ENSEMBLE_PORTS
        .iter()
        .position(|port| {
            let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", *port)) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut out = String::new();
            stream.write_all(b"cons").is_ok()
                && stream.read_to_string(&mut out).is_ok()
                && out.contains(&sid)
        })
        .map(|i| i + 1)
}
