//! The balancer service: picks an admitting endpoint per call and calls it through that
//! endpoint's circuit breaker.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use keel_breaker::BoxError;
use keel_breaker::breaker::{self, Admission, CircuitBreaker, State};
use keel_breaker::classify::DefaultClassifier;
use keel_breaker::retry::ReplayBody;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::balance::{EndpointState, HashKey, Set, Snapshot};
use crate::error::Error;

/// How long an endpoint whose breaker refused a call is skipped before it is asked again.
pub(crate) const RECHECK: Duration = Duration::from_millis(20);

/// Counts a call in flight on an endpoint until dropped.
pub(crate) struct LoadGuard<C>(Arc<EndpointState<C>>);

impl<C> LoadGuard<C> {
    /// Feeds the time since `start_ns` (on `set`'s clock) into the endpoint's latency estimate.
    fn observe_since(&self, set: &Set<C>, start_ns: u64) {
        let now = set.now_ns();
        self.0.load.observe(
            Duration::from_nanos(now.saturating_sub(start_ns)),
            now,
            set.decay_ns(),
        );
    }
}

impl<C> Drop for LoadGuard<C> {
    fn drop(&mut self) {
        self.0.load.finish();
    }
}

/// Spreads calls over the endpoints of a [`Set`]; cheap to clone.
///
/// The retry layer makes every attempt of one call through the same instance (a clone made
/// for that call), so the instance remembers the endpoint of the previous attempt and a retry
/// avoids it. The endpoint is picked in [`call`](Service::call) when one admits the call at
/// once (the usual case, no allocation); otherwise the response future picks it when an
/// endpoint becomes ready and reports it through a shared slot made for that case.
pub(crate) struct Balancer<C, B, W> {
    set: Arc<Set<C>>,
    cache: Option<(u64, Arc<Snapshot<C>>)>,
    wire: fn(ReplayBody<B>) -> W,
    /// The endpoint of this instance's previous call (0: none).
    last_uid: u64,
    /// Where a response future that picked its endpoint itself records it.
    slot: Option<Arc<AtomicU64>>,
    _body: PhantomData<fn(B) -> W>,
}

impl<C, B, W> Clone for Balancer<C, B, W> {
    fn clone(&self) -> Self {
        Self {
            set: Arc::clone(&self.set),
            cache: self.cache.clone(),
            wire: self.wire,
            last_uid: 0,
            slot: None,
            _body: PhantomData,
        }
    }
}

impl<C, B, W> fmt::Debug for Balancer<C, B, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer").field("set", &self.set).finish()
    }
}

impl<C, B, W> Balancer<C, B, W> {
    pub(crate) fn new(set: Arc<Set<C>>, wire: fn(ReplayBody<B>) -> W) -> Self {
        Self {
            set,
            cache: None,
            wire,
            last_uid: 0,
            slot: None,
            _body: PhantomData,
        }
    }
}

type Called<C, W> =
    breaker::ResponseFuture<<C as Service<http::Request<W>>>::Future, DefaultClassifier>;

pin_project! {
    #[project = StateProj]
    enum Phase<C, B, W>
    where
        C: Service<http::Request<W>>,
    {
        Pick { req: Option<http::Request<ReplayBody<B>>> },
        Waiting { cb: CircuitBreaker<C, DefaultClassifier>, idx: usize, req: Option<http::Request<ReplayBody<B>>> },
        Called { #[pin] fut: Called<C, W>, guard: LoadGuard<C>, start_ns: u64 },
        Done,
    }
}

pin_project! {
    /// Response future of the balancer.
    pub(crate) struct ResponseFuture<C, B, W>
    where
        C: Service<http::Request<W>>,
    {
        set: Arc<Set<C>>,
        snap: Arc<Snapshot<C>>,
        wire: fn(ReplayBody<B>) -> W,
        // Set when this future picks the endpoint itself: the endpoint to avoid, and where to
        // record the one picked.
        avoid: Option<Arc<AtomicU64>>,
        // The call's deadline (from the retry layer's body): dropped in flight once it has
        // passed, the call counts against its endpoint.
        deadline: Option<Instant>,
        #[pin]
        phase: Phase<C, B, W>,
    }

    impl<C, B, W> PinnedDrop for ResponseFuture<C, B, W>
    where
        C: Service<http::Request<W>>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped while the endpoint still owes the answer, because the deadline passed
            // (the deadline layer above gives up then): the endpoint failed this call. Its
            // breaker records a failure — a provider that never answers is ejected like one
            // that fails, where a call the caller cancels counts for nothing — and its load
            // estimate takes the time waited.
            if let StateProj::Called { fut, guard, start_ns } = this.phase.project()
                && this.deadline.is_some_and(|d| Instant::now() >= d)
            {
                fut.fail_unfinished();
                guard.observe_since(this.set, *start_ns);
            }
        }
    }
}

impl<C, B, W> fmt::Debug for ResponseFuture<C, B, W>
where
    C: Service<http::Request<W>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<C, B, W, ResB> Service<http::Request<ReplayBody<B>>> for Balancer<C, B, W>
where
    C: Service<http::Request<W>, Response = http::Response<ResB>> + Clone,
    C::Error: Into<BoxError>,
{
    /// The breaker's body: it records a gRPC status that comes in the trailers.
    type Response = http::Response<breaker::ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<C, B, W>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is per endpoint: the call's future picks an admitting one.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<ReplayBody<B>>) -> Self::Future {
        let snap = self.set.load(&mut self.cache);
        let avoid = self
            .slot
            .as_ref()
            .map_or(self.last_uid, |s| s.load(Ordering::Relaxed));
        let deadline = req.body().deadline();
        // The usual case: an endpoint admits the call at once, and it is sent from here.
        if !snap.endpoints.is_empty() {
            let key = req.extensions().get::<HashKey>().copied();
            let mut cx = Context::from_waker(std::task::Waker::noop());
            for i in self.set.candidates(&snap, key, avoid) {
                let Admit::Yes(admitted) = admit(&self.set, &snap.endpoints[i], &mut cx) else {
                    continue;
                };
                let ep = Arc::clone(&snap.endpoints[i]);
                self.last_uid = ep.uid;
                let fut = admitted.call(req.map(self.wire));
                let phase = sent(fut, ep, &self.set, self.slot.as_deref());
                return ResponseFuture {
                    set: Arc::clone(&self.set),
                    snap,
                    wire: self.wire,
                    avoid: None,
                    deadline,
                    phase,
                };
            }
        }
        // None ready now (or none at all): the future waits for one (or fails) with the
        // caller's waker, and records what it picks in the slot.
        let slot = Arc::clone(
            self.slot
                .get_or_insert_with(|| Arc::new(AtomicU64::new(avoid))),
        );
        ResponseFuture {
            set: Arc::clone(&self.set),
            snap,
            wire: self.wire,
            avoid: Some(slot),
            deadline,
            phase: Phase::Pick { req: Some(req) },
        }
    }
}

/// Whether an endpoint takes a call now.
pub(crate) enum Admit<'a, C> {
    Yes(Admitted<'a, C>),
    /// Not yet: its breaker service is waiting.
    Busy(CircuitBreaker<C, DefaultClassifier>),
    No,
}

/// An endpoint that takes the call.
pub(crate) enum Admitted<'a, C> {
    /// Admitted by its breaker without a breaker service (see `try_admit`), the connection
    /// ready.
    Now(C, Admission<'a, DefaultClassifier>),
    /// Admitted through a breaker service polled ready.
    Ready(CircuitBreaker<C, DefaultClassifier>),
}

impl<C> Admitted<'_, C> {
    /// Calls the endpoint's connection; the future records the outcome with its breaker.
    fn call<W, ResB>(self, req: http::Request<W>) -> Called<C, W>
    where
        C: Service<http::Request<W>, Response = http::Response<ResB>>,
        C::Error: Into<BoxError>,
    {
        match self {
            Admitted::Now(mut conn, admission) => admission.call(&mut conn, req),
            Admitted::Ready(mut cb) => cb.call(req),
        }
    }
}

/// Whether `ep` takes a call now. The usual case — breaker closed, connection ready — asks the
/// breaker for a permit without building a breaker service (no reference counts touched);
/// otherwise a breaker service is polled (with `cx`), which counts a refusal, and an endpoint
/// that refuses is skipped for [`RECHECK`] (and loses every p2c comparison meanwhile).
pub(crate) fn admit<'a, C, W, ResB>(
    set: &Set<C>,
    ep: &'a EndpointState<C>,
    cx: &mut Context<'_>,
) -> Admit<'a, C>
where
    C: Service<http::Request<W>, Response = http::Response<ResB>> + Clone,
    C::Error: Into<BoxError>,
{
    if ep.removed.load(Ordering::Relaxed) {
        return Admit::No;
    }
    let skip = ep.skip_until_ns.load(Ordering::Relaxed);
    if skip != 0 && set.now_ns() < skip {
        return Admit::No;
    }
    let fast = ep.gate.try_admit().and_then(|admission| {
        let mut conn = ep.conn.clone();
        matches!(conn.poll_ready(cx), Poll::Ready(Ok(()))).then(|| Admitted::Now(conn, admission))
    });
    let admitted = match fast {
        Some(admitted) => admitted,
        None => {
            let mut cb = ep.gate.layer(ep.conn.clone());
            match cb.poll_ready(cx) {
                Poll::Ready(Ok(())) => Admitted::Ready(cb),
                Poll::Pending if ep.breaker.state() == State::Closed => return Admit::Busy(cb),
                refused => {
                    // Failed, or its breaker is not closed: skip it for a while.
                    if let Poll::Ready(Err(error)) = refused {
                        tracing::debug!(%error, endpoint = %ep.instance().endpoint, "endpoint not ready");
                    }
                    ep.skip_until_ns
                        .store(set.now_ns() + RECHECK.as_nanos() as u64, Ordering::Relaxed);
                    return Admit::No;
                }
            }
        }
    };
    if skip != 0 {
        ep.skip_until_ns.store(0, Ordering::Relaxed);
    }
    Admit::Yes(admitted)
}

impl<C, B, W, ResB> Future for ResponseFuture<C, B, W>
where
    C: Service<http::Request<W>, Response = http::Response<ResB>> + Clone,
    C::Error: Into<BoxError>,
{
    type Output = Result<http::Response<breaker::ResponseBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let set: &Set<C> = this.set;
        loop {
            let called = match this.phase.as_mut().project() {
                StateProj::Called {
                    fut,
                    guard,
                    start_ns,
                } => {
                    let mut result = ready!(fut.poll(cx));
                    guard.observe_since(set, *start_ns);
                    if let Ok(response) = &mut result {
                        // A body dropped unfinished past the deadline (a provider that stalls
                        // after its head) counts against the endpoint too.
                        response.body_mut().fail_unfinished_after(*this.deadline);
                    }
                    this.phase.set(Phase::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => return Poll::Ready(Err("polled after completion".into())),
                StateProj::Waiting { cb, idx, req } => {
                    let ep = &this.snap.endpoints[*idx];
                    if ep.removed.load(Ordering::Relaxed) {
                        let req = req.take();
                        this.phase.set(Phase::Pick { req });
                        continue;
                    }
                    match cb.poll_ready(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    let Some(req) = req.take() else {
                        return Poll::Ready(Err("request already sent".into()));
                    };
                    let fut = cb.call(req.map(*this.wire));
                    sent(fut, Arc::clone(ep), set, this.avoid.as_deref())
                }
                StateProj::Pick { req } => {
                    let Some(request) = req.take() else {
                        return Poll::Ready(Err("request already sent".into()));
                    };
                    let snap: &Snapshot<C> = this.snap;
                    if snap.endpoints.is_empty() {
                        return Poll::Ready(Err(Error::no_endpoints()));
                    }
                    let key = request.extensions().get::<HashKey>().copied();
                    let avoid = this.avoid.as_ref().map_or(0, |s| s.load(Ordering::Relaxed));
                    let mut busy = None;
                    let mut chosen = None;
                    for i in set.candidates(snap, key, avoid) {
                        match admit(set, &snap.endpoints[i], cx) {
                            Admit::Busy(cb) => {
                                if busy.is_none() {
                                    busy = Some((cb, i));
                                }
                            }
                            Admit::No => {}
                            Admit::Yes(admitted) => {
                                chosen = Some((admitted, i));
                                break;
                            }
                        }
                    }
                    match (chosen, busy) {
                        (Some((admitted, i)), _) => {
                            let fut = admitted.call(request.map(*this.wire));
                            sent(
                                fut,
                                Arc::clone(&snap.endpoints[i]),
                                set,
                                this.avoid.as_deref(),
                            )
                        }
                        (None, Some((cb, idx))) => {
                            this.phase.set(Phase::Waiting {
                                cb,
                                idx,
                                req: Some(request),
                            });
                            return Poll::Pending;
                        }
                        (None, None) => return Poll::Ready(Err(Error::all_ejected())),
                    }
                }
            };
            this.phase.set(called);
        }
    }
}

/// The phase awaiting `fut`, a call just sent to `ep`: counts it on the endpoint and records
/// the endpoint in `record` (where the call's next attempt looks for the endpoint to avoid).
fn sent<C, B, W>(
    fut: Called<C, W>,
    ep: Arc<EndpointState<C>>,
    set: &Set<C>,
    record: Option<&AtomicU64>,
) -> Phase<C, B, W>
where
    C: Service<http::Request<W>>,
{
    if let Some(record) = record {
        record.store(ep.uid, Ordering::Relaxed);
    }
    ep.calls.fetch_add(1, Ordering::Relaxed);
    ep.load.start();
    Phase::Called {
        fut,
        start_ns: set.now_ns(),
        guard: LoadGuard(ep),
    }
}
