//! A strict client of the base yoi worker-runtime v1 API, written from the base shapes of the
//! Runtime API contract: closed enums with base values only, every base field required,
//! unknown fields ignored. It drives every route and every WebSocket frame of
//! `worker-gateway runtime` — for echo, a command that succeeds, one that fails, one that
//! times out, cancel, stop, system input and a turn cut short by a restart — and every
//! response and frame must decode.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

// ---- REST shapes (base) ----

#[derive(Deserialize)]
struct RuntimeEnvelope {
    runtime: RuntimeSummary,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RuntimeSummary {
    runtime_id: String,
    display_name: Option<String>,
    backend: Backend,
    status: RuntimeStatus,
    worker_count: u64,
    active_worker_count: u64,
    stopped_worker_count: u64,
    cancelled_worker_count: u64,
    diagnostic_count: u64,
    limits: Limits,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Backend {
    Memory,
    FsStore,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RuntimeStatus {
    Running,
    Stopped,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Limits {
    max_transcript_projection_items: u64,
    max_event_batch_items: u64,
}

#[derive(Deserialize, Debug, PartialEq)]
struct WorkerRef {
    runtime_id: String,
    worker_id: String,
}

#[derive(Deserialize, Debug, PartialEq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum WorkerStatus {
    Running,
    Stopped,
    Cancelled,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(dead_code)]
enum Intent {
    Assistant { purpose: Option<String> },
    Task { objective: String },
    Role { role: String, purpose: Option<String> },
}

#[derive(Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
#[allow(dead_code)]
enum ProfileRef {
    RuntimeDefault,
    Named(String),
    Builtin(String),
}

#[derive(Deserialize)]
struct WorkersEnvelope {
    workers: Vec<WorkerSummary>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct WorkerSummary {
    worker_ref: WorkerRef,
    runtime_id: String,
    worker_id: String,
    status: WorkerStatus,
    intent: Intent,
    profile: ProfileRef,
    requested_capability_count: u64,
    has_config_bundle: bool,
    transcript_len: u64,
    last_event_id: u64,
}

#[derive(Deserialize)]
struct WorkerEnvelope {
    worker: WorkerDetail,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct WorkerDetail {
    worker_ref: WorkerRef,
    runtime_id: String,
    worker_id: String,
    status: WorkerStatus,
    intent: Intent,
    profile: ProfileRef,
    transcript_len: u64,
    last_event_id: u64,
}

#[derive(Deserialize)]
struct InputAckEnvelope {
    ack: InputAck,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct InputAck {
    worker_ref: WorkerRef,
    status: WorkerStatus,
    transcript_sequence: u64,
    event_id: u64,
}

#[derive(Deserialize)]
struct LifecycleAckEnvelope {
    ack: LifecycleAck,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct LifecycleAck {
    worker_ref: WorkerRef,
    status: WorkerStatus,
    event_id: u64,
}

#[derive(Deserialize)]
struct TranscriptEnvelope {
    transcript: Transcript,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Transcript {
    worker_ref: WorkerRef,
    start: u64,
    limit: u64,
    total_items: u64,
    items: Vec<TranscriptItem>,
    next_start: Option<u64>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct TranscriptItem {
    sequence: u64,
    worker_ref: WorkerRef,
    role: BaseRole,
    content: String,
    event_id: u64,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum BaseRole {
    User,
    System,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct ErrorInner {
    code: ErrorCode,
    message: String,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum ErrorCode {
    Unauthorized,
    InvalidJson,
    InvalidQuery,
    InvalidWorkerId,
    LimitTooLarge,
    InvalidRequest,
    WorkerNotFound,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RuntimeStopped,
    WorkerBusy,
    StoreIo,
    StoreCorrupt,
}

// ---- WebSocket frames (base) ----

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Frame {
    Event { envelope: Box<Envelope> },
    Diagnostic { diagnostic: Diagnostic },
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Envelope {
    cursor: String,
    event_id: String,
    worker_id: String,
    payload: Payload,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Diagnostic {
    code: String,
    message: String,
}

#[derive(Deserialize, Debug)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
#[allow(dead_code)]
enum Payload {
    Snapshot { entries: Vec<Value>, greeting: Greeting, status: Activity },
    UserMessage { segments: Vec<Segment> },
    SystemItem { item: Value },
    TurnStart { turn: u64 },
    TextDelta { text: String },
    TextDone { text: String },
    TurnEnd { turn: u64, result: TurnResult },
    Status { status: Activity },
    Error { code: EventErrorCode, message: String },
    Shutdown,
}

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
struct Greeting {
    worker_name: String,
    cwd: String,
    provider: String,
    model: String,
    scope_summary: String,
    tools: Vec<Value>,
    context_window: u64,
    context_tokens: u64,
}

#[derive(Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(dead_code)]
enum Segment {
    Text { content: String },
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum TurnResult {
    Finished,
    Paused,
    RolledBack,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Activity {
    Idle,
    Running,
    Paused,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum EventErrorCode {
    AlreadyRunning,
    NotRunning,
    NotPaused,
    ProviderError,
    ToolError,
    InvalidRequest,
    Internal,
}

// ---- the client ----

const RUNTIME_CONFIG: &str = r#"
[server]
bind = "127.0.0.1:0"

[runtime]
id = "rt-strict"
token_env = "STRICT_RUNTIME_TOKEN"
store = "fs"
stop_grace_ms = 200

[profiles.echo]
kind = "echo"

[profiles.slow]
kind = "echo"
delay_ms = 150

[profiles.upper]
kind = "command"
argv = ["tr", "a-z", "A-Z"]

[profiles.failing]
kind = "command"
argv = ["sh", "-c", "echo oops >&2; exit 3"]

[profiles.timeout]
kind = "command"
argv = ["sleep", "5"]
turn_timeout_ms = 300

[profiles.hang]
kind = "command"
argv = ["sleep", "60"]
turn_timeout_ms = 60000
"#;

const TOKEN: &str = "strict-client-token";

struct Strict {
    base: String,
}

impl Strict {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Vec<u8>) {
        let auth = format!("Bearer {TOKEN}");
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", auth);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let payload = body.map_or_else(String::new, |b| b.to_string());
        let mut answer = agent().run(request.body(payload).expect("request")).expect("the runtime answers");
        let status = answer.status().as_u16();
        (status, answer.body_mut().read_to_vec().expect("body"))
    }

    /// A 200 answer decoded strictly as `T`.
    fn ok<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<Value>) -> T {
        let (status, bytes) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{method} {path}: a strict client cannot decode it ({e}): {}", String::from_utf8_lossy(&bytes))
        })
    }

    /// An error answer decoded strictly; returns its status and code.
    fn error(&self, method: &str, path: &str, body: Option<Value>) -> (u16, ErrorCode) {
        let (status, bytes) = self.call(method, path, body);
        let body: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{method} {path}: undecodable error ({e}): {}", String::from_utf8_lossy(&bytes))
        });
        (status, body.error.code)
    }

    fn create(&self, profile: &str) -> String {
        let body = json!({"intent": {"kind": "task", "objective": format!("try {profile}")},
                          "profile": {"kind": "named", "value": profile}});
        let worker: WorkerEnvelope = self.ok("POST", "/v1/workers", Some(body));
        assert_eq!(worker.worker.status, WorkerStatus::Running);
        worker.worker.worker_id
    }

    fn say(&self, wid: &str, kind: &str, content: &str) -> InputAck {
        let ack: InputAckEnvelope =
            self.ok("POST", &format!("/v1/workers/{wid}/input"), Some(json!({"kind": kind, "content": content})));
        ack.ack
    }

    fn transcript(&self, wid: &str) -> (Transcript, Value) {
        let path = format!("/v1/workers/{wid}/transcript?start=0&limit=256");
        let (status, bytes) = self.call("GET", &path, None);
        assert_eq!(status, 200);
        let strict: TranscriptEnvelope = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("a strict client cannot decode the transcript ({e}): {}", String::from_utf8_lossy(&bytes))
        });
        (strict.transcript, serde_json::from_slice(&bytes).expect("JSON"))
    }

    /// Frames of `wid` from its first event until `done`, each decoded strictly.
    fn frames(&self, wid: &str, mut done: impl FnMut(&Payload) -> bool) -> Vec<Payload> {
        let url =
            format!("{}/v1/workers/{wid}/events/ws?cursor=wo_0000000000000000", self.base.replace("http://", "ws://"));
        let mut ws = ws_connect(&url, &[("authorization", &format!("Bearer {TOKEN}"))]).expect("events upgrade");
        let mut payloads = Vec::new();
        loop {
            let text = match ws.read().expect("a frame within 10 s") {
                tungstenite::Message::Text(t) => t,
                tungstenite::Message::Close(c) => panic!("closed before the end: {c:?} after {payloads:?}"),
                _ => continue,
            };
            let frame: Frame = serde_json::from_str(text.as_str())
                .unwrap_or_else(|e| panic!("a strict client cannot decode this frame ({e}): {text}"));
            match frame {
                Frame::Event { envelope } => {
                    assert!(envelope.cursor.starts_with("wo_") && envelope.worker_id == wid);
                    let stop = done(&envelope.payload);
                    payloads.push(envelope.payload);
                    if stop {
                        return payloads;
                    }
                }
                Frame::Diagnostic { diagnostic } => {
                    assert!(diagnostic.code.starts_with("runtime."), "{}", diagnostic.code);
                }
            }
        }
    }
}

fn turn_end(turn: u64) -> impl FnMut(&Payload) -> bool {
    move |p| matches!(p, Payload::TurnEnd { turn: t, .. } if *t == turn)
}

fn start(config: &std::path::Path, data: &std::path::Path, bind: &str) -> Process {
    let args = ["runtime", "--config", config.to_str().unwrap(), "--data-dir", data.to_str().unwrap(), "--bind", bind];
    Process::start_with_env(&args, &[("STRICT_RUNTIME_TOKEN", TOKEN)])
}

#[test]
fn a_strict_base_client_decodes_every_route_and_frame() {
    let config = write_config("strict-client", RUNTIME_CONFIG);
    let data = temp_dir("strict-client-data");
    let rt = start(&config, &data, "127.0.0.1:0");
    let client = Strict { base: rt.base.clone() };

    let runtime: RuntimeEnvelope = client.ok("GET", "/v1/runtime", None);
    assert_eq!(runtime.runtime.runtime_id, "rt-strict");
    assert!(
        matches!(runtime.runtime.backend, Backend::FsStore) && matches!(runtime.runtime.status, RuntimeStatus::Running)
    );

    let mut workers = BTreeMap::new();
    for profile in ["echo", "slow", "upper", "failing", "timeout", "hang"] {
        workers.insert(profile, client.create(profile));
    }
    let listed: WorkersEnvelope = client.ok("GET", "/v1/workers", None);
    assert_eq!(listed.workers.len(), workers.len());
    let detail: WorkerEnvelope = client.ok("GET", &format!("/v1/workers/{}", workers["echo"]), None);
    assert_eq!(detail.worker.worker_ref.worker_id, workers["echo"]);

    // Echo with a system input too: the output is visible as `system` entries from `assistant`.
    let echo = &workers["echo"];
    client.say(echo, "system", "be brief");
    assert_eq!(client.say(echo, "user", "hello strict").status, WorkerStatus::Running);
    let frames = client.frames(echo, turn_end(1));
    assert!(frames.iter().any(|p| matches!(p, Payload::SystemItem { .. })), "{frames:?}");
    assert!(frames.iter().any(|p| matches!(p, Payload::TurnEnd { result: TurnResult::Finished, .. })));
    let (transcript, raw) = client.transcript(echo);
    assert_eq!(
        transcript.items.last().map(|i| (&i.role, i.content.as_str())),
        Some((&BaseRole::System, "hello strict"))
    );
    assert_eq!(raw["transcript"]["items"][2]["origin"], "assistant", "{raw}");

    // A command that succeeds, one that fails, one that times out: base error codes only.
    client.say(&workers["upper"], "user", "shout");
    client.frames(&workers["upper"], turn_end(1));
    assert_eq!(client.transcript(&workers["upper"]).0.items[1].content, "SHOUT");
    for profile in ["failing", "timeout"] {
        client.say(&workers[profile], "user", "go");
        let frames = client.frames(&workers[profile], turn_end(1));
        let errors: Vec<&EventErrorCode> =
            frames.iter().filter_map(|p| if let Payload::Error { code, .. } = p { Some(code) } else { None }).collect();
        assert_eq!(errors, [&EventErrorCode::ToolError], "{profile}: {frames:?}");
    }

    // Cancel a running turn, stop a worker: acks and the lifecycle frames decode.
    client.say(&workers["hang"], "user", "wait");
    client.frames(&workers["hang"], |p| matches!(p, Payload::TurnStart { .. }));
    let cancelled: LifecycleAckEnvelope =
        client.ok("POST", &format!("/v1/workers/{}/cancel", workers["hang"]), Some(json!({})));
    assert_eq!(cancelled.ack.status, WorkerStatus::Cancelled);
    client.frames(&workers["hang"], turn_end(1));
    let stopped: LifecycleAckEnvelope = client.ok("POST", &format!("/v1/workers/{}/stop", workers["upper"]), None);
    assert_eq!(stopped.ack.status, WorkerStatus::Stopped);
    client.frames(&workers["upper"], |p| matches!(p, Payload::SystemItem { item } if item["status"] == "stopped"));

    // Errors decode too.
    let missing = "/v1/workers/worker-0000ffff";
    assert_eq!(client.error("GET", missing, None), (404, ErrorCode::WorkerNotFound));
    assert_eq!(client.error("GET", "/v1/nowhere", None), (404, ErrorCode::NotFound));
    assert_eq!(client.error("PUT", "/v1/workers", None), (405, ErrorCode::MethodNotAllowed));
    assert_eq!(client.error("GET", "/v1/workers/a%20b", None), (400, ErrorCode::InvalidWorkerId));
    let input = format!("/v1/workers/{echo}/input");
    assert_eq!(client.error("POST", &input, Some(json!({"kind": "robot"}))), (400, ErrorCode::InvalidJson));
    let stopped_input = format!("/v1/workers/{}/input", workers["upper"]);
    assert_eq!(
        client.error("POST", &stopped_input, Some(json!({"kind": "user", "content": "x"}))),
        (400, ErrorCode::InvalidRequest)
    );
    let page = format!("/v1/workers/{echo}/transcript?limit=abc");
    assert_eq!(client.error("GET", &page, None), (400, ErrorCode::InvalidQuery));
    let (status, bytes) = {
        let request =
            ureq::http::Request::builder().uri(format!("{}/v1/runtime", rt.base)).body(String::new()).unwrap();
        let mut answer = agent().run(request).expect("answer");
        (answer.status().as_u16(), answer.body_mut().read_to_vec().expect("body"))
    };
    let unauthorized: ErrorBody = serde_json::from_slice(&bytes).expect("decodes");
    assert_eq!((status, unauthorized.error.code), (401, ErrorCode::Unauthorized));

    // A turn cut short by a restart: closed as finished (how, only with the extension).
    let slow = &workers["slow"];
    client.say(slow, "user", "one two three four five six seven eight nine ten");
    client.frames(slow, |p| matches!(p, Payload::TextDelta { .. }));
    let addr = rt.host_port().to_owned();
    rt.signal(libc::SIGKILL);
    drop(rt);
    let rt = start(&config, &data, &addr);
    let client = Strict { base: rt.base.clone() };
    let frames = client.frames(slow, turn_end(1));
    assert!(matches!(frames.last(), Some(Payload::TurnEnd { result: TurnResult::Finished, .. })));
    let (transcript, _) = client.transcript(slow);
    assert!(transcript.items.iter().any(|i| i.role == BaseRole::System && i.content.contains("interrupted")));
    let detail: WorkerEnvelope = client.ok("GET", &format!("/v1/workers/{slow}"), None);
    assert_eq!(detail.worker.status, WorkerStatus::Running, "it takes input after the restart");
    client.say(slow, "user", "again");
    client.frames(slow, turn_end(2));
}

#[test]
fn with_the_extensions_header_the_same_runtime_serves_extension_values() {
    let config = write_config("strict-ext", RUNTIME_CONFIG);
    let data = temp_dir("strict-ext-data");
    let rt = start(&config, &data, "127.0.0.1:0");
    let client = Strict { base: rt.base.clone() };
    let wid = client.create("failing");
    client.say(&wid, "user", "go");
    client.frames(&wid, turn_end(1));
    let headers = [("authorization", &*format!("Bearer {TOKEN}")), ("x-worker-runtime-extensions", "1")];
    let page = request("GET", &rt.url(&format!("/v1/workers/{wid}/transcript")), &headers);
    let roles: Vec<&str> =
        page.body["transcript"]["items"].as_array().unwrap().iter().filter_map(|i| i["role"].as_str()).collect();
    assert!(roles.contains(&"user") && roles.contains(&"system"), "{roles:?}");
    let url = format!("{}/v1/workers/{wid}/events/ws?cursor=wo_0000000000000000", rt.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &headers).expect("upgrade");
    let frames = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    let end = &frames.last().unwrap()["envelope"]["payload"]["data"];
    assert_eq!((&end["result"], &end["outcome"]), (&json!("finished"), &json!("failed")));
    let error = frames.iter().find(|f| event_name(f) == "error").expect("an error event");
    assert_eq!(error["envelope"]["payload"]["data"]["detail"], "exit_status");
    let names: Vec<String> = frames.iter().map(event_name).collect();
    assert!(names.contains(&"lifecycle".to_owned()), "extension events are served: {names:?}");

    let echo = client.create("echo");
    client.say(&echo, "user", "hi");
    client.frames(&echo, turn_end(1));
    let page = request("GET", &rt.url(&format!("/v1/workers/{echo}/transcript")), &headers);
    assert_eq!(page.body["transcript"]["items"][1]["role"], "assistant");
}
