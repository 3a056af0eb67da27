//! Secrets hygiene: remotes configured with distinctive hosts, ports and tokens; every
//! endpoint, every error path, the event streams, `worker-gateway check` and the captured
//! log output are searched for them. Two hostile remotes reflect their own address and
//! token into every identifier, code and message they return (a mockito one for the HTTP
//! API, a small hand-written one for the event stream); a benign remote's explanation of a
//! rejection must still reach the user as `upstream_message`.
//!
//! Not reflected: intents, transcript content and event text. Those are the workers' own
//! data, which the gateway passes on as they are (see `runtime::remote::text`).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use mockito::Server;
use serde_json::json;

const TOKENS: [(&str, &str); 6] = [
    ("LEAK_LAB", "tok-LEAK-lab-a9f3e1"),
    ("LEAK_MOCK", "tok-LEAK-mock-12c7"),
    ("LEAK_DEAF", "tok-LEAK-deaf-55e1"),
    ("LEAK_GHOST", "tok-LEAK-ghost-77b0"),
    ("LEAK_HOSTILE", "tok-LEAK-hostile-3b9d"),
    ("LEAK_STREAM", "tok-LEAK-stream-6e2a"),
];

/// What a hostile remote reflects: its base URL, `host:port`, port and token.
struct Reflected {
    url: String,
    host_port: String,
    port: String,
    token: &'static str,
}

impl Reflected {
    fn new(url: &str, token: &'static str) -> Reflected {
        let host_port = url.trim_start_matches("http://").to_owned();
        let port = host_port.rsplit(':').next().unwrap().to_owned();
        Reflected { url: url.to_owned(), host_port, port, token }
    }

    /// A message naming all of it (with a control character and a line break thrown in).
    fn message(&self) -> String {
        format!(
            "failed at {} ({}, port {}) with token {}\u{1b}[2J\nforged: log line",
            self.url, self.host_port, self.port, self.token
        )
    }

    fn worker_ref(&self) -> serde_json::Value {
        json!({"runtime_id": self.url, "worker_id": self.host_port})
    }

    fn summary(&self) -> serde_json::Value {
        json!({"runtime":{"runtime_id": self.host_port, "display_name": self.message(), "backend": format!("b{}", self.port),
            "status": self.url, "worker_count": 3, "limits":{"max_transcript_projection_items":256,"max_event_batch_items":256},
            "boot_id": self.host_port, "profiles":[self.url, self.host_port, self.token, format!("p{}", self.port), "echo"]}})
    }

    /// A worker detail or row: the id the remote gives it, every other identifier reflecting.
    fn worker(&self, worker_id: &str) -> serde_json::Value {
        json!({"worker_ref": self.worker_ref(), "runtime_id": self.token, "worker_id": worker_id, "status": "running",
            "intent": {"kind": "task", "objective": "watch"}, "profile": {"kind": "named", "value": self.host_port},
            "transcript_len": 0, "last_event_id": 5, "activity": "idle",
            "created_at": format!("2026-01-01T00:00:00Z {}", self.token), "last_activity_at": self.url})
    }

    fn error(&self, code: &str) -> String {
        json!({"error":{"code": code, "message": self.message()}}).to_string()
    }
}

/// The hostile remote of the HTTP API: mockito answers reflecting `r` everywhere.
fn hostile_api(server: &mut Server, r: &Reflected) {
    use mockito::Matcher;
    server.mock("GET", "/v1/runtime").with_body(r.summary().to_string()).create();
    let rows = json!({"workers": [r.worker(&r.host_port), r.worker(&format!("w-{}", r.port)), r.worker("w-ok")]});
    server.mock("GET", "/v1/workers").with_body(rows.to_string()).create();
    server.mock("GET", "/v1/workers/w-ok").with_body(json!({"worker": r.worker(&r.host_port)}).to_string()).create();
    let item = json!({"sequence": 1, "worker_ref": r.worker_ref(), "role": "user", "content": "hello", "event_id": 3,
        "at": r.token, "origin": r.url});
    let transcript = json!({"transcript": {"worker_ref": r.worker_ref(), "start": 0, "limit": 1, "total_items": 1,
        "items": [item], "next_start": null}});
    server
        .mock("GET", Matcher::Regex("^/v1/workers/w-ok/transcript".into()))
        .with_body(transcript.to_string())
        .create();
    let create = |profile: &str| Matcher::PartialJson(json!({"profile": {"kind": "named", "value": profile}}));
    server
        .mock("POST", "/v1/workers")
        .match_body(create("echo"))
        .with_body(json!({"worker": r.worker("w-ok")}).to_string())
        .create();
    server
        .mock("POST", "/v1/workers")
        .match_body(create("reflect-id"))
        .with_body(json!({"worker": r.worker(&r.host_port)}).to_string())
        .create();
    server
        .mock("POST", "/v1/workers")
        .match_body(create("nope"))
        .with_status(400)
        .with_body(r.error(&format!("e{}", r.port)))
        .create();
    server.mock("POST", "/v1/workers/w-ok/input").with_status(409).with_body(r.error("worker_busy")).create();
    let ack = json!({"ack": {"worker_ref": r.worker_ref(), "status": "stopped", "event_id": 9}});
    server.mock("POST", "/v1/workers/w-ok/stop").with_body(ack.to_string()).create();
    server.mock("POST", "/v1/workers/w-ok/cancel").with_status(500).with_body(r.error(r.token)).create();
    server
        .mock("DELETE", "/v1/workers/w-ok")
        .with_status(400)
        .with_body(json!({"error":{"code": format!("x{}", r.port), "message": r.url}}).to_string())
        .create();
}

/// The hostile remote of the event stream: just enough of the Runtime API for a browser to
/// watch worker `w-ok` (summary, the worker, its transcript, the WebSocket), reflecting its
/// own address and `token` into identifiers and diagnostics, which it sends once told to
/// (when a browser watches: diagnostics are not replayed). Returns its base URL.
fn hostile_stream(token: &'static str, go: crossbeam_channel::Receiver<()>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let r = std::sync::Arc::new(Reflected::new(&url, token));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (r, go) = (r.clone(), go.clone());
            std::thread::spawn(move || serve_hostile_stream(stream, &r, &go));
        }
    });
    url
}

fn serve_hostile_stream(mut stream: TcpStream, r: &Reflected, go: &crossbeam_channel::Receiver<()>) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("").split('?').next().unwrap_or("").to_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    let _ = stream.read_exact(&mut body);
    if path == "/v1/workers/w-ok/events/ws" {
        let key = header("sec-websocket-key").unwrap_or_default();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(answer.as_bytes()).unwrap();
        let mut ws = tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Server, None);
        let greeting = json!({"worker_name": r.host_port, "cwd": r.url, "provider": r.token, "model": "m", "scope_summary": "",
            "tools": [], "context_window": 0, "context_tokens": 0, "boot_id": r.host_port});
        let frames = [
            json!({"kind": "event", "envelope": {"cursor": "wo_0000000000000005", "event_id": "snapshot:wo_0000000000000005",
                "worker_id": "w-ok", "payload": {"event": "snapshot", "data": {"entries": [], "greeting": greeting, "status": "idle"}}}}),
            json!({"kind": "diagnostic", "diagnostic": {"code": format!("runtime.p{}", r.port), "message": r.message()}}),
            json!({"kind": "diagnostic", "diagnostic": {"code": r.token, "message": r.url}}),
            json!({"kind": "diagnostic", "diagnostic": {"code": "runtime.note", "message": r.message()}}),
            // What a runtime says in its own name inside events: an error, an event's name.
            json!({"kind": "event", "envelope": {"cursor": "wo_0000000000000006", "event_id": "wo_0000000000000006",
                "worker_id": "w-ok", "payload": {"event": "error", "data": {"code": r.token, "message": r.message(), "detail": r.url}}}}),
            json!({"kind": "event", "envelope": {"cursor": "wo_0000000000000007", "event_id": "wo_0000000000000007",
                "worker_id": "w-ok", "payload": {"event": format!("\u{202e}{}\u{1b}[0m<script>", r.token), "data": {}}}}),
        ];
        for (n, frame) in frames.into_iter().enumerate() {
            if n == 1 && go.recv_timeout(Duration::from_secs(20)).is_err() {
                return;
            }
            ws.send(tungstenite::Message::text(frame.to_string())).unwrap();
        }
        while ws.read().is_ok() {} // held open until the gateway lets go
        return;
    }
    let (status, body) = match path.as_str() {
        "/v1/runtime" => ("200 OK", r.summary().to_string()),
        "/v1/workers/w-ok" => ("200 OK", json!({"worker": r.worker(&r.host_port)}).to_string()),
        "/v1/workers/w-ok/transcript" => {
            let t = json!({"worker_ref": r.worker_ref(), "start": 0, "limit": 256, "total_items": 0, "items": [], "next_start": null});
            ("200 OK", json!({ "transcript": t }).to_string())
        }
        _ => ("404 Not Found", r.error("not_found")),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
}

/// `worker-gateway check` on `config`: what it printed (stdout and stderr) and its exit code.
fn run_check(config: &std::path::Path, json: bool) -> (Option<i32>, String) {
    let mut args = vec!["check", "--config", config.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(&args)
        .envs(TOKENS.iter().copied())
        .env("RUST_LOG", "debug")
        .output()
        .expect("run check");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Everything a client can see of one request: status, headers, body.
fn seen(method: &str, url: &str, body: Option<&serde_json::Value>) -> String {
    let agent = agent();
    let builder = ureq::http::Request::builder().method(method).uri(url).header("content-type", "application/json");
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut resp = agent.run(builder.body(payload).unwrap()).expect("answered");
    let mut text = format!("{} {:?}\n", resp.status(), resp.headers());
    text.push_str(&resp.body_mut().read_to_string().unwrap_or_default());
    text
}

#[test]
fn no_url_host_port_or_token_reaches_a_client_or_the_log() {
    let lab = Process::start_with_env(
        &["runtime", "--bind", "127.0.0.1:0", "--runtime-id", "rt-lab", "--memory", "--token-env", "LEAK_LAB"],
        &[TOKENS[0]],
    );
    let mut mock = Server::new();
    let leaky = json!({"error":{"code":"store_io","message":format!("failed at {} with {} from host", mock.url(), TOKENS[1].1)}});
    mock.mock("GET", "/v1/runtime")
        .with_body(json!({"runtime":{"runtime_id":mock.url(),"display_name":TOKENS[1].1,"backend":"memory","status":"running","worker_count":0,
            "limits":{"max_transcript_projection_items":256,"max_event_batch_items":256},"profiles":[mock.url()]}}).to_string())
        .create();
    mock.mock("GET", mockito::Matcher::Regex("^/v1/workers/[^/]+$".into()))
        .with_status(500)
        .with_body(leaky.to_string())
        .create();
    let wrong_types = json!({"transcript":{"start": mock.url(), "limit": TOKENS[1].1, "items": [mock.url()]}});
    mock.mock("GET", mockito::Matcher::Regex("^/v1/workers/.+/transcript".into()))
        .with_body(wrong_types.to_string())
        .create();
    mock.mock("GET", "/v1/workers").with_status(401).with_body(leaky.to_string()).create();
    mock.mock("POST", mockito::Matcher::Any).with_body(format!("<html>{} {}</html>", mock.url(), TOKENS[1].1)).create();
    let mut hostile = Server::new();
    let hostile_r = Reflected::new(&hostile.url(), TOKENS[4].1);
    hostile_api(&mut hostile, &hostile_r);
    let (go, go_rx) = crossbeam_channel::bounded(1);
    let stream_url = hostile_stream(TOKENS[5].1, go_rx);
    let deaf = TcpListener::bind("127.0.0.1:0").unwrap();
    let deaf_addr = deaf.local_addr().unwrap().to_string();
    let config = write_config(
        "leak",
        &format!(
            r#"
[server]
bind = "127.0.0.1:0"

[[runtimes]]
id = "local"
kind = "embedded"
store = "memory"

[[runtimes]]
id = "lab"
kind = "remote"
base_url = "{lab}"
token_env = "LEAK_LAB"

[[runtimes]]
id = "mock"
kind = "remote"
base_url = "{mock}"
token_env = "LEAK_MOCK"

[[runtimes]]
id = "deaf"
kind = "remote"
base_url = "http://{deaf_addr}"
token_env = "LEAK_DEAF"
read_timeout_ms = 300
write_timeout_ms = 300
probe_timeout_ms = 300

[[runtimes]]
id = "ghost"
kind = "remote"
base_url = "http://ghost-host-4d2c.invalid:47613/prefix"
token_env = "LEAK_GHOST"
connect_timeout_ms = 300

[[runtimes]]
id = "hostile"
kind = "remote"
base_url = "{hostile}"
token_env = "LEAK_HOSTILE"

[[runtimes]]
id = "stream"
kind = "remote"
base_url = "{stream_url}"
token_env = "LEAK_STREAM"
"#,
            lab = lab.base,
            mock = mock.url(),
            hostile = hostile.url(),
        ),
    );
    let mut env = TOKENS.to_vec();
    env.push(("RUST_LOG", "debug"));
    let mut gw = Process::start_with_env(&["serve", "--config", config.to_str().unwrap()], &env);
    wait_health(&gw.base, "lab", "healthy");
    wait_health(&gw.base, "deaf", "unreachable");
    wait_health(&gw.base, "ghost", "unreachable");
    let hostile_view = wait_health(&gw.base, "hostile", "healthy");
    assert_eq!(hostile_view["profiles"], json!(["echo"]), "only the profile names it may show: {hostile_view}");
    assert_eq!(hostile_view["status"], "unknown");
    wait_health(&gw.base, "stream", "healthy");

    // A benign remote's own explanation reaches the user.
    let refused = post_json(&gw.url("/api/runtimes/lab/workers"), &json!({"profile": "upper"}));
    assert_eq!((refused.status, refused.code()), (400, "invalid_request"), "{:?}", refused.body);
    let said = refused.body["error"]["upstream_message"].as_str().unwrap_or_default();
    assert!(
        said.starts_with("unknown profile `upper`; this runtime has: ") && said.contains("echo"),
        "{:?}",
        refused.body
    );

    // The hostile remote: what it may show is shown, the rest withheld or scrubbed.
    let rows = get(&gw.url("/api/runtimes/hostile/workers")).body;
    let ids: Vec<_> =
        rows["items"].as_array().unwrap().iter().map(|w| (w["worker_id"].clone(), w["profile"].clone())).collect();
    assert_eq!(ids, [(json!("w-ok"), json!("<withheld>"))], "{rows}");
    let detail = get(&gw.url("/api/runtimes/hostile/workers/w-ok")).body;
    assert_eq!((&detail["worker_id"], &detail["profile"]), (&json!("w-ok"), &json!("<withheld>")), "{detail}");
    let busy = post_json(&gw.url("/api/runtimes/hostile/workers/w-ok/input"), &json!({"content": "hi"})).body;
    assert_eq!(
        busy["error"]["upstream_message"],
        "failed at <backend-private> (<backend-private>, port <backend-private>) with token <backend-private>[2Jforged: log line",
        "{busy}"
    );
    let refused = post_json(&gw.url("/api/runtimes/hostile/workers"), &json!({"profile": "nope"})).body;
    assert_eq!(refused["error"]["upstream_code"], "unrecognised_code", "{refused}");
    let renamed = post_json(&gw.url("/api/runtimes/hostile/workers"), &json!({"profile": "reflect-id"}));
    assert_eq!(renamed.code(), "remote_runtime_malformed_response", "{:?}", renamed.body);
    let mut seen_text = format!("{rows}{detail}{busy}{refused}{:?}", renamed.body);

    // The hostile event stream: its diagnostics arrive, checked.
    let events_url = gw.url("/api/runtimes/stream/workers/w-ok/events/ws").replace("http://", "ws://");
    let mut ws = ws_connect(&events_url, &[]).expect("upgrade");
    let mut frames = vec![next_frame(&mut ws)];
    go.send(()).unwrap();
    frames.extend(frames_until(&mut ws, |f| f["envelope"]["payload"]["event"] == "unrecognised_event"));
    let diagnostics: Vec<_> =
        frames.iter().filter(|f| f["kind"] == "diagnostic").map(|f| f["diagnostic"].clone()).collect();
    let codes: Vec<_> = diagnostics.iter().map(|d| d["code"].as_str().unwrap_or_default()).collect();
    assert_eq!(codes, ["backend.unrecognised_code", "backend.unrecognised_code", "backend.note"], "{frames:?}");
    assert!(diagnostics[2]["message"].as_str().unwrap().contains("failed at <backend-private>"), "{frames:?}");
    assert_eq!(frames[0]["envelope"]["payload"]["data"]["greeting"]["worker_id"], "w-ok");
    let error = frames.iter().find(|f| f["envelope"]["payload"]["event"] == "error").expect("the error event");
    let said = &error["envelope"]["payload"]["data"];
    assert_eq!((&said["code"], &said["detail"]), (&json!("unrecognised_code"), &json!("unrecognised_code")), "{said}");
    assert!(said["message"].as_str().unwrap().starts_with("failed at <backend-private>"), "{said}");
    for frame in &frames {
        seen_text.push_str(&frame.to_string());
    }
    drop(ws);

    let lab_worker = create_worker_on(&gw.base, "lab", "echo");
    for rid in ["local", "lab", "mock", "deaf", "ghost", "hostile", "stream", "missing"] {
        let wid = match rid {
            "lab" => lab_worker.as_str(),
            "hostile" | "stream" => "w-ok",
            _ => "worker-00000001",
        };
        let w = format!("/api/runtimes/{rid}/workers/{wid}");
        let calls: Vec<(&str, String, Option<serde_json::Value>)> = vec![
            ("GET", format!("/api/runtimes/{rid}"), None),
            ("GET", format!("/api/runtimes/{rid}/workers"), None),
            ("POST", format!("/api/runtimes/{rid}/workers"), Some(json!({"profile":"echo"}))),
            ("POST", format!("/api/runtimes/{rid}/workers"), Some(json!({"profile":"nope"}))),
            ("GET", w.clone(), None),
            ("POST", format!("{w}/input"), Some(json!({"content":"hello"}))),
            ("POST", format!("{w}/input"), Some(json!({"content":" "}))),
            ("GET", format!("{w}/transcript?limit=1"), None),
            ("GET", format!("{w}/transcript?limit=9999"), None),
            ("POST", format!("{w}/stop"), Some(json!({}))),
            ("POST", format!("{w}/cancel"), Some(json!({}))),
            ("GET", format!("/api/runtimes/{rid}/workers/bad%2Fid"), None),
            ("DELETE", w.clone(), None),
        ];
        for (method, path, body) in calls {
            seen_text.push_str(&seen(method, &gw.url(&path), body.as_ref()));
        }
    }
    for path in ["/api/runtimes", "/api/workers", "/readyz", "/healthz", "/metrics", "/nowhere"] {
        seen_text.push_str(&seen("GET", &gw.url(path), None));
    }
    assert!(
        seen_text.contains("remote_runtime_timeout") && seen_text.contains("remote_runtime_auth_failed"),
        "the error paths ran"
    );
    assert!(
        seen_text.contains("remote_runtime_malformed_response") && seen_text.contains("remote_runtime_unreachable")
    );

    assert!(seen_text.contains("<backend-private>") && seen_text.contains("<withheld>"), "the hostile paths ran");

    gw.signal(libc::SIGTERM);
    gw.wait(std::time::Duration::from_secs(20));
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("access"), "the log was captured");

    // `check` on the same runtimes prints only checked text too.
    let (code, table) = run_check(&config, false);
    assert_eq!(code, Some(1), "{table}");
    let row = |runtime: &str, check: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{runtime} ")) && l.contains(&format!(" {check} ")))
            .unwrap_or("")
            .to_owned()
    };
    assert!(row("hostile", "compatible").contains("backend <withheld>"), "{table}");
    assert!(row("hostile", "round_trip").contains("(the runtime said: failed at <backend-private>"), "{table}");
    assert!(row("lab", "delete").contains(" ok "), "{table}");
    let (_, report) = run_check(&config, true);
    let check_text = table + &report;

    let mut secrets: Vec<String> = TOKENS.iter().map(|(_, t)| t.to_string()).collect();
    secrets.extend(["ghost-host-4d2c".into(), "47613".into(), "/prefix".into(), "\u{1b}".into(), "\nforged".into()]);
    let addrs = [lab.host_port().to_owned(), mock.host_with_port(), deaf_addr.clone(), hostile.host_with_port()];
    for addr in addrs.into_iter().chain([stream_url.trim_start_matches("http://").to_owned()]) {
        let port = addr.rsplit(':').next().unwrap().to_owned();
        secrets.extend([addr, format!(":{port}"), port]);
    }
    for secret in &secrets {
        assert!(!seen_text.contains(secret.as_str()), "`{secret}` reached a client:\n{seen_text}");
        assert!(!log.contains(secret.as_str()), "`{secret}` reached the log:\n{log}");
        assert!(!check_text.contains(secret.as_str()), "`{secret}` was printed by check:\n{check_text}");
    }
}
