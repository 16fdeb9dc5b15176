//! The demo end to end, smaller: real ZooKeeper, Kafka (tansu), RabbitMQ and Redis; one account
//! instance SIGKILLed and one restarted gracefully mid-run; every payment succeeds once and the
//! ledger's totals equal the balances.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use keel_testkit::zk::TestRoot;

#[test]
fn every_payment_succeeds_once_and_the_books_balance_under_failure() {
    let root = TestRoot::new();
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args([
            "--payments",
            "400",
            "--concurrency",
            "8",
            "--accounts",
            "20",
        ])
        .args(["--root", &root.path, "--zk", &keel_testkit::zk::servers()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap();
    let summary: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(summary["attempted"], 400, "{stdout}");
    assert_eq!(summary["succeeded"], 400, "{stdout}");
    assert_eq!(summary["failed"], 0, "{stdout}");
    assert_eq!(summary["totals_match"], true, "{stdout}");
    assert!(
        summary["ledger_events"].as_u64().unwrap() >= 400,
        "{stdout}"
    );
    // Every 20th payment is sent twice: each repeat must have been answered from the store.
    assert!(
        summary["duplicates_prevented"].as_u64().unwrap() >= 20,
        "{stdout}"
    );
    assert!(
        stdout.contains("duplicates sent / answered from store    20 / 20"),
        "{stdout}"
    );
}
