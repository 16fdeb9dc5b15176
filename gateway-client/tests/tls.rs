#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TLS with a test CA: a registry instance marked TLS (a Spring `sslPort`) is called over TLS,
//! for gRPC and REST; a client that does not trust the CA cannot call it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use keel_client::{GrpcChannel, RestClient, TlsConfig};
use keel_registry::{Registry, StaticRegistry};
use keel_testkit::echo::{EchoRequest, EchoService, echo_client::EchoClient, echo_server};
use serde_json::Value;

use common::{RestProvider, instance, test_pki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_a_test_ca() {
    let (ca, cert, key) = test_pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&cert, &key)),
        )
        .unwrap()
        .add_service(echo_server::EchoServer::new(EchoService::new("tls-1")))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let server = tokio::spawn(server);

    let registry = StaticRegistry::new();
    let _reg = registry
        .register(instance("secure", "tls-1", addr).with_tls(true))
        .await
        .unwrap();
    let channel = GrpcChannel::builder("secure")
        .tls(TlsConfig::with_ca_pem(ca.as_bytes()))
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    let reply = EchoClient::new(channel)
        .echo(EchoRequest {
            message: "s".into(),
            payload: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.server_id, "tls-1");

    let (other_ca, _, _) = test_pki();
    let untrusting = GrpcChannel::builder("secure")
        .max_attempts(1)
        .tls(TlsConfig::with_ca_pem(other_ca.as_bytes()))
        .connect(&registry, Duration::from_secs(5))
        .await
        .unwrap();
    let status = EchoClient::new(untrusting)
        .echo(EchoRequest {
            message: "s".into(),
            payload: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    server.abort();
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
