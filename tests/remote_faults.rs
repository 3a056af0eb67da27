//! Remote runtimes that misbehave in ways a real runtime process cannot: mockito answers,
//! and a bare listener that accepts and never answers.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use mockito::{Matcher, Server};
use serde_json::json;

fn gateway_with_remote(name: &str, base_url: &str, extra: &str) -> TestGateway {
    // SAFETY (test): every test in this file sets the same value.
    unsafe { std::env::set_var("WG_FAULTS_TOKEN", "tok-faults") };
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{base_url}\"\ntoken_env = \"WG_FAULTS_TOKEN\"\nprobe_interval_ms = 60000\n{extra}"
    ))
    .replace("threads = 4\n", "");
    TestGateway::start(name, &config)
}

/// A listener that accepts connections and never answers; reports each accept.
fn runtime_body() -> serde_json::Value {
    // Base shape only: no boot_id, no profiles.
    json!({"runtime":{"runtime_id":"rt-m","display_name":null,"backend":"memory","status":"running",
        "worker_count":1,"active_worker_count":1,"stopped_worker_count":0,"cancelled_worker_count":0,
        "diagnostic_count":0,"limits":{"max_transcript_projection_items":256,"max_event_batch_items":256}}})
}

#[test]
fn base_shape_responses_are_understood_and_the_token_is_sent() {
    let mut server = Server::new();
    let auth = Matcher::Exact("Bearer tok-faults".into());
    let probe = server
        .mock("GET", "/v1/runtime")
        .match_header("authorization", auth.clone())
        .with_body(runtime_body().to_string())
        .expect_at_least(1)
        .create();
    let row = json!({"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"runtime_id":"rt-m","worker_id":"w-1",
        "status":"running","intent":{"kind":"role","role":"reviewer"},"profile":{"kind":"runtime_default"},
        "requested_capability_count":0,"has_config_bundle":false,"transcript_len":2,"last_event_id":7});
    server
        .mock("GET", "/v1/workers")
        .match_header("authorization", auth.clone())
        .with_body(json!({"workers":[row]}).to_string())
        .create();
    let transcript = json!({"transcript":{"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"start":0,"limit":2,"total_items":2,
        "items":[{"sequence":1,"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"role":"user","content":"hi","event_id":3},
                 {"sequence":2,"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"role":"system","content":"note","event_id":4}],
        "next_start":null}});
    server
        .mock("GET", "/v1/workers/w-1/transcript")
        .match_query(Matcher::AllOf(vec![
            Matcher::UrlEncoded("start".into(), "0".into()),
            Matcher::UrlEncoded("limit".into(), "2".into()),
        ]))
        .with_body(transcript.to_string())
        .create();
    let create = server
        .mock("POST", "/v1/workers")
        .match_header("content-type", Matcher::Regex("^application/json".into()))
        .match_body(Matcher::Json(json!({"intent":{"kind":"assistant"},"profile":{"kind":"named","value":"echo"}})))
        .with_body(json!({"worker": row}).to_string())
        .create();

    let gw = gateway_with_remote("base-shapes", &server.url(), "");
    let view = wait_health(&gw.base, "m", "healthy");
    assert_eq!((&view["status"], &view["profiles"], &view["worker_count"]), (&json!("running"), &json!([]), &json!(1)));
    let list = get(&gw.url("/api/runtimes/m/workers")).body;
    let w = &list["items"][0];
    assert_eq!(
        (&w["runtime_id"], &w["worker_id"], &w["label"], &w["profile"]),
        (&json!("m"), &json!("w-1"), &json!("reviewer"), &json!("default"))
    );
    assert_eq!(w["activity"], json!(null), "base runtimes do not report activity");
    let t = get(&gw.url("/api/runtimes/m/workers/w-1/transcript?limit=2"));
    assert_eq!(t.status, 200, "{:?}", t.body);
    assert_eq!(t.body["items"][1]["role"], "system");
    let created = post_json(&gw.url("/api/runtimes/m/workers"), &json!({"profile": "echo"}));
    assert_eq!(created.status, 201, "{:?}", created.body);
    create.assert();
    probe.assert();
    // A runtime without the interrupt extension answers 404 `not_found`: unsupported, not gone.
    let no_route = server
        .mock("POST", "/v1/workers/w-1/interrupt")
        .with_status(404)
        .with_body(json!({"error": {"code": "not_found", "message": "no route"}}).to_string())
        .create();
    let interrupt = post_raw(&gw.url("/api/runtimes/m/workers/w-1/interrupt"), None, "");
    assert_eq!((interrupt.status, interrupt.code()), (501, "remote_runtime_unsupported"), "{:?}", interrupt.body);
    no_route.assert();
}

#[test]
fn every_upstream_failure_has_its_code() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    let err = |code: &str| json!({"error":{"code":code,"message":"from upstream"}}).to_string();
    let cases: Vec<(&str, usize, String, u16, &str)> = vec![
        ("garbage", 200, "<html>hello</html>".into(), 502, "remote_runtime_malformed_response"),
        ("shape", 200, json!({"worker":{"id":1}}).to_string(), 502, "remote_runtime_malformed_response"),
        ("nokey", 200, json!({"workers":[]}).to_string(), 502, "remote_runtime_malformed_response"),
        ("unauth", 401, err("unauthorized"), 401, "remote_runtime_auth_failed"),
        ("forbid", 403, "no".into(), 401, "remote_runtime_auth_failed"),
        ("method", 405, "".into(), 501, "remote_runtime_unsupported"),
        ("notimpl", 501, "".into(), 501, "remote_runtime_unsupported"),
        ("boom", 500, err("store_io"), 502, "remote_runtime_http_error"),
        ("teapot", 418, "short and stout".into(), 502, "remote_runtime_http_error"),
        ("gone", 404, err("worker_not_found"), 404, "worker_not_found"),
        ("bad", 400, err("invalid_worker_id"), 400, "invalid_request"),
    ];
    for (id, status, body, _, _) in &cases {
        server.mock("GET", format!("/v1/workers/{id}").as_str()).with_status(*status).with_body(body).create();
    }
    let gw = gateway_with_remote("failures", &server.url(), "");
    for (id, _, _, want_status, want_code) in &cases {
        let a = get(&gw.url(&format!("/api/runtimes/m/workers/{id}")));
        assert_eq!((a.status, a.code()), (*want_status, *want_code), "case {id}: {:?}", a.body);
        assert_eq!((&a.body["error"]["runtime_id"], &a.body["error"]["worker_id"]), (&json!("m"), &json!(id)));
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(!message.contains("from upstream"), "the message is the gateway's own: {message}");
    }
    let boom = get(&gw.url("/api/runtimes/m/workers/boom")).body;
    assert_eq!((&boom["error"]["upstream_status"], &boom["error"]["upstream_code"]), (&json!(500), &json!("store_io")));
    assert_eq!(boom["error"]["upstream_message"], "from upstream", "the remote's explanation comes along");
    let bad = get(&gw.url("/api/runtimes/m/workers/bad")).body;
    assert_eq!(
        (&bad["error"]["upstream_code"], &bad["error"]["upstream_message"]),
        (&json!("invalid_worker_id"), &json!("from upstream"))
    );
    let teapot = get(&gw.url("/api/runtimes/m/workers/teapot")).body;
    assert!(teapot["error"].get("upstream_message").is_none(), "a body that is not an error says nothing: {teapot}");

    server.mock("POST", "/v1/workers/busy/input").with_status(409).with_body(err("worker_busy")).create();
    server.mock("POST", "/v1/workers/big/input").with_status(413).with_body(err("payload_too_large")).create();
    let busy = post_json(&gw.url("/api/runtimes/m/workers/busy/input"), &json!({"content":"x"}));
    assert_eq!(
        (busy.status, busy.code(), &busy.body["error"]["upstream_code"]),
        (409, "worker_busy", &json!("worker_busy"))
    );
    let big = post_json(&gw.url("/api/runtimes/m/workers/big/input"), &json!({"content":"x"}));
    assert_eq!((big.status, big.code()), (413, "payload_too_large"));
}

#[test]
fn auth_and_incompatible_runtimes_show_in_health() {
    let mut locked = Server::new();
    locked.mock("GET", "/v1/runtime").with_status(401).with_body("{}").create();
    let mut html = Server::new();
    html.mock("GET", "/v1/runtime").with_body("<html>a web page</html>").create();
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"locked\"\nkind = \"remote\"\nbase_url = \"{}\"\n\n[[runtimes]]\nid = \"html\"\nkind = \"remote\"\nbase_url = \"{}\"\n",
        locked.url(),
        html.url()
    ))
    .replace("threads = 4\n", "");
    let gw = TestGateway::start("health-states", &config);
    let view = wait_health(&gw.base, "locked", "auth_failed");
    assert_eq!(view["health"]["last_error"]["code"], "remote_runtime_auth_failed");
    assert_eq!(view["status"], "unavailable");
    wait_health(&gw.base, "html", "incompatible");
    let all = get(&gw.url("/api/workers")).body;
    assert_eq!(
        all["runtimes"][1]["error"]["code"], "remote_runtime_auth_failed",
        "skipped at once with its last error"
    );
    // The gateway has no token for it here: the words fit a missing token as well as a wrong one.
    let said = all["runtimes"][1]["error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("token for it is missing or wrong"), "{said}");
    assert_eq!(all["runtimes"][2]["error"]["code"], "remote_runtime_malformed_response");
}

/// The `worker_gateway_runtime_ready` sample of `runtime`.
fn ready_metric(gw: &TestGateway, runtime: &str) -> Option<String> {
    let text = agent().get(&gw.url("/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
    let series = format!("worker_gateway_runtime_ready{{runtime=\"{runtime}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str())).map(str::to_owned)
}

#[test]
fn readiness_follows_the_probe() {
    let mut failing = Server::new();
    let fire = json!({"error":{"code":"store_io","message":"disk on fire"}}).to_string();
    let probe_500 = failing.mock("GET", "/v1/runtime").with_status(500).with_body(&fire).create();
    failing.mock("GET", "/v1/workers").with_status(500).with_body(&fire).create();
    let mut rejecting = Server::new();
    rejecting
        .mock("GET", Matcher::Any)
        .with_status(400)
        .with_body(json!({"error":{"code":"invalid_request","message":"no"}}).to_string())
        .create();
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"failing\"\nkind = \"remote\"\nbase_url = \"{}\"\nprobe_interval_ms = 100\n\n\
         [[runtimes]]\nid = \"rejecting\"\nkind = \"remote\"\nbase_url = \"{}\"\nprobe_interval_ms = 100\n",
        failing.url(),
        rejecting.url()
    ))
    .replace("threads = 4\n", "");
    let gw = TestGateway::start("readiness", &config);

    let view = wait_health(&gw.base, "failing", "unreachable");
    assert_eq!(
        (&view["health"]["last_error"]["code"], &view["status"]),
        (&json!("remote_runtime_http_error"), &json!("unavailable"))
    );
    let view = wait_health(&gw.base, "rejecting", "incompatible");
    assert_eq!(view["health"]["last_error"]["code"], "remote_runtime_http_error");
    let ready = get(&gw.url("/readyz"));
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    let states: Vec<_> = ready.body["runtimes"].as_array().unwrap().iter().map(|r| r["state"].clone()).collect();
    assert_eq!(states, [json!("healthy"), json!("unreachable"), json!("incompatible")]);
    for (runtime, want) in [("local", "1"), ("failing", "0"), ("rejecting", "0")] {
        assert_eq!(ready_metric(&gw, runtime).as_deref(), Some(want), "{runtime}");
    }

    // A request's own 5xx does not make the runtime look ready; its explanation comes along.
    let listed = get(&gw.url("/api/runtimes/failing/workers"));
    assert_eq!((listed.status, listed.code()), (502, "remote_runtime_http_error"));
    assert_eq!(listed.body["error"]["upstream_message"], "disk on fire");
    assert_eq!(get(&gw.url("/api/runtimes/failing")).body["health"]["state"], "unreachable");
    let all = get(&gw.url("/api/workers")).body;
    assert_eq!(all["runtimes"][1]["error"]["code"], "remote_runtime_http_error", "skipped at once: {all}");

    // The probe answers again: ready again (degraded while the failures are recent).
    probe_500.remove();
    failing.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    wait_for("the failing runtime to be ready", Duration::from_secs(10), || {
        (ready_metric(&gw, "failing").as_deref() == Some("1")).then_some(())
    });
    let state = get(&gw.url("/api/runtimes/failing")).body["health"]["state"].clone();
    assert!(state == "degraded" || state == "healthy", "{state}");
    assert_eq!(get(&gw.url("/readyz")).status, 503, "the rejecting runtime is still not ready");
}

#[test]
fn a_rejection_reaches_the_user_with_the_remote_explanation() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    let said = "unknown profile `upper`; this runtime has: echo";
    server
        .mock("POST", "/v1/workers")
        .with_status(400)
        .with_body(json!({"error":{"code":"invalid_request","message":said}}).to_string())
        .create();
    let gw = gateway_with_remote("explained", &server.url(), "");
    let a = post_json(&gw.url("/api/runtimes/m/workers"), &json!({"profile": "upper"}));
    assert_eq!((a.status, a.code()), (400, "invalid_request"), "{:?}", a.body);
    assert_eq!(
        (&a.body["error"]["upstream_code"], &a.body["error"]["upstream_message"]),
        (&json!("invalid_request"), &json!(said))
    );
}

/// The base API refuses input to a worker that is not running with a 400 `invalid_request`;
/// the gateway asks the worker why. A worker deleted meanwhile (a delete racing the input)
/// is not found (it said `invalid_request`, as for a bad input).
#[test]
fn input_refused_because_its_worker_went_is_not_found() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    let said = "the worker is stopped: only a running worker takes input";
    server
        .mock("POST", "/v1/workers/w-1/input")
        .with_status(400)
        .with_body(json!({"error":{"code":"invalid_request","message":said}}).to_string())
        .create();
    server
        .mock("GET", "/v1/workers/w-1")
        .with_status(404)
        .with_body(json!({"error":{"code":"worker_not_found","message":"no such worker"}}).to_string())
        .create();
    let gw = gateway_with_remote("input-gone", &server.url(), "");
    let a = post_json(&gw.url("/api/runtimes/m/workers/w-1/input"), &json!({"content": "hi"}));
    assert_eq!((a.status, a.code()), (404, "worker_not_found"), "{:?}", a.body);
    assert_eq!(a.body["error"]["upstream_message"], json!(said));
}

/// A remote's error answer of megabytes costs the gateway a small part of it: the body is
/// read up to 1 MiB (past it, the answer is its status alone) and the message checked up
/// to 64 KiB (a 62 MB message took the gateway to 1.4 GB, the check holding 22 times its
/// size); a long message is cut to 512 characters.
#[test]
fn a_huge_error_message_costs_little_and_is_cut() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    let error = |said: String| json!({"error":{"code":"invalid_request","message":said}}).to_string();
    server.mock("POST", "/v1/workers").with_status(400).with_body(error("x".repeat(32 << 20))).create();
    server.mock("POST", "/v1/workers/w-1/input").with_status(400).with_body(error("y".repeat(900 << 10))).create();
    server.mock("GET", "/v1/workers/w-1").with_body(json!({"worker": fake_row("w-1", "running")}).to_string()).create();
    let config = write_config(
        "huge-error",
        &memory_config(&format!(
            "[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{}\"\nprobe_interval_ms = 60000\n",
            server.url()
        ))
        .replace("threads = 4\n", ""),
    );
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    let a = post_json(&gw.url("/api/runtimes/m/workers"), &json!({"profile": "echo"}));
    assert_eq!((a.status, a.code()), (502, "remote_runtime_http_error"), "{:?}", a.body);
    assert_eq!(a.body["error"]["upstream_status"], 400);
    let a = post_json(&gw.url("/api/runtimes/m/workers/w-1/input"), &json!({"content": "hi"}));
    assert_eq!((a.status, a.code()), (400, "invalid_request"), "{:?}", a.code());
    assert_eq!(a.body["error"]["upstream_message"].as_str().map(|m| m.chars().count()), Some(513));
    let peak_kib = status_field(gw.child.id(), "VmHWM:");
    assert!(peak_kib < 64 << 10, "the gateway peaked at {peak_kib} KiB");
}

#[test]
fn a_hanging_runtime_times_out_within_its_budget() {
    let (url, accepted) = black_hole();
    let gw = gateway_with_remote("hang", &url, "read_timeout_ms = 1000\nprobe_timeout_ms = 300\n");
    let started = Instant::now();
    let a = get(&gw.url("/api/runtimes/m/workers/w-1"));
    let elapsed = started.elapsed();
    assert_eq!((a.status, a.code()), (504, "remote_runtime_timeout"));
    assert!(a.body["error"]["message"].as_str().unwrap().contains("1000 ms"));
    assert!(elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_millis(1100), "took {elapsed:?}");
    assert!(accepted.try_iter().count() >= 1);
    let listing_started = Instant::now();
    let listed = get(&gw.url("/api/runtimes"));
    assert_eq!(listed.status, 200);
    assert!(listing_started.elapsed() < Duration::from_millis(200), "listings never wait on a remote");
}

#[test]
fn a_refused_connection_is_unreachable_at_once() {
    let (port, _refusing) = refusing_port();
    let gw = gateway_with_remote("refused", &format!("http://127.0.0.1:{port}"), "connect_timeout_ms = 500\n");
    let a = post_json(&gw.url("/api/runtimes/m/workers"), &json!({}));
    assert_eq!((a.status, a.code()), (502, "remote_runtime_unreachable"));
    assert_eq!(a.body["error"]["retryable"], true, "nothing was sent: {:?}", a.body);
    wait_health(&gw.base, "m", "unreachable");
}

/// A name that does not resolve: nothing was sent, so a create is safe to repeat (not "may
/// have applied").
#[test]
fn an_unresolvable_runtime_is_unreachable_and_nothing_was_sent() {
    let gw = gateway_with_remote("unresolvable", "http://no-such-runtime.invalid:38800", "connect_timeout_ms = 2000\n");
    let a = post_json(&gw.url("/api/runtimes/m/workers"), &json!({}));
    assert_eq!((a.status, a.code()), (502, "remote_runtime_unreachable"), "{:?}", a.body);
    assert_eq!(a.body["error"]["retryable"], true, "{:?}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap_or("");
    assert!(!message.contains("may have applied") && !message.contains("no-such-runtime"), "{message}");
}

#[test]
fn sixty_four_hung_requests_do_not_stop_the_embedded_runtime() {
    let (url, accepted) = black_hole();
    let gw = gateway_with_remote("bulkhead", &url, "max_in_flight = 64\nread_timeout_ms = 100000\n");
    // 64 requests in flight = 64 upstream connections (plus the first probe).
    let (hung, held) = hang_requests(&gw.url("/api/runtimes/m/workers/w-1"), 64, &accepted, 65);

    let over = get(&gw.url("/api/runtimes/m/workers/w-1"));
    assert_eq!((over.status, over.code()), (503, "overloaded"));
    assert_eq!(over.header("retry-after"), Some("1"));
    // So is an events upgrade, which reads the worker's snapshot first (README: 503 before
    // the upgrade).
    let events = gw.url("/api/runtimes/m/workers/w-1/events/ws").replace("http://", "ws://");
    assert_eq!(ws_connect(&events, &[]).err(), Some(503));
    // The embedded runtime keeps answering (each request is bounded by the client's timeout;
    // how fast is the bench's business, P5).
    for _ in 0..20 {
        let id = create_worker(&gw.base, "echo");
        assert_eq!(get(&gw.url(&format!("/api/runtimes/local/workers/{id}"))).status, 200);
    }
    assert_eq!(get(&gw.url("/healthz")).status, 200);
    drop(held); // the runtime "answers" by closing: every hung request ends
    for h in hung {
        assert_eq!(h.join().unwrap(), 502);
    }
}

#[test]
fn a_hung_runtime_is_listed_as_not_answering_and_asked_once() {
    let (url, accepted) = black_hole();
    let gw = gateway_with_remote("list-hang", &url, "read_timeout_ms = 20000\nprobe_timeout_ms = 20000\n");
    for _ in 0..2 {
        let all = get(&gw.url("/api/workers"));
        assert_eq!(all.status, 200);
        assert_eq!(all.body["runtimes"][0]["state"], "ok", "the others are listed: {}", all.body);
        let hung = &all.body["runtimes"][1];
        assert_eq!((&hung["state"], &hung["error"]["code"]), (&json!("error"), &json!("remote_runtime_timeout")));
    }
    // Its first probe and one listing call: the second listing waited for the call in flight.
    let connections: Vec<TcpStream> = accepted.try_iter().collect();
    assert_eq!(connections.len(), 2);
}

/// A runtime down because it does not answer in time is listed in words that agree with its
/// code (it used to say "unreachable" beside `remote_runtime_timeout`).
#[test]
fn a_silent_runtime_skipped_in_a_listing_is_said_to_be_not_answering() {
    let (url, _accepted) = black_hole();
    let gw = gateway_with_remote("list-silent", &url, "probe_timeout_ms = 300\n");
    wait_health(&gw.base, "m", "unreachable");
    let all = get(&gw.url("/api/workers")).body;
    let error = &all["runtimes"][1]["error"];
    assert_eq!(error["code"], "remote_runtime_timeout", "{all}");
    assert_eq!(error["message"], "runtime `m` is not answering in time; skipped without asking it", "{all}");
}

/// The fake base runtime of one worker, `FAKE_WORKER`: its event streams send the snapshot,
/// then do `then` with the connection and the event id its cursor names, if any. Its URL,
/// the server (to unblock) and a count of the streams opened.
fn fake_streaming_runtime(
    then: fn(&mut tungstenite::WebSocket<Box<dyn tiny_http::ReadWrite + Send>>, Option<u64>),
) -> (String, std::sync::Arc<tiny_http::Server>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("fake runtime"));
    let base_url = format!("http://{}", server.server_addr().to_ip().expect("ip"));
    let upgrades = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (srv, count) = (server.clone(), upgrades.clone());
    std::thread::spawn(move || {
        let worker_ref = json!({"runtime_id": "rt-m", "worker_id": FAKE_WORKER});
        let detail = json!({"worker_ref": worker_ref, "runtime_id": "rt-m", "worker_id": FAKE_WORKER,
            "status": "running", "intent": {"kind": "assistant"}, "profile": {"kind": "named", "value": "echo"},
            "requested_capability_count": 0, "has_config_bundle": false, "transcript_len": 0, "last_event_id": 1});
        while let Ok(Ok(request)) = srv.recv() {
            let path = request.url().split('?').next().unwrap_or("").to_owned();
            let body = match path.as_str() {
                "/v1/runtime" => runtime_body(),
                p if p == format!("/v1/workers/{FAKE_WORKER}") => json!({"worker": detail}),
                p if p == format!("/v1/workers/{FAKE_WORKER}/transcript") => json!({"transcript": {
                    "worker_ref": worker_ref, "start": 0, "limit": 256, "total_items": 0, "items": [],
                    "next_start": null}}),
                p if p == format!("/v1/workers/{FAKE_WORKER}/events/ws") => {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let cursor =
                        request.url().split("cursor=wo_").nth(1).and_then(|hex| u64::from_str_radix(hex, 16).ok());
                    let key = request.headers().get("Sec-WebSocket-Key").map(|v| v.as_str().to_owned());
                    let accept = tungstenite::handshake::derive_accept_key(key.unwrap_or_default().as_bytes());
                    let header =
                        tiny_http::Header::from_bytes("Sec-WebSocket-Accept", accept.as_bytes()).expect("header");
                    let response = tiny_http::Response::empty(101).with_header(header);
                    let Ok(stream) = request.upgrade("websocket", response) else { continue };
                    let mut ws =
                        tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Server, None);
                    let greeting = json!({"worker_name": FAKE_WORKER, "cwd": "", "provider": "p", "model": "m",
                        "scope_summary": "", "tools": [], "context_window": 0, "context_tokens": 0});
                    let snapshot = json!({"kind": "event", "envelope": {"cursor": "wo_0000000000000001",
                        "event_id": "snapshot:wo_0000000000000001", "worker_id": FAKE_WORKER,
                        "payload": {"event": "snapshot", "data": {"entries": [], "greeting": greeting, "status": "idle"}}}});
                    if ws.send(tungstenite::Message::text(snapshot.to_string())).is_ok() {
                        std::thread::spawn(move || then(&mut ws, cursor));
                    }
                    continue;
                }
                _ => json!({"error": {"code": "not_found", "message": "no route"}}),
            };
            let _ = request.respond(tiny_http::Response::from_string(body.to_string()));
        }
    });
    (base_url, server, upgrades)
}

const FAKE_WORKER: &str = "worker-00000001";

/// The event stream of the fake runtime's worker through the gateway at `base`.
fn fake_worker_events(base: &str) -> String {
    format!("{}/api/runtimes/m/workers/{FAKE_WORKER}/events/ws", base.replace("http://", "ws://"))
}

/// An event frame of the fake runtime: `text_delta` with `text`, at runtime event id `seq`.
fn fake_event(seq: u64, text: &str) -> tungstenite::Message {
    let cursor = format!("wo_{seq:016x}");
    let frame = json!({"kind": "event", "envelope": {"cursor": cursor, "event_id": cursor, "worker_id": FAKE_WORKER,
        "payload": {"event": "text_delta", "data": {"text": text}}}});
    tungstenite::Message::text(frame.to_string())
}

/// A runtime whose event stream breaks at the same frame on every connection (one the relay
/// cannot read) is reconnected with a growing backoff, not ten times a second for ever
/// (each connection opens fine, so it used to reset the backoff), and its browsers are told
/// once why the stream stands still (and so are browsers joining it meanwhile), not
/// "reconnecting" and "resumed: no event was missed" at every attempt.
#[test]
fn a_frame_the_relay_cannot_read_is_told_once_and_retried_with_a_growing_backoff() {
    let (base_url, server, upgrades) = fake_streaming_runtime(|ws, _| {
        let _ = ws.send(fake_event(2, "before"));
        let _ = ws.send(tungstenite::Message::text("not a frame the relay can read"));
    });
    let gw = gateway_with_remote("poison", &base_url, "");
    let url = fake_worker_events(&gw.base);
    let mut ws = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    assert_eq!(next_frame(&mut ws)["envelope"]["payload"]["data"]["text"], "before");
    let told = next_frame(&mut ws);
    assert_eq!(told["diagnostic"]["code"], "backend.event_unreadable", "{told}");
    let message = told["diagnostic"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not a JSON event or diagnostic"), "{message}");
    assert!(!message.contains(&base_url), "{message}");
    // Watch the reconnections for a while: every frame the browser gets meanwhile is wrong.
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    }
    let watched = Instant::now();
    let first = upgrades.load(std::sync::atomic::Ordering::SeqCst);
    let mut frames = Vec::new();
    while watched.elapsed() < Duration::from_secs(3) {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => frames.push(text.to_string()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the stream ended: {e}"),
        }
    }
    let reopened = upgrades.load(std::sync::atomic::Ordering::SeqCst) - first;
    // Backoff ceilings 0.1, 0.2, 0.4 … 5 s (jittered): a handful in 3 s; 100 ms each, 30 or more.
    assert!((1..15).contains(&reopened), "{reopened} reconnects in 3 s");
    assert!(frames.is_empty(), "told again at every attempt: {frames:?}");
    // A browser arriving now is told too, after what was relayed.
    let mut late = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut late)), "snapshot");
    assert_eq!(next_frame(&mut late)["envelope"]["payload"]["data"]["text"], "before");
    assert_eq!(next_frame(&mut late)["diagnostic"]["code"], "backend.event_unreadable");
    drop(ws);
    let _ = server.unblock();
}

/// A runtime that sends a frame the relay cannot read after each readable event (so every
/// connection makes progress) is reconnected with a growing backoff too: the progress used
/// to reset it, and the relay reconnected (and warned twice) about every 100 ms for ever.
#[test]
fn unreadable_frames_between_readable_ones_are_retried_with_a_growing_backoff() {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(2);
    let (base_url, server, upgrades) = fake_streaming_runtime(|ws, _| {
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = ws.send(fake_event(seq, "readable"));
        let _ = ws.send(tungstenite::Message::text("not a frame the relay can read"));
    });
    let gw = gateway_with_remote("poison-between", &base_url, "");
    let url = fake_worker_events(&gw.base);
    let mut ws = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    }
    let watched = Instant::now();
    let first = upgrades.load(std::sync::atomic::Ordering::SeqCst);
    let mut readable = 0;
    while watched.elapsed() < Duration::from_secs(3) {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => readable += usize::from(text.contains("\"readable\"")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the stream ended: {e}"),
        }
    }
    let reopened = upgrades.load(std::sync::atomic::Ordering::SeqCst) - first;
    assert!((1..15).contains(&reopened), "{reopened} reconnects in 3 s");
    assert!(readable >= 1, "what could be read was relayed");
    drop(ws);
    let _ = server.unblock();
}

/// Every kind of frame the relay cannot take as a next event — a binary frame, an event
/// without an envelope, an event id not above the last one, a frame that breaks the
/// WebSocket protocol, a close with a code WebSocket does not allow (it was taken for an
/// outage at every reconnection) — stops the stream there and is told, never dropped in
/// silence.
#[test]
fn frames_the_relay_cannot_take_are_told_not_dropped() {
    type Then = fn(&mut tungstenite::WebSocket<Box<dyn tiny_http::ReadWrite + Send>>, Option<u64>);
    let kinds: [(Then, &str); 5] = [
        (
            |ws, _| {
                let _ = ws.send(fake_event(2, "before"));
                let _ = ws.send(tungstenite::Message::binary(b"{}".to_vec()));
            },
            "a binary frame",
        ),
        (
            |ws, _| {
                let _ = ws.send(fake_event(2, "before"));
                let _ = ws.send(tungstenite::Message::text(r#"{"kind":"event"}"#));
            },
            "no envelope",
        ),
        (
            |ws, _| {
                let _ = ws.send(fake_event(2, "before"));
                let _ = ws.send(fake_event(2, "again"));
            },
            "not above the last one",
        ),
        (
            |ws, _| {
                use std::io::Write;
                let _ = ws.send(fake_event(2, "before"));
                // A text frame with a reserved bit set, written raw.
                let _ = ws.get_mut().write_all(&[0xc1, 0x02, b'{', b'}']);
                let _ = ws.get_mut().flush();
            },
            "breaks the WebSocket protocol",
        ),
        (
            |ws, _| {
                use std::io::Write;
                let _ = ws.send(fake_event(2, "before"));
                // A close frame with code 999, written raw (tungstenite would not send it).
                let _ = ws.get_mut().write_all(&[0x88, 0x02, 0x03, 0xe7]);
                let _ = ws.get_mut().flush();
            },
            "a code WebSocket does not allow",
        ),
    ];
    for (then, reason) in kinds {
        let (base_url, server, _) = fake_streaming_runtime(then);
        let gw = gateway_with_remote("poison-kinds", &base_url, "");
        let url = fake_worker_events(&gw.base);
        let mut ws = ws_connect(&url, &[]).expect("events");
        assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
        assert_eq!(next_frame(&mut ws)["envelope"]["payload"]["data"]["text"], "before", "{reason}");
        let told = next_frame(&mut ws);
        assert_eq!(told["diagnostic"]["code"], "backend.event_unreadable", "{reason}: {told}");
        assert!(told["diagnostic"]["message"].as_str().is_some_and(|m| m.contains(reason)), "{told}");
        let _ = server.unblock();
    }
}

/// A snapshot in the middle of a runtime's stream (only a connection's first item is one) is
/// an event the gateway cannot show as one: its place is kept, as an event that only says it
/// came, never skipped in silence (it used to vanish between its neighbours).
#[test]
fn a_snapshot_in_the_middle_of_a_stream_keeps_its_place() {
    let (base_url, server, _) = fake_streaming_runtime(|ws, _| {
        let _ = ws.send(fake_event(2, "before"));
        let snapshot = json!({"kind": "event", "envelope": {"cursor": "wo_0000000000000003",
            "event_id": "wo_0000000000000003", "worker_id": FAKE_WORKER,
            "payload": {"event": "snapshot", "data": {"entries": [{"content": "not yours"}], "status": "idle"}}}});
        let _ = ws.send(tungstenite::Message::text(snapshot.to_string()));
        let _ = ws.send(fake_event(4, "after"));
        let _ = ws.read(); // hold the connection open
    });
    let gw = gateway_with_remote("mid-snapshot", &base_url, "");
    let url = fake_worker_events(&gw.base);
    let mut ws = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    assert_eq!(next_frame(&mut ws)["envelope"]["payload"]["data"]["text"], "before");
    let kept = next_frame(&mut ws);
    assert_eq!(kept["envelope"]["payload"], json!({"event": "unrecognised_event"}), "{kept}");
    assert!(kept["envelope"]["cursor"].as_str().is_some_and(|c| c.ends_with("0000000000000003")), "{kept}");
    assert_eq!(next_frame(&mut ws)["envelope"]["payload"]["data"]["text"], "after");
    let _ = server.unblock();
}

/// A runtime that trickles a frame a byte at a time cannot hold a relay: the relay still
/// checks, between reads, whether anyone watches, and closes the upstream once its last
/// browser has left (it used to sit inside the frame's read for as long as bytes came).
#[test]
fn a_frame_trickled_a_byte_at_a_time_does_not_keep_a_relay_without_browsers() {
    static UPSTREAM_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let (base_url, server, _) = fake_streaming_runtime(|ws, _| {
        use std::io::Write;
        // The header of a 1 MiB text frame, then its payload at 20 bytes a second.
        let mut header = vec![0x81u8, 127];
        header.extend_from_slice(&(1u64 << 20).to_be_bytes());
        let started = Instant::now();
        for byte in header.into_iter().chain(std::iter::repeat(b'x')) {
            if started.elapsed() > Duration::from_secs(60) {
                return;
            }
            if ws.get_mut().write_all(&[byte]).and_then(|()| ws.get_mut().flush()).is_err() {
                UPSTREAM_CLOSED.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(50)); // the trickle's pace
        }
    });
    let gw = gateway_with_remote("trickled-frame", &base_url, "");
    let url = fake_worker_events(&gw.base);
    let mut ws = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    drop(ws);
    wait_for("the relay to close its upstream", Duration::from_secs(30), || {
        UPSTREAM_CLOSED.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    });
    let _ = server.unblock();
}

/// An event larger than tungstenite's default frame limit (16 MiB; an input that large is
/// acknowledged by a runtime configured for it) is relayed, and so is what follows it.
#[test]
fn an_event_larger_than_16_mib_is_relayed() {
    let (base_url, server, _) = fake_streaming_runtime(|ws, _| {
        let _ = ws.send(fake_event(2, &"x".repeat(17 << 20)));
        let _ = ws.send(fake_event(3, "after"));
        // Hold the connection open: the relay reads both before it would reconnect.
        let _ = ws.read();
    });
    let gw = gateway_with_remote("big-event", &base_url, "");
    let url = fake_worker_events(&gw.base);
    let config = tungstenite::protocol::WebSocketConfig::default().max_frame_size(None).max_message_size(None);
    let (mut ws, _) = tungstenite::client::connect_with_config(url.as_str(), Some(config), 3).expect("events");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    }
    let mut texts = Vec::new();
    while texts.len() < 2 {
        match ws.read().expect("a frame") {
            tungstenite::Message::Text(text) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                match event_name(&frame).as_str() {
                    "text_delta" => {
                        texts.push(frame["envelope"]["payload"]["data"]["text"].as_str().unwrap_or("").len())
                    }
                    "snapshot" => {}
                    _ => panic!("{}", text.as_str().chars().take(300).collect::<String>()),
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(texts, [17 << 20, 5]);
    drop(ws);
    let _ = server.unblock();
}

/// Large frames from many runtimes at once are read two at a time past their first MiB,
/// and a connection that read one is replaced (resuming after it) as soon as its stream is
/// quiet while others wait: eight runtimes sending a 16 MB event at the same moment held all
/// eight at once (sixteen of 60 MB took the gateway past 1.7 GB).
#[test]
fn large_frames_from_many_runtimes_are_read_a_few_at_a_time() {
    let (base_url, server, upgrades) = fake_streaming_runtime(|ws, after| {
        if after.is_none_or(|after| after < 2) {
            let _ = ws.send(fake_event(2, &"x".repeat(16 << 20)));
        }
        let _ = ws.read(); // held open
    });
    let gw = gateway_with_remotes("large-frames", &base_url, 8, 60_000);
    for i in 0..8 {
        wait_health(&gw.base, &format!("m{i}"), "healthy");
    }
    let browsers: Vec<_> = (0..8)
        .map(|i| {
            let url = fake_worker_events(&gw.base).replace("/runtimes/m/", &format!("/runtimes/m{i}/"));
            std::thread::spawn(move || {
                let config =
                    tungstenite::protocol::WebSocketConfig::default().max_frame_size(None).max_message_size(None);
                let (mut ws, _) =
                    tungstenite::client::connect_with_config(url.as_str(), Some(config), 3).expect("events");
                if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
                    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
                }
                loop {
                    let text = ws.read().expect("a frame").into_text().expect("text");
                    let frame: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                    if event_name(&frame) == "text_delta" {
                        return frame["envelope"]["payload"]["data"]["text"].as_str().map_or(0, str::len);
                    }
                }
            })
        })
        .collect();
    for browser in browsers {
        assert_eq!(browser.join().expect("browser"), 16 << 20, "every browser has its event");
    }
    let peak_kib = status_field(gw.child.id(), "VmHWM:");
    eprintln!("peak {peak_kib} KiB, {} upstream connections", upgrades.load(std::sync::atomic::Ordering::SeqCst));
    assert!(peak_kib < 128 << 10, "the gateway peaked at {peak_kib} KiB");
    let _ = server.unblock();
}

/// A runtime that floods pings and never reads the pongs costs the gateway no memory
/// beyond its socket buffers (pongs queued without limit once grew it by 190 MB/s).
#[test]
fn a_runtime_flooding_pings_it_never_reads_the_pongs_of_costs_no_memory() {
    let (base_url, server, _) = fake_streaming_runtime(|ws, _| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            if ws.send(tungstenite::Message::Ping(vec![0; 125].into())).is_err() {
                return;
            }
        }
    });
    let config = write_config(
        "ping-flood",
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{base_url}\"\n"
        ),
    );
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    let url = fake_worker_events(&gw.base);
    let mut ws = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    let before = status_field(gw.child.id(), "VmRSS:");
    std::thread::sleep(Duration::from_secs(3)); // the flood goes on meanwhile: nothing to wait for
    let after = status_field(gw.child.id(), "VmRSS:");
    assert!(after < before + 64 * 1024, "RSS {before} KiB → {after} KiB under a ping flood");
    drop(ws);
    let _ = server.unblock();
}

/// Twenty hung runtimes listed before a quick one: they delay only themselves, in the first
/// listing (its calls to them count as slow after a moment) and in the next ones (which
/// join their calls still in flight).
#[test]
fn hung_runtimes_delay_only_themselves_in_a_listing_of_all() {
    let holes: Vec<_> = (0..20).map(|_| black_hole()).collect();
    let mut extra = String::new();
    for (n, (url, _)) in holes.iter().enumerate() {
        extra.push_str(&format!(
            "[[runtimes]]\nid = \"hole{n}\"\nkind = \"remote\"\nbase_url = \"{url}\"\nread_timeout_ms = 20000\n\
             probe_timeout_ms = 20000\nprobe_interval_ms = 60000\n\n"
        ));
    }
    extra.push_str("[[runtimes]]\nid = \"late\"\nkind = \"embedded\"\nstore = \"memory\"\n");
    let gw = TestGateway::start("list-behind-hung", &memory_config(&extra).replace("threads = 4\n", ""));
    for _ in 0..3 {
        let all = get(&gw.url("/api/workers")).body;
        let states = all["runtimes"].as_array().expect("runtimes");
        let late = states.iter().find(|r| r["runtime_id"] == "late").expect("late");
        assert_eq!(late["state"], "ok", "{all}");
        for hole in states.iter().filter(|r| r["runtime_id"].as_str().is_some_and(|id| id.starts_with("hole"))) {
            assert_eq!(hole["error"]["code"], "remote_runtime_timeout", "{hole}");
        }
    }
    drop(holes);
}

/// A base runtime that reports its worker's last event late (`last_event_id` stays 1 while
/// events 2…5 stream): a browser back with a cursor this gateway just gave it resumes after
/// it; only a cursor ahead of every event seen counts as not of this stream.
#[test]
fn a_cursor_the_relay_saw_is_resumed_even_where_the_runtime_reports_late() {
    let (base_url, server, _) = fake_streaming_runtime(|ws, _| {
        for seq in 2..=5 {
            let _ = ws.send(fake_event(seq, &format!("e{seq}")));
        }
        let _ = ws.read(); // held open
    });
    let gw = gateway_with_remote("late-position", &base_url, "");
    let url = fake_worker_events(&gw.base);
    let mut first = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut first)), "snapshot");
    let cursors: Vec<String> =
        (2..=5).map(|_| next_frame(&mut first)["envelope"]["cursor"].as_str().expect("cursor").to_owned()).collect();
    let mut back = ws_connect(&format!("{url}?cursor={}", cursors[2]), &[]).expect("events");
    let resumed = next_frame(&mut back);
    assert_eq!(resumed["envelope"]["cursor"], cursors[3].as_str(), "the event after the cursor: {resumed}");
    assert_eq!(resumed["envelope"]["payload"]["data"]["text"], "e5");
    // A cursor past everything seen is still not one of this stream.
    let ahead = format!("{}{:016x}", &cursors[3][..cursors[3].len() - 16], 9);
    let mut forged = ws_connect(&format!("{url}?cursor={ahead}"), &[]).expect("events");
    let told = next_frame(&mut forged);
    assert_eq!((&told["kind"], &told["state"]), (&json!("stream"), &json!("reset")), "{told}");
    drop((first, back, forged));
    let _ = server.unblock();
}

/// A remote's listing of 150 000 workers (61 MB, under the 64 MB cap on an answer) costs the
/// gateway a small multiple of its size: it used to go through two `Value` trees, 840 MB at
/// the peak for one listing (3.7 GB for four at once, kept afterwards).
#[test]
fn a_huge_listing_costs_a_small_multiple_of_its_size() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    // Ids of letters: one of digits could hold the mock's port, and be withheld.
    let id = |mut i: u32| -> String {
        let mut id = String::from("w-");
        for _ in 0..4 {
            id.push(char::from(b'a' + (i % 26) as u8));
            i /= 26;
        }
        id
    };
    let rows: Vec<String> = (0..150_000)
        .map(|i| {
            json!({"worker_ref":{"runtime_id":"rt-m","worker_id":id(i)},"runtime_id":"rt-m",
                "worker_id":id(i),"status":"running","intent":{"kind":"task","objective":"x".repeat(60)},
                "profile":{"kind":"runtime_default"},"requested_capability_count":0,"has_config_bundle":false,
                "transcript_len":2,"last_event_id":7})
            .to_string()
        })
        .collect();
    let body = format!("{{\"workers\":[{}]}}", rows.join(","));
    assert!(body.len() > 40 << 20, "{} bytes", body.len());
    drop(rows);
    server.mock("GET", "/v1/workers").with_body(body).create();
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{}\"\nprobe_interval_ms = 60000\n",
        server.url()
    ))
    .replace("threads = 4\n", "");
    let path = write_config("huge-listing", &config);
    let gw = Process::start_with_env(&["serve", "--config", path.to_str().unwrap()], &[]);
    let mut answer = agent().get(&gw.url("/api/runtimes/m/workers")).call().expect("answered");
    assert_eq!(answer.status(), 200);
    let bytes = answer.body_mut().with_config().limit(256 << 20).read_to_vec().expect("the listing");
    let list: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(150_000));
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.child.id())).expect("its status");
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    assert!(peak_kb < 400 << 10, "peak {peak_kb} kB for a listing of {} MB", bytes.len() >> 20);
}

/// `count` remotes, all at `base_url`, probed every `probe_ms`: a gateway process.
fn gateway_with_remotes(name: &str, base_url: &str, count: usize, probe_ms: u64) -> Process {
    let remotes: String = (0..count)
        .map(|i| {
            format!("[[runtimes]]\nid = \"m{i}\"\nkind = \"remote\"\nbase_url = \"{base_url}\"\nprobe_interval_ms = {probe_ms}\n")
        })
        .collect();
    let path = write_config(name, &memory_config(&remotes).replace("threads = 4\n", ""));
    Process::start_with_env(&["serve", "--config", path.to_str().unwrap()], &[])
}

/// A runtime whose summary (what every probe reads) is 32 MB costs the gateway little: a
/// summary is read up to 256 KiB, and the runtime shows as answering wrongly (20 of them,
/// each probed every 200 ms, read 32 MB each time and took the gateway past 1 GB).
#[test]
fn a_huge_runtime_summary_is_not_read_by_every_probe() {
    let mut server = Server::new();
    let huge = format!("{{\"runtime\":\"{}\"}}", "x".repeat(32 << 20));
    let probes = server.mock("GET", "/v1/runtime").with_body(huge).expect_at_least(40).create();
    let gw = gateway_with_remotes("huge-summary", &server.url(), 20, 200);
    wait_for("two probes of each runtime", Duration::from_secs(20), || probes.matched().then_some(()));
    let runtimes = get(&gw.url("/api/runtimes")).body;
    let remotes = runtimes["items"].as_array().expect("runtimes").iter().filter(|r| r["runtime_id"] != "local");
    let states: Vec<_> = remotes.map(|r| &r["health"]["last_error"]["code"]).collect();
    assert!(states.iter().all(|c| *c == "remote_runtime_malformed_response"), "{runtimes}");
    let peak_kib = status_field(gw.child.id(), "VmHWM:");
    assert!(peak_kib < 64 << 10, "the gateway peaked at {peak_kib} KiB");
}

/// Large answers from many runtimes at once are read two at a time past their first MiB: a
/// listing over 16 runtimes answering 12 MB each held all 16 answers at once (the 40 MB of
/// the outside attack took it to 1 GB); now about two.
#[test]
fn large_answers_from_many_runtimes_are_read_a_few_at_a_time() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    let garbage = format!("{{\"workers\":[\"{}", "x".repeat(12 << 20));
    let lists = server.mock("GET", "/v1/workers").with_body(garbage).expect_at_least(16).create();
    let gw = gateway_with_remotes("large-answers", &server.url(), 16, 60_000);
    for name in ["m0", "m15"] {
        wait_health(&gw.base, name, "healthy");
    }
    // A listing that gives up on slow runtimes leaves their calls going; the next one joins
    // them, or asks again once they ended: until every runtime's answer was read and refused.
    wait_for("every runtime's answer refused", Duration::from_secs(30), || {
        let listing = get(&gw.url("/api/workers"));
        assert_eq!(listing.status, 200);
        let runtimes = listing.body["runtimes"].as_array()?.clone();
        let remotes = runtimes.iter().filter(|r| r["runtime_id"] != "local");
        remotes.into_iter().all(|r| r["error"]["code"] == "remote_runtime_malformed_response").then_some(())
    });
    assert!(lists.matched(), "16 answers of 12 MB");
    let peak_kib = status_field(gw.child.id(), "VmHWM:");
    assert!(peak_kib < 128 << 10, "the gateway peaked at {peak_kib} KiB");
}

/// A worker row of the fake base runtime `rt-m`.
fn fake_row(id: &str, status: &str) -> serde_json::Value {
    json!({"worker_ref":{"runtime_id":"rt-m","worker_id":id},"runtime_id":"rt-m","worker_id":id,
        "status":status,"intent":{"kind":"assistant"},"profile":{"kind":"runtime_default"},
        "requested_capability_count":0,"has_config_bundle":false,"transcript_len":3,"last_event_id":9})
}

/// What a remote sends is bounded as the gateway's own answers are: at most 256 profile
/// names (half a million made every runtime listing tens of megabytes), transcript pages of
/// at most 4 MiB (a 61 MB page went through whole), and a worker row the gateway cannot read
/// is left out rather than failing the runtime's whole listing.
#[test]
fn what_a_remote_sends_is_bounded_and_an_odd_row_costs_only_itself() {
    let mut server = Server::new();
    let mut summary = runtime_body();
    summary["runtime"]["profiles"] = json!((0..1000).map(|i| format!("p{i}")).collect::<Vec<_>>());
    server.mock("GET", "/v1/runtime").with_body(summary.to_string()).create();
    let mut thinking = fake_row("w-3", "running");
    thinking["activity"] = json!("thinking");
    let rows = json!({"workers": [fake_row("w-1", "running"), fake_row("w-2", "paused"), thinking]});
    server.mock("GET", "/v1/workers").with_body(rows.to_string()).create();
    let big = "x".repeat(3 << 20);
    let items: Vec<_> = (1..=3)
        .map(|n| {
            json!({"sequence":n,"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"role":"user",
            "content":big,"event_id":n})
        })
        .collect();
    let page = json!({"transcript":{"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"start":0,"limit":3,
        "total_items":3,"items":items,"next_start":null}});
    server.mock("GET", Matcher::Regex("^/v1/workers/w-1/transcript".into())).with_body(page.to_string()).create();

    let gw = gateway_with_remote("remote-bounds", &server.url(), "");
    let view = wait_health(&gw.base, "m", "healthy");
    let profiles = view["profiles"].as_array().expect("profiles");
    assert_eq!((profiles.len(), &profiles[0]), (256, &json!("p0")));
    let listed = get(&gw.url("/api/runtimes/m/workers"));
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let ids: Vec<&str> =
        listed.body["items"].as_array().unwrap().iter().filter_map(|w| w["worker_id"].as_str()).collect();
    assert_eq!(ids, ["w-1"], "the rows it cannot read are left out");
    assert_eq!(get(&gw.url("/api/runtimes/m")).body["health"]["state"], "healthy");
    let t = get(&gw.url("/api/runtimes/m/workers/w-1/transcript?limit=3"));
    assert_eq!(t.status, 200);
    assert_eq!((t.body["items"].as_array().map(Vec::len), &t.body["next_start"]), (Some(1), &json!(1)));
}

/// A remote whose transcript pages never end (each names the next, one entry further, with
/// none in it) cannot hold a browser's upgrade, a thread and a share of its bulkhead
/// forever: the snapshot reads at most a page's worth of pages, within a budget.
#[test]
fn transcript_pages_that_never_end_do_not_hold_an_upgrade() {
    let mut server = Server::new();
    server.mock("GET", "/v1/runtime").with_body(runtime_body().to_string()).create();
    let mut detail = fake_row("w-1", "running");
    detail["transcript_len"] = json!(u32::MAX);
    server.mock("GET", "/v1/workers/w-1").with_body(json!({"worker": detail}).to_string()).create();
    let pages = server
        .mock("GET", Matcher::Regex("^/v1/workers/w-1/transcript".into()))
        .with_body_from_request(|request| {
            let start: u64 = request
                .path_and_query()
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("start="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            json!({"transcript":{"worker_ref":{"runtime_id":"rt-m","worker_id":"w-1"},"start":start,"limit":256,
                "total_items":u32::MAX,"items":[],"next_start":start + 1}})
            .to_string()
            .into()
        })
        .expect_at_most(256)
        .create();
    let gw = gateway_with_remote("endless-pages", &server.url(), "");
    wait_health(&gw.base, "m", "healthy");
    let url = format!("{}/api/runtimes/m/workers/w-1/events/ws", gw.base.replace("http://", "ws://"));
    let (tx, answered) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(ws_connect(&url, &[("authorization", "Bearer tok-faults")]).map(drop));
    });
    let _upgrade = answered.recv_timeout(Duration::from_secs(20)).expect("the upgrade answered within its budget");
    pages.assert();
    assert_eq!(get(&gw.url("/api/runtimes/m/workers/w-1")).status, 200, "the runtime still serves");
}
