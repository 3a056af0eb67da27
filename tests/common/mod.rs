//! Helpers shared by the integration tests: temp dirs, servers on 127.0.0.1:0, an HTTP
//! client with a time bound, and waiting on a condition with a deadline.
#![allow(dead_code)]

pub mod browser;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use worker_gateway::gateway::Gateway;

/// A fresh, empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("wg-it-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A "runtime" that accepts connections and never answers: its URL, and the accepted
/// connections (held open by whoever keeps them).
pub fn black_hole() -> (String, crossbeam_channel::Receiver<std::net::TcpStream>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if tx.send(stream).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// `count` GETs of `url` left hanging on a [`black_hole`] runtime: their threads (each ends
/// with the status it got) and the `connections` the black hole accepted for them (the
/// first probe's included), held open.
pub fn hang_requests(
    url: &str,
    count: usize,
    accepted: &crossbeam_channel::Receiver<std::net::TcpStream>,
    connections: usize,
) -> (Vec<std::thread::JoinHandle<u16>>, Vec<std::net::TcpStream>) {
    // They wait as long as the test needs them to (a loaded machine included), not 20 s.
    let patient: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .proxy(None)
        .build()
        .into();
    let hung = (0..count)
        .map(|_| {
            let (url, patient) = (url.to_owned(), patient.clone());
            std::thread::spawn(move || answer(patient.get(&url).call()).status)
        })
        .collect();
    let held = (0..connections)
        .map(|i| {
            accepted
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("only {i} connections reached the runtime"))
        })
        .collect();
    (hung, held)
}

/// A port that refuses connections for as long as the returned socket lives: bound and never
/// listening, so no other test or process can take the port meanwhile (a port merely freed
/// can be, and was: a "gone" runtime then answered).
pub fn refusing_port() -> (u16, std::os::fd::OwnedFd) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a new socket, owned at once; bind and getsockname read and write a sockaddr_in
    // we own, with its size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len), 0, "bind");
        assert_eq!(libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &mut len), 0, "getsockname");
        (u16::from_be(addr.sin_port), fd)
    }
}

/// Whether nginx can be run for `test`. Without it the test is skipped, saying so, except
/// under CI (`.ci/run` installs nginx), where a skip would hide a test that never ran.
pub fn nginx_available(test: &str) -> bool {
    if std::process::Command::new("nginx").arg("-v").output().is_ok() {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "CI must run {test}: install nginx");
    eprintln!("SKIPPED: {test} (no nginx on PATH; apt-get install nginx)");
    false
}

/// A port nothing listens on now, for a process that must come back on the same address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Writes `text` as `gateway.toml` in a fresh dir and returns its path.
pub fn write_config(name: &str, text: &str) -> PathBuf {
    let path = temp_dir(name).join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A config with one embedded runtime `local` (memory store), bound to port 0, plus `extra`.
pub fn memory_config(extra: &str) -> String {
    format!(
        r#"
[server]
bind = "127.0.0.1:0"
threads = 4

[[runtimes]]
id = "local"
kind = "embedded"
store = "memory"
stop_grace_ms = 300
input_queue = 4

[profiles.slow]
kind = "echo"
delay_ms = 200

[profiles.upper]
kind = "command"
argv = ["tr", "a-z", "A-Z"]

[profiles.fail]
kind = "command"
argv = ["sh", "-c", "echo partial; echo broken >&2; exit 3"]

[profiles.hang]
kind = "command"
argv = ["sleep", "60"]
turn_timeout_ms = 60000
{extra}
"#
    )
}

/// An in-process gateway started from config text.
pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub base: String,
}

impl TestGateway {
    pub fn start(name: &str, config_text: &str) -> TestGateway {
        let _ = env_logger::builder().is_test(true).try_init();
        let path = write_config(name, config_text);
        let config = worker_gateway::config::load_gateway(Some(&path)).expect("config loads");
        let gateway = Gateway::start(config).expect("gateway starts");
        let base = format!("http://{}", gateway.addr());
        TestGateway { gateway: Some(gateway), base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown();
        }
    }
}

/// An HTTP answer: status, a few headers, JSON body (Null when not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub request_id: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The error code of an error envelope.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .proxy(None)
        .build()
        .into()
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = response.expect("HTTP request completes");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect::<Vec<_>>();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    let request_id = headers.iter().find(|(n, _)| n == "x-request-id").map(|(_, v)| v.clone());
    Answer { status, body, request_id, headers }
}

pub fn get(url: &str) -> Answer {
    answer(agent().get(url).call())
}

pub fn post_json(url: &str, body: &Value) -> Answer {
    answer(agent().post(url).header("content-type", "application/json").send(body.to_string()))
}

pub fn post_raw(url: &str, content_type: Option<&str>, body: &str) -> Answer {
    let mut request = agent().post(url);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    answer(request.send(body))
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (n, v) in headers {
        builder = builder.header(*n, *v);
    }
    answer(agent().run(builder.body(()).expect("request builds")))
}

/// Polls `check` until it returns Some, failing after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Creates a worker with `profile` on runtime `local`; returns its id.
pub fn create_worker(base: &str, profile: &str) -> String {
    create_worker_on(base, "local", profile)
}

/// Creates a worker with `profile` on runtime `runtime`; returns its id.
pub fn create_worker_on(base: &str, runtime: &str, profile: &str) -> String {
    let a = post_json(&format!("{base}/api/runtimes/{runtime}/workers"), &serde_json::json!({"profile": profile}));
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["worker"]["worker_id"].as_str().expect("worker id").to_owned()
}

/// Waits until the worker is idle with at least `entries` transcript entries; returns the transcript.
pub fn wait_transcript(base: &str, worker: &str, entries: usize) -> Value {
    wait_transcript_on(base, "local", worker, entries)
}

/// [`wait_transcript`] for a worker of runtime `runtime`.
pub fn wait_transcript_on(base: &str, runtime: &str, worker: &str, entries: usize) -> Value {
    let url = format!("{base}/api/runtimes/{runtime}/workers/{worker}");
    wait_for("the turn to finish", Duration::from_secs(10), || {
        let w = get(&url).body;
        let done = w["activity"] == "idle" && w["transcript_len"].as_u64().unwrap_or(0) as usize >= entries;
        done.then_some(())
    });
    get(&format!("{url}/transcript")).body
}

/// A `worker-gateway` child process; killed when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub base: String,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Process {
    /// Runs `worker-gateway <args>` and waits (bounded) for its `listening on` line.
    pub fn start(args: &[&str]) -> Process {
        Process::start_with_env(args, &[])
    }

    /// Like [`Process::start`], with extra environment variables (`RUST_LOG` defaults to info).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"));
        command.args(args).env("RUST_LOG", "info").envs(env.iter().copied());
        Process::start_command(command)
    }

    /// Runs a prepared command of the binary and waits for its `listening on` line.
    pub fn start_command(mut command: std::process::Command) -> Process {
        use std::io::{BufRead, BufReader};
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn worker-gateway");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("no `listening on` line; stderr:\n{}", log.lock().unwrap())
        });
        let base = line.strip_prefix("listening on ").expect("listening line").to_owned();
        Process { child, base, stderr: log }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits (bounded) for the exit status.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_for("the process to exit", limit, || child.try_wait().expect("try_wait"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port` of the process.
    pub fn host_port(&self) -> &str {
        self.base.trim_start_matches("http://")
    }
}

/// Waits until runtime `id` of the gateway at `base` reports health `state`.
pub fn wait_health(base: &str, id: &str, state: &str) -> Value {
    let url = format!("{base}/api/runtimes/{id}");
    wait_for(&format!("runtime {id} to be {state}"), Duration::from_secs(15), || {
        let view = get(&url).body;
        (view["health"]["state"] == state).then_some(view)
    })
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket client of the tests.
pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// Connects to `url` (ws://) with extra headers; the handshake error (an HTTP status) on failure.
pub fn ws_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("ws url");
    for (n, v) in headers {
        request
            .headers_mut()
            .insert(tungstenite::http::HeaderName::from_bytes(n.as_bytes()).unwrap(), v.parse().unwrap());
    }
    match tungstenite::connect(request) {
        Ok((mut ws, _)) => {
            if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            }
            Ok(ws)
        }
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("ws connect failed: {e}"),
    }
}

/// The next text frame as JSON (pings answered on the way); panics after 10 s.
pub fn next_frame(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("a frame within 10 s") {
            tungstenite::Message::Text(t) => {
                return serde_json::from_str(t.as_str()).expect("JSON frame");
            }
            tungstenite::Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Reads frames until one satisfies `done`; returns all of them.
pub fn frames_until(ws: &mut Ws, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let f = next_frame(ws);
        let stop = done(&f);
        frames.push(f);
        if stop {
            return frames;
        }
    }
}

/// The event name of an event frame (`snapshot`, `text_delta`…), or the frame kind.
pub fn event_name(frame: &Value) -> String {
    match frame["kind"].as_str() {
        Some("event") => frame["envelope"]["payload"]["event"].as_str().unwrap_or("").to_owned(),
        Some(kind) => kind.to_owned(),
        None => String::new(),
    }
}

/// A number field of `/proc/<pid>/status` (`Threads:`, `VmRSS:` in KiB), 0 when unreadable.
pub fn status_field(pid: u32, name: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Threads and open descriptors of a process.
pub fn threads_and_fds(pid: u32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (status_field(pid, "Threads:"), fds)
}

/// Payloads of the event frames other than the snapshot.
pub fn payloads(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["kind"] == "event" && event_name(f) != "snapshot")
        .map(|f| f["envelope"]["payload"].clone())
        .collect()
}

/// The close frame that ends the stream (after any remaining text frames).
pub fn close_reason(ws: &mut Ws) -> (Vec<Value>, Option<u16>) {
    let mut texts = Vec::new();
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => texts.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(tungstenite::Message::Close(c)) => return (texts, c.map(|c| u16::from(c.code))),
            Ok(_) => {}
            Err(_) => return (texts, None),
        }
    }
}
