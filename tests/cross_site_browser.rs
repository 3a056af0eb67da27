//! A page on another site, opened in real Chromium, fires requests at a gateway with the
//! default config (no token): body-less "simple" `no-cors` POSTs at create, input, stop,
//! cancel and delete, and a preflighted DELETE. Nothing changes. Scripts without an
//! `Origin` (curl) keep working.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::browser::Driver;
use common::*;
use serde_json::json;

/// Serves `page` to every request on a port of its own (the attacker's site).
fn serve_page(page: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    port
}

#[test]
fn a_page_on_another_site_changes_nothing() {
    let Some(driver) = Driver::start() else { return };
    let gw = TestGateway::start("cross-site", &memory_config(""));
    let running = create_worker(&gw.base, "echo");
    let stopped = create_worker(&gw.base, "echo");
    let stop = post_json(&gw.url(&format!("/api/runtimes/local/workers/{stopped}/stop")), &json!({}));
    assert_eq!(stop.status, 200);
    let workers_before = get(&gw.url("/api/runtimes/local/workers")).body["items"].as_array().map_or(0, Vec::len);

    // The gateway as the attacker's page reaches it: `localhost` is another site than the
    // `127.0.0.1` the page is served from.
    let target = gw.base.replace("127.0.0.1", "localhost");
    let worker = |id: &str, action: &str| format!("{target}/api/runtimes/local/workers/{id}{action}");
    let simple = [
        format!("{target}/api/runtimes/local/workers"),
        worker(&running, "/input"),
        worker(&running, "/stop"),
        worker(&running, "/cancel"),
        worker(&stopped, ""),
    ];
    let fetches: Vec<String> = simple
        .iter()
        .map(|url| format!("fetch({url:?}, {{method: 'POST', mode: 'no-cors'}}).catch(() => null)"))
        .chain([
            format!("fetch({:?}, {{method: 'DELETE'}}).catch(() => null)", worker(&stopped, "")),
            format!(
                "fetch({:?}, {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}}, body: '{{\"content\":\"hi\"}}'}}).catch(() => null)",
                worker(&running, "/input")
            ),
        ])
        .collect();
    let page = format!(
        "<!doctype html><title>loading</title><script>Promise.all([{}]).then(() => {{ document.title = 'done'; }});</script>",
        fetches.join(", ")
    );
    let site = serve_page(page);
    driver.call("POST", "/url", json!({ "url": format!("http://127.0.0.1:{site}/") }));
    driver.wait_script("the attack to run", "return document.title === 'done'");

    let workers = get(&gw.url("/api/runtimes/local/workers")).body;
    assert_eq!(workers["items"].as_array().map_or(0, Vec::len), workers_before, "nothing was created or deleted");
    let detail = get(&gw.url(&format!("/api/runtimes/local/workers/{running}"))).body;
    assert_eq!((detail["status"].as_str(), detail["transcript_len"].as_u64()), (Some("running"), Some(0)));
    assert_eq!(get(&gw.url(&format!("/api/runtimes/local/workers/{stopped}"))).status, 200, "not deleted");
    let metrics = agent().get(&gw.url("/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    assert!(metrics.contains("status=\"403\""), "the gateway refused them itself:\n{metrics}");

    // Without an Origin, as curl and scripts send, the same requests work.
    let deleted = request("DELETE", &gw.url(&format!("/api/runtimes/local/workers/{stopped}")), &[]);
    assert_eq!(deleted.status, 200);
    let cancelled = post_json(&gw.url(&format!("/api/runtimes/local/workers/{running}/cancel")), &json!({}));
    assert_eq!(cancelled.status, 200);
}

/// The same page against a `worker-gateway runtime` without a token (allowed on loopback):
/// simple POSTs at stop, cancel and interrupt change nothing, and its event stream cannot be
/// read from the page. Programs (no `Origin`) still drive it.
#[test]
fn a_page_on_another_site_cannot_drive_or_read_a_runtime_without_a_token() {
    let Some(driver) = Driver::start() else { return };
    let rt = Process::start(&["runtime", "--memory", "--bind", "127.0.0.1:0"]);
    let create = || {
        let body = json!({"intent": {"kind": "task", "objective": "keep"}, "profile": {"kind": "runtime_default"}});
        let created = post_json(&rt.url("/v1/workers"), &body);
        assert_eq!(created.status, 200, "{:?}", created.body);
        created.body["worker"]["worker_id"].as_str().expect("an id").to_owned()
    };
    let (first, second) = (create(), create());
    let target = rt.base.replace("127.0.0.1", "localhost");
    let posts: Vec<String> = [(&first, "stop"), (&second, "cancel"), (&first, "interrupt")]
        .iter()
        .map(|(id, action)| {
            format!(
                "fetch({:?}, {{method: 'POST', mode: 'no-cors'}}).catch(() => null)",
                format!("{target}/v1/workers/{id}/{action}")
            )
        })
        .collect();
    let events = format!("{}/v1/workers/{first}/events/ws", target.replace("http://", "ws://"));
    let page = format!(
        "<!doctype html><title>loading</title><script>
         const read = new Promise((done) => {{
           const ws = new WebSocket({events:?});
           ws.onmessage = () => done(' read');
           ws.onclose = () => done('');
         }});
         Promise.all([{}]).then(() => read).then((what) => {{ document.title = 'done' + what; }});
         </script>",
        posts.join(", ")
    );
    let site = serve_page(page);
    driver.call("POST", "/url", json!({ "url": format!("http://127.0.0.1:{site}/") }));
    let title = driver.wait_script("the attack to run", "return document.title.startsWith('done') && document.title");
    assert_eq!(title, "done", "the page read nothing of the stream");
    for id in [&first, &second] {
        let worker = get(&rt.url(&format!("/v1/workers/{id}"))).body;
        assert_eq!(worker["worker"]["status"], "running", "{worker}");
    }
    let stopped = post_json(&rt.url(&format!("/v1/workers/{first}/stop")), &json!({}));
    assert_eq!((stopped.status, stopped.body["ack"]["status"].as_str()), (200, Some("stopped")), "{:?}", stopped.body);
}
