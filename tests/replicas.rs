//! Replicas: two gateway processes with the same config serve the same browser. A stream
//! moved from one to the other mid-turn — directly, and through nginx with the shipped
//! `config/nginx.replicas.conf.example` while each replica is SIGKILLed in turn — resumes
//! from its last cursor with every event exactly once, in order.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "replica-runtime-token";

/// The runtime behind the replicas: fs store, a slow echo so that a turn takes a while.
fn runtime(dir: &Path) -> Process {
    let config = dir.join("runtime.toml");
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n\n[runtime]\nid = \"rt-lab\"\ntoken_env = \"LAB_RUNTIME_TOKEN\"\n\
         store = \"fs\"\ndata_dir = \"{}\"\n\n[profiles.slow]\nkind = \"echo\"\ndelay_ms = 25\n",
        dir.join("data").display()
    );
    std::fs::write(&config, text).expect("runtime config");
    Process::start_with_env(&["runtime", "--config", config.to_str().unwrap()], &[("LAB_RUNTIME_TOKEN", TOKEN)])
}

/// The shipped replica config, pointed at `runtime`.
fn replica_config(dir: &Path, runtime: &Process) -> PathBuf {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.replicas.example.toml");
    let text = std::fs::read_to_string(shipped).expect("shipped replica config");
    assert!(text.contains("http://127.0.0.1:38800"));
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text.replace("http://127.0.0.1:38800", &runtime.base)).expect("replica config");
    path
}

fn replica(config: &Path, bind: &str) -> Process {
    let args = ["serve", "--config", config.to_str().unwrap(), "--bind", bind];
    let gateway = Process::start_with_env(&args, &[("LAB_RUNTIME_TOKEN", TOKEN)]);
    wait_health(&gateway.base, "lab", "healthy");
    gateway
}

fn ws_base(base: &str) -> String {
    base.replace("http://", "ws://")
}

fn last_cursor(frames: &[Value]) -> String {
    frames.iter().rev().find_map(|f| f["envelope"]["cursor"].as_str()).expect("a cursor").to_owned()
}

fn is_idle(f: &Value) -> bool {
    event_name(f) == "status" && f["envelope"]["payload"]["data"]["status"] == "idle"
}

/// The worker's events straight from the runtime, from its first through the `idles`th idle.
fn runtime_events(runtime: &Process, wid: &str, idles: usize) -> Vec<Value> {
    let url = format!("{}/v1/workers/{wid}/events/ws?cursor=wo_0000000000000000", ws_base(&runtime.base));
    let mut direct = ws_connect(&url, &[("authorization", &format!("Bearer {TOKEN}"))]).expect("runtime stream");
    assert_eq!(event_name(&next_frame(&mut direct)), "snapshot");
    let mut seen = 0;
    let frames = frames_until(&mut direct, |f| {
        seen += usize::from(is_idle(f));
        seen == idles
    });
    payloads(&frames)[1..].to_vec() // the creation event precedes every browser's snapshot
}

fn say(base: &str, wid: &str, text: &str) {
    let url = format!("{base}/api/runtimes/lab/workers/{wid}/input");
    assert_eq!(post_json(&url, &json!({ "content": text })).status, 200);
}

const WORDS: &str = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen";

#[test]
fn a_stream_moved_to_another_replica_mid_turn_loses_and_repeats_nothing() {
    let dir = temp_dir("replicas");
    let rt = runtime(&dir);
    let config = replica_config(&dir, &rt);
    let (a, b) = (replica(&config, "127.0.0.1:0"), replica(&config, "127.0.0.1:0"));
    let wid = create_worker_on(&a.base, "lab", "slow");
    let path = format!("/api/runtimes/lab/workers/{wid}/events/ws");

    let mut on_a = ws_connect(&format!("{}{path}", ws_base(&a.base)), &[]).expect("stream on A");
    let mut seen = vec![next_frame(&mut on_a)];
    say(&b.base, &wid, WORDS); // input through B, stream through A: one system
    seen.extend(frames_until(&mut on_a, |f| event_name(f) == "text_delta" && f.to_string().contains("three")));
    drop(on_a);

    let cursor = last_cursor(&seen);
    let mut on_b = ws_connect(&format!("{}{path}?cursor={cursor}", ws_base(&b.base)), &[]).expect("stream on B");
    seen.extend(frames_until(&mut on_b, is_idle));
    assert!(seen.iter().all(|f| f["kind"] == "event"), "no reset, no gap: {seen:?}");
    assert_eq!(payloads(&seen), runtime_events(&rt, &wid, 1), "every event once, in order");
}

/// nginx from the shipped replicas example, in front of `a` and `b`; stopped when dropped.
struct Nginx {
    child: std::process::Child,
    base: String,
}

impl Nginx {
    fn start(dir: &Path, a: &Process, b: &Process) -> Nginx {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/nginx.replicas.conf.example");
        let port = free_port();
        let text = std::fs::read_to_string(shipped)
            .expect("shipped nginx config")
            .replace("127.0.0.1:8787", a.host_port())
            .replace("127.0.0.1:8788", b.host_port())
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, text).expect("nginx config");
        let mut command = std::process::Command::new("nginx");
        command.args(["-p", dir.to_str().unwrap(), "-c", conf.to_str().unwrap(), "-g", "daemon off;"]);
        // Its own process group, so that dropping it ends its worker process too.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child =
            command.stderr(std::process::Stdio::null()).spawn().expect("nginx is installed (.ci/run installs it)");
        let base = format!("http://127.0.0.1:{port}");
        wait_for("nginx to listen", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Nginx { child, base }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: signals the process group of our own child (its master and workers).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Reads through nginx until `done`, reconnecting with the last cursor whenever the replica
/// behind the connection dies.
fn read_through(nginx: &Nginx, path: &str, seen: &mut Vec<Value>, mut done: impl FnMut(&Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "the stream through nginx did not finish");
        let url = format!("{}{path}?cursor={}", ws_base(&nginx.base), last_cursor(seen));
        let Ok(mut ws) = tungstenite::connect(url.as_str()).map(|(ws, _)| ws) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let frame: Value = serde_json::from_str(t.as_str()).expect("JSON frame");
                    let stop = done(&frame);
                    seen.push(frame);
                    if stop {
                        return;
                    }
                }
                Ok(tungstenite::Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

#[test]
fn through_nginx_each_replica_can_die_mid_turn_and_the_browser_misses_nothing() {
    if !nginx_available("the replicas-behind-nginx test") {
        return;
    }
    let dir = temp_dir("replicas-nginx");
    let rt = runtime(&dir);
    let config = replica_config(&dir, &rt);
    let mut a = replica(&config, "127.0.0.1:0");
    let mut b = replica(&config, "127.0.0.1:0");
    let nginx = Nginx::start(&dir, &a, &b);
    let wid = create_worker_on(&nginx.base, "lab", "slow");
    let path = format!("/api/runtimes/lab/workers/{wid}/events/ws");

    // A browser on the page nginx serves sends its Origin: the gateway must see it as its own.
    let origin = nginx.base.clone();
    let create = request("POST", &format!("{}/api/runtimes/lab/workers", nginx.base), &[("origin", &origin)]);
    assert_eq!(create.status, 201, "a same-origin create through nginx: {:?}", create.body);
    let url = format!("{}{path}", ws_base(&nginx.base));
    let mut first = ws_connect(&url, &[("origin", &origin)]).expect("a same-origin upgrade through nginx");
    let mut seen = vec![next_frame(&mut first)];
    assert_eq!(event_name(&seen[0]), "snapshot");
    drop(first);
    say(&nginx.base, &wid, WORDS);
    let delta = |word: &'static str| move |f: &Value| event_name(f) == "text_delta" && f.to_string().contains(word);
    read_through(&nginx, &path, &mut seen, delta("two"));
    let a_addr = a.host_port().to_owned();
    a.signal(libc::SIGKILL);
    drop(a);
    read_through(&nginx, &path, &mut seen, delta("six"));
    a = replica(&config, &a_addr);
    let b_addr = b.host_port().to_owned();
    b.signal(libc::SIGKILL);
    drop(b);
    read_through(&nginx, &path, &mut seen, delta("ten"));
    b = replica(&config, &b_addr);
    read_through(&nginx, &path, &mut seen, is_idle);
    assert!(seen.iter().all(|f| f["kind"] == "event"), "no reset, no gap: {seen:?}");
    assert_eq!(payloads(&seen), runtime_events(&rt, &wid, 1), "every event once, in order");
    drop((a, b));
}
