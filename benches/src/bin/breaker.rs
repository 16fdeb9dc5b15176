//! B1, B2, B3 of `BENCHMARKS.md`: the cost of Keel's circuit breaker and retry layers against a
//! no-op layer of the same shape (same service wrapper, same response future, same error boxing),
//! measured in interleaved A/B rounds in one process, with 1 and 2 threads, allocations counted.
//!
//! Every call is driven synchronously (poll_ready, call, one poll of the response future with a
//! no-op waker) over an always-ready backend, so what is measured is the layer itself.

use std::alloc::System;
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Barrier;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use keel::breaker::BoxError;
use keel::breaker::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
use keel::breaker::clock::Clock;
use keel::breaker::retry::{RetryBudget, RetryLayer, RetryPolicy};
use keel_benches::stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use keel_benches::{Report, Row, allocs, interleave};
use tower_layer::Layer;
use tower_service::Service;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const OPS: u64 = 2_000_000;
const ROUNDS: usize = 9;

/// The backend: always ready, answers 200 (or a fixed status) at once.
#[derive(Clone, Copy)]
struct Backend(u16);

impl<B> Service<http::Request<B>> for Backend {
    type Response = http::Response<http_body_util::Empty<bytes::Bytes>>;
    type Error = Infallible;
    type Future =
        std::future::Ready<Result<http::Response<http_body_util::Empty<bytes::Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        let mut res = http::Response::new(http_body_util::Empty::new());
        if self.0 != 200 {
            *res.status_mut() = http::StatusCode::from_u16(self.0).unwrap_or_default();
        }
        std::future::ready(Ok(res))
    }
}

/// The no-op layer of the same shape: wraps the service and its future, boxes errors.
#[derive(Clone)]
struct Noop<S>(S);

struct NoopFuture<F>(F);

impl<F: Future<Output = Result<T, E>> + Unpin, T, E: Into<BoxError>> Future for NoopFuture<F> {
    type Output = Result<T, BoxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map_err(Into::into)
    }
}

impl<S, R> Service<R> for Noop<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = NoopFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        NoopFuture(self.0.call(req))
    }
}

/// One synchronous call; returns whether it succeeded.
#[inline(always)]
fn drive<S, B>(svc: &mut S, body: B) -> bool
where
    S: Service<http::Request<B>, Error = BoxError>,
{
    let mut cx = Context::from_waker(Waker::noop());
    if !matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))) {
        return false;
    }
    let mut fut = std::pin::pin!(svc.call(http::Request::new(body)));
    matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(_)))
}

/// Nanoseconds per call on each of `threads` threads, each with its own clone of the stack.
fn ns_per_op<S, B>(svc: &S, threads: usize, body: fn() -> B) -> f64
where
    S: Service<http::Request<B>, Error = BoxError> + Clone + Send,
{
    let barrier = Barrier::new(threads);
    let per_thread: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let mut svc = svc.clone();
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..OPS {
                        black_box(drive(&mut svc, body()));
                    }
                    start.elapsed().as_nanos() as f64 / OPS as f64
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(f64::NAN))
            .collect()
    });
    per_thread.iter().sum::<f64>() / per_thread.len() as f64
}

fn allocs_per_op<S, B>(svc: &S, body: fn() -> B) -> (f64, f64)
where
    S: Service<http::Request<B>, Error = BoxError> + Clone,
{
    let mut svc = svc.clone();
    allocs::count(GLOBAL, 100_000, || {
        black_box(drive(&mut svc, body()));
    })
}

fn breaker_config() -> BreakerConfig {
    BreakerConfig {
        sliding_window_size: 100,
        minimum_number_of_calls: 10,
        wait_duration_in_open_state: Duration::from_secs(3600),
        ..BreakerConfig::default()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut report = Report::new("breaker");
    let unit = || ();

    // A coarse clock ticked by a thread we own, as keel-client runs its driver.
    let (clock, driver) = Clock::coarse(Duration::from_millis(1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                driver.tick();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let noop = Noop(Backend(200));
    let closed = CircuitBreakerLayer::new(Breaker::with_clock(breaker_config(), clock.clone())?)
        .layer(Backend(200));
    let closed_precise =
        CircuitBreakerLayer::new(Breaker::new(breaker_config())?).layer(Backend(200));

    for (threads, bar, goal) in [(1usize, 50.0, 15.0), (2, 150.0, 50.0)] {
        let cmp = interleave(
            ROUNDS,
            1,
            |_| ns_per_op(&noop, threads, unit),
            |_| ns_per_op(&closed, threads, unit),
        );
        let mut row = Row::delta(
            &format!("B1-t{threads}"),
            &format!("breaker closed (coarse clock) vs no-op, {threads} thread(s)"),
            "ns_added",
            &cmp,
            bar,
            goal,
        );
        if threads == 1 {
            let (a, _) = allocs_per_op(&noop, unit);
            let (k, _) = allocs_per_op(&closed, unit);
            row.what.push_str(&format!(", allocs/op +{:.2}", k - a));
        }
        report.push(row);
        let cmp = interleave(
            ROUNDS,
            1,
            |_| ns_per_op(&noop, threads, unit),
            |_| ns_per_op(&closed_precise, threads, unit),
        );
        report.push(Row::delta(
            &format!("B1-precise-t{threads}"),
            &format!("breaker closed (precise clock) vs no-op, {threads} thread(s)"),
            "ns_added",
            &cmp,
            bar,
            goal,
        ));
    }

    // B2: an open breaker refusing calls.
    let open_breaker = Breaker::with_clock(breaker_config(), clock.clone())?;
    let mut tripper = CircuitBreakerLayer::new(open_breaker.clone()).layer(Backend(503));
    for _ in 0..10 {
        drive(&mut tripper, ());
    }
    if open_breaker.state() != keel::breaker::breaker::State::Open {
        return Err("B2 set-up: breaker did not open".into());
    }
    let open = CircuitBreakerLayer::new(open_breaker).layer(Backend(200));
    let b1 = report
        .results
        .iter()
        .find(|r| r.id == "B1-t1")
        .map_or(f64::NAN, |r| r.value);
    let cmp = interleave(
        ROUNDS,
        1,
        |_| ns_per_op(&noop, 1, unit),
        |_| ns_per_op(&open, 1, unit),
    );
    let mut row = Row::absolute(
        "B2",
        "breaker open: fast rejection (incl. boxing the error), 1 thread",
        "ns_per_op",
        cmp.median_b(),
        b1 + cmp.median_a() + 20.0,
        b1 + cmp.median_a() + 20.0,
    );
    row.raw = cmp.median_a();
    row.spread = spread_of(&cmp.b);
    let (rej_allocs, _) = allocs_per_op(&open, unit);
    row.what.push_str(&format!(", allocs/op {rej_allocs:.2}"));
    report.push(row);

    // B3: retry, first attempt succeeds; an empty in-memory body (buffered for replay).
    let budget = RetryBudget::with_clock(Duration::from_secs(10), 10, 0.2, clock.clone());
    let retry = RetryLayer::new(RetryPolicy::new(std::sync::Arc::new(budget))).layer(Backend(200));
    let body = String::new;
    let cmp = interleave(
        ROUNDS,
        1,
        |_| ns_per_op(&noop, 1, body),
        |_| ns_per_op(&retry, 1, body),
    );
    let mut row = Row::delta(
        "B3",
        "retry (coarse clock), first attempt succeeds, vs no-op, 1 thread",
        "ns_added",
        &cmp,
        100.0,
        30.0,
    );
    let (a, ab) = allocs_per_op(&noop, body);
    let (k, kb) = allocs_per_op(&retry, body);
    row.what
        .push_str(&format!(", allocs/op +{:.2} ({:+.0} B)", k - a, kb - ab));
    report.push(row);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ticker.join();
    // Prints the table and the path of the JSON written.
    report.finish()?;
    Ok(())
}

fn spread_of(values: &[f64]) -> f64 {
    keel_benches::spread(values)
}
