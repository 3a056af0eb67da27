//! `cargo bench`: the scenarios P1–P9 of performance.md against servers this bench starts on
//! loopback (P6, P8 and P9 as separate processes, to measure them alone). Every headline
//! figure is a ratio measured side by side in one run. Prints a table and writes
//! `target/bench-report.json`. `BENCH_QUICK=1` finishes in a minute or two; `BENCH_ONLY=P3,P4`
//! runs a subset.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::Message;
use worker_gateway::config::{self, RuntimeOverrides};
use worker_gateway::gateway::Gateway;
use worker_gateway::runtime::remote::resolver;
use worker_gateway::runtime::server::RuntimeServer;

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

const TOKEN: &str = "bench-token";

struct Row {
    id: &'static str,
    what: String,
    figure: String,
    ratio: Option<f64>,
    target: &'static str,
    /// `None`: reported for context, with no target of its own.
    pass: Option<bool>,
}

struct Setup {
    gateway: String,
    runtime: String,
    _servers: (Gateway, RuntimeServer),
}

fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| v != "0")
}

/// `BENCH_ONLY=P1,P3` runs only those scenarios (P1, P2 and P5 run together).
fn selected(id: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|s| s.trim().eq_ignore_ascii_case(id)))
}

fn seconds() -> Duration {
    if quick() { Duration::from_millis(1500) } else { Duration::from_secs(5) }
}

fn setup(dir: &std::path::Path) -> Setup {
    // SAFETY: set before any thread reads the environment.
    unsafe { std::env::set_var("BENCH_RT_TOKEN", TOKEN) };
    let rt_file = dir.join("runtime.toml");
    std::fs::write(&rt_file, "[server]\nthreads = 8\n[runtime]\nid = \"rt\"\ntoken_env = \"BENCH_RT_TOKEN\"\n[profiles.tick]\nkind = \"echo\"\ndelay_ms = 1\n").unwrap();
    let overrides = RuntimeOverrides { bind: Some("127.0.0.1:0".parse().unwrap()), memory: true, ..Default::default() };
    let runtime = RuntimeServer::start(config::load_runtime(Some(&rt_file), &overrides).unwrap(), false).unwrap();
    let rt_url = format!("http://{}", runtime.addr());
    let gw_file = dir.join("gateway.toml");
    std::fs::write(
        &gw_file,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nmax_ws_sessions = 4096\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\nstore = \"memory\"\n\
             [[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{rt_url}\"\ntoken_env = \"BENCH_RT_TOKEN\"\nmax_in_flight = 64\n\
             [[runtimes]]\nid = \"hung\"\nkind = \"remote\"\nbase_url = \"{{HUNG}}\"\nmax_in_flight = 64\nread_timeout_ms = 600000\n\
             [profiles.tick]\nkind = \"echo\"\ndelay_ms = 1\n"
        ),
    )
    .unwrap();
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("http://{}", hung.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().flatten() {
            held.push(s); // accept, never answer
        }
    });
    let text = std::fs::read_to_string(&gw_file).unwrap().replace("{HUNG}", &hung_url);
    std::fs::write(&gw_file, text).unwrap();
    let gateway = Gateway::start(config::load_gateway(Some(&gw_file)).unwrap()).unwrap();
    Setup { gateway: format!("http://{}", gateway.addr()), runtime: rt_url, _servers: (gateway, runtime) }
}

/// The load generator's client (ureq's default resolver would spawn a thread per request).
fn agent() -> ureq::Agent {
    resolver::agent(
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(30))).build(),
    )
}

fn post(url: &str, body: &Value, auth: bool) -> Value {
    let mut req = agent().post(url).header("content-type", "application/json");
    if auth {
        req = req.header("authorization", format!("Bearer {TOKEN}"));
    }
    req.send(body.to_string()).unwrap().body_mut().read_json().unwrap()
}

/// `connections` keep-alive clients GET `urls` (client i the i-th, round robin) for
/// `duration`: (requests/s, p50 µs).
fn load(urls: &[String], connections: usize, duration: Duration, auth: bool) -> (f64, f64) {
    let barrier = Arc::new(Barrier::new(connections));
    let workers: Vec<_> = (0..connections)
        .map(|i| {
            let (url, barrier) = (urls[i % urls.len()].clone(), barrier.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut latencies = Vec::new();
                barrier.wait();
                let end = Instant::now() + duration;
                while Instant::now() < end {
                    let t = Instant::now();
                    let mut req = agent.get(&url);
                    if auth {
                        req = req.header("authorization", format!("Bearer {TOKEN}"));
                    }
                    let mut resp = req.call().expect("request");
                    let _ = resp.body_mut().read_to_vec();
                    assert_eq!(resp.status(), 200);
                    latencies.push(t.elapsed().as_micros() as u32);
                }
                latencies
            })
        })
        .collect();
    let mut all: Vec<u32> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    all.sort_unstable();
    (all.len() as f64 / duration.as_secs_f64(), percentile(&all, 0.5) as f64)
}

/// CPU time (user + system) this process has used: servers and load generator together.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// One attempt to open a browser WebSocket.
fn try_ws(url: &str, auth: bool) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    if auth {
        request.headers_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    }
    // A browser does not zero 128 KiB (tungstenite's default buffer) before every read.
    let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tungstenite::client::connect_with_config(request, Some(config), 0)?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    Ok(ws)
}

fn ws(url: &str, auth: bool) -> Ws {
    retried(|| try_ws(url, auth))
}

/// The WebSocket `open` makes. A burst of subscribers can find the remote's bulkhead full
/// (503) or the runtime too slow to answer in time (504), both retryable: try again a
/// second later, as a browser client does.
fn retried<S>(open: impl Fn() -> Result<tungstenite::WebSocket<S>, tungstenite::Error>) -> tungstenite::WebSocket<S> {
    let mut attempts = 0;
    loop {
        match open() {
            Err(tungstenite::Error::Http(r)) if matches!(r.status().as_u16(), 503 | 504) && attempts < 30 => {
                attempts += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other.expect("ws connect"),
        }
    }
}

fn next_event<S: std::io::Read + std::io::Write>(ws: &mut tungstenite::WebSocket<S>) -> Value {
    loop {
        if let Message::Text(t) = ws.read().expect("frame") {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

fn event_name(f: &Value) -> &str {
    f["envelope"]["payload"]["event"].as_str().unwrap_or("")
}

/// One side of a comparison: requests/s, p50 µs, CPU µs per request.
struct Sample {
    rate: f64,
    p50: f64,
    cpu_per_request: f64,
}

fn sample(urls: &[String], connections: usize, d: Duration, auth: bool) -> Sample {
    let cpu = cpu_seconds();
    let (rate, p50) = load(urls, connections, d, auth);
    Sample { rate, p50, cpu_per_request: (cpu_seconds() - cpu) * 1e6 / (rate * d.as_secs_f64()) }
}

/// Comparisons measure each side in this many slices of [`seconds`] / `SLICES`.
const SLICES: u32 = 4;

fn mean(samples: &[Sample]) -> Sample {
    let n = samples.len() as f64;
    let avg = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>() / n;
    Sample { rate: avg(|s| s.rate), p50: avg(|s| s.p50), cpu_per_request: avg(|s| s.cpu_per_request) }
}

/// Measures `a` and `b` in alternating slices (A B B A A B B A), so slow drift on a shared
/// machine falls on both sides alike; each side is its slices' mean.
fn side_by_side(a: &dyn Fn(Duration) -> Sample, b: &dyn Fn(Duration) -> Sample) -> (Sample, Sample) {
    let d = seconds() / SLICES;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for slice in 0..SLICES {
        if slice % 2 == 0 {
            first.push(a(d));
            second.push(b(d));
        } else {
            second.push(b(d));
            first.push(a(d));
        }
    }
    (mean(&first), mean(&second))
}

fn p1_p2_p5(s: &Setup, rows: &mut Vec<Row>) {
    let remote_worker =
        post(&format!("{}/api/runtimes/lab/workers", s.gateway), &json!({}), false)["worker"]["worker_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let direct_url = format!("{}/v1/workers/{remote_worker}", s.runtime);
    let through_url = format!("{}/api/runtimes/lab/workers/{remote_worker}", s.gateway);
    let (direct, through) = side_by_side(&|d| sample(std::slice::from_ref(&direct_url), 16, d, true), &|d| {
        sample(std::slice::from_ref(&through_url), 16, d, false)
    });
    let ratio = through.rate / direct.rate;
    let added = (through.p50 - direct.p50).max(0.0);
    // Saturated, the added p50 is 16 / throughput; one connection shows the gateway's own delay.
    let (direct_one, through_one) = side_by_side(&|d| sample(std::slice::from_ref(&direct_url), 1, d, true), &|d| {
        sample(std::slice::from_ref(&through_url), 1, d, false)
    });
    let added_unloaded = (through_one.p50 - direct_one.p50).max(0.0);
    rows.push(Row {
        id: "P1",
        what: "GET remote worker via gateway vs direct (16 conns)".into(),
        figure: format!(
            "{:.0} vs {:.0} req/s; p50 +{added:.0} µs (1 conn: +{added_unloaded:.0} µs); CPU {:.0} vs {:.0} µs/req",
            through.rate, direct.rate, through.cpu_per_request, direct.cpu_per_request
        ),
        ratio: Some(ratio),
        target: "≥ 0.6×; +p50 ≤ 150 µs",
        pass: Some(ratio >= 0.6 && added <= 150.0),
    });
    // The same with every connection on its own worker: no two requests can share one
    // upstream request, so this is the cost of the relay path alone.
    let ids: Vec<String> = (0..16)
        .map(|_| {
            let created = post(&format!("{}/api/runtimes/lab/workers", s.gateway), &json!({}), false);
            created["worker"]["worker_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let direct_urls: Vec<String> = ids.iter().map(|id| format!("{}/v1/workers/{id}", s.runtime)).collect();
    let through_urls: Vec<String> =
        ids.iter().map(|id| format!("{}/api/runtimes/lab/workers/{id}", s.gateway)).collect();
    let (direct, through) =
        side_by_side(&|d| sample(&direct_urls, 16, d, true), &|d| sample(&through_urls, 16, d, false));
    rows.push(Row {
        id: "P1b",
        what: "P1 with 16 distinct workers (nothing shared)".into(),
        figure: format!(
            "{:.0} vs {:.0} req/s; p50 +{:.0} µs; CPU {:.0} vs {:.0} µs/req",
            through.rate,
            direct.rate,
            (through.p50 - direct.p50).max(0.0),
            through.cpu_per_request,
            direct.cpu_per_request
        ),
        ratio: Some(through.rate / direct.rate),
        target: "report only",
        pass: None,
    });

    let local = post(&format!("{}/api/runtimes/local/workers", s.gateway), &json!({}), false)["worker"]["worker_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let worker_url = format!("{}/api/runtimes/local/workers/{local}", s.gateway);
    let health_url = format!("{}/healthz", s.gateway);
    let (health, embedded) = side_by_side(&|d| sample(std::slice::from_ref(&health_url), 16, d, false), &|d| {
        sample(std::slice::from_ref(&worker_url), 16, d, false)
    });
    let (health, embedded) = (health.rate, embedded.rate);
    let ratio = embedded / health;
    rows.push(Row {
        id: "P2",
        what: "GET embedded worker vs /healthz (16 conns)".into(),
        figure: format!("{embedded:.0} vs {health:.0} req/s"),
        ratio: Some(ratio),
        target: "≥ 0.8×; ≥ 15 k req/s",
        pass: Some(ratio >= 0.8 && embedded >= 15_000.0),
    });

    // P5: 64 requests stuck on a hung runtime while P2 runs again.
    let stop = Arc::new(AtomicBool::new(false));
    let hung: Vec<_> = (0..64)
        .map(|_| {
            let url = format!("{}/api/runtimes/hung/workers/w", s.gateway);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let a: ureq::Agent =
                    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(60))).build().into();
                while !stop.load(Ordering::SeqCst) {
                    let _ = a.get(&url).call();
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // let the 64 requests get stuck
    // Sliced like the P2 figure it is compared with (each slice opens its connections anew).
    let with_hung = mean(
        &(0..SLICES)
            .map(|_| sample(std::slice::from_ref(&worker_url), 16, seconds() / SLICES, false))
            .collect::<Vec<_>>(),
    )
    .rate;
    stop.store(true, Ordering::SeqCst);
    let ratio = with_hung / embedded;
    rows.push(Row {
        id: "P5",
        what: "P2 while 64 requests hang on another runtime".into(),
        figure: format!("{with_hung:.0} vs {embedded:.0} req/s"),
        ratio: Some(ratio),
        target: "≥ 0.9× of P2",
        pass: Some(ratio >= 0.9),
    });
    drop(hung); // the hung threads end when the process does
}

/// Seconds one client takes to receive the events of `bursts` inputs of `words` words, each
/// produced as fast as the worker can. A burst fits the subscriber queues, so a client that
/// keeps up loses nothing; an unbounded burst would outrun any reader and be cut off by design.
fn event_seconds(ws: &mut Ws, send: &dyn Fn(), bursts: usize, words: usize) -> f64 {
    let started = Instant::now();
    let mut deltas = 0;
    for _ in 0..bursts {
        send();
        loop {
            let Message::Text(text) = ws.read().expect("frame") else { continue };
            match scan_event(text.as_str()).map(|(_, event)| event) {
                Some("text_delta") => deltas += 1,
                Some("turn_end") => break,
                _ => {}
            }
        }
    }
    assert_eq!(deltas, bursts * words, "every event arrives");
    started.elapsed().as_secs_f64()
}

fn p3(s: &Setup, rows: &mut Vec<Row>) {
    let (bursts, words) = if quick() { (24, 800) } else { (600, 800) };
    let text = "w ".repeat(words);
    let create = || {
        let created = post(&format!("{}/api/runtimes/lab/workers", s.gateway), &json!({}), false);
        created["worker"]["worker_id"].as_str().unwrap().to_owned()
    };
    // A worker per side, both streams open throughout: the slices alternate (A B B A …) so
    // drift on the shared machine falls on both sides alike.
    let (direct_id, through_id) = (create(), create());
    let mut direct = ws(&format!("{}/v1/workers/{direct_id}/events/ws", s.runtime.replace("http", "ws")), true);
    next_event(&mut direct);
    let mut through =
        ws(&format!("{}/api/runtimes/lab/workers/{through_id}/events/ws", s.gateway.replace("http", "ws")), false);
    next_event(&mut through);
    let direct_input = format!("{}/v1/workers/{direct_id}/input", s.runtime);
    let through_input = format!("{}/api/runtimes/lab/workers/{through_id}/input", s.gateway);
    let send_direct = || drop(post(&direct_input, &json!({"kind":"user","content":text}), true));
    let send_through = || drop(post(&through_input, &json!({"content":text}), false));
    let slice = bursts / SLICES as usize;
    let (mut direct_secs, mut through_secs, mut direct_cpu, mut through_cpu) = (0.0, 0.0, 0.0, 0.0);
    for n in 0..SLICES {
        let mut run_direct = || {
            let cpu = cpu_seconds();
            direct_secs += event_seconds(&mut direct, &send_direct, slice, words);
            direct_cpu += cpu_seconds() - cpu;
        };
        let mut run_through = || {
            let cpu = cpu_seconds();
            through_secs += event_seconds(&mut through, &send_through, slice, words);
            through_cpu += cpu_seconds() - cpu;
        };
        if n % 2 == 0 {
            run_direct();
            run_through();
        } else {
            run_through();
            run_direct();
        }
    }
    drop((direct, through));
    // Its relay lingers a few seconds after its browser; P4 counts the relays it opens.
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay_upstreams(s) != Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = (slice * SLICES as usize * words) as f64;
    let (direct_rate, gateway_rate) = (events / direct_secs, events / through_secs);
    let ratio = gateway_rate / direct_rate;
    rows.push(Row {
        id: "P3",
        what: format!("remote events/s to 1 browser, bursts of {words}"),
        figure: format!(
            "{gateway_rate:.0} vs {direct_rate:.0} events/s; CPU {:.2} vs {:.2} µs/event",
            through_cpu * 1e6 / events,
            direct_cpu * 1e6 / events
        ),
        ratio: Some(ratio),
        target: "≥ 0.7×; ≥ 100 k events/s",
        pass: Some(ratio >= 0.7 && gateway_rate >= 100_000.0),
    });
}

/// The cursor and event name of an `event` frame, found without parsing the JSON.
fn scan_event(text: &str) -> Option<(u64, &str)> {
    let field = |name: &str| {
        let start = text.find(name)? + name.len();
        text[start..].split('"').next()
    };
    if !text.contains("\"kind\":\"event\"") {
        return None;
    }
    // wo_ + 16 hex digits from a runtime; bo_ + a 16-digit stream tag + the runtime's 16
    // from the gateway: the last 16 digits are the runtime's event id either way.
    let cursor = field("\"cursor\":\"")?;
    let cursor = u64::from_str_radix(cursor.get(cursor.len().checked_sub(16)?..)?, 16).ok()?;
    Some((cursor, field("\"event\":\"")?))
}

/// A loopback connection whose reads note when the kernel received the bytes they return
/// (`SO_TIMESTAMPNS`): a delivery is timed when it reached the browser's socket, not when
/// one of the load generator's 1 000 reader threads, sharing two cores with the servers it
/// measures, next got a core to read it.
struct Stamped {
    tcp: std::net::TcpStream,
    received: Option<std::time::SystemTime>,
}

impl Stamped {
    fn connect(url: &str) -> Stamped {
        let authority = url.split("://").nth(1).unwrap().split('/').next().unwrap();
        let tcp = std::net::TcpStream::connect(authority).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: sets an int option on a socket we own.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&tcp),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_TIMESTAMPNS");
        Stamped { tcp, received: None }
    }
}

impl std::io::Read for Stamped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut control = [0u64; 16];
        // SAFETY: recvmsg fills `buf` and `control`, both live for the call and described by
        // `msg`; the control messages are walked with the libc macros within `control`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(&self.tcp), &mut msg, 0);
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let at: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    self.received = Some(std::time::UNIX_EPOCH + Duration::new(at.tv_sec as u64, at.tv_nsec as u32));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            Ok(n as usize)
        }
    }
}

impl std::io::Write for Stamped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// A browser WebSocket on a [`Stamped`] connection.
fn stamped_ws(url: &str, auth: bool) -> tungstenite::WebSocket<Stamped> {
    use tungstenite::client::IntoClientRequest;
    retried(|| {
        let mut request = url.into_client_request().unwrap();
        if auth {
            request.headers_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        }
        let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
        match tungstenite::client::client_with_config(request, Stamped::connect(url), Some(config)) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("a blocking handshake was interrupted"),
        }
    })
}

/// The gateway's open upstream event streams (`/metrics`).
fn relay_upstreams(s: &Setup) -> Option<u64> {
    let metrics = agent().get(&format!("{}/metrics", s.gateway)).call().ok()?.body_mut().read_to_string().ok()?;
    metrics.lines().find_map(|l| l.strip_prefix("worker_gateway_relay_upstreams ")?.trim().parse().ok())
}

fn p4(s: &Setup, rows: &mut Vec<Row>) {
    let subscribers = if quick() { 200 } else { 1000 };
    let events = if quick() { 500 } else { 2000 };
    let wid = post(&format!("{}/api/runtimes/lab/workers", s.gateway), &json!({"profile":"tick"}), false)["worker"]["worker_id"].as_str().unwrap().to_owned();
    let url = format!("{}/api/runtimes/lab/workers/{wid}/events/ws", s.gateway.replace("http", "ws"));
    let mut reference = stamped_ws(&format!("{}/v1/workers/{wid}/events/ws", s.runtime.replace("http", "ws")), true);
    next_event(&mut reference);
    let ready = Arc::new(Barrier::new(subscribers + 1));
    let clients: Vec<_> = (0..subscribers)
        .map(|_| {
            let (url, ready) = (url.clone(), ready.clone());
            std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || {
                    // A client that cannot connect still reaches the barrier (or the others
                    // would wait for it forever), and fails the scenario after it.
                    let opened = std::panic::catch_unwind(|| {
                        let mut c = stamped_ws(&url, false);
                        let first = next_event(&mut c);
                        assert_eq!(event_name(&first), "snapshot", "the stream opened with {first}");
                        c
                    });
                    ready.wait();
                    let mut c = opened.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    let mut arrivals = Vec::new();
                    let mut last = 0u64;
                    let mut in_order = true;
                    loop {
                        // A cheap scan, not a JSON parse: 200 clients share the server's cores.
                        let text = match c.read().expect("frame") {
                            Message::Text(text) => text,
                            Message::Close(close) => panic!("the gateway closed the stream: {close:?}"),
                            _ => continue,
                        };
                        let Some((cursor, event)) = scan_event(text.as_str()) else { continue };
                        in_order &= cursor > last;
                        last = cursor;
                        match event {
                            "text_delta" => arrivals.push(c.get_ref().received.expect("a receive time")),
                            "turn_end" => return (arrivals, in_order),
                            _ => {}
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    ready.wait();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let input = format!("{}/api/runtimes/lab/workers/{wid}/input", s.gateway);
    post(&input, &json!({"content": "t ".repeat(events)}), false);
    let mut reference_arrivals = Vec::new();
    loop {
        let f = next_event(&mut reference);
        match event_name(&f) {
            "text_delta" => reference_arrivals.push(reference.get_ref().received.expect("a receive time")),
            "turn_end" => break,
            _ => {}
        }
    }
    let emitting = reference_arrivals.last().unwrap().duration_since(reference_arrivals[0]).unwrap().as_secs_f64();
    let rate = (reference_arrivals.len() - 1) as f64 / emitting;
    let mut latencies = Vec::new();
    let mut complete = true;
    for c in clients {
        let (arrivals, in_order) = c.join().unwrap();
        complete &= in_order && arrivals.len() == events;
        for (a, r) in arrivals.iter().zip(&reference_arrivals) {
            latencies.push(a.duration_since(*r).unwrap_or_default().as_micros() as u32);
        }
    }
    let cores = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let [p50, p99] = [0.5, 0.99].map(|p| percentile(&latencies, p) as f64 / 1000.0);
    let upstreams = relay_upstreams(s);
    let open = upstreams.map_or("?".to_owned(), |n| n.to_string());
    rows.push(Row {
        id: "P4",
        what: format!("fan-out: {events} events at 1 k/s to {subscribers} browsers"),
        figure: format!(
            "complete and ordered: {complete}; {rate:.0} events/s; added delivery p50 {p50:.1} ms, p99 {p99:.1} ms; \
             relays open: {open}; {cores:.2} cores busy (browsers included)"
        ),
        ratio: None,
        target: "all events in order; p99 ≤ 50 ms; one upstream",
        pass: Some(complete && p99 <= 50.0 && upstreams == Some(1)),
    });
}

/// A number field of `/proc/<pid>/status` (`VmRSS:` in KiB, `Threads:`), 0 when unreadable.
fn status_field(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn threads(pid: u32) -> u64 {
    status_field(pid, "Threads:")
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after.split_whitespace().skip(11).take(2).filter_map(|t| t.parse::<f64>().ok()).sum();
    // SAFETY: sysconf reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `worker-gateway` process of the bench; killed when dropped.
struct Child {
    child: std::process::Child,
    base: String,
}

impl Child {
    /// Starts `worker-gateway <args>` in `dir` and waits for its `listening on` line.
    fn start(args: &[&str], dir: &std::path::Path) -> Child {
        Child::wait_listening(Child::spawn(args, dir))
    }

    fn spawn(args: &[&str], dir: &std::path::Path) -> std::process::Child {
        // Cargo builds the binary for benches and says where it is.
        std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_listening(mut child: std::process::Child) -> Child {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().trim_start_matches("listening on ").to_owned();
        Child { child, base }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory for one scenario's processes.
fn scenario_dir(id: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wg-bench-{id}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn p6(rows: &mut Vec<Row>) {
    let dir = scenario_dir("p6");
    let gateway = Child::start(&["serve", "--bind", "127.0.0.1:0"], &dir);
    let base = gateway.base.clone();
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(gateway.pid());
    let wid = post(&format!("{base}/api/runtimes/local/workers"), &json!({}), false)["worker"]["worker_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let n = 200;
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", base.replace("http", "ws"));
    let sockets: Vec<Ws> = (0..n).map(|_| ws(&url, false)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let busy = rss_kib(gateway.pid());
    let per = (busy.saturating_sub(idle)) as f64 / n as f64;
    drop(sockets);
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    rows.push(Row {
        id: "P6",
        what: format!("RSS idle, and per idle browser WS ({n} open)"),
        figure: format!("idle {:.1} MB; {per:.0} KiB per WS", idle as f64 / 1024.0),
        ratio: None,
        target: "idle ≤ 10 MB; ≤ 64 KiB per idle WS",
        pass: Some(idle <= 10 * 1024 && per <= 64.0),
    });
}

/// Raises this process's descriptor limit to at least `want` when it may (the hard limit too,
/// with the privilege), else to its hard limit; returns the soft limit now.
fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit fill and read a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let raised = libc::rlimit { rlim_cur: want.max(limit.rlim_cur), rlim_max: want.max(limit.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// Runs `each` over `items` on `threads` threads.
fn in_parallel<T: Send, R: Send>(items: Vec<T>, threads: usize, each: impl Fn(T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    let mut items = items.into_iter();
    let chunks: Vec<Vec<T>> = std::iter::from_fn(|| Some(items.by_ref().take(chunk).collect::<Vec<T>>()))
        .take_while(|c| !c.is_empty())
        .collect();
    std::thread::scope(|scope| {
        let tasks: Vec<_> =
            chunks.into_iter().map(|c| scope.spawn(|| c.into_iter().map(&each).collect::<Vec<R>>())).collect();
        tasks.into_iter().flat_map(|t| t.join().unwrap()).collect()
    })
}

fn p8(rows: &mut Vec<Row>) {
    let (runtimes, workers) = (200, 10);
    let (idle_window, listings) = if quick() { (Duration::from_secs(3), 10) } else { (Duration::from_secs(10), 30) };
    let dir = scenario_dir("p8");
    // Started all at once, then each waited for: they boot side by side.
    let started: Vec<std::process::Child> = (0..runtimes)
        .map(|n| {
            let id = format!("rt-{n}");
            Child::spawn(&["runtime", "--memory", "--bind", "127.0.0.1:0", "--runtime-id", &id], &dir)
        })
        .collect();
    let runtimes: Vec<Child> = started.into_iter().map(Child::wait_listening).collect();
    let create = json!({"intent": {"kind": "assistant"}, "profile": {"kind": "runtime_default"}});
    in_parallel(runtimes.iter().map(|rt| rt.base.clone()).collect(), 8, |base| {
        for _ in 0..workers {
            post(&format!("{base}/v1/workers"), &create, false);
        }
    });
    // The default configuration, but for the bind address and the runtimes.
    let mut config = String::from("[server]\nbind = \"127.0.0.1:0\"\n");
    for (n, rt) in runtimes.iter().enumerate() {
        config.push_str(&format!("[[runtimes]]\nid = \"rt-{n}\"\nkind = \"remote\"\nbase_url = \"{}\"\n", rt.base));
    }
    let config_file = dir.join("gateway.toml");
    std::fs::write(&config_file, config).unwrap();
    let gateway = Child::start(&["serve", "--config", config_file.to_str().unwrap()], &dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed =
            agent().get(&format!("{}/api/runtimes", gateway.base)).call().unwrap().body_mut().read_json::<Value>();
        let healthy = listed.map_or(0, |l| {
            l["items"].as_array().map_or(0, |i| i.iter().filter(|r| r["health"]["state"] == "healthy").count())
        });
        if healthy == runtimes.len() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1)); // the start's probes and threads settle
    let pid = gateway.pid();
    let (cpu0, t0) = (process_cpu_seconds(pid), Instant::now());
    std::thread::sleep(idle_window);
    let cpu = (process_cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let (idle_threads, rss) = (threads(pid), rss_kib(pid));
    let client = agent();
    let mut times: Vec<u32> = Vec::new();
    let mut listed = 0;
    for _ in 0..listings {
        let t = Instant::now();
        let body = client.get(&format!("{}/api/workers", gateway.base)).call().unwrap().body_mut().read_to_vec();
        times.push(t.elapsed().as_micros() as u32);
        let all: Value = serde_json::from_slice(&body.unwrap()).unwrap();
        listed = all["items"].as_array().map_or(0, Vec::len);
    }
    times.sort_unstable();
    let p50 = percentile(&times, 0.5) as f64 / 1000.0;
    let busy_threads = threads(pid);
    drop(gateway);
    drop(runtimes);
    let _ = std::fs::remove_dir_all(&dir);
    let complete = listed == 200 * workers;
    let rss_mb = rss as f64 / 1024.0;
    rows.push(Row {
        id: "P8",
        what: format!("200 remote runtimes × {workers} workers, default config"),
        figure: format!(
            "idle: {idle_threads} threads, {cpu:.2} % CPU, {rss_mb:.1} MB; /api/workers p50 {p50:.1} ms ({listed} workers; \
             {busy_threads} threads after)"
        ),
        ratio: None,
        target: "≤ 100 threads, ≤ 2 % CPU, ≤ 64 MB; p50 ≤ 100 ms",
        pass: Some(complete && idle_threads <= 100 && cpu <= 2.0 && rss_mb <= 64.0 && p50 <= 100.0),
    });
}

fn p9(rows: &mut Vec<Row>) {
    let wanted: usize = if quick() { 2_000 } else { 10_000 };
    // The bench holds one descriptor per session; the gateway (started after, inheriting the
    // limit) one per session too.
    let limit = raise_fd_limit(wanted as u64 + 4096);
    let n = wanted.min(limit.saturating_sub(1024) as usize);
    let dir = scenario_dir("p9");
    let gateway = Child::start(&["serve", "--bind", "127.0.0.1:0"], &dir);
    let base = gateway.base.clone();
    let wid = post(&format!("{base}/api/runtimes/local/workers"), &json!({}), false)["worker"]["worker_id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(gateway.pid());
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", base.replace("http", "ws"));
    let t0 = Instant::now();
    let opened = in_parallel((0..n).collect(), 8, |_| {
        let mut c = try_ws(&url, false).ok()?;
        next_event(&mut c); // the snapshot: the session runs
        Some(c)
    });
    let opening = t0.elapsed().as_secs_f64();
    let sockets: Vec<Ws> = opened.into_iter().flatten().collect();
    let refused = n - sockets.len();
    std::thread::sleep(Duration::from_secs(1));
    let (busy, threads_open) = (rss_kib(gateway.pid()), threads(gateway.pid()));
    let descriptors = std::fs::read_dir(format!("/proc/{}/fd", gateway.pid())).map_or(0, |d| d.count());
    let per = busy.saturating_sub(idle) as f64 / sockets.len().max(1) as f64;
    drop(sockets);
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    let fewer = if n < 10_000 {
        if n < wanted { format!(" (fewer: {limit} descriptors allowed)") } else { " (quick mode: fewer)".to_owned() }
    } else {
        String::new()
    };
    rows.push(Row {
        id: "P9",
        what: format!("{n} idle browser WebSockets on one gateway{fewer}"),
        figure: format!(
            "{} open, {refused} refused; {per:.1} KiB RSS each ({:.0} MB in all); {threads_open} threads, \
             {descriptors} descriptors; opened in {opening:.1} s",
            n - refused,
            busy as f64 / 1024.0
        ),
        ratio: None,
        target: "all accepted; ≤ 64 KiB each",
        pass: Some(refused == 0 && per <= 64.0 && n >= 10_000.min(wanted)),
    });
}

fn round_trip(ws: &mut Ws, input_url: &str, runtime_api: bool) -> u32 {
    let t = Instant::now();
    let body = if runtime_api { json!({"kind":"user","content":"ping"}) } else { json!({"content":"ping"}) };
    post(input_url, &body, runtime_api);
    loop {
        if event_name(&next_event(ws)) == "turn_end" {
            return t.elapsed().as_micros() as u32;
        }
    }
}

fn p7(s: &Setup, rows: &mut Vec<Row>) {
    let n = if quick() { 50 } else { 300 };
    let mut p50s = Vec::new();
    for rid in ["local", "lab"] {
        let wid = post(&format!("{}/api/runtimes/{rid}/workers", s.gateway), &json!({}), false)["worker"]["worker_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut w =
            ws(&format!("{}/api/runtimes/{rid}/workers/{wid}/events/ws", s.gateway.replace("http", "ws")), false);
        next_event(&mut w);
        let input = format!("{}/api/runtimes/{rid}/workers/{wid}/input", s.gateway);
        let mut times: Vec<u32> = (0..n).map(|_| round_trip(&mut w, &input, false)).collect();
        times.sort_unstable();
        p50s.push(percentile(&times, 0.5) as f64 / 1000.0);
    }
    rows.push(Row {
        id: "P7",
        what: "POST input → turn_end on the WS (echo), p50".into(),
        figure: format!("embedded {:.2} ms; remote {:.2} ms", p50s[0], p50s[1]),
        ratio: None,
        target: "≤ 2 ms embedded; ≤ 4 ms remote",
        pass: Some(p50s[0] <= 2.0 && p50s[1] <= 4.0),
    });
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` style listing: nothing to list
    }
    // The in-process servers log only when asked (`RUST_LOG=warn cargo bench`).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    let dir = std::env::temp_dir().join(format!("wg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = setup(&dir);
    let mut rows = Vec::new();
    if selected("P1") || selected("P2") || selected("P5") {
        p1_p2_p5(&s, &mut rows);
    }
    if selected("P3") {
        p3(&s, &mut rows);
    }
    if selected("P4") {
        p4(&s, &mut rows);
    }
    if selected("P7") {
        p7(&s, &mut rows);
    }
    if selected("P6") {
        p6(&mut rows);
    }
    if selected("P8") {
        p8(&mut rows);
    }
    if selected("P9") {
        p9(&mut rows);
    }
    rows.sort_by_key(|r| r.id);
    println!("\n{:<4} {:<52} {:<62} {:>7} {:<34} result", "id", "scenario", "figure", "ratio", "target");
    for r in &rows {
        let ratio = r.ratio.map_or("-".to_owned(), |x| format!("{x:.2}×"));
        println!(
            "{:<4} {:<52} {:<62} {:>7} {:<34} {}",
            r.id,
            r.what,
            r.figure,
            ratio,
            r.target,
            match r.pass {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "info",
            }
        );
    }
    let report: Vec<Value> = rows
        .iter()
        .map(|r| json!({"id": r.id, "scenario": r.what, "figure": r.figure, "ratio": r.ratio, "target": r.target, "pass": r.pass}))
        .collect();
    // The target directory this bench was built in (`CARGO_TARGET_DIR` too): <target>/release/deps/<bench>.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap_or(std::path::Path::new("target"));
    let out = target.join("bench-report.json");
    let text = serde_json::to_string_pretty(&json!({"quick": quick(), "scenarios": report})).unwrap();
    match std::fs::write(&out, text) {
        Ok(()) => println!("\nreport: {}", out.display()),
        Err(e) => println!("\nreport: cannot write {}: {e}", out.display()),
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(0);
}
