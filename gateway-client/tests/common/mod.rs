//! Helpers for the client integration tests.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use keel_core::{Endpoint, ServiceInstance};
use keel_registry::dialect::SpringOptions;
use keel_registry::zookeeper_client as zk;
use keel_registry::{Dialect, ZkConfig, ZkRegistry};
use keel_testkit::echo::{EchoProvider, Faults};

/// `n` echo providers (`p-0`, `p-1`, …) with their fault switches.
pub async fn providers(n: usize) -> (Vec<EchoProvider>, Vec<Faults>) {
    let mut ps = Vec::new();
    let mut fs = Vec::new();
    for i in 0..n {
        let faults = Faults::default();
        ps.push(
            EchoProvider::start_with(&format!("p-{i}"), faults.clone())
                .await
                .unwrap(),
        );
        fs.push(faults);
    }
    (ps, fs)
}

/// An instance of `service` with id `id` at `addr`.
pub fn instance(service: &str, id: &str, addr: SocketAddr) -> ServiceInstance {
    ServiceInstance::new(
        service,
        id,
        Endpoint::new(addr.ip().to_string(), addr.port()),
    )
}

/// The ZooKeeper connect string (`KEEL_ZK`, default the local ensemble's first server).
pub fn servers() -> String {
    std::env::var("KEEL_ZK").unwrap_or_else(|_| keel_testkit::services::ZOOKEEPER.to_owned())
}

/// A unique ZooKeeper root, deleted with everything under it when dropped.
pub struct ZkRoot {
    pub path: String,
}

impl ZkRoot {
    pub async fn new() -> Self {
        Self {
            path: format!("/{}", keel_testkit::unique("keel-client-test")),
        }
    }

    /// A registry writing and reading the Spring layout under this root.
    pub async fn registry(&self) -> ZkRegistry {
        ZkRegistry::connect(
            ZkConfig::new(servers())
                .with_session_timeout(Duration::from_secs(6))
                .with_dialect(Dialect::Spring(
                    SpringOptions::default().with_root(self.path.clone()),
                )),
        )
        .await
        .expect("connect to ZooKeeper on 127.0.0.1 (is `scripts/services up` running?)")
    }
}

impl Drop for ZkRoot {
    fn drop(&mut self) {
        let path = self.path.clone();
        let cleaner = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(10), zk::Client::connect(&servers()))
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
