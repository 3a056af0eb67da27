//! A fuzz test: generated requests (methods, paths, headers, bodies) and WebSocket frames
//! against a gateway with an embedded and a remote runtime. Zero panics, zero 500s, the
//! process alive, no secret echoed. Fixed seed and bounded count; `FUZZ_COUNT` runs longer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const RUNTIME_TOKEN: &str = "fuzz-runtime-secret-9d1e";

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "get", "BREW"];
const SEGMENTS: &[&str] = &[
    "api",
    "runtimes",
    "local",
    "remote",
    "workers",
    "worker-00000001",
    "worker-00000002",
    "input",
    "stop",
    "cancel",
    "transcript",
    "events",
    "ws",
    "healthz",
    "readyz",
    "metrics",
    "..",
    ".",
    "%2F",
    "%00",
    "%ZZ",
    "%C3%A9",
    "",
    "x",
];
const QUERIES: &[&str] = &[
    "",
    "?start=1&limit=2",
    "?limit=abc",
    "?limit=999",
    "?cursor=bo_zz",
    "?cursor=bo_0000000000000001",
    "?token=x",
    "?&&==",
];
const HEADERS: &[&str] = &[
    "Content-Type: application/json",
    "Content-Type: text/plain",
    "Content-Type: application/json; charset=utf-8",
    "Authorization: Bearer nope",
    "Origin: https://evil.example",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Transfer-Encoding: chunked",
    "Expect: 100-continue",
    "X-Weird: \u{1}\u{7f}",
];
const BODIES: &[&str] = &[
    "",
    "{}",
    "{\"content\":\"hi\"}",
    "{\"content\":\"\"}",
    "{\"content\":5}",
    "{\"profile\":\"echo\",\"intent\":{\"kind\":\"task\",\"objective\":\"x\"}}",
    "{\"profile\":\"nope\"}",
    "{\"intent\":{\"kind\":\"alien\"}}",
    "{\"reason\":null}",
    "[1,2,3]",
    "null",
    "{\"content\":\"\\ud800\"}",
    "{",
];

fn one_request(rng: &mut Rng, addr: &str) -> Vec<u8> {
    let method = rng.pick(METHODS);
    let depth = 1 + rng.below(7);
    let mut path = String::new();
    for _ in 0..depth {
        path.push('/');
        path.push_str(rng.pick(SEGMENTS));
    }
    if rng.below(10) == 0 {
        path.push_str(&format!("/{}", "z".repeat(rng.below(3000))));
    }
    path.push_str(rng.pick(QUERIES));
    let mut body: Vec<u8> = match rng.below(5) {
        0 => rng.bytes(2048),
        _ => rng.pick(BODIES).as_bytes().to_vec(),
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for _ in 0..rng.below(4) {
        head.push_str(rng.pick(HEADERS));
        head.push_str("\r\n");
    }
    if head.contains("Transfer-Encoding") {
        let chunk = format!("{:x}\r\n", body.len()).into_bytes();
        body = [chunk, body, b"\r\n0\r\n\r\n".to_vec()].concat();
    } else {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    [head.into_bytes(), body].concat()
}

fn send(addr: &str, request: &[u8]) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn generated_requests_never_crash_or_500_or_leak() {
    let count: usize = std::env::var("FUZZ_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
    let rt = Process::start_with_env(
        &["runtime", "--bind", "127.0.0.1:0", "--memory", "--token-env", "FUZZ_RT"],
        &[("FUZZ_RT", RUNTIME_TOKEN)],
    );
    let config = write_config(
        "fuzz",
        &memory_config(&format!(
            "[[runtimes]]\nid = \"remote\"\nkind = \"remote\"\nbase_url = \"{}\"\ntoken_env = \"FUZZ_RT\"\nmax_in_flight = 2\n",
            rt.base
        )),
    );
    let mut gw =
        Process::start_with_env(&["serve", "--config", config.to_str().unwrap()], &[("FUZZ_RT", RUNTIME_TOKEN)]);
    wait_health(&gw.base, "remote", "healthy");
    create_worker(&gw.base, "echo");
    create_worker_on(&gw.base, "remote", "echo");
    let addr = gw.host_port().to_owned();
    let secrets = [RUNTIME_TOKEN.to_owned(), rt.host_port().to_owned()];
    let mut rng = Rng(0x5EED_2026_1124);
    for i in 0..count {
        let request = one_request(&mut rng, &addr);
        let answer = send(&addr, &request);
        assert!(
            !answer.starts_with("HTTP/1.1 500"),
            "request {i} got a 500:\n{}\n---\n{answer}",
            String::from_utf8_lossy(&request)
        );
        for secret in &secrets {
            assert!(!answer.contains(secret.as_str()), "request {i} leaked `{secret}`");
        }
        if answer.starts_with("HTTP/1.1 101") {
            fuzz_frames(&mut rng, &addr, &request);
        }
    }
    assert!(gw.child.try_wait().unwrap().is_none(), "alive; stderr:\n{}", gw.stderr.lock().unwrap());
    assert_eq!(get(&gw.url("/healthz")).status, 200);
    let log = gw.stderr.lock().unwrap().clone();
    assert!(!log.contains("panicked"), "no panic in the log");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()));
    }
}

/// Opens the same upgrade again and sends random WebSocket frames (masked, as a client must).
fn fuzz_frames(rng: &mut Rng, addr: &str, request: &[u8]) {
    let Ok(mut s) = TcpStream::connect(addr) else { return };
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let _ = s.write_all(request);
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
    for _ in 0..rng.below(6) {
        let opcode = [0x1u8, 0x2, 0x8, 0x9, 0xA, 0x3, 0xF][rng.below(7)];
        let payload = rng.bytes(200);
        let mut frame = vec![0x80 | opcode, 0x80 | payload.len().min(125) as u8];
        let mask = [1u8, 2, 3, 4];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().take(125).enumerate().map(|(i, b)| b ^ mask[i % 4]));
        if rng.below(4) == 0 {
            frame = rng.bytes(64); // garbage
        }
        let _ = s.write_all(&frame);
    }
    let _ = s.read(&mut buf);
}
