//! TLS on every leg, with a CA made in the test (rcgen): a gateway reaching `runtime`
//! processes over https + wss with a `ca_file` (a private CA, and a pinned self-signed
//! runtime), a wrong CA failing as `remote_runtime_unreachable` with a TLS reason and no
//! address anywhere, and `serve` terminating TLS for HTTPS and WSS clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{Value, json};

/// Certificates and keys written as PEM files in one folder.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `ca.pem` (a CA), `server.pem` + `server.key` (signed by it, for localhost and
    /// 127.0.0.1), `other-ca.pem` (an unrelated CA) and `self.pem` + `self.key` (a
    /// self-signed server certificate).
    fn new(name: &str) -> Pki {
        let dir = temp_dir(name);
        let ca = new_ca("worker-gateway test CA");
        let server_key = KeyPair::generate().unwrap();
        let server = server_params().signed_by(&server_key, &ca).unwrap();
        let self_key = KeyPair::generate().unwrap();
        let self_signed = server_params().self_signed(&self_key).unwrap();
        for (file, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server.pem()),
            ("server.key", server_key.serialize_pem()),
            ("other-ca.pem", new_ca("an unrelated CA").pem()),
            ("self.pem", self_signed.pem()),
            ("self.key", self_key.serialize_pem()),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_owned()
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn server_params() -> CertificateParams {
    CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap()
}

/// A `worker-gateway runtime` serving HTTPS with `cert`/`key`.
fn tls_runtime(id: &str, cert: &str, key: &str) -> Process {
    let args = ["runtime", "--bind", "127.0.0.1:0", "--runtime-id", id, "--memory", "--token-env", "RT_TOKEN"];
    let tls = ["--tls-cert", cert, "--tls-key", key];
    Process::start_with_env(&[&args[..], &tls[..]].concat(), &[("RT_TOKEN", "tls-token")])
}

/// A rustls client configuration trusting only the PEM certificates in `ca`.
fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// An HTTPS client trusting only the CA in `ca`.
fn https_agent(ca: &Path) -> ureq::Agent {
    let pem = std::fs::read(ca).unwrap();
    let cert = ureq::tls::Certificate::from_pem(&pem).unwrap();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .proxy(None)
        .build()
        .into()
}

fn https_json(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let request = ureq::http::Request::builder().method(method).uri(url).header("content-type", "application/json");
    let request = request.body(body.map(|b| b.to_string()).unwrap_or_default()).unwrap();
    let mut response = agent.run(request).expect("an HTTPS answer");
    let text = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), serde_json::from_str(&text).unwrap_or(Value::Null))
}

type Wss = tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// Opens a WebSocket over TLS to `path` of the server at `addr`, trusting only `ca`.
fn wss_connect(addr: &str, path: &str, ca: &Path) -> Wss {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(ca), name).unwrap();
    let stream = rustls::StreamOwned::new(conn, tcp);
    let (ws, response) = tungstenite::client(format!("wss://localhost{path}"), stream).expect("a WSS upgrade");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// Reads text frames until one satisfies `done`.
fn wss_until(ws: &mut Wss, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        match ws.read().expect("a frame within 10 s") {
            tungstenite::Message::Text(text) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                let stop = done(&frame);
                frames.push(frame);
                if stop {
                    return frames;
                }
            }
            tungstenite::Message::Close(close) => panic!("closed: {close:?}"),
            _ => {}
        }
    }
}

#[test]
fn the_gateway_reaches_https_runtimes_over_rest_and_wss_and_a_wrong_ca_names_only_tls() {
    let pki = Pki::new("tls-e2e");
    let signed = tls_runtime("rt-signed", &pki.path("server.pem"), &pki.path("server.key"));
    let pinned = tls_runtime("rt-pinned", &pki.path("self.pem"), &pki.path("self.key"));
    assert!(signed.base.starts_with("https://127.0.0.1:"), "{}", signed.base);
    let remote = |id: &str, base: &str, ca_file: &str| {
        format!(
            "[[runtimes]]\nid = \"{id}\"\nkind = \"remote\"\nbase_url = \"{base}\"\ntoken_env = \"RT_TOKEN\"\n\
             ca_file = \"{ca_file}\"\nprobe_interval_ms = 100\n"
        )
    };
    // ca_file is relative to the config's folder, like every path in it.
    let config = pki.dir.join("gateway.toml");
    let text = [
        "[server]\nbind = \"127.0.0.1:0\"\n".to_owned(),
        remote("signed", &signed.base, "ca.pem"),
        remote("pinned", &pinned.base, "self.pem"),
        remote("wrong", &signed.base, "other-ca.pem"),
        format!(
            "[[runtimes]]\nid = \"plain\"\nkind = \"remote\"\nbase_url = \"{}\"\n",
            signed.base.replace("https:", "http:")
        ),
    ]
    .concat();
    std::fs::write(&config, text).unwrap();
    let gw = Process::start_with_env(
        &["serve", "--config", config.to_str().unwrap()],
        &[("RT_TOKEN", "tls-token"), ("RUST_LOG", "debug")],
    );
    for id in ["signed", "pinned"] {
        wait_health(&gw.base, id, "healthy");
        let wid = create_worker_on(&gw.base, id, "echo");
        let ws_url = format!("{}/api/runtimes/{id}/workers/{wid}/events/ws", gw.base.replace("http://", "ws://"));
        let mut ws = ws_connect(&ws_url, &[]).expect("gateway WebSocket");
        assert_eq!(event_name(&next_frame(&mut ws)), "snapshot");
        let input = format!("over TLS to {id}");
        let ack = post_json(&gw.url(&format!("/api/runtimes/{id}/workers/{wid}/input")), &json!({"content": input}));
        assert_eq!(ack.status, 200, "{:?}", ack.body);
        // The events came through the runtime's wss:// stream.
        frames_until(&mut ws, |f| f.to_string().contains(&input));
        assert_eq!(wait_transcript_on(&gw.base, id, &wid, 2)["items"][1]["content"], json!(input));
    }

    let view = wait_health(&gw.base, "wrong", "unreachable");
    let down = get(&gw.url("/api/runtimes/wrong/workers"));
    assert_eq!((down.status, down.code()), (502, "remote_runtime_unreachable"));
    let message = down.body["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("TLS"), "{message}");
    let ports = [&signed, &pinned].map(|rt| format!(":{}", rt.base.rsplit(':').next().unwrap()));
    let created = post_json(&gw.url("/api/runtimes/wrong/workers"), &json!({"profile": "echo"}));
    assert_eq!(created.code(), "remote_runtime_unreachable");
    let events = get(&gw.url("/api/runtimes/wrong/workers/worker-1/events/ws"));
    for shown in [view.to_string(), down.body.to_string(), created.body.to_string(), events.body.to_string()] {
        let address = ports.iter().any(|p| shown.contains(p.as_str()));
        assert!(!address && !shown.contains("127.0.0.1") && !shown.contains("https"), "{shown}");
    }
    // Pointed at http:// on the TLS port, the gateway passes on why the runtime refuses.
    let plain = get(&gw.url("/api/runtimes/plain/workers"));
    let said = plain.body["error"]["upstream_message"].as_str().unwrap_or("");
    assert_eq!((plain.status, said), (502, "this port speaks HTTPS: use https://"), "{:?}", plain.body);
    let plain = wait_health(&gw.base, "plain", "incompatible");
    let why = plain["health"]["last_error"]["message"].as_str().unwrap_or("");
    assert!(why.ends_with("(the runtime said: this port speaks HTTPS: use https://)"), "{plain}");

    let log = gw.stderr.lock().unwrap().clone();
    // At the default level too: in the WARN that the runtime is down.
    let warned = log.lines().any(|l| {
        l.contains("WARN")
            && l.contains("`wrong` is unreachable (remote_runtime_unreachable: TLS: the runtime's certificate")
    });
    assert!(warned, "the reason is logged:\n{log}");
    let address = ports.iter().any(|p| log.contains(p.as_str()));
    assert!(!address && !log.contains("https://127"), "no runtime address in the log:\n{log}");
}

#[test]
fn event_streams_check_the_same_certificate_as_requests() {
    use worker_gateway::runtime::handle::{RuntimeError, RuntimeHandle, SourceItem};
    use worker_gateway::runtime::remote::{RemoteOptions, RemoteRuntime};
    use worker_gateway::runtime::types::{CreateExtras, CreateWorker, Intent, ProfileRef};
    use worker_gateway::tls::client::{ClientTls, Trust};

    let pki = Pki::new("tls-events");
    let rt = tls_runtime("rt-events", &pki.path("server.pem"), &pki.path("server.key"));
    let remote = |ca: &str| {
        RemoteRuntime::start(RemoteOptions {
            runtime_id: "rt-events".into(),
            base_url: rt.base.clone(),
            token: Some(worker_gateway::secret::Secret::new("tls-token")),
            tls: Some(ClientTls::new(Trust::ca_file(&pki.dir.join(ca)).unwrap())),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(60),
            event_silence: Duration::from_secs(60),
            max_in_flight: 4,
            max_idle_connections: 4,
        })
    };
    let trusted = remote("ca.pem");
    let request = CreateWorker {
        intent: Intent::Task { objective: "tls".into() },
        profile: ProfileRef::RuntimeDefault,
        extras: CreateExtras::default(),
        idempotency_key: None,
    };
    let wid = trusted.create_worker(request).expect("create over https").worker_id;
    let mut source = trusted.open_events(&wid, None).expect("events over wss");
    let first = source.next(Duration::from_secs(10)).expect("stream");
    assert!(matches!(first, Some(SourceItem::Snapshot { .. })), "{first:?}");
    match remote("other-ca.pem").open_events(&wid, None).err() {
        Some(RuntimeError::Unreachable(reason)) => {
            assert!(reason.starts_with("TLS: ") && !reason.contains("127.0.0.1"), "{reason}")
        }
        other => panic!("a wrong CA fails the wss handshake: {other:?}"),
    }
}

#[test]
fn serve_terminates_tls_for_https_and_wss_and_refuses_plain_http_cleanly() {
    let pki = Pki::new("tls-serve");
    // Certificate and key from [server], relative to the config's folder.
    let config = pki.dir.join("gateway.toml");
    let text = memory_config("")
        .replace("threads = 4\n", "threads = 4\ntls_cert_file = \"server.pem\"\ntls_key_file = \"server.key\"\n");
    std::fs::write(&config, text).unwrap();
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    assert!(gw.base.starts_with("https://127.0.0.1:"), "{}", gw.base);
    let addr = gw.base.trim_start_matches("https://").to_owned();
    let base = format!("https://localhost:{}", addr.rsplit(':').next().unwrap());
    let ca = pki.dir.join("ca.pem");
    let agent = https_agent(&ca);

    // Connections that never finish a handshake hold nothing up.
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let (status, body) = https_json(&agent, "GET", &format!("{base}/api/runtimes"), None);
    assert_eq!((status, &body["items"][0]["runtime_id"]), (200, &json!("local")));
    let (status, body) =
        https_json(&agent, "POST", &format!("{base}/api/runtimes/local/workers"), Some(json!({"profile": "echo"})));
    assert_eq!(status, 201, "{body}");
    let wid = body["worker"]["worker_id"].as_str().unwrap().to_owned();
    // Its own origin is https: a page of the same host over plain HTTP is another site.
    let create = |origin: &str| {
        let request = ureq::http::Request::builder()
            .method("POST")
            .uri(format!("{base}/api/runtimes/local/workers"))
            .header("content-type", "application/json")
            .header("origin", origin)
            .body("{}".to_owned())
            .unwrap();
        agent.run(request).expect("an HTTPS answer").status().as_u16()
    };
    assert_eq!(create(&base.replace("https://", "http://")), 403, "a plain-HTTP page of the same host");
    assert_eq!(create(&base), 201, "the gateway's own page");

    let mut ws = wss_connect(&addr, &format!("/api/runtimes/local/workers/{wid}/events/ws"), &ca);
    assert_eq!(event_name(&wss_until(&mut ws, |_| true)[0]), "snapshot");
    let input = format!("{base}/api/runtimes/local/workers/{wid}/input");
    let (status, _) = https_json(&agent, "POST", &input, Some(json!({"content": "secure hello"})));
    assert_eq!(status, 200);
    wss_until(&mut ws, |f| f.to_string().contains("secure hello"));
    ws.close(None).unwrap();

    // Plain HTTP on the TLS port: a 400 that says why, and the connection ends.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"GET /api/runtimes HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).expect("the server closes the connection");
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("HTTPS"), "{answer}");
    // In the API's words: the error envelope and the request id every answer carries.
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_default();
    let body: Value = serde_json::from_str(body).expect("a JSON body");
    let id = body["request_id"].as_str().unwrap_or_default();
    assert!(id.starts_with("r-") && head.contains(&format!("X-Request-Id: {id}")), "{answer}");
    assert_eq!((&body["error"]["code"], &body["error"]["retryable"]), (&json!("invalid_request"), &json!(false)));
    // A client answered so that goes on sending is not listened to for long: about a second
    // (it was up to 64 reads of 10 s each, a connection and a thread held all along).
    let mut talker = TcpStream::connect(&addr).unwrap();
    talker.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    talker.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let mut sent = 0;
    let mut sink = [0u8; 4096];
    while sent < 200 && talker.write_all(b"x").is_ok() {
        sent += 1;
        match talker.read(&mut sink) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            _ => {} // the answer, or nothing yet (100 ms)
        }
    }
    assert!(sent < 40, "the connection took {sent} bytes after its answer");
    // A client that does not trust the certificate fails its handshake; nothing else does.
    let untrusting = https_agent(&pki.dir.join("other-ca.pem"));
    assert!(untrusting.get(format!("{base}/api/runtimes")).call().is_err());
    drop(idle);
    let (status, _) = https_json(&agent, "GET", &format!("{base}/api/runtimes"), None);
    assert_eq!(status, 200, "still serving after the failed and idle connections");

    // A handshake trickled a byte at a time is cut off at the handshake's deadline (10 s in
    // all), not kept for as long as each byte comes within a read timeout.
    let mut trickle = TcpStream::connect(&addr).unwrap();
    trickle.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    let started = std::time::Instant::now();
    let closed = hello.iter().cycle().take(60).any(|byte| {
        let mut buf = [0u8; 64];
        trickle.write_all(&[*byte]).is_err() || matches!(trickle.read(&mut buf), Ok(0)) || {
            std::thread::sleep(Duration::from_millis(250));
            false
        }
    });
    assert!(closed, "still open after {:?}", started.elapsed());
}

#[test]
fn unreadable_or_mismatched_tls_files_stop_startup_naming_the_file() {
    let pki = Pki::new("tls-bad");
    let fails = |extra: &[&str]| {
        let args = [&["runtime", "--bind", "127.0.0.1:0", "--memory"][..], extra].concat();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = pki.path("missing.pem");
    let error = fails(&["--tls-cert", &missing, "--tls-key", &pki.path("server.key")]);
    assert!(error.contains("tls_cert_file") && error.contains(&missing), "{error}");
    let error = fails(&["--tls-cert", &pki.path("server.pem"), "--tls-key", &pki.path("ca.pem")]);
    assert!(error.contains("tls_key_file") && error.contains("ca.pem"), "{error}");
    let error = fails(&["--tls-cert", &pki.path("server.pem"), "--tls-key", &pki.path("self.key")]);
    assert!(error.contains("does not fit") && error.contains("self.key"), "{error}");
    let error = fails(&["--tls-cert", &pki.path("server.pem")]);
    assert!(error.contains("tls_key_file"), "{error}");

    // A gateway's ca_file is checked when the config loads.
    let config = pki.dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[[runtimes]]\nid = \"r\"\nkind = \"remote\"\nbase_url = \"https://localhost:1\"\nca_file = \"server.key\"\n",
    )
    .unwrap();
    let error = worker_gateway::config::load_gateway(Some(&config)).unwrap_err();
    let error = format!("{error:#}");
    assert!(error.contains("ca_file") && error.contains("server.key"), "{error}");
}

/// A runtime that answers the TLS handshake a byte at a time (each byte well inside any
/// read timeout) cannot hold a connection past its deadline: rustls reads on until it has
/// a whole record, so only a deadline on every read bounds it.
#[test]
fn a_tls_handshake_trickled_a_byte_at_a_time_ends_at_its_deadline() {
    use std::io::Write;
    use worker_gateway::tls::client::{ClientTls, TimedTcp, Trust};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((mut peer, _)) = listener.accept() else { return };
        // A handshake record header, then one byte every 50 ms, as long as anyone listens.
        for byte in [0x16u8, 0x03, 0x03, 0x40, 0x00].into_iter().chain(std::iter::repeat(0)) {
            if peer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50)); // the trickle's pace
        }
    });
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    let (done, ended) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let result = ClientTls::new(Trust::System).connect("localhost", TimedTcp::new(tcp, Some(deadline)));
        let _ = done.send(result.is_err());
    });
    let failed = ended.recv_timeout(Duration::from_secs(5)).expect("the handshake ended within 5 s");
    assert!(failed, "no handshake");
}

/// A TCP connection to `to` from `source`, another loopback address: another client, as far
/// as the server can tell.
fn connect_from(source: std::net::Ipv4Addr, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(to) = to else { panic!("IPv4 only") };
    let address = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned by the TcpStream from here on; the addresses are ours.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let (from, to) = (address(source, 0), address(*to.ip(), to.port()));
        if libc::bind(fd, (&raw const from).cast(), len) != 0 || libc::connect(fd, (&raw const to).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

#[test]
fn one_address_cannot_hold_every_tls_handshake() {
    let pki = Pki::new("tls-per-peer");
    let config = pki.dir.join("gateway.toml");
    let text = memory_config("")
        .replace("threads = 4\n", "threads = 4\ntls_cert_file = \"server.pem\"\ntls_key_file = \"server.key\"\n");
    std::fs::write(&config, text).unwrap();
    let gw = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    let addr: std::net::SocketAddr = gw.base.trim_start_matches("https://").parse().unwrap();
    let base = format!("https://localhost:{}", addr.port());
    let agent = https_agent(&pki.dir.join("ca.pem"));
    // 64 silent connections from one address are held for their handshake; more from it are
    // closed at once.
    let held: Vec<TcpStream> = (0..64).map(|_| connect_from([127, 0, 0, 2].into(), addr).unwrap()).collect();
    let (status, _) = https_json(&agent, "GET", &format!("{base}/api/runtimes"), None);
    assert_eq!(status, 200, "another address is served");
    for n in 0..8 {
        let mut more = connect_from([127, 0, 0, 2].into(), addr).unwrap();
        more.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let read = more.read(&mut [0u8; 16]);
        let closed =
            matches!(read, Ok(0)) || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        assert!(closed, "connection {} from the same address: {read:?}", 65 + n);
    }
    drop(held);
    // Held once the server has seen the others go (it may take a moment to notice).
    wait_for("a connection held again", Duration::from_secs(10), || {
        let mut again = connect_from([127, 0, 0, 2].into(), addr).unwrap();
        again.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let read = again.read(&mut [0u8; 16]);
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock).then_some(())
    });
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("one address has 64 TLS handshakes under way"), "said in the log: {log}");
}

/// A TLS runtime that closes the gateway's new connection in its handshake (one address
/// holding all the handshakes it allows, here the test from the gateway's own address):
/// the create was never sent, so it is retryable and not said to have maybe been applied.
#[test]
fn a_connection_closed_in_its_tls_handshake_sent_nothing() {
    let pki = Pki::new("tls-handshake-closed");
    let rt = tls_runtime("rt-busy", &pki.path("server.pem"), &pki.path("server.key"));
    let addr = rt.base.trim_start_matches("https://").to_owned();
    // Silent connections from the address the gateway connects from: the runtime closes
    // every further one from it at once, until they go.
    let held: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let config = pki.dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\n[[runtimes]]\nid = \"busy\"\nkind = \"remote\"\nbase_url = \"{}\"\n\
             token_env = \"RT_TOKEN\"\nca_file = \"ca.pem\"\nprobe_interval_ms = 60000\n",
            rt.base
        ),
    )
    .unwrap();
    let gw = Process::start_with_env(&["serve", "--config", config.to_str().unwrap()], &[("RT_TOKEN", "tls-token")]);
    let create = post_json(&gw.url("/api/runtimes/busy/workers"), &json!({"profile": "echo"}));
    assert_eq!((create.status, create.code()), (502, "remote_runtime_unreachable"), "{:?}", create.body);
    assert_eq!(create.body["error"]["retryable"], json!(true), "nothing was sent: {:?}", create.body);
    drop(held);
    // Retried, as it says, once the runtime has seen the held connections go.
    wait_for("a create", Duration::from_secs(10), || {
        let create = post_json(&gw.url("/api/runtimes/busy/workers"), &json!({"profile": "echo"}));
        match create.status {
            201 => Some(()),
            502 if create.body["error"]["retryable"] == json!(true) => None,
            _ => panic!("{:?}", create.body),
        }
    });
}
