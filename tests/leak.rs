//! Secrets hygiene: remotes configured with distinctive hosts, ports and tokens; every
//! endpoint, every error path and the captured log output are searched for them.

mod common;

use std::net::TcpListener;

use common::*;
use mockito::Server;
use serde_json::json;

const TOKENS: [(&str, &str); 4] = [
    ("LEAK_LAB", "tok-LEAK-lab-a9f3e1"),
    ("LEAK_MOCK", "tok-LEAK-mock-12c7"),
    ("LEAK_DEAF", "tok-LEAK-deaf-55e1"),
    ("LEAK_GHOST", "tok-LEAK-ghost-77b0"),
];

/// Everything a client can see of one request: status, headers, body.
fn seen(method: &str, url: &str, body: Option<&serde_json::Value>) -> String {
    let agent = agent();
    let builder = ureq::http::Request::builder().method(method).uri(url).header("content-type", "application/json");
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut resp = agent.run(builder.body(payload).unwrap()).expect("answered");
    let mut text = format!("{} {:?}\n", resp.status(), resp.headers());
    text.push_str(&resp.body_mut().read_to_string().unwrap_or_default());
    text
}

#[test]
fn no_url_host_port_or_token_reaches_a_client_or_the_log() {
    let lab = Process::start_with_env(
        &["runtime", "--bind", "127.0.0.1:0", "--runtime-id", "rt-lab", "--memory", "--token-env", "LEAK_LAB"],
        &[TOKENS[0]],
    );
    let mut mock = Server::new();
    let leaky = json!({"error":{"code":"store_io","message":format!("failed at {} with {} from host", mock.url(), TOKENS[1].1)}});
    mock.mock("GET", "/v1/runtime")
        .with_body(json!({"runtime":{"runtime_id":mock.url(),"display_name":TOKENS[1].1,"backend":"memory","status":"running","worker_count":0,
            "limits":{"max_transcript_projection_items":256,"max_event_batch_items":256},"profiles":[mock.url()]}}).to_string())
        .create();
    mock.mock("GET", mockito::Matcher::Regex("^/v1/workers/[^/]+$".into()))
        .with_status(500)
        .with_body(leaky.to_string())
        .create();
    let wrong_types = json!({"transcript":{"start": mock.url(), "limit": TOKENS[1].1, "items": [mock.url()]}});
    mock.mock("GET", mockito::Matcher::Regex("^/v1/workers/.+/transcript".into()))
        .with_body(wrong_types.to_string())
        .create();
    mock.mock("GET", "/v1/workers").with_status(401).with_body(leaky.to_string()).create();
    mock.mock("POST", mockito::Matcher::Any).with_body(format!("<html>{} {}</html>", mock.url(), TOKENS[1].1)).create();
    let deaf = TcpListener::bind("127.0.0.1:0").unwrap();
    let deaf_addr = deaf.local_addr().unwrap().to_string();
    let config = write_config(
        "leak",
        &format!(
            r#"
[server]
bind = "127.0.0.1:0"

[[runtimes]]
id = "local"
kind = "embedded"
store = "memory"

[[runtimes]]
id = "lab"
kind = "remote"
base_url = "{lab}"
token_env = "LEAK_LAB"

[[runtimes]]
id = "mock"
kind = "remote"
base_url = "{mock}"
token_env = "LEAK_MOCK"

[[runtimes]]
id = "deaf"
kind = "remote"
base_url = "http://{deaf_addr}"
token_env = "LEAK_DEAF"
read_timeout_ms = 300
write_timeout_ms = 300
probe_timeout_ms = 300

[[runtimes]]
id = "ghost"
kind = "remote"
base_url = "http://ghost-host-4d2c.invalid:47613/prefix"
token_env = "LEAK_GHOST"
connect_timeout_ms = 300
"#,
            lab = lab.base,
            mock = mock.url()
        ),
    );
    let mut gw = Process::start_with_env(
        &["serve", "--config", config.to_str().unwrap()],
        &[TOKENS[0], TOKENS[1], TOKENS[2], TOKENS[3], ("RUST_LOG", "debug")],
    );
    wait_health(&gw.base, "lab", "healthy");
    wait_health(&gw.base, "deaf", "unreachable");
    wait_health(&gw.base, "ghost", "unreachable");

    let mut seen_text = String::new();
    let lab_worker = create_worker_on(&gw.base, "lab", "echo");
    for rid in ["local", "lab", "mock", "deaf", "ghost", "missing"] {
        let wid = if rid == "lab" { lab_worker.as_str() } else { "worker-00000001" };
        let w = format!("/api/runtimes/{rid}/workers/{wid}");
        let calls: Vec<(&str, String, Option<serde_json::Value>)> = vec![
            ("GET", format!("/api/runtimes/{rid}"), None),
            ("GET", format!("/api/runtimes/{rid}/workers"), None),
            ("POST", format!("/api/runtimes/{rid}/workers"), Some(json!({"profile":"echo"}))),
            ("POST", format!("/api/runtimes/{rid}/workers"), Some(json!({"profile":"nope"}))),
            ("GET", w.clone(), None),
            ("POST", format!("{w}/input"), Some(json!({"content":"hello"}))),
            ("POST", format!("{w}/input"), Some(json!({"content":" "}))),
            ("GET", format!("{w}/transcript?limit=1"), None),
            ("GET", format!("{w}/transcript?limit=9999"), None),
            ("POST", format!("{w}/stop"), Some(json!({}))),
            ("POST", format!("{w}/cancel"), Some(json!({}))),
            ("GET", format!("/api/runtimes/{rid}/workers/bad%2Fid"), None),
            ("DELETE", w.clone(), None),
        ];
        for (method, path, body) in calls {
            seen_text.push_str(&seen(method, &gw.url(&path), body.as_ref()));
        }
    }
    for path in ["/api/runtimes", "/api/workers", "/readyz", "/healthz", "/metrics", "/nowhere"] {
        seen_text.push_str(&seen("GET", &gw.url(path), None));
    }
    assert!(
        seen_text.contains("remote_runtime_timeout") && seen_text.contains("remote_runtime_auth_failed"),
        "the error paths ran"
    );
    assert!(
        seen_text.contains("remote_runtime_malformed_response") && seen_text.contains("remote_runtime_unreachable")
    );

    gw.signal(libc::SIGTERM);
    gw.wait(std::time::Duration::from_secs(20));
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("access"), "the log was captured");

    let mut secrets: Vec<String> = TOKENS.iter().map(|(_, t)| t.to_string()).collect();
    secrets.extend(["ghost-host-4d2c".into(), "47613".into(), "/prefix".into()]);
    for addr in [lab.host_port().to_owned(), mock.host_with_port(), deaf_addr.clone()] {
        let port = addr.rsplit(':').next().unwrap().to_owned();
        secrets.extend([addr, format!(":{port}"), port]);
    }
    for secret in &secrets {
        assert!(!seen_text.contains(secret.as_str()), "`{secret}` reached a client:\n{seen_text}");
        assert!(!log.contains(secret.as_str()), "`{secret}` reached the log:\n{log}");
    }
}
