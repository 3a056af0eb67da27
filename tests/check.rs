//! `worker-gateway check`: a smoke test for scripts. Bounded time, exit status, no secrets.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn run_check(config: &std::path::Path, json: bool, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut args = vec!["check", "--config", config.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("run check");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn check_reports_each_runtime_and_fails_on_any_failure() {
    let rt = Process::start_with_env(
        &["runtime", "--bind", "127.0.0.1:0", "--memory", "--token-env", "CHK_TOKEN"],
        &[("CHK_TOKEN", "check-token-ab12")],
    );
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let good = write_config(
        "check-good",
        &format!(
            "{}[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"CHK_TOKEN\"\nmax_in_flight = 2\n",
            memory_config(""),
            rt.base
        ),
    );
    let env = [("CHK_TOKEN", "check-token-ab12"), ("WRONG_TOKEN", "not-the-token-77")];
    let (code, text) = run_check(&good, false, &env);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("lab") && text.contains("round_trip") && !text.contains("FAIL"), "{text}");
    let row = |id: &str, check: &str| -> String {
        let found = text.lines().find(|l| l.starts_with(&format!("{id} ")) && l.contains(&format!(" {check} ")));
        found.unwrap_or_else(|| panic!("no {id} {check} row:\n{text}")).to_owned()
    };
    for id in ["local", "lab"] {
        assert!(row(id, "delete").contains("deleted worker-"), "both runtimes delete: {text}");
    }
    assert!(row("lab", "authenticated").contains("token accepted"), "{text}");
    let embedded = row("local", "authenticated");
    assert!(embedded.contains("SKIP") && !embedded.contains("token accepted"), "no token is involved: {text}");
    assert_eq!(text.lines().last(), Some("2 runtimes: 2 ok, 0 failed"), "{text}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("its address");
    let bad = write_config(
        "check-bad",
        &format!(
            "{}[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"CHK_TOKEN\"\nmax_in_flight = 2\n\
             [[runtimes]]\nid = \"wrongtoken\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"WRONG_TOKEN\"\nmax_in_flight = 2\n\
             [[runtimes]]\nid = \"hung\"\nkind = \"remote\"\nbase_url = \"http://{hung_addr}\"\nmax_in_flight = 2\nread_timeout_ms = 1000\n\
             [[runtimes]]\nid = \"notoken\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"CHK_TOKEN_NEVER_SET\"\nmax_in_flight = 2\n\
             [[runtimes]]\nid = \"notapi\"\nkind = \"remote\"\nbase_url = \"{}/not-the-api\"\ntoken_env = \"CHK_TOKEN\"\nmax_in_flight = 2\n\
             [[runtimes]]\nid = \"down\"\nkind = \"remote\"\nbase_url = \"http://{closed}\"\ntoken_file = \"no/such/token\"\nmax_in_flight = 2\n",
            memory_config(""),
            rt.base,
            rt.base,
            rt.base,
            rt.base
        ),
    );
    let started = Instant::now();
    let (code, text) = run_check(&bad, true, &env);
    assert!(started.elapsed() < Duration::from_secs(20), "bounded even with a hung runtime");
    assert_eq!(code, Some(1), "{text}");
    let report: Value = serde_json::from_str(text.lines().next().unwrap()).expect("JSON report");
    assert_eq!(report["ok"], false);
    assert_eq!(report["summary"], json!({"runtimes": 7, "ok": 2, "failed": 5}));
    let runtime = |id: &str| report["runtimes"].as_array().unwrap().iter().find(|r| r["runtime_id"] == id).unwrap();
    // Each check as (name, result), result as the table shows it.
    let checks = |id: &str| -> Vec<(String, &'static str)> {
        let result = |c: &Value| match (c["ok"].as_bool().unwrap(), c["skipped"].as_bool().unwrap()) {
            (false, _) => "FAIL",
            (true, true) => "SKIP",
            (true, false) => "ok",
        };
        let checks = runtime(id)["checks"].as_array().unwrap().iter();
        checks.map(|c| (c["name"].as_str().unwrap().to_owned(), result(c))).collect()
    };
    assert!(checks("local").iter().all(|(_, r)| *r != "FAIL") && runtime("local")["ok"] == true);
    assert!(checks("lab").iter().all(|(_, r)| *r == "ok") && runtime("lab")["ok"] == true);
    // A failed step fails its runtime only; the steps after it are skipped, not failed.
    for (id, failed) in [("wrongtoken", 1), ("hung", 0), ("notoken", 1)] {
        let checks = checks(id);
        assert_eq!(checks.len(), 8, "every step is listed: {checks:?}");
        assert_eq!(runtime(id)["ok"], false);
        assert!(checks[..failed].iter().all(|(_, r)| *r == "ok"), "{id}: {checks:?}");
        assert_eq!(checks[failed].1, "FAIL", "{id}: {checks:?}");
        assert!(checks[failed + 1..].iter().all(|(_, r)| *r == "SKIP"), "{id}: {checks:?}");
    }
    assert_eq!(checks("hung")[0].0, "reachable");
    // An answer that is not the Runtime API's says nothing about the token.
    let notapi: Vec<&str> = checks("notapi").iter().map(|(_, r)| *r).collect();
    assert_eq!(notapi, ["ok", "SKIP", "FAIL", "SKIP", "SKIP", "SKIP", "SKIP", "SKIP"], "{notapi:?}");
    let notoken = &runtime("notoken")["checks"][1];
    assert_eq!(notoken["name"], "authenticated");
    assert!(notoken["detail"].as_str().unwrap().contains("`CHK_TOKEN_NEVER_SET` is not set"), "{notoken}");
    // A runtime that cannot be reached is not asked about its token, but a token missing here
    // is known anyway, and said.
    let down: Vec<&str> = checks("down").iter().map(|(_, r)| *r).collect();
    assert_eq!(down, ["FAIL", "FAIL", "SKIP", "SKIP", "SKIP", "SKIP", "SKIP", "SKIP"], "{down:?}");
    let missing = &runtime("down")["checks"][1]["detail"];
    assert!(missing.as_str().unwrap().contains("no/such/token"), "{missing}");

    let (code, table) = run_check(&bad, false, &env);
    assert_eq!(code, Some(1), "{table}");
    assert!(table.contains("\n7 runtimes: 2 ok, 5 failed\n"), "{table}");
    for secret in ["check-token-ab12", "not-the-token-77", rt.host_port(), &hung_addr] {
        assert!(!text.contains(secret) && !table.contains(secret), "`{secret}` printed:\n{text}\n{table}");
    }
    drop(hung);

    // A config that does not load: exit 2, and with --json a report that says why.
    let broken = write_config("check-broken", &memory_config("").replace("[server]", "[server]\nbnd = 1"));
    let (code, text) = run_check(&broken, true, &env);
    assert_eq!(code, Some(2), "{text}");
    let report: Value = serde_json::from_str(text.lines().next().expect("a line")).expect("JSON report");
    assert_eq!((&report["ok"], &report["runtimes"]), (&json!(false), &json!([])), "{report}");
    assert!(report["error"].as_str().is_some_and(|e| e.contains("bnd")), "{report}");
}

#[test]
fn a_runtime_without_delete_skips_that_check_and_passes() {
    use mockito::Matcher;
    let mut old = mockito::Server::new();
    let worker_ref = json!({"runtime_id": "rt-old", "worker_id": "w-1"});
    let detail = |status: &str, transcript_len: u64| {
        json!({"worker": {"worker_ref": worker_ref, "runtime_id": "rt-old", "worker_id": "w-1", "status": status,
            "intent": {"kind": "task", "objective": "worker-gateway check"}, "profile": {"kind": "named", "value": "echo"},
            "transcript_len": transcript_len, "last_event_id": 4, "activity": "idle"}})
        .to_string()
    };
    let item = |sequence: u64, role: &str| json!({"sequence": sequence, "worker_ref": worker_ref, "role": role, "content": "check", "event_id": 3});
    let transcript = json!({"transcript": {"worker_ref": worker_ref, "start": 0, "limit": 10, "total_items": 2,
        "items": [item(1, "user"), item(2, "assistant")], "next_start": null}});
    let summary = json!({"runtime": {"runtime_id": "rt-old", "display_name": null, "backend": "memory",
        "status": "running", "worker_count": 1, "limits": {"max_transcript_projection_items": 256,
        "max_event_batch_items": 256}}});
    old.mock("GET", "/v1/runtime").with_body(summary.to_string()).create();
    old.mock("POST", "/v1/workers").with_body(detail("running", 0)).create();
    old.mock("POST", "/v1/workers/w-1/input")
        .with_body(
            json!({"ack": {"worker_ref": worker_ref, "status": "running", "transcript_sequence": 1, "event_id": 2}})
                .to_string(),
        )
        .create();
    old.mock("GET", "/v1/workers/w-1").with_body(detail("running", 2)).create();
    old.mock("GET", Matcher::Regex("^/v1/workers/w-1/transcript".into())).with_body(transcript.to_string()).create();
    old.mock("POST", "/v1/workers/w-1/stop")
        .with_body(json!({"ack": {"worker_ref": worker_ref, "status": "stopped", "event_id": 5}}).to_string())
        .create();
    let refused = old.mock("DELETE", "/v1/workers/w-1").with_status(405).with_header("allow", "GET").create();
    let config = write_config(
        "check-old",
        &format!(
            "{}[[runtimes]]\nid = \"old\"\nkind = \"remote\"\nbase_url = \"{}\"\nmax_in_flight = 2\n",
            memory_config(""),
            old.url()
        ),
    );
    let (code, text) = run_check(&config, true, &[]);
    assert_eq!(code, Some(0), "a skipped step fails nothing:\n{text}");
    refused.assert();
    let report: Value = serde_json::from_str(text.lines().next().unwrap()).expect("JSON report");
    let delete_step = |id: &str| -> Value {
        let rt = report["runtimes"].as_array().unwrap().iter().find(|r| r["runtime_id"] == id).unwrap();
        rt["checks"].as_array().unwrap().iter().find(|c| c["name"] == "delete").cloned().expect("a delete step")
    };
    let old_delete = delete_step("old");
    assert_eq!((&old_delete["ok"], &old_delete["skipped"]), (&json!(true), &json!(true)), "{old_delete}");
    assert!(old_delete["detail"].as_str().unwrap().contains("does not support"), "{old_delete}");
    let local_delete = delete_step("local");
    assert_eq!((&local_delete["ok"], &local_delete["skipped"]), (&json!(true), &json!(false)), "{local_delete}");

    let (code, table) = run_check(&config, false, &[]);
    assert_eq!(code, Some(0), "{table}");
    let row = table.lines().find(|l| l.starts_with("old") && l.contains("delete")).expect("the delete row");
    assert!(row.contains("SKIP") && !table.contains("FAIL"), "{table}");
}

/// A check whose round trip fails (a runtime too slow to answer within 10 s) leaves nothing
/// behind either: its worker is cancelled and deleted (it was left running, its turn busy).
#[test]
fn a_failed_check_leaves_no_worker_behind() {
    let dir = temp_dir("check-slow");
    let runtime_config = dir.join("runtime.toml");
    std::fs::write(
        &runtime_config,
        "[runtime]\nid = \"rt-slow\"\nstore = \"memory\"\n\n[profiles.echo]\nkind = \"echo\"\ndelay_ms = 12000\n",
    )
    .expect("runtime config");
    let rt = Process::start(&["runtime", "--config", runtime_config.to_str().unwrap(), "--bind", "127.0.0.1:0"]);
    let config = write_config(
        "check-slow",
        &format!(
            "{}[[runtimes]]\nid = \"slow\"\nkind = \"remote\"\nbase_url = \"{}\"\nmax_in_flight = 2\n",
            memory_config(""),
            rt.base
        ),
    );
    let (code, text) = run_check(&config, false, &[]);
    assert_eq!(code, Some(1), "{text}");
    let round_trip = text.lines().find(|l| l.starts_with("slow ") && l.contains(" round_trip ")).expect("a row");
    assert!(round_trip.contains("FAIL") && round_trip.contains("no answer within 10 s"), "{text}");
    let workers = get(&rt.url("/v1/workers")).body;
    assert_eq!(workers["workers"], json!([]), "the check's worker is gone: {text}");
}

/// `check` reads what `serve` reads, but for the browser token: a CI job checking runtimes
/// need not hold it. A certificate and key `serve` would refuse, `check` refuses too.
#[test]
fn check_needs_no_browser_token_and_refuses_tls_files_serve_would() {
    let with_token =
        memory_config("").replace("threads = 4\n", "threads = 4\ntoken_env = \"CHK_BROWSER_TOKEN_UNSET\"\n");
    let config = write_config("check-browser-token", &with_token);
    let (code, text) = run_check(&config, false, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.lines().last(), Some("1 runtime: 1 ok, 0 failed"), "{text}");

    let dir = config.parent().expect("its folder");
    for name in ["a", "b"] {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
        std::fs::write(dir.join(format!("{name}.pem")), made.cert.pem()).expect("cert");
        std::fs::write(dir.join(format!("{name}.key")), made.signing_key.serialize_pem()).expect("key");
    }
    let tls = |cert: &str, key: &str| {
        memory_config("")
            .replace("threads = 4\n", &format!("threads = 4\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n"))
    };
    std::fs::write(&config, tls("a.pem", "a.key")).expect("config");
    assert_eq!(run_check(&config, false, &[]).0, Some(0));
    std::fs::write(&config, tls("a.pem", "b.key")).expect("config");
    let (code, text) = run_check(&config, false, &[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("does not fit") && text.contains("b.key"), "{text}");
}

/// A reader that stops early (`check --json | head -c 100`) leaves `check` to end as it
/// would have, without a panic (`println!` panicked on the closed pipe).
#[test]
fn check_ends_quietly_when_its_reader_stops_early() {
    let config = write_config("check-closed-pipe", &memory_config(""));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(["check", "--config", config.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run check");
    drop(child.stdout.take()); // the reader is gone before anything is printed
    let out = child.wait_with_output().expect("its end");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// An embedded runtime whose data folder `serve` could not use fails `check` (it used to
/// pass: embedded runtimes are checked on a memory copy), and one whose folder is yet to be
/// made passes without `check` making it.
#[test]
fn an_embedded_runtime_whose_data_folder_cannot_be_used_fails() {
    let dir = temp_dir("check-data-dir");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a folder").expect("file");
    let embedded = |id: &str, data_dir: &std::path::Path| {
        format!(
            "[[runtimes]]\nid = \"{id}\"\nkind = \"embedded\"\nstore = \"fs\"\ndata_dir = \"{}\"\n",
            data_dir.display()
        )
    };
    let fresh = dir.join("new").join("data");
    let runtimes = embedded("filed", &file.join("data")) + &embedded("fresh", &fresh);
    let config = write_config("check-data-dir", &memory_config(&runtimes));
    let (code, text) = run_check(&config, true, &[]);
    assert_eq!(code, Some(1), "{text}");
    let report: Value = serde_json::from_str(text.lines().next().expect("a line")).expect("JSON report");
    let runtime =
        |id: &str| report["runtimes"].as_array().unwrap().iter().find(|r| r["runtime_id"] == id).unwrap().clone();
    let reachable = &runtime("filed")["checks"][0];
    assert_eq!((&reachable["name"], &reachable["ok"]), (&json!("reachable"), &json!(false)), "{report}");
    assert!(reachable["detail"].as_str().is_some_and(|d| d.contains("a-file is not a folder")), "{reachable}");
    assert_eq!(runtime("fresh")["ok"], true, "{report}");
    assert!(!dir.join("new").exists(), "check makes no folder");
}
