//! The Runtime API's event WebSocket against a real `worker-gateway runtime` process.

mod common;

use common::*;
use serde_json::{Value, json};

const AUTH: (&str, &str) = ("authorization", "Bearer rt-ws-token");

fn runtime(store: &[&str], bind: &str) -> Process {
    let mut args = vec!["runtime", "--bind", bind, "--runtime-id", "rt-ws", "--token-env", "RT_WS_TOKEN"];
    args.extend_from_slice(store);
    Process::start_with_env(&args, &[("RT_WS_TOKEN", "rt-ws-token")])
}

fn create(rt: &Process) -> String {
    let body = json!({"intent":{"kind":"assistant"},"profile":{"kind":"runtime_default"}});
    let resp = agent()
        .post(&rt.url("/v1/workers"))
        .header("authorization", AUTH.1)
        .header("content-type", "application/json")
        .send(body.to_string());
    let v: Value = resp.unwrap().body_mut().read_json().unwrap();
    v["worker"]["worker_id"].as_str().unwrap().to_owned()
}

fn say(rt: &Process, worker: &str, text: &str) {
    let resp = agent()
        .post(&rt.url(&format!("/v1/workers/{worker}/input")))
        .header("authorization", AUTH.1)
        .header("content-type", "application/json")
        .send(json!({"kind":"user","content":text}).to_string())
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn events_url(rt: &Process, worker: &str, cursor: Option<&str>) -> String {
    let base = rt.base.replace("http://", "ws://");
    match cursor {
        Some(c) => format!("{base}/v1/workers/{worker}/events/ws?cursor={c}"),
        None => format!("{base}/v1/workers/{worker}/events/ws"),
    }
}

fn cursor_of(frame: &Value) -> u64 {
    let c = frame["envelope"]["cursor"].as_str().unwrap();
    u64::from_str_radix(c.trim_start_matches("wo_"), 16).unwrap()
}

#[test]
fn snapshot_then_live_then_resume_exactly_after_a_cursor() {
    let rt = runtime(&["--memory"], "127.0.0.1:0");
    let worker = create(&rt);
    let mut ws = ws_connect(&events_url(&rt, &worker, None), &[AUTH]).expect("upgrade");
    let snapshot = next_frame(&mut ws);
    assert_eq!(event_name(&snapshot), "snapshot");
    let position = snapshot["envelope"]["cursor"].as_str().unwrap().to_owned();
    assert_eq!(snapshot["envelope"]["event_id"], format!("snapshot:{position}"));
    assert_eq!(snapshot["envelope"]["payload"]["data"]["greeting"]["worker_status"], "running");

    say(&rt, &worker, "one two");
    let turn = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    let names: Vec<String> = turn.iter().map(event_name).collect();
    assert_eq!(names, ["user_message", "status", "turn_start", "text_delta", "text_delta", "text_done", "turn_end"]);
    let cursors: Vec<u64> = turn.iter().map(cursor_of).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    assert!(cursors[0] > cursor_of(&snapshot));
    let idle = next_frame(&mut ws);
    assert_eq!(idle["envelope"]["payload"], json!({"event":"status","data":{"status":"idle"}}));

    // Resume from the middle: exactly the events after it, then live.
    let middle = turn[2]["envelope"]["cursor"].as_str().unwrap();
    let mut again = ws_connect(&events_url(&rt, &worker, Some(middle)), &[AUTH]).unwrap();
    assert_eq!(event_name(&next_frame(&mut again)), "snapshot");
    let replayed =
        frames_until(&mut again, |f| event_name(f) == "status" && f["envelope"]["payload"]["data"]["status"] == "idle");
    let want: Vec<u64> = turn[3..].iter().map(cursor_of).chain([cursor_of(&idle)]).collect();
    assert_eq!(replayed.iter().map(cursor_of).collect::<Vec<_>>(), want);
    say(&rt, &worker, "three");
    assert_eq!(event_name(&next_frame(&mut again)), "user_message");
    assert_eq!(event_name(&next_frame(&mut ws)), "user_message");
}

#[test]
fn errors_before_and_after_the_upgrade() {
    let rt = runtime(&["--memory"], "127.0.0.1:0");
    let worker = create(&rt);
    assert_eq!(ws_connect(&events_url(&rt, &worker, None), &[]).err(), Some(401));
    assert_eq!(ws_connect(&events_url(&rt, "worker-0000ffff", None), &[AUTH]).err(), Some(404));
    assert_eq!(ws_connect(&events_url(&rt, "bad%2Fid", None), &[AUTH]).err(), Some(400));

    let mut malformed = ws_connect(&events_url(&rt, &worker, Some("wo_12")), &[AUTH]).unwrap();
    let (frames, code) = close_reason(&mut malformed);
    assert_eq!(frames.len(), 1, "no snapshot before the diagnostic: {frames:?}");
    assert_eq!(frames[0]["diagnostic"]["code"], "runtime.cursor_malformed");
    assert_eq!(code, Some(1008));

    let mut future = ws_connect(&events_url(&rt, &worker, Some("wo_00000000ffffffff")), &[AUTH]).unwrap();
    assert_eq!(event_name(&next_frame(&mut future)), "snapshot");
    assert_eq!(next_frame(&mut future)["diagnostic"]["code"], "runtime.cursor_unknown_or_expired");

    let mut chatty = ws_connect(&events_url(&rt, &worker, None), &[AUTH]).unwrap();
    next_frame(&mut chatty);
    chatty.send(tungstenite::Message::text("hello?")).unwrap();
    let (frames, code) = close_reason(&mut chatty);
    assert_eq!(frames.last().unwrap()["diagnostic"]["code"], "runtime.observation_only");
    assert_eq!(code, Some(1008));

    let mut pinger = ws_connect(&events_url(&rt, &worker, None), &[AUTH]).unwrap();
    next_frame(&mut pinger);
    pinger.send(tungstenite::Message::Ping("are you there".into())).unwrap();
    loop {
        match pinger.read().unwrap() {
            tungstenite::Message::Pong(p) => break assert_eq!(&p[..], b"are you there"),
            other => assert!(other.is_ping(), "{other:?}"),
        }
    }
}

#[test]
fn with_the_fs_store_a_cursor_survives_a_restart() {
    let dir = temp_dir("rt-ws-fs");
    let dir = dir.to_str().unwrap();
    let rt = runtime(&["--data-dir", dir], "127.0.0.1:0");
    let worker = create(&rt);
    let mut ws = ws_connect(&events_url(&rt, &worker, None), &[AUTH]).unwrap();
    next_frame(&mut ws);
    say(&rt, &worker, "before");
    let first = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    let seen = first[1]["envelope"]["cursor"].as_str().unwrap().to_owned();
    let addr = rt.host_port().to_owned();
    drop((ws, rt));

    let rt = runtime(&["--data-dir", dir], &addr);
    let mut ws = ws_connect(&events_url(&rt, &worker, Some(&seen)), &[AUTH]).unwrap();
    let snapshot = next_frame(&mut ws);
    assert_eq!(snapshot["envelope"]["payload"]["data"]["greeting"]["durable_cursors"], true);
    let replayed = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    let want: Vec<u64> = first[2..].iter().map(cursor_of).collect();
    let got: Vec<u64> = replayed.iter().map(cursor_of).collect();
    assert_eq!(got, want, "events from before the restart, after the cursor, once");
    // The worker is still running after the restart: a new turn streams on the same session.
    say(&rt, &worker, "after");
    let live = frames_until(&mut ws, |f| event_name(f) == "turn_end");
    assert!(live.iter().map(cursor_of).all(|c| c > want[want.len() - 1]), "only newer events follow");
    assert!(live.iter().any(|f| event_name(f) == "text_delta"));
}
