//! `keel::App` against a real ZooKeeper: registration only when ready, health and metrics,
//! graceful shutdown under load, idempotency across instances.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel::App;
use keel::client::{GrpcChannel, RestClient};
use keel::config::Config;
use keel::registry::{Registry, ZkConfig, ZkRegistry};
use keel_testkit::echo::echo_client::EchoClient;
use keel_testkit::echo::echo_server::EchoServer;
use keel_testkit::echo::{EchoRequest, EchoService};
use keel_testkit::eventually;
use keel_testkit::zk::{TestRoot, servers};

const WAIT: Duration = Duration::from_secs(30);

fn config(root: &TestRoot, extra: &str) -> Config {
    Config::from_toml(&format!(
        r#"
        [registry]
        zookeeper = "{zk}"
        root = "{root}"
        [telemetry]
        format = "none"
        {extra}
        "#,
        zk = servers(),
        root = root.path,
    ))
    .unwrap()
}

async fn registry(root: &TestRoot) -> ZkRegistry {
    ZkRegistry::connect(
        ZkConfig::new(servers()).with_dialect(keel::registry::Dialect::Spring(
            keel::registry::dialect::SpringOptions::default().with_root(root.path.clone()),
        )),
    )
    .await
    .unwrap()
}

fn admin(addr: std::net::SocketAddr) -> RestClient {
    RestClient::builder("admin")
        .max_attempts(1)
        .base_url(&format!("http://{addr}"))
        .unwrap()
}

async fn get_text(client: &RestClient, path: &str) -> (u16, String) {
    match client.request(http::Method::GET, path).send().await {
        Ok(res) => (
            res.status().as_u16(),
            String::from_utf8_lossy(res.body()).into_owned(),
        ),
        Err(e) => (
            e.status().map_or(0, |s| s.as_u16()),
            String::from_utf8_lossy(e.body()).into_owned(),
        ),
    }
}

#[tokio::test]
async fn registers_only_when_ready_then_serves_health_metrics_and_registry() {
    let root = TestRoot::new();
    let service = keel_testkit::unique("echo");
    let gate = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = App::with_config(&service, config(&root, "[server]\ndrain = \"2s\""))
        .await
        .unwrap()
        .grpc_service(EchoServer::new(EchoService::new("a")))
        .readiness_check("gate", {
            let (gate, polls) = (Arc::clone(&gate), Arc::clone(&polls));
            move || {
                polls.fetch_add(1, Ordering::AcqRel);
                let open = gate.load(Ordering::Acquire);
                async move {
                    if open {
                        Ok(())
                    } else {
                        Err("gate closed".to_owned())
                    }
                }
            }
        });
    let watcher = registry(&root).await;
    let starting = tokio::spawn(app.start());

    // The check fails (and is retried): nothing may be registered meanwhile.
    eventually("readiness check retried", WAIT, || {
        let n = polls.load(Ordering::Acquire);
        async move { (n >= 3).then_some(()) }
    })
    .await
    .unwrap();
    assert!(watcher.snapshot(&service).await.unwrap().is_empty());
    gate.store(true, Ordering::Release);
    let running = starting.await.unwrap().unwrap();
    let instances = eventually("registered", WAIT, || {
        let (watcher, service) = (&watcher, &service);
        async move {
            let found = watcher.snapshot(service).await.unwrap();
            (found.len() == 1).then_some(found)
        }
    })
    .await
    .unwrap();
    let grpc = running.grpc_addr().unwrap();
    assert_eq!(instances[0].endpoint.port, grpc.port());
    assert_eq!(
        instances[0].metadata.get("admin_port").map(String::as_str),
        Some(running.admin_addr().port().to_string().as_str())
    );

    let admin = admin(running.admin_addr());
    assert_eq!(get_text(&admin, "/health/live").await.0, 200);
    assert_eq!(get_text(&admin, "/health/ready").await.0, 200);

    // gRPC health: SERVING once registered, for the server and for the service.
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for name in ["", "keel.echo.v1.Echo"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: name.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "service {name:?}"
        );
    }

    // Server reflection is served: it lists the health service.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let reply = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply {reply:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"grpc.health.v1.Health".to_owned()),
            "{names:?}"
        );
    }

    // A call is counted in the RED metrics, by method and status.
    let mut echo = EchoClient::new(channel.clone());
    echo.echo(EchoRequest {
        message: "hi".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (code, metrics) = get_text(&admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(
            r#"keel_server_requests_total{protocol="grpc",method="/keel.echo.v1.Echo/Echo",status="Ok"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"keel_server_request_duration_seconds_count{protocol="grpc",method="/keel.echo.v1.Echo/Echo"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("keel_ready 1"), "{metrics}");
    // A path no served method answers is counted as `unknown`, whoever made it up: an unknown
    // service, or a made-up method of a service whose descriptor is known (health's); a real
    // health method keeps its own series.
    for path in [
        "/made.up.Service/Anything",
        "/grpc.health.v1.Health/MadeUp",
        "/keel.echo.v1.Echo",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(EchoRequest::default()),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<EchoRequest, EchoRequest>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}");
    }
    let (_, metrics) = get_text(&admin, "/metrics").await;
    assert!(
        metrics.contains(
            r#"keel_server_requests_total{protocol="grpc",method="unknown",status="Unimplemented"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains("MadeUp") && !metrics.contains("Anything"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"keel_server_requests_total{protocol="grpc",method="/grpc.health.v1.Health/Check",status="Ok"} 2"#
        ),
        "{metrics}"
    );

    let (_, view) = get_text(&admin, "/registry").await;
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["registered"][0]["service"], service.as_str());

    // Shutdown: deregistered, then (during the drain window, still live and still serving)
    // not ready and NOT_SERVING.
    let stopping = tokio::spawn(running.stop());
    eventually("deregistered", WAIT, || {
        let watcher = &watcher;
        let service = &service;
        async move {
            watcher
                .snapshot(service)
                .await
                .unwrap()
                .is_empty()
                .then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(get_text(&admin, "/health/ready").await.0, 503);
    assert_eq!(get_text(&admin, "/health/live").await.0, 200);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    stopping.await.unwrap().unwrap();
}

/// A stop asked for while a readiness check still fails (SIGTERM during a slow start: here the
/// shutdown handle, which `run` waits on beside the signals) ends the App at once, well before
/// the checks' deadline, with nothing registered; `start` reports it as `Error::Stopped`.
#[tokio::test]
async fn a_stop_while_not_ready_ends_the_app_without_registering() {
    let root = TestRoot::new();
    let service = keel_testkit::unique("echo");
    let watcher = registry(&root).await;
    for run in [true, false] {
        let polls = Arc::new(AtomicU64::new(0));
        let app = App::with_config(
            &service,
            config(
                &root,
                "[server]\nshutdown_timeout = \"300s\"\ndrain = \"60s\"",
            ),
        )
        .await
        .unwrap()
        .grpc_service(EchoServer::new(EchoService::new("a")))
        .readiness_check("never", {
            let polls = Arc::clone(&polls);
            move || {
                polls.fetch_add(1, Ordering::AcqRel);
                async { Err("the database does not answer".to_owned()) }
            }
        });
        let handle = app.shutdown_handle();
        let ended = if run {
            tokio::spawn(async move { app.run().await.map_err(|e| e.to_string()) })
        } else {
            tokio::spawn(async move { app.start().await.map(drop).map_err(|e| e.to_string()) })
        };
        eventually("readiness check retried", WAIT, || {
            let n = polls.load(Ordering::Acquire);
            async move { (n >= 2).then_some(()) }
        })
        .await
        .unwrap();
        handle.shutdown();
        // Without the stop the checks would be retried for the 300 s shutdown timeout.
        let result = tokio::time::timeout(WAIT, ended)
            .await
            .expect("the App ends on the stop, not at the checks' deadline")
            .unwrap();
        if run {
            result.unwrap();
        } else {
            let err = result.unwrap_err();
            assert_eq!(err, "stopped before ready");
        }
        assert!(watcher.snapshot(&service).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn graceful_shutdown_under_load_loses_no_request() {
    let root = TestRoot::new();
    let service = keel_testkit::unique("echo");
    let mut running = Vec::new();
    for id in ["a", "b"] {
        let app = App::with_config(&service, config(&root, "[server]\ndrain = \"300ms\""))
            .await
            .unwrap()
            .grpc_service(EchoServer::new(EchoService::new(id)));
        running.push(app.start().await.unwrap());
    }
    let caller = registry(&root).await;
    let channel = GrpcChannel::builder(&service)
        .connect(&caller, WAIT)
        .await
        .unwrap();
    eventually("both instances discovered", WAIT, || {
        let n = channel.endpoints().len();
        async move { (n == 2).then_some(()) }
    })
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (channel, stop, ok) = (channel.clone(), Arc::clone(&stop), Arc::clone(&ok));
        load.push(tokio::spawn(async move {
            let mut client = EchoClient::new(channel);
            let mut failures = Vec::new();
            while !stop.load(Ordering::Acquire) {
                match client
                    .echo(EchoRequest {
                        message: "x".into(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    eventually("load flowing", WAIT, || {
        let n = ok.load(Ordering::Relaxed);
        async move { (n > 200).then_some(()) }
    })
    .await
    .unwrap();

    // Stop instance "a" while the load runs.
    let a = running.remove(0);
    a.stop().await.unwrap();
    let before = ok.load(Ordering::Relaxed);
    eventually("load continues on b", WAIT, || {
        let n = ok.load(Ordering::Relaxed);
        async move { (n > before + 200).then_some(()) }
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Release);
    let mut failures = Vec::new();
    for l in load {
        failures.extend(l.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed calls, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(channel.endpoints().len(), 1, "a is gone from discovery");
    running.remove(0).stop().await.unwrap();
}

#[tokio::test]
async fn rest_routes_get_red_metrics_and_deadlines() {
    use axum::routing::get;
    let root = TestRoot::new();
    let service = keel_testkit::unique("rest");
    let routes = axum::Router::new()
        .route("/fast/{id}", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let running = App::with_config(&service, config(&root, "[server]\ndrain = \"300ms\""))
        .await
        .unwrap()
        .rest(routes)
        .start()
        .await
        .unwrap();
    let rest = running.rest_addr().unwrap();
    let client = RestClient::builder(&service)
        .max_attempts(1)
        .base_url(&format!("http://{rest}"))
        .unwrap();
    for id in 0..3 {
        let res = client
            .request(http::Method::GET, &format!("/fast/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // An incoming deadline is enforced: 504 well before the handler's 30 s.
    let started = std::time::Instant::now();
    let err = client
        .request(http::Method::GET, "/slow")
        .header("x-keel-deadline", "200")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(504), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let (_, metrics) = get_text(&admin(running.admin_addr()), "/metrics").await;
    assert!(
        metrics.contains(
            r#"keel_server_requests_total{protocol="http",method="GET /fast/{id}",status="200"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"keel_server_errors_total{protocol="http",method="GET /slow"} 1"#),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

/// Two instances sharing the Redis idempotency store: a repeat of a key executes nothing, even
/// when it lands on the other instance.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_repeated_key_executes_once_across_instances_with_the_redis_store() {
    use keel_testkit::echo::Faults;
    let root = TestRoot::new();
    let service = keel_testkit::unique("pay");
    let faults = Faults::default();
    let mut running = Vec::new();
    for id in ["a", "b"] {
        let app = App::with_config(
            &service,
            config(
                &root,
                "[server]\ndrain = \"100ms\"\n[idempotency]\nstore = \"redis://127.0.0.1:6379\"\nttl = \"1m\"",
            ),
        )
        .await
        .unwrap()
        .grpc_service(EchoServer::new(EchoService::with_faults(id, faults.clone())));
        running.push(app.start().await.unwrap());
    }
    let key = keel_testkit::unique("key");
    let mut replies = Vec::new();
    for r in &running {
        let channel = GrpcChannel::builder(&service)
            .endpoints([format!("http://{}", r.grpc_addr().unwrap())])
            .unwrap();
        let mut client = EchoClient::new(channel);
        let mut req = tonic::Request::new(EchoRequest {
            message: "debit 10".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let reply = client.echo(req).await.unwrap();
        replies.push((
            reply.metadata().get("idempotent-replayed").is_some(),
            reply.into_inner().server_id,
        ));
    }
    assert_eq!(faults.calls(), 1, "the handler ran once for the key");
    assert_eq!(replies[0], (false, "a".to_owned()));
    assert_eq!(
        replies[1],
        (true, "a".to_owned()),
        "instance b answered with a's stored response"
    );
    for r in running {
        r.stop().await.unwrap();
    }
}

/// `[clients.NAME]` of a gRPC client calling through a gateway: its `headers` go with every
/// call; its `keep_alive` ends a call to a provider that went silent; a `pool` (REST clients
/// only) is a configuration error naming the key, as is a `keep_alive` (gRPC only) for REST,
/// a `tcp_keepalive` the kernel cannot take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_client_config_sends_its_headers_and_refuses_a_rest_pool() {
    let root = TestRoot::new();
    let echo = keel_testkit::echo::EchoProvider::start("gw").await.unwrap();
    // A provider that went silent: accepts, reads, never answers (not even a PING).
    let (silent_addr, silent) = keel_testkit::silent_server().await.unwrap();
    let app = App::with_config(
        &keel_testkit::unique("gw"),
        config(
            &root,
            &format!(
                r#"
                [clients.gateway]
                urls = ["http://{addr}"]
                headers = {{ x-api-key = "secret-1" }}
                [clients.pooled]
                urls = ["http://{addr}"]
                pool = {{ max_idle = 2 }}
                [clients.silent]
                urls = ["http://{silent_addr}"]
                retry = {{ max_attempts = 1 }}
                keep_alive = {{ interval = "200ms", timeout = "200ms" }}
                [clients.zero]
                urls = ["http://{silent_addr}"]
                keep_alive = {{ timeout = "0s" }}
                [clients.subsecond]
                urls = ["http://{silent_addr}"]
                tcp_keepalive = "500ms"
                "#,
                addr = echo.addr()
            ),
        ),
    )
    .await
    .unwrap();
    // No timeout configured: only the keep-alive ends this call.
    let mut silent_client = EchoClient::new(app.grpc("silent").unwrap());
    let call = silent_client.echo(EchoRequest::default());
    let status = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the keep-alive ends the call")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
    match app.grpc("zero").unwrap_err() {
        keel::Error::Config(e) => {
            assert_eq!(e.key(), Some("clients.zero.keep_alive.timeout"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    for built in [
        app.grpc("subsecond").map(drop),
        app.rest_client("subsecond").map(drop),
    ] {
        match built.unwrap_err() {
            keel::Error::Config(e) => {
                assert_eq!(e.key(), Some("clients.subsecond.tcp_keepalive"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    match app.rest_client("silent").unwrap_err() {
        keel::Error::Config(e) => assert_eq!(e.key(), Some("clients.silent.keep_alive"), "{e}"),
        other => panic!("{other:?}"),
    }
    silent.abort();
    let mut client = EchoClient::new(app.grpc("gateway").unwrap());
    let reply = client
        .echo(EchoRequest {
            message: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.metadata["x-api-key"], "secret-1");
    match app.grpc("pooled").unwrap_err() {
        keel::Error::Config(e) => assert_eq!(e.key(), Some("clients.pooled.pool"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(app.rest_client("pooled").is_ok());
}

/// An echo whose handler never answers.
struct Hanging;

#[tonic::async_trait]
impl keel_testkit::echo::echo_server::Echo for Hanging {
    async fn echo(
        &self,
        _: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<keel_testkit::echo::EchoReply>, tonic::Status> {
        std::future::pending().await
    }
}

/// `server.request_timeout` bounds a gRPC call that came without a deadline of its own (a
/// grpcurl or Java client without one): it stayed in flight as long as its handler hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_bounds_grpc_calls_without_a_deadline() {
    let root = TestRoot::new();
    let running = App::with_config(
        &keel_testkit::unique("hang"),
        config(&root, "[server]\nrequest_timeout = \"200ms\""),
    )
    .await
    .unwrap()
    .grpc_service(EchoServer::new(Hanging))
    .start()
    .await
    .unwrap();
    let addr = running.grpc_addr().unwrap();
    let mut client = keel_testkit::echo::echo_client::EchoClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), client.echo(EchoRequest::default()))
        .await
        .expect("the server's request timeout ends the call")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Cancelled, "{status:?}");
    running.stop().await.unwrap();
}

/// A streaming call that carries an idempotency key (health's `Watch` here) is served as a
/// stream: the idempotency layer, which buffers a keyed response whole for replay, used to wait
/// for the end of a stream that never ends, and the caller got nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_stream_is_served_not_buffered() {
    use tonic_health::pb::health_client::HealthClient;
    let root = TestRoot::new();
    let running = App::with_config(&keel_testkit::unique("watch"), config(&root, ""))
        .await
        .unwrap()
        .grpc_service(EchoServer::new(EchoService::new("a")))
        .start()
        .await
        .unwrap();
    let addr = running.grpc_addr().unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    request
        .metadata_mut()
        .insert("idempotency-key", "watch-1".parse().unwrap());
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = health.watch(request).await?.into_inner();
        stream.message().await
    })
    .await
    .expect("the first status arrives")
    .unwrap()
    .unwrap();
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    running.stop().await.unwrap();
}

/// Consumers start once the readiness checks pass, not before: a message handled while, say,
/// the database is still unready fails its attempts and is dead-lettered. Seen from the broker:
/// the queue has no consumer while the check fails (a message published then waits in it);
/// once the check passes, it is consumed.
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_start_once_ready() {
    use std::sync::atomic::AtomicBool;
    let root = TestRoot::new();
    let queue = keel_testkit::unique("ready-q");
    let amqp = keel_testkit::services::AMQP;
    let handled = Arc::new(AtomicU64::new(0));
    let (open, polls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let app = App::with_config(
        &keel_testkit::unique("ready"),
        config(
            &root,
            &format!("[messaging.pay]\nbroker = \"{amqp}\"\ndestination = \"{queue}\""),
        ),
    )
    .await
    .unwrap()
    .consumer("pay", {
        let handled = Arc::clone(&handled);
        move |_: keel_messaging::Received| {
            let handled = Arc::clone(&handled);
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    })
    .unwrap()
    .readiness_check("db", {
        let (open, polls) = (Arc::clone(&open), Arc::clone(&polls));
        move || {
            polls.fetch_add(1, Ordering::SeqCst);
            let open = open.load(Ordering::SeqCst);
            async move {
                if open {
                    Ok(())
                } else {
                    Err("the database is warming up".to_owned())
                }
            }
        }
    });
    let started = tokio::spawn(app.start());
    eventually("the check failed three times", WAIT, || {
        let n = polls.load(Ordering::SeqCst);
        async move { (n >= 3).then_some(()) }
    })
    .await
    .unwrap();
    let publisher = keel_messaging::Publisher::connect(amqp).await.unwrap();
    let publish = || {
        publisher.publish(
            &queue,
            None,
            b"pay 10".to_vec(),
            keel_messaging::Headers::default(),
        )
    };
    publish().await.unwrap();
    let conn = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let state = ch
        .queue_declare(queue.as_str().into(), passive, Default::default())
        .await
        .unwrap();
    assert_eq!(state.consumer_count(), 0, "no consumer before ready");
    assert_eq!(state.message_count(), 1, "the message waits");
    assert_eq!(handled.load(Ordering::SeqCst), 0);

    open.store(true, Ordering::SeqCst);
    let running = started.await.unwrap().unwrap();
    eventually("the message is consumed", WAIT, || {
        let n = handled.load(Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await
    .unwrap();
    running.stop().await.unwrap();

    for q in [queue.clone(), format!("{queue}.dlq")] {
        let _ = ch
            .queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = ch
        .exchange_delete(
            format!("{queue}.dlx").as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(200, "bye".into()).await;
}

/// A `Running` dropped without `stop` (an error path) stops serving and stops reporting ready;
/// it used to serve on, ready, after its registration's drop had deregistered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_running_app_stops_serving() {
    let root = TestRoot::new();
    let running = App::with_config(&keel_testkit::unique("dropped"), config(&root, ""))
        .await
        .unwrap()
        .grpc_service(EchoServer::new(EchoService::new("a")))
        .start()
        .await
        .unwrap();
    let (grpc, admin_addr) = (running.grpc_addr().unwrap(), running.admin_addr());
    let health = admin(admin_addr);
    assert_eq!(get_text(&health, "/health/ready").await.0, 200);
    drop(running);
    eventually("the listeners close", WAIT, || {
        let health = health.clone();
        async move {
            let ready = get_text(&health, "/health/ready").await.0;
            let grpc_closed = tokio::net::TcpStream::connect(grpc).await.is_err();
            (ready != 200 && grpc_closed).then_some(())
        }
    })
    .await
    .unwrap();
}
