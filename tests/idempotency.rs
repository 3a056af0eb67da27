//! No input is ever applied twice: when a create or input reached a runtime and its answer
//! was lost (the connection cut after the request was written, an unreadable 2xx), the
//! gateway says it may have been applied and not to retry blindly; a retry with the same
//! `Idempotency-Key` gets the first answer and adds nothing.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A TCP proxy in front of `upstream`. While `cut` is set, it forwards each request, waits
/// for the runtime's answer, and closes the client's connection without passing it on.
fn proxy(upstream: String, cut: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().take(200) {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&upstream) else { continue };
            let cut = cut.clone();
            let (mut client_in, mut server_out) =
                (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut client_in, &mut server_out);
                let _ = server_out.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut server_in, mut client_out) = (server, client);
                let _ = server_in.set_read_timeout(Some(Duration::from_secs(10)));
                let mut buf = [0u8; 16 << 10];
                loop {
                    match server_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if cut.load(Ordering::SeqCst) => break, // the answer is lost
                        Ok(n) => {
                            if client_out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = client_out.shutdown(Shutdown::Both);
            });
        }
    });
    addr
}

fn post_keyed(url: &str, body: &Value, key: &str) -> Answer {
    request_with_body("POST", url, &[("content-type", "application/json"), ("idempotency-key", key)], body)
}

fn request_with_body(method: &str, url: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut resp = agent().run(builder.body(body.to_string()).expect("request")).expect("an answer");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), request_id: None, headers: Vec::new() }
}

#[test]
fn an_input_whose_answer_was_lost_is_not_retryable_and_a_keyed_retry_applies_it_once() {
    let data = temp_dir("idempotency-data");
    let rt = Process::start(&["runtime", "--bind", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()]);
    let cut = Arc::new(AtomicBool::new(false));
    let via = proxy(rt.host_port().to_owned(), cut.clone());
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"r\"\nkind = \"remote\"\nbase_url = \"http://{via}\"\nprobe_interval_ms = 60000\nrequest_timeout_ms = 3000\n"
    ))
    .replace("threads = 4\n", "");
    let gw = TestGateway::start("idempotency", &config);
    let created = post_keyed(&gw.url("/api/runtimes/r/workers"), &json!({"profile": "echo"}), "create-a");
    assert_eq!(created.status, 201, "{:?}", created.body);
    let wid = created.body["worker"]["worker_id"].as_str().expect("worker id").to_owned();
    let input = gw.url(&format!("/api/runtimes/r/workers/{wid}/input"));

    cut.store(true, Ordering::SeqCst);
    let lost = post_keyed(&input, &json!({"content": "exactly once"}), "msg-1");
    assert_eq!(lost.status, 502, "{:?}", lost.body);
    assert_eq!(lost.body["error"]["retryable"], false, "{:?}", lost.body);
    let message = lost.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("may have applied"), "{message}");
    // A lost create answer is no more retryable; stop is idempotent and stays retryable.
    let lost_create = post_keyed(&gw.url("/api/runtimes/r/workers"), &json!({}), "create-b");
    assert_eq!((lost_create.status, &lost_create.body["error"]["retryable"]), (502, &json!(false)));
    let lost_stop = post_json(&gw.url("/api/runtimes/r/workers/no-such/stop"), &json!({}));
    assert_eq!((lost_stop.status, &lost_stop.body["error"]["retryable"]), (502, &json!(true)));
    cut.store(false, Ordering::SeqCst);

    let retried = post_keyed(&input, &json!({"content": "exactly once"}), "msg-1");
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    assert_eq!(retried.body["ack"]["transcript_sequence"], 1, "the first ack: the input was applied before");
    let transcript = wait_transcript_on(&gw.base, "r", &wid, 2);
    let contents: Vec<&str> =
        transcript["items"].as_array().unwrap().iter().filter_map(|i| i["content"].as_str()).collect();
    assert_eq!(contents, ["exactly once", "exactly once"], "one input, one reply");
    let recreated = post_keyed(&gw.url("/api/runtimes/r/workers"), &json!({}), "create-b");
    let workers = get(&gw.url("/api/runtimes/r/workers")).body["items"].as_array().map_or(0, Vec::len);
    assert_eq!((recreated.status, workers), (201, 2), "the lost create was applied once: {:?}", recreated.body);
}

#[test]
fn a_bad_idempotency_key_is_refused() {
    let gw = TestGateway::start("idempotency-bad-key", &memory_config(""));
    let answer = post_keyed(&gw.url("/api/runtimes/local/workers"), &json!({}), "has spaces in it");
    assert_eq!((answer.status, answer.code()), (400, "invalid_request"));
}

/// A key names one request: the same key with another body is refused with 422
/// `idempotency_key_reused` (it used to get the first request's answer, and the second was
/// dropped in silence), on the embedded runtime, through a remote one, and on that runtime
/// after a restart (its keys are durable). The request it named still repeats as before.
#[test]
fn a_key_reused_for_another_request_is_refused() {
    let data = temp_dir("idempotency-reused");
    let dir = data.to_str().expect("utf-8 path");
    let rt = Process::start(&["runtime", "--bind", "127.0.0.1:0", "--data-dir", dir]);
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"r\"\nkind = \"remote\"\nbase_url = \"{}\"\nprobe_interval_ms = 60000\n",
        rt.base
    ))
    .replace("threads = 4\n", "");
    let gw = TestGateway::start("idempotency-reused", &config);
    let mut remote_worker = String::new();
    for rid in ["local", "r"] {
        let create = gw.url(&format!("/api/runtimes/{rid}/workers"));
        let first = post_keyed(&create, &json!({"profile": "echo"}), "c-1");
        assert_eq!(first.status, 201, "{rid}: {:?}", first.body);
        let wid = first.body["worker"]["worker_id"].as_str().expect("worker id").to_owned();
        let repeated = post_keyed(&create, &json!({"profile": "echo"}), "c-1");
        assert_eq!((repeated.status, &repeated.body["worker"]["worker_id"]), (201, &json!(wid)), "{rid}");
        let task = json!({"profile": "echo", "intent": {"kind": "task", "objective": "x"}});
        let other = post_keyed(&create, &task, "c-1");
        assert_eq!((other.status, other.code()), (422, "idempotency_key_reused"), "{rid}: {:?}", other.body);
        assert_eq!(other.body["error"]["retryable"], false, "{rid}");
        let workers = get(&create).body["items"].as_array().map_or(0, Vec::len);
        assert_eq!(workers, 1, "{rid}: one worker");

        let input = gw.url(&format!("/api/runtimes/{rid}/workers/{wid}/input"));
        let one = post_keyed(&input, &json!({"content": "one"}), "m-1");
        assert_eq!(one.status, 200, "{rid}: {:?}", one.body);
        let again = post_keyed(&input, &json!({"content": "one"}), "m-1");
        assert_eq!((again.status, &again.body["ack"]["event_id"]), (200, &one.body["ack"]["event_id"]), "{rid}");
        for body in [json!({"content": "two"}), json!({"content": "one", "kind": "system"})] {
            let reused = post_keyed(&input, &body, "m-1");
            assert_eq!((reused.status, reused.code()), (422, "idempotency_key_reused"), "{rid} {body}");
            assert!(reused.body["error"]["message"].as_str().unwrap_or("").contains("new key"), "{rid}");
        }
        let transcript = wait_transcript_on(&gw.base, rid, &wid, 2);
        let contents: Vec<&str> =
            transcript["items"].as_array().unwrap().iter().filter_map(|i| i["content"].as_str()).collect();
        assert_eq!(contents, ["one", "one"], "{rid}: one input, one reply");
        remote_worker = wid;
    }

    // The runtime restarted remembers which input the key named.
    drop(gw);
    drop(rt);
    let rt = Process::start(&["runtime", "--bind", "127.0.0.1:0", "--data-dir", dir]);
    let input = rt.url(&format!("/v1/workers/{remote_worker}/input"));
    let reused = post_keyed(&input, &json!({"kind": "user", "content": "two"}), "m-1");
    assert_eq!((reused.status, reused.code()), (422, "idempotency_key_reused"), "{:?}", reused.body);
    let repeated = post_keyed(&input, &json!({"kind": "user", "content": "one"}), "m-1");
    assert_eq!((repeated.status, repeated.body["ack"]["transcript_sequence"].as_u64()), (200, Some(1)));
}
