//! The real binary: durability across SIGKILL, graceful SIGTERM, and the command line.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn fs_config(name: &str) -> std::path::PathBuf {
    write_config(
        name,
        "[server]\nbind = \"127.0.0.1:0\"\n\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\nstore = \"fs\"\ndata_dir = \"data\"\ninput_queue = 1000\nstop_grace_ms = 300\n\n[profiles.hang]\nkind = \"command\"\nargv = [\"sleep\", \"60\"]\n",
    )
}

fn full_transcript(process: &Process, worker: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut start = 0;
    loop {
        let page =
            get(&process.url(&format!("/api/runtimes/local/workers/{worker}/transcript?start={start}&limit=256"))).body;
        items.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_start"].as_u64() {
            Some(next) => start = next,
            None => return items,
        }
    }
}

#[test]
fn every_acknowledged_input_survives_sigkill() {
    let config = fs_config("sigkill");
    let config_arg = config.to_str().unwrap();
    let first = Process::start(&["serve", "--config", config_arg]);
    let worker = create_worker(&first.base, "echo");
    let acked = Arc::new(Mutex::new(Vec::<(u64, String)>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..3)
        .map(|t| {
            let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
            let url = first.url(&format!("/api/runtimes/local/workers/{worker}/input"));
            std::thread::spawn(move || {
                let agent = agent();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let content = format!("t{t}-input-{i}");
                    let body = json!({"content": content}).to_string();
                    let Ok(mut resp) = agent.post(&url).header("content-type", "application/json").send(body) else {
                        return;
                    };
                    if resp.status() == 200 {
                        let ack: Value = resp.body_mut().read_json().expect("ack body");
                        acked.lock().unwrap().push((ack["ack"]["transcript_sequence"].as_u64().unwrap(), content));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    wait_for("inputs to be acknowledged", Duration::from_secs(20), || {
        (count.load(Ordering::SeqCst) >= 60).then_some(())
    });
    first.signal(libc::SIGKILL);
    drop(first);
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().unwrap();
    }

    let second = Process::start(&["serve", "--config", config_arg]);
    let items = full_transcript(&second, &worker);
    let acked = acked.lock().unwrap();
    assert!(acked.len() >= 60);
    for (sequence, content) in acked.iter() {
        let item = items.iter().find(|i| i["sequence"] == *sequence).unwrap_or_else(|| panic!("entry {sequence} lost"));
        assert_eq!((&item["role"], item["content"].as_str().unwrap()), (&json!("user"), content.as_str()));
    }
    // The worker stays running: the inputs it had acknowledged but not run, run now.
    let detail_url = second.url(&format!("/api/runtimes/local/workers/{worker}"));
    let detail = wait_for("the recovered inputs to run", Duration::from_secs(20), || {
        let detail = get(&detail_url).body;
        (detail["activity"] == "idle").then_some(detail)
    });
    assert_eq!(detail["status"], "running", "a running worker stays running after a restart");
    let items = full_transcript(&second, &worker);
    let of_role = |role: &str| -> Vec<String> {
        items.iter().filter(|i| i["role"] == role).map(|i| i["content"].as_str().unwrap().to_owned()).collect()
    };
    let answers = of_role("assistant");
    let unanswered: Vec<_> = acked.iter().filter(|(_, content)| !answers.contains(content)).collect();
    // Only a turn the kill cut short may lack its answer, and then it says so.
    assert!(unanswered.len() <= 1, "unanswered after the restart: {unanswered:?}");
    if !unanswered.is_empty() {
        assert!(of_role("system").iter().any(|n| n.contains("interrupted")), "{:?}", of_role("system"));
    }
    let next = create_worker(&second.base, "echo");
    assert_eq!(next, "worker-00000002");
}

/// A gateway on `config` with a `hang` worker whose turn runs (and will not end by itself).
fn running_a_turn(config: &str) -> (Process, String) {
    let gateway = Process::start(&["serve", "--config", config]);
    let worker = create_worker(&gateway.base, "hang");
    let ack =
        post_json(&gateway.url(&format!("/api/runtimes/local/workers/{worker}/input")), &json!({"content":"wait"}));
    assert_eq!(ack.status, 200);
    let detail = gateway.url(&format!("/api/runtimes/local/workers/{worker}"));
    wait_for("the turn to run", Duration::from_secs(5), || (get(&detail).body["activity"] == "busy").then_some(()));
    (gateway, worker)
}

#[test]
fn sigterm_ends_turns_flushes_and_exits_zero() {
    let config = fs_config("sigterm");
    let config_arg = config.to_str().unwrap();
    let (mut gateway, worker) = running_a_turn(config_arg);
    gateway.signal(libc::SIGTERM);
    let status = gateway.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", gateway.stderr.lock().unwrap());
    assert!(gateway.stderr.lock().unwrap().contains("stopped"));

    let again = Process::start(&["serve", "--config", config_arg]);
    let items = full_transcript(&again, &worker);
    assert_eq!(items[0]["content"], "wait");
    let note = items.last().unwrap();
    assert_eq!(note["role"], "system");
    assert!(note["content"].as_str().unwrap().contains("interrupted"), "{note}");
    let detail = get(&again.url(&format!("/api/runtimes/local/workers/{worker}"))).body;
    assert_eq!((&detail["status"], &detail["activity"]), (&json!("running"), &json!("idle")));
}

/// A shutdown that waits says what for, and a second signal ends it at once (exit 1): what
/// was acknowledged is on disk, and the turn it cut is closed as interrupted at the next start.
#[test]
fn a_second_signal_ends_a_waiting_shutdown_at_once() {
    let config = fs_config("second-signal");
    let config_arg = config.to_str().unwrap();
    let (mut gateway, worker) = running_a_turn(config_arg);
    gateway.signal(libc::SIGTERM);
    let said = |what: &str| gateway.stderr.lock().unwrap().contains(what).then_some(());
    wait_for("the shutdown to say what it waits for", Duration::from_secs(5), || {
        said("giving 1 running turn(s) up to 300 ms to finish")
    });
    let asked = std::time::Instant::now();
    gateway.signal(libc::SIGINT);
    assert_eq!(gateway.wait(Duration::from_secs(5)).code(), Some(1));
    assert!(asked.elapsed() < Duration::from_secs(5), "it did not wait out the 10 s grace");
    assert!(gateway.stderr.lock().unwrap().contains("a second signal: exiting now"));

    let again = Process::start(&["serve", "--config", config_arg]);
    let items = full_transcript(&again, &worker);
    assert_eq!(items[0]["content"], "wait");
    assert!(items.last().unwrap()["content"].as_str().unwrap().contains("interrupted"), "{items:?}");
}

/// Reads one response off a kept-alive connection: its head, and its body by length.
fn read_response(stream: &mut std::net::TcpStream) -> (String, String) {
    use std::io::Read;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("a response"), 1, "closed after {:?}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0; length];
    stream.read_exact(&mut body).expect("the body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Once SIGTERM arrives, new connections are refused at once (a client or a load balancer
/// goes elsewhere), a request on a connection opened before is answered 503 `shutting_down`
/// (it used to wait, unanswered, until the process exited), and a request under way
/// finishes: its input is acknowledged and kept.
#[test]
fn a_stopping_gateway_refuses_new_work_at_once_and_finishes_what_it_has() {
    use std::io::Write;
    let config = fs_config("sigterm-new-work");
    let config_arg = config.to_str().unwrap();
    let mut gateway = Process::start(&["serve", "--config", config_arg]);
    let worker = create_worker(&gateway.base, "echo");
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    let connect = || {
        let stream = std::net::TcpStream::connect(&addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        stream
    };
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut kept = connect();
    kept.write_all(healthz.as_bytes()).expect("send");
    assert!(read_response(&mut kept).0.starts_with("http/1.1 200"));
    // A request under way: its body (over what the HTTP layer reads by itself) half sent.
    let content = "x".repeat(4000);
    let body = json!({ "content": content }).to_string();
    let mut under_way = connect();
    let head = format!(
        "POST /api/runtimes/local/workers/{worker}/input HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    under_way.write_all(head.as_bytes()).expect("send");
    under_way.write_all(&body.as_bytes()[..2000]).expect("send");
    wait_for("the request to be under way", Duration::from_secs(5), || {
        let metrics = ureq::get(&gateway.url("/metrics")).call().ok()?.into_body().read_to_string().ok()?;
        // The request for the metrics is one in flight too.
        metrics.contains("worker_gateway_http_requests_in_flight 2").then_some(())
    });

    gateway.signal(libc::SIGTERM);
    wait_for("new connections to be refused", Duration::from_secs(5), || {
        std::net::TcpStream::connect(&addr).err().map(|e| assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused))
    });
    kept.write_all(healthz.as_bytes()).expect("send");
    let (head, refusal) = read_response(&mut kept);
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("connection: close") && head.contains("retry-after: 1"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&refusal).expect("JSON")["error"]["code"], "shutting_down");

    under_way.write_all(&body.as_bytes()[2000..]).expect("the rest of the body");
    let (head, ack) = read_response(&mut under_way);
    assert!(head.starts_with("http/1.1 200"), "the request under way finished: {head}{ack}");
    assert_eq!(gateway.wait(Duration::from_secs(20)).code(), Some(0));

    let again = Process::start(&["serve", "--config", config_arg]);
    let items = full_transcript(&again, &worker);
    assert!(items.iter().any(|item| item["content"] == content.as_str()), "the acknowledged input was kept");
}

/// Runs the binary to its end: exit status, stdout, stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway")).args(args).output().expect("run");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn command_line_errors_are_clear() {
    let run = |args: &[&str]| {
        let (code, stdout, stderr) = run(args);
        (code, stdout + &stderr)
    };
    let (code, text) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(text.starts_with("worker-gateway "));
    let (code, text) = run(&["serve", "--help"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("--config FILE"));
    let (code, text) = run(&["serve", "--bind", "nowhere"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("--bind: `nowhere` is not an address"), "{text}");
    assert!(text.contains("see `worker-gateway help serve`"), "{text}");
    let (code, text) = run(&["serve", "--config", "/no/such/file.toml"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("/no/such/file.toml"), "{text}");
    let bad = write_config("badcfg", "[server]\nthreds = 3\n");
    let (code, text) = run(&["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(text.contains("threds"), "{text}");
    let (code, text) = run(&["frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("unknown command `frobnicate`") && text.contains("serve, runtime, check"), "{text}");
    let (code, text) = run(&["check", "--jsn"]);
    assert_eq!(code, Some(2));
    assert!(text.contains("--jsn") && text.contains("see `worker-gateway help check`"), "{text}");
}

#[test]
fn help_and_version_work_as_commands_and_flags() {
    let version = format!("worker-gateway {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["version"][..], &["--version"], &["-V"]] {
        assert_eq!(run(args), (Some(0), version.clone(), String::new()), "{args:?}");
    }
    let (code, overview, _) = run(&["help"]);
    assert_eq!(code, Some(0));
    assert!(overview.contains("COMMANDS:") && overview.contains("help [COMMAND]"), "{overview}");
    for args in [&["--help"][..], &["-h"], &["help", "help"], &["help", "version"]] {
        assert_eq!(run(args), (Some(0), overview.clone(), String::new()), "{args:?}");
    }
    for command in ["serve", "runtime", "check"] {
        let (code, text, _) = run(&["help", command]);
        assert_eq!(code, Some(0));
        assert!(text.starts_with(&format!("worker-gateway {command} — ")), "{text}");
        assert_eq!(run(&[command, "--help"]), (Some(0), text.clone(), String::new()));
        assert_eq!(run(&[command, "-h"]).1, text);
    }
    // serve --help says which config it reads without --config: the built-in copy.
    let (_, serve_help, _) = run(&["help", "serve"]);
    assert!(serve_help.contains("built into") && serve_help.contains("./data/local"), "{serve_help}");
    let (code, _, stderr) = run(&["help", "frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no help for `frobnicate`"), "{stderr}");
    let (code, _, stderr) = run(&[]);
    assert_eq!(code, Some(2), "no command is a usage error");
    assert!(stderr.contains("USAGE:") && stderr.contains("error: no command given"), "{stderr}");
    assert_eq!(run(&["version", "extra"]).0, Some(2));
}

#[test]
fn bind_takes_localhost_in_the_config_and_on_the_command_line() {
    let config = write_config("bind-localhost", &memory_config("").replace("127.0.0.1:0", "localhost:0"));
    let from_file = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    assert!(from_file.base.starts_with("http://127.0.0.1:"), "{}", from_file.base);
    assert_eq!(get(&from_file.url("/healthz")).status, 200);
    let from_flag = Process::start(&["serve", "--config", config.to_str().unwrap(), "--bind", "localhost:0"]);
    assert!(from_flag.base.starts_with("http://127.0.0.1:"), "{}", from_flag.base);
    let runtime = Process::start(&["runtime", "--memory", "--bind", "localhost:0"]);
    assert_eq!(get(&runtime.url("/v1/runtime")).status, 200);
}

#[test]
fn config_errors_name_the_file_line_and_runtime() {
    let text = "[server]\nbind = \"127.0.0.1:0\"\n\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\nstore = \"memory\"\n\n\
                [[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"http://127.0.0.1:9\"\nbse_url = \"typo\"\n";
    let config = write_config("located", text);
    let (code, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    let expected = format!(
        "error: {}:13: runtimes[1] (id \"lab\"): unknown key \"bse_url\"; valid keys: id, kind, label, store, data_dir,",
        config.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert!(stderr.contains("base_url, token_env, token_file"), "{stderr}");
    let config = write_config("located-value", &text.replace("bse_url = \"typo\"", "max_in_flight = 0"));
    let (code, _, stderr) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains(":13: runtimes[1] (id \"lab\"): max_in_flight must be 1..=4096"), "{stderr}");
}

/// A browser token that is configured but cannot be had stops the start (the gateway would
/// otherwise serve its API to anyone), naming the variable or file.
#[test]
fn a_missing_browser_token_stops_the_start() {
    for (setting, said) in [
        ("token_env = \"WG_BROWSER_TOKEN_NEVER_SET\"", "environment variable `WG_BROWSER_TOKEN_NEVER_SET` is not set"),
        ("token_file = \"no-such-token-file\"", "no-such-token-file: No such file"),
    ] {
        let config = write_config(
            "browser-token",
            &memory_config("").replace("threads = 4\n", &format!("threads = 4\n{setting}\n")),
        );
        let (code, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(&format!(":5: server: {}", setting.split(' ').next().unwrap_or(""))), "{stderr}");
        assert!(stderr.contains(said), "{stderr}");
    }
}

/// A start that fails — a bad config, a bind that fails, for the gateway and for a runtime
/// process — leaves no data dir behind; a data dir that was there stays as it was.
#[test]
fn a_failed_start_leaves_no_data_dir() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let fs = |name: &str, bind: &str| {
        let text = format!(
            "[server]\nbind = \"{bind}\"\n\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\nstore = \"fs\"\n\
             data_dir = \"data/local\"\n"
        );
        let config = write_config(name, &text);
        let data = config.parent().unwrap().join("data");
        (config, data)
    };
    let (config, data) = fs("nodir-config", "127.0.0.1:0");
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap() + "colour = 1\n").unwrap();
    let (code, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!data.exists(), "a bad config made {}", data.display());

    let (config, data) = fs("nodir-bind", &taken_addr);
    let (code, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(!data.exists(), "a failed bind left {}", data.display());

    let data = temp_dir("nodir-runtime").join("data");
    let rt_dir = data.join("rt");
    let (code, _, stderr) = run(&["runtime", "--bind", &taken_addr, "--data-dir", rt_dir.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(!data.exists(), "a runtime's failed bind left {}", data.display());

    // A data dir that existed is the user's: a failed start leaves it and what it holds.
    let (config, data) = fs("nodir-existing", &taken_addr);
    std::fs::create_dir_all(data.join("local")).unwrap();
    std::fs::write(data.join("local/keep"), "mine").unwrap();
    let (code, _, _) = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert_eq!(std::fs::read_to_string(data.join("local/keep")).unwrap(), "mine");
    drop(taken);
}

#[test]
fn a_second_gateway_on_the_same_data_dir_is_refused() {
    let config = fs_config("twice");
    let _first = Process::start(&["serve", "--config", config.to_str().unwrap()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
}

/// Probes answered 2xx log their access line at debug: a gateway probing its runtimes every
/// few seconds filled most of a runtime's log. Requests that do something, and failed probes,
/// still log at info.
#[test]
fn successful_probes_do_not_fill_the_access_log() {
    let runtime = Process::start(&["runtime", "--bind", "127.0.0.1:0", "--memory"]);
    for _ in 0..3 {
        assert_eq!(get(&runtime.url("/v1/runtime")).status, 200);
    }
    assert_eq!(get(&runtime.url("/v1/workers")).status, 200);
    let logged = |what: &str| runtime.stderr.lock().unwrap().contains(what);
    wait_for("the listing's access line", Duration::from_secs(10), || logged("GET /v1/workers 200").then_some(()));
    assert!(!logged("GET /v1/runtime 200"), "{}", runtime.stderr.lock().unwrap());

    let gateway = Process::start(&["serve", "--config", fs_config("probes-quiet").to_str().unwrap()]);
    for path in ["/healthz", "/readyz", "/metrics", "/api/runtimes"] {
        assert_eq!(get(&gateway.url(path)).status, 200, "{path}");
    }
    let logged = |what: &str| gateway.stderr.lock().unwrap().contains(what);
    wait_for("the listing's access line", Duration::from_secs(10), || logged("GET /api/runtimes 200").then_some(()));
    for probe in ["GET /healthz", "GET /readyz", "GET /metrics"] {
        assert!(!logged(probe), "{probe}: {}", gateway.stderr.lock().unwrap());
    }
}
