//! The balancer service: picks an admitting endpoint per call and calls it through that
//! endpoint's circuit breaker.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use keel_breaker::BoxError;
use keel_breaker::breaker::{self, CircuitBreaker, State};
use keel_breaker::classify::DefaultClassifier;
use keel_breaker::retry::ReplayBody;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::balance::{EndpointState, HashKey, Set, Snapshot};
use crate::error::Error;

/// How long an endpoint whose breaker refused a call is skipped before it is asked again.
const RECHECK: Duration = Duration::from_millis(20);

/// Per-call state shared by every attempt of one call (a request extension).
#[derive(Debug, Clone, Default)]
pub(crate) struct Memo(pub(crate) Arc<MemoInner>);

#[derive(Debug, Default)]
pub(crate) struct MemoInner {
    pub(crate) attempts: AtomicU32,
    pub(crate) last_uid: AtomicU64,
}

/// Counts a call in flight on an endpoint until dropped.
pub(crate) struct LoadGuard<C>(Arc<EndpointState<C>>);

impl<C> Drop for LoadGuard<C> {
    fn drop(&mut self) {
        self.0.load.finish();
    }
}

/// Spreads calls over the endpoints of a [`Set`]; cheap to clone.
pub(crate) struct Balancer<C, B, W> {
    set: Arc<Set<C>>,
    cache: Option<(u64, Arc<Snapshot<C>>)>,
    wire: fn(ReplayBody<B>) -> W,
    _body: PhantomData<fn(B) -> W>,
}

impl<C, B, W> Clone for Balancer<C, B, W> {
    fn clone(&self) -> Self {
        Self {
            set: Arc::clone(&self.set),
            cache: self.cache.clone(),
            wire: self.wire,
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
        #[pin]
        phase: Phase<C, B, W>,
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
        ResponseFuture {
            set: Arc::clone(&self.set),
            snap,
            wire: self.wire,
            phase: Phase::Pick { req: Some(req) },
        }
    }
}

pub(crate) enum Admit<C> {
    Ready(CircuitBreaker<C, DefaultClassifier>),
    Busy(CircuitBreaker<C, DefaultClassifier>),
    No,
}

pub(crate) fn admit<C, W, ResB>(
    set: &Set<C>,
    ep: &EndpointState<C>,
    cx: &mut Context<'_>,
) -> Admit<C>
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
    let mut cb = ep.gate.layer(ep.conn.clone());
    match cb.poll_ready(cx) {
        Poll::Ready(Ok(())) => {
            if skip != 0 {
                ep.skip_until_ns.store(0, Ordering::Relaxed);
            }
            Admit::Ready(cb)
        }
        Poll::Ready(Err(error)) => {
            tracing::debug!(%error, endpoint = %ep.instance.endpoint, "endpoint not ready");
            ep.skip_until_ns
                .store(set.now_ns() + RECHECK.as_nanos() as u64, Ordering::Relaxed);
            Admit::No
        }
        Poll::Pending if ep.breaker.state() != State::Closed => {
            ep.skip_until_ns
                .store(set.now_ns() + RECHECK.as_nanos() as u64, Ordering::Relaxed);
            Admit::No
        }
        Poll::Pending => Admit::Busy(cb),
    }
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
            let (fut, ep) = match this.phase.as_mut().project() {
                StateProj::Called {
                    fut,
                    guard,
                    start_ns,
                } => {
                    let result = ready!(fut.poll(cx));
                    let now = set.now_ns();
                    guard.0.load.observe(
                        Duration::from_nanos(now.saturating_sub(*start_ns)),
                        now,
                        set.decay_ns(),
                    );
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
                    let ep = Arc::clone(ep);
                    (dispatch(cb, &ep, req, *this.wire), ep)
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
                    let avoid = request
                        .extensions()
                        .get::<Memo>()
                        .map_or(0, |m| m.0.last_uid.load(Ordering::Relaxed));
                    let mut busy = None;
                    let mut chosen = None;
                    for i in set.candidates(snap, key, avoid) {
                        match admit(set, &snap.endpoints[i], cx) {
                            Admit::Ready(cb) => {
                                chosen = Some((cb, i));
                                break;
                            }
                            Admit::Busy(cb) => {
                                if busy.is_none() {
                                    busy = Some((cb, i));
                                }
                            }
                            Admit::No => {}
                        }
                    }
                    match (chosen, busy) {
                        (Some((mut cb, i)), _) => {
                            let ep = Arc::clone(&snap.endpoints[i]);
                            (dispatch(&mut cb, &ep, request, *this.wire), ep)
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
            let start_ns = set.now_ns();
            let guard = LoadGuard(ep);
            this.phase.set(Phase::Called {
                fut,
                guard,
                start_ns,
            });
        }
    }
}

fn dispatch<C, B, W, ResB>(
    cb: &mut CircuitBreaker<C, DefaultClassifier>,
    ep: &EndpointState<C>,
    req: http::Request<ReplayBody<B>>,
    wire: fn(ReplayBody<B>) -> W,
) -> Called<C, W>
where
    C: Service<http::Request<W>, Response = http::Response<ResB>> + Clone,
    C::Error: Into<BoxError>,
{
    if let Some(memo) = req.extensions().get::<Memo>() {
        memo.0.attempts.fetch_add(1, Ordering::Relaxed);
        memo.0.last_uid.store(ep.uid, Ordering::Relaxed);
    }
    ep.calls.fetch_add(1, Ordering::Relaxed);
    ep.load.start();
    cb.call(req.map(wire))
}
