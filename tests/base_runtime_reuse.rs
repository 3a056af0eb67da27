//! The gateway against a runtime that speaks only the base API and, like the reference
//! runtime's memory store, hands the same worker id to a new worker after a restart (no
//! `boot_id`, no durable cursors). A browser watching the old worker is told the worker was
//! replaced and its stream ends: it never sees the new worker's events under the old id.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const WORKER: &str = "worker-00000001";

/// One life of a fake base runtime: a worker `WORKER` whose events, after the creation
/// (event 1), say `text`; event ids restart at every boot.
struct FakeRuntime {
    stop: Arc<AtomicBool>,
    server: Arc<tiny_http::Server>,
}

impl FakeRuntime {
    fn start(addr: SocketAddr, text: &'static str, events: u64) -> FakeRuntime {
        // The previous life may still hold the port for a moment.
        let server = Arc::new(wait_for("the port to be free", Duration::from_secs(5), || {
            tiny_http::Server::new(tiny_http::ServerConfig::new_http(addr).ok()?).ok()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (srv, flag) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            while let Ok(Ok(request)) = srv.recv() {
                let flag = flag.clone();
                std::thread::spawn(move || serve(request, text, events, &flag));
            }
        });
        FakeRuntime { stop, server }
    }
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.server.unblock();
    }
}

fn worker_ref() -> Value {
    json!({"runtime_id": "rt-base", "worker_id": WORKER})
}

fn serve(request: tiny_http::Request, text: &str, events: u64, stop: &AtomicBool) {
    let path = request.url().split('?').next().unwrap_or("").to_owned();
    let body = match path.as_str() {
        "/v1/runtime" => json!({"runtime": {"runtime_id": "rt-base", "display_name": null, "backend": "memory",
            "status": "running", "worker_count": 1, "active_worker_count": 1, "stopped_worker_count": 0,
            "cancelled_worker_count": 0, "diagnostic_count": 0,
            "limits": {"max_transcript_projection_items": 256, "max_event_batch_items": 256}}}),
        "/v1/workers" => json!({"workers": [detail(events)]}),
        p if p == format!("/v1/workers/{WORKER}") => json!({"worker": detail(events)}),
        p if p == format!("/v1/workers/{WORKER}/transcript") => json!({"transcript": {"worker_ref": worker_ref(),
            "start": 0, "limit": 256, "total_items": 0, "items": [], "next_start": null}}),
        p if p == format!("/v1/workers/{WORKER}/events/ws") => return events_ws(request, text, events, stop),
        _ => json!({"error": {"code": "not_found", "message": "no route"}}),
    };
    let _ = request.respond(tiny_http::Response::from_string(body.to_string()));
}

fn detail(events: u64) -> Value {
    json!({"worker_ref": worker_ref(), "runtime_id": "rt-base", "worker_id": WORKER, "status": "running",
           "intent": {"kind": "assistant"}, "profile": {"kind": "named", "value": "echo"},
           "requested_capability_count": 0, "has_config_bundle": false, "transcript_len": 0, "last_event_id": events})
}

fn frame(seq: u64, payload: Value) -> String {
    let cursor = format!("wo_{seq:016x}");
    json!({"kind": "event", "envelope": {"cursor": cursor, "event_id": cursor, "worker_id": WORKER, "payload": payload}})
        .to_string()
}

/// Snapshot, replay after the cursor (or `cursor_unknown_or_expired` past the position), then
/// one more event every 100 ms, until stopped.
fn events_ws(request: tiny_http::Request, text: &str, events: u64, stop: &AtomicBool) {
    let after = request.url().split("cursor=wo_").nth(1).and_then(|hex| u64::from_str_radix(hex, 16).ok());
    let key = request.headers().get("Sec-WebSocket-Key").map(|v| v.as_str().to_owned()).unwrap_or_default();
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let header = tiny_http::Header::from_bytes("Sec-WebSocket-Accept", accept.as_bytes()).expect("header");
    let Ok(stream) = request.upgrade("websocket", tiny_http::Response::empty(101).with_header(header)) else { return };
    let mut ws = tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Server, None);
    let greeting = json!({"worker_name": WORKER, "cwd": "", "provider": "p", "model": "m", "scope_summary": "",
                          "tools": [], "context_window": 0, "context_tokens": 0});
    let position = after.unwrap_or(events).min(events);
    let snapshot = json!({"event": "snapshot", "data": {"entries": [], "greeting": greeting, "status": "idle"}});
    let mut out = vec![frame(position, snapshot).replace("\"event_id\":\"wo_", "\"event_id\":\"snapshot:wo_")];
    if after.is_some_and(|a| a > events) {
        out.push(
            json!({"kind": "diagnostic", "diagnostic": {"code": "runtime.cursor_unknown_or_expired", "message": "?"}})
                .to_string(),
        );
    }
    let delta = |seq: u64| frame(seq, json!({"event": "text_delta", "data": {"text": format!("{text} {seq}")}}));
    out.extend((after.unwrap_or(events) + 1..=events).map(delta));
    for text in out {
        if ws.send(tungstenite::Message::text(text)).is_err() {
            return;
        }
    }
    let mut seq = events;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        seq += 1;
        if ws.send(tungstenite::Message::text(delta(seq))).is_err() {
            return;
        }
    }
}

#[test]
fn a_base_runtime_that_reuses_an_id_after_a_restart_never_shows_the_new_worker_under_the_old_page() {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let first = FakeRuntime::start(addr, "old worker", 5);
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"base\"\nkind = \"remote\"\nbase_url = \"http://{addr}\"\nprobe_interval_ms = 200\n"
    ))
    .replace("threads = 4\n", "");
    let gw = TestGateway::start("base-reuse", &config);
    wait_health(&gw.base, "base", "healthy");
    let url = format!("{}/api/runtimes/base/workers/{WORKER}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).expect("upgrade");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    let live = frames_until(&mut ws, |f| event_name(f) == "text_delta");
    assert!(live.last().unwrap().to_string().contains("old worker"));

    // The runtime restarts: the same id now names a new worker, with event ids from 1 again.
    drop(first);
    let _second = FakeRuntime::start(addr, "new worker", 3);
    let (frames, close) = close_reason(&mut ws);
    assert!(
        frames.iter().all(|f| !f.to_string().contains("new worker")),
        "the new worker's events never reach the old worker's page: {frames:?}"
    );
    let reset = frames.iter().find(|f| f["kind"] == "stream" && f["state"] == "reset").expect("a reset frame");
    assert!(reset["detail"].as_str().unwrap_or("").contains("replaced"), "{reset}");
    assert_eq!(frames.last().unwrap()["diagnostic"]["code"], "backend.worker_not_found", "{frames:?}");
    assert_eq!(close, Some(1001));
}
