//! The shared HTTP stack with a stand-in service: queue overflow and handler panics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use worker_gateway::config::ServerConfig;
use worker_gateway::http::{ApiError, HttpServer, Incoming, Reply, Service};

/// Blocks every `/slow` request until the gate opens; `/panic` panics.
struct Gated {
    entered: Sender<()>,
    gate: Receiver<()>,
}

impl Service for Gated {
    fn handle(&self, request: &mut Incoming) -> Result<Reply, ApiError> {
        match request.url() {
            "/panic" => panic!("handler bug"),
            "/slow" => {
                let _ = self.entered.send(());
                let _ = self.gate.recv_timeout(Duration::from_secs(20));
                Ok(Reply::json(200, &serde_json::json!({"ok": true})))
            }
            _ => Ok(Reply::json(200, &serde_json::json!({"fast": true}))),
        }
    }
}

fn server_config(threads: usize, queue: usize) -> ServerConfig {
    ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        threads,
        queue,
        max_body_bytes: 1024,
        max_pending_response_bytes: 1 << 20,
        max_ws_sessions: 8,
        token: None,
        allowed_origins: vec![],
        allowed_hosts: vec![],
        shutdown_grace: Duration::from_secs(5),
        relay: Default::default(),
        tls_cert_file: None,
        tls_key_file: None,
    }
}

#[test]
fn a_full_queue_answers_503_at_once_and_loses_nothing() {
    let (entered_tx, entered) = bounded(16);
    let (open, gate) = bounded(16);
    let mut server =
        HttpServer::start(&server_config(2, 2), Arc::new(Gated { entered: entered_tx, gate }), Arc::default()).unwrap();
    let url = format!("http://{}/slow", server.addr());
    let (results_tx, results) = bounded::<(u16, Option<String>)>(16);
    let send = |n: usize| {
        for _ in 0..n {
            let (url, tx) = (url.clone(), results_tx.clone());
            std::thread::spawn(move || {
                let resp = common::agent().get(&url).call().expect("answered");
                let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                let _ = tx.send((resp.status().as_u16(), retry));
            });
        }
    };
    send(2);
    for _ in 0..2 {
        entered.recv_timeout(Duration::from_secs(10)).expect("both handlers busy");
    }
    // Both handlers are blocked: of eight more requests exactly two fit the queue, and the
    // other six are rejected at once, while the gate is still closed.
    send(8);
    for _ in 0..6 {
        let (status, retry) = results.recv_timeout(Duration::from_secs(10)).expect("rejections arrive before release");
        assert_eq!((status, retry.as_deref()), (503, Some("1")));
    }
    for _ in 0..4 {
        open.send(()).unwrap();
    }
    for _ in 0..4 {
        let (status, _) = results.recv_timeout(Duration::from_secs(10)).expect("queued requests are served");
        assert_eq!(status, 200);
    }
    assert!(server.shutdown(Duration::from_secs(5)));
}

#[test]
fn a_panicking_handler_is_a_500_and_the_server_goes_on() {
    let (entered, _e) = bounded(16);
    let (_open, gate) = bounded(16);
    let server = HttpServer::start(&server_config(1, 4), Arc::new(Gated { entered, gate }), Arc::default()).unwrap();
    for _ in 0..3 {
        let mut resp = common::agent().get(&format!("http://{}/panic", server.addr())).call().unwrap();
        assert_eq!(resp.status().as_u16(), 500);
        let body: serde_json::Value = resp.body_mut().read_json().unwrap();
        assert_eq!(body["error"]["code"], "internal");
    }
    let resp = common::agent().get(&format!("http://{}/fast", server.addr())).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the single pool thread survived");
}

/// Upgrades every request (takes it) and answers nothing itself.
struct Upgrading;

impl Service for Upgrading {
    fn handle(&self, request: &mut Incoming) -> Result<Reply, ApiError> {
        drop(request.take());
        Ok(Reply::bytes(101, "text/plain", ""))
    }
}

#[test]
fn taken_requests_do_not_cost_pool_threads() {
    let server = HttpServer::start(&server_config(2, 4), Arc::new(Upgrading), Arc::default()).unwrap();
    for _ in 0..10 {
        // Each request is taken and dropped (tiny_http answers 500 for a dropped request).
        let resp = common::agent().get(&format!("http://{}/x", server.addr())).call();
        assert!(resp.is_ok(), "request answered: the two pool threads are alive");
    }
}
