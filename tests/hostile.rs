//! Hostile input and resource exhaustion against the real binary: the process must stay
//! alive and keep answering.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn gateway(name: &str, extra: &str) -> Process {
    let config =
        write_config(name, &memory_config(extra).replace("threads = 4\n", "threads = 4\nmax_ws_sessions = 64\n"));
    Process::start(&["serve", "--config", config.to_str().unwrap()])
}

/// Sends raw bytes and returns what came back before the server closed or 5 s passed.
fn raw(addr: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn alive(gw: &mut Process) {
    assert!(gw.child.try_wait().unwrap().is_none(), "the process died; stderr:\n{}", gw.stderr.lock().unwrap());
    assert_eq!(get(&gw.url("/healthz")).status, 200);
}

#[test]
fn huge_declared_bodies_do_not_kill_the_process() {
    let mut gw = gateway("huge", "");
    let addr = gw.host_port().to_owned();
    for length in ["1099511627776", "18446744073709551615", "9223372036854775807", "67108864", "2000000"] {
        for (method, path) in [
            ("POST", "/api/runtimes/local/workers"),
            ("POST", "/api/nowhere"),
            ("GET", "/healthz"),
            ("PUT", "/api/runtimes"),
        ] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"a\":"
            );
            let answer = raw(&addr, request.as_bytes());
            assert!(answer.starts_with("HTTP/1.1 "), "{length} {method} {path}: {answer:?}");
            alive(&mut gw);
        }
    }
    let over = raw(&addr, format!("POST /api/runtimes/local/workers HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 1099511627776\r\n\r\n").as_bytes());
    assert!(over.starts_with("HTTP/1.1 413"), "{over}");
    assert!(over.contains("payload_too_large"));
}

#[test]
fn idle_and_slowloris_connections_do_not_lock_out_new_clients() {
    let mut gw = gateway("slowloris", "");
    let addr = gw.host_port().to_owned();
    let idle: Vec<TcpStream> = (0..500).map(|_| TcpStream::connect(&addr).expect("idle connection")).collect();
    let mut slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("slow connection");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    for round in 0..3 {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
        let started = Instant::now();
        assert_eq!(get(&gw.url("/api/runtimes")).status, 200, "round {round}");
        assert!(started.elapsed() < Duration::from_secs(2), "answered promptly: {:?}", started.elapsed());
    }
    alive(&mut gw);
    drop((idle, slow));
}

#[test]
fn clients_that_never_read_do_not_stall_the_pool() {
    let config = memory_config("").replace("threads = 4", "threads = 2\nmax_body_bytes = 4194304");
    let config = write_config("noread", &config);
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    let wid = create_worker(&gw.base, "echo");
    // A transcript of about 6 MB: more than loopback's send buffer (~2 MB) absorbs.
    let big = "x".repeat(1 << 20);
    for _ in 0..3 {
        assert_eq!(
            post_json(&gw.url(&format!("/api/runtimes/local/workers/{wid}/input")), &json!({"content": big})).status,
            200
        );
    }
    wait_transcript(&gw.base, &wid, 6);
    let served_before = series(&gw, TRANSCRIPTS_SERVED).expect("metrics");
    let addr = gw.host_port().to_owned();
    // Eight clients with tiny receive buffers ask for the 6 MB transcript and never read.
    let stuck: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            let size: libc::c_int = 4096;
            // SAFETY (test): setsockopt with a live int on our own socket.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    4,
                );
            }
            s.write_all(
                format!("GET /api/runtimes/local/workers/{wid}/transcript HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
            )
            .unwrap();
            s
        })
        .collect();
    wait_for("the eight transcripts to be answered", Duration::from_secs(20), || {
        (series(&gw, TRANSCRIPTS_SERVED)? >= served_before + 8).then_some(())
    });
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(&gw.url(&format!("/api/runtimes/local/workers/{wid}"))).status, 200);
        // A held pool would answer only after the 30 s socket timeout; 5 s leaves room for a busy CI.
        assert!(started.elapsed() < Duration::from_secs(5), "the two pool threads are free");
    }
    drop(stuck);
}

const TRANSCRIPTS_SERVED: &str = "worker_gateway_http_requests_total{route=\"transcript\",status=\"200\"}";

/// The value of one metrics series (0 when it has no sample yet); None when /metrics fails.
fn series(gw: &Process, name: &str) -> Option<u64> {
    let text = agent().get(&gw.url("/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
    let value = text.lines().find_map(|line| line.strip_prefix(name)?.trim().parse().ok());
    Some(value.unwrap_or(0))
}

#[test]
fn the_server_recovers_after_descriptors_run_out() {
    let config = write_config("emfile", &memory_config(""));
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"));
    command.args(["serve", "--config", config.to_str().unwrap()]);
    // SAFETY (test): setrlimit in the child before exec; async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 96, rlim_max: 96 };
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let mut gw = Process::start_command(command);
    let addr = gw.host_port().to_owned();
    // Exhaust the descriptors: tiny_http's acceptor dies on EMFILE.
    let mut hogs = Vec::new();
    for _ in 0..200 {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(500)) {
            Ok(s) => hogs.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(hogs); // descriptors are free again
    wait_for("the server to answer again", Duration::from_secs(20), || {
        let ok = agent().get(&gw.url("/healthz")).call().map(|r| r.status() == 200).unwrap_or(false);
        ok.then_some(())
    });
    alive(&mut gw);
    assert!(create_worker(&gw.base, "echo").ends_with("-00000001"), "the first worker of this boot");
    let metrics = agent().get(&gw.url("/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(!metrics.contains("worker_gateway_http_rebinds_total 0"), "the acceptor died and was rebound:\n{metrics}");
}

#[test]
fn sigterm_closes_event_streams_with_1001_and_exits_zero() {
    let mut gw = gateway("sigterm-ws", "");
    let wid = create_worker(&gw.base, "echo");
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut streams: Vec<Ws> = (0..3).map(|_| ws_connect(&url, &[]).unwrap()).collect();
    for s in &mut streams {
        next_frame(s);
    }
    gw.signal(libc::SIGTERM);
    for s in &mut streams {
        let (_, code) = close_reason(s);
        assert_eq!(code, Some(1001));
    }
    assert_eq!(gw.wait(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn metrics_count_requests_streams_and_upstream_errors() {
    let (port, _refusing) = refusing_port();
    let gw = gateway(
        "metrics",
        &format!(
            "[[runtimes]]\nid = \"gone\"\nkind = \"remote\"\nbase_url = \"http://127.0.0.1:{port}\"\nmax_in_flight = 2\n"
        ),
    );
    let wid = create_worker(&gw.base, "echo");
    assert_eq!(get(&gw.url("/api/runtimes/gone/workers")).status, 502);
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).unwrap();
    next_frame(&mut ws);
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{wid}/input")), &json!({"content":"count me"}));
    next_frame(&mut ws);
    let mut resp = agent().get(&gw.url("/metrics")).call().unwrap();
    let text = resp.body_mut().read_to_string().unwrap();
    for needle in [
        "worker_gateway_http_requests_total{route=\"runtime_workers\",status=\"201\"} 1",
        "worker_gateway_http_requests_total{route=\"runtime_workers\",status=\"502\"} 1",
        "worker_gateway_upstream_errors_total{runtime=\"gone\",code=\"remote_runtime_unreachable\"}",
        "worker_gateway_runtime_in_flight{runtime=\"gone\"} 0",
        "worker_gateway_ws_sessions 1",
        "worker_gateway_relay_upstreams 1",
        "worker_gateway_http_queue_depth 0",
        "worker_gateway_relay_events_total",
        "worker_gateway_relay_gaps_total 0",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    assert!(!text.contains(&port.to_string()), "no backend detail in metrics");
    // The text format: one TYPE line per family, then all of its samples together.
    let mut seen = std::collections::HashSet::new();
    let mut current = String::new();
    for line in text.lines() {
        let family = match line.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next().unwrap_or_default(),
            None => line.split(['{', ' ']).next().unwrap_or_default(),
        };
        if family != current {
            assert!(line.starts_with("# TYPE "), "`{line}` is not under its family's TYPE line:\n{text}");
            assert!(seen.insert(family.to_owned()), "family {family} appears twice:\n{text}");
            current = family.to_owned();
        }
    }
}

#[test]
fn browsers_that_leave_during_the_upgrade_are_not_server_errors() {
    let mut gw = gateway("upgrade-reset", "");
    let wid = create_worker(&gw.base, "echo");
    let addr = gw.host_port().to_owned();
    let upgrade = format!(
        "GET /api/runtimes/local/workers/{wid}/events/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let ask_and_reset = || {
        let s = TcpStream::connect(&addr).expect("connect");
        (&s).write_all(upgrade.as_bytes()).expect("send");
        // Closed with a reset right after asking: most are gone before the request is read,
        // some while the gateway answers with its 101.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY (test): setsockopt on a socket this test owns, with a live `linger`.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    };
    // Until a few upgrades have met a connection already gone (any answer but a 101).
    let metrics = wait_for("upgrades that met a reset", Duration::from_secs(30), || {
        (0..20).for_each(|_| ask_and_reset());
        let text = agent().get(&gw.url("/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
        let failed: u64 = text
            .lines()
            .filter(|l| l.starts_with("worker_gateway_http_requests_total{route=\"events\""))
            .filter(|l| !l.contains("status=\"101\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        (failed >= 5).then_some(text)
    });
    alive(&mut gw);
    let errors: Vec<&str> = metrics.lines().filter(|l| l.contains("status=\"500\"")).collect();
    assert!(errors.is_empty(), "a client leaving is not a server error: {errors:?}");
    // Browsers that stay still get their stream.
    let url = format!("{}/api/runtimes/local/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
    let mut ws = ws_connect(&url, &[]).expect("a browser that stays is served");
    assert!(next_frame(&mut ws).is_object());
}

/// A runtime without a token answers only its own names (a page whose name was rebound to
/// 127.0.0.1 could otherwise read its workers), and no request a browser sends for a page;
/// an address typed into the browser (`Sec-Fetch-Site: none`) and programs still work. One
/// with a token answers any name: the token is what a rebound page lacks.
#[test]
fn a_runtime_without_a_token_answers_only_its_own_names_and_no_web_page() {
    let rt = Process::start(&["runtime", "--memory", "--bind", "127.0.0.1:0"]);
    let status = |method: &str, path: &str, headers: &[(&str, &str)]| request(method, &rt.url(path), headers);
    let rebound = status("GET", "/v1/workers", &[("host", "rebind.example")]);
    assert_eq!((rebound.status, rebound.code()), (403, "forbidden_host"), "{:?}", rebound.body);
    for page in [&[("origin", "https://evil.example")][..], &[("sec-fetch-site", "cross-site")][..]] {
        let refused = status("GET", "/v1/runtime", page);
        assert_eq!((refused.status, refused.code()), (403, "forbidden_origin"), "{page:?}: {:?}", refused.body);
    }
    assert_eq!(status("GET", "/v1/runtime", &[("sec-fetch-site", "none"), ("host", "localhost")]).status, 200);
    // A second header of either kind would pass unread.
    let twice = status("GET", "/v1/runtime", &[("sec-fetch-site", "none"), ("sec-fetch-site", "cross-site")]);
    assert_eq!((twice.status, twice.code()), (403, "forbidden_origin"));
    let twice = raw(
        rt.host_port(),
        b"GET /v1/runtime HTTP/1.1\r\nHost: localhost\r\nHost: rebind.example\r\nConnection: close\r\n\r\n",
    );
    assert!(twice.starts_with("HTTP/1.1 403") && twice.contains("forbidden_host"), "{twice}");
    assert_eq!(status("GET", "/v1/runtime", &[]).status, 200);

    let with_token = Process::start_with_env(
        &["runtime", "--memory", "--bind", "127.0.0.1:0", "--token-env", "RT_T"],
        &[("RT_T", "t")],
    );
    let named =
        request("GET", &with_token.url("/v1/runtime"), &[("host", "rt.example"), ("authorization", "Bearer t")]);
    assert_eq!(named.status, 200, "{:?}", named.body);
}

/// The Runtime API asks for `Content-Type: application/json` on create and input only: a
/// stop or cancel body (empty, `{}` or `{"reason":…}`) is read whatever its type, as
/// `curl -d '{}'` sends it.
#[test]
fn the_runtime_reads_stop_and_cancel_bodies_whatever_their_content_type() {
    let rt = Process::start(&["runtime", "--memory", "--bind", "127.0.0.1:0"]);
    let create = json!({"intent": {"kind": "task", "objective": "x"}, "profile": {"kind": "runtime_default"}});
    let typed = |path: &str, content_type: &str, body: &str| post_raw(&rt.url(path), Some(content_type), body);
    let untyped = typed("/v1/workers", "text/plain", &create.to_string());
    assert_eq!((untyped.status, untyped.code()), (400, "invalid_json"), "create asks for the type");
    let mut ids = (0..2).map(|_| post_json(&rt.url("/v1/workers"), &create).body["worker"]["worker_id"].clone());
    let (first, second) = (ids.next().unwrap(), ids.next().unwrap());
    let (first, second) = (first.as_str().unwrap(), second.as_str().unwrap());
    let form = "application/x-www-form-urlencoded";
    let stopped = typed(&format!("/v1/workers/{first}/stop"), form, "{}");
    assert_eq!((stopped.status, &stopped.body["ack"]["status"]), (200, &json!("stopped")), "{:?}", stopped.body);
    let cancelled = typed(&format!("/v1/workers/{second}/cancel"), "text/plain", r#"{"reason":"enough"}"#);
    assert_eq!(
        (cancelled.status, &cancelled.body["ack"]["status"]),
        (200, &json!("cancelled")),
        "{:?}",
        cancelled.body
    );
}
