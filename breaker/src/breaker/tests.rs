use std::time::Duration;

use proptest::prelude::*;
use tokio::time::advance;
use tower::ServiceExt;

use super::state::{Denied, Permit};
use super::*;
use crate::classify::{FailureClass, Outcome};

const FAIL: Outcome = Outcome::Failure(FailureClass::Unknown);

fn config() -> BreakerConfig {
    BreakerConfig {
        sliding_window_size: 4,
        minimum_number_of_calls: 4,
        failure_rate_threshold: 50.0,
        wait_duration_in_open_state: Duration::from_secs(1),
        permitted_number_of_calls_in_half_open_state: 2,
        enable_exponential_backoff: false,
        slow_call_duration_threshold: Duration::from_millis(100),
        ..BreakerConfig::default()
    }
}

/// A backend whose request says which status to answer and how long to take.
fn backend() -> impl tower::Service<
    http::Request<(u16, u64)>,
    Response = http::Response<()>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(|req: http::Request<(u16, u64)>| async move {
        let (status, delay_ms) = *req.body();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let mut res = http::Response::new(());
        *res.status_mut() = http::StatusCode::from_u16(status)?;
        Ok::<_, BoxError>(res)
    })
}

async fn call<S>(
    svc: &mut S,
    status: u16,
    delay_ms: u64,
) -> Result<http::Response<ResponseBody<()>>, BoxError>
where
    S: tower::Service<
            http::Request<(u16, u64)>,
            Response = http::Response<ResponseBody<()>>,
            Error = BoxError,
        >,
{
    svc.ready()
        .await?
        .call(http::Request::new((status, delay_ms)))
        .await
}

fn is_open(err: &BoxError) -> bool {
    err.downcast_ref::<BreakerError>()
        .is_some_and(BreakerError::is_open)
}

fn record(b: &Breaker, outcome: Outcome) {
    let permit = b.try_acquire().expect("permit");
    b.record(permit, b.clock().now_ms(), outcome);
}

#[tokio::test(start_paused = true)]
async fn closed_opens_at_failure_rate_only_after_minimum_calls() {
    let breaker = Breaker::new(config()).unwrap();
    let mut states = breaker.subscribe();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer_on(backend());
    for _ in 0..3 {
        assert_eq!(call(&mut svc, 500, 0).await.unwrap().status(), 500);
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "3 failures < minimumNumberOfCalls"
    );
    assert!(!states.has_changed().unwrap());
    assert_eq!(call(&mut svc, 500, 0).await.unwrap().status(), 500);
    assert_eq!(breaker.state(), State::Open);
    assert!(states.has_changed().unwrap());
    assert_eq!(*states.borrow_and_update(), State::Open);
    let err = call(&mut svc, 200, 0).await.unwrap_err();
    assert!(is_open(&err), "fails fast with a typed error: {err}");
    let m = breaker.metrics();
    assert_eq!((m.opened, m.rejected), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn below_threshold_stays_closed() {
    let breaker = Breaker::new(config()).unwrap();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer_on(backend());
    // 1 failure in 4 = 25 % < 50 %; 404 and 400 are successes of the endpoint.
    for status in [500, 200, 404, 400, 200, 200] {
        call(&mut svc, status, 0).await.unwrap();
    }
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.metrics().failure_rate, 0.0, "the 500 slid out");
}

#[tokio::test(start_paused = true)]
async fn open_half_open_closed_then_reopen() {
    let breaker = Breaker::new(config()).unwrap();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer_on(backend());
    for _ in 0..4 {
        call(&mut svc, 503, 0).await.unwrap();
    }
    assert_eq!(breaker.state(), State::Open);
    advance(Duration::from_millis(999)).await;
    assert!(is_open(&call(&mut svc, 200, 0).await.unwrap_err()));
    advance(Duration::from_millis(1)).await;
    // Wait over: the next call is a probe.
    call(&mut svc, 200, 0).await.unwrap();
    assert_eq!(breaker.state(), State::HalfOpen);
    call(&mut svc, 200, 0).await.unwrap();
    assert_eq!(
        breaker.state(),
        State::Closed,
        "2 successful probes close it"
    );
    assert_eq!(breaker.metrics().window_calls, 0, "window reset on close");

    // Trip again, then fail a probe: back to open.
    for _ in 0..4 {
        call(&mut svc, 500, 0).await.unwrap();
    }
    advance(Duration::from_secs(1)).await;
    call(&mut svc, 500, 0).await.unwrap();
    call(&mut svc, 200, 0).await.unwrap();
    assert_eq!(breaker.state(), State::Open, "1 of 2 probes failed = 50 %");
    let m = breaker.metrics();
    assert_eq!((m.opened, m.half_opened, m.closed), (3, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_breaker() {
    let cfg = BreakerConfig {
        slow_call_rate_threshold: 50.0,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer_on(backend());
    for _ in 0..3 {
        call(&mut svc, 200, 100).await.unwrap(); // exactly the threshold: not slow
    }
    call(&mut svc, 200, 0).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
    call(&mut svc, 200, 101).await.unwrap();
    assert_eq!(breaker.state(), State::Closed, "1 slow of 4");
    call(&mut svc, 200, 250).await.unwrap();
    assert_eq!(breaker.state(), State::Open, "2 slow of 4 successful calls");
}

#[tokio::test(start_paused = true)]
async fn time_window_rolls_over() {
    let cfg = BreakerConfig {
        sliding_window_type: SlidingWindowType::TimeBased,
        sliding_window_size: 2,
        minimum_number_of_calls: 2,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    record(&breaker, FAIL);
    advance(Duration::from_secs(2)).await;
    record(&breaker, FAIL);
    assert_eq!(
        breaker.state(),
        State::Closed,
        "the first failure left the 2 s window"
    );
    assert_eq!(breaker.metrics().window_calls, 1);
    advance(Duration::from_millis(500)).await;
    record(&breaker, FAIL);
    assert_eq!(breaker.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn open_wait_grows_exponentially_to_a_cap() {
    let cfg = BreakerConfig {
        enable_exponential_backoff: true,
        exponential_backoff_multiplier: 2.0,
        exponential_max_wait_duration_in_open_state: Duration::from_secs(3),
        permitted_number_of_calls_in_half_open_state: 1,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    for expected_wait in [1000u64, 2000, 3000, 3000] {
        assert_eq!(breaker.state(), State::Open);
        advance(Duration::from_millis(expected_wait - 1)).await;
        assert!(
            matches!(breaker.try_acquire(), Err(Denied::Open { .. })),
            "still open 1 ms before {expected_wait} ms"
        );
        advance(Duration::from_millis(1)).await;
        let probe = breaker.try_acquire().expect("probe after the wait");
        breaker.record(probe, breaker.clock().now_ms(), FAIL);
    }
    // A successful probe resets the growth.
    advance(Duration::from_secs(3)).await;
    let probe = breaker.try_acquire().unwrap();
    breaker.record(probe, breaker.clock().now_ms(), Outcome::Success);
    assert_eq!(breaker.state(), State::Closed);
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    assert!(breaker.try_acquire().is_ok(), "back to the base wait");
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_the_permitted_probes_and_cancel_frees_one() {
    let breaker = Breaker::new(config()).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    let (mock, mut handle) = tower_test::mock::pair::<(), http::Response<()>>();
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer_on(mock);
    handle.allow(10);
    let first = svc.ready().await.unwrap().call(());
    let second = svc.ready().await.unwrap().call(());
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(
        err.downcast_ref::<BreakerError>()
            .is_some_and(BreakerError::is_half_open_full)
    );
    drop(first); // a cancelled probe gives its slot back
    let third = svc.ready().await.unwrap().call(());
    // Three requests reached the backend (the cancelled one had already been sent).
    for _ in 0..3 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new(()));
    }
    second.await.unwrap();
    third.await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn gate_mode_is_not_ready_while_open_and_wakes_after_the_wait() {
    let breaker = Breaker::new(config()).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    let (mock, mut handle) = tower_test::mock::pair::<(), http::Response<()>>();
    handle.allow(1);
    let svc = CircuitBreakerLayer::new(breaker.clone())
        .mode(Mode::Gate)
        .layer_on(mock);
    let mut svc = tower_test::mock::Spawn::new(svc);
    assert!(svc.poll_ready().is_pending(), "open = not ready");
    assert!(!svc.is_woken());
    advance(Duration::from_millis(1000)).await;
    assert!(svc.is_woken(), "the open timer wakes the task");
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn gate_mode_wakes_a_task_waiting_in_poll_ready_after_the_open_wait() {
    for automatic in [true, false] {
        let cfg = BreakerConfig {
            automatic_transition_from_open_to_half_open_enabled: automatic,
            ..config()
        };
        let breaker = Breaker::new(cfg).unwrap();
        for _ in 0..4 {
            record(&breaker, FAIL);
        }
        let svc = CircuitBreakerLayer::new(breaker.clone())
            .mode(Mode::Gate)
            .layer_on(backend());
        let start = tokio::time::Instant::now();
        // A task parked in poll_ready, as a balancer's is; nothing else touches the breaker.
        let waiter = tokio::spawn(async move {
            let mut svc = svc;
            svc.ready().await.map(|_| ()).unwrap();
            tokio::time::Instant::now()
        });
        let ready_at = waiter.await.unwrap();
        assert_eq!(
            ready_at - start,
            Duration::from_secs(1),
            "woken when the wait in open elapses (automatic = {automatic})"
        );
        assert_eq!(breaker.state(), State::HalfOpen);
    }
}

#[tokio::test(start_paused = true)]
async fn gate_mode_waiter_follows_a_half_open_timeout_to_the_next_probe() {
    let cfg = BreakerConfig {
        permitted_number_of_calls_in_half_open_state: 1,
        max_wait_duration_in_half_open_state: Duration::from_millis(300),
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    let _stuck = breaker.try_acquire().expect("the only probe");
    let (mock, _handle) = tower_test::mock::pair::<(), http::Response<()>>();
    let svc = CircuitBreakerLayer::new(breaker.clone())
        .mode(Mode::Gate)
        .layer_on(mock);
    let mut svc = tower_test::mock::Spawn::new(svc);
    assert!(svc.poll_ready().is_pending(), "the only probe is taken");
    advance(Duration::from_millis(300)).await;
    assert!(svc.is_woken(), "the half-open timeout wakes the waiter");
    assert!(svc.poll_ready().is_pending(), "re-opened: not ready");
    assert_eq!(breaker.state(), State::Open);
    advance(Duration::from_millis(1000)).await;
    assert!(svc.is_woken(), "then the new open wait does");
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn gate_mode_wakes_waiters_when_a_probe_completes() {
    let cfg = BreakerConfig {
        permitted_number_of_calls_in_half_open_state: 1,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    let probe = breaker.try_acquire().unwrap();
    let (mock, _handle) = tower_test::mock::pair::<(), http::Response<()>>();
    let svc = CircuitBreakerLayer::new(breaker.clone())
        .mode(Mode::Gate)
        .layer_on(mock);
    let mut svc = tower_test::mock::Spawn::new(svc);
    assert!(svc.poll_ready().is_pending(), "the only probe is taken");
    breaker.record(probe, breaker.clock().now_ms(), Outcome::Success);
    assert!(svc.is_woken());
    assert_eq!(breaker.state(), State::Closed);
}

#[test]
fn concurrent_records_keep_counters_exact() {
    let cfg = BreakerConfig {
        sliding_window_size: 1000,
        minimum_number_of_calls: 1000,
        failure_rate_threshold: 100.0,
        slow_call_rate_threshold: 100.0,
        ..config()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let breaker = rt.block_on(async { Breaker::new(cfg).unwrap() });
    let run = |fail_every: u64| {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let b = breaker.clone();
                rt.spawn(async move {
                    for i in 0..5_000u64 {
                        let outcome = if fail_every > 0 && (i + t) % fail_every == 0 {
                            FAIL
                        } else {
                            Outcome::Success
                        };
                        let Ok(permit) = b.try_acquire() else {
                            assert_eq!(fail_every, 1, "only all-failures may trip it");
                            break;
                        };
                        b.record(permit, b.clock().now_ms(), outcome);
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
    };
    run(3);
    let m = breaker.metrics();
    assert_eq!(m.window_calls, 1000);
    assert_eq!(breaker.recount(), breaker.tally_for_test(), "no drift");
    assert!(
        m.failure_rate > 0.0 && m.failure_rate < 100.0,
        "{}",
        m.failure_rate
    );
    assert_eq!(breaker.state(), State::Closed);
    run(0);
    let m = breaker.metrics();
    assert_eq!(breaker.recount(), breaker.tally_for_test(), "no drift");
    assert_eq!(
        (m.window_calls, m.failure_rate),
        (1000, 0.0),
        "all failures overwritten"
    );
    run(1);
    assert_eq!(breaker.state(), State::Open, "100 % failures trip it");
}

#[test]
fn config_reads_resilience4j_names() {
    let camel: BreakerConfig = serde_json::from_str(
        r#"{"failureRateThreshold": 40, "slowCallRateThreshold": 80,
            "slowCallDurationThreshold": "800ms", "slidingWindowType": "TIME_BASED",
            "slidingWindowSize": 30, "minimumNumberOfCalls": 5,
            "waitDurationInOpenState": "60s", "permittedNumberOfCallsInHalfOpenState": 7,
            "automaticTransitionFromOpenToHalfOpenEnabled": false,
            "enableExponentialBackoff": true, "exponentialBackoffMultiplier": 1.5,
            "exponentialMaxWaitDurationInOpenState": "5m"}"#,
    )
    .unwrap();
    assert_eq!(camel.failure_rate_threshold, 40.0);
    assert_eq!(camel.slow_call_rate_threshold, 80.0);
    assert_eq!(
        camel.slow_call_duration_threshold,
        Duration::from_millis(800)
    );
    assert_eq!(camel.sliding_window_type, SlidingWindowType::TimeBased);
    assert_eq!(camel.sliding_window_size, 30);
    assert_eq!(camel.minimum_number_of_calls, 5);
    assert_eq!(camel.wait_duration_in_open_state, Duration::from_secs(60));
    assert_eq!(camel.permitted_number_of_calls_in_half_open_state, 7);
    assert!(!camel.automatic_transition_from_open_to_half_open_enabled);
    assert_eq!(camel.exponential_backoff_multiplier, 1.5);
    assert_eq!(
        camel.exponential_max_wait_duration_in_open_state,
        Duration::from_secs(300)
    );

    let kebab: BreakerConfig = serde_json::from_str(
        r#"{"failure-rate-threshold": 40, "sliding-window-type": "count_based",
            "wait-duration-in-open-state": 1500, "minimum_number_of_calls": 3}"#,
    )
    .unwrap();
    assert_eq!(kebab.failure_rate_threshold, 40.0);
    assert_eq!(kebab.sliding_window_type, SlidingWindowType::CountBased);
    assert_eq!(
        kebab.wait_duration_in_open_state,
        Duration::from_millis(1500)
    );
    assert_eq!(kebab.minimum_number_of_calls, 3);
    assert_eq!(
        kebab.sliding_window_size,
        BreakerConfig::default().sliding_window_size
    );

    // Round trip through the serialised (camelCase) form.
    let back: BreakerConfig =
        serde_json::from_str(&serde_json::to_string(&camel).unwrap()).unwrap();
    assert_eq!(back, camel);

    // Out-of-range values are refused when the configuration is read, naming the field.
    let err = serde_json::from_str::<BreakerConfig>(r#"{"failureRateThreshold": 0}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("failureRateThreshold"), "{err}");
    let bad = BreakerConfig {
        failure_rate_threshold: 0.0,
        ..BreakerConfig::default()
    };
    assert!(Breaker::new(bad).is_err());
    assert!(serde_json::from_str::<BreakerConfig>(r#"{"slidingWindowType": "SIZE"}"#).is_err());
    // A slow-call threshold under the millisecond the breaker times calls in made every call
    // slow (zero, which may read as "off", too): every endpoint ejected.
    for threshold in [Duration::ZERO, Duration::from_micros(500)] {
        let bad = BreakerConfig {
            slow_call_duration_threshold: threshold,
            ..BreakerConfig::default()
        };
        let err = Breaker::new(bad).unwrap_err().to_string();
        assert!(err.contains("slowCallDurationThreshold"), "{err}");
    }
}

#[test]
fn config_reads_the_nested_window_of_keel_toml() {
    #[derive(serde::Deserialize)]
    struct Client {
        breaker: BreakerConfig,
    }
    // As in DESIGN.md's keel.toml.
    let client: Client = toml::from_str(
        r#"breaker = { failure_rate_threshold = 50, sliding_window = { kind = "count", size = 20 } }"#,
    )
    .unwrap();
    assert_eq!(client.breaker.failure_rate_threshold, 50.0);
    assert_eq!(
        client.breaker.sliding_window_type,
        SlidingWindowType::CountBased
    );
    assert_eq!(client.breaker.sliding_window_size, 20);

    let time: BreakerConfig = toml::from_str(
        r#"
        failure_rate_threshold = 40
        max_wait_duration_in_half_open_state = "2s"
        [sliding_window]
        kind = "time"
        size = 30
        "#,
    )
    .unwrap();
    assert_eq!(time.sliding_window_type, SlidingWindowType::TimeBased);
    assert_eq!(time.sliding_window_size, 30, "seconds for a time window");
    assert_eq!(time.failure_rate_threshold, 40.0);
    assert_eq!(
        time.max_wait_duration_in_half_open_state,
        Duration::from_secs(2)
    );

    let json: BreakerConfig = serde_json::from_str(
        r#"{"failureRateThreshold": 30, "sliding_window": {"kind": "TIME_BASED", "size": 10},
            "maxWaitDurationInHalfOpenState": "500ms"}"#,
    )
    .unwrap();
    assert_eq!(json.sliding_window_type, SlidingWindowType::TimeBased);
    assert_eq!(json.sliding_window_size, 10);
    assert_eq!(
        json.max_wait_duration_in_half_open_state,
        Duration::from_millis(500)
    );
    // The flat resilience4j form in TOML, too.
    let flat: BreakerConfig =
        toml::from_str("slidingWindowType = \"TIME_BASED\"\nslidingWindowSize = 15").unwrap();
    assert_eq!(
        (flat.sliding_window_type, flat.sliding_window_size),
        (SlidingWindowType::TimeBased, 15)
    );
    // Partial nested forms keep the defaults for the rest.
    let only_kind: BreakerConfig =
        serde_json::from_str(r#"{"sliding_window": {"kind": "time"}}"#).unwrap();
    assert_eq!(
        (only_kind.sliding_window_type, only_kind.sliding_window_size),
        (
            SlidingWindowType::TimeBased,
            BreakerConfig::default().sliding_window_size
        )
    );

    // Bad values: the error names the field.
    let cases = [
        (
            r#"sliding_window = { kind = "hourly", size = 20 }"#,
            "sliding_window.kind",
        ),
        (
            r#"sliding_window = { kind = "count", size = -1 }"#,
            "sliding_window.size",
        ),
        (
            r#"sliding_window = { kind = "count", size = 0 }"#,
            "sliding_window.size",
        ),
        (
            r#"sliding_window = { kind = "time", size = 7200 }"#,
            "sliding_window.size",
        ),
        (r#"sliding_window = { kind = "count", sise = 20 }"#, "sise"),
        (r#"failure_rate_threshold = 150"#, "failureRateThreshold"),
        (
            "sliding_window = { kind = \"count\" }\nslidingWindowSize = 5",
            "not both",
        ),
        (
            r#"max_wait_duration_in_half_open_state = "soon""#,
            "invalid duration",
        ),
    ];
    for (text, field) in cases {
        let err = toml::from_str::<BreakerConfig>(text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
    let err = serde_json::from_str::<BreakerConfig>(
        r#"{"sliding_window": {"kind": "count", "size": "twenty"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sliding_window.size"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn half_open_too_long_reopens() {
    let cfg = BreakerConfig {
        max_wait_duration_in_half_open_state: Duration::from_millis(500),
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    let first = breaker.try_acquire().expect("first probe");
    assert_eq!(breaker.state(), State::HalfOpen);
    // One probe of two done, the other never completes.
    breaker.record(first, breaker.clock().now_ms(), Outcome::Success);
    let _stuck = breaker.try_acquire().expect("second probe");
    advance(Duration::from_millis(499)).await;
    assert_eq!(breaker.state(), State::HalfOpen, "1 ms before the limit");
    assert_eq!(breaker.metrics().opened, 1);
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        breaker.state(),
        State::Open,
        "half-open for maxWaitDurationInHalfOpenState without completing its probes"
    );
    assert_eq!(breaker.metrics().opened, 2);
    // A probe of the timed-out period that completes late no longer counts.
    breaker.record(_stuck, breaker.clock().now_ms(), Outcome::Success);
    assert_eq!(breaker.state(), State::Open);
    // The wait in open starts from the re-opening.
    advance(Duration::from_millis(999)).await;
    assert_eq!(breaker.state(), State::Open);
    advance(Duration::from_millis(1)).await;
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_without_limit_waits_for_its_probes() {
    let breaker = Breaker::new(config()).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    let probe = breaker.try_acquire().expect("probe");
    advance(Duration::from_secs(3600)).await;
    assert_eq!(breaker.state(), State::HalfOpen);
    breaker.record(probe, breaker.clock().now_ms(), Outcome::Success);
    assert_eq!(breaker.state(), State::HalfOpen, "one of two probes done");
}

#[tokio::test(start_paused = true)]
async fn half_open_timeout_is_seen_by_a_state_watch_without_traffic() {
    let cfg = BreakerConfig {
        max_wait_duration_in_half_open_state: Duration::from_millis(500),
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    let mut watch = breaker.watch();
    let start = tokio::time::Instant::now();
    assert_eq!(watch.current(), State::Open);
    // Nothing else happens: the watch's timer takes the breaker to half-open after 1 s ...
    assert_eq!(watch.changed().await, State::HalfOpen);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let _probe = breaker.try_acquire().expect("probe");
    // ... and back to open 500 ms later, the probe still in flight.
    assert_eq!(watch.changed().await, State::Open);
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[tokio::test(start_paused = true)]
async fn automatic_transition_is_seen_without_traffic() {
    let breaker = Breaker::new(config()).unwrap();
    let mut raw = breaker.subscribe();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    assert_eq!(*raw.borrow_and_update(), State::Open);
    let mut watch = breaker.watch();
    assert_eq!(watch.current(), State::Open);
    let start = tokio::time::Instant::now();
    let seen = tokio::spawn(async move { watch.changed().await });
    // The spawned watcher is woken by its own timer; no call is made.
    let state = seen.await.unwrap();
    assert_eq!(state, State::HalfOpen);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert!(raw.has_changed().unwrap(), "published to every subscriber");
    assert_eq!(*raw.borrow_and_update(), State::HalfOpen);
    let m = breaker.metrics();
    assert_eq!((m.state, m.half_opened), (Some(State::HalfOpen), 1));
}

#[tokio::test(start_paused = true)]
async fn state_and_metrics_see_the_automatic_transition() {
    let breaker = Breaker::new(config()).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_millis(999)).await;
    assert_eq!(breaker.metrics().state, Some(State::Open));
    advance(Duration::from_millis(1)).await;
    assert_eq!(breaker.metrics().state, Some(State::HalfOpen));
    assert_eq!(breaker.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn without_automatic_transition_open_lasts_until_a_call_attempt() {
    let cfg = BreakerConfig {
        automatic_transition_from_open_to_half_open_enabled: false,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    let mut watch = breaker.watch();
    assert_eq!(watch.current(), State::Open);
    advance(Duration::from_secs(10)).await;
    assert_eq!(breaker.state(), State::Open, "resilience4j: lazy");
    assert_eq!(breaker.metrics().state, Some(State::Open));
    let pending = tokio::time::timeout(Duration::from_secs(5), watch.changed()).await;
    assert!(pending.is_err(), "no timer without automatic transition");
    // The call attempt takes it to half-open.
    let mut svc = CircuitBreakerLayer::new(breaker.clone()).layer_on(backend());
    call(&mut svc, 200, 0).await.unwrap();
    assert_eq!(watch.changed().await, State::HalfOpen);
}

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Complete(usize, bool),
    Cancel(usize),
    Wait,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            4 => Just(Op::Acquire),
            3 => (0usize..16, any::<bool>()).prop_map(|(i, ok)| Op::Complete(i, ok)),
            1 => (0usize..16).prop_map(Op::Cancel),
            1 => Just(Op::Wait),
        ],
        1..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn half_open_never_admits_more_than_permitted(permitted in 1u32..6, ops in ops()) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let cfg = BreakerConfig {
                permitted_number_of_calls_in_half_open_state: permitted,
                ..config()
            };
            let breaker = Breaker::new(cfg).unwrap();
            for _ in 0..4 {
                record(&breaker, FAIL);
            }
            // Per half-open period (keyed by its generation): probes admitted minus probes
            // cancelled must never exceed `permitted`.
            let mut outstanding: Vec<Permit> = Vec::new();
            let mut admitted: std::collections::HashMap<u64, (u32, u32)> = Default::default();
            for op in ops {
                match op {
                    Op::Acquire => {
                        if let Ok(p) = breaker.try_acquire() {
                            if let Permit::HalfOpen { generation } = p {
                                admitted.entry(generation).or_default().0 += 1;
                            }
                            outstanding.push(p);
                        }
                    }
                    Op::Complete(i, ok) if !outstanding.is_empty() => {
                        let p = outstanding.swap_remove(i % outstanding.len());
                        let outcome = if ok { Outcome::Success } else { FAIL };
                        breaker.record(p, breaker.clock().now_ms(), outcome);
                    }
                    Op::Cancel(i) if !outstanding.is_empty() => {
                        let p = outstanding.swap_remove(i % outstanding.len());
                        if let Permit::HalfOpen { generation } = p
                            && breaker.is_current(generation)
                        {
                            admitted.entry(generation).or_default().1 += 1;
                        }
                        breaker.release(p);
                    }
                    Op::Wait => advance(Duration::from_millis(1000)).await,
                    _ => {}
                }
                for (generation, (got, cancelled)) in &admitted {
                    prop_assert!(
                        got - cancelled <= permitted,
                        "generation {generation}: {got} admitted, {cancelled} cancelled, {permitted} permitted"
                    );
                }
            }
            Ok(())
        })?;
    }
}

trait LayerOn {
    fn layer_on<S>(&self, s: S) -> CircuitBreaker<S>;
}
impl LayerOn for CircuitBreakerLayer {
    fn layer_on<S>(&self, s: S) -> CircuitBreaker<S> {
        tower_layer::Layer::layer(self, s)
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC status in trailers after a body.

/// A response body that yields its frames one per poll.
#[derive(Debug)]
struct Frames(std::collections::VecDeque<Result<http_body::Frame<bytes::Bytes>, BoxError>>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        // A `STALL` error in front: the provider sends nothing more.
        if matches!(self.0.front(), Some(Err(e)) if e.to_string() == STALL) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(self.0.pop_front())
    }
}

const STALL: &str = "stall";

/// A response whose body stalls at once (a gRPC one when `grpc`).
fn stalling(grpc: bool) -> http::Response<Frames> {
    let mut res = http::Response::new(Frames([Err(STALL.into())].into()));
    if grpc {
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
    }
    res
}

/// Polls `body` once, as a reader waiting for its next frame would.
async fn poll_once(body: &mut ResponseBody<Frames>) {
    use http_body::Body as _;
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut *body).poll_frame(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

fn trailers(code: tonic::Code) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from(code as i32));
    t
}

/// A streaming gRPC response: HTTP 200 with a gRPC content type, a message, then `end`.
fn grpc_response(end: Option<Result<http::HeaderMap, &'static str>>) -> http::Response<Frames> {
    let mut frames = std::collections::VecDeque::new();
    frames.push_back(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"\0\0\0\0\x01x",
    ))));
    match end {
        Some(Ok(t)) => frames.push_back(Ok(http_body::Frame::trailers(t))),
        Some(Err(e)) => frames.push_back(Err(e.into())),
        None => {}
    }
    let mut res = http::Response::new(Frames(frames));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    res
}

type GrpcMock = tower_test::mock::Mock<(), http::Response<Frames>>;
type GrpcHandle = tower_test::mock::Handle<(), http::Response<Frames>>;

fn grpc_breaker(breaker: &Breaker) -> (CircuitBreaker<GrpcMock>, GrpcHandle) {
    let (mock, handle) = tower_test::mock::pair::<(), http::Response<Frames>>();
    (
        CircuitBreakerLayer::new(breaker.clone()).layer_on(mock),
        handle,
    )
}

/// One call answered with `response`; returns the response without reading its body.
async fn grpc_call(
    svc: &mut CircuitBreaker<GrpcMock>,
    handle: &mut GrpcHandle,
    response: http::Response<Frames>,
) -> http::Response<ResponseBody<Frames>> {
    handle.allow(1);
    let fut = svc.ready().await.unwrap().call(());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(response);
    fut.await.unwrap()
}

async fn read_to_end(res: http::Response<ResponseBody<Frames>>) -> Option<http::HeaderMap> {
    use http_body_util::BodyExt;
    res.into_body()
        .collect()
        .await
        .ok()
        .and_then(|c| c.trailers().cloned())
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_trailers_after_a_body_is_classified() {
    let breaker = Breaker::new(config()).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    for i in 0..4 {
        let res = grpc_call(
            &mut svc,
            &mut handle,
            grpc_response(Some(Ok(trailers(tonic::Code::Unavailable)))),
        )
        .await;
        assert_eq!(res.status(), 200);
        assert!(res.body().is_pending(), "HTTP 200 decides nothing for gRPC");
        assert_eq!(
            breaker.metrics().window_calls,
            i,
            "not recorded before the trailers"
        );
        let t = read_to_end(res).await.expect("trailers pass through");
        assert_eq!(t["grpc-status"], "14");
    }
    assert_eq!(
        breaker.state(),
        State::Open,
        "4 UNAVAILABLE in trailers of 4 calls"
    );
    assert_eq!(breaker.metrics().opened, 1);
}

#[tokio::test(start_paused = true)]
async fn grpc_ok_in_trailers_is_a_success_recorded_once() {
    let breaker = Breaker::new(config()).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    for _ in 0..3 {
        let res = grpc_call(
            &mut svc,
            &mut handle,
            grpc_response(Some(Ok(trailers(tonic::Code::Ok)))),
        )
        .await;
        read_to_end(res).await.unwrap();
    }
    // Polling past the end records nothing more.
    let res = grpc_call(
        &mut svc,
        &mut handle,
        grpc_response(Some(Ok(trailers(tonic::Code::NotFound)))),
    )
    .await;
    let mut body = std::pin::pin!(res.into_body());
    while std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx))
        .await
        .is_some()
    {}
    assert!(
        std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx))
            .await
            .is_none()
    );
    let m = breaker.metrics();
    assert_eq!((m.window_calls, m.failure_rate), (4, 0.0));
    assert_eq!(breaker.recount(), (4, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn grpc_body_end_without_trailers_or_error_fails_and_drop_is_not_counted() {
    let breaker = Breaker::new(config()).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    // Dropped before the trailers: the caller stopped reading; not counted.
    let res = grpc_call(
        &mut svc,
        &mut handle,
        grpc_response(Some(Ok(trailers(tonic::Code::Unavailable)))),
    )
    .await;
    drop(res);
    assert_eq!(breaker.metrics().window_calls, 0);
    // Ended without trailers, and a body error: failures.
    let res = grpc_call(&mut svc, &mut handle, grpc_response(None)).await;
    assert!(read_to_end(res).await.is_none());
    let res = grpc_call(&mut svc, &mut handle, grpc_response(Some(Err("reset")))).await;
    assert!(read_to_end(res).await.is_none());
    assert_eq!(breaker.recount(), (2, 2, 0));
}

/// A body dropped before its end while waiting for the provider counts for nothing before the
/// call's deadline (the caller stopped reading), and as a failure once it has passed (the
/// provider sent its head and stalled: the deadline layer gave up on the body). A body that was
/// not waiting (complete but unread, or never polled: a head handled late) is never a failure.
#[tokio::test(start_paused = true)]
async fn a_body_dropped_unfinished_past_the_deadline_is_a_failure() {
    let breaker = Breaker::new(config()).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(100);

    let mut res = grpc_call(&mut svc, &mut handle, stalling(true)).await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    poll_once(res.body_mut()).await;
    drop(res);
    assert_eq!(
        breaker.recount(),
        (0, 0, 0),
        "dropped before the deadline: cancelled"
    );

    let mut res = grpc_call(&mut svc, &mut handle, stalling(true)).await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    poll_once(res.body_mut()).await;
    tokio::time::advance(std::time::Duration::from_millis(100)).await;
    drop(res);
    assert_eq!(
        breaker.recount(),
        (1, 1, 0),
        "stalled at the deadline: a failure"
    );

    // Not waiting for the provider: never polled (a head handled late), or a frame ready.
    let mut res = grpc_call(&mut svc, &mut handle, grpc_response(None)).await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    drop(res);
    let mut res = grpc_call(&mut svc, &mut handle, grpc_response(None)).await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    poll_once(res.body_mut()).await;
    drop(res);
    assert_eq!(
        breaker.recount(),
        (1, 1, 0),
        "not the provider's doing: not counted"
    );

    // Read to its end, the trailers decide as usual, whatever the deadline.
    let mut res = grpc_call(
        &mut svc,
        &mut handle,
        grpc_response(Some(Ok(trailers(tonic::Code::Ok)))),
    )
    .await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    assert!(read_to_end(res).await.is_some());
    assert_eq!(breaker.recount(), (2, 1, 0));
}

/// Trailers-only gRPC responses and plain HTTP responses are decided by their head, and that
/// outcome is recorded once their body is done with (read to the end, or dropped): so a body
/// dropped unfinished past the call's deadline (a provider stalling after its head) can still
/// count as a failure instead.
#[tokio::test(start_paused = true)]
async fn trailers_only_and_plain_http_responses_are_decided_at_the_head() {
    let breaker = Breaker::new(config()).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    let mut trailers_only = http::Response::new(Frames(Default::default()));
    trailers_only.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    trailers_only
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static("14"));
    let res = grpc_call(&mut svc, &mut handle, trailers_only).await;
    assert_eq!(
        breaker.recount(),
        (0, 0, 0),
        "recorded when the body is done with"
    );
    assert!(read_to_end(res).await.is_none());
    assert_eq!(breaker.recount(), (1, 1, 0), "UNAVAILABLE from the head");

    let mut plain = http::Response::new(Frames(Default::default()));
    *plain.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let res = grpc_call(&mut svc, &mut handle, plain).await;
    drop(res);
    assert_eq!(
        breaker.recount(),
        (2, 2, 0),
        "dropped unread: the head's 503"
    );

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
    let mut res = grpc_call(&mut svc, &mut handle, stalling(false)).await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    poll_once(res.body_mut()).await;
    drop(res);
    assert_eq!(
        breaker.recount(),
        (3, 2, 0),
        "dropped early: the head's 200"
    );
}

/// Plain HTTP responses follow the same rule past the deadline: a complete body left unread is
/// the head's outcome, a body stalled while the caller waited is a failure.
#[tokio::test(start_paused = true)]
async fn plain_http_bodies_past_the_deadline() {
    let breaker = Breaker::new(config()).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(100);
    let mut res = grpc_call(
        &mut svc,
        &mut handle,
        http::Response::new(Frames(Default::default())),
    )
    .await;
    res.body_mut().fail_unfinished_after(Some(deadline));
    let mut stalled = grpc_call(&mut svc, &mut handle, stalling(false)).await;
    stalled.body_mut().fail_unfinished_after(Some(deadline));
    poll_once(stalled.body_mut()).await;
    tokio::time::advance(std::time::Duration::from_millis(100)).await;
    drop(res);
    assert_eq!(breaker.recount(), (1, 0, 0), "not waiting: the head's 200");
    drop(stalled);
    assert_eq!(
        breaker.recount(),
        (2, 1, 0),
        "stalled past the deadline: a failure"
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_probe_is_decided_by_its_trailers() {
    let cfg = BreakerConfig {
        permitted_number_of_calls_in_half_open_state: 1,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    for _ in 0..4 {
        record(&breaker, FAIL);
    }
    advance(Duration::from_secs(1)).await;
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    let res = grpc_call(
        &mut svc,
        &mut handle,
        grpc_response(Some(Ok(trailers(tonic::Code::Ok)))),
    )
    .await;
    assert_eq!(breaker.state(), State::HalfOpen, "probe still streaming");
    // The only probe slot is still taken by the streaming call.
    let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(
        err.downcast_ref::<BreakerError>()
            .is_some_and(BreakerError::is_half_open_full)
    );
    read_to_end(res).await.unwrap();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn slow_call_is_measured_to_the_response_head() {
    let cfg = BreakerConfig {
        slow_call_rate_threshold: 50.0,
        ..config()
    };
    let breaker = Breaker::new(cfg).unwrap();
    let (mut svc, mut handle) = grpc_breaker(&breaker);
    for _ in 0..4 {
        let res = grpc_call(
            &mut svc,
            &mut handle,
            grpc_response(Some(Ok(trailers(tonic::Code::Ok)))),
        )
        .await;
        // A long stream: its trailers come well after the slow-call threshold.
        advance(Duration::from_secs(5)).await;
        read_to_end(res).await.unwrap();
    }
    assert_eq!(breaker.recount(), (4, 0, 0), "a long stream is not slow");
    assert_eq!(breaker.state(), State::Closed);
}

/// The balancer's fast path: `try_admit` takes a permit without a breaker service, its call
/// records the outcome like the service's (failures open the breaker, which then admits
/// nothing), and an admission dropped unused gives its half-open probe back.
#[tokio::test(start_paused = true)]
async fn try_admit_records_outcomes_and_a_dropped_admission_frees_its_probe() {
    let breaker = Breaker::new(config()).unwrap();
    let layer = CircuitBreakerLayer::new(breaker.clone());
    let mut inner = tower::service_fn(|req: http::Request<u16>| async move {
        let mut res = http::Response::new(());
        *res.status_mut() = http::StatusCode::from_u16(*req.body())?;
        Ok::<_, BoxError>(res)
    });
    for _ in 0..4 {
        let admission = layer.try_admit().expect("closed: admitted");
        let res = admission
            .call(&mut inner, http::Request::new(500))
            .await
            .unwrap();
        assert_eq!(res.status(), 500);
    }
    assert_eq!(breaker.state(), State::Open, "4 failures of 4 recorded");
    assert!(layer.try_admit().is_none(), "open: nothing admitted");

    advance(Duration::from_secs(1)).await;
    let first = layer.try_admit().expect("half-open: a probe");
    let second = layer.try_admit().expect("half-open: the second probe");
    assert_eq!(breaker.state(), State::HalfOpen);
    assert!(layer.try_admit().is_none(), "both probes taken");
    drop(first);
    let again = layer
        .try_admit()
        .expect("the dropped admission's probe is free again");
    for admission in [second, again] {
        let res = admission
            .call(&mut inner, http::Request::new(200))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        breaker.state(),
        State::Closed,
        "two successful probes close it"
    );
}
