//! How `[clients.NAME]` reaches the client builders: fixed URLs (paths, and what a URL may not
//! hold), against servers on loopback. No registry: these clients are given their URLs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keel::App;
use keel::config::Config;

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
