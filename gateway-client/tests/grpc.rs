#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `GrpcChannel` against real tonic providers on loopback.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_breaker::breaker::State;
use keel_breaker::request::{IdempotencyKey, Idempotent};
use keel_breaker::retry::RetryBudget;
use keel_client::{Balance, Error, GrpcChannel, HashKey};
use keel_core::{Endpoint, ServiceInstance};
use keel_registry::{Registry, StaticRegistry};
use keel_testkit::echo::{EchoReply, EchoRequest, echo_client::EchoClient};
use keel_testkit::eventually;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

use common::{
    EchoLoad, Refusal, ZkRoot, ample_budget, counting_proxy, instance, never_opening_breaker,
    providers, quick_breaker, refusing_h2_server, silent_provider, state_of,
};

fn request(message: &str) -> tonic::Request<EchoRequest> {
    tonic::Request::new(EchoRequest {
        message: message.into(),
        payload: Vec::new(),
    })
}

async fn echo(
    client: &mut EchoClient<GrpcChannel>,
    req: tonic::Request<EchoRequest>,
) -> Result<EchoReply, tonic::Status> {
    client.echo(req).await.map(tonic::Response::into_inner)
}

/// C2 / issue 5: three providers found in ZooKeeper under steady load; one dies abruptly. No call
/// fails (in-flight calls are idempotent and retried elsewhere), its breaker ejects it, and after
/// ejection it gets no more traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_provider_is_ejected_without_failed_calls() {
    let root = ZkRoot::new().await;
    let registry = root.registry().await;
    let (mut ps, _faults) = providers(3).await;
    let mut regs = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        regs.push(
            registry
                .register(instance("echo", &format!("p-{i}"), p.addr()))
                .await
                .unwrap(),
        );
    }
    let channel = GrpcChannel::builder("echo")
        .timeout(Duration::from_secs(5))
        .breaker(quick_breaker(Duration::from_secs(60)))
        .connect(&registry, Duration::from_secs(10))
        .await
        .unwrap();
    eventually(
        "three endpoints discovered",
        Duration::from_secs(10),
        || async { (channel.endpoints().len() == 3).then_some(()) },
    )
    .await
    .unwrap();

    let load = EchoLoad::start(&channel, 4);
    eventually("every provider serves", Duration::from_secs(10), || async {
        channel
            .endpoints()
            .iter()
            .all(|e| e.calls > 20)
            .then_some(())
    })
    .await
    .unwrap();

    ps.remove(1).kill();
    let ejected_at = eventually("p-1 ejected", Duration::from_secs(10), || async {
        state_of(&channel, "p-1")
            .filter(|(s, _)| *s == State::Open)
            .map(|(_, calls)| calls)
    })
    .await
    .unwrap();
    let ok_at_ejection = load.ok();
    eventually(
        "load continues after ejection",
        Duration::from_secs(10),
        || async { (load.ok() > ok_at_ejection + 500).then_some(()) },
    )
    .await
    .unwrap();
    let (_, failed) = load.stop().await;

    assert_eq!(failed, 0, "no call may fail");
    assert_eq!(
        state_of(&channel, "p-1").map(|(_, calls)| calls),
        Some(ejected_at),
        "no traffic to the dead provider after its ejection"
    );
    for r in regs {
        let _ = r.deregister().await;
    }
}

/// A rolling deploy: under steady load of plain calls (not idempotent, so never replayed after
/// an unknown outcome), one of two tonic providers found in ZooKeeper shuts down gracefully
/// while callers still route to it — it sends `GOAWAY`, finishes the calls it took and stops
/// listening — and is started again on a new port. No call fails: those it took complete, those
/// it did not take (refused by its `GOAWAY`, or by its closed port) go to the other provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_under_load_fails_no_plain_call() {
    let root = ZkRoot::new().await;
    let registry = root.registry().await;
    let mut providers = Vec::new();
    let mut regs = Vec::new();
    for i in 0..2 {
        let p = keel_testkit::echo::EchoProvider::start(&format!("p-{i}"))
            .await
            .unwrap();
        regs.push(
            registry
                .register(instance("echo", &format!("p-{i}"), p.addr()))
                .await
                .unwrap(),
        );
        providers.push(p);
    }
    let channel = GrpcChannel::builder("echo")
        .timeout(Duration::from_secs(5))
        .connect(&registry, Duration::from_secs(10))
        .await
        .unwrap();
    eventually("both discovered", Duration::from_secs(10), || async {
        (channel.endpoints().len() == 2).then_some(())
    })
    .await
    .unwrap();
    let load = EchoLoad::plain(&channel, 8);
    for round in 0..3 {
        let before = load.ok();
        eventually("the load runs", Duration::from_secs(10), || async {
            (load.ok() > before + 300).then_some(())
        })
        .await
        .unwrap();
        // Stopped while still registered: the callers keep sending to it as it goes away.
        providers.remove(0).stop().await;
        let reg = regs.remove(0);
        let _ = reg.deregister().await;
        let id = format!("p-{}", round + 2);
        let p = keel_testkit::echo::EchoProvider::start(&id).await.unwrap();
        regs.push(
            registry
                .register(instance("echo", &id, p.addr()))
                .await
                .unwrap(),
        );
        providers.push(p);
        eventually(
            "the new provider serves",
            Duration::from_secs(10),
            || async { (state_of(&channel, &id)?.1 > 50).then_some(()) },
        )
        .await
        .unwrap();
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no plain call may fail ({ok} succeeded)");
    for r in regs {
        let _ = r.deregister().await;
    }
}

/// A provider failing half its calls with UNAVAILABLE is ejected (callers still succeed through
/// retries elsewhere) and, once healthy, readmitted after half-open probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_provider_is_ejected_then_readmitted() {
    ejected_then_readmitted(Balance::RoundRobin).await;
}

/// The same with the default balancer (p2c): an ejected endpoint must compete again once its
/// breaker may let a probe through, though the other providers stay healthy meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_provider_is_ejected_then_readmitted_by_p2c() {
    ejected_then_readmitted(Balance::P2c).await;
}

async fn ejected_then_readmitted(balance: Balance) {
    let (ps, faults) = providers(3).await;
    faults[0].fail_every(2, tonic::Code::Unavailable);
    let channel = GrpcChannel::builder("echo")
        .balance(balance)
        .breaker(quick_breaker(Duration::from_millis(800)))
        .endpoints(ps.iter().map(|p| format!("http://{}", p.addr())))
        .unwrap();
    let bad = format!("http://{}", ps[0].addr());
    let mut client = EchoClient::new(channel.clone());
    let mut failures = 0;
    eventually(
        "the failing provider is ejected",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let channel = channel.clone();
            let bad = bad.clone();
            async move {
                for _ in 0..10 {
                    if echo(&mut client, request("x")).await.is_err() {
                        return Some(Err(()));
                    }
                }
                (state_of(&channel, &bad)?.0 == State::Open).then_some(Ok(()))
            }
        },
    )
    .await
    .unwrap()
    .unwrap_or_else(|()| failures += 1);
    assert_eq!(failures, 0, "retries cover the failing provider");

    // While ejected (800 ms), calls go elsewhere (round robin would send it 3 of these 9).
    let served_before = faults[0].calls();
    let started = tokio::time::Instant::now();
    for _ in 0..9 {
        echo(&mut client, request("y")).await.unwrap();
    }
    if started.elapsed() < Duration::from_millis(700) {
        assert_eq!(
            faults[0].calls(),
            served_before,
            "an ejected provider gets no traffic"
        );
    }

    faults[0].heal();
    eventually(
        "the healed provider is readmitted",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let channel = channel.clone();
            let bad = bad.clone();
            async move {
                echo(&mut client, request("z")).await.ok()?;
                (state_of(&channel, &bad)?.0 == State::Closed).then_some(())
            }
        },
    )
    .await
    .unwrap();
    let before = faults[0].calls();
    for _ in 0..30 {
        echo(&mut client, request("w")).await.unwrap();
    }
    assert!(
        faults[0].calls() >= before + 2,
        "the readmitted provider takes its share again"
    );
}

/// A provider answering `CANCELLED` (what a tonic server answers when its own request timeout
/// ends a handler: a provider whose handlers hang) is failing, and is ejected like any other;
/// the outcome is unknown, so a plain call that got it is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answering_cancelled_is_ejected() {
    let (ps, faults) = providers(2).await;
    faults[0].fail_every(1, tonic::Code::Cancelled);
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::RoundRobin)
        .breaker(quick_breaker(Duration::from_secs(60)))
        .retry_budget(ample_budget())
        .endpoints(ps.iter().map(|p| format!("http://{}", p.addr())))
        .unwrap();
    let bad = format!("http://{}", ps[0].addr());
    let mut client = EchoClient::new(channel.clone());
    let mut cancelled = 0;
    for _ in 0..20 {
        if let Err(status) = echo(&mut client, request("x")).await {
            assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
            cancelled += 1;
        }
    }
    assert_eq!(
        state_of(&channel, &bad).map(|s| s.0),
        Some(State::Open),
        "the cancelling provider is ejected"
    );
    assert_eq!(
        faults[0].calls(),
        cancelled,
        "each call it cancelled reached the caller, none was sent again"
    );
}

/// Consistent hash: a key sticks to one provider; when a provider leaves, only its keys move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_is_sticky_and_moves_minimally() {
    let (ps, _faults) = providers(3).await;
    let registry = StaticRegistry::new();
    let mut regs = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        regs.push(
            registry
                .register(instance("echo", &format!("p-{i}"), p.addr()))
                .await
                .unwrap(),
        );
    }
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::ConsistentHash)
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    eventually("three endpoints", Duration::from_secs(5), || async {
        (channel.endpoints().len() == 3).then_some(())
    })
    .await
    .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let route = |client: &mut EchoClient<GrpcChannel>, key: u32| {
        let mut client = client.clone();
        async move {
            let mut req = request("k");
            req.extensions_mut()
                .insert(HashKey::of(&format!("account-{key}")));
            echo(&mut client, req).await.unwrap().server_id
        }
    };
    let mut first = BTreeMap::new();
    for key in 0..60 {
        first.insert(key, route(&mut client, key).await);
    }
    for key in 0..60 {
        assert_eq!(
            route(&mut client, key).await,
            first[&key],
            "key {key} is sticky"
        );
    }
    let used: BTreeSet<_> = first.values().cloned().collect();
    assert_eq!(used.len(), 3, "keys spread over every provider: {first:?}");

    regs.remove(1).deregister().await.unwrap();
    eventually("p-1 removed", Duration::from_secs(5), || async {
        (channel.endpoints().len() == 2).then_some(())
    })
    .await
    .unwrap();
    for key in 0..60 {
        let now = route(&mut client, key).await;
        if first[&key] == "p-1" {
            assert_ne!(now, "p-1");
        } else {
            assert_eq!(
                now, first[&key],
                "key {key} of a remaining provider must not move"
            );
        }
    }
}

/// Zone preference: same-zone instances take every call; others only when the zone has none
/// available (all ejected, or gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_preference_and_fallback() {
    let (ps, faults) = providers(3).await;
    let registry = StaticRegistry::new();
    let zones = ["sh-a", "sh-b", "sh-b"];
    let mut regs = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        let inst = instance("echo", &format!("p-{i}"), p.addr()).with_metadata("zone", zones[i]);
        regs.push(registry.register(inst).await.unwrap());
    }
    let channel = GrpcChannel::builder("echo")
        .zone("sh-a")
        .breaker(quick_breaker(Duration::from_secs(60)))
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    eventually("three endpoints", Duration::from_secs(5), || async {
        (channel.endpoints().len() == 3).then_some(())
    })
    .await
    .unwrap();
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..20 {
        assert_eq!(
            echo(&mut client, request("z")).await.unwrap().server_id,
            "p-0"
        );
    }

    // The local zone's only instance fails: retries fall back to the other zone, and once it is
    // ejected every call goes there.
    faults[0].fail_every(1, tonic::Code::Unavailable);
    eventually("p-0 ejected", Duration::from_secs(10), || {
        let mut client = client.clone();
        let channel = channel.clone();
        async move {
            let reply = echo(&mut client, request("z")).await.ok()?;
            assert_ne!(reply.server_id, "p-0");
            (state_of(&channel, "p-0")?.0 == State::Open).then_some(())
        }
    })
    .await
    .unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        seen.insert(echo(&mut client, request("z")).await.unwrap().server_id);
    }
    assert!(!seen.is_empty() && !seen.contains("p-0"), "{seen:?}");

    // The local zone is gone altogether: still served by the other zone.
    regs.remove(0).deregister().await.unwrap();
    eventually("p-0 removed", Duration::from_secs(5), || async {
        (channel.endpoints().len() == 2).then_some(())
    })
    .await
    .unwrap();
    assert_ne!(
        echo(&mut client, request("z")).await.unwrap().server_id,
        "p-0"
    );
}

/// The server sees the caller's trace id, a deadline smaller than the caller's, a request id and
/// the idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagates_trace_deadline_request_id_and_key() {
    let (ps, _faults) = providers(1).await;
    let channel = GrpcChannel::builder("echo")
        .timeout(Duration::from_secs(3))
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let trace_id = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128);
    let remote = SpanContext::new(
        trace_id,
        SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "v1")]).unwrap(),
    );
    let reply = {
        use opentelemetry::baggage::BaggageExt;
        let cx = opentelemetry::Context::new()
            .with_remote_span_context(remote)
            .with_baggage([opentelemetry::KeyValue::new("tenant", "acme")]);
        let _guard = cx.attach();
        let mut req = request("trace");
        req.extensions_mut().insert(IdempotencyKey("pay-42".into()));
        echo(&mut client, req).await.unwrap()
    };
    let md = &reply.metadata;
    assert!(
        md.get("traceparent")
            .is_some_and(|tp| tp.contains(&trace_id.to_string())),
        "{md:?}"
    );
    let timeout = keel_breaker::deadline::parse_grpc_timeout(&md["grpc-timeout"]).unwrap();
    assert!(
        timeout < Duration::from_secs(3) && timeout > Duration::from_secs(1),
        "{timeout:?}"
    );
    assert_eq!(md["idempotency-key"], "pay-42");
    assert_eq!(md["x-request-id"].len(), 32);
    assert_eq!(
        md.get("tracestate").map(String::as_str),
        Some("vendor=v1"),
        "{md:?}"
    );
    assert_eq!(
        md.get("baggage").map(String::as_str),
        Some("tenant=acme"),
        "{md:?}"
    );

    // A deadline set by the caller on the request is honoured and shrinks too.
    let mut req = request("short");
    req.set_timeout(Duration::from_millis(900));
    let reply = echo(&mut client, req).await.unwrap();
    let timeout =
        keel_breaker::deadline::parse_grpc_timeout(&reply.metadata["grpc-timeout"]).unwrap();
    assert!(timeout < Duration::from_millis(900), "{timeout:?}");
    let m = channel.metrics().get("/keel.echo.v1.Echo/Echo").unwrap();
    assert_eq!((m.requests, m.errors), (2, 0));
}

/// An UNKNOWN outcome (INTERNAL) is not retried for a plain call, and is retried with the same
/// idempotency key for a keyed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_is_retried_only_when_idempotent() {
    let (ps, faults) = providers(1).await;
    let channel = GrpcChannel::builder("echo")
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    faults[0].fail_every(2, tonic::Code::Internal);
    echo(&mut client, request("1")).await.unwrap(); // call 1 succeeds, call 2 will fail

    let status = echo(&mut client, request("plain")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    assert_eq!(
        faults[0].calls(),
        2,
        "a call that may have executed is not replayed"
    );

    echo(&mut client, request("3")).await.unwrap(); // call 3 succeeds, call 4 will fail
    let mut req = request("keyed");
    req.extensions_mut()
        .insert(IdempotencyKey("transfer-7".into()));
    let reply = echo(&mut client, req).await.unwrap();
    assert_eq!(faults[0].calls(), 5, "the keyed call was attempted twice");
    assert_eq!(
        reply.metadata["idempotency-key"], "transfer-7",
        "same key on the retry"
    );
}

/// A call whose idempotency key the server could not use (not a header value, too long) is not
/// sent: sent without its key it could not be de-duplicated. It fails with `INVALID_ARGUMENT`,
/// a configuration error of the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_an_unusable_idempotency_key_is_not_sent() {
    let (ps, faults) = providers(1).await;
    let channel = GrpcChannel::builder("echo")
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel);
    for key in ["transfer-7\n".to_owned(), "k".repeat(256)] {
        let mut req = request("debit");
        req.extensions_mut().insert(IdempotencyKey(key.clone()));
        let status = echo(&mut client, req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let error = Error::from_status(&status).expect("the client's own error");
        assert!(error.is_config(), "{error:?}");
        assert_eq!(error.http_status().as_u16(), 400);
    }
    assert_eq!(faults[0].calls(), 0, "nothing was sent");
    let mut req = request("debit");
    req.extensions_mut()
        .insert(IdempotencyKey("transfer-7".into()));
    echo(&mut client, req).await.unwrap();
    assert_eq!(faults[0].calls(), 1);
}

/// A provider that accepts calls and never answers (a stuck handler, a stopped process): every
/// call to it ends at its deadline, and those count against it, so its breaker ejects it and the
/// calls go to the healthy provider (dropped at the deadline, they used to count as cancelled:
/// it was never ejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_is_ejected() {
    let (hung, server) = silent_provider().await;
    let (ps, _faults) = providers(1).await;
    let healthy = format!("http://{}", ps[0].addr());
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::RoundRobin)
        .breaker(quick_breaker(Duration::from_secs(60)))
        .timeout(Duration::from_millis(400))
        .endpoints([hung.clone(), healthy.clone()])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let mut timed_out = 0;
    for _ in 0..12 {
        match echo(&mut client, request("x")).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
                let error = Error::from_status(&status).expect("the client's own error");
                assert!(error.is_deadline_exceeded(), "{error:?}");
                assert_eq!(error.http_status().as_u16(), 504);
                timed_out += 1;
            }
        }
    }
    let (state, calls) = state_of(&channel, &hung).unwrap();
    assert_eq!(state, State::Open, "the hung provider is ejected");
    assert_eq!(timed_out, calls, "only the hung provider's calls failed");
    assert!(
        (4..=6).contains(&calls),
        "ejected after the breaker's minimum of 4: {calls}"
    );
    // Ejected: the next calls all go to the healthy provider, none waits for a deadline.
    let before = state_of(&channel, &healthy).unwrap().1;
    for _ in 0..10 {
        echo(&mut client, request("y")).await.unwrap();
    }
    assert_eq!(state_of(&channel, &healthy).unwrap().1, before + 10);
    assert_eq!(state_of(&channel, &hung).unwrap().1, calls);
    server.abort();
}

/// Only a call dropped at its deadline counts against the endpoint: calls the caller abandons
/// earlier (a client timeout of its own, a cancelled request) record nothing, so they never eject
/// a provider. And a half-open probe that reaches its deadline is a failed probe: the breaker
/// opens again instead of waiting forever for the probe's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_calls_dropped_at_their_deadline_count_and_a_hung_probe_reopens() {
    let (hung, server) = silent_provider().await;
    let channel = |timeout| {
        GrpcChannel::builder("echo")
            .max_attempts(1)
            .breaker(quick_breaker(Duration::from_secs(1)))
            .timeout(timeout)
            .endpoints([hung.clone()])
            .unwrap()
    };

    let patient = channel(Duration::from_secs(30));
    let mut client = EchoClient::new(patient.clone());
    for _ in 0..6 {
        let abandoned =
            tokio::time::timeout(Duration::from_millis(50), echo(&mut client, request("x"))).await;
        assert!(abandoned.is_err(), "the provider never answers");
    }
    let (state, _) = state_of(&patient, &hung).unwrap();
    assert_eq!(state, State::Closed, "abandoned calls do not eject");

    let hasty = channel(Duration::from_millis(100));
    let mut client = EchoClient::new(hasty.clone());
    for _ in 0..4 {
        let status = echo(&mut client, request("x")).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    }
    assert_eq!(state_of(&hasty, &hung).unwrap().0, State::Open);
    // After the open wait, two probes go out, and both reach their deadline.
    let mut probes = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while probes < 2 {
        assert!(std::time::Instant::now() < deadline, "no probe in 10 s");
        let status = echo(&mut client, request("probe")).await.unwrap_err();
        let error = Error::from_status(&status).expect("the client's own error");
        if error.is_deadline_exceeded() {
            probes += 1;
        } else {
            assert!(error.is_all_ejected(), "{error:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        state_of(&hasty, &hung).unwrap().0,
        State::Open,
        "failed probes open the breaker again"
    );
    server.abort();
}

/// A provider that went silent (here: accepts, reads, never answers, not even a PING): with
/// HTTP/2 keep-alive a call without a deadline fails once a PING goes unanswered, instead of
/// waiting for TCP to give up; without keep-alive it would still be waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_ends_calls_to_a_silent_provider() {
    use keel_client::KeepAlive;
    let (silent, server) = silent_provider().await;
    let channel = |keep_alive| {
        GrpcChannel::builder("echo")
            .max_attempts(1)
            .keep_alive(keep_alive)
            .endpoints([silent.clone()])
            .unwrap()
    };
    let quick = KeepAlive {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(200),
    };
    let mut client = EchoClient::new(channel(Some(quick)));
    let outcome = tokio::time::timeout(Duration::from_secs(10), echo(&mut client, request("x")))
        .await
        .expect("the call ends once a PING goes unanswered");
    let status = outcome.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // A zero timeout would fail every PING: refused.
    let zero = GrpcChannel::builder("echo")
        .keep_alive(Some(KeepAlive {
            interval: Duration::from_secs(1),
            timeout: Duration::ZERO,
        }))
        .endpoints([silent.clone()])
        .unwrap_err();
    assert!(zero.is_config(), "{zero:?}");
    let mut client = EchoClient::new(channel(None));
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), echo(&mut client, request("x")))
            .await
            .is_err(),
        "without keep-alive the call keeps waiting"
    );
    server.abort();
}

/// "Never" said as `Duration::MAX`, for the keep-alive interval or timeout, works: hyper adds
/// them to the current time unchecked, which panicked in the connection's task and failed every
/// call on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_of_duration_max_does_not_break_connections() {
    use keel_client::KeepAlive;
    let (ps, _faults) = providers(1).await;
    for keep_alive in [
        KeepAlive {
            interval: Duration::MAX,
            timeout: Duration::from_secs(20),
        },
        KeepAlive {
            interval: Duration::from_secs(300),
            timeout: Duration::MAX,
        },
    ] {
        let channel = GrpcChannel::builder("echo")
            .max_attempts(1)
            .keep_alive(Some(keep_alive))
            .endpoints([format!("http://{}", ps[0].addr())])
            .unwrap();
        let mut client = EchoClient::new(channel);
        for _ in 0..3 {
            echo(&mut client, request("x"))
                .await
                .unwrap_or_else(|s| panic!("{keep_alive:?}: {s:?}"));
        }
    }
}

/// A provider whose connection breaks after it received the whole request (it may have
/// executed it): the caller gets `UNKNOWN`, never `UNAVAILABLE` — a service that hands that
/// status back to its own caller would otherwise make that caller's Keel client replay a call
/// that may have run (it reads `UNAVAILABLE` as "not executed") — and the call is not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_after_sending_is_unknown_and_not_replayed() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let server = tokio::spawn({
        let requests = Arc::clone(&requests);
        async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let requests = Arc::clone(&requests);
                tokio::spawn(async move {
                    // Read until the request's message has arrived, then reset the connection.
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(13).any(|w| w == b"debit-account") {
                            requests.fetch_add(1, Ordering::SeqCst);
                            let _ = stream.set_zero_linger();
                            return;
                        }
                    }
                });
            }
        }
    });
    let channel = GrpcChannel::builder("echo")
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let mut client = EchoClient::new(channel);
    let status = echo(&mut client, request("debit-account"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "not replayed");
    let error = Error::from_status(&status).expect("the client's own error");
    assert!(
        !error.is_no_endpoints() && !error.is_deadline_exceeded(),
        "{error}"
    );
    server.abort();
}

/// A provider that does not take a call — it refuses the call's stream (`REFUSED_STREAM`), or goes
/// away (`GOAWAY` below the call's stream, then closes, as a graceful shutdown in a rolling
/// deploy does) — leaves the call not sent: plain calls, not idempotent, move to the other
/// provider and all succeed, each executed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_server_did_not_take_move_to_another_endpoint() {
    for refusal in [Refusal::ResetRefusedStream, Refusal::GoAway] {
        let (ps, faults) = providers(1).await;
        let (refusing, refused, server) = refusing_h2_server(refusal).await;
        let channel = GrpcChannel::builder("echo")
            .balance(Balance::RoundRobin)
            .retry_budget(ample_budget())
            .breaker(never_opening_breaker())
            .endpoints([
                format!("http://{refusing}"),
                format!("http://{}", ps[0].addr()),
            ])
            .unwrap();
        let mut client = EchoClient::new(channel);
        for i in 0..20 {
            let reply = echo(&mut client, request(&format!("debit-{i}")))
                .await
                .unwrap_or_else(|status| panic!("{refusal:?}, call {i}: {status:?}"));
            assert_eq!(reply.server_id, "p-0");
        }
        assert!(
            refused.load(Ordering::SeqCst) >= 5,
            "{refusal:?}: the refusing provider had its share"
        );
        assert_eq!(
            faults[0].calls(),
            20,
            "{refusal:?}: each call executed once"
        );
        server.abort();
    }
}

/// A proxy's HTTP error on a gRPC call (503 without `grpc-status`): the caller gets `UNKNOWN`,
/// not the `UNAVAILABLE` tonic would infer — the proxy may have forwarded the call before its
/// upstream broke — and a plain call is not replayed; the client's metrics count it as an
/// error. A 503 with `Retry-After` (a refusal) is `UNAVAILABLE`, and goes to another endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_error_without_grpc_status_is_unknown() {
    let retry_after = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicU64::new(0));
    let server = tokio::spawn({
        let (retry_after, answered) = (Arc::clone(&retry_after), Arc::clone(&answered));
        async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (retry_after, answered) = (Arc::clone(&retry_after), Arc::clone(&answered));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_: http::Request<_>| {
                        answered.fetch_add(1, Ordering::SeqCst);
                        let mut res = http::Response::builder()
                            .status(503)
                            .header("content-type", "text/plain");
                        if retry_after.load(Ordering::SeqCst) {
                            res = res.header("retry-after", "1");
                        }
                        let res = res.body(http_body_util::Full::new(bytes::Bytes::from_static(
                            b"upstream connect error or disconnect/reset before headers",
                        )));
                        async move { res }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .http2_only()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        }
    });
    let (ps, faults) = providers(1).await;
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::RoundRobin)
        .retry_budget(ample_budget())
        .endpoints([format!("http://{addr}"), format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let mut unknown = 0;
    for i in 0..6 {
        match echo(&mut client, request(&format!("debit-{i}"))).await {
            Ok(reply) => assert_eq!(reply.server_id, "p-0"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
                unknown += 1;
            }
        }
    }
    assert_eq!(
        unknown, 3,
        "every call through the proxy failed, none was replayed"
    );
    assert_eq!(answered.load(Ordering::SeqCst), 3);
    assert_eq!(faults[0].calls(), 3);
    let metrics = channel.metrics().get("/keel.echo.v1.Echo/Echo").unwrap();
    assert_eq!((metrics.requests, metrics.errors), (6, 3));

    retry_after.store(true, Ordering::SeqCst);
    for i in 0..6 {
        let reply = echo(&mut client, request(&format!("credit-{i}")))
            .await
            .unwrap();
        assert_eq!(reply.server_id, "p-0");
    }
    assert_eq!(faults[0].calls(), 9, "each refused call went to p-0, once");
    server.abort();
}

/// Calling through an API gateway: a default header (an API key) goes with every call, unless
/// the call carries its own; an invalid one is a configuration error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_headers_go_with_every_call_unless_the_call_has_its_own() {
    let (ps, _faults) = providers(1).await;
    let mut client = EchoClient::new(
        GrpcChannel::builder("gateway")
            .default_header("x-api-key", "secret-1")
            .endpoints([format!("http://{}", ps[0].addr())])
            .unwrap(),
    );
    for _ in 0..2 {
        let reply = echo(&mut client, request("plain")).await.unwrap();
        assert_eq!(reply.metadata["x-api-key"], "secret-1");
    }
    let mut own = request("own");
    own.metadata_mut()
        .insert("x-api-key", "secret-2".parse().unwrap());
    let reply = echo(&mut client, own).await.unwrap();
    assert_eq!(reply.metadata["x-api-key"], "secret-2");

    let err = GrpcChannel::builder("gateway")
        .default_header("x-api-key", "line\nbreak")
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(err.to_string().contains("x-api-key"), "{err}");
}

/// Typed errors: no endpoints, all ejected, exhausted retry budget; each mapped to a status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_errors() {
    let registry = StaticRegistry::new();
    let (channel, discovery) = GrpcChannel::builder("nobody").discover(&registry).unwrap();
    tokio::spawn(discovery);
    let mut client = EchoClient::new(channel.clone());
    let status = echo(&mut client, request("x")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let err = Error::from_status(&status).expect("client error");
    assert!(err.is_no_endpoints(), "{err:?}");
    assert_eq!(err.http_status().as_u16(), 502);

    let (ps, faults) = providers(1).await;
    faults[0].fail_every(1, tonic::Code::Unavailable);
    let no_retries = Arc::new(RetryBudget::new(Duration::from_secs(1), 0, 0.0));
    let channel = GrpcChannel::builder("echo")
        .retry_budget(no_retries)
        .breaker(quick_breaker(Duration::from_secs(60)))
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let status = echo(&mut client, request("x")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let err = Error::from_status(&status).expect("client error");
    assert!(err.is_retry_budget_exhausted(), "{err:?}");

    for _ in 0..4 {
        let _ = echo(&mut client, request("x")).await;
    }
    let status = echo(&mut client, request("x")).await.unwrap_err();
    let err = Error::from_status(&status).expect("client error");
    assert!(err.is_all_ejected(), "{err:?}");
    assert_eq!(err.grpc_code(), tonic::Code::Unavailable);

    let _ = Endpoint::new("127.0.0.1", 1);
    let _ = ServiceInstance::new("x", "y", Endpoint::new("127.0.0.1", 1));
}

/// An echo service that holds every call until its gate lets it through.
#[derive(Clone)]
struct Gated {
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl keel_testkit::echo::echo_server::Echo for Gated {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        self.entered.fetch_add(1, Ordering::Relaxed);
        let _pass = self
            .gate
            .acquire()
            .await
            .map_err(|_| tonic::Status::unavailable("gate closed"))?;
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            payload: Vec::new(),
            server_id: "gated".into(),
            metadata: Default::default(),
        }))
    }
}

async fn gated_server() -> (Gated, std::net::SocketAddr) {
    let gated = Gated {
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        entered: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = keel_testkit::echo::echo_server::EchoServer::new(gated.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (gated, addr)
}

/// A gRPC channel with one bulkhead slot (a call waits up to `wait` for it) to a gated server,
/// and the call ("first") that holds the slot, already in the server.
async fn one_slot_held(
    wait: Duration,
) -> (
    Gated,
    GrpcChannel,
    tokio::task::JoinHandle<Result<EchoReply, tonic::Status>>,
) {
    let (gated, addr) = gated_server().await;
    let channel = GrpcChannel::builder("echo")
        .max_concurrent(1)
        .max_concurrent_wait(wait)
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let first = tokio::spawn(async move { echo(&mut client, request("first")).await });
    eventually(
        "the first call in the server",
        Duration::from_secs(10),
        || async { (gated.entered.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await
    .unwrap();
    (gated, channel, first)
}

/// The bulkhead (`max_concurrent`): calls beyond the cap are rejected before they are sent, with
/// RESOURCE_EXHAUSTED and `is_bulkhead_full`, even when idempotent (no retry can help); with
/// `max_concurrent_wait` a call waits for a slot, and is rejected when none frees in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_caps_concurrent_calls() {
    let (gated, addr) = gated_server().await;
    let channel = GrpcChannel::builder("echo")
        .max_concurrent(2)
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = EchoClient::new(channel.clone());
        held.push(tokio::spawn(async move {
            echo(&mut client, request("held")).await
        }));
    }
    eventually(
        "two calls in the server",
        Duration::from_secs(10),
        || async { (gated.entered.load(Ordering::Relaxed) == 2).then_some(()) },
    )
    .await
    .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let mut req = request("third");
    req.extensions_mut().insert(Idempotent);
    let status = echo(&mut client, req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let error = Error::from_status(&status).expect("a client-side error");
    assert!(error.is_bulkhead_full(), "{error:?}");
    assert_eq!(error.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(gated.entered.load(Ordering::Relaxed), 2, "never sent");

    gated.gate.add_permits(1_000);
    for h in held {
        h.await.unwrap().unwrap();
    }
    // The slots are free again.
    echo(&mut client, request("after")).await.unwrap();

    // With a bounded wait: a call queues for the slot and gets it when the holder finishes…
    let (gated, channel, first) = one_slot_held(Duration::from_secs(30)).await;
    let mut second = EchoClient::new(channel.clone());
    let second = tokio::spawn(async move { echo(&mut second, request("second")).await });
    gated.gate.add_permits(1_000);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(gated.entered.load(Ordering::Relaxed), 2);

    // …and is rejected when the slot stays taken past the wait.
    let (gated, channel, first) = one_slot_held(Duration::from_millis(200)).await;
    let mut client = EchoClient::new(channel.clone());
    let status = echo(&mut client, request("second")).await.unwrap_err();
    assert!(
        Error::from_status(&status).is_some_and(Error::is_bulkhead_full),
        "{status:?}"
    );
    assert_eq!(gated.entered.load(Ordering::Relaxed), 1, "never sent");
    gated.gate.add_permits(1_000);
    first.await.unwrap().unwrap();
}

/// Issue 5, connections per endpoint: 64 calls started at once on a new channel share one
/// dialled HTTP/2 connection, and later calls reuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_connection() {
    let (ps, _faults) = providers(1).await;
    let (proxy, accepted) = counting_proxy(ps[0].addr()).await;
    let channel = GrpcChannel::builder("echo")
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let mut client = EchoClient::new(channel.clone());
            tokio::spawn(async move { echo(&mut client, request(&i.to_string())).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let mut client = EchoClient::new(channel.clone());
    for i in 0..10 {
        echo(&mut client, request(&i.to_string())).await.unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for 74 calls"
    );
}

/// A provider that dies and comes back on the same port: while nothing listens, calls fail as
/// UNAVAILABLE without being sent (the dial failed); once it is back, a new connection is dialled
/// and calls reach the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redials_after_the_provider_restarts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = keel_testkit::echo::EchoProvider::serve_on(listener, "first", Default::default());
    let channel = GrpcChannel::builder("echo")
        .max_attempts(1)
        .breaker(quick_breaker(Duration::from_millis(50)))
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    assert_eq!(
        echo(&mut client, request("a")).await.unwrap().server_id,
        "first"
    );

    first.kill();
    let dial = eventually(
        "a call fails to dial the gone provider",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                echo(&mut client, request("b"))
                    .await
                    .err()
                    .filter(|s| s.message().contains("connecting to"))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(dial.code(), tonic::Code::Unavailable, "{dial:?}");
    assert!(dial.message().contains(&addr.to_string()), "{dial:?}");

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _second =
        keel_testkit::echo::EchoProvider::serve_on(listener, "second", Default::default());
    let reply = eventually(
        "calls reach the restarted provider",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move { echo(&mut client, request("d")).await.ok() }
        },
    )
    .await
    .unwrap();
    assert_eq!(reply.server_id, "second");
}

/// RED metrics follow the method each call names, also when one channel clone alternates
/// between methods (it caches the metrics of the method it called last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_method_called() {
    use tower_service::Service as _;

    let (ps, _faults) = providers(1).await;
    let mut channel = GrpcChannel::builder("echo")
        .endpoints([format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    // One clone alternating between two methods the provider does not serve.
    for path in ["/keel.echo.v1.Echo/One", "/keel.echo.v1.Echo/Two"].repeat(2) {
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .unwrap();
        let req = http::Request::builder()
            .uri(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::empty())
            .unwrap();
        let res = channel.call(req).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "12", "{path}: UNIMPLEMENTED");
        echo(&mut client, request("a")).await.unwrap();
    }
    for (path, counts) in [
        ("/keel.echo.v1.Echo/One", (2, 2)),
        ("/keel.echo.v1.Echo/Two", (2, 2)),
        ("/keel.echo.v1.Echo/Echo", (4, 0)),
    ] {
        let m = channel.metrics().get(path).unwrap();
        assert_eq!((m.requests, m.errors), counts, "{path}");
    }
}

/// The deadline bounds the whole call, body included: a provider that sends its response
/// headers and then hangs fails the call with DEADLINE_EXCEEDED when the deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_bounds_a_response_body_that_never_ends() {
    let (addr, server) = common::stalling_server("application/grpc").await;
    let channel = GrpcChannel::builder("stalling")
        .timeout(Duration::from_millis(300))
        .max_attempts(1)
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let mut client = EchoClient::new(channel);
    let status = tokio::time::timeout(Duration::from_secs(10), echo(&mut client, request("x")))
        .await
        .expect("the call must end at its deadline, not hang")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    server.abort();
}

/// A provider that sends its response headers and then stalls is ejected like one that never
/// answers: its calls end at their deadline inside the body, and those count against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stalls_after_its_headers_is_ejected() {
    let (addr, server) = common::stalling_server("application/grpc").await;
    let stalling = format!("http://{addr}");
    let (ps, _faults) = providers(1).await;
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::RoundRobin)
        .breaker(quick_breaker(Duration::from_secs(60)))
        .timeout(Duration::from_millis(400))
        .max_attempts(1)
        .endpoints([stalling.clone(), format!("http://{}", ps[0].addr())])
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    for _ in 0..12 {
        if let Err(status) = echo(&mut client, request("x")).await {
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        }
    }
    let (state, calls) = state_of(&channel, &stalling).unwrap();
    assert_eq!(state, State::Open, "the stalling provider is ejected");
    assert!((4..=6).contains(&calls), "{calls}");
    for _ in 0..10 {
        echo(&mut client, request("y")).await.unwrap();
    }
    assert_eq!(state_of(&channel, &stalling).unwrap().1, calls);
    server.abort();
}

/// Issue 5, connections per endpoint: when an instance leaves discovery (deregistered from
/// ZooKeeper while still running), the channel closes its connection to it once its calls have
/// moved on to the remaining instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closes_when_the_instance_leaves_discovery() {
    let (ps, _faults) = providers(2).await;
    let (_root, registry, leaving, _staying, accepted, open) =
        common::leaving_and_staying("echo", ps[0].addr(), ps[1].addr()).await;
    let channel = GrpcChannel::builder("echo")
        .connect(&registry, Duration::from_secs(10))
        .await
        .unwrap();
    common::endpoints_become("both instances discovered", 2, || channel.endpoints().len()).await;
    let client = EchoClient::new(channel.clone());
    eventually(
        "a call reaches the leaving instance",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                let reply = echo(&mut client, request("who")).await.ok()?;
                (reply.server_id == "p-0").then_some(())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    leaving.deregister().await.unwrap();
    common::endpoints_become("the leaving instance is dropped", 1, || {
        channel.endpoints().len()
    })
    .await;
    // No call is needed to close it.
    eventually("its connection is closed", Duration::from_secs(10), || {
        let open = Arc::clone(&open);
        async move { (open.load(Ordering::SeqCst) == 0).then_some(()) }
    })
    .await
    .unwrap();
    for _ in 0..5 {
        let reply = echo(&mut client.clone(), request("who")).await.unwrap();
        assert_eq!(reply.server_id, "p-1");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "never dialled again");
}

/// A call in flight on an instance that leaves discovery finishes on its connection, and the
/// connection closes right after it — although that call held the old endpoint list, which
/// the client then keeps until its next membership change (so that dropping it never falls to
/// a call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_finishes_and_then_its_departed_connection_closes() {
    let (ps, _faults) = providers(1).await;
    let (gated, gated_addr) = gated_server().await;
    let (_root, registry, leaving, _staying, accepted, open) =
        common::leaving_and_staying("echo", gated_addr, ps[0].addr()).await;
    // Round robin: p2c would keep choosing the faster, staying instance.
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::RoundRobin)
        .connect(&registry, Duration::from_secs(10))
        .await
        .unwrap();
    common::endpoints_become("both instances discovered", 2, || channel.endpoints().len()).await;
    let mut client = EchoClient::new(channel.clone());
    // Calls until one is held in the gated (leaving) instance (the first or the second).
    let held = tokio::spawn(async move {
        loop {
            let reply = echo(&mut client, request("held")).await?;
            if reply.server_id == "gated" {
                return Ok::<_, tonic::Status>(reply);
            }
        }
    });
    eventually(
        "a call held in the leaving instance",
        Duration::from_secs(10),
        || async { (gated.entered.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await
    .unwrap();

    leaving.deregister().await.unwrap();
    common::endpoints_become("the leaving instance is dropped", 1, || {
        channel.endpoints().len()
    })
    .await;
    assert_eq!(
        open.load(Ordering::SeqCst),
        1,
        "the call in flight keeps it"
    );
    gated.gate.add_permits(1);
    let reply = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.message, "held", "the call in flight completed");
    eventually("its connection is closed", Duration::from_secs(10), || {
        let open = Arc::clone(&open);
        async move { (open.load(Ordering::SeqCst) == 0).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A retry goes to another endpoint: with one of two providers failing every call
/// (UNAVAILABLE) and its breaker never opening, every call with two attempts succeeds, because
/// the second attempt avoids the endpoint of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_another_endpoint() {
    let (ps, faults) = providers(2).await;
    faults[0].fail_every(1, tonic::Code::Unavailable);
    let channel = GrpcChannel::builder("echo")
        .max_attempts(2)
        .retry_budget(ample_budget())
        .breaker(never_opening_breaker())
        .endpoints(ps.iter().map(|p| format!("http://{}", p.addr())))
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    for i in 0..100 {
        let mut req = request(&i.to_string());
        req.extensions_mut().insert(Idempotent);
        let reply = echo(&mut client, req).await.unwrap();
        assert_eq!(reply.server_id, "p-1");
    }
    assert!(faults[0].calls() > 0, "the failing provider was tried");
}

/// Without retries (`max_attempts(1)`) consecutive calls of one channel are independent: a
/// consistent-hash key keeps going to the same provider (nothing from the previous call, such
/// as the endpoint a retry would avoid, leaks into the next).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_retries_stay_sticky() {
    let (ps, _faults) = providers(3).await;
    let channel = GrpcChannel::builder("echo")
        .balance(Balance::ConsistentHash)
        .max_attempts(1)
        .endpoints(ps.iter().map(|p| format!("http://{}", p.addr())))
        .unwrap();
    let mut client = EchoClient::new(channel.clone());
    let mut servers = BTreeSet::new();
    for i in 0..20 {
        let mut req = request(&i.to_string());
        req.extensions_mut().insert(HashKey::of("account-7"));
        servers.insert(echo(&mut client, req).await.unwrap().server_id);
    }
    assert_eq!(servers.len(), 1, "{servers:?}");
}
