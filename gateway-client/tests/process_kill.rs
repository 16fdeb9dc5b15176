#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Issue 5 / C2 with real processes: three tonic providers, each a separate OS process that
//! registers itself in the real ZooKeeper, under steady idempotent load; one is killed with
//! SIGKILL. No call fails, the dead provider's breaker ejects it, after ejection it receives no
//! more calls, and once its ZooKeeper session expires discovery drops it too.
//!
//! The providers are this test binary re-executed with [`CHILD_ENV`] set: the test
//! [`provider_process`] is then the provider (and a no-op in a normal test run).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use keel_breaker::breaker::State;
use keel_client::GrpcChannel;
use keel_registry::dialect::SpringOptions;
use keel_registry::{Dialect, Registry, ZkConfig, ZkRegistry};
use keel_testkit::echo::EchoProvider;
use keel_testkit::eventually;

use common::{EchoLoad, ZkRoot, instance, quick_breaker, state_of};

/// Set (to the provider id) in a re-executed child: run as a provider.
const CHILD_ENV: &str = "KEEL_CLIENT_TEST_PROVIDER_ID";
/// The ZooKeeper root the child registers under.
const CHILD_ROOT_ENV: &str = "KEEL_CLIENT_TEST_PROVIDER_ROOT";
/// The service name the child registers as.
const SERVICE: &str = "echo";

/// The same registry configuration as [`ZkRoot::registry`], for a root given by path.
async fn registry_at(root: &str) -> ZkRegistry {
    ZkRegistry::connect(
        ZkConfig::new(common::servers())
            .with_session_timeout(Duration::from_secs(6))
            .with_dialect(Dialect::Spring(
                SpringOptions::default().with_root(root.to_owned()),
            )),
    )
    .await
    .expect("connect to ZooKeeper on 127.0.0.1 (is `scripts/services up` running?)")
}

/// The provider, when this binary runs as a child (a no-op otherwise): serves echo, registers in
/// ZooKeeper, prints `READY <addr>`, then serves until its stdin closes (and deregisters) or it
/// is killed.
#[test]
fn provider_process() {
    let Ok(id) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = std::env::var(CHILD_ROOT_ENV).expect("the parent sets the root");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (provider, registration, registry) = rt.block_on(async {
        let provider = EchoProvider::start(&id).await.unwrap();
        let registry = registry_at(&root).await;
        let registration = registry
            .register(instance(SERVICE, &id, provider.addr()))
            .await
            .unwrap();
        (provider, registration, registry)
    });
    // Written to the real stdout (not the test harness's capture), then flushed.
    let mut out = std::io::stdout().lock();
    // On a line of its own: the harness has already written `test provider_process ... `.
    writeln!(out, "\nREADY {}", provider.addr()).unwrap();
    out.flush().unwrap();
    drop(out);
    // The runtime's worker serves while this thread waits for the parent to close stdin.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    rt.block_on(async {
        let _ = registration.deregister().await;
        drop(registry);
        provider.stop().await;
    });
}

/// A provider child process; SIGKILLed when dropped unless [`stop`](Self::stop)ped.
struct ProviderProcess {
    id: String,
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
}

impl ProviderProcess {
    /// Starts provider `id` registering under `root` and waits (at most 30 s) for its `READY`.
    async fn spawn(id: &str, root: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "provider_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, id)
            .env(CHILD_ROOT_ENV, root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // Reads the child's stdout to its end (so the harness's own output never blocks or
        // breaks the pipe) and hands over the `READY` line.
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, addr)) = line.split_once("READY ")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut process = Self {
            id: id.to_owned(),
            child,
            stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let addr = tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .unwrap_or_else(|_| panic!("provider {id} not ready within 30 s"))
            .unwrap_or_else(|_| panic!("provider {id} exited before it was ready"));
        process.addr = addr.parse().unwrap();
        process
    }

    /// SIGKILL (`Child::kill` on Unix), then reaps the process.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Closes stdin (the child deregisters and exits) and waits for it, SIGKILL after 10 s.
    async fn stop(mut self) {
        self.stdin = None;
        let exited = eventually(
            &format!("provider {} exits", self.id),
            Duration::from_secs(10),
            || {
                let done = matches!(self.child.try_wait(), Ok(Some(_)));
                async move { done.then_some(()) }
            },
        )
        .await;
        if exited.is_err() {
            self.kill9();
        }
    }
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_provider_process_is_ejected_without_failed_calls() {
    if std::env::var(CHILD_ENV).is_ok() {
        return; // a provider child runs only `provider_process`; belt and braces
    }
    let root = ZkRoot::new().await;
    let registry = root.registry().await;
    let mut ps = Vec::new();
    for i in 0..3 {
        ps.push(ProviderProcess::spawn(&format!("p-{i}"), &root.path).await);
    }
    let channel = GrpcChannel::builder(SERVICE)
        .timeout(Duration::from_secs(5))
        // Long enough that no half-open probe reaches the dead provider during the test.
        .breaker(quick_breaker(Duration::from_secs(120)))
        .connect(&registry, Duration::from_secs(10))
        .await
        .unwrap();
    eventually(
        "three provider processes discovered",
        Duration::from_secs(10),
        || async { (channel.endpoints().len() == 3).then_some(()) },
    )
    .await
    .unwrap();

    let load = EchoLoad::start(&channel, 4);
    eventually(
        "every provider process serves",
        Duration::from_secs(10),
        || async {
            channel
                .endpoints()
                .iter()
                .all(|e| e.calls > 20)
                .then_some(())
        },
    )
    .await
    .unwrap();

    let victim = ps.remove(1);
    let victim_id = victim.id.clone();
    let victim_addr = victim.addr;
    let mut victim = victim;
    victim.kill9();
    let ejected_at = eventually(
        "the killed provider is ejected",
        Duration::from_secs(10),
        || async {
            state_of(&channel, &victim_id)
                .filter(|(s, _)| *s == State::Open)
                .map(|(_, calls)| calls)
        },
    )
    .await
    .unwrap();

    // After ejection: the load goes on, and every look at the victim's count finds it unchanged
    // (or the endpoint gone, once its ZooKeeper session has expired).
    let traffic_after_ejection = |channel: &GrpcChannel| {
        state_of(channel, &victim_id).is_some_and(|(_, calls)| calls != ejected_at)
    };
    let ok_at_ejection = load.ok();
    eventually(
        "load continues after ejection",
        Duration::from_secs(10),
        || async {
            assert!(
                !traffic_after_ejection(&channel),
                "a call reached the ejected provider"
            );
            (load.ok() > ok_at_ejection + 500).then_some(())
        },
    )
    .await
    .unwrap();
    // Its ephemeral registration dies with its session (6 s): discovery removes it while the
    // load keeps running, still without a failed call.
    eventually(
        "the killed provider leaves discovery",
        Duration::from_secs(30),
        || async {
            assert!(
                !traffic_after_ejection(&channel),
                "a call reached the ejected provider"
            );
            (state_of(&channel, &victim_id).is_none() && channel.endpoints().len() == 2)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let ok_at_removal = load.ok();
    eventually(
        "load continues after removal",
        Duration::from_secs(10),
        || async { (load.ok() > ok_at_removal + 200).then_some(()) },
    )
    .await
    .unwrap();
    let (ok, failed) = load.stop().await;

    eprintln!("{ok} ok, {failed} failed; {victim_id} ejected after {ejected_at} calls");
    assert_eq!(failed, 0, "no call may fail");
    assert!(ok > 1000, "steady load ran: {ok} ok");
    for e in channel.endpoints() {
        assert_ne!(e.id, victim_id, "{victim_addr} still listed");
    }
    drop(channel);
    for p in ps {
        p.stop().await;
    }
}
