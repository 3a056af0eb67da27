//! An attacker on the same machine, against the real binary: huge declared bodies, request
//! smuggling, slowloris, clients that never read, log injection. The server keeps
//! answering quickly, and threads, descriptors and memory return to their baseline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TOKEN: &str = "hardening-browser-token";

fn gateway(name: &str, extra_server: &str) -> Process {
    let config = memory_config("").replace("threads = 4\n", &format!("threads = 4\n{extra_server}"));
    let path = write_config(name, &config);
    Process::start_with_env(&["serve", "--config", path.to_str().unwrap()], &[("HARDENING_TOKEN", TOKEN)])
}

/// Waits until threads and descriptors are back within `slack` of `baseline`.
fn back_to_baseline(pid: u32, baseline: (usize, usize), slack: usize) -> (usize, usize) {
    let mut last = threads_and_fds(pid);
    let settled = (0..400).any(|_| {
        last = threads_and_fds(pid);
        let done = last.0 <= baseline.0 + slack && last.1 <= baseline.1 + slack;
        if !done {
            std::thread::sleep(Duration::from_millis(50));
        }
        done
    });
    assert!(settled, "threads and descriptors stayed at {last:?}, baseline {baseline:?}");
    last
}

/// The time `/healthz` takes on a fresh connection.
fn healthz_ms(gw: &Process) -> f64 {
    let started = Instant::now();
    let answer = get(&gw.url("/healthz"));
    assert_eq!(answer.status, 200);
    started.elapsed().as_secs_f64() * 1000.0
}

/// The median of a few `/healthz` timings (one slow sample on a busy CI machine is noise).
fn healthz_median_ms(gw: &Process) -> f64 {
    let mut samples: Vec<f64> = (0..7).map(|_| healthz_ms(gw)).collect();
    samples.sort_by(f64::total_cmp);
    samples[3]
}

/// Reads until the server closes the connection (or 5 s pass); returns what came.
fn read_to_close(stream: &mut TcpStream) -> (String, bool) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&out).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[test]
fn two_thousand_huge_declared_bodies_leave_nothing_behind() {
    let gw = gateway("huge-2000", "token_env = \"HARDENING_TOKEN\"\n");
    let pid = gw.child.id();
    let addr = gw.host_port().to_owned();
    assert!(healthz_ms(&gw) < 1000.0);
    let baseline = threads_and_fds(pid);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let shapes: Vec<(String, String)> = vec![
        ("POST /api/runtimes/local/workers".into(), auth.clone()),
        ("POST /api/runtimes/local/workers".into(), String::new()),
        ("POST /api/nowhere".into(), auth.clone()),
        ("PUT /no/such/path".into(), String::new()),
    ];
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (addr, shapes) = (addr.clone(), shapes.clone());
            std::thread::spawn(move || {
                let mut refused = 0;
                for i in 0..500 {
                    let (line, auth) = &shapes[(i + t) % shapes.len()];
                    let request = format!(
                        "{line} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: 1099511627776\r\n\r\n{{\"a\":"
                    );
                    let Ok(mut s) = TcpStream::connect(&addr) else { continue };
                    if s.write_all(request.as_bytes()).is_err() {
                        continue;
                    }
                    // Like the attacker, never send the body; see the answer and the close.
                    let (answer, closed) = read_to_close(&mut s);
                    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
                    assert!(answer.contains("\r\nConnection: close\r\n"), "the close is announced: {answer}");
                    assert!(closed, "the server closes a connection whose body it will not read");
                    refused += 1;
                }
                refused
            })
        })
        .collect();
    let mut answered = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        assert!(healthz_ms(&gw) < 1000.0, "the server answers throughout");
        std::thread::sleep(Duration::from_millis(100));
        assert!(started.elapsed() < Duration::from_secs(120), "2000 refusals took too long");
    }
    for w in workers {
        answered += w.join().expect("attacker thread");
    }
    assert_eq!(answered, 2000);
    let end = back_to_baseline(pid, baseline, 4);
    eprintln!("2000 huge declared bodies in {:?}: (threads, fds) {baseline:?} → {end:?}", started.elapsed());
}

/// The hidden request of every smuggling attempt: it would create a worker.
const HIDDEN: &str = "POST /api/runtimes/local/workers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n";

fn worker_count(gw: &Process) -> usize {
    get(&gw.url("/api/runtimes/local/workers")).body["items"].as_array().map_or(0, Vec::len)
}

#[test]
fn smuggled_requests_never_run_whatever_the_spelling() {
    let gw = gateway("smuggling", "");
    let addr = gw.host_port().to_owned();
    let chunked_hidden = format!("0\r\n\r\n{HIDDEN}");
    let framings: Vec<String> = vec![
        format!("Content-Length: {}\r\nTransfer-Encoding: chunked", chunked_hidden.len()),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {}", chunked_hidden.len()),
        "Transfer-Encoding: xchunked".into(),
        "Transfer-Encoding: identity".into(),
        "Transfer-Encoding: chunked, identity".into(),
        "Transfer-Encoding: gzip, chunked".into(),
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked".into(),
        "Content-Length: 5\r\nContent-Length: 6".into(),
        "Content-Length: 5, 5".into(),
        "Content-Length: +5".into(),
        "Content-Length: -1".into(),
        "Content-Length: 0x5".into(),
        format!("Content-Length: abc\r\nTransfer-Encoding: chunked"),
    ];
    let before = worker_count(&gw);
    let mut ours = 0;
    for framing in &framings {
        let body = if framing.contains("chunked") && !framing.contains("Content-Length") {
            chunked_hidden.clone()
        } else if framing.contains("Content-Length: 5") || framing.contains("+5") {
            format!("{{}}   {HIDDEN}")
        } else {
            chunked_hidden.clone()
        };
        let request = format!(
            "POST /api/runtimes/local/workers/none/stop HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n{body}"
        );
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.write_all(request.as_bytes()).expect("send");
        let (answer, closed) = read_to_close(&mut s);
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing:?} → {answer}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "one answer only for {framing:?}: {answer}");
        // Ours (tiny_http refuses some framings itself, with an empty body) announce the close.
        if answer.contains("\"invalid_request\"") {
            ours += 1;
            let head = answer.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
            assert!(head.lines().any(|l| l == "connection: close") && !head.contains("upgrade"), "{head}");
        }
        assert!(closed, "the connection is closed after {framing:?}");
    }
    assert!(ours > 0, "some framings are refused by the gateway itself");
    assert_eq!(worker_count(&gw), before, "no smuggled request ever ran");
    // Plain chunked and plain Content-Length still work.
    let mut s = TcpStream::connect(&addr).expect("connect");
    let ok = format!(
        "POST /api/runtimes/local/workers HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
    );
    s.write_all(ok.as_bytes()).expect("send");
    let (answer, _) = read_to_close(&mut s);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(worker_count(&gw), before + 1);
}

#[test]
fn three_hundred_slowloris_connections_do_not_slow_anyone_and_leave_nothing_behind() {
    let gw = gateway("slowloris", "");
    let pid = gw.child.id();
    let addr = gw.host_port().to_owned();
    let baseline = threads_and_fds(pid);
    let mut attackers: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").expect("partial head");
            s
        })
        .collect();
    for round in 0..3 {
        for s in &mut attackers {
            let _ = s.write_all(format!("X-Trickle-{round}: a\r\n").as_bytes());
        }
        let median = healthz_median_ms(&gw);
        assert!(median < 100.0, "/healthz took {median:.1} ms with 300 slowloris connections");
        let started = Instant::now();
        assert_eq!(get(&gw.url("/api/runtimes")).status, 200);
        assert!(started.elapsed() < Duration::from_millis(500), "the API answers while slowloris connections trickle");
    }
    drop(attackers);
    let end = back_to_baseline(pid, baseline, 4);
    eprintln!("300 slowloris connections: (threads, fds) {baseline:?} → {end:?}");
}

#[test]
fn clients_that_never_read_a_large_page_cannot_take_memory_or_stall_the_server() {
    let gw = gateway("never-read", "max_body_bytes = 2097152\n");
    let pid = gw.child.id();
    let wid = create_worker(&gw.base, "echo");
    let input = gw.url(&format!("/api/runtimes/local/workers/{wid}/input"));
    let chunk = "x".repeat(1 << 20);
    for _ in 0..7 {
        assert_eq!(post_json(&input, &json!({ "content": chunk })).status, 200);
    }
    let transcript = wait_transcript(&gw.base, &wid, 14);
    assert!(transcript["next_start"].is_number(), "a page stops at its byte cap: {}", transcript["next_start"]);
    let baseline_rss = status_field(pid, "VmRSS:");
    let path = format!("/api/runtimes/local/workers/{wid}/transcript");
    let mut sleepers: Vec<TcpStream> = Vec::new();
    for _ in 0..150 {
        let mut s = TcpStream::connect(gw.host_port()).expect("connect");
        s.set_nodelay(true).ok();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(request.as_bytes()).expect("send");
        sleepers.push(s); // never read
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peak = 0;
    while Instant::now() < deadline {
        peak = peak.max(status_field(pid, "VmRSS:"));
        let median = healthz_median_ms(&gw);
        assert!(median < 100.0, "/healthz took {median:.1} ms with 150 clients not reading");
    }
    assert!(peak < 256 * 1024, "RSS peaked at {} MiB (baseline {} MiB)", peak / 1024, baseline_rss / 1024);
    drop(sleepers);
    eprintln!("150 never-reading clients: RSS {} MiB → peak {} MiB", baseline_rss / 1024, peak / 1024);
}

#[test]
fn what_a_request_puts_in_the_log_is_escaped_and_capped() {
    let gw = gateway("log-injection", "");
    let addr = gw.host_port().to_owned();
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(
        format!("GET /api/\x1b[31mred{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "a".repeat(5000)).as_bytes(),
    )
    .expect("send");
    read_to_close(&mut s);
    let huge_method = "G".repeat(1 << 20);
    let mut s = TcpStream::connect(&addr).expect("connect");
    let _ = s.write_all(format!("{huge_method} /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
    read_to_close(&mut s);
    wait_for("both requests in the log", Duration::from_secs(5), || {
        let log = gw.stderr.lock().unwrap();
        (log.contains("red") && log.contains("GGGG")).then_some(())
    });
    let log = gw.stderr.lock().unwrap();
    assert!(!log.contains('\x1b'), "no terminal escape reaches the log");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1024, "a log line of {longest} bytes");
}

/// A body trickled a few bytes at a time gets a 408 within the body deadline, so a handful
/// of such clients cannot hold the request pool (each read alone would wait up to 30 s).
#[test]
fn a_trickled_body_is_cut_off_at_its_deadline() {
    let gw = gateway("trickle", "");
    let wid = create_worker(&gw.base, "echo");
    let mut stream = TcpStream::connect(gw.host_port()).expect("connect");
    let head = format!(
        "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\nConnection: close\r\n\r\n",
        gw.host_port()
    );
    stream.write_all(head.as_bytes()).expect("head");
    stream.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let started = Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        // 2 bytes every half second: each read succeeds, the body never ends.
        if stream.write_all(b"{\"").is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let (rest, _) = read_to_close(&mut stream);
    let text = String::from_utf8_lossy(&answer).into_owned() + &rest;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert_eq!(get(&gw.url("/healthz")).status, 200);
}

/// A body that stops coming altogether gets the JSON 408 at its 10 s deadline, whatever its
/// framing: a read used to wait for the connection's 30 s timeout, and tiny_http then
/// answered a bare 400 (with a length) or a late 408 (chunked).
#[test]
fn a_body_that_stops_coming_is_answered_408_at_its_deadline() {
    let gw = gateway("stopped-body", "");
    let wid = create_worker(&gw.base, "echo");
    let started = Instant::now();
    let mut streams: Vec<TcpStream> = ["Content-Length: 5000\r\n\r\n{\"content\":", "Transfer-Encoding: chunked\r\n\r\nb\r\n{\"content\":\r\n"]
        .iter()
        .map(|framing| {
            let mut stream = TcpStream::connect(gw.host_port()).expect("connect");
            let head = format!(
                "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{framing}",
                gw.host_port()
            );
            stream.write_all(head.as_bytes()).expect("head");
            stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            stream
        })
        .collect();
    for stream in &mut streams {
        let mut answer = [0u8; 4096];
        let n = stream.read(&mut answer).expect("an answer");
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("\"request_timeout\""), "{text}");
    }
    assert!(started.elapsed() < Duration::from_secs(15), "answered after {:?}", started.elapsed());
}

/// Clients holding request bodies back do not hold every handler: with its 4 handler
/// threads reading 8 such bodies (half of them chunked), the gateway answers a body still coming after a second 408
/// while others wait, and a new client's requests are answered within a few seconds (they
/// waited the whole 10 s deadline behind each round of them, 30 s before that was enforced).
#[test]
fn bodies_held_back_do_not_hold_every_handler() {
    let gw = gateway("held-bodies", "");
    let head = "POST /api/runtimes/local/workers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
    let framings =
        ["Content-Length: 5000\r\n\r\n{\"intent\":", "Transfer-Encoding: chunked\r\n\r\na\r\n{\"intent\":\r\n"];
    let held: Vec<TcpStream> = (0..8)
        .map(|n| {
            let mut stream = TcpStream::connect(gw.host_port()).expect("connect");
            stream.write_all(format!("{head}{}", framings[n % 2]).as_bytes()).expect("head");
            stream
        })
        .collect();
    for n in 0..5 {
        let started = Instant::now();
        let answer = get(&gw.url("/healthz"));
        assert_eq!(answer.status, 200, "request {n}");
        assert!(started.elapsed() < Duration::from_secs(4), "request {n} waited {:?}", started.elapsed());
    }
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("still coming after 1 s while handlers are short"), "{log}");
    drop(held);
}

/// A body that arrives slowly but whole, with pauses, is read, and its connection serves the
/// next request: the reads' shorter timeouts are the connection's own again by then.
#[test]
fn a_slow_whole_body_keeps_its_connection_usable() {
    let gw = gateway("slow-body", "");
    let wid = create_worker(&gw.base, "echo");
    let body = json!({"content": "x".repeat(3000)}).to_string();
    let mut stream = TcpStream::connect(gw.host_port()).expect("connect");
    let head = format!(
        "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        gw.host_port(),
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    for part in body.as_bytes().chunks(1500) {
        std::thread::sleep(Duration::from_millis(1200)); // longer than a stalled body's second
        stream.write_all(part).expect("part of the body");
    }
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut answer = [0u8; 4096];
    let n = stream.read(&mut answer).expect("an answer");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // The next request on the same connection, a while later.
    std::thread::sleep(Duration::from_millis(1500));
    let next = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", gw.host_port());
    stream.write_all(next.as_bytes()).expect("the next request");
    let (text, _) = read_to_close(&mut stream);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("{\"status\":\"ok\"}"), "{text}");
}

/// A chunked body sent in chunks a little more than a second apart is read whole (the decoder
/// takes up a read that timed out between chunks), and its connection ends after the answer.
#[test]
fn a_slow_whole_chunked_body_is_read() {
    let gw = gateway("slow-chunked", "");
    let wid = create_worker(&gw.base, "echo");
    let mut stream = TcpStream::connect(gw.host_port()).expect("connect");
    let head = format!(
        "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
        gw.host_port()
    );
    stream.write_all(head.as_bytes()).expect("head");
    let body = json!({"content": "y".repeat(3000)}).to_string();
    for part in body.as_bytes().chunks(1500) {
        std::thread::sleep(Duration::from_millis(1200)); // longer than a read's second
        stream.write_all(format!("{:x}\r\n", part.len()).as_bytes()).expect("a chunk's size");
        stream.write_all(part).expect("a chunk");
        stream.write_all(b"\r\n").expect("its end");
    }
    stream.write_all(b"0\r\n\r\n").expect("the last chunk");
    let (text, closed) = read_to_close(&mut stream);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    assert!(closed, "the connection ends after the answer");
}

/// Sends `head` then `filler` again and again without ever ending the head, until the server
/// cuts the connection or `most` bytes went out; returns how many went out.
fn endless_head(addr: &str, head: &str, filler: &[u8], most: usize) -> usize {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(head.as_bytes()).expect("the head's start");
    let chunk: Vec<u8> = filler.iter().copied().cycle().take(64 << 10).collect();
    let mut sent = 0;
    while sent < most {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break, // cut
        }
    }
    sent
}

#[test]
fn an_endless_request_head_is_cut_before_it_takes_the_memory() {
    let mut gw = gateway("endless-head", "");
    let pid = gw.child.id();
    let addr = gw.host_port().to_owned();
    let before = status_field(pid, "VmRSS:");
    let most = 256 << 20;
    let shapes = [
        // One header line that never ends.
        (format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-a: "), b"a".to_vec()),
        // Header lines without end (each is kept).
        (format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n"), b"X-b: b\r\n".to_vec()),
        // A request line that never ends.
        ("GET /".to_owned(), b"a".to_vec()),
    ];
    let attackers: Vec<_> = shapes
        .into_iter()
        .map(|(head, filler)| {
            let addr = addr.clone();
            std::thread::spawn(move || endless_head(&addr, &head, &filler, most))
        })
        .collect();
    let mut peak = before;
    let started = Instant::now();
    while attackers.iter().any(|a| !a.is_finished()) {
        peak = peak.max(status_field(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(20));
    }
    for attacker in attackers {
        let sent = attacker.join().expect("attacker");
        eprintln!("cut after {} MiB, {:?}", sent >> 20, started.elapsed());
        assert!(sent < most, "the server cut the connection (after {} MiB)", sent >> 20);
    }
    assert!(gw.child.try_wait().expect("status").is_none(), "the gateway lives");
    assert!(healthz_ms(&gw) < 1000.0);
    eprintln!("RSS {before} KiB → peak {peak} KiB");
    assert!(peak < before + (256 << 10), "RSS {before} KiB → peak {peak} KiB");
    let metrics = agent().get(&gw.url("/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    assert!(metrics.contains("worker_gateway_http_connections_cut_total 3\n"), "{metrics}");
    // A body as large as the server takes still goes through, unanswered until it is whole.
    let body = format!("{{\"content\":\"{}\"}}", "x".repeat((1 << 20) - 20));
    let created = post_json(&gw.url("/api/runtimes/local/workers"), &json!({}));
    let wid = created.body["worker"]["worker_id"].as_str().expect("worker").to_owned();
    let mut s = TcpStream::connect(&addr).expect("connect");
    let request = format!(
        "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).expect("send");
    let (answer, _) = read_to_close(&mut s);
    eprintln!("body answered at {:?}", started.elapsed());
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..answer.len().min(300)]);
}

/// A client pipelining requests for pages just under the size written off the handler
/// threads (the dashboard, 64 KB), never reading the answers: each answer waited in turn
/// behind one it did not read, holding a handler thread, until every thread and the queue
/// were its and every other client got 503 for as long as it stayed. A connection has at
/// most 8 requests in the pool; the rest wait in the acceptor, and past 256 waiting the
/// connection is cut. Others are answered throughout, and nothing takes a thread each.
#[test]
fn a_client_pipelining_without_reading_its_answers_cannot_take_the_pool() {
    let gw = gateway("pipeline-noread", "");
    let pid = gw.child.id();
    let addr = gw.host_port().to_owned();
    let page = get(&gw.url("/"));
    assert_eq!(page.status, 200);
    let flood = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(2000);
    let mut attacker = TcpStream::connect(&addr).expect("connect");
    attacker.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = attacker.write_all(flood.as_bytes()); // read by the server, answers never read
    let started = Instant::now();
    let mut most_threads = 0;
    while started.elapsed() < Duration::from_secs(3) {
        assert!(healthz_ms(&gw) < 1000.0, "others are answered");
        most_threads = most_threads.max(threads_and_fds(pid).0);
    }
    assert!(most_threads < 100, "{most_threads} threads");
    let metrics = agent().get(&gw.url("/metrics")).call().expect("metrics").body_mut().read_to_string().expect("text");
    assert!(metrics.contains("worker_gateway_http_connections_cut_total 1\n"), "{metrics}");
    let log = gw.stderr.lock().unwrap().clone();
    assert_eq!(log.matches("requests sent without reading their answers").count(), 1, "one line: {log}");
    drop(attacker);
}

/// Several connections each pipelining a few dozen requests without reading the answers
/// (too few to be cut for what they send) hold their share of the handler threads each,
/// with answers that cannot be written, for up to the 30 s write timeout. While other
/// requests wait for a handler, the guard cuts them; others are answered throughout.
#[test]
fn connections_holding_handlers_with_answers_they_do_not_read_are_cut_when_others_wait() {
    let gw = gateway("pipeline-many", "");
    let addr = gw.host_port().to_owned();
    assert_eq!(get(&gw.url("/")).status, 200);
    let flood = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(100);
    let attackers: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(flood.as_bytes()).expect("send");
            s
        })
        .collect();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert!(healthz_ms(&gw) < 1000.0, "others are answered");
    }
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("requests whose answers it does not read, while others wait for a handler"), "{log}");
    drop(attackers);
}

/// A client that pipelines and reads its answers as they come gets every one, in order,
/// however deep its pipeline (it was cut past 16 requests in flight, with inputs applied
/// and never answered), and its inputs are recorded in the order it sent them (they ran at
/// once, and were recorded in either order).
#[test]
fn a_client_pipelining_and_reading_its_answers_gets_every_one() {
    let gw = gateway("pipeline-reads", "");
    let addr = gw.host_port().to_owned();
    let wid = post_json(&gw.url("/api/runtimes/local/workers"), &json!({})).body["worker"]["worker_id"]
        .as_str()
        .expect("worker")
        .to_owned();
    let input = |n: usize| {
        let body = format!("{{\"content\":\"n{n}\"}}");
        format!(
            "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut pipeline: String =
        (0..60).map(|n| input(n) + &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n")).collect();
    pipeline.push_str(&format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"));
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(pipeline.as_bytes()).expect("send");
    let (answers, closed) = read_to_close(&mut s);
    assert!(closed, "the last request closes the connection");
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 121, "every answer: {}", &answers[..answers.len().min(500)]);
    let acks: Vec<u64> = answers
        .split("\r\n\r\n")
        .filter_map(|part| serde_json::from_str::<serde_json::Value>(part.split("HTTP/1.1").next()?).ok())
        .filter_map(|v| v["ack"]["transcript_sequence"].as_u64())
        .collect();
    assert_eq!(acks.len(), 60, "an ack for each input");
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "in order: {acks:?}");
}

/// Requests pipelined behind a refused one are refused too, on one thread for the
/// connection: a thread each took thousands of threads for one connection (and, from a few
/// connections reconnecting, the process past its limit).
#[test]
fn requests_behind_a_refused_one_are_refused_on_one_thread() {
    let gw = gateway("refused-flood", "");
    let pid = gw.child.id();
    let addr = gw.host_port().to_owned();
    let refused = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n");
    let behind = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(3000);
    let mut s = TcpStream::connect(&addr).expect("connect");
    let _ = s.write_all((refused + &behind).as_bytes());
    let (answer, _) = read_to_close(&mut s);
    assert!(answer.starts_with("HTTP/1.1 400"), "{}", &answer[..answer.len().min(300)]);
    let watched = Instant::now();
    let mut most_threads = 0;
    while watched.elapsed() < Duration::from_secs(1) {
        most_threads = most_threads.max(threads_and_fds(pid).0);
    }
    assert!(most_threads < 100, "{most_threads} threads");
    let log = gw.stderr.lock().unwrap().clone();
    assert_eq!(log.matches(" refused: ").count(), 1, "one line for the connection: {log}");
    assert!(healthz_ms(&gw) < 1000.0);
}

/// A gateway whose remote runtime `m` never answers (it gives up after `read_timeout_ms`),
/// and what keeps that runtime's connections open.
fn gateway_before_a_hung_runtime(
    name: &str,
    read_timeout_ms: u64,
) -> (Process, crossbeam_channel::Receiver<TcpStream>) {
    let (url, held) = black_hole();
    let remote = format!(
        "[[runtimes]]\nid = \"m\"\nkind = \"remote\"\nbase_url = \"{url}\"\nread_timeout_ms = {read_timeout_ms}\n\
         probe_timeout_ms = 20000\nprobe_interval_ms = 60000\n"
    );
    let path = write_config(name, &memory_config(&remote).replace("threads = 4\n", ""));
    (Process::start(&["serve", "--config", path.to_str().unwrap()]), held)
}

/// A request refused behind a slower one on the same connection (pipelined) is answered in
/// its turn, after the slower one's answer, and the acceptor keeps serving everyone else
/// meanwhile.
#[test]
fn a_refusal_behind_a_slower_pipelined_request_waits_its_turn_and_holds_no_one() {
    let (gw, _held) = gateway_before_a_hung_runtime("pipelined-refusal", 1500);
    let addr = gw.host_port().to_owned();
    let mut s = TcpStream::connect(&addr).expect("connect");
    let slow = format!("GET /api/runtimes/m/workers HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let refused = format!(
        "POST /api/runtimes/local/workers HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"
    );
    s.write_all(format!("{slow}{refused}").as_bytes()).expect("send both");
    // While the first waits on the runtime, others are served at once.
    wait_for("the refusal", Duration::from_secs(5), || {
        gw.stderr.lock().ok()?.contains("refused: Content-Length must be one plain number").then_some(())
    });
    assert!(healthz_ms(&gw) < 500.0, "the acceptor is not held");
    let (answer, closed) = read_to_close(&mut s);
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| r.get(..3).unwrap_or(r)).collect();
    assert_eq!(statuses, ["504", "400"], "{answer}");
    assert!(closed);
}

/// A request pipelined behind a refused one never runs, however long the answers before the
/// refusal take: the connection was remembered as refused for 5 s only, and a request read
/// after that (the refused one's body is read when its answer goes, behind a slow one) ran.
#[test]
fn a_request_smuggled_behind_a_refusal_never_runs_however_late_it_is_read() {
    let (gw, _held) = gateway_before_a_hung_runtime("late-smuggling", 6500);
    let addr = gw.host_port().to_owned();
    let wid = post_json(&gw.url("/api/runtimes/local/workers"), &json!({})).body["worker"]["worker_id"]
        .as_str()
        .expect("worker")
        .to_owned();
    let slow = format!("GET /api/runtimes/m/workers HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let refused = format!(
        "POST /api/runtimes/local/workers HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"
    );
    let padding = "x".repeat(2048);
    let behind = format!(
        "POST /api/runtimes/local/workers HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{padding}",
        padding.len()
    );
    let body = r#"{"content":"SMUGGLED"}"#;
    let smuggled = format!(
        "POST /api/runtimes/local/workers/{wid}/input HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(format!("{slow}{refused}{behind}{smuggled}").as_bytes()).expect("send");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| r.get(..3).unwrap_or(r)).collect();
    assert_eq!(statuses, ["504", "400"], "{answer}");
    // What the connection still held was read once the refusal went: past 5 s after it.
    std::thread::sleep(Duration::from_secs(1));
    let transcript = get(&gw.url(&format!("/api/runtimes/local/workers/{wid}/transcript"))).body;
    assert!(!transcript.to_string().contains("SMUGGLED"), "{transcript}");
    let log = gw.stderr.lock().unwrap().clone();
    assert!(!log.contains(&format!("POST /api/runtimes/local/workers/{wid}/input 200")), "{log}");
}

/// Heads kept under any body's size but made of tiny header lines, which the HTTP layer
/// keeps a record of each (about 20 times their bytes): cut, not left to hold the memory.
#[test]
fn heads_of_tiny_header_lines_are_cut_too() {
    let gw = gateway("tiny-headers", "");
    let pid = gw.child.id();
    let addr = gw.host_port().to_owned();
    let before = status_field(pid, "VmRSS:");
    let lines: Vec<u8> = b"a:b\r\n".iter().copied().cycle().take(1 << 20).collect();
    let attackers: Vec<_> = (0..40)
        .map(|_| {
            let (addr, lines) = (addr.clone(), lines.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).expect("head");
                let sent = s.write_all(&lines).is_ok();
                // Then it waits, holding the connection: the server ends it.
                let (_, closed) = read_to_close(&mut s);
                sent && closed
            })
        })
        .collect();
    let mut peak = before;
    while attackers.iter().any(|a| !a.is_finished()) {
        peak = peak.max(status_field(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut = attackers.into_iter().filter_map(|a| a.join().ok()).filter(|closed| *closed).count();
    eprintln!("RSS {before} KiB → peak {peak} KiB; {cut} cut");
    assert_eq!(cut, 40, "every such connection is ended by the server");
    assert!(peak < before + (200 << 10), "RSS {before} KiB → peak {peak} KiB");
    assert!(healthz_ms(&gw) < 1000.0);
}

/// A head pipelined behind a request still being answered (it waits on a hung runtime) is
/// held to a head's allowance: the request taken before it does not make it a body.
#[test]
fn a_head_pipelined_behind_a_slow_request_is_cut_too() {
    let (gw, _held) = gateway_before_a_hung_runtime("pipelined-head", 20_000);
    let addr = gw.host_port().to_owned();
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(format!("GET /api/runtimes/m/workers HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).expect("slow");
    wait_for("the slow request in flight", Duration::from_secs(10), || {
        let text = agent().get(&gw.url("/metrics")).call().ok()?.body_mut().read_to_string().ok()?;
        text.contains("worker_gateway_runtime_in_flight{runtime=\"m\"} 1").then_some(())
    });
    let started = Instant::now();
    let lines: Vec<u8> = b"a:b\r\n".iter().copied().cycle().take(2 << 20).collect();
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes()).expect("next head");
    let _ = s.write_all(&lines); // the server may cut it before all is sent
    let (answer, closed) = read_to_close(&mut s);
    assert!(closed && answer.is_empty(), "cut, the slow answer never came: {answer}");
    assert!(started.elapsed() < Duration::from_secs(15), "cut long before the runtime's 20 s budget");
}

/// An idle keep-alive connection is closed cleanly before the HTTP layer's read timeout,
/// which would write a 400 that the client reads as the answer to its next request.
#[test]
fn an_idle_keep_alive_connection_is_closed_without_a_stale_answer() {
    let gw = gateway("idle-keep-alive", "");
    let addr = gw.host_port().to_owned();
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).expect("send");
    s.set_read_timeout(Some(Duration::from_secs(40))).expect("timeout");
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "the one answer, nothing after it: {text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(29), "closed before the 30 s read timeout");
}
