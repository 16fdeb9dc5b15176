#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TLS with a test CA: an instance registered in ZooKeeper with a Spring `sslPort` is called
//! over TLS, for gRPC and REST; a client that does not trust the CA cannot call it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use keel_client::{GrpcChannel, RestClient, TlsConfig};
use keel_registry::Registry;
use keel_testkit::echo::{
    EchoReply, EchoRequest, EchoService, echo_client::EchoClient, echo_server,
};
use serde_json::Value;

use common::{RestProvider, ZkRoot, instance, test_pki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_a_test_ca() {
    let (ca, cert, key) = test_pki();
    let (addr, server) = grpc_tls_server(&cert, &key).await;

    // Registered in the real ZooKeeper in the Spring layout: a TLS instance is written with
    // `port: null` and `sslPort`, so the call below reaches it only if discovery reads `sslPort`
    // as "TLS on this port".
    let root = ZkRoot::new().await;
    let registry = root.registry().await;
    let _reg = registry
        .register(instance("secure", "tls-1", addr).with_tls(true))
        .await
        .unwrap();
    let channel = GrpcChannel::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    let reply = echo(channel).await.unwrap();
    assert_eq!(reply.server_id, "tls-1");

    let (other_ca, _, _) = test_pki();
    let untrusting = GrpcChannel::builder("secure")
        .max_attempts(1)
        .tls(TlsConfig::with_ca_pem(other_ca.as_bytes()))
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    let status = echo(untrusting).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    server.abort();
}

/// The time a call spends dialling (here a TLS handshake held up 400 ms) is not propagated: the
/// provider sees the deadline the call has left when it is sent, not the one stamped before the
/// dial (a propagated deadline must never overstate the time left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_spent_dialling_is_taken_off_the_propagated_deadline() {
    let (ca, cert, key) = test_pki();
    let (addr, server) = grpc_tls_server(&cert, &key).await;
    let (proxy_addr, proxying) = slow_proxy(addr, Duration::from_millis(400)).await;
    let channel = GrpcChannel::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .timeout(Duration::from_secs(1))
        .endpoints([format!("https://{proxy_addr}")])
        .unwrap();
    let reply = echo(channel).await.unwrap();
    let left = keel_breaker::deadline::parse_grpc_timeout(&reply.metadata["grpc-timeout"]).unwrap();
    assert!(left <= Duration::from_millis(600), "{left:?}");
    proxying.abort();
    server.abort();

    // REST likewise (`x-keel-deadline`, milliseconds left).
    let p = RestProvider::start_tls("r-tls", Some(tls_acceptor(&cert, &key))).await;
    let (proxy_addr, proxying) = slow_proxy(p.addr, Duration::from_millis(400)).await;
    let client = RestClient::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .timeout(Duration::from_secs(1))
        .endpoints([format!("https://{proxy_addr}")])
        .unwrap();
    let got: Value = client.get("/accounts/1").await.unwrap();
    let left: u64 = got["headers"]["x-keel-deadline"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left <= 600, "{got}");
    proxying.abort();
}

/// A provider whose TLS handshake never completes (it accepts, then hangs): a call whose
/// deadline passes while it waits for its connection sent nothing, and says so. gRPC answers
/// `UNAVAILABLE` (not executed: safe to send again even when not idempotent), not the
/// `DEADLINE_EXCEEDED` of a call that was in flight (an unknown outcome); REST answers 502, not
/// 504. Both still say the deadline passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_while_connecting_fails_not_sent() {
    let (ca, _, _) = test_pki();
    let (addr, server) = keel_testkit::silent_server().await.unwrap();
    let url = format!("https://{addr}");
    let channel = GrpcChannel::builder("stuck")
        .max_attempts(1)
        .timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_secs(30))
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .endpoints([url.clone()])
        .unwrap();
    let status = echo(channel).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let error = keel_client::Error::from_status(&status).unwrap();
    assert!(error.is_deadline_exceeded(), "{error:?}");

    let client = RestClient::builder("stuck")
        .max_attempts(1)
        .timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_secs(30))
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .endpoints([url])
        .unwrap();
    let error = client.get::<Value>("/accounts/1").await.unwrap_err();
    assert!(error.is_deadline_exceeded(), "{error:?}");
    assert_eq!(
        error.http_status(),
        http::StatusCode::BAD_GATEWAY,
        "{error:?}"
    );
    server.abort();
}

/// A call waiting for a connection to an instance that then leaves discovery fails at once (not
/// sent), rather than waiting for the dial to time out: no call waits on a removed instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::async_yields_async,
    reason = "each closure builds a client and starts its call: it returns the call's task, awaited once the instance is gone"
)]
async fn a_call_dialling_a_removed_instance_fails_at_once() {
    let (ca, _, _) = test_pki();
    let (silent, server) = keel_testkit::silent_server().await.unwrap();
    let (proxy, accepted, _open) = common::tracking_proxy(silent).await;
    let registry = keel_registry::StaticRegistry::new();
    let tls = || TlsConfig::with_ca_pem(ca.as_bytes());
    let status = removed_while_dialling(&registry, "stuck", proxy, &accepted, async || {
        let channel = GrpcChannel::builder("stuck")
            .max_attempts(1)
            .connect_timeout(Duration::from_secs(30))
            .tls(tls())
            .connect(&registry, Duration::from_secs(5))
            .await
            .unwrap();
        tokio::spawn(echo(channel))
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    let error = removed_while_dialling(&registry, "stuck-rest", proxy, &accepted, async || {
        let client = RestClient::builder("stuck-rest")
            .max_attempts(1)
            .connect_timeout(Duration::from_secs(30))
            .tls(tls())
            .connect(&registry, Duration::from_secs(5))
            .await
            .unwrap();
        tokio::spawn(async move { client.get::<Value>("/accounts/1").await })
    })
    .await
    .unwrap_err();
    assert_eq!(
        error.http_status(),
        http::StatusCode::BAD_GATEWAY,
        "{error:?}"
    );
    server.abort();
}

/// Registers a TLS instance of `service` at `proxy` (which counts its connections in
/// `accepted`), starts the call `start` makes, deregisters the instance once the call is
/// dialling it, and returns the call's outcome, which must come long before its 30 s dial ends.
async fn removed_while_dialling<T>(
    registry: &keel_registry::StaticRegistry,
    service: &str,
    proxy: std::net::SocketAddr,
    accepted: &std::sync::atomic::AtomicU64,
    start: impl AsyncFnOnce() -> tokio::task::JoinHandle<T>,
) -> T {
    use std::sync::atomic::Ordering::SeqCst;
    let reg = registry
        .register(instance(service, service, proxy).with_tls(true))
        .await
        .unwrap();
    let before = accepted.load(SeqCst);
    let call = start().await;
    keel_testkit::eventually("the call is dialling", Duration::from_secs(10), || async {
        (accepted.load(SeqCst) > before).then_some(())
    })
    .await
    .unwrap();
    reg.deregister().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends when its instance leaves, not after the 30 s dial")
        .unwrap()
}

/// The echo service (`tls-1`) over TLS with `cert` and `key`, on loopback: its address and task.
async fn grpc_tls_server(
    cert: &str,
    key: &str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key)),
        )
        .unwrap()
        .add_service(echo_server::EchoServer::new(EchoService::new("tls-1")))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let task = tokio::spawn(async move {
        let _ = server.await;
    });
    (addr, task)
}

/// A proxy to `target` that holds each new connection `hold` before passing its bytes on.
async fn slow_proxy(
    target: std::net::SocketAddr,
    hold: Duration,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = proxy.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, task)
}

/// One echo call through `channel`.
async fn echo(channel: GrpcChannel) -> Result<EchoReply, tonic::Status> {
    EchoClient::new(channel)
        .echo(EchoRequest {
            message: "s".into(),
            payload: Vec::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A TLS acceptor serving the PEM certificate `cert` with private key `key`.
fn tls_acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_over_tls_with_a_test_ca() {
    let (ca, cert, key) = test_pki();
    let p = RestProvider::start_tls("r-tls", Some(tls_acceptor(&cert, &key))).await;
    let url = format!("https://127.0.0.1:{}", p.addr.port());
    let client = RestClient::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .endpoints([&url])
        .unwrap();
    let v: Value = client.get("/accounts/1").await.unwrap();
    assert_eq!(v["server"], "r-tls");

    let (other_ca, _, _) = test_pki();
    let untrusting = RestClient::builder("secure")
        .max_attempts(1)
        .tls(TlsConfig::with_ca_pem(other_ca.as_bytes()))
        .endpoints([&url])
        .unwrap();
    let err = untrusting.get::<Value>("/accounts/1").await.unwrap_err();
    assert!(!err.is_status(), "{err:?}");
}

/// A client without a TLS configuration does not take on a discovered instance that serves TLS
/// (a Spring `sslPort` node, in the real ZooKeeper): every dial to it would fail its
/// handshake. Its calls all go to the plain instance; the TLS one is not an endpoint. For REST
/// as for gRPC, and an `https` URL given to such a client is a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_tls_skips_discovered_tls_instances() {
    let (_ca, cert, key) = test_pki();
    let secure = RestProvider::start_tls("r-tls", Some(tls_acceptor(&cert, &key))).await;
    let plain = RestProvider::start("r-plain").await;
    let root = ZkRoot::new().await;
    let registry = root.registry().await;
    let _regs = [
        registry
            .register(instance("mixed", "r-tls", secure.addr).with_tls(true))
            .await
            .unwrap(),
        registry
            .register(instance("mixed", "r-plain", plain.addr))
            .await
            .unwrap(),
    ];
    let client = RestClient::builder("mixed")
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    let ids: Vec<String> = client.endpoints().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["r-plain"]);
    for _ in 0..10 {
        let v: Value = client.get("/accounts/1").await.unwrap();
        assert_eq!(v["server"], "r-plain");
    }

    let (ps, _faults) = common::providers(1).await;
    let _grpc_reg = registry
        .register(instance("mixed-grpc", "g-tls", secure.addr).with_tls(true))
        .await
        .unwrap();
    let _grpc_plain = registry
        .register(instance("mixed-grpc", "g-plain", ps[0].addr()))
        .await
        .unwrap();
    let channel = GrpcChannel::builder("mixed-grpc")
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    let ids: Vec<String> = channel.endpoints().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["g-plain"]);
    echo(channel).await.unwrap();

    let https = format!("https://{}", secure.addr);
    let err = RestClient::builder("mixed")
        .endpoints([&https])
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    let err = GrpcChannel::builder("mixed")
        .endpoints([&https])
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

/// `TlsConfig::system_roots()` trusts the platform's CA store. The test runs itself as a child
/// process whose store is the test CA (`SSL_CERT_FILE`, which the platform loader honours): a
/// client with the system roots calls the TLS server, gRPC and REST. Here, with the machine's
/// own store (which does not hold the test CA), the same client cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_roots_trust_the_platform_store() {
    const NAME: &str = "system_roots_trust_the_platform_store";
    let child = std::env::var_os("KEEL_TEST_CHILD").is_some();
    let (ca, cert, key) = if child {
        let dir = std::env::var("KEEL_TEST_PKI").unwrap();
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
        (read("ca.pem"), read("cert.pem"), read("key.pem"))
    } else {
        test_pki()
    };
    let p = RestProvider::start_tls("r-tls", Some(tls_acceptor(&cert, &key))).await;
    let rest = |tls| {
        RestClient::builder("public")
            .max_attempts(1)
            .tls(tls)
            .endpoints([format!("https://127.0.0.1:{}", p.addr.port())])
    };
    let (grpc_addr, server) = grpc_tls_server(&cert, &key).await;
    let grpc = || {
        GrpcChannel::builder("public")
            .max_attempts(1)
            .tls(TlsConfig::system_roots())
            .endpoints([format!("https://{grpc_addr}")])
    };
    if child {
        let v: Value = rest(TlsConfig::system_roots())
            .unwrap()
            .get("/accounts/1")
            .await
            .unwrap();
        assert_eq!(v["server"], "r-tls");
        assert_eq!(echo(grpc().unwrap()).await.unwrap().server_id, "tls-1");
        // A custom CA and the system roots together: either signer is trusted.
        let (other_ca, _, _) = test_pki();
        let both = TlsConfig::with_ca_pem(other_ca.as_bytes()).and_system_roots();
        let v: Value = rest(both).unwrap().get("/accounts/1").await.unwrap();
        assert_eq!(v["server"], "r-tls");
        server.abort();
        return;
    }
    // The machine's store (if it loads at all) does not hold the test CA.
    if let Ok(client) = rest(TlsConfig::system_roots()) {
        assert!(client.get::<Value>("/accounts/1").await.is_err());
    }
    if let Ok(channel) = grpc() {
        assert!(echo(channel).await.is_err());
    }
    server.abort();

    let dir = std::env::temp_dir().join(keel_testkit::unique("keel-pki"));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, pem) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
        std::fs::write(dir.join(file), pem).unwrap();
    }
    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture"])
        .env("KEEL_TEST_CHILD", "1")
        .env("KEEL_TEST_PKI", &dir)
        .env("SSL_CERT_FILE", dir.join("ca.pem"))
        .status()
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        status.success(),
        "the child, trusting the test CA as its store: {status}"
    );
}

/// The server certificate names only `account.internal`; the client calls `127.0.0.1` and
/// verifies (and sends SNI) for the name given with `TlsConfig::domain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_over_tls_with_a_domain_override() {
    let (ca, cert, key) = common::test_pki_for(&["account.internal"]);
    let p = RestProvider::start_tls("r-tls-domain", Some(tls_acceptor(&cert, &key))).await;
    let url = format!("https://127.0.0.1:{}", p.addr.port());

    // Without the override the certificate does not match the host.
    let plain = RestClient::builder("secure")
        .max_attempts(1)
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .endpoints([&url])
        .unwrap();
    let err = plain.get::<Value>("/accounts/1").await.unwrap_err();
    assert!(!err.is_status(), "{err:?}");

    let client = RestClient::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()).domain("account.internal"))
        .endpoints([&url])
        .unwrap();
    let v: Value = client.get("/accounts/1").await.unwrap();
    assert_eq!(v["server"], "r-tls-domain");

    // The override is what is verified: a wrong one fails.
    let wrong = RestClient::builder("secure")
        .max_attempts(1)
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()).domain("billing.internal"))
        .endpoints([&url])
        .unwrap();
    let err = wrong.get::<Value>("/accounts/1").await.unwrap_err();
    assert!(!err.is_status(), "{err:?}");

    // An override that is no server name is a configuration error.
    let err = RestClient::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()).domain("not a name"))
        .endpoints([&url])
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
}
