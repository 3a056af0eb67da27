//! Chaos: two fs runtimes and a gateway are killed (SIGKILL) and restarted at random while
//! inputs flow and browsers watch; browsers reconnect with their last cursor, as the
//! dashboard does. Every acknowledged input must reach every browser exactly once and in
//! order, with its turn closed (completed, or interrupted by a restart); every worker takes
//! input after every restart; descriptors and threads do not grow.
//!
//! About 25 s with the fixed seed; `CHAOS_SECS=300` (and `CHAOS_SEED=n`) for a longer run.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const WORKERS_PER_RUNTIME: usize = 2;
const SUBSCRIBERS: usize = 5;

/// A small deterministic generator (xorshift64), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runtime_config(dir: &Path, id: &str) -> std::path::PathBuf {
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n\n[runtime]\nid = \"{id}\"\nstore = \"fs\"\ndata_dir = \"{}\"\nstop_grace_ms = 100\n\n\
         [profiles.pace]\nkind = \"echo\"\ndelay_ms = 4\n",
        dir.join("data").display()
    );
    let path = dir.join("runtime.toml");
    std::fs::write(&path, text).expect("write runtime config");
    path
}

fn start_runtime(config: &Path, bind: &str) -> Process {
    let config = config.to_str().expect("utf-8 path");
    Process::start(&["runtime", "--config", config, "--bind", bind])
}

fn start_gateway(config: &Path, bind: &str) -> Process {
    Process::start_with_env(
        &["serve", "--config", config.to_str().expect("utf-8 path"), "--bind", bind],
        &[("RUST_LOG", "info,worker_gateway::gateway::relay=debug")],
    )
}

/// One browser: watches a worker, reconnecting with its last cursor until told to stop.
fn subscriber(gateway: Arc<Mutex<String>>, path: String, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Value>>>) {
    let mut cursor: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        let base = gateway.lock().unwrap().replace("http://", "ws://");
        let query = cursor.as_ref().map_or(String::new(), |c| format!("?cursor={c}"));
        let Ok((mut ws, _)) = tungstenite::connect(format!("{base}{path}{query}")) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
        }
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match ws.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(text.as_str()).expect("JSON frame");
                    if let Some(c) = frame["envelope"]["cursor"].as_str() {
                        cursor = Some(c.to_owned());
                    }
                    log.lock().unwrap().push(frame);
                }
                Ok(tungstenite::Message::Close(_)) => break,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `content` as input; true when acknowledged.
fn send_input(agent: &ureq::Agent, url: &str, content: &str) -> bool {
    let body = json!({"content": content}).to_string();
    agent.post(url).header("content-type", "application/json").send(body).is_ok_and(|r| r.status() == 200)
}

struct Watched {
    url: String,
    acked: Arc<Mutex<Vec<String>>>,
    logs: Vec<Arc<Mutex<Vec<Value>>>>,
}

fn seq_of(frame: &Value) -> u64 {
    let c = frame["envelope"]["cursor"].as_str().expect("cursor");
    u64::from_str_radix(&c[c.len() - 16..], 16).expect("hex cursor")
}

/// Checks one browser's view of one worker against what was acknowledged.
fn check_view(frames: &[Value], acked: &[String], who: &str) {
    let mut last = 0;
    let mut users = Vec::new();
    let mut starts = 0;
    let mut ends = Vec::new();
    let mut done_texts = Vec::new();
    for f in frames {
        match f["kind"].as_str() {
            Some("gap") | Some("stream") if f["kind"] == "gap" || f["state"] == "reset" => {
                panic!("{who}: the runtimes keep every event, yet the stream said {f}")
            }
            // A browser that (re)connects while the runtime is down is told so and retries.
            Some("diagnostic") if f["diagnostic"]["code"] == "backend.unavailable" => {}
            Some("diagnostic") => panic!("{who}: unexpected diagnostic {f}"),
            Some("event") => {
                let name = event_name(f);
                if name == "snapshot" {
                    continue;
                }
                let seq = seq_of(f);
                assert!(seq > last, "{who}: event {seq} after {last}: duplicated or out of order");
                last = seq;
                let data = &f["envelope"]["payload"]["data"];
                match name.as_str() {
                    "user_message" => users.push(data["segments"][0]["content"].as_str().unwrap_or("").to_owned()),
                    "turn_start" => starts += 1,
                    "text_done" => done_texts.push(data["text"].as_str().unwrap_or("").to_owned()),
                    "turn_end" => ends.push(data["outcome"].as_str().unwrap_or("").to_owned()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let mut position = 0;
    for input in acked {
        let found = users[position..].iter().position(|u| u == input);
        let at = found.unwrap_or_else(|| {
            let head: Vec<String> = frames
                .iter()
                .take(12)
                .map(|f| format!("{} {} {}", event_name(f), f["envelope"]["cursor"], f["diagnostic"]))
                .collect();
            panic!("{who}: acknowledged input {input:?} never arrived (or out of order); first frames {head:#?}")
        });
        position += at + 1;
        assert_eq!(users.iter().filter(|u| *u == input).count(), 1, "{who}: {input:?} arrived twice");
    }
    assert_eq!(starts, ends.len(), "{who}: every turn that started was closed: {ends:?}");
    assert_eq!(ends.len(), users.len(), "{who}: one turn per input");
    for outcome in &ends {
        assert!(outcome == "completed" || outcome == "interrupted", "{who}: turn ended {outcome}");
    }
    for (input, text) in users.iter().zip(&done_texts) {
        assert!(input.starts_with(text.as_str()), "{who}: reply {text:?} to {input:?}");
    }
}

#[test]
fn inputs_and_streams_survive_random_kills_of_runtimes_and_gateway() {
    let seconds = env_u64("CHAOS_SECS", 14);
    let mut rng = Rng(env_u64("CHAOS_SEED", 0x5eed_c4a0_5eed_c4a0) | 1);
    let root = temp_dir("chaos");

    // Two fs runtimes on fixed ports (restarts reuse them).
    let mut runtimes = Vec::new();
    for id in ["rt-a", "rt-b"] {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).expect("runtime dir");
        let config = runtime_config(&dir, id);
        let process = start_runtime(&config, "127.0.0.1:0");
        let addr = process.host_port().to_owned();
        runtimes.push((config, addr, process));
    }
    let remote = |id: &str, addr: &str| {
        format!(
            "[[runtimes]]\nid = \"{id}\"\nkind = \"remote\"\nbase_url = \"http://{addr}\"\nprobe_interval_ms = 100\n\
             connect_timeout_ms = 300\nrequest_timeout_ms = 3000\nmax_in_flight = 16\n\n"
        )
    };
    let gateway_config = root.join("gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nthreads = 24\n\n{}{}",
            remote("a", &runtimes[0].1),
            remote("b", &runtimes[1].1)
        ),
    )
    .expect("gateway config");
    let mut gateway = start_gateway(&gateway_config, "127.0.0.1:0");
    let gateway_addr = gateway.host_port().to_owned();
    let base = Arc::new(Mutex::new(gateway.base.clone()));
    for id in ["a", "b"] {
        wait_health(&gateway.base, id, "healthy");
    }

    // Four workers, five browsers each.
    let stop = Arc::new(AtomicBool::new(false));
    let mut watched = Vec::new();
    let mut threads = Vec::new();
    for rid in ["a", "b"] {
        for _ in 0..WORKERS_PER_RUNTIME {
            let wid = create_worker_on(&gateway.base, rid, "pace");
            let path = format!("/api/runtimes/{rid}/workers/{wid}/events/ws");
            let logs: Vec<_> = (0..SUBSCRIBERS).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
            for log in &logs {
                let (base, path, stop, log) = (base.clone(), path.clone(), stop.clone(), log.clone());
                threads.push(std::thread::spawn(move || subscriber(base, path, stop, log)));
            }
            let url = format!("/api/runtimes/{rid}/workers/{wid}/input");
            watched.push(Watched { url, acked: Arc::default(), logs });
        }
    }
    wait_for("every browser's snapshot", Duration::from_secs(15), || {
        watched.iter().flat_map(|w| &w.logs).all(|l| !l.lock().unwrap().is_empty()).then_some(())
    });
    let baseline = threads_and_fds(gateway.child.id());

    // Inputs flow steadily, one sender per worker (so acknowledgement order is input order).
    let quiet = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = watched
        .iter()
        .enumerate()
        .map(|(k, w)| {
            let (base, stop, acked, url) = (base.clone(), quiet.clone(), w.acked.clone(), w.url.clone());
            std::thread::spawn(move || {
                let agent = agent();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let content = format!("w{k} input {n} a b c");
                    let url = format!("{}{url}", base.lock().unwrap());
                    if send_input(&agent, &url, &content) {
                        acked.lock().unwrap().push(content);
                    }
                    std::thread::sleep(Duration::from_millis(60));
                }
            })
        })
        .collect();

    // Chaos: a runtime killed and restarted every ~1.5 s; the gateway once, half way.
    let started = Instant::now();
    let mut gateway_killed = false;
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(900 + rng.below(1200)));
        if !gateway_killed && started.elapsed() > Duration::from_secs(seconds / 2) {
            eprintln!("chaos: {:?} SIGKILL gateway", started.elapsed());
            gateway.signal(libc::SIGKILL);
            let _ = gateway.wait(Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            gateway = start_gateway(&gateway_config, &gateway_addr);
            *base.lock().unwrap() = gateway.base.clone();
            gateway_killed = true;
            continue;
        }
        let (config, addr, process) = &mut runtimes[rng.below(2) as usize];
        eprintln!("chaos: {:?} SIGKILL runtime {addr}", started.elapsed());
        process.signal(libc::SIGKILL);
        let _ = process.wait(Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        *process = start_runtime(config, addr);
        kills += 1;
    }
    eprintln!("chaos: {:?} done, {kills} runtime kills", started.elapsed());
    quiet.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().expect("sender");
    }
    assert!(gateway_killed && kills >= 3, "the run killed things ({kills} runtime kills)");

    // Every worker takes input after the last restart, and every browser sees it through.
    for id in ["a", "b"] {
        wait_health(&gateway.base, id, "healthy");
    }
    let agent = agent();
    for (k, w) in watched.iter().enumerate() {
        let content = format!("w{k} final");
        let url = format!("{}{}", gateway.base, w.url);
        wait_for("the final input to be acknowledged", Duration::from_secs(15), || {
            send_input(&agent, &url, &content).then_some(())
        });
        w.acked.lock().unwrap().push(content);
    }
    let saw_final = |k: usize, log: &Mutex<Vec<Value>>| {
        let done = json!(format!("w{k} final"));
        log.lock()
            .unwrap()
            .iter()
            .any(|f| event_name(f) == "text_done" && f["envelope"]["payload"]["data"]["text"] == done)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !watched.iter().enumerate().all(|(k, w)| w.logs.iter().all(|l| saw_final(k, l))) {
        if Instant::now() > deadline {
            eprintln!("gateway log:\n{}", gateway.stderr.lock().unwrap());
            for (k, w) in watched.iter().enumerate() {
                for (s, log) in w.logs.iter().enumerate().filter(|(_, l)| !saw_final(k, l)) {
                    let log = log.lock().unwrap();
                    let tail: Vec<String> = log.iter().rev().take(4).map(|f| f.to_string()).collect();
                    eprintln!("worker {k} browser {s}: {} frames, last: {tail:#?}", log.len());
                    check_view(&log, &w.acked.lock().unwrap(), &format!("worker {k} browser {s}"));
                }
            }
            panic!("timed out waiting for every browser to see every final reply");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Threads follow load: the ones the last burst started end once idle (5 s); what must
    // not grow is what stays.
    let grown = |end: (usize, usize)| end.0 > baseline.0 + 8 || end.1 > baseline.1 + 8;
    let settle = Instant::now() + Duration::from_secs(20);
    let mut end = threads_and_fds(gateway.child.id());
    while grown(end) && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
        end = threads_and_fds(gateway.child.id());
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("subscriber");
    }

    let mut total = 0;
    for (k, w) in watched.iter().enumerate() {
        let acked = w.acked.lock().unwrap();
        total += acked.len();
        for (s, log) in w.logs.iter().enumerate() {
            check_view(&log.lock().unwrap(), &acked, &format!("worker {k} browser {s}"));
        }
    }
    assert!(total >= 4 * 10, "inputs flowed: {total}");
    assert!(!grown(end), "the gateway's descriptors and threads do not grow: {baseline:?} → {end:?}");
    eprintln!(
        "chaos: {total} inputs, {kills} runtime kills, 1 gateway kill, gateway (threads, fds) {baseline:?} → {end:?}"
    );
    for (_, addr, _) in &runtimes {
        assert!(TcpStream::connect(addr).is_ok(), "runtime {addr} serves at the end");
    }
}
