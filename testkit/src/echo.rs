//! The `keel.echo.v1.Echo` service and a provider that serves it on `127.0.0.1:0`.

use std::net::SocketAddr;

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
}

impl EchoService {
    /// A service that answers as `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into() }
    }
}

#[tonic::async_trait]
impl echo_server::Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
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
