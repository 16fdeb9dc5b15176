#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! ZooKeeper on 127.0.0.1 behaves as Keel's registry relies on: an EPHEMERAL node fires a child
//! watch and goes away with the session that created it.

use keel_testkit::{services, smoke};

#[tokio::test]
async fn ephemeral_node_fires_child_watch_and_dies_with_its_session() {
    let steps = smoke::zookeeper(services::ZOOKEEPER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        steps.iter().any(|s| s.contains("the child watch fired")),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|s| s.contains("removed the node")),
        "{steps:?}"
    );
}
