//! ZooKeeper test roots: a unique path per test, deleted with everything under it when dropped
//! (also when the test fails).

use std::time::Duration;

use zookeeper_client as zk;

use crate::{services, unique};

/// The ZooKeeper connect string tests use: `KEEL_ZK`, default [`services::ZOOKEEPER`].
pub fn servers() -> String {
    std::env::var("KEEL_ZK").unwrap_or_else(|_| services::ZOOKEEPER.to_owned())
}

/// A unique root (`/keel-test-<12 hex>`), deleted recursively on drop.
#[derive(Debug)]
pub struct TestRoot {
    /// The root's path.
    pub path: String,
    auth: Option<String>,
}

impl TestRoot {
    /// A new unique root (not created: the code under test creates what it needs).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self {
            path: format!("/{}", unique("keel-test")),
            auth: None,
        }
    }

    /// Cleans up authenticated as this digest `user:password` (for ACL tests).
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

/// Deletes `path` and everything under it; a node already gone is not an error.
///
/// # Errors
/// The first ZooKeeper error other than `NoNode`.
pub fn delete_tree<'a>(
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
