//! How `[clients.NAME]` reaches the client builders: fixed URLs (paths, and what a URL may not
//! hold), TLS, against servers on loopback. No registry: these clients are given their URLs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use keel::App;
use keel::config::Config;
use keel_testkit::echo::echo_client::EchoClient;
use keel_testkit::echo::echo_server::EchoServer;
use keel_testkit::echo::{EchoRequest, EchoService};

/// An App over `clients` (TOML), with the static registry and no log output.
async fn app(clients: &str) -> App {
    let config = Config::from_toml(&format!("[telemetry]\nformat = \"none\"\n{clients}")).unwrap();
    App::with_config(&keel_testkit::unique("clients"), config)
        .await
        .unwrap()
}

/// The key a configuration error names (a panic for any other outcome).
fn config_key<T: std::fmt::Debug>(built: Result<T, keel::Error>) -> String {
    match built {
        Err(keel::Error::Config(e)) => e.key().unwrap().to_owned(),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

/// A REST client given a gateway route (`http://host:port/api`) calls under it: the path was
/// dropped, so `/ping` went to the gateway's root (another backend, or a 404).
#[tokio::test]
async fn a_rest_url_with_a_path_is_a_base_url() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = axum::Router::new().route("/api/ping", axum::routing::get(|| async { "pong" }));
    let server = tokio::spawn(async move { axum::serve(listener, routes).await });
    let app = app(&format!(
        "[clients.gw]\nurls = [\"http://{addr}/api\"]\nretry = {{ max_attempts = 1 }}\n\
         [clients.slash]\nurls = [\"http://{addr}/api/\"]\nretry = {{ max_attempts = 1 }}"
    ))
    .await;
    for name in ["gw", "slash"] {
        let client = app.rest_client(name).unwrap();
        let response = client
            .request(http::Method::GET, "/ping")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(response.body().as_ref(), b"pong", "{name}");
    }
    server.abort();
}

/// What a client would silently drop from a URL, or what does not belong in one, is an error
/// naming `clients.NAME.urls`: a query, a fragment, credentials; a path where the client
/// cannot keep it (gRPC; REST with several URLs).
#[tokio::test]
async fn urls_a_client_cannot_honour_are_errors_naming_the_key() {
    for (toml, key) in [
        (
            "[clients.q]\nurls = [\"http://127.0.0.1:1/api?key=secret\"]",
            "clients.q.urls",
        ),
        (
            "[clients.q]\nurls = [\"http://127.0.0.1:1/?\"]",
            "clients.q.urls",
        ),
        (
            "[clients.f]\nurls = [\"http://127.0.0.1:1/api#top\"]",
            "clients.f.urls",
        ),
        (
            "[clients.u]\nurls = [\"http://127.0.0.1:1\", \"https://user:secret@127.0.0.1:2\"]",
            "clients.u.urls",
        ),
        (
            "[clients.s]\nurls = [\"ftp://127.0.0.1:1\"]",
            "clients.s.urls",
        ),
        ("[clients.s]\nurls = [\"127.0.0.1:1\"]", "clients.s.urls"),
    ] {
        let error = Config::from_toml(toml).unwrap_err();
        assert_eq!(error.key(), Some(key), "{toml}: {error}");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    let app = app("[clients.path]\nurls = [\"http://127.0.0.1:1/api\"]\n\
         [clients.paths]\nurls = [\"http://127.0.0.1:1/api\", \"http://127.0.0.1:2/api\"]\n\
         [clients.mixed]\nurls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2/api\"]\n\
         [clients.root]\nurls = [\"http://127.0.0.1:1/\", \"http://127.0.0.1:2\"]")
    .await;
    // gRPC calls /package.Service/Method on the host: a path would be dropped.
    assert_eq!(config_key(app.grpc("path")), "clients.path.urls");
    assert_eq!(config_key(app.grpc("paths")), "clients.paths.urls");
    // REST keeps a path for a single base URL only.
    assert!(app.rest_client("path").is_ok());
    assert_eq!(config_key(app.rest_client("paths")), "clients.paths.urls");
    assert_eq!(config_key(app.rest_client("mixed")), "clients.mixed.urls");
    // `/` is no path.
    assert!(app.grpc("root").is_ok());
    assert!(app.rest_client("root").is_ok());
}

/// `[clients.NAME] tls` reaches both builders: a gRPC client trusting the test CA calls an
/// `https://` provider, and a REST client does too, its certificate verified against the
/// configured `domain` (the certificate names no IP address). TLS could not be configured at
/// all (`tls` was an unknown key), so no SDK client could call an https URL.
#[tokio::test]
async fn tls_from_the_config_calls_https_providers() {
    let (ca, cert, key) = test_pki(&["localhost", "127.0.0.1"]);
    let ca_file = TempFile::new("ca.pem", ca.as_bytes());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&cert, &key)),
            )
            .unwrap()
            .add_service(EchoServer::new(EchoService::new("tls-1")))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (named_ca, named_cert, named_key) = test_pki(&["keel.test"]);
    let named_ca_file = TempFile::new("ca.pem", named_ca.as_bytes());
    let (rest_addr, rest_server) = tls_rest_server(&named_cert, &named_key).await;

    let app = app(&format!(
        "[clients.secure]\nurls = [\"https://{grpc_addr}\"]\nretry = {{ max_attempts = 1 }}\n\
         tls = {{ ca_file = {ca:?} }}\n\
         [clients.gateway]\nurls = [\"https://{rest_addr}\"]\nretry = {{ max_attempts = 1 }}\n\
         tls = {{ ca_file = {named:?}, domain = \"keel.test\" }}",
        ca = ca_file.0,
        named = named_ca_file.0,
    ))
    .await;
    let reply = EchoClient::new(app.grpc("secure").unwrap())
        .echo(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.server_id, "tls-1");
    let response = app
        .rest_client("gateway")
        .unwrap()
        .request(http::Method::GET, "/ping")
        .send()
        .await
        .unwrap();
    assert_eq!(response.body().as_ref(), b"pong");
    grpc_server.abort();
    rest_server.abort();
}

/// A CA file that cannot be read, or holds no usable certificate, is an error naming
/// `clients.NAME.tls.ca_file` when the client is built (a file without a certificate would
/// trust nothing, and every handshake would fail); a bad `domain` names its key; an https URL
/// without `tls`, or a `tls` trusting nothing, names `clients.NAME.tls`; `system_roots` alone
/// builds.
#[tokio::test]
async fn a_bad_tls_section_is_an_error_naming_the_key() {
    let (ca, _, key) = test_pki(&["localhost"]);
    let good = TempFile::new("ca.pem", ca.as_bytes());
    let key_only = TempFile::new("key.pem", key.as_bytes());
    let text = TempFile::new("ca.txt", b"not a certificate\n");
    let broken = TempFile::new(
        "broken.pem",
        b"-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
    );
    let garbage = TempFile::new(
        "garbage.pem",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let missing = std::env::temp_dir().join(keel_testkit::unique("missing"));
    let mut clients = String::new();
    for (name, path) in [
        ("missing", &missing),
        ("key_only", &key_only.0),
        ("text", &text.0),
        ("broken", &broken.0),
        ("garbage", &garbage.0),
    ] {
        clients.push_str(&format!(
            "[clients.{name}]\nurls = [\"https://127.0.0.1:1\"]\ntls = {{ ca_file = {path:?} }}\n"
        ));
    }
    clients.push_str(&format!(
        "[clients.domain]\nurls = [\"https://127.0.0.1:1\"]\n\
         tls = {{ ca_file = {good:?}, domain = \"not a name\" }}\n",
        good = good.0
    ));
    let app = app(&clients).await;
    for name in ["missing", "key_only", "text", "broken", "garbage"] {
        let key = format!("clients.{name}.tls.ca_file");
        assert_eq!(config_key(app.grpc(name)), key);
        assert_eq!(config_key(app.rest_client(name)), key);
    }
    assert_eq!(config_key(app.grpc("domain")), "clients.domain.tls.domain");
    assert_eq!(
        config_key(app.rest_client("domain")),
        "clients.domain.tls.domain"
    );

    let error = Config::from_toml("[clients.plain]\nurls = [\"https://127.0.0.1:1\"]").unwrap_err();
    assert_eq!(error.key(), Some("clients.plain.tls"), "{error}");

    // A tls section must say what to trust: a CA file, the platform's store, or both.
    let app = self::app(
        "[clients.neither]\nurls = [\"https://127.0.0.1:1\"]\ntls = {}\n\
         [clients.system]\nurls = [\"https://127.0.0.1:1\"]\ntls = { system_roots = true }\n",
    )
    .await;
    assert_eq!(config_key(app.grpc("neither")), "clients.neither.tls");
    assert_eq!(
        config_key(app.rest_client("neither")),
        "clients.neither.tls"
    );
    assert!(app.grpc("system").is_ok());
    assert!(app.rest_client("system").is_ok());
}

/// A partial `[clients.NAME] breaker` section keeps the client's per-endpoint defaults for the
/// fields it leaves out: against a provider that fails every call, the endpoint is ejected
/// after the client's default minimum number of calls, as without the section. It took
/// `BreakerConfig::default`'s (twice as many calls) and stayed closed.
#[tokio::test]
async fn a_partial_breaker_section_ejects_as_the_client_default_does() {
    use keel::breaker::breaker::State;
    let faults = keel_testkit::echo::Faults::default();
    faults.fail_every(1, tonic::Code::Internal);
    let provider = keel_testkit::echo::EchoProvider::start_with("failing", faults.clone())
        .await
        .unwrap();
    let addr = provider.addr();
    let app = app(&format!(
        "[clients.plain]\nurls = [\"http://{addr}\"]\nretry = {{ max_attempts = 1 }}\n\
         [clients.partial]\nurls = [\"http://{addr}\"]\nretry = {{ max_attempts = 1 }}\n\
         breaker = {{ failure_rate_threshold = 50 }}"
    ))
    .await;
    let minimum = keel::client::default_endpoint_breaker().minimum_number_of_calls;
    for name in ["plain", "partial"] {
        let channel = app.grpc(name).unwrap();
        let state = || channel.endpoints()[0].state;
        let mut client = EchoClient::new(channel.clone());
        for call in 1..=minimum {
            assert_eq!(state(), State::Closed, "{name}: before call {call}");
            let status = client.echo(EchoRequest::default()).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Internal, "{name}: {status:?}");
        }
        // Open, or half-open already if this poll came after the open wait.
        keel_testkit::eventually(
            &format!("{name}: ejected after {minimum} failed calls"),
            std::time::Duration::from_secs(5),
            || async { (state() != State::Closed).then_some(()) },
        )
        .await
        .unwrap();
    }
    assert_eq!(faults.calls(), u64::from(minimum) * 2);
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(keel_testkit::unique(name));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A test CA and a server certificate for `names`: `(ca_pem, cert_pem, key_pem)`.
fn test_pki(names: &[&str]) -> (String, String, String) {
    keel_testkit::tls::test_pki(names).unwrap()
}

/// A REST server over TLS (certificate `cert`, key `key`) answering `GET /ping` with `pong`.
async fn tls_rest_server(cert: &str, key: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, routes) = (acceptor.clone(), routes.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(routes),
                )
                .await;
            });
        }
    });
    (addr, task)
}
