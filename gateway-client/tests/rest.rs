#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `RestClient` against real HTTP/1.1 servers on loopback.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::Method;
use keel_breaker::breaker::State;
use keel_client::{Balance, HashKey, RestBuilder, RestClient};
use keel_registry::{Registration, Registry, StaticRegistry};
use keel_testkit::eventually;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde_json::{Value, json};

use common::{
    RestProvider, ample_budget, counting_proxy, instance, never_opening_breaker, quick_breaker,
    silent_provider,
};

/// JSON verbs, a typed error for non-2xx with the body kept, and the API-gateway mode (base URL
/// with a path prefix, default headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbs_errors_and_gateway_mode() {
    let p = RestProvider::start("r-0").await;
    let client = RestClient::builder("gateway")
        .default_header("x-api-key", "secret-1")
        .base_url(&format!("{}/api/v1", p.url()))
        .unwrap();

    let got: Value = client.get("/accounts/7?full=1").await.unwrap();
    assert_eq!(got["method"], "GET");
    assert_eq!(got["path"], "/api/v1/accounts/7?full=1");
    assert_eq!(got["headers"]["x-api-key"], "secret-1");
    let got: Value = client
        .request(Method::GET, "/accounts/7")
        .header("x-tag", "a")
        .header("x-tag", "b")
        .header("x-api-key", "own")
        .send_json()
        .await
        .unwrap();
    assert_eq!(
        got["headers"]["x-tag"], "a, b",
        "every value of a repeated header"
    );
    assert_eq!(
        got["headers"]["x-api-key"], "own",
        "the call's own header wins"
    );
    let got: Value = client
        .request(Method::PATCH, "/accounts/7")
        .json(&json!({"owner": "cy"}))
        .header("content-type", "application/merge-patch+json")
        .send_json()
        .await
        .unwrap();
    assert_eq!(
        got["headers"]["content-type"], "application/merge-patch+json",
        "the call's content type replaces the JSON default"
    );
    assert_eq!(got["body"]["owner"], "cy");
    // The call's parent is the context it is polled in, not the one it was built in.
    let later = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128);
    let call = client.get::<Value>("/accounts/8");
    let polled_in = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        later,
        SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let got = opentelemetry::context::FutureExt::with_context(call, polled_in)
        .await
        .unwrap();
    let tp = got["headers"]["traceparent"].as_str().unwrap().to_owned();
    assert!(tp.contains(&later.to_string()), "{tp}");
    let posted: Value = client
        .post("/accounts", &json!({"owner": "ann"}))
        .await
        .unwrap();
    assert_eq!(
        (posted["method"].as_str(), &posted["body"]["owner"]),
        (Some("POST"), &json!("ann"))
    );
    let put: Value = client
        .put("/accounts/7", &json!({"owner": "bob"}))
        .await
        .unwrap();
    assert_eq!(put["method"], "PUT");
    let deleted = client.delete("/accounts/7").await.unwrap();
    assert!(String::from_utf8_lossy(&deleted).contains("DELETE"));

    let err = client.get::<Value>("/accounts/missing").await.unwrap_err();
    assert!(err.is_status(), "{err:?}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(404));
    assert_eq!(err.http_status().as_u16(), 404);
    assert_eq!(err.body().as_ref(), b"no such account");

    let err = client.get::<Vec<u32>>("/accounts/7").await.unwrap_err();
    assert!(err.is_decode(), "{err:?}");

    let m = client.metrics().get("GET /accounts/{id}").unwrap();
    assert_eq!((m.requests, m.errors), (4, 0));
    let m = client.metrics().get("GET /accounts/missing").unwrap();
    assert_eq!((m.requests, m.errors), (1, 0), "404 is not a server error");
}

/// Three providers under steady load, one killed: zero failed calls (GETs are idempotent and
/// retried elsewhere), and no traffic to it after ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_provider_is_ejected_without_failed_calls() {
    let mut ps = vec![
        RestProvider::start("r-0").await,
        RestProvider::start("r-1").await,
        RestProvider::start("r-2").await,
    ];
    let client = RestClient::builder("accounts")
        .timeout(Duration::from_secs(5))
        .breaker(quick_breaker(Duration::from_secs(60)))
        .endpoints(ps.iter().map(RestProvider::url))
        .unwrap();
    let dead_url = ps[1].url();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get::<Value>("/accounts/1").await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("failed call: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    eventually("every provider serves", Duration::from_secs(10), || async {
        ps.iter().all(|p| p.faults.calls() > 20).then_some(())
    })
    .await
    .unwrap();
    ps.remove(1).kill();
    let ejected_at = eventually("r-1 ejected", Duration::from_secs(10), || async {
        client
            .endpoints()
            .into_iter()
            .find(|e| e.id == dead_url && e.state == State::Open)
            .map(|e| e.calls)
    })
    .await
    .unwrap();
    let at = ok.load(Ordering::Relaxed);
    eventually("load continues", Duration::from_secs(10), || async {
        (ok.load(Ordering::Relaxed) > at + 300).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let calls = client
        .endpoints()
        .into_iter()
        .find(|e| e.id == dead_url)
        .unwrap()
        .calls;
    assert_eq!(
        calls, ejected_at,
        "no traffic to the dead provider after ejection"
    );
}

/// Trace id, a shrinking deadline (`x-keel-deadline`), request id and idempotency key reach the
/// server; an UNKNOWN outcome (500) is not replayed for a plain POST and is replayed, with the
/// same key, for a keyed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_and_unknown_outcomes() {
    let p = RestProvider::start("r-0").await;
    let client = RestClient::builder("accounts")
        .timeout(Duration::from_secs(3))
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .endpoints([p.url()])
        .unwrap();
    let trace_id = TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128);
    let remote = SpanContext::new(
        trace_id,
        SpanId::from(0xb7ad_6b71_6920_3331_u64),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let got: Value = {
        let _guard = opentelemetry::Context::new()
            .with_remote_span_context(remote)
            .attach();
        client
            .request(Method::POST, "/transfers")
            .json(&json!({"amount": 5}))
            .idempotency_key("t-1")
            .send_json()
            .await
            .unwrap()
    };
    let h = &got["headers"];
    assert!(
        h["traceparent"]
            .as_str()
            .unwrap()
            .contains(&trace_id.to_string()),
        "{h}"
    );
    let left: u64 = h["x-keel-deadline"].as_str().unwrap().parse().unwrap();
    assert!(left < 3000 && left > 1000, "{left}");
    assert_eq!(h["idempotency-key"], "t-1");
    assert_eq!(h["x-request-id"].as_str().map(str::len), Some(32));

    p.faults.fail_every(2, 500);
    let base = p.faults.calls();
    assert_eq!(base % 2, 1, "the next call fails");
    let err = client
        .post::<_, Value>("/transfers", &json!({"amount": 1}))
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(500));
    assert_eq!(
        p.faults.calls(),
        base + 1,
        "a plain POST that may have executed is not replayed"
    );

    client.get::<Value>("/x").await.unwrap(); // the next call fails again
    let got: Value = client
        .request(Method::POST, "/transfers")
        .json(&json!({"amount": 2}))
        .idempotency_key("t-2")
        .send_json()
        .await
        .unwrap();
    assert_eq!(
        p.faults.calls(),
        base + 4,
        "the keyed POST was attempted twice"
    );
    assert_eq!(got["headers"]["idempotency-key"], "t-2");
}

/// Three providers `r-0`..`r-2` registered in `registry` as `accounts`, each with its `zone`
/// metadata unless empty.
async fn registered_providers(
    registry: &StaticRegistry,
    zones: [&str; 3],
) -> ([RestProvider; 3], Vec<Registration>) {
    let ps = [
        RestProvider::start("r-0").await,
        RestProvider::start("r-1").await,
        RestProvider::start("r-2").await,
    ];
    let mut regs = Vec::new();
    for (i, p) in ps.iter().enumerate() {
        let mut inst = instance("accounts", &format!("r-{i}"), p.addr);
        if !zones[i].is_empty() {
            inst = inst.with_metadata("zone", zones[i]);
        }
        regs.push(registry.register(inst).await.unwrap());
    }
    (ps, regs)
}

/// Whether the breaker of endpoint `id` of `client` is in `state`.
fn state_is(client: &RestClient, id: &str, state: State) -> bool {
    client
        .endpoints()
        .into_iter()
        .any(|e| e.id == id && e.state == state)
}

/// A client from `builder` over what `registry` discovers, once it has all three endpoints.
async fn discovering(builder: RestBuilder, registry: &StaticRegistry) -> RestClient {
    let client = builder
        .connect(registry, Duration::from_secs(5))
        .await
        .unwrap();
    eventually("three endpoints", Duration::from_secs(5), || async {
        (client.endpoints().len() == 3).then_some(())
    })
    .await
    .unwrap();
    client
}

/// Balancing over discovery: consistent hash stickiness, and ejection of a provider answering
/// 503 to half its calls, readmitted once healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_and_ejection_over_discovery() {
    let registry = StaticRegistry::new();
    let (ps, mut regs) = registered_providers(&registry, ["", "", ""]).await;
    let client = discovering(
        RestClient::builder("accounts")
            .balance(Balance::ConsistentHash)
            .breaker(quick_breaker(Duration::from_millis(300))),
        &registry,
    )
    .await;
    let route = |key: u32| {
        let client = client.clone();
        async move {
            let v: Value = client
                .request(Method::GET, "/accounts/balance")
                .hash_key(HashKey::of(&key))
                .send_json()
                .await
                .unwrap();
            v["server"].as_str().unwrap().to_owned()
        }
    };
    let mut first = Vec::new();
    for key in 0..30 {
        first.push(route(key).await);
    }
    for key in 0..30 {
        assert_eq!(route(key).await, first[key as usize]);
    }

    ps[0].faults.fail_every(2, 503);
    eventually("r-0 ejected", Duration::from_secs(10), || async {
        for key in 0..10 {
            route(key).await; // never fails: 503 is retried on the next endpoint of the ring
        }
        state_is(&client, "r-0", State::Open).then_some(())
    })
    .await
    .unwrap();
    ps[0].faults.heal();
    eventually("r-0 readmitted", Duration::from_secs(10), || async {
        for key in 0..10 {
            route(key).await;
        }
        state_is(&client, "r-0", State::Closed).then_some(())
    })
    .await
    .unwrap();
    for key in 0..30 {
        assert_eq!(
            route(key).await,
            first[key as usize],
            "stickiness is back after readmission"
        );
    }
    let used: std::collections::BTreeSet<_> = first.iter().collect();
    assert_eq!(used.len(), 3, "keys spread over every provider: {first:?}");

    // An instance leaves: only its keys move.
    regs.remove(1).deregister().await.unwrap();
    eventually("r-1 removed", Duration::from_secs(5), || async {
        (client.endpoints().len() == 2).then_some(())
    })
    .await
    .unwrap();
    for key in 0..30 {
        let now = route(key).await;
        if first[key as usize] == "r-1" {
            assert_ne!(now, "r-1");
        } else {
            assert_eq!(
                now, first[key as usize],
                "key {key} of a remaining provider must not move"
            );
        }
    }
}

/// Zone preference for REST: the same-zone instance takes every call; the others only when the
/// zone has none available (ejected, or gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_preference_and_fallback() {
    let registry = StaticRegistry::new();
    let (ps, mut regs) = registered_providers(&registry, ["sh-a", "sh-b", "sh-b"]).await;
    let client = discovering(
        RestClient::builder("accounts")
            .zone("sh-a")
            .breaker(quick_breaker(Duration::from_secs(60))),
        &registry,
    )
    .await;
    let server = |client: RestClient| async move {
        let v: Value = client.get("/accounts/zone").await?;
        Ok::<_, keel_client::Error>(v["server"].as_str().unwrap_or_default().to_owned())
    };
    for _ in 0..20 {
        assert_eq!(server(client.clone()).await.unwrap(), "r-0");
    }

    // The local zone's only instance fails: GETs are retried in the other zone, and once it is
    // ejected every call goes there.
    ps[0].faults.fail_every(1, 503);
    eventually("r-0 ejected", Duration::from_secs(10), || async {
        let now = server(client.clone()).await.ok()?;
        assert_ne!(now, "r-0");
        state_is(&client, "r-0", State::Open).then_some(())
    })
    .await
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(server(client.clone()).await.unwrap());
    }
    assert!(!seen.is_empty() && !seen.contains("r-0"), "{seen:?}");

    // The local zone is gone altogether: still served by the other zone.
    regs.remove(0).deregister().await.unwrap();
    eventually("r-0 removed", Duration::from_secs(5), || async {
        (client.endpoints().len() == 2).then_some(())
    })
    .await
    .unwrap();
    assert_ne!(server(client.clone()).await.unwrap(), "r-0");
}

/// The bulkhead (`max_concurrent`) for REST: calls beyond the cap are rejected before they are
/// sent, with `is_bulkhead_full` and 503, even when idempotent (GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_caps_concurrent_calls() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().fallback({
        let (gate, entered) = (gate.clone(), entered.clone());
        move || {
            let (gate, entered) = (gate.clone(), entered.clone());
            async move {
                entered.fetch_add(1, Ordering::Relaxed);
                let _pass = gate.acquire().await;
                axum::Json(json!({"ok": true}))
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = RestClient::builder("gated")
        .max_concurrent(2)
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        held.push(tokio::spawn(
            async move { client.get::<Value>("/held").await },
        ));
    }
    eventually(
        "two calls in the server",
        Duration::from_secs(10),
        || async { (entered.load(Ordering::Relaxed) == 2).then_some(()) },
    )
    .await
    .unwrap();
    let error = client.get::<Value>("/third").await.unwrap_err();
    assert!(error.is_bulkhead_full(), "{error:?}");
    assert_eq!(error.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.grpc_code(), tonic::Code::ResourceExhausted);
    assert_eq!(entered.load(Ordering::Relaxed), 2, "never sent");

    gate.add_permits(1_000);
    for h in held {
        h.await.unwrap().unwrap();
    }
    let _: Value = client.get("/after").await.unwrap();
}

/// Issue 5, connections per endpoint: sequential calls reuse one keep-alive connection (sent
/// with the endpoint's `Host`); a burst opens one connection per call in flight, and the calls
/// after it reuse those instead of dialling more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_kept_alive_and_reused() {
    let p = RestProvider::start("r-0").await;
    let (proxy, accepted) = counting_proxy(p.addr).await;
    let client = RestClient::builder("echo-rest")
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    for i in 0..20 {
        let got: Value = client.get(&format!("/seq/{i}")).await.unwrap();
        assert_eq!(got["headers"]["host"], proxy.to_string());
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "20 calls, one connection"
    );

    let burst: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.post::<_, Value>("/pay", &json!({ "i": i })).await })
        })
        .collect();
    for call in burst {
        call.await.unwrap().unwrap();
    }
    let after_burst = accepted.load(Ordering::SeqCst);
    assert!((1..=9).contains(&after_burst), "{after_burst} connections");
    for i in 0..20 {
        let _: Value = client.post("/pay", &json!({ "i": i })).await.unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        after_burst,
        "calls after the burst reuse its connections"
    );
}

/// Four calls to `/held`, which `p` holds: returns once it holds all four (each on a connection
/// of its own), with the calls to await after `p.faults.release(4)`.
async fn four_held_calls(
    client: &RestClient,
    p: &RestProvider,
) -> Vec<tokio::task::JoinHandle<Result<Value, keel_client::Error>>> {
    let held = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get::<Value>("/held").await })
        })
        .collect();
    eventually(
        "four calls held in the server",
        Duration::from_secs(10),
        || async { (p.faults.held.load(Ordering::SeqCst) == 4).then_some(()) },
    )
    .await
    .unwrap();
    held
}

/// The pool's settings: with `pool_max_idle(2)`, four calls held in the server at once open four
/// connections, and when they end two stay idle and two are closed; later calls reuse the two.
/// With `pool_idle_timeout(0)` an idle connection is never reused: a connection per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_settings_bound_idle_connections() {
    let p = RestProvider::start("r-0").await;
    let (proxy, accepted, open) = common::tracking_proxy(p.addr).await;
    let client = RestClient::builder("echo-rest")
        .pool_max_idle(2)
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    let held = four_held_calls(&client, &p).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "a connection per call in flight"
    );
    p.faults.release(4);
    for call in held {
        call.await.unwrap().unwrap();
    }
    eventually(
        "two idle connections kept",
        Duration::from_secs(10),
        || async { (open.load(Ordering::SeqCst) == 2).then_some(()) },
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let _: Value = client.get("/again").await.unwrap();
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "the kept ones are reused"
    );

    let (proxy, accepted) = counting_proxy(p.addr).await;
    let client = RestClient::builder("echo-rest")
        .pool_idle_timeout(Duration::ZERO)
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    for _ in 0..5 {
        let _: Value = client.get("/once").await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5, "never reused");
}

/// Idle connections past the pool's idle timeout are closed while the pool stays in use, not
/// only passed over: after a burst of four calls, steady sequential calls keep one connection
/// busy and the burst's other three are closed once they have been idle for the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_their_timeout_are_closed() {
    let p = RestProvider::start("r-0").await;
    let (proxy, _accepted, open) = common::tracking_proxy(p.addr).await;
    let client = RestClient::builder("echo-rest")
        .pool_idle_timeout(Duration::from_millis(300))
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    let held = four_held_calls(&client, &p).await;
    p.faults.release(4);
    for call in held {
        call.await.unwrap().unwrap();
    }
    assert_eq!(open.load(Ordering::SeqCst), 4, "the burst's connections");
    // One call every 20 ms (the wait between attempts) reuses the most recent connection.
    eventually(
        "the burst's idle connections closed",
        Duration::from_secs(10),
        || async {
            let _: Value = client.get("/steady").await.unwrap();
            (open.load(Ordering::SeqCst) == 1).then_some(())
        },
    )
    .await
    .unwrap();
}

/// A server that closes every connection after its response (`Connection: close`): the closed
/// connection is never reused, and non-idempotent calls, which must not be replayed, all succeed
/// on a new connection each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_server_closed_are_not_reused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"{\"ok\":true}")),
                    ))
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                builder.http1().keep_alive(false);
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let (proxy, accepted) = counting_proxy(addr).await;
    let client = RestClient::builder("closing")
        .max_attempts(1)
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    for i in 0..10 {
        let got: Value = client.post("/pay", &json!({ "i": i })).await.unwrap();
        assert_eq!(got["ok"], true);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        10,
        "one connection per call"
    );
    server.abort();
}

/// Nothing listens on the endpoint: the call fails without being sent, naming the address it
/// could not connect to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dial_names_the_endpoint() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = RestClient::builder("nobody")
        .max_attempts(1)
        .endpoints([format!("http://{addr}")])
        .unwrap();
    let err = client
        .post::<_, Value>("/pay", &json!({}))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("connecting to http://{addr}/ failed")),
        "{text}"
    );
    assert_eq!(err.http_status().as_u16(), 502, "{err:?}");
}

/// The deadline bounds the whole call, body included: a provider that sends its response head
/// and then hangs fails the call with a deadline error when the deadline passes, and the
/// connection with the unfinished response is not reused: the next call gets a new one and its
/// own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_bounds_a_response_body_that_never_ends() {
    let (addr, server) = common::stalling_server("application/json").await;
    let (proxy, accepted) = counting_proxy(addr).await;
    let client = RestClient::builder("stalling")
        .timeout(Duration::from_millis(300))
        .max_attempts(1)
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    let ok: Value = client.get("/ok").await.unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    let started = std::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), client.get::<Value>("/hang"))
        .await
        .expect("the call must end at its deadline, not hang");
    let err = result.unwrap_err();
    assert!(err.is_deadline_exceeded(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "/hang reused the idle one"
    );

    let ok: Value = client.get("/ok").await.unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the connection left mid-body is not reused"
    );
    server.abort();
}

/// Issue 5, connections per endpoint: when an instance leaves discovery (deregistered from
/// ZooKeeper while still running), the client closes its connections to it once its calls have
/// moved on to the remaining instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_close_when_the_instance_leaves_discovery() {
    let (leaving, staying) = (
        RestProvider::start("leaving").await,
        RestProvider::start("staying").await,
    );
    let (_root, registry, leaving_reg, _staying_reg, accepted, open) =
        common::leaving_and_staying("accounts", leaving.addr, staying.addr).await;
    let client = RestClient::builder("accounts")
        .connect(&registry, Duration::from_secs(10))
        .await
        .unwrap();
    common::endpoints_become("both instances discovered", 2, || client.endpoints().len()).await;
    eventually(
        "a call reaches the leaving instance",
        Duration::from_secs(10),
        || async {
            let got: Value = client.get("/who").await.ok()?;
            (got["server"] == "leaving").then_some(())
        },
    )
    .await
    .unwrap();
    assert!(accepted.load(Ordering::SeqCst) >= 1);

    leaving_reg.deregister().await.unwrap();
    common::endpoints_become("the leaving instance is dropped", 1, || {
        client.endpoints().len()
    })
    .await;
    // No call is needed to close them.
    eventually(
        "its connections are closed",
        Duration::from_secs(10),
        || async { (open.load(Ordering::SeqCst) == 0).then_some(()) },
    )
    .await
    .unwrap();
    let dialled = accepted.load(Ordering::SeqCst);
    for _ in 0..5 {
        let got: Value = client.get("/who").await.unwrap();
        assert_eq!(got["server"], "staying");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        dialled,
        "never dialled again"
    );
}

/// A server that closes each keep-alive connection right after its response, without saying
/// so (as an idle timeout does): once the client has seen the close, the next call — a
/// non-idempotent one, never replayed — goes to a new connection and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_the_server_dropped_are_skipped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // One request (head and its content-length body), one answer, then close.
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                let complete = |seen: &[u8]| {
                    let text = String::from_utf8_lossy(seen).to_ascii_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else {
                        return false;
                    };
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    seen.len() >= end + 4 + length
                };
                while !complete(&seen) {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = br#"{"ok":true}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body).await;
            });
        }
    });
    let (proxy, accepted, open) = common::tracking_proxy(addr).await;
    let client = RestClient::builder("dropping")
        .max_attempts(1)
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    for i in 1..=5u64 {
        let got: Value = client.post("/pay", &json!({ "i": i })).await.unwrap();
        assert_eq!(got["ok"], true);
        assert_eq!(accepted.load(Ordering::SeqCst), i);
        eventually(
            "the client saw the close",
            Duration::from_secs(5),
            || async { (open.load(Ordering::SeqCst) == 0).then_some(()) },
        )
        .await
        .unwrap();
    }
    server.abort();
}

/// A response body is read into memory up to `max_response_body` (default 16 MiB): a provider
/// sending an endless body, or one larger than the limit, fails the call with a decode error
/// instead of exhausting the caller's memory; a body within the limit is decoded. A non-2xx
/// answer over the limit keeps its status (its body is not kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_bounded() {
    use futures::StreamExt as _;
    type Frames = futures::stream::BoxStream<
        'static,
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                    let status = if req.uri().path() == "/conflict" {
                        409
                    } else {
                        200
                    };
                    let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
                    let frames: Frames = if req.uri().path() == "/endless" {
                        futures::stream::repeat(chunk)
                            .map(|c| Ok(http_body::Frame::data(c)))
                            .boxed()
                    } else {
                        // A JSON string of 2 MiB.
                        let quote = || Ok(http_body::Frame::data(bytes::Bytes::from_static(b"\"")));
                        futures::stream::once(async move { quote() })
                            .chain(
                                futures::stream::repeat(chunk)
                                    .take(32)
                                    .map(|c| Ok(http_body::Frame::data(c))),
                            )
                            .chain(futures::stream::once(async move { quote() }))
                            .boxed()
                    };
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(http_body_util::StreamBody::new(frames))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let url = format!("http://{addr}");
    let default = RestClient::builder("big").endpoints([&url]).unwrap();
    let error = default.get::<Value>("/endless").await.unwrap_err();
    assert!(error.is_decode(), "{error:?}");
    assert!(error.to_string().contains("larger than"), "{error}");
    let two_mib: String = default.get("/two-mib").await.unwrap();
    assert_eq!(two_mib.len(), 2 << 20);

    let small = RestClient::builder("big")
        .max_response_body(1 << 20)
        .endpoints([&url])
        .unwrap();
    let error = small.get::<String>("/two-mib").await.unwrap_err();
    assert!(error.is_decode(), "{error:?}");
    let error = small.get::<String>("/conflict").await.unwrap_err();
    assert_eq!(
        error.status(),
        Some(http::StatusCode::CONFLICT),
        "{error:?}"
    );
    assert!(error.body().is_empty(), "{error:?}");
    server.abort();
}

/// A plain POST answered 503 without `Retry-After` is not sent again: a gateway whose upstream
/// broke answers so after forwarding it, and it may have run. Answered 503 with `Retry-After` (a
/// server shedding load) it goes to the other provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_503_is_not_replayed_for_a_plain_post() {
    let a = RestProvider::start("r-a").await;
    let b = RestProvider::start("r-b").await;
    a.faults.fail_every(1, 503);
    let client = RestClient::builder("accounts")
        .balance(Balance::RoundRobin)
        .breaker(never_opening_breaker())
        .endpoints([a.url(), b.url()])
        .unwrap();
    let mut failed = 0;
    for i in 0..6 {
        match client
            .post::<_, Value>("/transfers", &serde_json::json!({ "n": i }))
            .await
        {
            Ok(v) => assert_eq!(v["server"], "r-b"),
            Err(e) => {
                assert_eq!(
                    e.http_status(),
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "{e:?}"
                );
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 3, "every call to r-a failed, none was replayed");
    assert_eq!((a.faults.calls(), b.faults.calls()), (3, 3));

    a.faults.retry_after(true);
    for i in 0..6 {
        let v: Value = client
            .post("/transfers", &serde_json::json!({ "n": i }))
            .await
            .unwrap();
        assert_eq!(v["server"], "r-b");
    }
    assert_eq!(b.faults.calls(), 9, "each call executed once, by r-b");
    assert!(a.faults.calls() > 3, "r-a refused some on the way");
}

/// A refusal that is retried (503 with `Retry-After`, a server shedding load) is read to its end
/// before the retry, so its connection goes back to the pool: retrying a refusal costs the
/// provider no new connection (dropped unread, hyper closes it, and every retried refusal would
/// dial again, under overload of all times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_refusal_keeps_its_connection() {
    let p = RestProvider::start("r-0").await;
    p.faults.fail_every(2, 503);
    p.faults.retry_after(true);
    let (proxy, accepted) = counting_proxy(p.addr).await;
    let client = RestClient::builder("echo-rest")
        .breaker(never_opening_breaker())
        .retry_budget(ample_budget())
        .endpoints([format!("http://{proxy}")])
        .unwrap();
    for i in 0..10 {
        let got: Value = client.get(&format!("/seq/{i}")).await.unwrap();
        assert_eq!(got["server"], "r-0");
    }
    assert_eq!(
        p.faults.calls(),
        19,
        "nine calls were refused once and retried"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the refusals' connection was reused"
    );
}

/// As for gRPC: a provider that sends its response head and then stalls is ejected; its calls
/// end at their deadline inside the body, and those count against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stalls_after_its_head_is_ejected() {
    let (addr, server) = common::stalling_server("application/json").await;
    let stalling = format!("http://{addr}");
    let provider = RestProvider::start("r-ok").await;
    let client = RestClient::builder("accounts")
        .balance(Balance::RoundRobin)
        .breaker(quick_breaker(Duration::from_secs(60)))
        .timeout(Duration::from_millis(400))
        .max_attempts(1)
        .endpoints([stalling.clone(), provider.url()])
        .unwrap();
    for _ in 0..12 {
        if let Err(e) = client.get::<Value>("/accounts/1").await {
            assert!(e.is_deadline_exceeded(), "{e:?}");
        }
    }
    assert!(
        state_is(&client, &stalling, State::Open),
        "{:?}",
        client.endpoints()
    );
    for _ in 0..10 {
        client.get::<Value>("/accounts/1").await.unwrap();
    }
    server.abort();
}

/// As for gRPC: a provider that accepts calls and never answers is ejected, because calls that
/// end at their deadline count against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_is_ejected() {
    let (hung, server) = silent_provider().await;
    let provider = RestProvider::start("r-ok").await;
    let client = RestClient::builder("accounts")
        .balance(Balance::RoundRobin)
        .breaker(quick_breaker(Duration::from_secs(60)))
        .timeout(Duration::from_millis(400))
        .endpoints([hung.clone(), provider.url()])
        .unwrap();
    let mut timed_out = 0;
    for _ in 0..12 {
        if let Err(e) = client.get::<Value>("/accounts/1").await {
            assert!(e.is_deadline_exceeded(), "{e:?}");
            timed_out += 1;
        }
    }
    assert!(
        state_is(&client, &hung, State::Open),
        "{:?}",
        client.endpoints()
    );
    assert!((4..=6).contains(&timed_out), "{timed_out}");
    for _ in 0..10 {
        client.get::<Value>("/accounts/1").await.unwrap();
    }
    server.abort();
}
