//! Cost follows load, not configuration: a gateway in front of hundreds of remote runtimes
//! starts with the defaults and stays small, a pool grown by a burst shrinks back, and idle
//! event streams hold no threads.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use worker_gateway::http::server::KEPT_THREADS;

/// Far below one thread per runtime or per session: what the process needs to run.
const FEW_THREADS: usize = 50;

/// The two tests of two hundred runtimes run one at a time: each is a load of its own (the
/// other's hundreds of threads made a real runtime's probe time out).
static TWO_HUNDRED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gateway(name: &str, config: &str) -> Process {
    let path = write_config(name, config);
    Process::start(&["serve", "--config", path.to_str().unwrap()])
}

fn threads(process: &Process) -> usize {
    threads_and_fds(process.child.id()).0
}

/// Waits (bounded) until the process runs fewer than `limit` threads; returns how many.
fn settles_below(process: &Process, limit: usize) -> usize {
    wait_for(&format!("fewer than {limit} threads"), Duration::from_secs(30), || {
        let n = threads(process);
        (n < limit).then_some(n)
    })
}

/// A gauge of the gateway's `/metrics`.
fn gauge(gw: &Process, name: &str) -> Option<u64> {
    let text = agent().get(&gw.url("/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn create_on_runtime(rt: &Process) {
    let body = json!({"intent": {"kind": "assistant"}, "profile": {"kind": "runtime_default"}});
    let resp = agent().post(&rt.url("/v1/workers")).header("content-type", "application/json").send(body.to_string());
    assert_eq!(resp.expect("created").status(), 200);
}

#[test]
fn two_hundred_remote_runtimes_start_with_the_defaults_and_cost_few_threads() {
    let _alone = TWO_HUNDRED.lock().unwrap_or_else(|p| p.into_inner());
    let runtimes: Vec<Process> = ["rt-a", "rt-b"]
        .iter()
        .map(|id| Process::start(&["runtime", "--memory", "--bind", "127.0.0.1:0", "--runtime-id", id]))
        .collect();
    for rt in &runtimes {
        for _ in 0..3 {
            create_on_runtime(rt);
        }
    }
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // 80 entries for each real runtime and 40 where nothing listens; [server] has only its bind.
    let mut config = String::from("[server]\nbind = \"127.0.0.1:0\"\n");
    for n in 0..200 {
        let url = match n % 5 {
            0 => format!("http://{dead}"),
            k => runtimes[k % 2].base.clone(),
        };
        config.push_str(&format!("[[runtimes]]\nid = \"r{n}\"\nkind = \"remote\"\nbase_url = \"{url}\"\n"));
    }
    let gw = gateway("scale-remotes", &config);
    wait_for("every runtime to be probed", Duration::from_secs(20), || {
        let listed = get(&gw.url("/api/runtimes")).body;
        let items = listed["items"].as_array()?.clone();
        items.iter().all(|r| r["health"]["state"] != "unknown").then_some(())
    });

    let all = get(&gw.url("/api/workers"));
    assert_eq!(all.status, 200);
    let states: Vec<&Value> = all.body["runtimes"].as_array().unwrap().iter().map(|r| &r["state"]).collect();
    assert_eq!(states.len(), 200);
    assert_eq!(states.iter().filter(|s| **s == "ok").count(), 160, "{}", all.body["runtimes"]);
    assert_eq!(all.body["items"].as_array().unwrap().len(), 160 * 3);
    assert_eq!(all.body["runtimes"][0]["error"]["code"], "remote_runtime_unreachable");

    let settled = settles_below(&gw, FEW_THREADS);
    eprintln!("200 remote runtimes, idle after a listing: {settled} threads");
}

/// A listener that accepts connections and never answers.
#[test]
fn a_pool_grown_by_hung_requests_shrinks_back_when_they_end() {
    let (url, accepted) = black_hole();
    let gw = gateway(
        "scale-shrink",
        &format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\nstore = \"memory\"\n\
             [[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{url}\"\nmax_in_flight = 64\n\
             read_timeout_ms = 100000\nprobe_interval_ms = 60000\n"
        ),
    );
    let before = threads(&gw);
    let (hung, held) = hang_requests(&gw.url("/api/runtimes/m/workers/w-1"), 64, &accepted, 65);
    let grown = gauge(&gw, "worker_gateway_http_threads").expect("the pool's threads");
    assert!(grown >= 64, "one handler thread per hung request: {grown}");
    assert!(threads(&gw) >= before + 60);
    assert_eq!(get(&gw.url("/healthz")).status, 200, "and more for everyone else");

    drop(held); // the runtime "answers" by closing: every hung request ends
    for h in hung {
        assert_eq!(h.join().unwrap(), 502);
    }
    wait_for("the pool to shrink", Duration::from_secs(30), || {
        (gauge(&gw, "worker_gateway_http_threads")? <= KEPT_THREADS as u64).then_some(())
    });
    let settled = settles_below(&gw, FEW_THREADS);
    eprintln!("threads: {before} at start, {} with 64 hung requests, {settled} after", before + grown as usize);
}

#[test]
fn a_thousand_idle_event_streams_hold_no_threads() {
    let gw = gateway("scale-ws", &memory_config(""));
    let wid = create_worker(&gw.base, "echo");
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut streams: Vec<Ws> = (0..1000)
        .map(|_| {
            let mut ws = ws_connect(&url, &[]).expect("every session is accepted");
            assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
            ws
        })
        .collect();
    assert_eq!(gauge(&gw, "worker_gateway_ws_sessions"), Some(1000));
    let idle = settles_below(&gw, FEW_THREADS);

    post_json(&gw.url(&format!("/api/runtimes/local/workers/{wid}/input")), &json!({"content": "all of you"}));
    for ws in &mut streams {
        let frames = frames_until(ws, |f| event_name(f) == "turn_end");
        assert!(frames.iter().any(|f| event_name(f) == "text_delta"), "every session gets the turn");
    }
    drop(streams);
    wait_for("the sessions to end", Duration::from_secs(20), || {
        (gauge(&gw, "worker_gateway_ws_sessions")? == 0).then_some(())
    });
    eprintln!("1000 idle sessions: {idle} threads");
}

/// Two hundred runtimes that never answer, and a quick one listed after them: a listing asks
/// as many as its budget allows, says which it never asked, and the next listing (joining
/// the calls still in flight) lists the quick one. The hung calls' threads end with their
/// budget.
#[test]
fn a_listing_says_which_runtimes_it_had_no_time_to_ask() {
    let _alone = TWO_HUNDRED.lock().unwrap_or_else(|p| p.into_inner());
    let holes: Vec<_> = (0..200).map(|_| black_hole()).collect();
    let mut config = String::from("[server]\nbind = \"127.0.0.1:0\"\n");
    for (n, (url, _)) in holes.iter().enumerate() {
        config.push_str(&format!(
            "[[runtimes]]\nid = \"hole{n}\"\nkind = \"remote\"\nbase_url = \"{url}\"\nread_timeout_ms = 4000\n\
             probe_timeout_ms = 20000\nprobe_interval_ms = 60000\n"
        ));
    }
    config.push_str("[[runtimes]]\nid = \"late\"\nkind = \"embedded\"\nstore = \"memory\"\n");
    let gw = gateway("scale-no-time", &config);
    let code = |r: &Value| r["error"]["code"].as_str().unwrap_or_default().to_owned();
    let first = get(&gw.url("/api/workers")).body;
    let states = first["runtimes"].as_array().expect("runtimes").clone();
    let not_asked: Vec<&Value> = states.iter().filter(|r| code(r) == "overloaded").collect();
    let timed_out = states.iter().filter(|r| code(r) == "remote_runtime_timeout").count();
    assert!(!not_asked.is_empty() && timed_out >= 16, "{not_asked:?} {timed_out}");
    assert_eq!(not_asked.len() + timed_out, 200, "every remote is one or the other");
    let said = not_asked[0]["error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("was not asked within 2000 ms"), "{said}");
    let late = states.iter().find(|r| r["runtime_id"] == "late").expect("late");
    assert_eq!(late["state"], "ok", "an embedded runtime is asked first: {late}");
    let second = get(&gw.url("/api/workers")).body;
    let late = second["runtimes"].as_array().and_then(|r| r.iter().find(|r| r["runtime_id"] == "late").cloned());
    assert_eq!(late.map(|l| l["state"].clone()), Some(json!("ok")), "{second}");
    let settled = settles_below(&gw, FEW_THREADS);
    eprintln!("{timed_out} asked, {} not asked; threads after: {settled}", not_asked.len());
    drop(holes);
}
