//! `worker-gateway check`: a smoke test for scripts. Bounded time, exit status, no secrets.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

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

    let bad = write_config(
        "check-bad",
        &format!(
            "{}[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"CHK_TOKEN\"\nmax_in_flight = 2\n\
             [[runtimes]]\nid = \"wrongtoken\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"WRONG_TOKEN\"\nmax_in_flight = 2\n\
             [[runtimes]]\nid = \"hung\"\nkind = \"remote\"\nbase_url = \"http://{hung_addr}\"\nmax_in_flight = 2\nread_timeout_ms = 1000\n",
            memory_config(""),
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
    let checks = |id: &str| -> Vec<(String, bool)> {
        let rt = report["runtimes"].as_array().unwrap().iter().find(|r| r["runtime_id"] == id).unwrap();
        rt["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_owned(), c["ok"].as_bool().unwrap()))
            .collect()
    };
    assert!(checks("local").iter().all(|(_, ok)| *ok));
    assert!(checks("lab").iter().all(|(_, ok)| *ok));
    assert_eq!(checks("wrongtoken")[1], ("authenticated".to_owned(), false));
    assert_eq!(checks("hung")[0], ("reachable".to_owned(), false));
    assert_eq!(checks("hung").len(), 7, "skipped checks are listed as failed");
    for secret in ["check-token-ab12", "not-the-token-77", rt.host_port(), &hung_addr] {
        assert!(!text.contains(secret), "`{secret}` printed:\n{text}");
    }
    drop(hung);
}
