//! A real headless Chromium driven over chromedriver's WebDriver API, for the browser tests.
//! Without Chromium a test says it was skipped; under CI (CI=true) a missing browser fails.

use std::net::TcpListener;
use std::time::Duration;

use serde_json::{Value, json};

use super::{agent, temp_dir, wait_for};

/// Debian's chromedriver.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Debian's Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";
/// The WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; the browser and chromedriver end when it is dropped.
pub struct Driver {
    base: String,
    session: String,
    process: std::process::Child,
}

impl Driver {
    pub fn start() -> Option<Driver> {
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists() {
            assert!(std::env::var("CI").is_err(), "CI must run the browser test: install chromium and chromium-driver");
            eprintln!(
                "SKIPPED: dashboard browser test (no {CHROMIUM} / {CHROMEDRIVER}; apt-get install chromium chromium-driver)"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(20), || {
            agent().get(&format!("{base}/status")).call().ok().map(|_| ())
        });
        let profile = temp_dir("chromium-profile");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=420,900",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}});
        let mut resp = agent().post(&format!("{base}/session")).send(caps.to_string()).expect("new session");
        let v: Value = resp.body_mut().read_json().unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_owned();
        Some(Driver { base, session, process })
    }

    pub fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let payload = if body.is_null() { String::new() } else { body.to_string() };
        let req = ureq::http::Request::builder().method(method).uri(url).body(payload).unwrap();
        let v: Value = agent().run(req).unwrap().body_mut().read_json().unwrap();
        v["value"].clone()
    }

    pub fn script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    pub fn element(&self, css: &str) -> String {
        let v = self.call("POST", "/element", json!({"using": "css selector", "value": css}));
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {v}")).to_owned()
    }

    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Loads `url` in the window.
    pub fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    /// Sizes the window (CSS pixels), for a wide or a phone-sized screen.
    pub fn resize(&self, width: u32, height: u32) {
        self.call("POST", "/window/rect", json!({"width": width, "height": height}));
    }

    /// Types `keys` into whatever has the focus (WebDriver key codes such as `\u{E015}`, ↓).
    pub fn keys(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| {
                [json!({"type": "keyDown", "value": c.to_string()}), json!({"type": "keyUp", "value": c.to_string()})]
            })
            .collect();
        self.call("POST", "/actions", json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}));
    }

    /// Saves a screenshot as `<temp>/wg-dashboard-screens/<name>.png` for a person to look at.
    pub fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join("wg-dashboard-screens");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        let png = self.call("GET", "/screenshot", Value::Null);
        std::fs::write(&path, decode_base64(png.as_str().expect("a screenshot"))).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    pub fn wait_script(&self, what: &str, script: &str) -> Value {
        wait_for(what, Duration::from_secs(20), || {
            let v = self.script(script);
            (!v.is_null() && v != json!(false) && v != json!("")).then_some(v)
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = agent().delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Decodes standard base64 (for a screenshot a developer asked for).
pub fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    bytes
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().enumerate().fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
            let keep = q.len().saturating_sub(1);
            [(n >> 16) as u8, (n >> 8) as u8, n as u8].into_iter().take(keep)
        })
        .collect()
}
