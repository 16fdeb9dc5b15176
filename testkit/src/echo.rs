//! The `keel.echo.v1.Echo` service and a provider that serves it on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod generated {
    tonic::include_proto!("keel.echo.v1");
}

pub use generated::echo_client;
pub use generated::echo_server;
pub use generated::{EchoReply, EchoRequest};

/// The echo service: replies with the message, its own id and the metadata it received.
#[derive(Debug, Clone)]
pub struct EchoService {
    id: String,
    faults: Faults,
}

impl EchoService {
    /// A service that answers as `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self::with_faults(id, Faults::default())
    }

    /// A service that answers as `id` and injects `faults`.
    pub fn with_faults(id: impl Into<String>, faults: Faults) -> Self {
        Self {
            id: id.into(),
            faults,
        }
    }
}

/// Failures an echo service injects; shared, and changeable while it serves.
///
/// Every call is counted ([`calls`](Self::calls)); with [`fail_every`](Self::fail_every)`(n,
/// code)` every n-th call fails with `code` (n = 2: half of the calls).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    inner: Arc<FaultsInner>,
}

#[derive(Debug, Default)]
struct FaultsInner {
    every: AtomicU32,
    code: AtomicI32,
    calls: AtomicU64,
    failed: AtomicU64,
}

impl Faults {
    /// Fail every `n`-th call with `code` (`n = 1`: every call; `n = 0`: none).
    pub fn fail_every(&self, n: u32, code: tonic::Code) {
        self.inner.code.store(code as i32, Ordering::Relaxed);
        self.inner.every.store(n, Ordering::Relaxed);
    }

    /// Stop failing.
    pub fn heal(&self) {
        self.inner.every.store(0, Ordering::Relaxed);
    }

    /// Calls received so far.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// Calls failed on purpose so far.
    pub fn failed(&self) -> u64 {
        self.inner.failed.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<(), Status> {
        let n = self.inner.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let every = u64::from(self.inner.every.load(Ordering::Relaxed));
        if every != 0 && n.is_multiple_of(every) {
            self.inner.failed.fetch_add(1, Ordering::Relaxed);
            let code = tonic::Code::from_i32(self.inner.code.load(Ordering::Relaxed));
            return Err(Status::new(code, "injected failure"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl echo_server::Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.faults.check()?;
        let metadata = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let request = request.into_inner();
        Ok(Response::new(EchoReply {
            message: request.message,
            payload: request.payload,
            server_id: self.id.clone(),
            metadata,
        }))
    }
}

/// An echo provider serving on an ephemeral loopback port until stopped or dropped.
#[derive(Debug)]
pub struct EchoProvider {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl EchoProvider {
    /// Binds `127.0.0.1:0` and serves [`EchoService`] as `id` on a spawned task.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(id: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let service = echo_server::EchoServer::new(EchoService::new(id));
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                }),
        );
        Ok(Self {
            addr,
            shutdown: Some(tx),
            task,
        })
    }

    /// Binds `127.0.0.1:0` and serves [`EchoService`] as `id` with `faults`, tracking every
    /// connection so that [`kill`](Self::kill) (and [`stop`](Self::stop), and dropping) closes
    /// them all at once, as the death of the process would.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start_with(id: &str, faults: Faults) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::serve_on(listener, id, faults))
    }

    /// Like [`start_with`](Self::start_with) on a listener the caller bound (e.g. to restart a
    /// provider on the port of a killed one).
    pub fn serve_on(listener: TcpListener, id: &str, faults: Faults) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (tx, mut rx) = oneshot::channel::<()>();
        let routes = tonic::service::Routes::new(echo_server::EchoServer::new(
            EchoService::with_faults(id, faults),
        ));
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it aborts every connection task too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let service = hyper_util::service::TowerToHyperService::new(routes.clone());
                        connections.spawn(async move {
                            let builder = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            let _ = builder
                                .http2_only()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            Ok(())
        });
        Self {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes in-flight calls and waits for the server to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Stops abruptly: the listener and every connection are dropped at once, as if the
    /// process had been killed.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for EchoProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}
