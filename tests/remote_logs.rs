//! What the gateway's log says about remote runtimes: a WARN line when one becomes
//! unreachable, when it is back, when a worker's event stream is lost and when it is
//! connected again, and when its token is missing (the gateway starts anyway) — naming the
//! runtime (and worker) by id, never its URL, host, port or token. Read from the real
//! process's stderr.

mod common;

use std::time::Duration;

use common::*;

const TOKEN: &str = "log-test-token-5f3a";

fn runtime(addr: &str, data_dir: &str) -> Process {
    let args =
        ["runtime", "--bind", addr, "--runtime-id", "rt-logs", "--data-dir", data_dir, "--token-env", "LOGS_TOKEN"];
    Process::start_with_env(&args, &[("LOGS_TOKEN", TOKEN)])
}

/// A gateway config with `local` and the remote `lab` at `rt`, its token in `token_var`.
fn gateway_config(name: &str, rt: &Process, token_var: &str) -> std::path::PathBuf {
    let remote = format!(
        "[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"{token_var}\"\n\
         probe_interval_ms = 100\n",
        rt.base
    );
    write_config(name, &memory_config(&remote).replace("threads = 4\n", ""))
}

/// A gateway (config `name`) in front of `rt` as `lab`, a worker on it, and a browser's
/// event stream of that worker, past its snapshot.
fn watching(name: &str, rt: &Process) -> (Process, String, Ws) {
    let config = gateway_config(name, rt, "LOGS_TOKEN");
    let gw = Process::start_with_env(&["serve", "--config", config.to_str().unwrap()], &[("LOGS_TOKEN", TOKEN)]);
    wait_health(&gw.base, "lab", "healthy");
    let worker = create_worker_on(&gw.base, "lab", "echo");
    let url = format!("{}/api/runtimes/lab/workers/{worker}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).expect("upgrade");
    assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
    (gw, worker, ws)
}

/// Waits until the gateway's log has a WARN line containing `text`; returns that line.
fn warned(gw: &Process, text: &str) -> String {
    wait_for(&format!("a WARN line with `{text}`"), Duration::from_secs(15), || {
        let log = gw.stderr.lock().unwrap();
        log.lines().find(|l| l.contains(" WARN ") && l.contains(text)).map(str::to_owned)
    })
}

#[test]
fn a_remote_going_away_and_coming_back_is_logged_without_its_address() {
    let data = temp_dir("logs-rt");
    let data = data.to_str().unwrap();
    let rt = runtime("127.0.0.1:0", data);
    let addr = rt.host_port().to_owned();
    let (gw, worker, ws) = watching("logs-gw", &rt);

    rt.signal(libc::SIGKILL);
    drop(rt);
    let down = warned(&gw, "runtime `lab` is unreachable");
    assert!(down.contains("remote_runtime_"), "the line says why: {down}");
    warned(&gw, &format!("runtime `lab`: lost the event stream of worker `{worker}`; reconnecting"));

    let _rt = runtime(&addr, data);
    warned(&gw, "runtime `lab` is back");
    warned(&gw, &format!("runtime `lab`: the event stream of worker `{worker}` is connected again; resumed"));
    drop(ws);

    let log = gw.stderr.lock().unwrap().clone();
    for secret in [addr.as_str(), TOKEN] {
        assert!(!log.contains(secret), "`{secret}` reached the log:\n{log}");
    }
    let transitions = log.lines().filter(|l| l.contains("runtime `lab` is unreachable")).count();
    assert_eq!(transitions, 1, "one line per change, not one per failed probe:\n{log}");
}

/// A runtime that comes back with another store, whose new worker has the id of the one a
/// browser watched: the stream ends (`reset`, then `worker_not_found`), and the log says the
/// worker is gone rather than that its stream is back.
#[test]
fn a_stream_back_on_a_replaced_worker_is_logged_as_gone_not_resumed() {
    let rt = runtime("127.0.0.1:0", temp_dir("logs-replaced-rt").to_str().unwrap());
    let addr = rt.host_port().to_owned();
    let (gw, worker, mut ws) = watching("logs-replaced-gw", &rt);

    rt.signal(libc::SIGKILL);
    drop(rt);
    warned(&gw, &format!("runtime `lab`: lost the event stream of worker `{worker}`; reconnecting"));
    // Another store, given a worker of that id before the runtime serves on the old address.
    let store = temp_dir("logs-replaced-rt-2");
    let mut other = runtime("127.0.0.1:0", store.to_str().unwrap());
    let created = agent()
        .post(&other.url("/v1/workers"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .send(r#"{"intent":{"kind":"assistant"},"profile":{"kind":"named","value":"echo"}}"#)
        .expect("create")
        .body_mut()
        .read_json::<serde_json::Value>()
        .expect("json");
    assert_eq!(created["worker"]["worker_id"], worker.as_str(), "the new store reuses the id");
    other.signal(libc::SIGTERM);
    assert!(other.wait(Duration::from_secs(10)).success());
    let _rt = runtime(&addr, store.to_str().unwrap());
    let line = warned(&gw, &format!("runtime `lab`: the event stream of worker `{worker}` is connected again"));
    assert!(line.contains("replaced or is gone") && !line.contains("resumed"), "{line}");
    let (frames, _) = close_reason(&mut ws);
    assert!(frames.iter().any(|f| f["state"] == "reset"), "{frames:?}");
}

/// A memory runtime that restarts has lost its workers: the stream of one ends, and the log
/// says so after it said the stream was lost.
#[test]
fn a_stream_whose_worker_did_not_survive_a_restart_is_logged_as_ended() {
    let start = |addr: &str| {
        let args = ["runtime", "--bind", addr, "--runtime-id", "rt-logs", "--memory", "--token-env", "LOGS_TOKEN"];
        Process::start_with_env(&args, &[("LOGS_TOKEN", TOKEN)])
    };
    let rt = start("127.0.0.1:0");
    let addr = rt.host_port().to_owned();
    let (gw, worker, mut ws) = watching("logs-ended-gw", &rt);

    rt.signal(libc::SIGKILL);
    drop(rt);
    warned(&gw, &format!("runtime `lab`: lost the event stream of worker `{worker}`; reconnecting"));
    let _rt = start(&addr);
    warned(&gw, &format!("the event stream of worker `{worker}` ended: the worker no longer exists"));
    let (frames, _) = close_reason(&mut ws);
    assert!(frames.iter().any(|f| f["diagnostic"]["code"] == "backend.worker_not_found"), "{frames:?}");
}

/// A remote whose token variable is unset does not stop the start: the gateway says so,
/// serves its other runtimes, and shows that one as refusing it (`auth_failed`).
#[test]
fn a_remote_without_its_token_starts_as_auth_failed_and_says_why() {
    let rt = Process::start_with_env(
        &["runtime", "--bind", "127.0.0.1:0", "--memory", "--token-env", "LOGS_TOKEN"],
        &[("LOGS_TOKEN", TOKEN)],
    );
    let config = gateway_config("logs-notoken", &rt, "LOGS_TOKEN_NEVER_SET");
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    let view = wait_health(&gw.base, "lab", "auth_failed");
    assert_eq!(view["health"]["last_error"]["code"], "remote_runtime_auth_failed", "{view}");
    let refused = "the runtime refused the gateway: its token for it is missing or wrong";
    assert_eq!(view["health"]["last_error"]["message"], refused, "{view}");
    create_worker(&gw.base, "echo"); // `local` serves all the same
    warned(&gw, "runtime `lab`: no token (environment variable `LOGS_TOKEN_NEVER_SET` is not set)");
    warned(&gw, &format!("runtime `lab` is auth_failed (remote_runtime_auth_failed: {refused})"));
}
