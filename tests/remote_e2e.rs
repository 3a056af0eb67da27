//! One gateway and two `worker-gateway runtime` processes with tokens, end to end.

mod common;

use common::*;
use serde_json::{Value, json};
use std::sync::Arc;

fn runtime(id: &str, token_var: &str, token: &str, store: &[&str], bind: &str) -> Process {
    let mut args = vec!["runtime", "--bind", bind, "--runtime-id", id, "--token-env", token_var];
    args.extend_from_slice(store);
    Process::start_with_env(&args, &[(token_var, token)])
}

#[test]
fn the_gateway_routes_runtime_and_worker_ids_to_the_right_process() {
    let (dir_a, dir_b) = (temp_dir("e2e-a"), temp_dir("e2e-b"));
    let (dir_a, dir_b) = (dir_a.to_str().unwrap(), dir_b.to_str().unwrap());
    // Both fs stores: their ids have no boot in them, so both runtimes hand out the same one.
    let a = runtime("rt-a", "RT_TOKEN", "token-for-a", &["--data-dir", dir_a], "127.0.0.1:0");
    let b = runtime("rt-b", "RT_TOKEN", "token-for-b", &["--data-dir", dir_b], "127.0.0.1:0");
    let config = write_config(
        "e2e",
        &format!(
            r#"
[server]
bind = "127.0.0.1:0"

[[runtimes]]
id = "local"
kind = "embedded"
store = "memory"

[[runtimes]]
id = "a"
kind = "remote"
label = "Runtime A"
base_url = "{}"
token_env = "A_TOKEN"
probe_interval_ms = 100

[[runtimes]]
id = "b"
kind = "remote"
base_url = "{}"
token_env = "B_TOKEN"
probe_interval_ms = 100
connect_timeout_ms = 500
"#,
            a.base, b.base
        ),
    );
    let gw = Process::start_with_env(
        &["serve", "--config", config.to_str().unwrap()],
        &[("A_TOKEN", "token-for-a"), ("B_TOKEN", "token-for-b")],
    );
    let view = wait_health(&gw.base, "a", "healthy");
    assert_eq!(
        (&view["kind"], &view["label"], &view["profiles"]),
        (&json!("remote"), &json!("Runtime A"), &json!(["echo"]))
    );
    wait_health(&gw.base, "b", "healthy");

    // The same worker id in both runtimes, never confused.
    let wa = create_worker_on(&gw.base, "a", "echo");
    let wb = create_worker_on(&gw.base, "b", "echo");
    assert_eq!((wa.as_str(), wb.as_str()), ("worker-00000001", "worker-00000001"));
    for (rt, text) in [("a", "only for a"), ("b", "only for b")] {
        let ack = post_json(&gw.url(&format!("/api/runtimes/{rt}/workers/{wa}/input")), &json!({"content": text}));
        assert_eq!((ack.status, &ack.body["ack"]["runtime_id"]), (200, &json!(rt)), "{:?}", ack.body);
    }
    for (rt, text) in [("a", "only for a"), ("b", "only for b")] {
        let t = wait_transcript_on(&gw.base, rt, &wa, 2);
        let contents: Vec<_> = t["items"].as_array().unwrap().iter().map(|i| i["content"].as_str().unwrap()).collect();
        assert_eq!(contents, [text, text], "runtime {rt}");
        assert_eq!(t["runtime_id"], rt);
    }
    let page = get(&gw.url(&format!("/api/runtimes/a/workers/{wa}/transcript?start=1&limit=1"))).body;
    assert_eq!((&page["items"][0]["role"], &page["next_start"]), (&json!("assistant"), &json!(null)));

    // Interrupt reaches the runtime: the worker goes on (nothing to interrupt when idle).
    let interrupt = post_raw(&gw.url(&format!("/api/runtimes/a/workers/{wa}/interrupt")), None, "");
    assert_eq!((interrupt.status, &interrupt.body["ack"]["status"]), (200, &json!("running")), "{:?}", interrupt.body);
    let created = get(&gw.url(&format!("/api/runtimes/a/workers/{wa}"))).body;
    assert!(created["created_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{created}");
    assert!(created["last_activity_at"].as_str() >= created["created_at"].as_str(), "{created}");

    // Lifecycle through the gateway, with the runtime's semantics and the gateway's codes.
    let stop = post_raw(&gw.url(&format!("/api/runtimes/a/workers/{wa}/stop")), None, "");
    assert_eq!((stop.status, &stop.body["ack"]["status"]), (200, &json!("stopped")));
    let late = post_json(&gw.url(&format!("/api/runtimes/a/workers/{wa}/input")), &json!({"content": "late"}));
    assert_eq!((late.status, late.code()), (409, "worker_not_running"));
    assert_eq!(late.body["error"]["upstream_code"], "invalid_request");
    let stopped = post_raw(&gw.url(&format!("/api/runtimes/a/workers/{wa}/interrupt")), None, "");
    assert_eq!((stopped.status, stopped.code()), (409, "worker_not_running"), "{:?}", stopped.body);
    let cancel = post_json(&gw.url(&format!("/api/runtimes/b/workers/{wb}/cancel")), &json!({"reason": "done"}));
    assert_eq!(cancel.body["ack"]["status"], "cancelled");
    let missing = get(&gw.url("/api/runtimes/a/workers/worker-000000ff"));
    assert_eq!((missing.status, missing.code()), (404, "worker_not_found"));
    let big = get(&gw.url(&format!("/api/runtimes/a/workers/{wa}/transcript?limit=999")));
    assert_eq!((big.status, big.code()), (400, "limit_too_large"));
    assert!(big.body["error"]["message"].as_str().unwrap().contains("limit 999"), "{:?}", big.body);
    // A bad limit is answered as the embedded runtime answers it, and a client's mistakes,
    // however many, leave the runtime's health as it was (they used to make it `incompatible`).
    for _ in 0..3 {
        let zero = get(&gw.url(&format!("/api/runtimes/a/workers/{wa}/transcript?limit=0")));
        assert_eq!((zero.status, zero.code()), (400, "invalid_request"), "{:?}", zero.body);
    }
    assert_eq!(get(&gw.url("/api/runtimes/a")).body["health"]["state"], "healthy");
    let unknown_profile = post_json(&gw.url("/api/runtimes/a/workers"), &json!({"profile": "nope"}));
    assert_eq!((unknown_profile.status, unknown_profile.code()), (400, "invalid_request"));

    let all = get(&gw.url("/api/workers")).body;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);

    // Runtime b dies: its requests fail fast and typed, everything else keeps working.
    let b_addr = b.host_port().to_owned();
    drop(b);
    let down = get(&gw.url(&format!("/api/runtimes/b/workers/{wb}")));
    assert_eq!((down.status, down.code()), (502, "remote_runtime_unreachable"));
    assert_eq!(down.body["error"]["retryable"], true);
    let view = wait_health(&gw.base, "b", "unreachable");
    assert_eq!(view["worker_count"], Value::Null, "a runtime that is down has no count it could vouch for");
    assert_eq!(get(&gw.url(&format!("/api/runtimes/a/workers/{wa}"))).status, 200);
    let local = create_worker(&gw.base, "echo");
    assert!(local.starts_with("worker-") && local.ends_with("-00000001"), "a memory id carries the boot: {local}");
    let all = get(&gw.url("/api/workers")).body;
    let states: Vec<_> = all["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["runtime_id"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("local", "ok"), ("a", "ok"), ("b", "error")]);
    assert_eq!(all["runtimes"][2]["error"]["code"], "remote_runtime_unreachable");
    assert_eq!(get(&gw.url("/readyz")).status, 503);

    // Restarted on the same address and data: healthy again, its worker is back.
    let b2 = runtime("rt-b", "RT_TOKEN", "token-for-b", &["--data-dir", dir_b], &b_addr);
    wait_health(&gw.base, "b", "healthy");
    let back = get(&gw.url(&format!("/api/runtimes/b/workers/{wb}")));
    assert_eq!((back.status, &back.body["status"]), (200, &json!("cancelled")));
    drop(b2);
}

#[test]
fn a_runtime_refuses_requests_without_its_token_and_a_public_bind_without_one() {
    let rt = runtime("rt-auth", "RT_TOKEN", "right-token", &["--memory"], "127.0.0.1:0");
    let anon = get(&rt.url("/v1/runtime"));
    assert_eq!((anon.status, anon.code()), (401, "unauthorized"));
    let wrong = request("GET", &rt.url("/v1/workers"), &[("authorization", "Bearer wrong-token")]);
    assert_eq!(wrong.status, 401);
    let right = request("GET", &rt.url("/v1/runtime"), &[("authorization", "Bearer right-token")]);
    assert_eq!((right.status, &right.body["runtime"]["runtime_id"]), (200, &json!("rt-auth")));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(["runtime", "--bind", "0.0.0.0:0", "--memory"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a token"));
}

/// The relay batches on `next(Duration::ZERO)`: it must return at once when nothing is
/// ready and hand over what is ready, for both kinds of event source.
#[test]
fn zero_wait_event_reads_return_only_what_is_ready() {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};
    use worker_gateway::runtime::engine::{Engine, EngineOptions, Profile, StoreKind};
    use worker_gateway::runtime::handle::{RuntimeHandle, SourceItem};
    use worker_gateway::runtime::remote::{RemoteOptions, RemoteRuntime};
    use worker_gateway::runtime::types::*;
    use worker_gateway::secret::Secret;

    let rt = runtime("rt-zero", "RT_TOKEN", "token-zero", &["--memory"], "127.0.0.1:0");
    let remote = RemoteRuntime::start(RemoteOptions {
        runtime_id: "rt-zero".into(),
        base_url: rt.base.clone(),
        token: Some(Secret::new("token-zero")),
        tls: None,
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        probe_timeout: Duration::from_secs(2),
        probe_interval: Duration::from_secs(5),
        event_silence: Duration::from_secs(60),
        max_in_flight: 4,
        max_idle_connections: 4,
    });
    let profiles = BTreeMap::from([("echo".to_owned(), Profile::echo("echo", Duration::ZERO))]);
    let engine = Engine::open(EngineOptions::new("rt-local", StoreKind::Memory, profiles)).expect("engine");
    for handle in [&remote as &dyn RuntimeHandle, &engine] {
        let request = CreateWorker {
            intent: Intent::Task { objective: "zero".into() },
            profile: ProfileRef::RuntimeDefault,
            extras: CreateExtras::default(),
            idempotency_key: None,
        };
        let wid = handle.create_worker(request).expect("create").worker_id;
        let mut source = handle.open_events(&wid, None).expect("open events");
        let first = source.next(Duration::from_secs(10)).expect("stream");
        assert!(matches!(first, Some(SourceItem::Snapshot { .. })), "a snapshot comes first");
        // Nothing is ready: twenty zero-wait reads return at once (one blocking read slice
        // each would take seconds).
        let started = Instant::now();
        for _ in 0..20 {
            assert!(source.next(Duration::ZERO).expect("stream").is_none());
        }
        assert!(started.elapsed() < Duration::from_secs(1), "zero-wait reads do not block");
        let input = WorkerInput { kind: InputKind::User, content: "one two three".into(), idempotency_key: None };
        handle.input(&wid, input).expect("input");
        // Everything arrives through zero-wait reads alone, partial frames included.
        let (mut seqs, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(10));
        while seqs.len() < 7 {
            assert!(Instant::now() < deadline, "events arrive through zero-wait reads; got {seqs:?}");
            if let Some(SourceItem::Event { seq, .. }) = source.next(Duration::ZERO).expect("stream") {
                seqs.push(seq);
            }
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    }
}

/// A TCP proxy to `upstream` that can drop every connection it carries, and refuse new
/// ones, until it is restored: a network outage between the gateway and a runtime.
struct Outage {
    base: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    carried: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Outage {
    fn new(upstream: &str) -> Outage {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let carried = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (upstream, is_down, kept) = (upstream.to_owned(), down.clone(), carried.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().take(500).flatten() {
                if is_down.load(Ordering::SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let mut kept = kept.lock().unwrap();
                kept.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Outage { base, down, carried }
    }

    fn begin(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for socket in self.carried.lock().unwrap().drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    fn end(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An outage between the gateway and a memory runtime that goes on producing events past
/// what it retains: when the relay comes back, the runtime (same boot) cannot resume from
/// its cursor. That is a gap in a live worker's stream, told as one, and the stream goes
/// on; not a worker "replaced or gone" (which a restart of the runtime would be).
#[test]
fn an_outage_past_the_runtimes_retention_is_a_gap_not_a_gone_worker() {
    let rt_config = write_config(
        "retention-rt",
        "[server]\nbind = \"127.0.0.1:0\"\n[runtime]\nid = \"rt\"\nstore = \"memory\"\nretained_events = 8\n\
         [profiles.echo]\nkind = \"echo\"\n",
    );
    let rt = Process::start(&["runtime", "--config", rt_config.to_str().unwrap()]);
    let outage = Outage::new(rt.host_port());
    let config = write_config(
        "retention-gw",
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{}\"\n\
             probe_interval_ms = 100\nconnect_timeout_ms = 500\n",
            outage.base
        ),
    );
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    wait_health(&gw.base, "m", "healthy");
    let wid = create_worker_on(&gw.base, "m", "echo");
    let url = format!("{}/api/runtimes/m/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).expect("events");
    next_frame(&mut ws);

    outage.begin();
    frames_until(&mut ws, |f| f["kind"] == "stream" && f["state"] == "reconnecting");
    // Twelve words: more events than the runtime keeps.
    let input = json!({"kind": "user", "content": "a b c d e f g h i j k l"});
    assert_eq!(post_json(&rt.url(&format!("/v1/workers/{wid}/input")), &input).status, 200);
    wait_for("the reply on the runtime", std::time::Duration::from_secs(20), || {
        let t = get(&rt.url(&format!("/v1/workers/{wid}/transcript"))).body;
        (t["transcript"]["items"].as_array()?.len() >= 2).then_some(())
    });
    outage.end();

    let reset = frames_until(&mut ws, |f| f["kind"] == "stream" && f["state"] == "reset");
    let detail = reset.last().unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("could not resume"), "a gap, not a gone worker: {detail}");
    // The same worker, still streaming.
    let more = post_json(&gw.url(&format!("/api/runtimes/m/workers/{wid}/input")), &json!({"content": "still here"}));
    assert_eq!(more.status, 200, "{:?}", more.body);
    let after = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    assert!(after.iter().any(|f| event_name(f) == "text_delta"), "{after:?}");
    assert!(!after.iter().any(|f| f["kind"] == "stream"), "the gap is told once: {after:?}");
}

/// A TCP proxy to `upstream` that answers the `nth` WebSocket upgrade it carries a byte at a
/// time (each byte well inside a socket read timeout, the whole answer far past any connect
/// budget), as a runtime busy with a burst of connections might (`nth` 0: none), and carries
/// everything else as it comes. Returns its base URL and the count of upgrades it carried.
fn proxy_trickling_upgrade(upstream: &str, nth: usize) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let upstream = upstream.to_owned();
    let carried = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counted = carried.clone();
    std::thread::spawn(move || {
        for mut client in listener.incoming().take(200).flatten() {
            let _ = client.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let mut first = [0u8; 4096];
            let n = client.read(&mut first).unwrap_or(0);
            let _ = client.set_read_timeout(None);
            let Ok(mut server) = std::net::TcpStream::connect(&upstream) else { continue };
            if server.write_all(&first[..n]).is_err() {
                continue;
            }
            let head = String::from_utf8_lossy(&first[..n]).into_owned();
            let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
            let upgrades = {
                let mut carried = counted.lock().expect("upgrades");
                if upgrade {
                    carried.push(head.lines().next().unwrap_or_default().to_owned());
                }
                carried.len()
            };
            if upgrade && upgrades == nth {
                std::thread::spawn(move || {
                    for byte in std::io::BufReader::new(server).bytes().map_while(Result::ok) {
                        std::thread::sleep(std::time::Duration::from_millis(50)); // the pace of the trickle
                        if client.write_all(&[byte]).is_err() {
                            return;
                        }
                    }
                });
                continue;
            }
            for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (base, carried)
}

/// A memory runtime behind [`proxy_trickling_upgrade`] (its `nth` upgrade), a gateway
/// (with `server` in its `[server]`) that reaches it as `m` with a 300 ms connect budget,
/// and an `echo` worker there: the processes, the worker and its events URL.
fn behind_a_trickling_proxy(name: &str, nth: usize, server: &str) -> (Process, Process, String, String) {
    let rt = Process::start(&["runtime", "--bind", "127.0.0.1:0", "--memory"]);
    let (proxy, _) = proxy_trickling_upgrade(rt.host_port(), nth);
    let config = write_config(
        name,
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n{server}[[runtimes]]\nid = \"m\"\nkind = \"remote\"\n\
             base_url = \"{proxy}\"\nconnect_timeout_ms = 300\n"
        ),
    );
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    wait_health(&gw.base, "m", "healthy");
    let wid = create_worker_on(&gw.base, "m", "echo");
    let url = format!("{}/api/runtimes/m/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    (rt, gw, wid, url)
}

/// A runtime that answers a relay's upgrade too slowly — here a byte at a time, so that no
/// single read times out — is given up on when the connect budget has passed and asked
/// again within the relay's open budget: the browsers waiting for the stream get it, rather
/// than waiting as long as the runtime trickles, or all being told it is unavailable.
#[test]
fn an_upgrade_the_runtime_is_slow_to_answer_is_tried_again_before_browsers_are_told() {
    let (_rt, gw, wid, url) = behind_a_trickling_proxy("slow-upgrade-gw", 1, "");
    let mut ws = ws_connect(&url, &[]).expect("events");
    let first = next_frame(&mut ws);
    assert_eq!(event_name(&first), "snapshot", "the stream opened with {first}");
    let sent = post_json(&gw.url(&format!("/api/runtimes/m/workers/{wid}/input")), &json!({"content": "hello"}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let turn = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    assert!(turn.iter().any(|f| event_name(f) == "text_delta"), "{turn:?}");
}

/// A replay that the relay reads back from a runtime slow to answer (its ring no longer
/// holds what a browser's cursor missed) is asked again within the open budget: the late
/// browser gets every event after its cursor, not a `gap` for events the runtime still has.
#[test]
fn a_replay_from_a_runtime_slow_to_answer_is_asked_again_not_cut_short_by_a_gap() {
    // The first upgrade is the relay's, the second the replay's.
    let (_rt, gw, wid, url) = behind_a_trickling_proxy("slow-replay-gw", 2, "event_ring = 8\n");
    let mut ws = ws_connect(&url, &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    let sent =
        post_json(&gw.url(&format!("/api/runtimes/m/workers/{wid}/input")), &json!({"content": "a b c d e f g h i j"}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let turn = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    assert!(turn.len() > 9, "more events than the ring holds: {}", turn.len());
    let after = turn[0]["envelope"]["cursor"].as_str().expect("cursor");
    let mut late = ws_connect(&format!("{url}?cursor={after}"), &[]).expect("late events");
    let rest: Vec<_> = (1..turn.len()).map(|_| next_frame(&mut late)).collect();
    assert_eq!(rest, turn[1..].to_vec(), "every event after the cursor, once, in order");
}

/// Browsers that come back together with the same old cursor — a restarted gateway, here a
/// fresh one, the cursor from another — cost the runtime one replay, not one each: the
/// relay reads replays one at a time and keeps what it read in its ring for the next. Their
/// snapshots, which they never see, are not read either.
#[test]
fn browsers_back_with_the_same_old_cursor_cost_the_runtime_one_replay() {
    let rt = Process::start(&["runtime", "--bind", "127.0.0.1:0", "--memory"]);
    let gateway = |name: &str, base_url: &str| {
        let config = write_config(
            name,
            &format!(
                "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"m\"\nkind = \"remote\"\n\
                 base_url = \"{base_url}\"\n"
            ),
        );
        let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
        wait_health(&gw.base, "m", "healthy");
        gw
    };
    let first = gateway("one-replay-first-gw", &rt.base);
    let wid = create_worker_on(&first.base, "m", "echo");
    let path = format!("/api/runtimes/m/workers/{wid}/events/ws");
    let mut ws = ws_connect(&format!("{}{path}", first.base.replace("http://", "ws://")), &[]).expect("events");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    let sent =
        post_json(&first.url(&format!("/api/runtimes/m/workers/{wid}/input")), &json!({"content": "a b c d e f"}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let turn = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    let cursor = turn[0]["envelope"]["cursor"].as_str().expect("cursor").to_owned();

    let (proxy, upgrades) = proxy_trickling_upgrade(rt.host_port(), 0);
    let second = gateway("one-replay-second-gw", &proxy);
    let transcript_reads = || rt.stderr.lock().expect("log").matches("/transcript").count();
    let read_before = transcript_reads();
    let url = format!("{}{path}?cursor={cursor}", second.base.replace("http://", "ws://"));
    let browsers: Vec<_> = (0..12)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut ws = ws_connect(&url, &[]).expect("events");
                frames_until(&mut ws, |f| event_name(f) == "turn_end")
            })
        })
        .collect();
    for browser in browsers {
        assert_eq!(browser.join().expect("browser"), turn[1..].to_vec(), "every event after the cursor, once");
    }
    // One replay, not one each: the upgrades that ask for what follows the browsers' cursor
    // (the relay's own connection follows the worker's present). An open the runtime is slow
    // to answer (a loaded machine) is asked again, once at most in the test's time.
    let replay = format!("cursor=wo_{}", &cursor[cursor.len() - 16..]);
    let upgrades = upgrades.lock().expect("upgrades").clone();
    let replays = upgrades.iter().filter(|line| line.contains(&replay)).count();
    assert!((1..=2).contains(&replays), "one replay for 12 browsers: {upgrades:?}");
    // Nor does each have a snapshot it never sees read from the runtime's transcript.
    assert_eq!(transcript_reads(), read_before, "no transcript read for browsers with a cursor");
}

/// A cursor older than what a memory runtime retains, brought to a gateway with no relay for
/// the worker (restarted, or, here, another one): a `gap` for what the runtime no longer
/// holds, then every event it still does, in order — not a gap to the present that leaves
/// out events the runtime still had.
#[test]
fn a_cursor_past_the_runtimes_retention_gets_a_gap_then_what_the_runtime_still_holds() {
    let rt_config = write_config(
        "expired-cursor-rt",
        "[server]\nbind = \"127.0.0.1:0\"\n[runtime]\nid = \"rt\"\nstore = \"memory\"\nretained_events = 8\n\
         [profiles.echo]\nkind = \"echo\"\n",
    );
    let rt = Process::start(&["runtime", "--config", rt_config.to_str().unwrap()]);
    let gateway = |name: &str| {
        let config = write_config(
            name,
            &format!(
                "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{}\"\n",
                rt.base
            ),
        );
        let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
        wait_health(&gw.base, "m", "healthy");
        gw
    };
    let first = gateway("expired-cursor-first-gw");
    let wid = create_worker_on(&first.base, "m", "echo");
    let path = format!("/api/runtimes/m/workers/{wid}/events/ws");
    let mut ws = ws_connect(&format!("{}{path}", first.base.replace("http://", "ws://")), &[]).expect("events");
    let snapshot = next_frame(&mut ws);
    let cursor = snapshot["envelope"]["cursor"].as_str().expect("cursor").to_owned();
    // Twelve words: more events than the runtime keeps.
    let input = json!({"content": "a b c d e f g h i j k l"});
    assert_eq!(post_json(&first.url(&format!("/api/runtimes/m/workers/{wid}/input")), &input).status, 200);
    let mut seen = frames_until(&mut ws, |f| event_name(f) == "turn_end");

    let second = gateway("expired-cursor-second-gw");
    let mut late = ws_connect(&format!("{}{path}?cursor={cursor}", second.base.replace("http://", "ws://")), &[])
        .expect("late events");
    let gap = next_frame(&mut late);
    assert_eq!(gap["kind"], "gap", "{gap}");
    assert_eq!(gap["after"], cursor.as_str(), "{gap}");
    let retained: Vec<Value> = (0..8).map(|_| next_frame(&mut late)).collect();
    let first_kept = retained[0]["envelope"]["cursor"].as_str().expect("cursor").to_owned();
    let resumed_at = gap["resumed_at"].as_str().expect("resumed_at");
    assert!(cursor.as_str() < resumed_at && resumed_at < first_kept.as_str(), "{gap} then {first_kept}");
    // The eight the runtime keeps are the worker's last eight, as the first gateway saw them.
    let last_kept = retained[7]["envelope"]["cursor"].clone();
    if !seen.iter().any(|f| f["envelope"]["cursor"] == last_kept) {
        seen.extend(frames_until(&mut ws, |f| f["envelope"]["cursor"] == last_kept));
    }
    let end = seen.iter().position(|f| f["envelope"]["cursor"] == last_kept).expect("seen");
    assert_eq!(retained, seen[end - 7..=end].to_vec(), "what the runtime still holds, once, in order");
}

/// A worker whose newest entry is over 1 MiB has a snapshot that large on every connection:
/// the relay keeps its connection (and that memory) instead of replacing it to give the
/// memory back, which only read the snapshot again, every 2 s for as long as the worker was
/// watched. Its events still come.
#[test]
fn a_worker_with_a_large_snapshot_keeps_its_upstream_connection() {
    let rt_config = write_config(
        "large-snapshot-rt",
        "[server]\nbind = \"127.0.0.1:0\"\nmax_body_bytes = 4194304\n[runtime]\nid = \"rt\"\nstore = \"memory\"\n\
         [profiles.echo]\nkind = \"echo\"\n",
    );
    let rt = Process::start(&["runtime", "--config", rt_config.to_str().unwrap()]);
    let config = write_config(
        "large-snapshot-gw",
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{}\"\n",
            rt.base
        ),
    );
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    wait_health(&gw.base, "m", "healthy");
    let wid = create_worker_on(&gw.base, "m", "echo");
    let large = json!({"kind": "user", "content": "x".repeat(2 << 20)});
    assert_eq!(post_json(&rt.url(&format!("/v1/workers/{wid}/input")), &large).status, 200);
    wait_transcript_on(&gw.base, "m", &wid, 2);
    let url = format!("{}/api/runtimes/m/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).expect("events");
    let snapshot = next_frame(&mut ws);
    assert_eq!(event_name(&snapshot), "snapshot");
    assert!(snapshot.to_string().len() > 2 << 20, "the snapshot holds the large entry");
    // Past the 2 s after which a grown connection is replaced, and the pause it waits for.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let said = post_json(&gw.url(&format!("/api/runtimes/m/workers/{wid}/input")), &json!({"content": "small"}));
    assert_eq!(said.status, 200, "{:?}", said.body);
    let after = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    assert!(!after.iter().any(|f| f["kind"] == "stream"), "no reconnection told: {after:?}");
    let metrics = agent().get(&gw.url("/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    assert!(metrics.contains("worker_gateway_relay_reconnects_total 0\n"), "{metrics}");
}
