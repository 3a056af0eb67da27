//! The dashboard in a real headless Chromium, driven over chromedriver's WebDriver API:
//! load the page, create an `echo` worker, send input, see the output stream in, stop it.
//! Without Chromium this test says it was skipped; under CI (CI=true) a missing browser fails.

mod common;

use common::browser::{Driver, decode_base64};
use common::*;
use serde_json::{Value, json};

#[test]
fn a_person_creates_a_worker_talks_to_it_and_stops_it() {
    let Some(driver) = Driver::start() else { return };
    let gw = TestGateway::start("dashboard", &memory_config("[profiles.chatty]\nkind = \"echo\"\ndelay_ms = 50\n"));
    driver.call("POST", "/url", json!({"url": gw.url("/")}));
    driver.wait_script("the runtime list", "return document.querySelectorAll('#profile option').length > 0");
    driver.script("document.querySelector('#profile').value = 'chatty'; return true");
    driver.click("#create-btn");
    driver.wait_script(
        "the worker view",
        "return document.querySelector('#worker-title').textContent.includes('-00000001')",
    );
    driver.wait_script("the input box", "return !document.querySelector('#input').disabled");
    let input = driver.element("#input");
    driver.call("POST", &format!("/element/{input}/value"), json!({"text": "hello from a browser\u{E007}"}));
    // Live: the reply grows word by word (50 ms apart) before the turn ends.
    driver.wait_script("partial output", "const b = document.querySelector('.msg.assistant'); return b && b.textContent.length > 0 && b.textContent !== 'hello from a browser'");
    let text = driver.wait_script("the whole reply", "const b = document.querySelector('.msg.assistant'); return b && b.textContent === 'hello from a browser' && b.textContent");
    assert_eq!(text, "hello from a browser");
    let user = driver.script("return document.querySelector('.msg.user').textContent");
    assert_eq!(user, "hello from a browser");
    driver.click("#stop");
    driver
        .wait_script("the stopped badge", "return document.querySelector('#worker-status').textContent === 'stopped'");
    // A memory runtime's ids carry its boot: the one worker is read from the list.
    let detail = get(&gw.url("/api/runtimes/local/workers")).body["items"][0].clone();
    assert_eq!(detail["status"], "stopped");
    let errors = driver.script("return document.querySelector('#errors').textContent");
    assert_eq!(errors, "", "no error shown");
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        let png = driver.call("GET", "/screenshot", Value::Null);
        std::fs::write(&path, decode_base64(png.as_str().unwrap())).unwrap();
    }
}

#[test]
fn a_worker_deleted_while_watched_shows_as_gone_and_is_not_reconnected_to() {
    let Some(driver) = Driver::start() else { return };
    let gw = TestGateway::start("dashboard-gone", &memory_config(""));
    driver.call("POST", "/url", json!({"url": gw.url("/")}));
    driver.wait_script("the runtime list", "return document.querySelectorAll('#profile option').length > 0");
    driver.click("#create-btn");
    driver.wait_script("the input box", "return !document.querySelector('#input').disabled");
    let wid = get(&gw.url("/api/runtimes/local/workers")).body["items"][0]["worker_id"].as_str().unwrap().to_owned();
    let worker = gw.url(&format!("/api/runtimes/local/workers/{wid}"));
    assert_eq!(post_json(&format!("{worker}/stop"), &json!({})).status, 200);
    assert_eq!(request("DELETE", &worker, &[]).status, 200);
    driver.wait_script(
        "the gone state",
        "return document.querySelector('#stream').textContent === 'this worker no longer exists'",
    );
    let disabled =
        driver.script("return ['stop','cancel','send','input'].every((id) => document.getElementById(id).disabled)");
    assert_eq!(disabled, json!(true), "nothing acts on a worker that is gone");
}
