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

async fn call<S>(svc: &mut S, status: u16, delay_ms: u64) -> Result<http::Response<()>, BoxError>
where
    S: tower::Service<http::Request<(u16, u64)>, Response = http::Response<()>, Error = BoxError>,
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

    let bad: BreakerConfig = serde_json::from_str(r#"{"failureRateThreshold": 0}"#).unwrap();
    assert!(Breaker::new(bad).is_err());
    assert!(serde_json::from_str::<BreakerConfig>(r#"{"slidingWindowType": "SIZE"}"#).is_err());
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
