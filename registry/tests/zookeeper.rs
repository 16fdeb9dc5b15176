//! Registration and discovery against the real ZooKeeper from `scripts/services` (127.0.0.1).
//!
//! Every test works under its own `/keel-test-<uuid>` root, removed at the end. Tests marked
//! `disruptive` restart or stop shared ZooKeeper servers; `scripts/test` runs them serially.

// Test code: a failed expectation should abort the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{Mode, ZkProxy};
use common::{Follower, StartOnDrop, TestRoot, eventually, raw_client, servers};
use keel_core::{Endpoint, InstanceStatus, ServiceInstance};
use keel_registry::dialect::{DubboOptions, SpringOptions, dubbo, spring};
use keel_registry::zookeeper_client as zk;
use keel_registry::{Change, Dialect, Error, MassRemovalPolicy, Registry, ZkConfig, ZkRegistry};

const WAIT: Duration = Duration::from_secs(20);

fn spring_at(root: &TestRoot) -> Dialect {
    Dialect::Spring(SpringOptions::default().with_root(root.path.clone()))
}

fn dubbo_at(root: &TestRoot) -> DubboOptions {
    DubboOptions::default().with_root(root.path.clone())
}

async fn registry(dialect: Dialect) -> ZkRegistry {
    ZkRegistry::connect(
        ZkConfig::new(servers())
            .with_dialect(dialect)
            .with_session_timeout(Duration::from_secs(4)),
    )
    .await
    .expect("connect to ZooKeeper on 127.0.0.1 (is `scripts/services up` running?)")
}

fn instance(service: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(service, id, Endpoint::new("127.0.0.1", port))
}

#[tokio::test]
async fn spring_register_discover_deregister() {
    let root = TestRoot::new();
    let provider = registry(spring_at(&root)).await;
    let consumer = registry(spring_at(&root)).await;
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch
        .until(WAIT, "initial empty reset", |s| s.is_empty())
        .await;
    assert!(matches!(watch.seen[0], Change::Reset(_)));

    let me = instance("account", "a-1", 50051).with_metadata("zone", "sh-a");
    let registration = provider.register(me.clone()).await.unwrap();
    let path = format!("{}/account/a-1", root.path);
    assert_eq!(registration.path(), path);

    watch
        .until(WAIT, "a-1 discovered", |s| s.get("a-1") == Some(&me))
        .await;
    assert_eq!(
        consumer.snapshot("account").await.unwrap(),
        vec![me.clone()]
    );

    // On the wire: an EPHEMERAL node of the provider's session holding Spring's JSON.
    let raw = raw_client().await;
    let (data, stat) = raw.get_data(&path).await.unwrap();
    assert_eq!(stat.ephemeral_owner, provider.session_id());
    let json: serde_json::Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(json["payload"]["@class"], spring::SPRING_PAYLOAD_CLASS);
    assert_eq!(json["payload"]["metadata"]["instance_status"], "UP");
    assert_eq!(json["payload"]["metadata"]["zone"], "sh-a");
    assert_eq!(json["port"], 50051);
    assert_eq!(spring::decode(&path, "account", &data).unwrap(), me);

    registration.deregister().await.unwrap();
    watch.until(WAIT, "a-1 removed", |s| s.is_empty()).await;
    assert!(watch.seen.contains(&Change::Remove(me)));
    assert_eq!(raw.check_stat(&path).await.unwrap(), None);
}

#[tokio::test]
async fn dropping_the_handle_deregisters() {
    let root = TestRoot::new();
    let provider = registry(spring_at(&root)).await;
    let registration = provider
        .register(instance("account", "a-1", 1))
        .await
        .unwrap();
    let path = registration.path().to_owned();
    let raw = raw_client().await;
    assert!(raw.check_stat(&path).await.unwrap().is_some());
    drop(registration);
    eventually(WAIT, "node deleted after drop", || async {
        raw.check_stat(&path).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn dubbo_register_discover_with_consumer_matching() {
    let root = TestRoot::new();
    let iface = "com.acme.AccountService";
    let provider = registry(Dialect::Dubbo(dubbo_at(&root))).await;
    let me = ServiceInstance::new(iface, "ignored", Endpoint::new("127.0.0.1", 50052))
        .with_metadata("application", "account")
        .with_metadata("version", "1.0.0");
    let registration = provider.register(me.clone()).await.unwrap();

    // The node name is exactly what Java's URLEncoder makes of the sorted URL.
    let url = "tri://127.0.0.1:50052/com.acme.AccountService?application=account&interface=com.acme.AccountService&side=provider&version=1.0.0";
    let expected = format!(
        "{}/{iface}/providers/{}",
        root.path,
        dubbo::encode_node_name(url)
    );
    assert_eq!(registration.path(), expected);
    let raw = raw_client().await;
    let stat = raw.check_stat(&expected).await.unwrap().unwrap();
    assert_eq!(stat.ephemeral_owner, provider.session_id());

    // A provider written by a Java fleet (dubbo protocol, another version) next to ours.
    let providers = format!("{}/{iface}/providers", root.path);
    let java = "tri://10.1.1.1:20880/com.acme.AccountService?application=legacy&interface=com.acme.AccountService&side=provider&version=2.0.0";
    raw.create(
        &format!("{providers}/{}", dubbo::encode_node_name(java)),
        b"10.1.1.1",
        &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .unwrap();

    let v1 = provider
        .with_dialect(Dialect::Dubbo(dubbo_at(&root).with_version("1.0.0")))
        .unwrap();
    let mut watch = Follower::new(v1.watch(iface).unwrap());
    watch
        .until(WAIT, "v1 provider only", |s| {
            s.keys().map(String::as_str).collect::<Vec<_>>() == ["127.0.0.1:50052"]
        })
        .await;
    let got = &watch.instances["127.0.0.1:50052"];
    assert_eq!(got.metadata["application"], "account");
    assert_eq!(got.status, InstanceStatus::Up);

    let any = provider
        .with_dialect(Dialect::Dubbo(dubbo_at(&root).with_version("*")))
        .unwrap();
    let all = any.snapshot(iface).await.unwrap();
    let ids: Vec<_> = all.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["10.1.1.1:20880", "127.0.0.1:50052"]);

    // A consumer of another group sees nothing.
    let other = provider
        .with_dialect(Dialect::Dubbo(
            dubbo_at(&root).with_group("g").with_version("*"),
        ))
        .unwrap();
    assert!(other.snapshot(iface).await.unwrap().is_empty());

    registration.deregister().await.unwrap();
    watch
        .until(WAIT, "v1 provider removed", |s| s.is_empty())
        .await;
}

#[tokio::test]
async fn status_out_of_service_hides_without_deregistering() {
    let root = TestRoot::new();
    let provider = registry(spring_at(&root)).await;
    let mut watch = Follower::new(provider.watch("account").unwrap());
    let me = instance("account", "a-1", 1);
    let mut registration = provider.register(me.clone()).await.unwrap();
    watch.until(WAIT, "up", |s| s.contains_key("a-1")).await;

    registration
        .set_status(InstanceStatus::OutOfService)
        .await
        .unwrap();
    watch.until(WAIT, "hidden", |s| s.is_empty()).await;
    let raw = raw_client().await;
    let (data, _) = raw.get_data(registration.path()).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(
        json["payload"]["metadata"]["instance_status"],
        "OUT_OF_SERVICE"
    );

    registration.set_status(InstanceStatus::Up).await.unwrap();
    watch.until(WAIT, "back", |s| s.contains_key("a-1")).await;

    // Dubbo: the status is in the node name (enabled=false); the old name is removed.
    let iface = "com.acme.Ledger";
    let dubbo_view = provider
        .with_dialect(Dialect::Dubbo(dubbo_at(&root)))
        .unwrap();
    let mut registration = dubbo_view
        .register(ServiceInstance::new(
            iface,
            "x",
            Endpoint::new("127.0.0.1", 7),
        ))
        .await
        .unwrap();
    let mut dubbo_watch = Follower::new(dubbo_view.watch(iface).unwrap());
    dubbo_watch.until(WAIT, "dubbo up", |s| s.len() == 1).await;
    registration
        .set_status(InstanceStatus::OutOfService)
        .await
        .unwrap();
    dubbo_watch
        .until(WAIT, "dubbo hidden", |s| s.is_empty())
        .await;
    let providers = format!("{}/{iface}/providers", root.path);
    let names = raw.list_children(&providers).await.unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        dubbo::decode_node_name(&names[0])
            .unwrap()
            .contains("enabled=false")
    );
}

#[tokio::test]
async fn malformed_nodes_are_skipped_and_counted() {
    let root = TestRoot::new();
    let consumer = registry(spring_at(&root)).await;
    let provider = registry(spring_at(&root)).await;
    let good = instance("account", "good", 1);
    let _registration = provider.register(good.clone()).await.unwrap();

    let raw = raw_client().await;
    let parent = format!("{}/account", root.path);
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    for (name, data) in [
        ("not-json", &b"\x00\xffgarbage"[..]),
        ("no-port", br#"{"id":"no-port","address":"h"}"#),
        (
            "bad-status",
            br#"{"id":"s","address":"h","port":1,"payload":{"metadata":{"instance_status":"??"}}}"#,
        ),
    ] {
        raw.create(&format!("{parent}/{name}"), data, &persistent)
            .await
            .unwrap();
    }

    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch
        .until(WAIT, "good one served", |s| s.contains_key("good"))
        .await;
    assert_eq!(watch.ids(), ["good"]);
    assert_eq!(consumer.stats().malformed_nodes, 3);

    // A bad node arriving while watching is skipped too; a good one still comes through.
    raw.create(&format!("{parent}/late"), b"{", &persistent)
        .await
        .unwrap();
    let late = instance("account", "late-good", 2);
    let _late = provider.register(late).await.unwrap();
    watch
        .until(WAIT, "late good", |s| s.contains_key("late-good"))
        .await;
    assert_eq!(watch.ids(), ["good", "late-good"]);
    eventually(WAIT, "late malformed counted", || async {
        consumer.stats().malformed_nodes >= 4
    })
    .await;

    // Dubbo: a name that is not a URL-encoded URL.
    let iface = "com.acme.X";
    let providers = format!("{}/{iface}/providers", root.path);
    raw.mkdir(&providers, &persistent).await.unwrap();
    raw.create(&format!("{providers}/%ZZnot-a-url"), b"", &persistent)
        .await
        .unwrap();
    let dubbo_consumer = consumer
        .with_dialect(Dialect::Dubbo(dubbo_at(&root)))
        .unwrap();
    let dubbo_provider = provider
        .with_dialect(Dialect::Dubbo(dubbo_at(&root)))
        .unwrap();
    let _p = dubbo_provider
        .register(ServiceInstance::new(
            iface,
            "x",
            Endpoint::new("127.0.0.1", 9),
        ))
        .await
        .unwrap();
    let mut dubbo_watch = Follower::new(dubbo_consumer.watch(iface).unwrap());
    dubbo_watch
        .until(WAIT, "dubbo good one", |s| s.len() == 1)
        .await;
    assert_eq!(dubbo_watch.ids(), ["127.0.0.1:9"]);
    assert!(consumer.stats().malformed_nodes >= 5);
}

#[tokio::test]
async fn foreign_payload_class_is_refused() {
    let root = TestRoot::new();
    let raw = raw_client().await;
    let foreign = format!("{}/orders/o-1", root.path);
    raw.mkdir(
        &format!("{}/orders", root.path),
        &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .unwrap();
    let dubbo3 = br#"{"name":"orders","id":"o-1","address":"10.0.0.9","port":20880,"payload":{"@class":"org.apache.dubbo.registry.zookeeper.ZookeeperInstance","id":"o-1","name":"orders","metadata":{}}}"#;
    raw.create(
        &foreign,
        dubbo3,
        &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .unwrap();

    let provider = registry(spring_at(&root)).await;
    let err = provider
        .register(instance("account", "a-1", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ForeignPayload { .. }), "{err:?}");
    assert!(err.to_string().contains(&foreign), "{err}");
    assert_eq!(
        raw.check_stat(&format!("{}/account/a-1", root.path))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn node_of_another_live_session_is_never_touched() {
    let root = TestRoot::new();
    let first = registry(spring_at(&root)).await;
    let second = registry(spring_at(&root)).await;
    let _mine = first.register(instance("account", "a-1", 1)).await.unwrap();
    let err = second
        .register(instance("account", "a-1", 2))
        .await
        .unwrap_err();
    let path = format!("{}/account/a-1", root.path);
    assert!(err.is_conflict(), "{err:?}");
    assert!(err.to_string().contains(&path), "{err}");
    // Still the first session's node, with the first one's data.
    let (data, stat) = raw_client().await.get_data(&path).await.unwrap();
    assert_eq!(stat.ephemeral_owner, first.session_id());
    assert_eq!(
        spring::decode(&path, "account", &data)
            .unwrap()
            .endpoint
            .port,
        1
    );
}

#[tokio::test]
async fn session_expiry_reregisters_and_resets_watchers() {
    let root = TestRoot::new();
    // The provider runs on its own one-worker runtime so the test can hold its session task
    // still while it takes the session over from a second connection.
    let provider_rt = BackgroundRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap(),
    ));
    let provider_rt = provider_rt.0.as_ref().unwrap();
    let dialect = spring_at(&root);
    let provider = provider_rt
        .spawn(async move { registry(dialect).await })
        .await
        .unwrap();
    let observer = registry(spring_at(&root)).await;
    let me = instance("account", "a-1", 1);
    let _registration = provider.register(me.clone()).await.unwrap();
    let mut own = Follower::new(provider.watch("account").unwrap());
    let mut other = Follower::new(observer.watch("account").unwrap());
    own.until(WAIT, "own watch sees a-1", |s| s.contains_key("a-1"))
        .await;
    other
        .until(WAIT, "observer sees a-1", |s| s.contains_key("a-1"))
        .await;
    let old_session = provider.session_id();
    let before_expiry = own.seen.len();
    let path = format!("{}/account/a-1", root.path);
    let raw = raw_client().await;

    // Force expiry: hold the provider's worker (so its client cannot reconnect and win the
    // session back), attach a second connection with the same session id and password, close
    // it — the server ends the session and deletes its EPHEMERAL node — then let go.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (frozen_tx, frozen) = tokio::sync::oneshot::channel();
    provider_rt.spawn(async move {
        let _ = frozen_tx.send(());
        let _ = released.recv_timeout(Duration::from_secs(60));
    });
    frozen.await.unwrap();
    let session = provider.zookeeper_client().session().clone();
    let hijack = zk::Client::connector()
        .with_session(session)
        .connect(&servers())
        .await
        .unwrap();
    drop(hijack);
    eventually(WAIT, "session closed by the second connection", || async {
        raw.check_stat(&path).await.unwrap().is_none()
    })
    .await;
    release.send(()).unwrap();

    eventually(WAIT, "a new session", || async {
        provider.session_id() != old_session && provider.stats().session_expiries >= 1
    })
    .await;
    eventually(WAIT, "re-registered under the new session", || async {
        matches!(raw.check_stat(&path).await, Ok(Some(stat)) if stat.ephemeral_owner == provider.session_id())
    })
    .await;
    assert_eq!(provider.stats().reregistrations, 1);
    assert_eq!(
        raw.list_children(&format!("{}/account", root.path))
            .await
            .unwrap(),
        ["a-1"]
    );

    // The provider's own watch stream was rebuilt on the new session: a Reset that has a-1.
    own.until_seen(
        before_expiry,
        WAIT,
        "a Reset with a-1 after the expiry",
        |c| matches!(c, Change::Reset(all) if all.iter().any(|i| i.id == "a-1")),
    )
    .await;
    assert!(own.instances.contains_key("a-1"));
    // The observer ends with exactly the one instance.
    other
        .until(WAIT, "observer still has a-1", |s| s.contains_key("a-1"))
        .await;
    assert_eq!(observer.snapshot("account").await.unwrap(), vec![me]);
}

/// A runtime dropped without blocking (dropping one inside async code would panic, and a
/// panic while unwinding would abort every test).
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[tokio::test]
async fn sigkilled_provider_disappears_within_session_timeout() {
    let root = TestRoot::new();
    let consumer = registry(spring_at(&root)).await;
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch.until(WAIT, "empty", |s| s.is_empty()).await;

    // The crate's own `register` example, as a separate process.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let session_timeout = Duration::from_secs(4);
    let mut child = Command::new(dir.join("register"))
        .args([
            "--zk",
            &servers(),
            "--root",
            &root.path,
            "--dialect",
            "spring",
        ])
        .args([
            "--service",
            "account",
            "--address",
            "127.0.0.1:50051",
            "--id",
            "victim",
        ])
        .args([
            "--session-timeout-ms",
            &session_timeout.as_millis().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run target/…/examples/register (built by cargo test)");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(line.contains("\"registered\""), "{line}");

    watch
        .until(WAIT, "victim registered", |s| s.contains_key("victim"))
        .await;
    child.0.kill().unwrap(); // SIGKILL: no deregistration
    child.0.wait().unwrap();
    let killed = Instant::now();
    watch
        .until(session_timeout * 3, "victim gone", |s| s.is_empty())
        .await;
    let took = killed.elapsed();
    assert!(
        took <= session_timeout + Duration::from_secs(2),
        "took {took:?} for a {session_timeout:?} session"
    );
}

/// Deletes `ids` under `parent` in one ZooKeeper transaction (like an operator's mistake or a
/// server-side mass expiry: one burst of events).
async fn delete_at_once(raw: &zk::Client, parent: &str, ids: &[&str]) {
    let mut multi = raw.new_multi_writer();
    for id in ids {
        multi.add_delete(&format!("{parent}/{id}"), None).unwrap();
    }
    multi.commit().await.unwrap();
}

#[tokio::test]
async fn mass_removal_is_held_then_applied() {
    let root = TestRoot::new();
    // Long enough that re-registering three instances fits in the window on a loaded CI box.
    let hold = Duration::from_secs(4);
    let consumer = ZkRegistry::connect(
        ZkConfig::new(servers())
            .with_dialect(spring_at(&root))
            .with_debounce(Duration::from_millis(100))
            .with_mass_removal(MassRemovalPolicy::default().with_hold(hold)),
    )
    .await
    .unwrap();
    let provider = registry(spring_at(&root)).await;
    let mut regs = Vec::new();
    for (n, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
        regs.push(
            provider
                .register(instance("account", id, n as u16 + 1))
                .await
                .unwrap(),
        );
    }
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch.until(WAIT, "four", |s| s.len() == 4).await;

    // Three of four vanish at once: held, although ZooKeeper no longer has them…
    let raw = raw_client().await;
    let parent = format!("{}/account", root.path);
    let removed_at = Instant::now();
    delete_at_once(&raw, &parent, &["b", "c", "d"]).await;
    assert_eq!(raw.list_children(&parent).await.unwrap(), ["a"]);
    eventually(WAIT, "hold started", || async {
        consumer.stats().held_removals == 1
    })
    .await;
    assert_eq!(consumer.snapshot("account").await.unwrap().len(), 4);
    // …and applied once the window is over, because it is still true.
    watch.until(WAIT, "applied", |s| s.len() == 1).await;
    assert!(
        removed_at.elapsed() >= hold,
        "applied after {:?}",
        removed_at.elapsed()
    );
    assert_eq!(watch.ids(), ["a"]);

    // A mass removal that heals within the window is never applied.
    let again = registry(spring_at(&root)).await;
    let mut back = Vec::new();
    for (n, id) in ["b", "c", "d"].into_iter().enumerate() {
        back.push(
            again
                .register(instance("account", id, n as u16 + 2))
                .await
                .unwrap(),
        );
    }
    watch.until(WAIT, "four again", |s| s.len() == 4).await;
    let seen_before = watch.seen.len();
    // The healer's session is ready before the removal so only the re-creates race the window.
    let healer = registry(spring_at(&root)).await;
    delete_at_once(&raw, &parent, &["b", "c", "d"]).await;
    eventually(WAIT, "second hold", || async {
        consumer.stats().held_removals == 2
    })
    .await;
    for (n, id) in ["b", "c", "d"].into_iter().enumerate() {
        back.push(
            healer
                .register(instance("account", id, n as u16 + 2))
                .await
                .unwrap(),
        );
    }
    watch.drain_for(hold * 2).await;
    assert_eq!(watch.ids(), ["a", "b", "c", "d"]);
    assert!(
        !watch.seen[seen_before..]
            .iter()
            .any(|c| matches!(c, Change::Remove(_))),
        "a healed removal leaked: {:?}",
        &watch.seen[seen_before..]
    );
    drop(regs);
}

#[tokio::test]
async fn digest_acl_creator_all_and_readable_parents() {
    let user = "keel-test:s3cret";
    let root = TestRoot::new().with_auth(user);
    let provider = ZkRegistry::connect(
        ZkConfig::new(servers())
            .with_dialect(spring_at(&root))
            .with_digest_auth(user),
    )
    .await
    .unwrap();
    let registration = provider
        .register(instance("account", "a-1", 1))
        .await
        .unwrap();
    let raw = raw_client().await;
    let authed = zk::Client::connector()
        .with_auth("digest", user.as_bytes())
        .connect(&servers())
        .await
        .unwrap();
    // Reading an ACL needs READ or ADMIN on the node.
    let (acl, _) = authed.get_acl(registration.path()).await.unwrap();
    assert_eq!(acl.len(), 1, "{acl:?}");
    assert_eq!(acl[0].scheme(), "digest");
    assert!(acl[0].id().starts_with("keel-test:"), "{acl:?}");
    assert_eq!(acl[0].permission(), zk::Permission::ALL);
    let parent = format!("{}/account", root.path);
    let (acl, _) = raw.get_acl(&parent).await.unwrap();
    assert!(
        acl.iter()
            .any(|a| a.scheme() == "world" && a.permission() == zk::Permission::READ),
        "{acl:?}"
    );
    // Anyone may list; only the digest user may read the instance.
    assert_eq!(raw.list_children(&parent).await.unwrap(), ["a-1"]);
    assert_eq!(
        raw.get_data(registration.path()).await.unwrap_err(),
        zk::Error::NoAuth
    );
    assert_eq!(provider.snapshot("account").await.unwrap().len(), 1);
    registration.deregister().await.unwrap();
}

#[tokio::test]
#[ignore = "disruptive: restarts shared ZooKeeper; run serially by scripts/test"]
async fn zookeeper_restart_keeps_watches_and_registrations() {
    let _guard = StartOnDrop("zookeeper");
    let root = TestRoot::new();
    let provider = registry(spring_at(&root)).await;
    let consumer = registry(spring_at(&root)).await;
    let _a = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch.until(WAIT, "a", |s| s.contains_key("a")).await;
    let seen_before = watch.seen.len();

    let restart = tokio::task::spawn_blocking(|| common::services(&["restart", "zookeeper"]));
    // While it restarts, the last known snapshot keeps serving.
    assert_eq!(consumer.snapshot("account").await.unwrap().len(), 1);
    restart.await.unwrap();

    // Registration survives (same session, or re-created on a new one).
    let raw = raw_client().await;
    let path = format!("{}/account/a", root.path);
    eventually(Duration::from_secs(60), "a registered after restart", || async {
        matches!(raw.check_stat(&path).await, Ok(Some(s)) if s.ephemeral_owner == provider.session_id())
    })
    .await;
    // Watches keep firing.
    let _b = provider
        .register(instance("account", "b", 2))
        .await
        .unwrap();
    watch
        .until(Duration::from_secs(60), "b after restart", |s| {
            s.contains_key("b")
        })
        .await;
    assert!(watch.instances.contains_key("a"));
    assert!(
        !watch.seen[seen_before..]
            .iter()
            .any(|c| matches!(c, Change::Remove(i) if i.id == "a")),
        "a was dropped during the restart: {:?}",
        &watch.seen[seen_before..]
    );
}

/// Whether the 3-node ensemble runs; without it the ensemble tests skip, or fail when
/// `KEEL_REQUIRE_ENSEMBLE` is set.
fn ensemble_running() -> bool {
    if common::services_status().contains("ensemble member") {
        return true;
    }
    assert!(
        std::env::var_os("KEEL_REQUIRE_ENSEMBLE").is_none(),
        "KEEL_REQUIRE_ENSEMBLE is set but no ensemble runs (scripts/services up --ensemble)"
    );
    eprintln!(
        "SKIPPED: needs `scripts/services up --ensemble` (set KEEL_REQUIRE_ENSEMBLE=1 to fail instead)"
    );
    false
}

const ENSEMBLE: &str = "127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183";

#[tokio::test]
#[ignore = "disruptive: restarts shared ZooKeeper; run serially by scripts/test"]
async fn ensemble_member_down_discovery_keeps_working() {
    if !ensemble_running() {
        return;
    }
    common::trace();
    let root = TestRoot::new();
    let connect = || {
        ZkRegistry::connect(
            ZkConfig::new(ENSEMBLE)
                .with_dialect(spring_at(&root))
                .with_session_timeout(Duration::from_secs(6)),
        )
    };
    let provider = connect().await.unwrap();
    let consumer = connect().await.unwrap();
    let _a = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch.until(WAIT, "a", |s| s.contains_key("a")).await;
    let consumer_session = consumer.session_id();
    let member = tokio::task::spawn_blocking(move || common::member_serving(consumer_session))
        .await
        .unwrap();
    tracing::info!(
        session = format_args!("{consumer_session:#x}"),
        ?member,
        "consumer session before zookeeper-2 stops"
    );

    let _guard = StartOnDrop("zookeeper-2");
    tokio::task::spawn_blocking(|| common::services(&["stop", "zookeeper-2"]))
        .await
        .unwrap();
    let _b = provider
        .register(instance("account", "b", 2))
        .await
        .unwrap();
    watch
        .until(Duration::from_secs(60), "b with a member down", |s| {
            s.len() == 2
        })
        .await;
    // b may have been read by the re-read that follows a reconnection; c, registered after it,
    // reaches the consumer only through a watch that is armed on the member it now talks to.
    let _c = provider
        .register(instance("account", "c", 3))
        .await
        .unwrap();
    watch
        .until(Duration::from_secs(30), "c with a member down", |s| {
            s.len() == 3
        })
        .await;
    assert_eq!(consumer.snapshot("account").await.unwrap().len(), 3);
    tokio::task::spawn_blocking(|| common::services(&["start", "zookeeper-2"]))
        .await
        .unwrap();
}

/// Deterministic form of the case above: the consumer talks to member 2 only, keeps its session
/// while member 2 restarts, and must still see a registration made after it reconnected.
/// (`zookeeper-client` 0.11 does not re-send persistent watches when it reconnects, so Keel
/// re-arms its watch itself.)
#[tokio::test]
#[ignore = "disruptive: restarts a shared ZooKeeper ensemble member; run serially by scripts/test"]
async fn watch_rearmed_after_reconnect_to_restarted_member() {
    if !ensemble_running() {
        return;
    }
    common::trace();
    let root = TestRoot::new();
    let provider = ZkRegistry::connect(
        ZkConfig::new("127.0.0.1:2181,127.0.0.1:2183")
            .with_dialect(spring_at(&root))
            .with_session_timeout(Duration::from_secs(6)),
    )
    .await
    .unwrap();
    // The longest session the members grant (20 ticks of 1 s): it outlives the restart.
    let consumer = ZkRegistry::connect(
        ZkConfig::new("127.0.0.1:2182")
            .with_dialect(spring_at(&root))
            .with_session_timeout(Duration::from_secs(20)),
    )
    .await
    .unwrap();
    let session = consumer.session_id();
    let _a = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch.until(WAIT, "a", |s| s.contains_key("a")).await;

    let guard = StartOnDrop("zookeeper-2");
    tokio::task::spawn_blocking(|| common::services(&["stop", "zookeeper-2"]))
        .await
        .unwrap();
    let _b = provider
        .register(instance("account", "b", 2))
        .await
        .unwrap();
    tokio::task::spawn_blocking(|| common::services(&["start", "zookeeper-2"]))
        .await
        .unwrap();
    drop(guard);
    // Read by the re-read after the reconnection.
    watch
        .until(Duration::from_secs(60), "b after member 2 restarted", |s| {
            s.contains_key("b")
        })
        .await;
    let _c = provider
        .register(instance("account", "c", 3))
        .await
        .unwrap();
    watch
        .until(
            Duration::from_secs(30),
            "c, registered after the consumer reconnected",
            |s| s.contains_key("c"),
        )
        .await;
    assert_eq!(
        (consumer.session_id(), consumer.stats().session_expiries),
        (session, 0),
        "the consumer's session must survive the restart, or this test does not test a reconnect"
    );
    assert!(
        consumer.stats().rearmed_watches >= 1,
        "{:?}",
        consumer.stats()
    );
}

/// The first member of the shared ZooKeeper, for the fault-injecting proxy.
fn first_member() -> String {
    let servers = servers();
    let hosts = servers.split('/').next().unwrap_or_default();
    hosts.split(',').next().unwrap_or_default().to_owned()
}

/// Two handles on one node would alias: dropping either would delete the node the other one
/// relies on. The second registration of a node through the same registry is refused.
#[tokio::test]
async fn second_registration_of_the_same_node_is_a_duplicate() {
    let root = TestRoot::new();
    let provider = registry(spring_at(&root)).await;
    let first = provider
        .register(instance("account", "a-1", 1))
        .await
        .unwrap();
    let err = provider
        .register(instance("account", "a-1", 1).with_metadata("weight", "300"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Duplicate { path } if path == first.path()),
        "{err:?}"
    );
    assert!(err.is_conflict());
    // The first registration is untouched: its node, its data.
    let raw = raw_client().await;
    let (data, stat) = raw.get_data(first.path()).await.unwrap();
    assert_eq!(stat.ephemeral_owner, provider.session_id());
    let decoded = spring::decode(first.path(), "account", &data).unwrap();
    assert!(!decoded.metadata.contains_key("weight"), "{decoded:?}");

    // Dubbo: the node is the provider URL, so two ids on one endpoint are one node…
    let iface = "com.acme.Ledger";
    let dubbo_view = provider
        .with_dialect(Dialect::Dubbo(dubbo_at(&root)))
        .unwrap();
    let at = |id: &str| ServiceInstance::new(iface, id, Endpoint::new("127.0.0.1", 7));
    let mut x = dubbo_view.register(at("x")).await.unwrap();
    let err = dubbo_view.register(at("y")).await.unwrap_err();
    assert!(matches!(err, Error::Duplicate { .. }), "{err:?}");
    // …and a status change may not move one registration onto another's node.
    let oos = dubbo_view
        .register(at("z").with_status(InstanceStatus::OutOfService))
        .await
        .unwrap();
    let err = x
        .set_status(InstanceStatus::OutOfService)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Duplicate { .. }), "{err:?}");
    assert_eq!(x.instance().status, InstanceStatus::Up);
    let providers = format!("{}/{iface}/providers", root.path);
    assert_eq!(raw.list_children(&providers).await.unwrap().len(), 2);

    // Once the first handle is gone, the node may be registered again.
    let path = first.path().to_owned();
    first.deregister().await.unwrap();
    let again = provider
        .register(instance("account", "a-1", 1))
        .await
        .unwrap();
    let stat = raw.check_stat(&path).await.unwrap().unwrap();
    assert_eq!(stat.ephemeral_owner, provider.session_id());
    drop((again, oos, x));
}

/// A deregistration cut off by a connection blip (the session survives) is retried until the
/// node is gone; it is never left for the rest of the session.
#[tokio::test]
async fn deregister_during_a_connection_blip_still_removes_the_node() {
    common::trace();
    let root = TestRoot::new();
    let (proxy, provider) =
        through_proxy(&root, |c| c.with_session_timeout(Duration::from_secs(10))).await;
    let registration = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let path = registration.path().to_owned();
    let session = provider.session_id();

    proxy.set(Mode::Blackhole);
    // The client gives up on the silent connection after 2/5 of the session timeout.
    let err = registration.deregister().await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    proxy.set(Mode::Pass);

    let raw = raw_client().await;
    eventually(WAIT, "a deleted after the reconnection", || async {
        raw.check_stat(&path).await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        (provider.session_id(), provider.stats().session_expiries),
        (session, 0),
        "the session must survive the blip, or this test does not test a reconnection"
    );
}

/// A Dubbo status change whose second half fails (the old node cannot be deleted: the parent
/// grants no DELETE) leaves the registration as it was, with exactly one provider node.
#[tokio::test]
async fn failed_dubbo_status_change_leaves_one_provider_node() {
    let root = TestRoot::new();
    let provider = registry(Dialect::Dubbo(dubbo_at(&root))).await;
    let iface = "com.acme.Ledger";
    let mut registration = provider
        .register(ServiceInstance::new(
            iface,
            "x",
            Endpoint::new("127.0.0.1", 7),
        ))
        .await
        .unwrap();
    let providers = format!("{}/{iface}/providers", root.path);
    let up_name = registration.path().rsplit('/').next().unwrap().to_owned();
    let raw = raw_client().await;
    let no_delete = [zk::Acl::new(
        zk::Permission::CREATE
            | zk::Permission::READ
            | zk::Permission::WRITE
            | zk::Permission::ADMIN,
        zk::AuthId::anyone(),
    )];
    let all = [zk::Acl::new(zk::Permission::ALL, zk::AuthId::anyone())];
    raw.set_acl(&providers, &no_delete, None).await.unwrap();
    let result = registration.set_status(InstanceStatus::OutOfService).await;
    // Restored before any assertion, so the root can be cleaned up whatever happens.
    raw.set_acl(&providers, &all, None).await.unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(err, Error::ZooKeeper { op: "delete", .. }),
        "{err:?}"
    );
    assert_eq!(registration.instance().status, InstanceStatus::Up);

    // The half-done change is undone: only the UP node is left.
    eventually(WAIT, "only the UP provider node", || async {
        raw.list_children(&providers).await.unwrap() == [up_name.as_str()]
    })
    .await;
    // A retry now succeeds and leaves only the OUT_OF_SERVICE node.
    registration
        .set_status(InstanceStatus::OutOfService)
        .await
        .unwrap();
    let names = raw.list_children(&providers).await.unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        dubbo::decode_node_name(&names[0])
            .unwrap()
            .contains("enabled=false")
    );
    registration.deregister().await.unwrap();
    assert!(raw.list_children(&providers).await.unwrap().is_empty());
}

/// A deregistration queued while the expired session is being replaced is applied before the
/// registrations are re-created: the deregistered instance never comes back, not even briefly.
#[tokio::test]
async fn deregistered_during_renew_is_never_recreated() {
    common::trace();
    let root = TestRoot::new();
    let (proxy, provider) = through_proxy(&root, |c| {
        c.with_session_timeout(Duration::from_secs(4))
            .with_request_timeout(Duration::from_secs(2))
    })
    .await;
    let registration = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let old_session = provider.session_id();
    let a = registration.path().to_owned();
    let raw = raw_client().await;
    let mut events = raw
        .watch(
            &format!("{}/account", root.path),
            zk::AddWatchMode::PersistentRecursive,
        )
        .await
        .unwrap();

    proxy.set(Mode::Blackhole);
    eventually(WAIT, "the session task sees the expiry", || async {
        provider.stats().session_expiries >= 1
    })
    .await;
    eventually(WAIT, "a gone with the old session", || async {
        raw.check_stat(&a).await.unwrap().is_none()
    })
    .await;
    // No session to run it on: the caller times out, the command stays queued.
    let err = registration.deregister().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    proxy.set(Mode::Pass);
    eventually(WAIT, "a new session", || async {
        provider.session_id() != old_session
    })
    .await;
    // Commands run in order on the session task: once b is created, whatever the new session
    // did with a is done, and its events came before b's.
    let b = provider
        .register(instance("account", "b", 2))
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, events.changed())
            .await
            .expect("b's creation is seen");
        seen.push((event.event_type, event.path.clone()));
        if event.event_type == zk::EventType::NodeCreated && event.path == b.path() {
            break;
        }
    }
    assert!(
        !seen
            .iter()
            .any(|(kind, path)| *kind == zk::EventType::NodeCreated && *path == a),
        "the deregistered instance was re-created on the new session: {seen:?}"
    );
    assert_eq!(raw.check_stat(&a).await.unwrap(), None);
}

/// A second session that ends while the registrations are being re-created on it is noticed
/// like the first: a third session re-creates them and discovery resumes on it.
#[tokio::test]
async fn expiry_of_the_renewed_session_during_reregistration_is_noticed() {
    common::trace();
    let root = TestRoot::new();
    let (proxy, provider) =
        through_proxy(&root, |c| c.with_session_timeout(Duration::from_secs(4))).await;
    // Two registrations: the first op on the new session fails when its connection goes
    // silent, the second is queued until that session expires on the client side (the request
    // timeout, 15 s by default, is longer than the 5.6 s the client takes to declare it).
    let a = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let b = provider
        .register(instance("account", "b", 2))
        .await
        .unwrap();
    let first = provider.session_id();

    proxy.set(Mode::Blackhole);
    eventually(WAIT, "the first session ends", || async {
        provider.stats().session_expiries >= 1
    })
    .await;
    // The next session is established, then goes silent and expires during re-registration.
    proxy.set(Mode::OneHandshakeThenBlackhole);
    eventually(Duration::from_secs(40), "a second session", || async {
        provider.session_id() != first
    })
    .await;
    let second = provider.session_id();
    proxy.set(Mode::Pass);

    let raw = raw_client().await;
    let owned = |path: String| {
        let raw = &raw;
        let provider = &provider;
        async move {
            matches!(raw.check_stat(&path).await, Ok(Some(s)) if s.ephemeral_owner == provider.session_id())
        }
    };
    eventually(
        Duration::from_secs(40),
        "a and b re-registered on a third session",
        || async {
            let sid = provider.session_id();
            sid != first
                && sid != second
                && provider.stats().session_expiries >= 2
                && owned(a.path().to_owned()).await
                && owned(b.path().to_owned()).await
        },
    )
    .await;
    // Discovery runs on the third session too.
    let ids: Vec<_> = provider
        .snapshot("account")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

/// A sibling service we may not read (a Java service whose Curator nodes carry a digest ACL)
/// is skipped by the start-up foreign-payload check instead of failing our registration.
#[tokio::test]
async fn unreadable_sibling_service_does_not_block_registration() {
    let java = "java-team:s3cret";
    let root = TestRoot::new().with_auth(java);
    let authed = zk::Client::connector()
        .with_auth("digest", java.as_bytes())
        .connect(&servers())
        .await
        .unwrap();
    authed
        .create(
            &root.path,
            &[],
            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
        )
        .await
        .unwrap();
    let sibling = format!("{}/java-svc", root.path);
    let creator_only = zk::CreateMode::Persistent.with_acls(zk::Acls::creator_all());
    authed.create(&sibling, &[], &creator_only).await.unwrap();
    let spring_json = spring::encode(&instance("java-svc", "j-1", 8080), 0).unwrap();
    authed
        .create(&format!("{sibling}/j-1"), &spring_json, &creator_only)
        .await
        .unwrap();
    // Without the digest, the sibling cannot even be listed.
    let raw = raw_client().await;
    assert_eq!(
        raw.list_children(&sibling).await.unwrap_err(),
        zk::Error::NoAuth
    );

    let provider = registry(spring_at(&root)).await;
    let registration = provider
        .register(instance("account", "a-1", 1))
        .await
        .unwrap();
    assert_eq!(
        raw.check_stat(registration.path())
            .await
            .unwrap()
            .map(|s| s.ephemeral_owner),
        Some(provider.session_id())
    );
    registration.deregister().await.unwrap();
}

/// A node of an earlier session of ours that the server still keeps (the client gave that
/// session up, the server did not) is replaced in one transaction: a consumer of the
/// single-instance service never sees it empty meanwhile.
#[tokio::test]
async fn replacing_an_earlier_sessions_node_never_empties_the_service() {
    common::trace();
    let root = TestRoot::new();
    let (proxy, provider) = through_proxy(&root, |c| {
        c.with_session_timeout(Duration::from_secs(4))
            .with_request_timeout(Duration::from_secs(3))
    })
    .await;
    let registration = provider
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let a = registration.path().to_owned();
    let old_session = provider.session_id();
    // The consumer follows its watch all along, as a client's discovery does (a stream read
    // only at the end would coalesce a removal and its undoing into nothing).
    let consumer = registry(spring_at(&root)).await;
    let mut watch = Follower::new(consumer.watch("account").unwrap());
    watch
        .until(WAIT, "the consumer sees a", |s| s.contains_key("a"))
        .await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(change) = futures::StreamExt::next(&mut watch.watch).await {
                seen.lock().unwrap().push(change);
            }
        }
    });

    // The provider's connection goes silent, and a second connection takes its session over
    // and keeps it alive on the server: the provider's client gives the session up (after 7/5
    // of its timeout) while the server keeps it, and with it the node.
    proxy.set(Mode::Blackhole);
    let keeper = zk::Client::connector()
        .with_session(provider.zookeeper_client().session().clone())
        .connect(&servers())
        .await
        .unwrap();
    eventually(WAIT, "the provider gives its session up", || async {
        provider.stats().session_expiries >= 1
    })
    .await;
    let raw = raw_client().await;
    let owner = raw.check_stat(&a).await.unwrap().map(|s| s.ephemeral_owner);
    assert_eq!(owner, Some(old_session), "the server must still keep a");

    // A new session finds a owned by the earlier one and replaces it, over a slow link: two
    // separate transactions would leave the consumer (direct, fast) ample time to see a gone.
    proxy.set(Mode::Delay(Duration::from_millis(300)));
    eventually(WAIT, "a owned by the provider's new session", || async {
        let sid = provider.session_id();
        sid != old_session
            && matches!(raw.check_stat(&a).await, Ok(Some(s)) if s.ephemeral_owner == sid)
    })
    .await;
    // Events arrive in order: once the consumer sees z, it has seen whatever happened to a.
    let z = format!("{}/account/z", root.path);
    let data = spring::encode(&instance("account", "z", 26), 0).unwrap();
    raw.create(
        &z,
        &data,
        &zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all()),
    )
    .await
    .unwrap();
    eventually(WAIT, "the consumer sees z", || async {
        seen.lock()
            .unwrap()
            .iter()
            .any(|c| matches!(c, Change::Add(i) if i.id == "z"))
    })
    .await;
    recorder.abort();
    let after = seen.lock().unwrap().clone();
    assert!(
        !after.iter().any(|c| matches!(c, Change::Remove(_))
            || matches!(c, Change::Reset(all) if !all.iter().any(|i| i.id == "a"))),
        "the consumer lost a while its node was replaced: {after:?}"
    );
    drop(keeper);
}

/// Watching services does not accumulate: a service's watch task (and server-side watch) is
/// released once it has no watcher and no snapshot caller left for the linger, and a later
/// user of the service starts it again.
#[tokio::test]
async fn watches_of_dropped_watchers_are_released() {
    let root = TestRoot::new();
    let registry = ZkRegistry::connect(
        ZkConfig::new(servers())
            .with_dialect(spring_at(&root))
            .with_watch_linger(Duration::ZERO),
    )
    .await
    .unwrap();
    let _account = registry
        .register(instance("account", "a", 1))
        .await
        .unwrap();
    let watches: Vec<Follower> = (0..50)
        .map(|i| Follower::new(registry.watch(&format!("svc-{i}")).unwrap()))
        .collect();
    assert_eq!(registry.stats().watched_services, 50);
    // Arbitrary names asked once each, as a caller-driven `snapshot` would.
    for i in 0..50 {
        assert!(
            registry
                .snapshot(&format!("absent-{i}"))
                .await
                .unwrap()
                .is_empty()
        );
    }
    drop(watches);
    eventually(WAIT, "every watch released", || async {
        registry.stats().watched_services == 0
    })
    .await;

    // A service watched again is read afresh and followed.
    let mut account = Follower::new(registry.watch("account").unwrap());
    account
        .until(WAIT, "a seen by a new watch", |s| s.contains_key("a"))
        .await;
    assert_eq!(registry.stats().watched_services, 1);
    let _b = registry
        .register(instance("account", "b", 2))
        .await
        .unwrap();
    account
        .until(WAIT, "b seen by the new watch", |s| s.contains_key("b"))
        .await;
}

/// A registry in the Spring layout under `root`, connected through a fault proxy in front of
/// the first ensemble member, with `configure` applied to its configuration (timeouts): the
/// proxy (keep it) and the registry.
async fn through_proxy(
    root: &TestRoot,
    configure: impl FnOnce(ZkConfig) -> ZkConfig,
) -> (ZkProxy, ZkRegistry) {
    let proxy = ZkProxy::start(&first_member()).await;
    let config = ZkConfig::new(proxy.addr().to_string()).with_dialect(spring_at(root));
    let registry = ZkRegistry::connect(configure(config)).await.unwrap();
    (proxy, registry)
}
