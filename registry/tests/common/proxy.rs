//! A fault-injecting TCP proxy in front of one ZooKeeper member, on loopback only.
//!
//! It forwards whole ZooKeeper frames (a 4-byte big-endian length, then the body). A silenced
//! connection stays open and reads and discards what it gets: a silent partition, not a reset,
//! so the client has to notice by its own timeouts, as on a real network. A connection that lost
//! a frame is closed as soon as the proxy passes again (its stream would be out of step), so
//! the client reconnects through a clean one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with the frames it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward everything, each frame held for this long first (a slow link: a request and
    /// its reply take twice as long more).
    Delay(Duration),
    /// Forward nothing, keep every socket open.
    Blackhole,
    /// The first connection that asks for a *new* session (a ConnectRequest with session id 0)
    /// after the switch forwards two frames each way (the client's ConnectRequest and first
    /// ping, the server's ConnectResponse and ping reply: a session is established), then
    /// nothing; every other connection forwards nothing. Decided by the request, not when the
    /// connection was accepted: a connection accepted just before the switch, or one trying to
    /// resume the old session, cannot take (or waste) the one handshake.
    OneHandshakeThenBlackhole,
}

impl Mode {
    /// Whether every frame gets through (eventually).
    fn forwards(self) -> bool {
        matches!(self, Mode::Pass | Mode::Delay(_))
    }
}

/// Frames larger than this end the connection (ZooKeeper's own `jute.maxbuffer` is ~1 MiB).
const MAX_FRAME: usize = 16 << 20;

/// The proxy; dropping it closes its listener and every connection.
pub struct ZkProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    handshake_granted: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl ZkProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`, which must be a loopback address.
    pub async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream.parse().expect("upstream is ip:port");
        assert!(
            upstream.ip().is_loopback(),
            "the proxy only talks to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (mode, rx) = watch::channel(Mode::Pass);
        let handshake_granted = Arc::new(AtomicBool::new(false));
        let granted = handshake_granted.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, rx.clone(), granted.clone()));
            }
        });
        Self {
            addr,
            mode,
            handshake_granted,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode, for live connections too.
    pub fn set(&self, mode: Mode) {
        if mode == Mode::OneHandshakeThenBlackhole {
            self.handshake_granted.store(false, Ordering::SeqCst);
        }
        self.mode.send_replace(mode);
    }
}

impl Drop for ZkProxy {
    fn drop(&mut self) {
        // Connections end when they see the mode sender gone.
        self.accept.abort();
    }
}

/// Which connection holds the one handshake of [`Mode::OneHandshakeThenBlackhole`]: the proxy's
/// (taken at most once per switch) and this connection's.
#[derive(Clone)]
struct Grant {
    proxy: Arc<AtomicBool>,
    here: Arc<AtomicBool>,
}

impl Grant {
    /// Takes the proxy's handshake for this connection if `request` (its first frame from the
    /// client) asks for a new session and nobody took it yet.
    fn take_for(&self, request: &[u8]) -> bool {
        // ConnectRequest: protocolVersion i32, lastZxidSeen i64, timeOut i32, sessionId i64, …
        let new_session = request
            .get(16..24)
            .is_some_and(|id| id.iter().all(|b| *b == 0));
        if new_session && !self.proxy.swap(true, Ordering::SeqCst) {
            self.here.store(true, Ordering::SeqCst);
        }
        self.here.load(Ordering::SeqCst)
    }

    fn held(&self) -> bool {
        self.here.load(Ordering::SeqCst)
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    granted: Arc<AtomicBool>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let lossy = Arc::new(AtomicBool::new(false));
    let grant = Grant {
        proxy: granted,
        here: Arc::new(AtomicBool::new(false)),
    };
    let up = pump(
        client_read,
        server_write,
        mode.clone(),
        Some(grant.clone()),
        grant.clone(),
        lossy.clone(),
    );
    let down = pump(
        server_read,
        client_write,
        mode.clone(),
        None,
        grant,
        lossy.clone(),
    );
    let healed = async {
        while mode.changed().await.is_ok() {
            if mode.borrow().forwards() && lossy.load(Ordering::SeqCst) {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        () = healed => {}
    }
}

/// Forwards frames `from` → `to` as the mode says. `asks` is the grant on the client's side
/// (whose first frame may take the handshake); `grant` is read on both sides.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
    asks: Option<Grant>,
    grant: Grant,
    lossy: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut first = true;
    let mut forwarded = 0usize;
    loop {
        let mut len = [0u8; 4];
        from.read_exact(&mut len).await?;
        let size = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if size > MAX_FRAME {
            return Err(std::io::Error::other("frame too large"));
        }
        let mut body = vec![0u8; size];
        from.read_exact(&mut body).await?;
        let current = *mode.borrow();
        let forward = match current {
            Mode::Pass | Mode::Delay(_) => !lossy.load(Ordering::SeqCst),
            Mode::Blackhole => false,
            Mode::OneHandshakeThenBlackhole => {
                let held = match &asks {
                    Some(asks) if first => asks.take_for(&body),
                    _ => grant.held(),
                };
                held && forwarded < 2
            }
        };
        first = false;
        if forward {
            if let Mode::Delay(delay) = current {
                tokio::time::sleep(delay).await;
            }
            to.write_all(&len).await?;
            to.write_all(&body).await?;
            forwarded += 1;
        } else {
            lossy.store(true, Ordering::SeqCst);
        }
    }
}
