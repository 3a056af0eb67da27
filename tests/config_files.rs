//! Every file in `config/` works as it ships: each TOML file loads through the real config
//! loader, and the binary starts with it (on a free port, from a copy in a temp dir so its
//! data dir lands there) and serves. The nginx examples run under nginx in tests/replicas.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};

/// The token variable the examples name: the tests make sure it is unset unless they set it.
const TOKEN_VAR: &str = "LAB_RUNTIME_TOKEN";

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// `config/NAME` copied, unchanged, to `<fresh dir>/config/NAME`: relative paths in it
/// (`../data/local`) then point into the fresh dir.
fn shipped(name: &str) -> PathBuf {
    let dir = temp_dir(&format!("shipped-{name}")).join("config");
    std::fs::create_dir_all(&dir).expect("config dir");
    let copy = dir.join(name);
    std::fs::copy(config_dir().join(name), &copy).expect("copy the shipped config");
    copy
}

/// `worker-gateway ARGS` with the example's token variable unset, or set to `token`.
fn start(args: &[&str], token: Option<&str>) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker-gateway"));
    command.args(args).env("RUST_LOG", "info").env_remove(TOKEN_VAR);
    if let Some(token) = token {
        command.env(TOKEN_VAR, token);
    }
    Process::start_command(command)
}

/// Every file shipped in `config/` (tracked by git; a user's own files there, such as the
/// README's TLS keys and `my-gateway.toml`, are not) is one these tests (or
/// tests/replicas.rs) run: a new file needs a test before it ships. Outside a git checkout,
/// every file there counts.
#[test]
fn every_shipped_config_file_is_exercised() {
    let tracked = std::process::Command::new("git")
        .args(["ls-files", "-z", "--", "config"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success() && !out.stdout.is_empty());
    let mut names: Vec<String> = match tracked {
        Some(out) => String::from_utf8_lossy(&out.stdout)
            .split('\0')
            .filter_map(|path| path.strip_prefix("config/"))
            .map(str::to_owned)
            .collect(),
        None => std::fs::read_dir(config_dir())
            .expect("config/")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect(),
    };
    names.sort();
    let exercised = [
        "gateway.remote.example.toml",   // here
        "gateway.replicas.example.toml", // here, and under nginx in tests/replicas.rs
        "gateway.toml",                  // here
        "nginx.conf.example",            // here (nginx -t)
        "nginx.replicas.conf.example",   // tests/replicas.rs
        "runtime.example.toml",          // here
    ];
    assert_eq!(names, exercised, "config/ changed: give the new file a test");
    // The gateway files load here as well as in the binary below; the runtime file names
    // a token it cannot start without, so the binary (with and without it) loads it below.
    for name in names.iter().filter(|n| n.starts_with("gateway") && n.ends_with(".toml")) {
        worker_gateway::config::load_gateway(Some(&config_dir().join(name)))
            .unwrap_or_else(|e| panic!("config/{name}: {e:#}"));
    }
}

/// `config/gateway.toml` is what `serve` runs without `--config`: one embedded fs runtime
/// `local` with the `upper` and `slow` profiles the README's tour uses.
#[test]
fn the_default_config_starts_and_serves_its_profiles() {
    let config = shipped("gateway.toml");
    let gw = start(&["serve", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"], None);
    assert_eq!(get(&gw.url("/readyz")).status, 200);
    let profiles = get(&gw.url("/api/runtimes/local")).body["profiles"].clone();
    assert_eq!(profiles, json!(["echo", "slow", "upper"]), "the profiles the tour names");
    let worker = create_worker(&gw.base, "upper");
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{worker}/input")), &json!({"content": "hello world"}));
    let transcript = wait_transcript(&gw.base, &worker, 2);
    assert_eq!(transcript["items"][1]["content"], "HELLO WORLD");
    let data = config.parent().unwrap().parent().unwrap().join("data/local");
    assert!(data.join("workers").is_dir(), "the fs store is in ../data/local from the config file");
    assert!(gw.stderr.lock().unwrap().contains(&format!("config: {}", config.display())), "the log names the config");
}

/// The remote example needs no secret to start: its remotes' tokens are missing (the
/// variable unset, the file absent) and nothing listens where they point, yet the gateway
/// starts, serves `local` with `upper`, says in its log why each remote lacks a token, and
/// shows them down.
#[test]
fn the_remote_example_starts_without_its_secrets() {
    let config = shipped("gateway.remote.example.toml");
    let gw = start(&["serve", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"], None);
    let worker = create_worker(&gw.base, "upper");
    post_json(&gw.url(&format!("/api/runtimes/local/workers/{worker}/input")), &json!({"content": "tour"}));
    assert_eq!(wait_transcript(&gw.base, &worker, 2)["items"][1]["content"], "TOUR");
    for id in ["lab", "build"] {
        wait_for(&format!("{id} to be down"), std::time::Duration::from_secs(15), || {
            let view: Value = get(&gw.url(&format!("/api/runtimes/{id}"))).body;
            let state = view["health"]["state"].as_str().unwrap_or("").to_owned();
            ["unreachable", "auth_failed", "incompatible"].contains(&state.as_str()).then_some(())
        });
    }
    let log = gw.stderr.lock().unwrap().clone();
    assert!(log.contains("runtime `lab`: no token (environment variable `LAB_RUNTIME_TOKEN` is not set)"), "{log}");
    assert!(log.contains("runtime `build`: no token (cannot read token file /run/secrets/"), "{log}");
}

/// The replicas example starts the same way (its remote is not running here).
#[test]
fn the_replicas_example_starts() {
    let config = shipped("gateway.replicas.example.toml");
    let gw = start(&["serve", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"], Some("replica-token"));
    assert_eq!(get(&gw.url("/healthz")).status, 200);
    let view = get(&gw.url("/api/runtimes/lab")).body;
    assert_eq!(view["runtime_id"], "lab", "{view}");
}

/// The runtime example starts with the token it names, serves its profiles, and refuses a
/// request without that token.
#[test]
fn the_runtime_example_starts_with_its_token() {
    let config = shipped("runtime.example.toml");
    let rt = start(&["runtime", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"], Some("rt-lab-token"));
    assert_eq!(get(&rt.url("/v1/runtime")).status, 401);
    let summary = request("GET", &rt.url("/v1/runtime"), &[("authorization", "Bearer rt-lab-token")]);
    assert_eq!(summary.status, 200);
    assert_eq!(summary.body["runtime"]["runtime_id"], "rt-lab");
    let profiles = summary.body["runtime"]["profiles"].to_string();
    for profile in ["echo", "slow", "upper", "wordcount"] {
        assert!(profiles.contains(profile), "{profile} missing: {profiles}");
    }
    let data = config.parent().unwrap().parent().unwrap().join("data/rt-lab");
    assert!(data.is_dir(), "the fs store is in ../data/rt-lab from the config file");

    // Without its token it does not start, and says which variable is missing, where.
    let out = Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(["runtime", "--config", config.to_str().unwrap(), "--bind", "127.0.0.1:0"])
        .env_remove(TOKEN_VAR)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&config).expect("the example");
    let line = 1 + text.lines().position(|l| l.starts_with("token_env")).expect("a token_env line");
    let expected = format!(
        "runtime.example.toml:{line}: runtime (id \"rt-lab\"): token_env: environment variable `LAB_RUNTIME_TOKEN` is not set"
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

/// The TLS front example is valid for nginx as it ships (inside an `http` block, with a
/// certificate and key where it names them): `nginx -t` accepts it.
#[test]
fn the_nginx_example_passes_nginx_t() {
    if !nginx_available("the nginx example check") {
        return;
    }
    let dir = temp_dir("nginx-example");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["gateway.example.org".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(dir.join("gateway.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("gateway.key"), key.serialize_pem()).expect("write key");
    let site = std::fs::read_to_string(config_dir().join("nginx.conf.example"))
        .expect("the example")
        .replace("/etc/ssl/certs/gateway.example.org.pem", dir.join("gateway.pem").to_str().unwrap())
        .replace("/etc/ssl/private/gateway.example.org.key", dir.join("gateway.key").to_str().unwrap());
    std::fs::write(dir.join("site.conf"), site).expect("site");
    let main = "pid nginx.pid;\nerror_log stderr;\nevents {}\nhttp {\n    include site.conf;\n}\n";
    std::fs::write(dir.join("nginx.conf"), main).expect("main");
    let out = Command::new("nginx")
        .args(["-t", "-p", dir.to_str().unwrap(), "-c", dir.join("nginx.conf").to_str().unwrap()])
        .output()
        .expect("nginx is installed (.ci/run installs it)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("test is successful"), "{said}");
}

/// `worker-gateway ARGS` run to its end, which must come within 20 s: (exit code, what it
/// printed on stdout and stderr).
fn run_bounded(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker-gateway"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("its status") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not end within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(10)); // a poll of the child's exit
    };
    let mut printed = String::new();
    for out in [child.stdout.as_mut().map(|o| o as &mut dyn std::io::Read), child.stderr.as_mut().map(|e| e as _)] {
        std::io::Read::read_to_string(out.expect("piped"), &mut printed).expect("its output");
    }
    (status.code(), printed)
}

/// A FIFO named as a token, certificate or config file is refused at once, by name (it hung
/// the start for ever: opening a FIFO waits for a writer).
#[test]
fn a_named_file_that_is_not_a_regular_file_stops_the_start_at_once() {
    let dir = temp_dir("config-fifo");
    let fifo = dir.join("fifo");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    let with_token = write_config(
        "config-fifo-token",
        &format!(
            "[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\nbase_url = \"http://127.0.0.1:9\"\ntoken_file = \"{fifo}\"\n"
        ),
    );
    // `check` reports a runtime it cannot reach (its token unreadable) and goes on: 1 (as
    // `serve` starts, the runtime unusable, as without its token variable).
    for (args, exit) in [
        (vec!["check", "--config", with_token.to_str().unwrap()], 1),
        (vec!["serve", "--config", fifo], 2),
        (vec!["runtime", "--bind", "127.0.0.1:0", "--memory", "--tls-cert", fifo, "--tls-key", fifo], 2),
    ] {
        let (code, printed) = run_bounded(&args);
        assert_eq!(code, Some(exit), "{args:?}: {printed}");
        assert!(printed.contains(fifo) && printed.contains("not a regular file"), "{args:?}: {printed}");
    }
}
