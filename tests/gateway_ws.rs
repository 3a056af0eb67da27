//! The browser-facing event WebSocket: embedded and remote workers, resume without loss,
//! gaps, fan-out through one upstream, slow consumers, and the documented errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn ws_url(base: &str, rid: &str, wid: &str, query: &str) -> String {
    format!("{}/api/runtimes/{rid}/workers/{wid}/events/ws{query}", base.replace("http://", "ws://"))
}

fn say(base: &str, rid: &str, wid: &str, text: &str) {
    let a = post_json(&format!("{base}/api/runtimes/{rid}/workers/{wid}/input"), &json!({"content": text}));
    assert_eq!(a.status, 200, "{:?}", a.body);
}

fn is_idle(f: &Value) -> bool {
    event_name(f) == "status" && f["envelope"]["payload"]["data"]["status"] == "idle"
}

/// The runtime event id a gateway cursor stands at (its last 16 hex digits).
fn bo(frame: &Value) -> u64 {
    let cursor = frame["envelope"]["cursor"].as_str().unwrap();
    assert_eq!(cursor.len(), 3 + 32, "{cursor}");
    u64::from_str_radix(&cursor[cursor.len() - 16..], 16).unwrap()
}

#[test]
fn embedded_workers_stream_and_resume_from_a_cursor() {
    let gw = TestGateway::start("ws-embedded", &memory_config(""));
    let wid = create_worker(&gw.base, "echo");
    let mut ws = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).expect("upgrade");
    let snapshot = next_frame(&mut ws);
    assert_eq!(event_name(&snapshot), "snapshot");
    assert_eq!(
        snapshot["envelope"]["event_id"],
        format!("snapshot:{}", snapshot["envelope"]["cursor"].as_str().unwrap())
    );
    assert_eq!(snapshot["envelope"]["runtime_id"], "local");
    say(&gw.base, "local", &wid, "hello streaming world");
    let turn = frames_until(&mut ws, is_idle);
    let names: Vec<String> = turn.iter().map(event_name).collect();
    assert_eq!(
        names,
        [
            "user_message",
            "status",
            "turn_start",
            "text_delta",
            "text_delta",
            "text_delta",
            "text_done",
            "turn_end",
            "status"
        ]
    );
    let cursors: Vec<u64> = turn.iter().map(bo).collect();
    assert!(cursors.windows(2).all(|w| w[1] == w[0] + 1), "contiguous within a stream: {cursors:?}");
    assert!(turn.iter().all(|f| f["envelope"]["event_id"] == f["envelope"]["cursor"]));
    let deltas: String = turn
        .iter()
        .filter(|f| event_name(f) == "text_delta")
        .map(|f| f["envelope"]["payload"]["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "hello streaming world");

    // Reconnect with a cursor from the middle: exactly the missed events, then live.
    drop(ws);
    let middle = turn[3]["envelope"]["cursor"].as_str().unwrap();
    let mut again = ws_connect(&ws_url(&gw.base, "local", &wid, &format!("?cursor={middle}")), &[]).unwrap();
    let replayed = frames_until(&mut again, is_idle);
    assert_eq!(replayed.iter().map(bo).collect::<Vec<_>>(), cursors[4..].to_vec());
    say(&gw.base, "local", &wid, "more");
    assert_eq!(event_name(&next_frame(&mut again)), "user_message");

    // A late subscriber without a cursor gets the transcript in its snapshot.
    let mut late = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    let snap = next_frame(&mut late);
    let entries = snap["envelope"]["payload"]["data"]["entries"].as_array().unwrap().len();
    assert!(entries >= 3, "{snap}");
}

#[test]
fn documented_errors_before_and_after_the_upgrade() {
    // SAFETY (test): unique variable.
    unsafe { std::env::set_var("WG_WS_TOKEN", "ws-browser-token") };
    let config =
        memory_config("").replace("threads = 4", "threads = 4\ntoken_env = \"WG_WS_TOKEN\"\nmax_ws_sessions = 2");
    let gw = TestGateway::start("ws-errors", &config);
    let auth = [("authorization", "Bearer ws-browser-token")];
    let created =
        request("POST", &gw.url("/api/runtimes/local/workers"), &[auth[0], ("content-type", "application/json")]);
    let wid = created.body["worker"]["worker_id"].as_str().unwrap().to_owned();
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).err(), Some(401));
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", &wid, "?cursor=bo_1"), &auth).err(), Some(400));
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", &wid, "?cursor=bo_zz"), &auth).err(), Some(400));
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", "worker-000000ff", ""), &auth).err(), Some(404));
    assert_eq!(ws_connect(&ws_url(&gw.base, "nope", &wid, ""), &auth).err(), Some(404));
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", "a%2Fb", ""), &auth).err(), Some(400));
    let evil = [auth[0], ("origin", "https://evil.example")];
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", &wid, ""), &evil).err(), Some(403));
    let own = format!("http://{}", gw.base.trim_start_matches("http://"));
    let same = [auth[0], ("origin", own.as_str())];
    let mut first = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &same).expect("same-origin upgrade");
    // Browsers cannot set headers on upgrades: the token may come as a query parameter.
    let mut second =
        ws_connect(&ws_url(&gw.base, "local", &wid, "?token=ws-browser-token"), &[]).expect("token in query");
    assert_eq!(ws_connect(&ws_url(&gw.base, "local", &wid, ""), &auth).err(), Some(503), "session cap");
    let plain =
        request("GET", &gw.url(&format!("/api/runtimes/local/workers/{wid}/transcript?token=ws-browser-token")), &[]);
    assert_eq!(plain.status, 401, "the query token is for upgrades only");

    next_frame(&mut first);
    first.send(tungstenite::Message::text("may I?")).unwrap();
    let (frames, code) = close_reason(&mut first);
    assert_eq!(frames.last().unwrap()["diagnostic"]["code"], "backend.observation_only");
    assert_eq!(code, Some(1008));
    assert_eq!(event_name(&next_frame(&mut second)), "snapshot");
}

/// Each watched worker holds a relay (a thread, and an upstream connection to a remote), so
/// relays are capped: past `max_event_streams` watched workers a new one is refused with 503
/// before the upgrade, while more browsers of a watched worker still join its relay, and a
/// relay left by its last browser makes room again.
#[test]
fn watched_workers_are_capped_and_a_left_stream_makes_room() {
    let gw = TestGateway::start(
        "ws-stream-cap",
        &memory_config("").replace("threads = 4", "threads = 4\nmax_event_streams = 2"),
    );
    let workers: Vec<String> = (0..3).map(|_| create_worker(&gw.base, "echo")).collect();
    let url = |wid: &str| ws_url(&gw.base, "local", wid, "");
    // A stream's relay is there once its snapshot came.
    let mut first = ws_connect(&url(&workers[0]), &[]).expect("the first watched worker");
    assert_eq!(event_name(&next_frame(&mut first)), "snapshot");
    let mut second = ws_connect(&url(&workers[1]), &[]).expect("the second");
    assert_eq!(event_name(&next_frame(&mut second)), "snapshot");
    let refused = request(
        "GET",
        &url(&workers[2]).replace("ws://", "http://"),
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    );
    assert_eq!((refused.status, refused.code()), (503, "overloaded"), "{:?}", refused.body);
    let why = refused.body["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("event streams"), "the refusal says which cap: {why}");
    let mut again = ws_connect(&url(&workers[0]), &[]).expect("another browser of a watched worker");
    assert_eq!(event_name(&next_frame(&mut again)), "snapshot");

    drop(second); // its relay lingers a few seconds, then makes room
    let mut third =
        wait_for("room for a third worker", Duration::from_secs(30), || ws_connect(&url(&workers[2]), &[]).ok());
    assert_eq!(event_name(&next_frame(&mut third)), "snapshot");
    say(&gw.base, "local", &workers[2], "still streaming");
    assert!(frames_until(&mut third, is_idle).iter().any(|f| event_name(f) == "text_delta"), "the new stream runs");
}

#[test]
fn a_cursor_older_than_the_relay_ring_is_replayed_from_the_runtime() {
    let config = memory_config("").replace("threads = 4", "threads = 4\nevent_ring = 8");
    let gw = TestGateway::start("ws-backfill", &config);
    let wid = create_worker(&gw.base, "echo");
    let mut ws = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    next_frame(&mut ws);
    say(&gw.base, "local", &wid, "a b c d e f g h i j k l");
    let turn = frames_until(&mut ws, is_idle);
    assert_eq!(turn.len(), 18);
    // The relay keeps 8 events, the runtime all of them: the late subscriber misses nothing.
    let after = turn[0]["envelope"]["cursor"].as_str().unwrap();
    let mut late = ws_connect(&ws_url(&gw.base, "local", &wid, &format!("?cursor={after}")), &[]).unwrap();
    let rest: Vec<Value> = (0..17).map(|_| next_frame(&mut late)).collect();
    assert_eq!(rest, turn[1..].to_vec(), "every event after the cursor, once, in order");
    say(&gw.base, "local", &wid, "live");
    assert_eq!(event_name(&next_frame(&mut late)), "user_message");
}

/// Browsers join a stream whose ring moves on with every event (a worker streaming a
/// chunk a millisecond, an 8-event ring), with cursors a few dozen events old: each gets
/// every event after its cursor, read back while the ring keeps moving (or, on a machine so
/// busy that its cursor fell further behind than a replay may hold, a gap that says so),
/// and is never told the stream is unavailable because it kept changing while it joined.
#[test]
fn browsers_join_a_stream_whose_ring_keeps_moving() {
    let config = memory_config("[profiles.steady]\nkind = \"echo\"\ndelay_ms = 1\n")
        .replace("threads = 4", "threads = 4\nevent_ring = 8");
    let gw = TestGateway::start("ws-moving-join", &config);
    let wid = create_worker(&gw.base, "steady");
    let mut watcher = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).expect("events");
    next_frame(&mut watcher);
    say(&gw.base, "local", &wid, &"w ".repeat(5000)); // five seconds of steady events
    for n in 0..12 {
        let cursor = next_frame(&mut watcher)["envelope"]["cursor"].as_str().expect("cursor").to_owned();
        let passed: Vec<Value> = (0..40).map(|_| next_frame(&mut watcher)).collect();
        let mut ws = ws_connect(&ws_url(&gw.base, "local", &wid, &format!("?cursor={cursor}")), &[]).expect("events");
        let got: Vec<Value> = (0..40).map(|_| next_frame(&mut ws)).collect();
        if got[0]["kind"] == "gap" {
            // A machine so busy that the cursor fell more than a replay may hold behind: the
            // gap says so, from the cursor on, and the events after it follow one by one.
            assert_eq!(got[0]["after"], json!(cursor), "join {n}: {}", got[0]);
            let resumed = bo(&json!({"envelope": {"cursor": got[0]["resumed_at"]}}));
            let ids: Vec<u64> = got[1..].iter().map(bo).collect();
            assert!(ids.iter().zip(resumed + 1..).all(|(id, next)| *id == next), "join {n}: {ids:?}");
        } else {
            assert_eq!(got, passed, "join {n}: every event after the cursor, once, in order");
        }
    }
}

/// A replay read back from the runtime is held for its subscriber until written, so it is
/// bounded like the ring (here 4 KiB): past that, a `gap` says what was left out, and the
/// ring's events follow. Many clients with an old cursor cannot make the gateway's memory
/// explode.
#[test]
fn a_replay_is_bounded_in_bytes_and_says_what_it_left_out() {
    let config = memory_config("").replace("threads = 4", "threads = 4\nevent_ring = 8\nevent_ring_bytes = 4096");
    let gw = TestGateway::start("ws-replay-bytes", &config);
    let wid = create_worker(&gw.base, "echo");
    let mut ws = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    next_frame(&mut ws);
    let words: Vec<String> = (0..12).map(|i| format!("{i}").repeat(600)).collect();
    say(&gw.base, "local", &wid, &words.join(" "));
    let turn = frames_until(&mut ws, is_idle);
    let after = turn[0]["envelope"]["cursor"].as_str().unwrap();
    let mut late = ws_connect(&ws_url(&gw.base, "local", &wid, &format!("?cursor={after}")), &[]).unwrap();
    let gap = next_frame(&mut late);
    assert_eq!((&gap["kind"], &gap["after"]), (&json!("gap"), &json!(after)), "{gap}");
    let resumed = bo(&json!({"envelope": {"cursor": gap["resumed_at"]}}));
    let rest: Vec<Value> = turn.iter().filter(|f| bo(f) > resumed).cloned().collect();
    assert!(!rest.is_empty() && rest.len() < turn.len() - 1, "{} of {}", rest.len(), turn.len());
    for expected in rest {
        assert_eq!(next_frame(&mut late), expected, "the ring's events follow, in order");
    }
}

#[test]
fn events_the_runtime_no_longer_holds_are_reported_as_a_gap() {
    let config = memory_config("")
        .replace("threads = 4", "threads = 4\nevent_ring = 8")
        .replace("input_queue = 4", "input_queue = 4\nretained_events = 8");
    let gw = TestGateway::start("ws-gap", &config);
    let wid = create_worker(&gw.base, "echo");
    let mut ws = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    next_frame(&mut ws);
    say(&gw.base, "local", &wid, "a b c d e f g h i j k l");
    let turn = frames_until(&mut ws, is_idle);
    let after = turn[0]["envelope"]["cursor"].as_str().unwrap();
    let mut late = ws_connect(&ws_url(&gw.base, "local", &wid, &format!("?cursor={after}")), &[]).unwrap();
    let gap = next_frame(&mut late);
    assert_eq!(gap["kind"], "gap", "{gap}");
    assert_eq!(gap["after"], after);
    let resumed = bo(&json!({"envelope": {"cursor": gap["resumed_at"]}}));
    let rest: Vec<Value> = turn.iter().filter(|f| bo(f) > resumed).cloned().collect();
    assert_eq!(rest.len(), 8, "the relay's ring follows the gap");
    for expected in rest {
        assert_eq!(next_frame(&mut late), expected);
    }
}

fn remote_setup(store: &[&str]) -> (Process, String) {
    let mut args = vec!["runtime", "--bind", "127.0.0.1:0", "--runtime-id", "rt-r", "--token-env", "RT_TOKEN"];
    args.extend_from_slice(store);
    let rt = Process::start_with_env(&args, &[("RT_TOKEN", "remote-secret")]);
    let config = memory_config(&format!(
        "[[runtimes]]\nid = \"r\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"WG_REMOTE_TOKEN\"\nprobe_interval_ms = 100\n",
        rt.base
    ))
    .replace("threads = 4\n", "");
    // SAFETY (test): every test here sets the same value.
    unsafe { std::env::set_var("WG_REMOTE_TOKEN", "remote-secret") };
    (rt, config)
}

/// A gateway in front of the remote runtime, an `echo` worker on it and a browser stream of
/// that worker past its snapshot.
fn watch_remote_worker(name: &str, config: &str) -> (TestGateway, String, Ws) {
    let gw = TestGateway::start(name, config);
    wait_health(&gw.base, "r", "healthy");
    let wid = create_worker_on(&gw.base, "r", "echo");
    let mut ws = ws_connect(&ws_url(&gw.base, "r", &wid, ""), &[]).unwrap();
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    (gw, wid, ws)
}

/// A frozen runtime (SIGSTOP: its sockets stay open, nothing answers, no pong) is a half-open
/// upstream: the relay declares it dead after `event_silence_ms` and resumes once it thaws.
#[test]
fn a_silent_upstream_is_detected_and_the_stream_resumes() {
    let (rt, config) = remote_setup(&["--memory"]);
    let config = config.replace("probe_interval_ms = 100\n", "probe_interval_ms = 100\nevent_silence_ms = 900\n");
    let (gw, wid, mut ws) = watch_remote_worker("ws-silent", &config);
    say(&gw.base, "r", &wid, "before the freeze");
    frames_until(&mut ws, is_idle);
    rt.signal(libc::SIGSTOP);
    let during = until_stream(&mut ws, "reconnecting");
    assert!(during.iter().all(|f| f["kind"] != "event"), "nothing arrives from a frozen runtime: {during:?}");
    rt.signal(libc::SIGCONT);
    until_stream(&mut ws, "resumed");
    say(&gw.base, "r", &wid, "after the thaw");
    let after = frames_until(&mut ws, is_idle);
    assert!(after.iter().any(|f| event_name(f) == "text_delta"), "events flow again: {after:?}");
}

fn restart(args_store: &[&str], addr: &str) -> Process {
    let mut args = vec!["runtime", "--bind", addr, "--runtime-id", "rt-r", "--token-env", "RT_TOKEN"];
    args.extend_from_slice(args_store);
    Process::start_with_env(&args, &[("RT_TOKEN", "remote-secret")])
}

/// Reads frames until a `stream` frame with `state`; returns the frames before it.
fn until_stream(ws: &mut Ws, state: &str) -> Vec<Value> {
    let mut frames = frames_until(ws, |f| f["kind"] == "stream" && f["state"] == state);
    frames.pop();
    frames
}

#[test]
fn a_remote_restarted_twice_with_the_fs_store_loses_and_repeats_nothing() {
    let dir = temp_dir("ws-fs");
    let store = ["--data-dir", dir.to_str().unwrap()];
    let (rt, config) = remote_setup(&store);
    let (gw, wid, mut ws) = watch_remote_worker("ws-fs", &config);
    say(&gw.base, "r", &wid, "first turn");
    let mut seen = frames_until(&mut ws, is_idle);

    let addr = rt.host_port().to_owned();
    rt.signal(libc::SIGKILL);
    drop(rt);
    seen.extend(until_stream(&mut ws, "reconnecting"));
    let rt = restart(&store, &addr);
    seen.extend(until_stream(&mut ws, "resumed"));
    // The worker stays running across the restart: it takes input again, and that turn
    // reaches us through the relay.
    say(&gw.base, "r", &wid, "second turn");
    seen.extend(frames_until(&mut ws, is_idle));

    rt.signal(libc::SIGKILL);
    drop(rt);
    seen.extend(until_stream(&mut ws, "reconnecting"));
    let rt = restart(&store, &addr);
    seen.extend(until_stream(&mut ws, "resumed"));
    say(&gw.base, "r", &wid, "still running after two restarts");
    seen.extend(frames_until(&mut ws, is_idle));

    // What the runtime itself has for this worker, from its first event: the same, once each.
    let direct_url =
        format!("{}/v1/workers/{wid}/events/ws?cursor=wo_0000000000000000", rt.base.replace("http://", "ws://"));
    let mut direct = ws_connect(&direct_url, &[("authorization", "Bearer remote-secret")]).unwrap();
    assert_eq!(event_name(&next_frame(&mut direct)), "snapshot");
    let mut idles = 0;
    let all = frames_until(&mut direct, |f| {
        idles += usize::from(is_idle(f));
        idles == 3
    });
    let mut expected = payloads(&all);
    expected.remove(0); // the creation event came before our snapshot
    assert_eq!(payloads(&seen), expected);
    let cursors: Vec<u64> = seen.iter().filter(|f| f["kind"] == "event").map(bo).collect();
    assert!(cursors.windows(2).all(|w| w[1] > w[0]), "{cursors:?}");
}

#[test]
fn a_remote_restarted_with_the_memory_store_reports_reset() {
    let (rt, config) = remote_setup(&["--memory"]);
    let (gw, wid, mut ws) = watch_remote_worker("ws-mem", &config);
    say(&gw.base, "r", &wid, "soon forgotten");
    frames_until(&mut ws, is_idle);
    let addr = rt.host_port().to_owned();
    drop(rt);
    until_stream(&mut ws, "reconnecting");
    let rt = restart(&["--memory"], &addr);
    // The new runtime has no such worker: the stream says so and ends.
    let end = frames_until(&mut ws, |f| f["kind"] == "diagnostic" || (f["kind"] == "stream" && f["state"] == "reset"));
    let last = end.last().unwrap();
    assert!(last["state"] == "reset" || last["diagnostic"]["code"] == "backend.worker_not_found", "{last}");
    drop(rt);
}

#[test]
fn a_hundred_browsers_share_one_upstream_and_get_every_event() {
    let (rt, config) = remote_setup(&["--memory"]);
    let gw = TestGateway::start("ws-fanout", &config);
    wait_health(&gw.base, "r", "healthy");
    let wid = create_worker_on(&gw.base, "r", "echo");
    let mut clients: Vec<Ws> =
        (0..100).map(|_| ws_connect(&ws_url(&gw.base, "r", &wid, ""), &[]).expect("upgrade")).collect();
    for c in &mut clients {
        assert_eq!(event_name(&next_frame(c)), "snapshot");
    }
    say(&gw.base, "r", &wid, "one two three four five");
    let mut reference = None;
    for c in &mut clients {
        let frames = frames_until(c, is_idle);
        let got = payloads(&frames);
        assert_eq!(got.len(), 11);
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(&got, r),
        }
    }
    let summary = request("GET", &rt.url("/v1/runtime"), &[("authorization", "Bearer remote-secret")]);
    assert_eq!(summary.body["runtime"]["event_subscribers"], 1, "one upstream for 100 browsers");
}

#[test]
fn a_browser_that_never_reads_does_not_hold_back_the_others() {
    let config = memory_config("[profiles.trickle]\nkind = \"echo\"\ndelay_ms = 1\n").replace(
        "threads = 4",
        "threads = 4\nmax_body_bytes = 33554432\nsubscriber_queue = 512\nslow_consumer_limit = 1024",
    );
    let gw = TestGateway::start("ws-slow", &config);
    let wid = create_worker(&gw.base, "trickle");
    let mut slow = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    next_frame(&mut slow);
    let mut fast = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    next_frame(&mut fast);
    let word = format!("{} ", "w".repeat(4000));
    say(&gw.base, "local", &wid, &word.repeat(4000)); // 4000 deltas of 4 kB: 16 MB
    let frames = frames_until(&mut fast, is_idle);
    assert_eq!(frames.iter().filter(|f| event_name(f) == "text_delta").count(), 4000, "the reader got everything");
    assert!(frames.iter().all(|f| f["kind"] == "event"), "and no gap");

    if let tungstenite::stream::MaybeTlsStream::Plain(s) = slow.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    let mut told = false;
    loop {
        match slow.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                if f["kind"] == "gap" {
                    told = true;
                    break;
                }
                if is_idle(&f) {
                    break;
                }
            }
            Ok(tungstenite::Message::Close(c)) => {
                assert_eq!(c.map(|c| u16::from(c.code)), Some(1008));
                told = true;
                break;
            }
            Ok(_) => {}
            Err(_) => {
                told = true; // closed while we were not reading
                break;
            }
        }
    }
    assert!(told, "the slow browser was told it fell behind");
}

/// A browser that stops reading while a burst larger than its queue passes (a runtime's
/// catch-up after a restart, a long paste) gets every event of it once it reads again, from
/// the stream's ring: a `gap` is only for what the ring no longer holds.
#[test]
fn a_browser_behind_a_burst_catches_up_from_the_ring_without_a_gap() {
    let config = memory_config("").replace(
        "threads = 4",
        "threads = 4\nmax_body_bytes = 33554432\nsubscriber_queue = 16\nevent_ring_bytes = 67108864",
    );
    let gw = TestGateway::start("ws-behind", &config);
    let wid = create_worker(&gw.base, "echo");
    let mut paused = large_reader(ws_url(&gw.base, "local", &wid, ""));
    assert_eq!(event_name(&next_frame(&mut paused)), "snapshot");
    let mut reader = large_reader(ws_url(&gw.base, "local", &wid, ""));
    assert_eq!(event_name(&next_frame(&mut reader)), "snapshot");
    let word = format!("{} ", "w".repeat(4000));
    say(&gw.base, "local", &wid, &word.repeat(3000)); // 3000 deltas of 4 kB: more than sockets hold
    let turn = read_turn(&mut reader);
    assert_eq!(turn.iter().filter(|f| event_name(f) == "text_delta").count(), 3000, "the reader got everything");
    assert_eq!(read_turn(&mut paused), turn, "so did the one that paused: every event, in order, no gap");
}

/// A cursor thousands of events back, presented to a gateway that has no relay for the
/// worker yet (a restarted gateway, a replica): every event after it, no `gap`.
#[test]
fn a_far_cursor_on_a_fresh_gateway_replays_everything_without_a_gap() {
    let (_rt, config) = remote_setup(&["--memory"]);
    // The first browser records the whole turn for comparison (what outruns its queue, it
    // reads from the ring).
    let (first, wid, mut ws) = watch_remote_worker("ws-far-a", &config);
    let words: Vec<String> = (0..3000).map(|i| format!("w{i}")).collect();
    say(&first.base, "r", &wid, &words.join(" "));
    let turn = frames_until(&mut ws, is_idle);
    assert!(turn.len() > 3000);
    drop(ws);
    let second = TestGateway::start("ws-far-b", &config);
    wait_health(&second.base, "r", "healthy");
    let cursor = turn[1]["envelope"]["cursor"].as_str().unwrap();
    let mut again = ws_connect(&ws_url(&second.base, "r", &wid, &format!("?cursor={cursor}")), &[]).unwrap();
    let replayed = frames_until(&mut again, is_idle);
    assert!(replayed.iter().all(|f| f["kind"] == "event"), "no gap, no reset");
    assert_eq!(payloads(&replayed), payloads(&turn[2..]), "every event after the cursor, once, in order");
}

/// A cursor further back than a replay may hold (16 × `event_ring` events: here 128) gets a
/// `gap` for the oldest events, with their count, then the newest that fit (it used to get
/// the gap alone, and no count).
#[test]
fn a_cursor_further_back_than_a_replay_holds_gets_a_counted_gap_then_the_newest() {
    let (_rt, config) = remote_setup(&["--memory"]);
    let (first, wid, mut ws) = watch_remote_worker("ws-beyond-a", &config);
    let words: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
    say(&first.base, "r", &wid, &words.join(" "));
    let turn = frames_until(&mut ws, is_idle);
    drop(ws);
    let small_ring = config.replacen("[server]\n", "[server]\nevent_ring = 8\n", 1);
    let second = TestGateway::start("ws-beyond-b", &small_ring);
    wait_health(&second.base, "r", "healthy");
    let cursor = turn[1]["envelope"]["cursor"].as_str().unwrap();
    let mut again = ws_connect(&ws_url(&second.base, "r", &wid, &format!("?cursor={cursor}")), &[]).unwrap();
    let replayed = frames_until(&mut again, is_idle);
    let after = &turn[2..];
    let (lost, kept) = after.split_at(after.len() - 128);
    let gap = &replayed[0];
    assert_eq!((&gap["kind"], &gap["after"]), (&json!("gap"), &json!(cursor)), "{gap}");
    assert_eq!(gap["resumed_at"], lost[lost.len() - 1]["envelope"]["cursor"], "{gap}");
    assert_eq!(gap["dropped"], lost.len(), "{gap}");
    assert_eq!(payloads(&replayed[1..]), payloads(kept), "then the newest 128, once, in order");
}

/// Forged cursors — this stream's tag with any position, other tags, the old 16-digit form —
/// each get either exactly the events after their position or `reset` and a snapshot: never
/// a silent skip.
#[test]
fn forged_cursors_never_skip_in_silence() {
    let gw = TestGateway::start("ws-forged", &memory_config(""));
    let wid = create_worker(&gw.base, "echo");
    let mut ws = ws_connect(&ws_url(&gw.base, "local", &wid, ""), &[]).unwrap();
    next_frame(&mut ws);
    say(&gw.base, "local", &wid, "a b c d e f g h");
    let turn = frames_until(&mut ws, is_idle);
    drop(ws);
    let real = turn[0]["envelope"]["cursor"].as_str().unwrap();
    let tag = &real[3..19];
    let (first, last) = (bo(&turn[0]), bo(turn.last().unwrap()));
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..120 {
        let (cursor, resumes_at) = match round % 4 {
            0 | 1 => {
                let seq = first - 1 + next() % (last - first + 1); // within the stream
                (format!("bo_{tag}{seq:016x}"), Some(seq))
            }
            2 => (format!("bo_{tag}{:016x}", last + 1 + next() % 1000), None), // ahead of the worker
            _ if round % 8 == 3 => (format!("bo_{:016x}", next()), None),      // the old form
            _ => (format!("bo_{:016x}{:016x}", next(), next() % (last + 10)), None), // another stream
        };
        let mut again = ws_connect(&ws_url(&gw.base, "local", &wid, &format!("?cursor={cursor}")), &[]).unwrap();
        match resumes_at {
            Some(seq) => {
                let expected: Vec<Value> = turn.iter().filter(|f| bo(f) > seq).cloned().collect();
                let got: Vec<Value> = (0..expected.len()).map(|_| next_frame(&mut again)).collect();
                assert_eq!(got, expected, "{cursor}: every event after it, once, in order");
            }
            None => {
                let reset = next_frame(&mut again);
                assert_eq!((&reset["kind"], &reset["state"]), (&json!("stream"), &json!("reset")), "{cursor}: {reset}");
                assert_eq!(event_name(&next_frame(&mut again)), "snapshot", "{cursor}");
            }
        }
    }
}

/// A runtime process that takes inputs of up to 16 MiB, and a gateway in front of it (with
/// `gateway_server` in its `[server]`), ready: their processes.
fn large_event_setup(name: &str, gateway_server: &str) -> (Process, Process) {
    let rt_config = write_config(
        &format!("{name}-rt"),
        "[server]\nbind = \"127.0.0.1:0\"\nmax_body_bytes = 50331648\n[runtime]\nid = \"rt-large\"\nstore = \"memory\"\n",
    );
    let rt = Process::start(&["runtime", "--config", rt_config.to_str().unwrap()]);
    let gw_config = write_config(
        &format!("{name}-gw"),
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n{gateway_server}[[runtimes]]\nid = \"r\"\nkind = \"remote\"\nbase_url = \"{}\"\n",
            rt.base
        ),
    );
    let gw = Process::start(&["serve", "--config", gw_config.to_str().unwrap()]);
    wait_health(&gw.base, "r", "healthy");
    (rt, gw)
}

/// Sends `content` to the worker straight to the runtime (the gateway only relays events).
fn say_to_runtime(rt: &Process, wid: &str, content: String) {
    let sent = post_json(&rt.url(&format!("/v1/workers/{wid}/input")), &json!({"kind": "user", "content": content}));
    assert_eq!(sent.status, 200, "{:?}", sent.body);
}

/// A browser that reads every frame, however large; it has read the turn when `read_turn`
/// returns.
fn large_reader(url: String) -> Ws {
    let config = tungstenite::protocol::WebSocketConfig::default().max_message_size(None).max_frame_size(None);
    let (mut reader, _) = tungstenite::client::connect_with_config(url, Some(config), 3).expect("reader");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = reader.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    }
    reader
}

/// The frames up to the end of the current turn (the worker idle again).
fn read_turn(reader: &mut Ws) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let tungstenite::Message::Text(text) = reader.read().expect("a frame") else { continue };
        frames.push(serde_json::from_str(text.as_str()).expect("JSON"));
        if frames.last().is_some_and(is_idle) {
            return frames;
        }
    }
}

/// The most RSS (KiB) of `pid` seen over a second: what sessions still had to write, they
/// write within moments.
fn peak_rss_over_a_second(pid: u32) -> usize {
    let mut most = 0;
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        most = most.max(status_field(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(50));
    }
    most
}

/// One large event watched by browsers that do not read is held once by the gateway, not
/// once per browser: each session writes it from the bytes its stream shares (it used to
/// copy it whole into each session's buffer: 16 browsers × 8 MiB).
#[test]
fn a_large_event_to_many_browsers_that_do_not_read_is_held_once() {
    let (rt, gw) = large_event_setup("ws-large", "");
    let wid = create_worker_on(&gw.base, "r", "echo");
    let idle: Vec<Ws> = (0..16)
        .map(|_| {
            let mut ws = ws_connect(&ws_url(&gw.base, "r", &wid, ""), &[]).expect("events");
            next_frame(&mut ws);
            ws
        })
        .collect();
    let mut reader = large_reader(ws_url(&gw.base, "r", &wid, ""));
    let before = status_field(gw.child.id(), "VmRSS:");
    say_to_runtime(&rt, &wid, "x".repeat(8 << 20));
    read_turn(&mut reader);
    let grew = peak_rss_over_a_second(gw.child.id()).saturating_sub(before) / 1024;
    assert!(grew < 64, "RSS grew by {grew} MiB for one 8 MiB event to 16 browsers");
    drop(idle);
}

/// [`large_event_setup`], an `echo` worker there and a [`large_reader`] of it past its
/// snapshot: the processes, the worker and the reader.
fn a_large_event_reader(name: &str, gateway_server: &str) -> (Process, Process, String, Ws) {
    let (rt, gw) = large_event_setup(name, gateway_server);
    let wid = create_worker_on(&gw.base, "r", "echo");
    let mut reader = large_reader(ws_url(&gw.base, "r", &wid, ""));
    next_frame(&mut reader);
    (rt, gw, wid, reader)
}

/// A large event does not stay in the gateway's memory once its browsers have it: not in
/// the ring (it is over the ring's byte budget), nor in the read buffer of the runtime's
/// connection (grown to the event's size; the relay replaces that connection once the
/// stream is quiet, resuming after the event). The browser stays connected and watching.
#[test]
fn a_large_event_leaves_no_memory_behind_once_delivered() {
    let (rt, gw, wid, mut reader) = a_large_event_reader("ws-large-gone", "");
    let before = status_field(gw.child.id(), "VmRSS:");
    // 12 MiB: under glibc's own largest mmap threshold (32 MiB), above which blocks freed
    // would go back to the system anyway. The turn carries it three times.
    say_to_runtime(&rt, &wid, "z".repeat(12 << 20));
    read_turn(&mut reader);
    wait_for("the gateway's memory back near where it was", Duration::from_secs(20), || {
        (status_field(gw.child.id(), "VmRSS:").saturating_sub(before) < 8 << 10).then_some(())
    });
    // Still the same stream: the next turn arrives, and nothing was skipped or reset.
    say_to_runtime(&rt, &wid, "after".into());
    let frames = read_turn(&mut reader);
    assert!(frames.iter().all(|f| f["kind"] == "event"), "{frames:?}");
}

/// An event larger than the whole ring is not kept in it, but a browser that comes back
/// with a cursor from before it still gets it — read back from the runtime — and no `gap`.
#[test]
fn an_event_larger_than_the_ring_is_read_back_for_a_late_browser() {
    let (rt, gw, wid, mut reader) = a_large_event_reader("ws-large-late", "event_ring_bytes = 1048576\n");
    say_to_runtime(&rt, &wid, "q".repeat(4 << 20));
    let turn = read_turn(&mut reader);
    // The turn echoes the input, then replies with it: the cursor stands between the two.
    let large = turn.iter().rposition(|f| f.to_string().len() > 4 << 20).expect("the large reply");
    assert!(large > 0, "an event before it");
    let cursor = turn[large - 1]["envelope"]["cursor"].as_str().expect("cursor");
    let mut late = large_reader(ws_url(&gw.base, "r", &wid, &format!("?cursor={cursor}")));
    assert_eq!(read_turn(&mut late), turn[large..].to_vec(), "every event after the cursor, no gap");
}

/// A browser that does not read holds at most 16 × `event_ring_bytes` of queued frames
/// (here 16 MiB), not `subscriber_queue` frames of any size: large events overflow its
/// queue like many small ones, and it is told of the gap when it reads again.
#[test]
fn a_browser_that_does_not_read_holds_a_bounded_number_of_bytes() {
    let (rt, gw) = large_event_setup("ws-queue-bytes", "event_ring_bytes = 1048576\n");
    let wid = create_worker_on(&gw.base, "r", "echo");
    let mut idle = ws_connect(&ws_url(&gw.base, "r", &wid, ""), &[]).expect("events");
    next_frame(&mut idle);
    let mut reader = large_reader(ws_url(&gw.base, "r", &wid, ""));
    let before = status_field(gw.child.id(), "VmRSS:");
    for _ in 0..32 {
        say_to_runtime(&rt, &wid, "y".repeat(2 << 20)); // a turn holds it twice: ~4 MiB of events
        read_turn(&mut reader);
    }
    let grew = peak_rss_over_a_second(gw.child.id()).saturating_sub(before) / 1024;
    assert!(grew < 48, "RSS grew by {grew} MiB for a browser that read nothing of 128 MiB of events");
    // Reading again, it is told it fell behind: a gap, or — when its socket stayed full for
    // longer than the stall limit (a slower build) — the end of the connection.
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = idle.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    }
    loop {
        match idle.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let frame: Value = serde_json::from_str(text.as_str()).expect("JSON");
                match frame["kind"].as_str() {
                    Some("gap") => break,
                    Some("event") => {}
                    _ => panic!("{frame}"),
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => panic!("nothing told"),
            Err(_) => break, // dropped as stalled
        }
    }
}
