//! The slave's local HTTP API as a host application meets it: one JSON error shape for
//! every error with its HTTP status, unknown fields refused without taking a seat, a
//! refusal as 409 (503 when no master decides), `GET`/`DELETE` of an agent that holds no
//! seat as 404, the status's logouts apart from refusals with their times, `/healthz` and
//! `/readyz`, the served OpenAPI document, and the remote opt-in with its bearer token. The
//! router is driven in-process against a real agent, broker and nats-server; readiness, the
//! token and the CLI's exit codes against the real `lmbus-slave` binary.
//!
//! These tests block on child processes, so they run on a multi-threaded runtime.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use lmbus_slave::SlaveAgent;
use lmbus_slave::api::{self, ApiOptions, ApiToken};
use lmbus_tests::daemon::SlaveDaemon;
use lmbus_tests::*;
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// One request through the router: the status, the content type and the JSON body.
async fn call(
    router: &axum::Router,
    method: Method,
    uri: &str,
    content_type: Option<&str>,
    body: &str,
) -> (StatusCode, String, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        request = request.header(header::CONTENT_TYPE, ct);
    }
    let request = request.body(Body::from(body.to_owned())).unwrap();
    let response = tokio::time::timeout(WAIT, router.clone().oneshot(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = tokio::time::timeout(WAIT, axum::body::to_bytes(response.into_body(), 1 << 20))
        .await
        .unwrap()
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "{uri}: not JSON ({status}, {content_type}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, content_type, json)
}

/// Asserts the one error shape, with this status and code.
fn assert_error(answer: &(StatusCode, String, Value), status: StatusCode, code: &str) {
    let (got, content_type, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    for field in ["message", "hint"] {
        assert!(
            error[field].as_str().is_some_and(|t| !t.is_empty()),
            "error.{field} is missing: {body}"
        );
    }
}

/// Runs `cmd` to its end (bounded) and returns its output.
async fn output(cmd: &mut tokio::process::Command) -> Output {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not end within {WAIT:?}"))
        .unwrap()
}

/// `lmbus-slave <args>` (a CLI subcommand, or a `run` expected to fail at once).
async fn slave_cli(args: &[&str]) -> Output {
    output(tokio::process::Command::new(bin("lmbus-slave").unwrap()).args(args)).await
}

/// Steps: a broker with one seat and one slave agent in-process, its router driven with
/// `oneshot`. Each malformed request (no content type, not JSON, a missing field, an
/// unknown field, an empty id, a 3 MB body, an unknown path, a wrong method, a path that
/// does not decode) gets the JSON error shape with its status, and none takes a seat. a1
/// is approved (201, then 200 already held) and shown by `GET /v1/agents/{id}`; a2 is
/// refused 409 with the reason as the code and the outcome beside it; the status lists a2
/// under `rejected` with an RFC 3339 time and nothing under `logged_out`. An operator
/// releases a1: it moves to `logged_out`, not `rejected`. `GET` and `DELETE` of an agent
/// that holds no seat are 404; `/healthz` and `/readyz` answer 200; `/v1/openapi.json` is
/// the checked-in document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_follows_the_documented_codes_and_shape() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(1, &[], true).await.unwrap();
    let agent = tokio::time::timeout(WAIT, SlaveAgent::start(f.slave_config("site").unwrap()))
        .await
        .unwrap()
        .unwrap();
    let router = api::router(agent.clone());
    let json = Some("application/json");

    // Every class of bad request: one shape, its own status.
    let a = call(
        &router,
        Method::POST,
        "/v1/agents",
        None,
        r#"{"agent_id":"x","agent_type":"inbound"}"#,
    )
    .await;
    assert_error(
        &a,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let a = call(&router, Method::POST, "/v1/agents", json, "{not json").await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_json");
    let a = call(
        &router,
        Method::POST,
        "/v1/agents",
        json,
        r#"{"agent_id":"x"}"#,
    )
    .await;
    assert_error(&a, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    let a = call(
        &router,
        Method::POST,
        "/v1/agents",
        json,
        r#"{"agent_id":"bob","agent_type":"inbound","user":"bob"}"#,
    )
    .await;
    assert_error(&a, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");
    assert!(
        a.2["error"]["message"].as_str().unwrap().contains("user"),
        "{}",
        a.2
    );
    let a = call(
        &router,
        Method::POST,
        "/v1/agents",
        json,
        r#"{"agent_id":"","agent_type":"inbound"}"#,
    )
    .await;
    assert_error(&a, StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
    let huge = format!(
        r#"{{"agent_id":"{}","agent_type":"inbound"}}"#,
        "x".repeat(3 << 20)
    );
    let a = call(&router, Method::POST, "/v1/agents", json, &huge).await;
    assert_error(&a, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    let a = call(&router, Method::GET, "/v1/nothing", None, "").await;
    assert_error(&a, StatusCode::NOT_FOUND, "not_found");
    let a = call(&router, Method::PUT, "/v1/agents", json, "{}").await;
    assert_error(&a, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let a = call(&router, Method::GET, "/v1/agents/%FF", None, "").await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid_path");
    assert_eq!(agent.status().agents, 0, "a refused request took a seat");
    let a = call(&router, Method::GET, "/v1/agents/bob", None, "").await;
    assert_error(&a, StatusCode::NOT_FOUND, "agent_not_found");
    f.wait_in_use(0).await.unwrap();

    // Approved: 201, then 200 when held already; the seat is readable.
    let body = r#"{"agent_id":"a1","agent_type":"inbound"}"#;
    let (status, _, answer) = call(&router, Method::POST, "/v1/agents", json, body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(
        answer,
        json!({"outcome": "approved", "already_held": false})
    );
    let (status, _, answer) = call(&router, Method::POST, "/v1/agents", json, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["already_held"], true);
    let (status, _, answer) = call(&router, Method::GET, "/v1/agents/a1", None, "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer,
        json!({"agent_id": "a1", "agent_type": "inbound", "master": "primary"})
    );
    let (status, _, answer) = call(&router, Method::GET, "/v1/agents", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer.as_array().unwrap().len(), 1, "{answer}");

    // Refused for capacity: 409, the reason as the code, the outcome beside the error.
    let a = call(
        &router,
        Method::POST,
        "/v1/agents",
        json,
        r#"{"agent_id":"a2","agent_type":"inbound"}"#,
    )
    .await;
    assert_error(&a, StatusCode::CONFLICT, "aggregate_limit");
    assert_eq!(a.2["outcome"], "rejected", "{}", a.2);
    assert_eq!(a.2["reason"], "aggregate_limit", "{}", a.2);
    let outcome: lmbus_slave::Outcome = serde_json::from_value(a.2.clone()).unwrap();
    assert!(!outcome.is_approved());

    // The status: the refusal under `rejected`, with its time; no logout.
    let (status, _, st) = call(&router, Method::GET, "/v1/status", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(st["logged_out"], json!([]), "{st}");
    let rejected = st["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{st}");
    assert_eq!(rejected[0]["agent_id"], "a2");
    assert_eq!(rejected[0]["reason"], "aggregate_limit");
    let at = rejected[0]["at"].as_str().unwrap();
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("`at` is not RFC 3339: {at}: {e}"));
    assert!(at.ends_with('Z'), "{at}");

    // An operator releases a1: a logout of an admitted agent, apart from the refusals.
    let out = output(
        tokio::process::Command::new(bin("lmbus-broker").unwrap())
            .args([
                "admin",
                "release",
                "--nats",
                &f.nats.url(),
                "--cluster",
                &f.cluster,
            ])
            .args(["--slave", "site", "--agent", "a1", "--operator", "alice"]),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("a1 is logged out", || async { agent.status().agents == 0 })
        .await
        .unwrap();
    let (_, _, st) = call(&router, Method::GET, "/v1/status", None, "").await;
    let logged_out = st["logged_out"].as_array().unwrap();
    assert_eq!(logged_out.len(), 1, "{st}");
    assert_eq!(logged_out[0]["agent_id"], "a1");
    assert_eq!(logged_out[0]["reason"], "released_by_admin");
    assert!(
        logged_out[0]["at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{st}"
    );
    assert_eq!(st["rejected"].as_array().unwrap().len(), 1, "{st}");

    // An agent that holds no seat: 404 on GET and DELETE.
    let a = call(&router, Method::GET, "/v1/agents/a1", None, "").await;
    assert_error(&a, StatusCode::NOT_FOUND, "agent_not_found");
    let a = call(&router, Method::DELETE, "/v1/agents/a1", None, "").await;
    assert_error(&a, StatusCode::NOT_FOUND, "agent_not_found");
    // One that does: 200 released, then 404.
    let (status, _, answer) = call(&router, Method::POST, "/v1/agents", json, body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, _, answer) = call(&router, Method::DELETE, "/v1/agents/a1", None, "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"released": true}));
    f.wait_in_use(0).await.unwrap();

    // Probes and the document.
    let (status, _, answer) = call(&router, Method::GET, "/healthz", None, "").await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"status": "ok"})));
    let (status, _, answer) = call(&router, Method::GET, "/readyz", None, "").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"status": "ready", "master": "primary"}));
    let (status, _, served) = call(&router, Method::GET, "/v1/openapi.json", None, "").await;
    assert_eq!(status, StatusCode::OK);
    let checked_in: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../slave-agent/openapi.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, checked_in,
        "the served document is the checked-in one"
    );

    tokio::time::timeout(WAIT, agent.shutdown()).await.unwrap();
    broker.stop().await.unwrap();
}

/// Steps: a real `lmbus-slave run` daemon with no broker yet: `/healthz` is 200, `/readyz`
/// 503 `not_ready`; a registration is refused 503 `master_unavailable` (nobody decided),
/// which `lmbus-slave register` still reports as a refusal (exit 3). A broker with one seat
/// starts: `/readyz` turns 200. Through the CLI: a1 approved (exit 0), a2 refused for
/// capacity (exit 3, the API answered 409), unregistering a2, which holds no seat, exits 0
/// ("held no seat", the API answered 404), unregistering a1 exits 0 ("released").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_master_and_the_cli_keeps_its_exit_codes() {
    let f = Fixture::new().await.unwrap();
    // A grace period long enough that the slave is still in it when the broker starts.
    let daemon = SlaveDaemon::start_with_grace(
        &f.nats.url(),
        &f.cluster,
        "site",
        Duration::from_secs(20),
        &[],
    )
    .await;
    let http = Http::new(None);
    let base = format!("http://{}", daemon.api);

    let (status, body) = http.get(&format!("{base}/healthz")).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, body) = http.get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_ready", "{body}");
    let (status, body) = http
        .post(
            &format!("{base}/v1/agents"),
            json!({"agent_id": "early", "agent_type": "inbound"}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "master_unavailable", "{body}");
    assert_eq!(body["outcome"], "rejected", "{body}");
    let out = slave_cli(&["register", "--api", &daemon.api, "early2", "inbound"]).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let broker = f.broker(1, &[], true).await.unwrap();
    eventually("the daemon is ready", || async {
        http.get(&format!("{base}/readyz")).await.0 == 200
    })
    .await
    .unwrap();
    let (_, body) = http.get(&format!("{base}/readyz")).await;
    assert_eq!(body, json!({"status": "ready", "master": "primary"}));

    let out = slave_cli(&["register", "--api", &daemon.api, "a1", "inbound"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = slave_cli(&["register", "--api", &daemon.api, "a2", "inbound"]).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rejected a2: aggregate_limit"),
        "{out:?}"
    );
    let out = slave_cli(&["unregister", "--api", &daemon.api, "a2"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("a2: held no seat"),
        "{out:?}"
    );
    // An id with URL syntax in it is one path segment: `a1?x` is not `a1`.
    let out = slave_cli(&["unregister", "--api", &daemon.api, "a1?x"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("a1?x: held no seat"),
        "{out:?}"
    );
    let out = slave_cli(&["unregister", "--api", &daemon.api, "a1"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("a1: released"),
        "{out:?}"
    );
    f.wait_in_use(0).await.unwrap();

    daemon
        .proc
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    broker.stop().await.unwrap();
}

/// Steps: `lmbus-slave run` on 0.0.0.0 without `--api-allow-remote` exits 1 naming the
/// flag; with it but no token it exits 1 naming `--api-token-file`; with a 5-character
/// token it exits 1. Then a daemon with `api_allow_remote` and `api_token_file` in its
/// config file (a path relative to the file) serves on 0.0.0.0: `/healthz` and `/readyz`
/// answer without a token; `/v1/status` is 401 `unauthorized` without one and with a
/// wrong one, 200 with the right one; the CLI's `status` exits 1 without
/// `--api-token-file` and 0 with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_api_needs_the_opt_in_and_a_token() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(1, &[], true).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "3f9c2a7e5b1d4f60a8c7e2b9d1f3a5c7";
    std::fs::write(dir.path().join("api.token"), format!("{token}\n")).unwrap();
    std::fs::write(dir.path().join("short.token"), "abcde\n").unwrap();
    let port = free_port();
    let any = format!("0.0.0.0:{port}");
    let url = f.nats.url();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--nats", &url, "--cluster", &f.cluster];
        args.extend(["--id", "site", "--api", &any]);
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };

    let out =
        output(tokio::process::Command::new(bin("lmbus-slave").unwrap()).args(run(&[]))).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--api-allow-remote"), "{stderr}");
    let out = output(
        tokio::process::Command::new(bin("lmbus-slave").unwrap())
            .args(run(&["--api-allow-remote"])),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--api-allow-remote needs --api-token-file"),
        "{stderr}"
    );
    let short = dir.path().join("short.token");
    let out = output(
        tokio::process::Command::new(bin("lmbus-slave").unwrap()).args(run(&[
            "--api-allow-remote",
            "--api-token-file",
            short.to_str().unwrap(),
        ])),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("at least 16"), "{stderr}");

    let config = dir.path().join("slave.toml");
    std::fs::write(
        &config,
        "api_allow_remote = true\napi_token_file = \"api.token\"\n",
    )
    .unwrap();
    let _daemon = Proc::spawn(
        std::process::Command::new(bin("lmbus-slave").unwrap())
            .args(run(&["--config", config.to_str().unwrap()]))
            .args(["--heartbeat-interval", "200ms", "--request-timeout", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let anonymous = Http::new(None);
    eventually("the daemon's API answers", || async {
        anonymous.get(&format!("{base}/healthz")).await.0 == 200
    })
    .await
    .unwrap();
    eventually("the daemon is ready", || async {
        anonymous.get(&format!("{base}/readyz")).await.0 == 200
    })
    .await
    .unwrap();
    let (status, body) = anonymous.get(&format!("{base}/v1/status")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let wrong = Http::new(Some("3f9c2a7e5b1d4f60a8c7e2b9d1f3a5c8"));
    let (status, body) = wrong.get(&format!("{base}/v1/status")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = wrong
        .post(
            &format!("{base}/v1/agents"),
            json!({"agent_id": "a1", "agent_type": "inbound"}),
        )
        .await;
    assert_eq!(status, 401, "a wrong token registers nothing: {body}");
    let right = Http::new(Some(token));
    let (status, body) = right.get(&format!("{base}/v1/status")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["slave_id"], "site");
    let (status, body) = right
        .post(
            &format!("{base}/v1/agents"),
            json!({"agent_id": "a1", "agent_type": "inbound"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let api = format!("127.0.0.1:{port}");
    let out = slave_cli(&["status", "--api", &api]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bearer token"),
        "{out:?}"
    );
    let token_file = dir.path().join("api.token");
    let out = slave_cli(&[
        "status",
        "--api",
        &api,
        "--api-token-file",
        token_file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    broker.stop().await.unwrap();
}

/// The in-process checks of [`ApiOptions`]: what the daemon refuses, without a process.
#[test]
fn api_options_refuse_an_unauthenticated_remote_api() {
    let remote = ApiOptions {
        addr: "0.0.0.0:1".parse().unwrap(),
        allow_remote: true,
        token: None,
    };
    assert!(remote.check().is_err());
    let remote = ApiOptions {
        token: Some(ApiToken::new("0123456789abcdef").unwrap()),
        ..remote
    };
    remote.check().unwrap();
}

/// A blocking HTTP client (ureq) for the daemon tests, each call on the blocking pool under
/// [`WAIT`]; it reads every answer, whatever its status, as JSON.
struct Http {
    token: Option<String>,
}

impl Http {
    fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_owned),
        }
    }

    async fn get(&self, url: &str) -> (u16, Value) {
        self.send(url, None).await
    }

    async fn post(&self, url: &str, body: Value) -> (u16, Value) {
        self.send(url, Some(body)).await
    }

    async fn send(&self, url: &str, body: Option<Value>) -> (u16, Value) {
        let (url, token) = (url.to_owned(), self.token.clone());
        let call = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let auth = token.map(|t| format!("Bearer {t}"));
            let response = match body {
                Some(body) => {
                    let mut request = agent.post(&url);
                    if let Some(auth) = &auth {
                        request = request.header("Authorization", auth);
                    }
                    request.send_json(body)
                }
                None => {
                    let mut request = agent.get(&url);
                    if let Some(auth) = &auth {
                        request = request.header("Authorization", auth);
                    }
                    request.call()
                }
            };
            match response {
                Ok(mut r) => (
                    r.status().as_u16(),
                    r.body_mut().read_json().unwrap_or(Value::Null),
                ),
                Err(_) => (0, Value::Null),
            }
        });
        tokio::time::timeout(WAIT, call).await.unwrap().unwrap()
    }
}

/// A host that pipelines (RFC 9112 §9.3.2: several requests sent before reading) gets each
/// answer, in order, for its own request, registrations and releases included, in
/// allotment mode, where the daemon's bench pipelines. The served API stops on shutdown
/// with a keep-alive connection still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    use tokio::io::AsyncWriteExt as _;
    let f = Fixture::new().await.unwrap();
    let mut cfg = f.broker_settings(2, &[], true).unwrap();
    cfg.allot = allotment(Duration::from_millis(500), Duration::from_secs(5));
    let _broker = Broker::start(cfg).await.unwrap();
    let agent = tokio::time::timeout(WAIT, SlaveAgent::start(f.slave_config("piped").unwrap()))
        .await
        .unwrap()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = api::bind(agent.clone(), "127.0.0.1:0".parse().unwrap(), async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let server = tokio::spawn(server);

    let register = |id: &str| {
        let body = format!(r#"{{"agent_id":"{id}","agent_type":"inbound"}}"#);
        format!(
            "POST /v1/agents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let plain = |method: &str, path: &str| format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    // Two seats and a third registration refused, each seat looked at, one released and
    // looked at again, an unknown path, the other released: one write. Every answer that
    // could be mistaken for another's differs from it (the reads name their agent).
    let requests = [
        register("p1"),
        register("p2"),
        register("p3"),
        plain("GET", "/v1/agents/p2"),
        plain("GET", "/v1/agents/p1"),
        plain("DELETE", "/v1/agents/p1"),
        plain("GET", "/v1/agents/p1"),
        plain("GET", "/v1/agents/p2"),
        plain("GET", "/v1/nothing"),
        plain("DELETE", "/v1/agents/p2"),
        plain("GET", "/v1/agents/p2"),
    ];
    let mut stream = tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    stream
        .get_mut()
        .write_all(requests.concat().as_bytes())
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..requests.len() {
        answers.push(
            tokio::time::timeout(WAIT, lmbus_tests::http1::read_answer(&mut stream))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes,
        [201, 201, 409, 200, 200, 200, 404, 200, 404, 200, 404],
        "{answers:#?}"
    );
    assert!(answers[2].1.contains("aggregate_limit"), "{answers:#?}");
    assert!(answers[3].1.contains("\"p2\""), "{answers:#?}");
    assert!(answers[4].1.contains("\"p1\""), "{answers:#?}");
    assert!(answers[6].1.contains("agent_not_found"), "{answers:#?}");
    assert!(answers[7].1.contains("\"p2\""), "{answers:#?}");
    assert!(answers[8].1.contains("\"not_found\""), "{answers:#?}");
    assert!(answers[10].1.contains("agent_not_found"), "{answers:#?}");
    assert_eq!(agent.status().agents, 0, "{answers:#?}");

    // Shutdown with that keep-alive connection idle and another one stuck halfway through
    // a request head: the idle one is closed at once, and the stuck one cannot hold the
    // stop past its bound.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    stuck
        .write_all(b"GET /v1/status HTTP/1.1\r\nHo")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
    )
    .await
    .expect("the idle keep-alive connection was not closed on shutdown")
    .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    tokio::time::timeout(api::SHUTDOWN_WAIT + WAIT, server)
        .await
        .expect("the API did not stop")
        .unwrap()
        .unwrap();
}
