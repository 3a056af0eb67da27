//! The browser-facing REST API over an embedded runtime: every route, its happy path and
//! every error code of gateway-api.md that applies to an embedded runtime.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn runtimes_are_listed_and_described() {
    let gw = TestGateway::start("runtimes", &memory_config(""));
    let list = get(&gw.url("/api/runtimes"));
    assert_eq!(list.status, 200);
    let rt = &list.body["items"][0];
    assert_eq!(rt["runtime_id"], "local");
    assert_eq!(rt["kind"], "embedded");
    assert_eq!(rt["status"], "running");
    assert_eq!(rt["health"]["state"], "healthy");
    assert_eq!(rt["profiles"], json!(["echo", "fail", "hang", "slow", "upper"]));
    assert_eq!(rt["worker_count"], 0);

    let one = get(&gw.url("/api/runtimes/local"));
    assert_eq!((one.status, &one.body["runtime_id"]), (200, &json!("local")));

    let missing = get(&gw.url("/api/runtimes/nope"));
    assert_eq!((missing.status, missing.code()), (404, "runtime_not_found"));
    assert_eq!(missing.body["error"]["runtime_id"], "nope");
    for path in ["/api/runtimes/nope/workers", "/api/runtimes/nope/workers/w/transcript"] {
        assert_eq!(get(&gw.url(path)).code(), "runtime_not_found", "{path}");
    }
}

#[test]
fn a_worker_lives_through_create_input_transcript_stop() {
    let gw = TestGateway::start("lifecycle", &memory_config(""));
    let created =
        post_json(&gw.url("/api/runtimes/local/workers"), &json!({"intent":{"kind":"task","objective":"say hi"}}));
    assert_eq!(created.status, 201);
    let w = &created.body["worker"];
    let id = w["worker_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("worker-") && id.ends_with("-00000001"), "memory ids carry the boot: {id}");
    assert_eq!((&w["profile"], &w["label"], &w["status"]), (&json!("echo"), &json!("say hi"), &json!("running")));
    assert_eq!(w["capabilities"]["can_accept_input"], true);

    let ack = post_json(&gw.url(&format!("/api/runtimes/local/workers/{id}/input")), &json!({"content":"hello there"}));
    assert_eq!(ack.status, 200, "{:?}", ack.body);
    assert_eq!(ack.body["ack"]["transcript_sequence"], 1);
    assert_eq!(ack.body["ack"]["runtime_id"], "local");
    assert!(ack.body["ack"]["event_id"].as_u64().unwrap() > w["last_event_id"].as_u64().unwrap());

    let t = wait_transcript(&gw.base, &id, 2);
    assert_eq!(t["items"][0]["role"], "user");
    assert_eq!(
        t["items"][1],
        json!({"sequence":2,"role":"assistant","content":"hello there","event_id":t["items"][1]["event_id"],
               "at":t["items"][1]["at"]})
    );
    let at = t["items"][1]["at"].as_str().unwrap_or("");
    assert!(at.len() == 24 && at.ends_with('Z'), "entries carry when they were recorded, to the millisecond: {at}");
    assert_eq!((&t["total_items"], &t["next_start"]), (&json!(2), &json!(null)));

    let listed = get(&gw.url("/api/runtimes/local/workers"));
    assert_eq!(listed.body["runtime_id"], "local");
    assert_eq!(listed.body["items"][0]["worker_id"], json!(id));

    let stop = post_raw(&gw.url(&format!("/api/runtimes/local/workers/{id}/stop")), None, "");
    assert_eq!((stop.status, &stop.body["ack"]["status"]), (200, &json!("stopped")));
    let again = post_json(&gw.url(&format!("/api/runtimes/local/workers/{id}/cancel")), &json!({"reason":"twice"}));
    assert_eq!(again.body["ack"]["status"], "stopped", "stop/cancel are idempotent");
    assert_eq!(again.body["ack"]["event_id"], stop.body["ack"]["event_id"]);

    let late = post_json(&gw.url(&format!("/api/runtimes/local/workers/{id}/input")), &json!({"content":"anyone?"}));
    assert_eq!((late.status, late.code()), (409, "worker_not_running"));
    let detail = get(&gw.url(&format!("/api/runtimes/local/workers/{id}")));
    assert_eq!(detail.body["capabilities"]["can_accept_input"], false);
}

#[test]
fn bad_bodies_are_rejected_precisely() {
    let gw =
        TestGateway::start("bodies", &memory_config("").replace("threads = 4", "threads = 4\nmax_body_bytes = 64"));
    let create = gw.url("/api/runtimes/local/workers");
    let not_json = post_raw(&create, Some("application/json"), "{nope");
    assert_eq!((not_json.status, not_json.code()), (400, "invalid_json"));
    let message = |answer: &Answer| answer.body["error"]["message"].as_str().expect("a message").to_owned();
    assert!(message(&not_json).contains("not JSON"), "{}", message(&not_json));
    // A body of the wrong shape: the message names the field by its path, in the API's words.
    let wrong_type = post_json(&create, &json!({"profile": 7}));
    assert_eq!(wrong_type.code(), "invalid_json");
    assert!(message(&wrong_type).contains("`profile`: invalid type"), "{}", message(&wrong_type));
    let bare_intent = post_json(&create, &json!({"profile": "echo", "intent": "x"}));
    let said = message(&bare_intent);
    assert!(said.contains("`intent`") && said.contains("assistant, task or role") && !said.contains("enum"), "{said}");
    let listed = post_json(&create, &json!([]));
    assert_eq!(message(&listed), "request body must be a JSON object");
    let numbered_kind = post_json(&create, &json!({"intent": {"kind": 5}}));
    let said = message(&numbered_kind);
    assert_eq!(said, "request body is not valid: `intent`: `kind` must be assistant, task or role");
    // What a client wrote comes back without hidden characters, and short.
    let roomy = TestGateway::start("bodies-roomy", &memory_config(""));
    let hostile = format!("\u{1b}[31m\u{7}\r\nX-Injected: 1\u{202e}{}", "Z".repeat(20_000));
    for body in [json!({ hostile.clone(): 1 }), json!({"profile": hostile.clone()})] {
        let answer = post_json(&roomy.url("/api/runtimes/local/workers"), &body);
        assert_eq!(answer.status, 400, "{:?}", answer.body);
        let said = message(&answer);
        assert!(said.chars().count() < 400, "{} characters", said.chars().count());
        assert!(!said.chars().any(|c| c.is_control() || c == '\u{202e}'), "{said:?}");
    }
    let no_objective = post_json(&create, &json!({"profile": "echo", "intent": {"kind": "task"}}));
    assert!(message(&no_objective).contains("`intent`: missing field `objective`"), "{}", message(&no_objective));
    // A typo inside the intent is an error too, not an objective lost in silence.
    let typo = post_json(&create, &json!({"intent": {"kind": "task", "objectve": "x"}}));
    assert_eq!((typo.status, typo.code()), (400, "invalid_json"));
    assert!(message(&typo).contains("`intent`: unknown field `objectve`, expected"), "{}", message(&typo));
    let null_intent = post_json(&create, &json!({"intent": null}));
    assert_eq!(null_intent.status, 201, "{:?}", null_intent.body);
    let unknown_field = post_json(&create, &json!({"profle": "echo"}));
    assert!(unknown_field.body["error"]["message"].as_str().unwrap().contains("profle"));
    let unknown_profile = post_json(&create, &json!({"profile": "nosuch"}));
    assert_eq!((unknown_profile.status, unknown_profile.code()), (400, "invalid_request"));
    assert!(unknown_profile.body["error"]["message"].as_str().unwrap().contains("nosuch"));
    let text = post_raw(&create, Some("text/plain"), "{}");
    assert_eq!((text.status, text.code()), (415, "unsupported_media_type"));
    let big = post_raw(&create, Some("application/json"), &format!("{{\"profile\":\"{}\"}}", "x".repeat(100)));
    assert_eq!((big.status, big.code()), (413, "payload_too_large"));
    let chunked = ureq::http::Request::builder()
        .method("POST")
        .uri(&create)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(vec![b' '; 200])
        .unwrap();
    let mut resp = agent().run(chunked).unwrap();
    assert_eq!(resp.status().as_u16(), 413, "{}", resp.body_mut().read_to_string().unwrap());

    let id = create_worker(&gw.base, "echo");
    let input = gw.url(&format!("/api/runtimes/local/workers/{id}/input"));
    let missing = post_json(&input, &json!({"kind":"user"}));
    assert!(missing.body["error"]["message"].as_str().unwrap().contains("missing field `content`"));
    let blank = post_json(&input, &json!({"content":"   "}));
    assert_eq!((blank.status, blank.code()), (400, "invalid_request"));
    let bad_kind = post_json(&input, &json!({"content":"x","kind":"robot"}));
    assert_eq!(bad_kind.code(), "invalid_json");
    assert!(message(&bad_kind).contains("`kind`: unknown variant `robot`"), "{}", message(&bad_kind));
    // Valid JSON of the wrong type is not called "not JSON" (serde_json reads it as a syntax error).
    let half = post_raw(&input, Some("application/json"), r#"{"content":"\ud800"}"#);
    assert_eq!(half.code(), "invalid_json");
    assert!(message(&half).contains("`content`: a string holds an escape that is no character"), "{}", message(&half));
    let numbered = post_json(&input, &json!({"content": "x", "kind": 5}));
    assert_eq!(message(&numbered), "request body is not valid: `kind`: a value of the wrong type");
    let stop_text = post_raw(&gw.url(&format!("/api/runtimes/local/workers/{id}/stop")), Some("text/plain"), "please");
    assert_eq!(stop_text.status, 415);
    let detail = get(&gw.url(&format!("/api/runtimes/local/workers/{id}")));
    assert_eq!(
        (detail.body["status"].as_str(), detail.body["transcript_len"].as_u64()),
        (Some("running"), Some(0)),
        "nothing changed"
    );
}

#[test]
fn ids_routes_and_methods() {
    let gw = TestGateway::start("routes", &memory_config(""));
    for path in [
        "/api/runtimes/lo%2Fcal",
        "/api/runtimes/..",
        "/api/runtimes/a%00b/workers",
        "/api/runtimes/%C3%A9",
        "/api/runtimes/local/workers/a%20b",
        "/api/runtimes/local/workers/..%2F..%2Fetc",
    ] {
        let a = get(&gw.url(path));
        assert_eq!((a.status, a.code()), (400, "invalid_id"), "{path}");
    }
    let long = get(&gw.url(&format!("/api/runtimes/{}", "x".repeat(10_000))));
    assert_eq!(long.code(), "invalid_id");
    assert!(long.body["error"]["message"].as_str().unwrap().len() < 400, "messages do not echo 10 kB");

    let unknown = get(&gw.url("/api/nothing/here"));
    assert_eq!((unknown.status, unknown.code()), (404, "not_found"));
    let w = get(&gw.url("/api/runtimes/local/workers/worker-99999999"));
    assert_eq!((w.status, w.code()), (404, "worker_not_found"));
    assert_eq!(w.body["error"]["worker_id"], "worker-99999999");
    for (action, body) in [("input", json!({"content":"x"})), ("stop", json!({})), ("cancel", json!({"reason":"r"}))] {
        let a = post_json(&gw.url(&format!("/api/runtimes/local/workers/worker-99999999/{action}")), &body);
        assert_eq!(a.code(), "worker_not_found", "{action}");
    }

    let wrong = request("DELETE", &gw.url("/api/runtimes/local/workers"), &[]);
    assert_eq!((wrong.status, wrong.code()), (405, "method_not_allowed"));
    assert_eq!(wrong.header("allow"), Some("GET, HEAD, POST"));
    let get_input = get(&gw.url("/api/runtimes/local/workers/w/input"));
    assert_eq!((get_input.status, get_input.header("allow")), (405, Some("POST")));

    for a in [&unknown, &w, &wrong] {
        let id = a.request_id.as_deref().expect("X-Request-Id on errors");
        assert_eq!(a.body["request_id"], id, "the body names the same request id");
    }
    let ok = get(&gw.url("/healthz"));
    assert_eq!((ok.status, &ok.body), (200, &json!({"status":"ok"})));
    assert!(ok.request_id.unwrap().starts_with("r-"));
}

#[test]
fn transcript_paging_and_query_errors() {
    let gw = TestGateway::start("paging", &memory_config(""));
    let id = create_worker(&gw.base, "echo");
    for i in 0..3 {
        let a = post_json(
            &gw.url(&format!("/api/runtimes/local/workers/{id}/input")),
            &json!({"content": format!("m{i}")}),
        );
        assert_eq!(a.status, 200);
    }
    wait_transcript(&gw.base, &id, 6);
    let base = gw.url(&format!("/api/runtimes/local/workers/{id}/transcript"));
    let page = get(&format!("{base}?start=1&limit=2")).body;
    assert_eq!(
        (&page["start"], &page["limit"], &page["total_items"], &page["next_start"]),
        (&json!(1), &json!(2), &json!(6), &json!(3))
    );
    let seqs: Vec<_> = page["items"].as_array().unwrap().iter().map(|i| i["sequence"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3]);
    let last = get(&format!("{base}?start=4&limit=5")).body;
    assert_eq!((last["items"].as_array().unwrap().len(), &last["next_start"]), (2, &json!(null)));
    let past = get(&format!("{base}?start=99")).body;
    assert_eq!(past["items"], json!([]));

    let bad = get(&format!("{base}?limit=abc"));
    assert_eq!((bad.status, bad.code()), (400, "invalid_query"));
    let negative = get(&format!("{base}?start=-1"));
    assert_eq!(negative.code(), "invalid_query");
    let big = get(&format!("{base}?limit=257"));
    assert_eq!((big.status, big.code()), (400, "limit_too_large"));
    // Which of two values was meant cannot be told (the last one was taken in silence).
    let twice = get(&format!("{base}?limit=1&limit=2"));
    assert_eq!((twice.status, twice.code()), (400, "invalid_query"), "{:?}", twice.body);
    let events = format!(
        "{}/events/ws?cursor=bo_0000000000000001&cursor=bo_0000000000000002",
        base.trim_end_matches("/transcript")
    );
    let twice = get(&events);
    assert_eq!((twice.status, twice.code()), (400, "invalid_query"), "{:?}", twice.body);
}

#[test]
fn queued_inputs_keep_order_and_a_full_queue_is_busy() {
    let gw = TestGateway::start("queue", &memory_config(""));
    let id = create_worker(&gw.base, "slow");
    let input = gw.url(&format!("/api/runtimes/local/workers/{id}/input"));
    // The first input starts a turn at once; input_queue = 4 more may wait behind it.
    let mut accepted = Vec::new();
    let mut busy = None;
    for i in 0..8 {
        let a = post_json(&input, &json!({"content": format!("n{i}")}));
        match a.status {
            200 => accepted.push(format!("n{i}")),
            _ => {
                busy = Some(a);
                break;
            }
        }
    }
    let busy = busy.expect("the bounded queue fills up");
    assert_eq!((busy.status, busy.code()), (409, "worker_busy"));
    assert_eq!(busy.body["error"]["retryable"], true);
    assert!(accepted.len() >= 5, "{accepted:?}");

    let t = wait_transcript(&gw.base, &id, accepted.len() * 2);
    let outputs: Vec<&str> = t["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["role"] == "assistant")
        .map(|i| i["content"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, accepted, "every accepted input answered, in order");
}

#[test]
fn command_profiles_run_programs() {
    let gw = TestGateway::start("commands", &memory_config(""));
    let upper = create_worker(&gw.base, "upper");
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{upper}/input")), &json!({"content":"make me loud"}));
    let t = wait_transcript(&gw.base, &upper, 2);
    assert_eq!(t["items"][1]["content"], "MAKE ME LOUD");

    let fail = create_worker(&gw.base, "fail");
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{fail}/input")), &json!({"content":"go"}));
    let t = wait_transcript(&gw.base, &fail, 3);
    let roles: Vec<_> = t["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["role"].as_str().unwrap(), i["content"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("user", "go"), ("assistant", "partial\n"), ("system", "broken\n")]);

    let hang = create_worker(&gw.base, "hang");
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{hang}/input")), &json!({"content":"wait"}));
    let detail = gw.url(&format!("/api/runtimes/local/workers/{hang}"));
    wait_for("the hanging turn to start", Duration::from_secs(5), || {
        (get(&detail).body["activity"] == "busy").then_some(())
    });
    let started = std::time::Instant::now();
    let cancel = post_raw(&gw.url(&format!("/api/runtimes/local/workers/{hang}/cancel")), None, "");
    assert_eq!(cancel.body["ack"]["status"], "cancelled");
    wait_for("cancel to end the turn", Duration::from_secs(5), || {
        (get(&detail).body["activity"] == "idle").then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(5), "cancel killed the process");
}

/// A `hang` worker stopped while its turn runs (still within its stop grace): its id and
/// the URL of its detail.
fn stopped_during_a_turn(gw: &TestGateway) -> (String, String) {
    let hang = create_worker(&gw.base, "hang");
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{hang}/input")), &json!({"content":"wait"}));
    let detail = gw.url(&format!("/api/runtimes/local/workers/{hang}"));
    wait_for("the turn to start", Duration::from_secs(5), || (get(&detail).body["activity"] == "busy").then_some(()));
    let stop = post_raw(&gw.url(&format!("/api/runtimes/local/workers/{hang}/stop")), None, "");
    assert_eq!(stop.body["ack"]["status"], "stopped");
    (hang, detail)
}

/// Cancel after Stop ends the turn that is finishing within its grace now: a stop's grace
/// can be cut short (Cancel used to answer and do nothing until the grace ran out).
#[test]
fn cancel_cuts_a_stops_grace_short() {
    let config = memory_config("").replace("stop_grace_ms = 300", "stop_grace_ms = 60000");
    let gw = TestGateway::start("grace-cut", &config);
    let (hang, detail) = stopped_during_a_turn(&gw);
    let cancel = post_raw(&gw.url(&format!("/api/runtimes/local/workers/{hang}/cancel")), None, "");
    assert_eq!((cancel.status, &cancel.body["ack"]["status"]), (200, &json!("stopped")), "it stays stopped");
    wait_for("cancel to end the turn", Duration::from_secs(10), || {
        (get(&detail).body["activity"] == "idle").then_some(())
    });
}

#[test]
fn stop_gives_the_running_turn_a_grace_period() {
    let gw = TestGateway::start("grace", &memory_config(""));
    let (_, detail) = stopped_during_a_turn(&gw);
    assert_eq!(get(&detail).body["activity"], "busy", "still inside its 300 ms grace");
    wait_for("the grace to end the turn", Duration::from_secs(5), || {
        (get(&detail).body["activity"] == "idle").then_some(())
    });
}

#[test]
fn interrupt_ends_the_running_turn_and_the_worker_goes_on() {
    let gw = TestGateway::start("interrupt", &memory_config(""));
    let wid = create_worker(&gw.base, "slow");
    let worker = gw.url(&format!("/api/runtimes/local/workers/{wid}"));
    let idle = post_raw(&format!("{worker}/interrupt"), None, "");
    assert_eq!((idle.status, &idle.body["ack"]["status"]), (200, &json!("running")), "nothing to interrupt: fine");
    let mut ws = ws_connect(&format!("{}/events/ws", worker.replace("http://", "ws://")), &[]).expect("events");
    post_json(&format!("{worker}/input"), &json!({"content": "one two three four five six seven eight"}));
    post_json(&format!("{worker}/input"), &json!({"content": "next"}));
    frames_until(&mut ws, |f| event_name(f) == "text_delta");
    let interrupt = post_raw(&format!("{worker}/interrupt"), None, "");
    assert_eq!((interrupt.status, &interrupt.body["ack"]["status"]), (200, &json!("running")), "{:?}", interrupt.body);
    let frames =
        frames_until(&mut ws, |f| event_name(f) == "turn_end" && f["envelope"]["payload"]["data"]["turn"] == 2);
    let ends: Vec<_> = payloads(&frames)
        .into_iter()
        .filter(|p| p["event"] == "turn_end")
        .map(|p| (p["data"]["turn"].clone(), p["data"]["outcome"].clone()))
        .collect();
    assert_eq!(ends, [(json!(1), json!("cancelled")), (json!(2), json!("completed"))], "the queued input still ran");
    let t = wait_transcript(&gw.base, &wid, 4);
    let items = t["items"].as_array().unwrap();
    let first_reply = items.iter().find(|i| i["role"] == "assistant").unwrap()["content"].as_str().unwrap();
    assert!(first_reply.len() < "one two three four five six seven eight".len(), "cut short: {first_reply}");
    assert_eq!(items.last().unwrap()["content"], "next");
    assert!(items.iter().any(|i| i["role"] == "system" && i["content"] == "Turn 1 was interrupted."), "{items:?}");
    assert_eq!(get(&worker).body["status"], "running");
    assert_eq!(post_raw(&format!("{worker}/stop"), None, "").status, 200);
    let stopped = post_raw(&format!("{worker}/interrupt"), None, "");
    assert_eq!((stopped.status, stopped.code()), (409, "worker_not_running"));
    let said = stopped.body["error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("stopped") && said.contains("interrupt"), "{said}");
    let missing = post_raw(&gw.url("/api/runtimes/local/workers/worker-nope/interrupt"), None, "");
    assert_eq!((missing.status, missing.code()), (404, "worker_not_found"));
    let wrong_method = get(&format!("{worker}/interrupt"));
    assert_eq!(wrong_method.status, 405);
}

#[test]
fn all_workers_fans_out_with_per_runtime_state() {
    let extra = "[[runtimes]]\nid = \"second\"\nkind = \"embedded\"\nstore = \"memory\"\n";
    let gw = TestGateway::start("fanout", &memory_config(extra));
    let first = create_worker(&gw.base, "echo");
    let second = post_json(&gw.url("/api/runtimes/second/workers"), &json!({}));
    let second = second.body["worker"]["worker_id"].as_str().unwrap().to_owned();
    for id in [&first, &second] {
        assert!(id.ends_with("-00000001"), "ids count per runtime: {id}");
    }
    assert_ne!(first, second, "memory runtimes carry their boot in their ids");
    let all = get(&gw.url("/api/workers")).body;
    let pairs: Vec<_> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["runtime_id"].as_str().unwrap(), w["worker_id"].as_str().unwrap()))
        .collect();
    assert_eq!(pairs, [("local", first.as_str()), ("second", second.as_str())]);
    assert_eq!(
        all["runtimes"],
        json!([{"runtime_id":"local","state":"ok","count":1},{"runtime_id":"second","state":"ok","count":1}])
    );
    let ready = get(&gw.url("/readyz"));
    assert_eq!((ready.status, &ready.body["status"]), (200, &json!("ready")));
}

#[test]
fn host_check_and_browser_token() {
    // SAFETY (test): the variable name is unique to this test.
    unsafe { std::env::set_var("WG_TEST_BROWSER_TOKEN", "s3cret-browser-token") };
    let config = memory_config("").replace("threads = 4", "threads = 4\ntoken_env = \"WG_TEST_BROWSER_TOKEN\"");
    let gw = TestGateway::start("token", &config);
    let anon = get(&gw.url("/api/runtimes"));
    assert_eq!((anon.status, anon.code()), (401, "unauthorized"));
    assert_eq!(anon.header("www-authenticate"), Some("Bearer"));
    let wrong = request("GET", &gw.url("/api/runtimes"), &[("authorization", "Bearer nope")]);
    assert_eq!(wrong.status, 401);
    let unknown_route = get(&gw.url("/api/secret-route"));
    assert_eq!(unknown_route.status, 401, "unauthenticated clients learn nothing about routes");
    let ok = request("GET", &gw.url("/api/runtimes"), &[("authorization", "Bearer s3cret-browser-token")]);
    assert_eq!(ok.status, 200);
    assert_eq!(get(&gw.url("/healthz")).status, 200, "/healthz stays open");
    let rebinding = request("GET", &gw.url("/healthz"), &[("host", "evil.example:8787")]);
    assert_eq!((rebinding.status, rebinding.code()), (403, "forbidden_host"));
    assert!(!format!("{:?}", anon.body).contains("s3cret"));
}

/// HEAD is answered as GET without the body (monitors probe with it), on a kept-alive
/// connection: the next answer follows the head at once.
#[test]
fn head_is_answered_as_get_without_a_body() {
    use std::io::{Read, Write};
    let gw = TestGateway::start("head", &memory_config(""));
    for path in ["/healthz", "/readyz", "/", "/api/runtimes"] {
        let mut conn = std::net::TcpStream::connect(gw.base.trim_start_matches("http://")).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let request = |method: &str, close: &str| format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}\r\n");
        conn.write_all((request("HEAD", "") + &request("GET", "Connection: close\r\n")).as_bytes()).expect("send");
        let mut answers = String::new();
        conn.read_to_string(&mut answers).expect("both answers");
        let (head, after) = answers.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200"), "HEAD {path}: {head}");
        assert!(after.starts_with("HTTP/1.1 200"), "HEAD {path} sent a body: {after:.80}");
    }
    let post = request("HEAD", &gw.url("/api/runtimes/local/workers/w-1/input"), &[]);
    assert_eq!(post.status, 405, "a POST route is not a GET one");
    // A WebSocket opens with a GET only (a HEAD asking for one was upgraded).
    let wid = create_worker(&gw.base, "echo");
    let upgrade = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let head = request("HEAD", &gw.url(&format!("/api/runtimes/local/workers/{wid}/events/ws")), &upgrade);
    assert_eq!(head.status, 400, "not upgraded");
}
