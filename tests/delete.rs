//! `DELETE` of a worker through the gateway (embedded and remote runtimes) and on the Runtime
//! API, and the Origin rule every state-changing request of the gateway follows.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn delete(url: &str, headers: &[(&str, &str)]) -> Answer {
    request("DELETE", url, headers)
}

fn listed(base: &str, rid: &str) -> Vec<String> {
    let list = get(&format!("{base}/api/runtimes/{rid}/workers"));
    assert_eq!(list.status, 200, "{:?}", list.body);
    list.body["items"].as_array().unwrap().iter().map(|w| w["worker_id"].as_str().unwrap().to_owned()).collect()
}

/// The whole delete story of one gateway runtime `rid`: running → 409, stopped → 200 and
/// gone, a second delete → 404, a worker still ending its turn → 409 until it is idle.
fn delete_lifecycle(base: &str, rid: &str) {
    let worker = |wid: &str| format!("{base}/api/runtimes/{rid}/workers/{wid}");
    let wid = create_worker_on(base, rid, "echo");
    let running = delete(&worker(&wid), &[]);
    assert_eq!((running.status, running.code()), (409, "worker_running"), "{:?}", running.body);
    assert_eq!((&running.body["error"]["runtime_id"], &running.body["error"]["worker_id"]), (&json!(rid), &json!(wid)));
    assert_eq!(get(&worker(&wid)).body["status"], "running", "a refused delete changes nothing");

    let stop = post_raw(&format!("{}/stop", worker(&wid)), None, "");
    assert_eq!((stop.status, &stop.body["ack"]["status"]), (200, &json!("stopped")));
    let deleted = delete(&worker(&wid), &[]);
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_eq!(deleted.body, json!({"deleted": {"runtime_id": rid, "worker_id": wid}}));
    let gone = get(&worker(&wid));
    assert_eq!((gone.status, gone.code()), (404, "worker_not_found"));
    assert!(!listed(base, rid).contains(&wid), "the list no longer has it");
    let transcript = get(&format!("{}/transcript", worker(&wid)));
    assert_eq!(transcript.code(), "worker_not_found");
    let again = delete(&worker(&wid), &[]);
    assert_eq!((again.status, again.code()), (404, "worker_not_found"));

    // Stopped, but its turn is still inside the stop grace: still running as far as delete goes.
    let hang = create_worker_on(base, rid, "hang");
    assert_eq!(post_json(&format!("{}/input", worker(&hang)), &json!({"content": "wait"})).status, 200);
    wait_for("the turn to start", Duration::from_secs(5), || {
        (get(&worker(&hang)).body["activity"] == "busy").then_some(())
    });
    let stop = post_raw(&format!("{}/stop", worker(&hang)), None, "");
    assert_eq!(stop.body["ack"]["status"], "stopped");
    let ending = delete(&worker(&hang), &[]);
    assert_eq!((ending.status, ending.code()), (409, "worker_running"), "the turn is still in its grace");
    assert_eq!(ending.body["error"]["retryable"], true, "a retry once the turn has ended succeeds");
    wait_for("the grace to end the turn", Duration::from_secs(10), || {
        (get(&worker(&hang)).body["activity"] == "idle").then_some(())
    });
    assert_eq!(delete(&worker(&hang), &[]).status, 200);
    assert!(!listed(base, rid).contains(&hang));
}

const PROFILES: &str = "[profiles.hang]\nkind = \"command\"\nargv = [\"sleep\", \"60\"]\nturn_timeout_ms = 60000\n";

#[test]
fn delete_on_the_embedded_runtime() {
    let gw = TestGateway::start("delete-embedded", &memory_config(""));
    delete_lifecycle(&gw.base, "local");

    let wrong = request("PUT", &gw.url("/api/runtimes/local/workers/w"), &[]);
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("GET, HEAD, DELETE")));
    let missing_rt = delete(&gw.url("/api/runtimes/nope/workers/w"), &[]);
    assert_eq!((missing_rt.status, missing_rt.code()), (404, "runtime_not_found"));
    let bad_id = delete(&gw.url("/api/runtimes/local/workers/a%20b"), &[]);
    assert_eq!((bad_id.status, bad_id.code()), (400, "invalid_id"));
    let metrics = agent().get(&gw.url("/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    for line in [
        "worker_gateway_http_requests_total{route=\"delete\",status=\"200\"} 2",
        "worker_gateway_http_requests_total{route=\"delete\",status=\"409\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

/// A browser watching a worker that gets deleted is told the worker is gone at once: no
/// "reconnecting" first, and the stream closes.
#[test]
fn a_watched_embedded_worker_that_is_deleted_ends_its_stream_honestly() {
    let gw = TestGateway::start("delete-watched", &memory_config(""));
    let wid = create_worker(&gw.base, "echo");
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).expect("upgrade");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    let stopped = post_json(&gw.url(&format!("/api/runtimes/local/workers/{wid}/stop")), &serde_json::json!({}));
    assert_eq!(stopped.status, 200);
    assert_eq!(delete(&gw.url(&format!("/api/runtimes/local/workers/{wid}")), &[]).status, 200);
    let (frames, code) = close_reason(&mut ws);
    let last = frames.last().expect("a frame before the close");
    assert_eq!(last["diagnostic"]["code"], "backend.worker_not_found", "{frames:?}");
    assert!(frames.iter().all(|f| f["kind"] != "stream"), "no reconnecting for a deleted worker: {frames:?}");
    assert_eq!(code, Some(1001));
}

#[test]
fn delete_on_a_remote_runtime_process_and_on_its_runtime_api() {
    let dir = temp_dir("delete-remote");
    let runtime_config = write_config("delete-remote-rt", &format!("[runtime]\nstop_grace_ms = 300\n{PROFILES}"));
    let (config_arg, dir_arg) = (runtime_config.to_str().unwrap(), dir.to_str().unwrap());
    let start = |bind: &str| {
        let args = ["runtime", "--config", config_arg, "--bind", bind, "--runtime-id", "rt-del"];
        let args = [&args[..], &["--data-dir", dir_arg, "--token-env", "DEL_TOKEN"]].concat();
        Process::start_with_env(&args, &[("DEL_TOKEN", "delete-token")])
    };
    let rt = start("127.0.0.1:0");
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"DEL_TOKEN\"\nprobe_interval_ms = 100\n",
        rt.base
    ))
    .replace("threads = 4\n", "");
    // SAFETY (test): the variable name is unique to this test.
    unsafe { std::env::set_var("DEL_TOKEN", "delete-token") };
    let gw = TestGateway::start("delete-remote", &config);
    wait_health(&gw.base, "lab", "healthy");
    delete_lifecycle(&gw.base, "lab");

    // The Runtime API itself.
    let auth = [("authorization", "Bearer delete-token")];
    let post = |path: &str, body: Value| {
        let request = ureq::http::Request::builder()
            .method("POST")
            .uri(rt.url(path))
            .header("authorization", "Bearer delete-token")
            .header("content-type", "application/json")
            .body(body.to_string())
            .unwrap();
        let mut response = agent().run(request).expect("answered");
        (response.status().as_u16(), response.body_mut().read_json::<Value>().unwrap_or(Value::Null))
    };
    let (status, created) = post(
        "/v1/workers",
        json!({"intent": {"kind": "task", "objective": "x"}, "profile": {"kind": "runtime_default"}}),
    );
    assert_eq!(status, 200, "{created}");
    let wid = created["worker"]["worker_id"].as_str().unwrap().to_owned();
    let running = delete(&rt.url(&format!("/v1/workers/{wid}")), &auth);
    assert_eq!((running.status, running.code()), (409, "worker_running"));
    assert_eq!(post(&format!("/v1/workers/{wid}/cancel"), json!({})).0, 200);
    let anonymous = delete(&rt.url(&format!("/v1/workers/{wid}")), &[]);
    assert_eq!(anonymous.status, 401, "the token is checked on DELETE too");
    let deleted = delete(&rt.url(&format!("/v1/workers/{wid}")), &auth);
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_eq!(deleted.body, json!({"deleted": {"worker_ref": {"runtime_id": "rt-del", "worker_id": wid}}}));
    let gone = request("GET", &rt.url(&format!("/v1/workers/{wid}")), &auth);
    assert_eq!((gone.status, gone.code()), (404, "worker_not_found"));
    let again = delete(&rt.url(&format!("/v1/workers/{wid}")), &auth);
    assert_eq!((again.status, again.code()), (404, "worker_not_found"));
    let wrong = request("PUT", &rt.url(&format!("/v1/workers/{wid}")), &auth);
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("GET, HEAD, DELETE")));

    // Deletions are durable: after a restart on the same data dir the workers stay gone and
    // their ids are not handed out again.
    let kept = create_worker_on(&gw.base, "lab", "echo");
    let addr = rt.host_port().to_owned();
    drop(rt);
    let _rt = start(&addr);
    wait_for("the runtime to be back", Duration::from_secs(15), || {
        (get(&gw.url(&format!("/api/runtimes/lab/workers/{kept}"))).status == 200).then_some(())
    });
    assert_eq!(listed(&gw.base, "lab"), std::slice::from_ref(&kept));
    let next = create_worker_on(&gw.base, "lab", "echo");
    assert!(next > kept, "{next} follows {kept}: no id is reused");
}

#[test]
fn a_remote_runtime_without_delete_answers_501_and_stays_healthy() {
    let mut server = mockito::Server::new();
    let summary = json!({"runtime":{"runtime_id":"rt-old","display_name":null,"backend":"memory","status":"running",
        "worker_count":1,"active_worker_count":0,"stopped_worker_count":1,"cancelled_worker_count":0,
        "diagnostic_count":0,"limits":{"max_transcript_projection_items":256,"max_event_batch_items":256}}});
    server.mock("GET", "/v1/runtime").with_body(summary.to_string()).create();
    let refused = server
        .mock("DELETE", "/v1/workers/w-1")
        .with_status(405)
        .with_header("allow", "GET")
        .with_body(r#"{"error":{"code":"method_not_allowed","message":"use GET"}}"#)
        .expect(1)
        .create();
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"old\"\nkind = \"remote\"\nbase_url = \"{}\"\nprobe_interval_ms = 60000\n",
        server.url()
    ))
    .replace("threads = 4\n", "");
    let gw = TestGateway::start("delete-unsupported", &config);
    wait_health(&gw.base, "old", "healthy");
    let answer = delete(&gw.url("/api/runtimes/old/workers/w-1"), &[]);
    assert_eq!((answer.status, answer.code()), (501, "remote_runtime_unsupported"), "{:?}", answer.body);
    assert_eq!(answer.body["error"]["runtime_id"], "old");
    refused.assert();
    let view = get(&gw.url("/api/runtimes/old")).body;
    assert_eq!(view["health"]["state"], "healthy", "an unsupported operation says nothing about health: {view}");
    assert_eq!(get(&gw.url("/readyz")).status, 200);
}

#[test]
fn state_changing_requests_from_another_site_are_refused() {
    let config = memory_config("").replace("threads = 4", "threads = 4\nallowed_origins = [\"https://app.example\"]");
    let gw = TestGateway::start("delete-origin", &config);
    let evil = [("origin", "https://evil.example")];
    let cross_site = [("sec-fetch-site", "cross-site")];
    let allowed_cross_site = [("origin", "https://app.example"), ("sec-fetch-site", "cross-site")];
    let own_origin = gw.base.clone();
    let same_origin = [("origin", own_origin.as_str()), ("sec-fetch-site", "same-origin")];
    let send = |method: &str, path: &str, headers: &[(&str, &str)], body: &str| -> Answer {
        let mut builder = ureq::http::Request::builder().method(method).uri(gw.url(path));
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let mut response = agent().run(builder.body(body.to_owned()).unwrap()).expect("answered");
        let status = response.status().as_u16();
        let body = response.body_mut().read_json::<Value>().unwrap_or(Value::Null);
        Answer { status, body, request_id: None, headers: Vec::new() }
    };
    let forbidden = |a: &Answer, what: &str| {
        assert_eq!((a.status, a.code()), (403, "forbidden_origin"), "{what}: {:?}", a.body);
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(!message.contains("event stream"), "the message is generic: {message}");
    };

    // Create: refused from another site, nothing created. A second Origin is not left unread.
    let doubled = [("origin", own_origin.as_str()), ("origin", "https://evil.example")];
    for headers in [&evil[..], &cross_site[..], &[("origin", "null")][..], &doubled[..]] {
        forbidden(&send("POST", "/api/runtimes/local/workers", headers, "{}"), &format!("create {headers:?}"));
    }
    assert!(listed(&gw.base, "local").is_empty(), "nothing was created");
    // Behind a TLS proxy that says so, the same host over plain HTTP is another site (a page
    // a network attacker put at http://gw, with a browser that sends no Sec-Fetch-Site).
    let host = own_origin.trim_start_matches("http://").to_owned();
    let (https_origin, http_origin) = (format!("https://{host}"), format!("http://{host}"));
    for proto in ["https", "https, http", "HTTPS"] {
        let plain_page = [("origin", http_origin.as_str()), ("x-forwarded-proto", proto)];
        forbidden(&send("POST", "/api/runtimes/local/workers", &plain_page, "{}"), &format!("http page, {proto}"));
    }
    assert!(listed(&gw.base, "local").is_empty(), "nothing was created");
    let proxied = [("origin", https_origin.as_str()), ("x-forwarded-proto", "https")];
    let own_behind_tls = send("POST", "/api/runtimes/local/workers", &proxied, "{}");
    assert_eq!(own_behind_tls.status, 201, "the dashboard behind the proxy: {:?}", own_behind_tls.body);
    // A proxy behind a TLS one says `http` of a browser that used https: not refused.
    let chained = [("origin", https_origin.as_str()), ("x-forwarded-proto", "http")];
    assert_eq!(send("POST", "/api/runtimes/local/workers", &chained, "{}").status, 201, "behind two proxies");

    // Without Origin (curl), from the gateway's own page, or from an allowed origin: works.
    let curl = send("POST", "/api/runtimes/local/workers", &[], "{}");
    assert_eq!(curl.status, 201, "{:?}", curl.body);
    let wid = curl.body["worker"]["worker_id"].as_str().unwrap().to_owned();
    let own = send("POST", "/api/runtimes/local/workers", &same_origin, "{}");
    assert_eq!(own.status, 201, "{:?}", own.body);
    let from_app = send("POST", "/api/runtimes/local/workers", &allowed_cross_site, "{}");
    assert_eq!(from_app.status, 201, "an allowed origin may be cross-site: {:?}", from_app.body);
    let same_site = send("POST", "/api/runtimes/local/workers", &[("sec-fetch-site", "same-site")], "{}");
    assert_eq!(same_site.status, 201, "only cross-site is refused by Sec-Fetch-Site");

    // Input, stop, cancel and delete from another site: refused, the worker unchanged.
    let worker = format!("/api/runtimes/local/workers/{wid}");
    for headers in [&evil[..], &cross_site[..]] {
        let input = send("POST", &format!("{worker}/input"), headers, r#"{"content":"hi"}"#);
        forbidden(&input, "input");
        forbidden(&send("POST", &format!("{worker}/stop"), headers, ""), "stop");
        forbidden(&send("POST", &format!("{worker}/cancel"), headers, ""), "cancel");
    }
    let detail = get(&gw.url(&worker)).body;
    assert_eq!((&detail["status"], &detail["transcript_len"]), (&json!("running"), &json!(0)), "{detail}");
    assert_eq!(send("POST", &format!("{worker}/stop"), &[], "").status, 200);
    for headers in [&evil[..], &cross_site[..]] {
        forbidden(&send("DELETE", &worker, headers, ""), "delete");
    }
    assert_eq!(get(&gw.url(&worker)).status, 200, "still there");
    // Reads stay open to any page (the browser's CORS rules keep their answers from it).
    assert_eq!(request("GET", &gw.url(&worker), &evil).status, 200);
    let deleted = send("DELETE", &worker, &same_origin, "");
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_eq!(get(&gw.url(&worker)).status, 404);
}
