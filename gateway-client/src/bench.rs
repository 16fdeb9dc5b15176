//! Hooks for Keel's benchmarks (`scripts/bench client`, B6); not part of the API and not
//! covered by semver.
//!
//! [`pick_bench`] builds an endpoint set of `n` instances behind a connection that does nothing,
//! and returns a [`Picker`] that runs exactly the balancer's per-call choice (load the current
//! snapshot, take the first candidate, ask its breaker to admit the call) and a [`Churner`]
//! that replaces one instance per step through the same path discovery uses.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use keel_core::{Endpoint, ServiceInstance};
use keel_registry::Change;
use tower_service::Service;

use crate::balance::{BalanceConfig, Set, Snapshot};
use crate::discovery::{Factory, Members};
use crate::lb::{Admit, admit};

/// A connection that answers at once (never called by [`Picker::pick`]).
#[derive(Debug, Clone, Copy)]
pub struct NoConn;

impl Service<http::Request<()>> for NoConn {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<()>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<()>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(())))
    }
}

impl crate::discovery::Retire for NoConn {
    fn retire(&self) {}
}

/// Picks endpoints as the balancer does; one per thread (clones share the set).
#[derive(Clone)]
pub struct Picker {
    set: Arc<Set<NoConn>>,
    cache: Option<(u64, Arc<Snapshot<NoConn>>)>,
}

impl fmt::Debug for Picker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picker").finish_non_exhaustive()
    }
}

impl Picker {
    /// One pick with the default balancer (p2c over peak-EWMA): the index of the admitted
    /// endpoint, if any.
    pub fn pick(&mut self) -> Option<usize> {
        let snap = self.set.load(&mut self.cache);
        let mut cx = Context::from_waker(Waker::noop());
        for i in self.set.candidates(&snap, None, 0) {
            if let Admit::Yes(admitted) =
                admit::<NoConn, (), ()>(&self.set, &snap.endpoints[i], &mut cx)
            {
                drop(admitted);
                return Some(i);
            }
        }
        None
    }
}

/// Changes the membership of a [`pick_bench`] set.
pub struct Churner {
    members: Members<NoConn>,
    n: usize,
    next: usize,
}

impl fmt::Debug for Churner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Churner")
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl Churner {
    /// Removes the oldest instance, adds a new one and publishes the new set.
    pub fn step(&mut self) {
        let old = self.next - self.n;
        self.members.apply(Change::Remove(instance(old)));
        self.members.apply(Change::Add(instance(self.next)));
        self.next += 1;
        self.members.publish();
    }
}

fn instance(k: usize) -> ServiceInstance {
    let port = 1024 + (k % 60_000) as u16;
    ServiceInstance::new("bench", format!("i-{k}"), Endpoint::new("127.0.0.1", port))
}

/// A set of `n` endpoints with the default balancer and breaker.
pub fn pick_bench(n: usize) -> (Picker, Churner) {
    let set = Arc::new(Set::new(BalanceConfig::default()));
    let factory = Factory {
        connect: Arc::new(|_: &ServiceInstance| Ok(NoConn)),
        breaker: crate::options::default_endpoint_breaker(),
    };
    let mut members = Members::new(Arc::clone(&set), factory);
    members.apply(Change::Reset((0..n).map(instance).collect()));
    members.publish();
    (
        Picker { set, cache: None },
        Churner {
            members,
            n,
            next: n,
        },
    )
}
